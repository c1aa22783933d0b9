"""Flower ServerApp: builds the strategy and runs the rounds, with a checkpoint after every round.

The round loop is ours (Flower 1.41's ``Strategy.start`` always begins at round 1 and cannot
resume); each round uses the strategy's own ``configure_train`` / ``aggregate_train`` /
``configure_evaluate`` / ``aggregate_evaluate``:

1. sample clients, send the global weights and the round config, wait for replies;
2. aggregate the replies weighted by ``num-examples`` (users); error replies are counted
   (``clients_failed``) and left out, and a round in which no client succeeded keeps the model.
   With secure aggregation (``privacy.secure_aggregation``) steps 1-2 are the stages of
   ``server/secure_aggregation.py``: the clients reply with keys and metrics, then masked updates,
   and the strategy gets one reply carrying the unmasked aggregate (or none: an aborted round,
   recorded as ``secagg_aborted``, keeps the model);
3. with ``federation.server_ema``, fold the new weights into the server's moving average of the
   rounds' models; every ``federation.evaluate_every`` rounds, federated evaluation on the clients'
   test targets (weighted by users) of the served model (the average when there is one);
4. write the ``model.pt`` artifact (the served model, for ``fedrec recommend``; with an average
   the last iterate is ``model-last.pt``), then ``checkpoint.pt`` (weights, moving average, round,
   strategy state, sampling RNG) atomically, then the round's line in ``metrics.jsonl``: a reader
   that sees the line finds every file of that round.

Under DP-SGD the clients' replies carry the receipts of their ledger entries; they go to
``receipts.jsonl`` as the replies arrive (``server/receipts.py``).

In a deployment (``data.catalogue`` set, docs/deployment.md) the server reads only the public item
catalogue; it waits for ``federation.num_clients`` nodes (0: ``federation.min_train_clients``)
before round 1, and later rounds go on with the nodes that are up (at least
``federation.min_train_clients``), so that a dead node cannot stall the run.

On resume the loop starts after the checkpoint's round; ``metrics.jsonl`` lines of rounds after
it (written before a crash but not checkpointed) are dropped, so no round is counted twice.
``receipts.jsonl`` keeps every line: the clients did record those spends.
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx, Strategy

from core_model.config import ExperimentConfig, FederationConfig, config_from_run_config
from core_model.data import Vocabulary
from core_model.features import FEATURES_RECORD, build_model
from core_model.model import SASRec
from core_model.train import cosine_to_tenth, save_checkpoint
from privacy import PRIVACY_DECLINED
from privacy.ledger import split_receipt
from privacy.secagg import Quantizer
from privacy.transitions import RELEASE_FLAG, RELEASE_ROUND, TRANSITIONS_RECORD, finish_table
from server.receipts import RECEIPTS, ReceiptLog
from server.secure_aggregation import SecureRound, what_the_server_saw

logger = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"
LAST_ITERATE = "model-last.pt"
TRANSITIONS_FILE = "transitions.pt"


class WeightAverage:
    """The exponential moving average of the rounds' models, bias-corrected (``federation.server_ema``).

    ``update(w_t)`` folds in round t's weights: ``s_t = decay * s_(t-1) + (1 - decay) * w_t``;
    ``average()`` is ``s_t / (1 - decay ** t)``, a weighted mean of ``w_1 .. w_t`` with weights
    proportional to ``decay ** (t - i)``. Kept in float64 so 1,000 rounds add no rounding drift.
    """

    def __init__(self, decay: float) -> None:
        if not 0 < decay < 1:
            raise ValueError(f"federation.server_ema={decay!r}: expected a decay in (0, 1)")
        self.decay = decay
        self.count = 0
        self.sums: dict[str, torch.Tensor] = {}
        self.dtypes: dict[str, torch.dtype] = {}

    def update(self, state: Mapping[str, torch.Tensor]) -> None:
        if self.count and set(state) != set(self.sums):
            raise ValueError(f"weights to average have keys {sorted(state)}, the average has {sorted(self.sums)}")
        for k, v in state.items():
            self.dtypes[k] = v.dtype
            v = v.detach().to(torch.float64)
            self.sums[k] = (1 - self.decay) * v if not self.count else self.decay * self.sums[k] + (1 - self.decay) * v
        self.count += 1

    def average(self) -> dict[str, torch.Tensor]:
        if not self.count:
            raise ValueError("the moving average has no rounds yet")
        norm = 1 - self.decay ** self.count
        return {k: (v / norm).to(self.dtypes.get(k, torch.float32)) for k, v in self.sums.items()}

    def state(self) -> dict[str, Any]:
        return {"decay": self.decay, "count": self.count, "sums": {k: v.clone() for k, v in self.sums.items()}}

    @classmethod
    def restore(cls, state: Mapping[str, Any], decay: float) -> WeightAverage:
        if float(state["decay"]) != decay:
            raise ValueError(f"the checkpoint's moving average has decay {state['decay']}, the config's "
                             f"federation.server_ema is {decay}: resume with the run's own config")
        avg = cls(decay)
        avg.count = int(state["count"])
        avg.sums = {k: v.to(torch.float64) for k, v in state["sums"].items()}
        return avg


def distributed_noise_shortfall(*, in_sum: int, components: int, min_clients: int) -> str:
    """Why a securely aggregated sum of a distributed-noise round may not be used ("" when it may).

    Each client added ``1 / sqrt(min_clients)`` of the noise, so a sum of fewer than ``min_clients``
    clients carries less than the accounted noise; a round whose survivors split into several
    components reveals one (smaller) sum per component.
    """
    if components > 1:
        return (f"distributed noise: the survivors split into {components} groups, each revealing its own partial "
                f"sum, which carries less than the whole noise (needs one sum of >= {min_clients} clients)")
    if in_sum < min_clients:
        return (f"distributed noise: only {in_sum} clients' noise shares are in the sum, at least {min_clients} are "
                "needed for the accounted noise")
    return ""


def build_strategy(fed: FederationConfig, *, num_clients: int | None = None) -> Strategy:
    """FedAvg / FedProx / FedAdam from ``fed``, weighted by the clients' numbers of users."""
    common: dict[str, Any] = dict(
        fraction_train=fed.fraction_train, fraction_evaluate=1.0, min_train_nodes=fed.min_train_clients,
        min_evaluate_nodes=1, min_available_nodes=num_clients or fed.min_train_clients,
        weighted_by_key="num-examples")
    if fed.strategy == "fedavg":
        return FedAvg(**common)
    if fed.strategy == "fedprox":
        return FedProx(**common, proximal_mu=fed.proximal_mu)
    return FedAdam(**common, eta=fed.server_lr, beta_1=fed.server_beta1, beta_2=fed.server_beta2,
                   tau=fed.server_tau)


