"""The server's side of secure aggregation over a Flower ``Grid`` (a thin adapter around
``privacy/secagg.py``, where the protocol lives; the wire layout is in ``client/secure_aggregation.py``).

One securely aggregated training round, :meth:`SecureRound.run`:

0. *advertise_keys*: the strategy's train messages (global weights, round config) plus the
   ``secagg`` request; each client trains, keeps its update, replies with public keys and metrics.
   A privacy refusal (``PRIVACY_DECLINED``) is a decline, as in a plain round. The stage-0
   replies carry the clients' ledger receipts (``server/receipts.py``).
1. *share_keys*, 2. *masked_input*, 3. *unmasking*: ``train.secagg`` messages, each stage one
   ``Grid.send_and_receive`` with ``federation.round_timeout``. A missing reply, an error reply or
   a malformed reply (wrong records, metrics without an int ``num-examples``, or protocol fields the
   server rejects: ``SecAggServer.rejected``) at any stage means that client dropped at that stage:
   logged with its node id and the reason, recorded in ``secagg_dropped`` / ``secagg_errors``
   (``secagg_malformed`` counts the malformed ones), and the round goes on with the others.
4. The protocol returns the exact sum of the surviving clients' quantized vectors
   ``[n_k (w_k - w), n_k]`` (``privacy/secagg_update.py``); the server divides by the summed ``n_k``
   and hands the strategy **one** reply carrying ``w + delta`` with ``num-examples = sum n_k``.
   FedAvg (and FedProx) of that one reply is exactly ``w + delta``; FedAdam takes ``delta`` as its
   pseudo-gradient, as it would from the plain replies.

If the protocol cannot complete (too few shares of a secret, no masked input, fewer than two
clients, an unmasked weight that differs from what the survivors reported),
the round is **aborted**: logged, recorded (``secagg_aborted``, ``secagg_abort_reason``), the model
unchanged; the run goes on with the next round.

The protocol numbers the round's clients 1..n (sorted Flower node ids): ``ConfigRecord`` ints are
signed 64-bit and node ids are not.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords

from client.secure_aggregation import ACTION, MASKED_RECORD, RECORD
from privacy import PRIVACY_DECLINED
from privacy.secagg import STAGES, Quantizer, SecAggAborted, SecAggError, SecAggServer, choose_graph
from privacy.secagg_update import UpdateLayout, decode_sum
from server.receipts import ReceiptLog

logger = logging.getLogger(__name__)

MAX_REASON = 600
"""Characters of a client's error reason kept in ``metrics.jsonl``: the first third and the end
(the log has all of it)."""
SERVER_SAW_SECURE = "only the sum of the clients' masked, quantized{dp} updates"
SERVER_SAW_PLAIN = "each client's{dp} update"


def what_the_server_saw(*, secure: bool, dp: bool) -> str:
    """One line for run summaries: what the server could see of the clients' updates."""
    if secure:
        return SERVER_SAW_SECURE.format(dp=", DP-noised" if dp else " (not DP-noised)")
    return SERVER_SAW_PLAIN.format(dp=" DP-noised" if dp else "")


@dataclass
class SecureRoundResult:
    """What one secure round gives the round loop.

    ``reply``: the aggregate as one train reply for the strategy (``None`` when aborted).
    ``trained``: the stage-0 replies without error (clients that trained; their metrics, e.g. DP).
    ``declined``: the stage-0 privacy refusals. ``in_sum``: clients whose update is in the sum
    (0 when aborted). ``failed``: clients that dropped at some stage (declines apart).
    ``record``: the round's ``secagg_*`` fields for ``metrics.jsonl``.
    """

    reply: Message | None
    trained: list[Message]
    declined: list[Message]
    in_sum: int
    failed: int
    record: dict[str, Any] = field(default_factory=dict)


class _Aborted(Exception):
    pass


