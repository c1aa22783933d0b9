"""The client's side of secure aggregation over Flower messages (a thin adapter around
``privacy/secagg.py``; the protocol and the update vector are there).

Wire layout (the server's adapter is ``server/secure_aggregation.py``):

* stage 0 (``advertise_keys``): the usual ``train`` message (``arrays``, ``config``) plus a
  ConfigRecord ``secagg`` = ``{"stage", "round", "client-id", "num-clients", "bound",
  "scale-bits"}``. The client trains as usual (DP-SGD with its ledger entry written first when on),
  encodes ``[n_k (w_local - w_global), n_k]`` (:func:`privacy.secagg_update.encode_update`), keeps it
  and its protocol state in ``context.state``, and replies with its ``metrics`` and ``secagg`` =
  ``{"c_pk", "s_pk", "client"}`` (with DP-SGD also ``ledger-receipt``, the receipt of the ledger
  entry it wrote first): **no weights**.
* stages 1-3 (``share_keys``, ``masked_input``, ``unmasking``): ``train.secagg`` messages whose
  ``secagg`` ConfigRecord is the protocol request; the reply is the protocol reply as a ConfigRecord
  ``secagg``, except the masked vector, which travels as ArrayRecord ``secagg-masked`` (``masked``:
  uint64; an ArrayRecord is chunked on the wire, a ConfigRecord is not), with ConfigRecord
  ``secagg`` = ``{"refused": [ids]}`` beside it when the client refused some neighbours' share
  ciphertexts (``privacy/secagg.py``, stage 2).

A client that cannot go on (update beyond the bound, a refused or malformed request, state lost)
replies with error ``SECAGG_FAILED`` naming itself and the reason; the server counts it as dropped
at that stage. ``context.state`` holds the client's private keys and mask seed between stages (the
SuperNode keeps it; in a simulation it is kept by the simulation engine's driver process, a
simulation artifact): it is cleared when the client's part of the round ends or fails.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict

from privacy import RECEIPT_RECORD, SECAGG_FAILED
from privacy.ledger import Receipt
from privacy.secagg import Quantizer, SecAggAborted, SecAggClient, SecAggError
from privacy.secagg_update import UpdateLayout, encode_update

logger = logging.getLogger(__name__)

RECORD = "secagg"
"""ConfigRecord with a stage's request (server -> client) or reply (client -> server)."""
MASKED_RECORD = "secagg-masked"
"""ArrayRecord with the masked vector (``masked``, uint64), the masked_input reply."""
ACTION = "secagg"
"""Stages 1-3 are ``train.secagg`` messages (``@app.train("secagg")``)."""
STATE_CLIENT = "secagg.client"
STATE_UPDATE = "secagg.update"


def _clear(context: Context) -> None:
    for key in (STATE_CLIENT, STATE_UPDATE):
        if key in context.state:
            del context.state[key]


def _failed(msg: Message, context: Context, name: str, stage: str, err: Exception,
            receipt: ConfigRecord | None = None) -> Message:
    _clear(context)
    logger.warning("client %s: secure aggregation %s failed: %s", name, stage, err)
    who = "" if str(err).startswith(f"client {name}:") else f"client {name}, "  # named once
    reason = f"{who}secure aggregation {stage}: {err}"
    if receipt is not None:  # the spend is in the ledger although the update never leaves
        reason = Receipt.from_dict(dict(receipt)).attach_to(reason)
    return Message(Error(code=SECAGG_FAILED, reason=reason), reply_to=msg)


def advertise_keys(msg: Message, context: Context, *, name: str, trained: Mapping[str, np.ndarray],
                   metrics: MetricRecord, weight: int, receipt: ConfigRecord | None = None,
                   global_: Mapping[str, np.ndarray] | None = None) -> Message:
    """Stage 0, after local training: keep the encoded update and fresh keys; reply keys + metrics
    (and ``receipt``, the ledger entry's receipt under DP-SGD; on failure at the end of the reason).
    ``global_``: the reference the update is taken from, when the message carries none (the
    transition table's release: zeros, so that the sum is the clients' contributions)."""
    request = dict(msg.content[RECORD])
    _clear(context)
    try:
        if global_ is None:
            global_ = {k: a.numpy() for k, a in msg.content["arrays"].items()}
        quantizer = Quantizer(float(request["bound"]), max_clients=int(request["num-clients"]),
                              scale_bits=int(request["scale-bits"]))
        vector = encode_update(UpdateLayout.of(global_), local=trained, global_=global_, weight=weight,
                               quantizer=quantizer, client=name)  # (L,) uint64
        client = SecAggClient(int(request["client-id"]), int(request["round"]))
        keys = client.advertise_keys({"stage": request["stage"], "round": request["round"]})
    except (KeyError, ValueError, SecAggError) as err:
        return _failed(msg, context, name, "advertise_keys", err, receipt)
    context.state[STATE_CLIENT] = ConfigRecord({**client.to_state(), "name": name})
    context.state[STATE_UPDATE] = ArrayRecord({"vector": Array(vector)})
    content = {"metrics": metrics, RECORD: ConfigRecord({**keys, "client": name})}
    if receipt is not None:
        content[RECEIPT_RECORD] = receipt
    return Message(RecordDict(content), reply_to=msg)


def handle_stage(msg: Message, context: Context) -> Message:
    """Stages 1-3 (``train.secagg``): run the protocol step on the state kept in ``context.state``."""
    request = dict(msg.content[RECORD]) if RECORD in msg.content else {}
    stage = str(request.get("stage", "?"))
    if STATE_CLIENT not in context.state:
        return _failed(msg, context, f"node {context.node_id}", stage,
                       SecAggError(f"no secure aggregation state for round {request.get('round')!r} (the "
                                   "client did not take part in stage 0, failed, or lost its state)"))
    state = dict(context.state[STATE_CLIENT])
    name = str(state.pop("name"))
    try:
        client = SecAggClient.from_state(state)
        if stage == "share_keys":
            content = RecordDict({RECORD: ConfigRecord(client.share_keys(request))})
        elif stage == "masked_input":
            vector = np.asarray(context.state[STATE_UPDATE]["vector"].numpy(), dtype=np.uint64)
            reply = client.masked_input(request, vector)
            masked = np.frombuffer(reply["masked"], dtype="<u8")
            content = RecordDict({MASKED_RECORD: ArrayRecord({"masked": Array(masked.astype(np.uint64))})})
            if "refused" in reply:  # neighbours whose share ciphertexts it refused (it masked without them)
                content[RECORD] = ConfigRecord({"refused": list(reply["refused"])})
            del context.state[STATE_UPDATE]  # the update has left, masked; nothing to keep
        elif stage == "unmasking":
            content = RecordDict({RECORD: ConfigRecord(client.unmask(request))})
        else:
            raise SecAggError(f"unknown secure aggregation stage {stage!r} (expected share_keys, "
                              "masked_input or unmasking)")
    except (KeyError, ValueError, SecAggError, SecAggAborted) as err:
        return _failed(msg, context, name, stage, err)
    if stage == "unmasking":
        _clear(context)  # the client's part of the round is over
    else:
        context.state[STATE_CLIENT] = ConfigRecord({**client.to_state(), "name": name})
    return Message(content, reply_to=msg)