def client_lr(config: ExperimentConfig, server_round: int) -> float:
    """The clients' learning rate in ``server_round`` (1-based), per ``federation.lr_schedule``.

    ``cosine`` decays from ``train.lr`` in round 1 to 10 % of it in the last round.
    """
    fed = config.federation
    return _scheduled(config.train.lr, fed.lr_schedule, server_round, fed.num_rounds)


def server_lr(config: ExperimentConfig, server_round: int) -> float:
    """FedAdam's learning rate in ``server_round`` (1-based), per ``federation.server_lr_schedule``."""
    fed = config.federation
    return _scheduled(fed.server_lr, fed.server_lr_schedule, server_round, fed.num_rounds, fed.server_lr_final)


def _scheduled(peak: float, schedule: str, server_round: int, num_rounds: int, final: float = 0.1) -> float:
    if schedule == "constant" or num_rounds == 1:
        return peak
    return peak * cosine_to_tenth((server_round - 1) / (num_rounds - 1), final)


def _reply_order(reply: Message) -> tuple:
    """A canonical order for a round's replies, so that aggregation does not depend on arrival order.

    Flower sums replies in the order they arrive; float32 sums then differ in the last bits from
    run to run, and Adam turns such differences in near-zero gradients into whole learning-rate
    steps, so two identical runs (or a resumed and a straight run) drift apart. Replies are sorted by
    their own content (users, then training loss), which is identical whenever the inputs are.
    """
    if reply.has_error():
        return (1, reply.error.code, str(reply.error.reason))
    m = reply.content["metrics"]
    return (0, int(m["num-examples"]), float(m["train-loss"]))


