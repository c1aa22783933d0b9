"""The server's copy of the clients' ledger receipts: ``<run_dir>/receipts.jsonl``.

With every spend or refusal a DP-SGD client hands the server the receipt of the ledger entry it
wrote first (``privacy.ledger.Receipt``: the entry's canonical bytes, hash, Ed25519 signature and
the client's public key): in the train reply as ConfigRecord ``ledger-receipt`` (in a secure round,
the stage-0 reply), or, in an error reply, which carries no records, at the end of the error
reason. :meth:`ReceiptLog.take` pulls it out of a reply and appends one line, ``fsync``ed::

    {"round": 3, "node_id": 123, "outcome": "trained", "secure_aggregation": true,
     "received": "2025-01-01T12:00:00+00:00", "receipt": {"client": "eu-west", "round": 3, ...}}

``outcome`` is ``trained`` (the reply was accepted: a plain round aggregates it; in a secure round
the client passed stage 0, and ``metrics.jsonl`` says whether its update reached the sum),
``declined`` (a privacy refusal) or ``failed`` (an error after the entry was written, e.g. an
update outside the secure aggregation bound: spent in the ledger, never sent). Lines are written
when the replies arrive, before the round ends, and are never dropped on resume: a receipt is
evidence that the client recorded a spend, whether or not the server finished the round.
``privacy.audit`` checks the ledgers against this file.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from flwr.app import Message

from privacy import RECEIPT_RECORD
from privacy.ledger import Receipt, split_receipt, utc_now

logger = logging.getLogger(__name__)

RECEIPTS = "receipts.jsonl"


class ReceiptLog:
    """Appends the receipts that replies carry to ``path`` (``None``: keep none, e.g. in unit tests)."""

    def __init__(self, path: str | Path | None) -> None:
        self.path = None if path is None else Path(path)

    def take(self, reply: Message, *, server_round: int, secure: bool,
             outcome: str) -> tuple[str | None, Receipt | None]:
        """Record the reply's receipt, if it has one. Returns the error reason without the receipt
        (``None`` for a reply without error) and the receipt (``None`` when there is none)."""
        reason = None
        receipt = None
        if reply.has_error():
            reason, receipt = split_receipt(str(reply.error.reason))
        elif RECEIPT_RECORD in reply.content.config_records:
            try:
                receipt = Receipt.from_dict(dict(reply.content[RECEIPT_RECORD]))
            except ValueError as err:
                logger.warning("round %d: node %s sent a malformed ledger receipt (%s); not recorded",
                               server_round, reply.metadata.src_node_id, err)
        if receipt is not None and self.path is not None:
            line = {"round": server_round, "node_id": int(reply.metadata.src_node_id), "outcome": outcome,
                    "secure_aggregation": secure, "received": utc_now(), "receipt": receipt.to_dict()}
            self._append(json.dumps(line) + "\n")
        return reason, receipt

    def _append(self, line: str) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a+b") as f:
            if f.tell() and (f.seek(f.tell() - 1), f.read(1))[1] != b"\n":
                f.write(b"\n")  # a line torn by a crash stays on its own (the audit skips it)
            f.write(line.encode("utf-8"))
            f.flush()
            os.fsync(f.fileno())