def _stage0_problem(reply: Message) -> str | None:
    """Why a stage-0 (advertise_keys) reply without error is malformed, or None when it is not."""
    if RECORD not in reply.content.config_records or "metrics" not in reply.content.metric_records:
        return f"expected ConfigRecord {RECORD!r} and MetricRecord 'metrics'"
    metrics = reply.content["metrics"]
    users = metrics.get("num-examples")
    if isinstance(users, bool) or not isinstance(users, int) or users < 0:
        return f"metric 'num-examples' must be an int >= 0 (the client's users), got {users!r}"
    loss = metrics.get("train-loss")
    if isinstance(loss, bool) or not isinstance(loss, (int, float)):
        return f"metric 'train-loss' must be a number, got {loss!r}"
    return None


class SecureRound:
    """One securely aggregated training round over ``grid`` (see the module docstring)."""

    def __init__(self, grid: Grid, *, server_round: int, bound: float, scale_bits: int, timeout: float,
                 receipts: ReceiptLog | None = None) -> None:
        self.grid = grid
        self.receipts = receipts or ReceiptLog(None)
        self.server_round = server_round
        self.bound = bound
        self.scale_bits = scale_bits
        self.timeout = timeout
        self._node: dict[int, int] = {}  # protocol id -> node id
        self._id: dict[int, int] = {}  # node id -> protocol id
        self._names: dict[int, str] = {}
        self._dropped: dict[str, list[int]] = {stage: [] for stage in STAGES}
        self._errors: list[str] = []
        self._answered: dict[str, int] = {}
        self._seconds: dict[str, float] = {}
        self._malformed: set[tuple[str, int]] = set()

    # ------------------------------------------------------------------------------ messaging

    def _drop(self, cid: int, stage: str, reason: str) -> None:
        self._dropped[stage].append(cid)
        cut = len(reason) - MAX_REASON
        # a raised exception's reason is a traceback: its end says what happened
        short = reason if cut <= 0 else (f"{reason[:MAX_REASON // 3]} [... {cut} characters, all in the log ...] "
                                         f"{reason[-(MAX_REASON - MAX_REASON // 3):]}")
        self._errors.append(f"{stage}: {self._names[cid]}: {short}")
        node = self._node.get(cid)
        who = self._names[cid] if self._names[cid] == f"node {node}" else f"{self._names[cid]} (node {node})"
        logger.warning("round %d: secure aggregation: %s dropped at %s: %s", self.server_round, who, stage, reason)

    def _malformed_reply(self, cid: int, stage: str, reason: str) -> None:
        self._malformed.add((stage, cid))
        self._drop(cid, stage, f"malformed reply: {reason}")

    def _note_rejected(self, server: SecAggServer) -> None:
        """Replies the protocol rejected (``SecAggServer.rejected``) are dropouts at their stage."""
        for stage, reasons in server.rejected.items():
            for cid, reason in sorted(reasons.items()):
                if (stage, cid) not in self._malformed:
                    self._malformed_reply(cid, stage, reason)
                    self._answered[stage] -= 1

    def _send(self, stage: str, messages: list[Message]) -> dict[int, Message]:
        t0 = time.perf_counter()
        replies = list(self.grid.send_and_receive(messages, timeout=self.timeout)) if messages else []
        self._seconds[stage] = time.perf_counter() - t0
        # a node the SuperLink found dead is answered by the SuperLink itself (src = the SuperLink,
        # error NODE_UNAVAILABLE): such a reply is matched to its request by reply_to_message_id
        sent = {m.metadata.message_id: self._id.get(m.metadata.dst_node_id) for m in messages}
        by_id: dict[int, Message] = {}
        for reply in replies:
            cid = self._id.get(reply.metadata.src_node_id)
            if cid is None and reply.has_error():
                cid = sent.get(reply.metadata.reply_to_message_id)
            if cid is not None and cid not in by_id:
                by_id[cid] = reply
        return by_id

    def _exchange(self, stage: str, requests: dict[int, dict[str, Any]]) -> dict[int, dict[str, Any]]:
        """Send one stage's requests; the valid replies by protocol id (the others are dropouts)."""
        messages = [Message(RecordDict({RECORD: ConfigRecord(request)}), dst_node_id=self._node[cid],
                            message_type=f"{MessageType.TRAIN}.{ACTION}") for cid, request in requests.items()]
        replies = self._send(stage, messages)
        out: dict[int, dict[str, Any]] = {}
        for cid in requests:
            reply = replies.get(cid)
            if reply is None:
                self._drop(cid, stage, f"no reply within federation.round_timeout = {self.timeout:g} s")
            elif reply.has_error():
                self._drop(cid, stage, f"error {reply.error.code}: {reply.error.reason}")
            elif stage == "masked_input":
                masked = reply.content.array_records.get(MASKED_RECORD)
                vector = masked["masked"].numpy() if masked is not None and "masked" in masked else None
                if vector is None or vector.dtype != np.uint64 or vector.ndim != 1:
                    self._malformed_reply(cid, stage, f"expected ArrayRecord {MASKED_RECORD!r} with a 1-D uint64 "
                                                      "'masked'")
                    continue
                out[cid] = {"masked": vector.astype("<u8", copy=False).tobytes()}
                if RECORD in reply.content.config_records:  # neighbours whose share ciphertexts it refused
                    out[cid].update(dict(reply.content[RECORD]))
            elif RECORD not in reply.content.config_records:
                self._malformed_reply(cid, stage, f"no ConfigRecord {RECORD!r}")
            else:
                out[cid] = dict(reply.content[RECORD])
        self._answered[stage] = len(out)
        return out

    # ------------------------------------------------------------------------------ the round

    def run(self, messages: Iterable[Message], arrays: ArrayRecord) -> SecureRoundResult:
        """Run the round: ``messages`` are the strategy's train messages, ``arrays`` the global model."""
        messages = list(messages)
        rnd = self.server_round
        nodes = sorted(m.metadata.dst_node_id for m in messages)
        self._id = {node: cid for cid, node in enumerate(nodes, start=1)}
        self._node = {cid: node for node, cid in self._id.items()}
        self._names = {cid: f"node {node}" for node, cid in self._id.items()}
        record: dict[str, Any] = {"secure_aggregation": True}
        trained: list[Message] = []
        declined: list[Message] = []
        t_start = time.perf_counter()
        try:
            if len(nodes) < 2:
                raise _Aborted(f"secure aggregation needs at least 2 clients in a round, {len(nodes)} sampled")
            graph = choose_graph(self._node)
            record.update({"secagg_degree": graph.degree, "secagg_threshold": graph.threshold})
            global_ = {k: a.numpy() for k, a in arrays.items()}
            layout = UpdateLayout.of(global_)
            quantizer = Quantizer(self.bound, max_clients=len(nodes), scale_bits=self.scale_bits)
            server = SecAggServer(graph, round_id=rnd, vector_length=layout.length)

            # stage 0: train + advertise keys
            requests = server.advertise_keys()
            stage0 = []
            for m in messages:
                cid = self._id[m.metadata.dst_node_id]
                request = ConfigRecord({**requests[cid], "client-id": cid, "num-clients": len(nodes),
                                        "bound": float(self.bound), "scale-bits": int(self.scale_bits)})
                stage0.append(Message(RecordDict({**dict(m.content.items()), RECORD: request}),
                                      dst_node_id=m.metadata.dst_node_id, message_type=m.metadata.message_type))
            replies = self._send("advertise_keys", stage0)
            keys, metrics = {}, {}
            for cid in sorted(self._node):
                reply = replies.get(cid)
                if reply is None:
                    self._drop(cid, "advertise_keys", f"no reply within federation.round_timeout = {self.timeout:g} s")
                elif reply.has_error() and reply.error.code == PRIVACY_DECLINED:
                    self.receipts.take(reply, server_round=rnd, secure=True, outcome="declined")
                    declined.append(reply)
                elif reply.has_error():
                    reason, receipt = self.receipts.take(reply, server_round=rnd, secure=True, outcome="failed")
                    if receipt is not None:  # it trained and wrote its ledger entry: its name is known
                        self._names[cid] = receipt.client
                    self._drop(cid, "advertise_keys", f"error {reply.error.code}: {reason}")
                elif (problem := _stage0_problem(reply)) is not None:
                    name = reply.content[RECORD].get("client") if RECORD in reply.content.config_records else None
                    if isinstance(name, str) and name:  # the name it gave, for the log and the metrics
                        self._names[cid] = name
                    self.receipts.take(reply, server_round=rnd, secure=True, outcome="failed")
                    self._malformed_reply(cid, "advertise_keys", problem)
                else:
                    self.receipts.take(reply, server_round=rnd, secure=True, outcome="trained")
                    trained.append(reply)
                    fields = dict(reply.content[RECORD])
                    self._names[cid] = str(fields.pop("client", self._names[cid]))
                    keys[cid], metrics[cid] = fields, reply.content["metrics"]
            self._answered["advertise_keys"] = len(keys)
            if not keys:
                raise _Aborted(f"no client took part: {len(declined)} declined (privacy policy), "
                               f"{len(self._dropped['advertise_keys'])} dropped at advertise_keys")

            requests = server.share_keys(keys)
            self._note_rejected(server)
            shared = self._exchange("share_keys", requests)
            requests = server.masked_input(shared)
            self._note_rejected(server)
            masked = self._exchange("masked_input", requests)
            requests = server.unmask(masked)
            self._note_rejected(server)
            unmasked = self._exchange("unmasking", requests)
            t0 = time.perf_counter()
            try:
                total, summary = server.aggregate(unmasked)
            finally:  # rejected unmasking replies are dropouts, also when too few shares remain
                self._note_rejected(server)
            delta, weight = decode_sum(layout, total, quantizer=quantizer)
            self._seconds["aggregate"] = time.perf_counter() - t0
            reported = sum(int(metrics[cid]["num-examples"]) for cid in summary.survivors)
            if int(weight) != reported:
                raise _Aborted(f"the unmasked sum's weight is {weight:g} users, the surviving clients reported "
                               f"{reported}: a contribution is inconsistent")
        except (SecAggAborted, SecAggError, _Aborted) as err:
            reason = str(err)
            if isinstance(err, SecAggAborted) and err.client_id in self._names:
                reason += f" (protocol client {err.client_id} is {self._names[err.client_id]})"
            logger.warning("round %d: secure aggregation aborted: %s; the model is unchanged", rnd, reason)
            record.update({"secagg_aborted": True, "secagg_abort_reason": reason})
            self._fill(record, t_start)
            return SecureRoundResult(None, trained, declined, in_sum=0, failed=self._failed(), record=record)

        survivors = [metrics[cid] for cid in summary.survivors]
        mean = aggregate_metricrecords([RecordDict({"metrics": m}) for m in sorted(
            survivors, key=lambda m: (int(m["num-examples"]), float(m["train-loss"])))], "num-examples")
        mean["num-examples"] = int(weight)
        new = {k: Array((global_[k].astype(np.float64) + delta[k]).astype(np.float32)) for k in layout.names}
        reply = Message(RecordDict({"arrays": ArrayRecord(new), "metrics": MetricRecord(dict(mean))}),
                        dst_node_id=0, message_type=MessageType.TRAIN)
        record.update({"secagg_aborted": False, "secagg_components": summary.components,
                       "secagg_in_sum": sorted(self._names[cid] for cid in summary.survivors)})
        self._fill(record, t_start)
        logger.info("round %d: securely aggregated %d of %d clients (%d users)", rnd, len(summary.survivors),
                    len(nodes), int(weight))
        return SecureRoundResult(reply, trained, declined, in_sum=len(summary.survivors), failed=self._failed(),
                                 record=record)

    def _failed(self) -> int:
        return len({cid for ids in self._dropped.values() for cid in ids})

    def _fill(self, record: dict[str, Any], t_start: float) -> None:
        record["secagg_clients"] = {stage: self._answered[stage] for stage in STAGES if stage in self._answered}
        record["secagg_dropped"] = {stage: sorted(self._names[c] for c in ids) for stage, ids in self._dropped.items()}
        record["secagg_malformed"] = len(self._malformed)
        if self._errors:
            record["secagg_errors"] = list(self._errors)
        record["secagg_seconds"] = {**self._seconds, "total": time.perf_counter() - t_start}