def _float32(arrays: ArrayRecord) -> ArrayRecord:
    """FedAdam returns float64 arrays (numpy promotion); the model and the wire stay float32."""
    return ArrayRecord({k: Array(np.asarray(a.numpy(), dtype=np.float32)) for k, a in arrays.items()})


def _strategy_state(strategy: Strategy) -> dict[str, Any]:
    state: dict[str, Any] = {}
    for name in ("current_arrays", "m_t", "v_t"):  # FedOpt family (FedAdam)
        value = getattr(strategy, name, None)
        if value is not None:
            state[name] = {k: torch.from_numpy(np.asarray(v)) for k, v in value.items()}
    return state


def _restore_strategy(strategy: Strategy, state: dict[str, Any]) -> None:
    for name, value in state.items():
        setattr(strategy, name, {k: v.numpy() for k, v in value.items()})


def wait_for_nodes(grid: Grid, expected: int, *, timeout: float, poll: float = 0.1) -> None:
    """Wait until ``expected`` nodes are connected (``TimeoutError`` after ``timeout`` seconds).

    Flower 1.41's ``FedAvg.configure_train`` sizes its sample from the nodes connected *before*
    it waits for ``min_available_nodes``: a first round that starts while the simulation engine is
    still registering nodes samples fewer clients than ``fraction_train`` says (seen: 1 of 3 under
    load). Waiting here first makes round 1 sample from the whole federation.
    """
    deadline = time.monotonic() + timeout
    while (connected := len(list(grid.get_node_ids()))) < expected:
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {connected} of the federation's {expected} clients connected within "
                               f"federation.round_timeout = {timeout:g} s")
        time.sleep(poll)


def _dp_reported(trained: Iterable[Message]) -> dict[str, Any]:
    """What the clients reported of their own DP spend (the server cannot check it): ``{}`` without DP."""
    dp = [r.content["metrics"] for r in trained if "dp-epsilon" in r.content["metrics"]]
    if not dp:
        return {}
    return {"dp_clients": len(dp), "dp_epsilon_max": max(float(m["dp-epsilon"]) for m in dp),
            "dp_epsilon_min": min(float(m["dp-epsilon"]) for m in dp),
            "dp_noise_multiplier_min": min(float(m["dp-noise-multiplier"]) for m in dp),
            "dp_delta_max": max(float(m["dp-delta"]) for m in dp)}


def _truncate_metrics(path: Path, last_round: int) -> None:
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines()
            if line.strip() and json.loads(line)["round"] <= last_round]
    path.write_text("".join(line + "\n" for line in kept))


class RoundLoop:
    """The federated rounds of one run, checkpointed into ``run_dir``.

    Round 1 waits for ``num_clients`` nodes. With ``every_round_needs_all`` (simulations) every
    round waits for all of them; without it (deployments, where a node may die and stay away) a
    round samples from the nodes connected then, at least ``federation.min_train_clients``.
    """

    def __init__(self, config: ExperimentConfig, *, run_dir: Path, items: Vocabulary,
                 item_titles: list[str] | None = None, num_clients: int | None = None,
                 every_round_needs_all: bool = True,
                 on_round: Callable[[dict[str, Any]], None] | None = None,
                 item_features: Mapping[str, Sequence[str]] | None = None) -> None:
        self.config = config
        self.run_dir = Path(run_dir)
        self.items = items
        self.item_titles = item_titles
        self.item_features = item_features
        self.features_record: ArrayRecord | None = None
        self.transitions_record: ArrayRecord | None = None
        self.num_clients = num_clients
        self.every_round_needs_all = every_round_needs_all
        self.on_round = on_round
        self.receipts = ReceiptLog(None)
        self.average: WeightAverage | None = None

    def run(self, grid: Grid) -> dict[str, Any]:
        fed, priv = self.config.federation, self.config.privacy
        if priv.secure_aggregation_enabled and self.num_clients is not None:
            if self.num_clients < 2:
                raise ValueError(f"privacy.secure_aggregation={priv.secure_aggregation!r} (privacy.mode="
                                 f"{priv.mode!r}) needs at least 2 clients, the federation has {self.num_clients}")
            try:
                Quantizer(priv.secagg_bound, max_clients=self.num_clients, scale_bits=priv.secagg_scale_bits)
            except ValueError as err:
                raise ValueError(f"privacy.secagg_bound={priv.secagg_bound:g} with privacy.secagg_scale_bits="
                                 f"{priv.secagg_scale_bits} does not fit {self.num_clients} clients: {err}") from None
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.receipts = ReceiptLog(self.run_dir / RECEIPTS)
        torch.manual_seed(fed.seed)
        model = build_model(self.config, len(self.items), self.item_features)
        if model.feat_in is not None:  # the public catalogue features travel with every message
            self.features_record = ArrayRecord({"matrix": model.item_feature_matrix.detach().clone()})
        # a simulation's rounds wait for every client; a deployment's go on with the nodes that are up
        strategy = build_strategy(fed, num_clients=self.num_clients if self.every_round_needs_all else None)
        ckpt_path = self.run_dir / CHECKPOINT
        start = 1
        self.average = WeightAverage(fed.server_ema) if fed.server_ema else None
        if ckpt_path.exists():
            ckpt = torch.load(ckpt_path, weights_only=True)
            model.load_shareable_state(ckpt["model"])
            if self.average is not None and ckpt.get("average") is not None:
                self.average = WeightAverage.restore(ckpt["average"], fed.server_ema)
            _restore_strategy(strategy, ckpt["strategy"])
            random.setstate(ckpt["random_state"])
            start = ckpt["round"] + 1
            _truncate_metrics(self.run_dir / METRICS, ckpt["round"])
            logger.info("resuming from %s after round %d of %d", ckpt_path, ckpt["round"], fed.num_rounds)
        else:
            random.seed(fed.seed)  # Flower samples clients with the global `random`
        arrays = ArrayRecord(model.shareable_state())
        if self.num_clients:
            wait_for_nodes(grid, self.num_clients, timeout=fed.round_timeout)
        if model.transition_table is not None:
            self._transitions(grid, model)
        for rnd in range(start, fed.num_rounds + 1):
            arrays = self._round(grid, strategy, rnd, arrays, model)
        saw = what_the_server_saw(secure=priv.secure_aggregation_enabled, dp=priv.mode == "dp-sgd")
        logger.info("%d rounds done; the server saw %s", fed.num_rounds, saw)
        return {"rounds": fed.num_rounds, "resumed_from": start - 1,
                "secure_aggregation": priv.secure_aggregation_enabled, "server_saw": saw}

    def _round(self, grid: Grid, strategy: Strategy, rnd: int, arrays: ArrayRecord, model: SASRec) -> ArrayRecord:
        fed = self.config.federation
        t0 = time.perf_counter()
        record: dict[str, Any] = {"round": rnd}
        round_config = ConfigRecord({"local-epochs": fed.local_epochs, "lr": client_lr(self.config, rnd)})
        record["lr"] = float(round_config["lr"])
        messages = self._with_features(strategy.configure_train(rnd, arrays, round_config, grid))
        if self.config.privacy.secure_aggregation_enabled:
            replies, trained, declined = self._secure_train(grid, rnd, messages, arrays, record)
        else:
            replies, trained, declined = self._plain_train(grid, rnd, messages, record)
        if declined:  # the reasons without the ledger receipts at their end (those are in receipts.jsonl)
            record["declined_reasons"] = [split_receipt(r.error.reason)[0] for r in declined]
        record.update(_dp_reported(trained))
        if hasattr(strategy, "eta"):  # FedAdam: the server's own step size this round
            strategy.eta = server_lr(self.config, rnd)
            record["server_lr"] = float(strategy.eta)
        # no replies (an aborted secure round) aggregate to nothing and leave the strategy's state as it was
        new_arrays, train_metrics = strategy.aggregate_train(rnd, replies)
        if new_arrays is None:
            logger.warning("round %d: no client update could be aggregated; the model is unchanged", rnd)
            record["aggregated"] = False
        else:
            arrays = _float32(new_arrays)
            record["aggregated"] = True
            if self.average is not None:
                self.average.update(arrays.to_torch_state_dict())
        served = arrays
        if self.average is not None and self.average.count:
            served = ArrayRecord(self.average.average())
            record["ema_rounds"] = self.average.count
        record["train_seconds"] = time.perf_counter() - t0  # the round without evaluation
        if train_metrics is not None:
            record["train_loss"] = float(train_metrics["train-loss"])
            record["users_trained"] = int(sum(int(r.content["metrics"]["num-examples"]) for r in replies
                                              if not r.has_error()))
        if rnd % fed.evaluate_every == 0 or rnd == fed.num_rounds:
            eval_msgs = self._with_features(strategy.configure_evaluate(rnd, served, ConfigRecord({}), grid))
            if self.transitions_record is not None:  # the served model scores with the released table
                for m in eval_msgs:
                    m.content[TRANSITIONS_RECORD] = self.transitions_record
            eval_replies = list(grid.send_and_receive(eval_msgs, timeout=fed.round_timeout))
            metrics = strategy.aggregate_evaluate(rnd, eval_replies)
            if metrics is not None:
                record.update({f"test_{k}": float(v) for k, v in metrics.items()})
            record["eval_clients_failed"] = sum(1 for r in eval_replies if r.has_error()) + (
                len(eval_msgs) - len(eval_replies))
        record["seconds"] = time.perf_counter() - t0
        self._checkpoint(rnd, arrays, strategy, model, record, served=served)
        if self.on_round is not None:
            self.on_round(record)
        return arrays

    def _transitions(self, grid: Grid, model: SASRec) -> None:
        """The transition table's release before round 1 (``privacy/transitions.py``), or, on resume,
        the table released before: ``transitions.pt`` (the table) and ``transitions.json`` (the
        release's record: clients, secure aggregation, what the clients reported of their spend)."""
        path = self.run_dir / TRANSITIONS_FILE
        if path.exists():
            model.set_transition_table(torch.load(path, weights_only=True)["table"])
            self.transitions_record = ArrayRecord({"table": model.transition_table.detach().clone()})
            logger.info("transition table: the one released before (%s)", path)
            return
        t0 = time.perf_counter()
        size = model.transition_table.shape[0]
        config = ConfigRecord({"server-round": RELEASE_ROUND, RELEASE_FLAG: True})
        messages = [Message(RecordDict({"config": config}), dst_node_id=node, message_type=MessageType.TRAIN)
                    for node in sorted(grid.get_node_ids())]
        record: dict[str, Any] = {"round": RELEASE_ROUND, "release": "transitions"}
        if self.config.privacy.secure_aggregation_enabled:  # the sum of the clients' tables, an update from zeros
            zeros = ArrayRecord({"table": Array(np.zeros((size, size), dtype=np.float32))})
            replies, trained, declined = self._secure_train(grid, RELEASE_ROUND, messages, zeros, record)
            total = (replies[0].content["arrays"]["table"].numpy().astype(np.float64)
                     * int(replies[0].content["metrics"]["num-examples"])) if replies else None
        else:
            _, trained, declined = self._plain_train(grid, RELEASE_ROUND, messages, record)
            total = sum((r.content["arrays"]["table"].numpy().astype(np.float64) for r in trained), None)
        if declined:
            record["declined_reasons"] = [split_receipt(r.error.reason)[0] for r in declined]
        if total is None:
            (self.run_dir / "transitions.json").write_text(json.dumps(record, indent=2) + "\n")
            why = record.get("secagg_abort_reason") or "no client sent its table"
            reasons = "; ".join(record.get("declined_reasons", []))
            raise RuntimeError(
                f"the transition table's release failed: {why} ({record['clients_declined']} of {len(messages)} "
                f"clients declined{': ' + reasons if reasons else ''}; {record['clients_failed']} failed); the "
                f"clients that sent a sum recorded its spend in their ledgers; details in "
                f"{self.run_dir / 'transitions.json'} and the log")
        record.update(_dp_reported(trained))
        record["seconds"] = time.perf_counter() - t0
        model.set_transition_table(finish_table(total))
        self.transitions_record = ArrayRecord({"table": model.transition_table.detach().clone()})
        tmp = path.with_suffix(".tmp")
        torch.save({"table": model.transition_table.detach().clone(), "record": record}, tmp)
        tmp.replace(path)
        (self.run_dir / "transitions.json").write_text(json.dumps(record, indent=2) + "\n")
        logger.info("transition table released by %s of %d clients in %.1f s%s", record.get("clients_ok"),
                    len(messages), record["seconds"],
                    f"; epsilon after it <= {record['dp_epsilon_max']:.3f}" if "dp_clients" in record else "")

    def _with_features(self, messages: Iterable[Message]) -> list[Message]:
        """``messages``, each with the catalogue feature matrix when the model reads one."""
        out = list(messages)
        if self.features_record is not None:
            for m in out:
                m.content[FEATURES_RECORD] = self.features_record
        return out

    def _plain_train(self, grid: Grid, rnd: int, messages: list[Message],
                     record: dict[str, Any]) -> tuple[list[Message], list[Message], list[Message]]:
        """Send the train messages; every client replies with its weights. (replies, trained, declined)."""
        replies = sorted(grid.send_and_receive(messages, timeout=self.config.federation.round_timeout),
                         key=_reply_order)
        trained = [r for r in replies if not r.has_error()]
        declined = [r for r in replies if r.has_error() and r.error.code == PRIVACY_DECLINED]
        for r in replies:
            outcome = ("trained" if not r.has_error() else
                       "declined" if r.error.code == PRIVACY_DECLINED else "failed")
            reason, _ = self.receipts.take(r, server_round=rnd, secure=False, outcome=outcome)
            if r.has_error():
                what = "declined (privacy policy)" if r.error.code == PRIVACY_DECLINED else "failed"
                logger.warning("round %d: client node %s %s: %s", rnd, r.metadata.src_node_id, what, reason)
        record.update({"secure_aggregation": False, "clients_sampled": len(messages), "clients_ok": len(trained),
                       "clients_failed": len(messages) - len(trained) - len(declined),
                       "clients_declined": len(declined)})
        return replies, trained, declined

    def _secure_train(self, grid: Grid, rnd: int, messages: list[Message], arrays: ArrayRecord,
                      record: dict[str, Any]) -> tuple[list[Message], list[Message], list[Message]]:
        """The stages of secure aggregation; the one aggregate reply (none when aborted), trained, declined.

        ``clients_ok`` counts the clients whose update is in the sum, ``clients_failed`` those that
        dropped at any stage (a client in the sum may still drop at unmasking: it counts in both).
        """
        priv = self.config.privacy
        result = SecureRound(grid, server_round=rnd, bound=priv.secagg_bound, scale_bits=priv.secagg_scale_bits,
                             timeout=self.config.federation.round_timeout, receipts=self.receipts).run(messages, arrays)
        record.update({"clients_sampled": len(messages), "clients_ok": result.in_sum,
                       "clients_failed": result.failed, "clients_declined": len(result.declined), **result.record})
        reply = result.reply
        if reply is not None and priv.mode == "dp-sgd" and priv.noise_placement == "distributed":
            reason = distributed_noise_shortfall(in_sum=result.in_sum, components=record.get("secagg_components", 1),
                                                 min_clients=priv.distributed_min_clients or len(messages))
            if reason:  # the sum does not carry the whole noise: it must not be used (nor kept)
                logger.warning("round %d: aborted: %s; the model is unchanged", rnd, reason)
                record.update({"secagg_aborted": True, "secagg_abort_reason": reason, "clients_ok": 0})
                reply = None
        return ([] if reply is None else [reply]), result.trained, result.declined

    def _checkpoint(self, rnd: int, arrays: ArrayRecord, strategy: Strategy, model: SASRec,
                    record: dict[str, Any], *, served: ArrayRecord) -> None:
        state = {k: v.clone() for k, v in arrays.to_torch_state_dict().items()}
        extra = {"items": self.items.to_dict(), "item_titles": self.item_titles, "round": rnd,
                 "data_config": self.config.to_dict()["data"], "eval_config": self.config.to_dict()["eval"],
                 "federation": self.config.to_dict()["federation"]}
        # the served artifacts first: whoever sees the round's line in metrics.jsonl finds them at
        # that round (a crash before the checkpoint only means the round is run again on resume)
        if served is not arrays:  # the average is served; the last iterate is kept beside it
            model.load_shareable_state(state)
            save_checkpoint(self.run_dir / LAST_ITERATE, model, extra={**extra, "weights": "last iterate"})
        model.load_shareable_state(served.to_torch_state_dict())
        save_checkpoint(self.run_dir / "model.pt", model, extra={
            **extra, "weights": "moving average" if served is not arrays else "last iterate"})
        tmp = self.run_dir / (CHECKPOINT + ".tmp")
        torch.save({"round": rnd, "model": state, "strategy": _strategy_state(strategy),
                    "average": None if self.average is None else self.average.state(),
                    "random_state": random.getstate(), "config": self.config.to_dict()}, tmp)
        tmp.replace(self.run_dir / CHECKPOINT)  # atomic: the round is done once this file says so
        with (self.run_dir / METRICS).open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")


def make_server_app(config: ExperimentConfig | None = None, *, run_dir: Path | None = None,
                    items: Vocabulary | None = None, item_titles: list[str] | None = None,
                    num_clients: int | None = None,
                    on_round: Callable[[dict[str, Any]], None] | None = None,
                    item_features: Mapping[str, Sequence[str]] | None = None) -> ServerApp:
    """A ServerApp bound to a config and run directory (simulation runner), or reading the run config."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        cfg = config or config_from_run_config(context.run_config)
        catalogue, titles, expected, every_round_needs_all = items, item_titles, num_clients, True
        features = item_features
        if catalogue is None and cfg.data.catalogue:  # deployment: the public catalogue; the data stays on the nodes
            from core_model.pipeline import read_catalogue
            catalogue = read_catalogue(cfg.data.catalogue)
            expected = cfg.federation.num_clients or cfg.federation.min_train_clients
            every_round_needs_all = False
        elif catalogue is None:  # `flwr run`: the item catalogue is public; read it from the data source
            from simulations.clients import load_federation
            log, _, partition = load_federation(cfg)
            catalogue, titles, features = log.items, log.item_features.get("title"), log.item_features
            # every client of the partition must be there: rounds wait for all of them rather than
            # leave some clients' users out without a word
            expected = partition.num_clients
        out = run_dir or Path(cfg.federation.run_dir or Path("runs") / time.strftime("flwr-%Y%m%d-%H%M%S"))
        RoundLoop(cfg, run_dir=out, items=catalogue, item_titles=titles, num_clients=expected,
                  every_round_needs_all=every_round_needs_all,
                  on_round=on_round, item_features=features).run(grid)

    return app


app = make_server_app()
