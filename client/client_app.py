"""Flower ClientApp: translates Flower messages to and from ``core_model`` training and evaluation.

Each client holds its own users (its partition in a simulation, its own data in a deployment).
On a ``train`` message it loads the global weights, trains ``federation.local_epochs`` passes over
its users with the ``[train]`` settings at the learning rate the server sent (``lr``), and replies with its weights and
``num-examples`` = its number of users (the FedAvg weight); with DP-SGD also the receipt of the
ledger entry it wrote first (ConfigRecord ``ledger-receipt``). With secure aggregation (the train message
carries a ``secagg`` request) it replies with its public keys and metrics instead, and sends its
update only masked, in the later ``train.secagg`` stages (``client/secure_aggregation.py``). On an
``evaluate`` message it reports leave-one-out test metrics of the global model on its users (full
ranking, history excluded). With ``model.transitions``, a ``train`` message whose config carries
``transitions-release`` (before round 1) asks instead for the client's share of the transition
table (``privacy/transitions.py``): its users' clipped transition counts with its noise share,
ledgered as round 0 first, sent like an update (masked, under secure aggregation); ``evaluate``
messages then carry the released table (ArrayRecord ``transitions``).

In a deployment the node's own ``--node-config`` names its data, catalogue, privacy policy and
ledger folder (``client/node.py``); the policy and ledger folder there override the run config's.

``make_client_app(config, data)`` builds the app for the simulation runner (config and data source
travel with the app); the module-level ``app`` is the one ``flwr run`` loads, reading the
run config from Flower's ``Context``.
"""

from __future__ import annotations

import logging
import math
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client import secure_aggregation as secure
from client.node import is_deployed
from core_model.config import ExperimentConfig, config_from_run_config
from core_model.data import LeaveOneOutSplit
from core_model.features import FEATURES_RECORD, build_model
from core_model.model import SASRec
from core_model.train import evaluate_model, local_train, select_device
from privacy import PRIVACY_DECLINED, RECEIPT_RECORD
from privacy.transitions import RELEASE_FLAG, TRANSITIONS_RECORD

logger = logging.getLogger(__name__)


@dataclass
class ClientData:
    """What one client holds: its users' leave-one-out split, the (public) catalogue size, a name.

    ``canaries``: how many of the split's users (its last rows) are canary users of an empirical
    audit (``privacy/canaries.py``): trained on and counted like every user, left out of evaluation.
    """

    split: LeaveOneOutSplit
    num_items: int
    name: str
    canaries: int = 0

    @property
    def eval_split(self) -> LeaveOneOutSplit:
        """The real users (canaries excluded), for evaluation."""
        return self.split if not self.canaries else self.split.subset(range(len(self.split) - self.canaries))


DataSource = Callable[[ExperimentConfig, Context], ClientData]
"""Returns the data of the client that ``Context`` describes (``node_config``)."""


def default_data_source(config: ExperimentConfig, context: Context) -> ClientData:
    """Deployment: the node's own data (``data-path`` in its node config, ``client/node.py``);
    simulation: the partition named by ``node_config["partition-id"]``."""
    if is_deployed(context.node_config):
        from client.node import NodeSettings, node_client_data
        return node_client_data(config, NodeSettings.from_node_config(context.node_config))
    from simulations.clients import simulated_client_data
    return simulated_client_data(config, int(context.node_config["partition-id"]))


def client_seed(base: int, server_round: int, client: str) -> int:
    """A per-round, per-client seed that does not depend on Python's hash randomisation."""
    return (base * 1_000_003 + server_round * 7919 + zlib.crc32(client.encode())) % (2 ** 31)


def round_lr(round_config: ConfigRecord, default: float) -> float:
    """The learning rate the server sent for this round (``lr``), or ``default`` when it sent none."""
    lr = round_config.get("lr", default)
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
        raise ValueError(f"round config 'lr' = {lr!r}: expected a finite number > 0 (the clients' learning rate)")
    return float(lr)


def private_fit(cfg: ExperimentConfig, data: ClientData, msg: Message, *, run: str,
                server_round: int) -> tuple[SASRec, MetricRecord, ConfigRecord] | Message:
    """One round of user-level DP-SGD, accounted in the client's ledger before the update leaves.

    1. Plan the mechanism (q, noise, delta) for this client; the accountant history is the
       ledger's (it survives restarts: a client may be a fresh process every round).
    2. Project the epsilon after this round's steps; if the operator's policy forbids the
       request (noise too low, too many rounds, budget exceeded), append a refusal to the ledger
       and return the reply: error ``PRIVACY_DECLINED`` and the reason, with the refusal's ledger
       receipt at its end (an error reply carries no records); no training, no update.
    3. Train, append the spend entry (signed, chained, fsynced), then return the trained model,
       the metrics (the mechanism's parameters and cumulative epsilon) and the entry's receipt
       (``RECEIPT_RECORD``: its canonical bytes, hash, signature and the client's public key):
       only then may anything leave.
    """
    from privacy.dp import MECHANISM, clipping_description, distributed_mechanism, dp_local_train, noise_share, plan_dp
    from privacy.ledger import LedgerEntry, PrivacyLedger
    from privacy.policy import load_policy

    fed, priv = cfg.federation, cfg.privacy
    if not priv.state_dir:
        raise ValueError("privacy.state_dir is empty: a client needs a state directory for its privacy ledger")
    ledger = PrivacyLedger(Path(priv.state_dir) / data.name / "ledger.jsonl")
    distributed = priv.noise_placement == "distributed"
    if distributed and priv.distributed_min_clients < 1:
        raise ValueError("privacy.distributed_min_clients must be >= 1 at a client with privacy.noise_placement="
                         "'distributed': the number of clients whose noise shares every sum must hold (a simulation "
                         "fills it in; a deployed client must set it)")
    plan = plan_dp(priv, num_users=len(data.split), batch_size=cfg.train.batch_size,
                   planned_epochs=fed.num_rounds * fed.local_epochs,
                   planned_steps=fed.num_rounds if distributed else None)
    steps = 1 if distributed else fed.local_epochs * plan.steps_per_epoch
    mechanism = ((distributed_mechanism(priv.distributed_min_clients) if distributed else MECHANISM)
                 + clipping_description(plan.embedding_clip_share))
    accountant = ledger.accountant()
    accountant.add(noise_multiplier=plan.noise_multiplier, sample_rate=plan.sample_rate, steps=steps)
    eps_after = accountant.epsilon(plan.delta, accountant=plan.accountant)

    def entry(kind: str, epsilon: float, reason: str = "") -> LedgerEntry:
        return LedgerEntry(run=run, round=server_round, client=data.name, kind=kind, mechanism=mechanism,
                           noise_multiplier=plan.noise_multiplier, sample_rate=plan.sample_rate,
                           steps=steps if kind == "spend" else 0, max_grad_norm=plan.max_grad_norm,
                           delta=plan.delta, epsilon=epsilon, accountant=plan.accountant, reason=reason)

    if priv.policy:
        policy = load_policy(priv.policy)
        delta = policy.delta if policy.delta is not None else plan.delta
        at_policy_delta = accountant.epsilon(delta, accountant=policy.accountant)
        decision = policy.check(noise_multiplier=plan.noise_multiplier, epsilon_after=at_policy_delta,
                                rounds_done=ledger.rounds_spent())
        if not decision.allowed:
            spent = ledger.accountant().epsilon(plan.delta, accountant=plan.accountant)
            receipt = ledger.receipt(ledger.append(entry("refusal", spent, decision.reason)))
            logger.warning("client %s round %d: declined: %s", data.name, server_round, decision.reason)
            reason = receipt.attach_to(f"client {data.name}: {decision.reason}")
            return Message(Error(code=PRIVACY_DECLINED, reason=reason), reply_to=msg)
    model = _model(cfg, data, msg.content)
    lr = round_lr(msg.content["config"], cfg.train.lr)
    if distributed:  # one plain-SGD step with this client's share of the noise; the sum carries all of it
        share = replace(plan, noise_multiplier=noise_share(plan.noise_multiplier, priv.distributed_min_clients))
        stats = dp_local_train(model, data.split.train, replace(cfg.train, lr=lr), share, epochs=1, max_steps=1,
                               sgd=True, grad_sample_mode=priv.grad_sample_mode,
                               physical_batch_size=priv.physical_batch_size)
    else:
        stats = dp_local_train(model, data.split.train, replace(cfg.train, lr=lr), plan, epochs=fed.local_epochs,
                               grad_sample_mode=priv.grad_sample_mode, physical_batch_size=priv.physical_batch_size)
    if stats["steps"] != steps:
        raise RuntimeError(f"planned {steps} DP-SGD steps, took {stats['steps']}")
    record = ledger.append(entry("spend", eps_after))  # durable before the update leaves this client
    metrics = MetricRecord({"num-examples": int(len(data.split)), "train-loss": float(stats["loss"]),
                            "train-seconds": float(stats["seconds"]), "dp-noise-multiplier": plan.noise_multiplier,
                            "dp-sample-rate": plan.sample_rate, "dp-steps": int(steps),
                            "dp-max-grad-norm": plan.max_grad_norm, "dp-delta": plan.delta,
                            "dp-epsilon": float(eps_after)})
    return model, metrics, ConfigRecord(ledger.receipt(record).to_dict())


def release_transitions(cfg: ExperimentConfig, data: ClientData, msg: Message, *,
                        run: str) -> tuple[np.ndarray, MetricRecord, ConfigRecord | None] | Message:
    """The client's part of the transition table's release (``privacy/transitions.py``).

    Sums its users' clipped transition matrices; under DP-SGD checks its policy, adds its share of
    the noise and appends the spend (round 0: one step at sample rate 1, noise multiplier
    ``privacy.transitions_noise_multiplier``) to its ledger before returning. Returns (the noisy
    sum, metrics, the entry's receipt or None), or the refusal reply.
    """
    from privacy.dp import noise_share
    from privacy.transitions import (RELEASE_ROUND, add_noise, client_transitions, release_history,
                                     release_mechanism)

    model_cfg = cfg.model_config(data.num_items)
    if not model_cfg.transitions:
        reason = (f"client {data.name}: the server asked for the transition table's release, and this client's "
                  "model.transitions is false")
        logger.warning("%s", reason)
        return Message(Error(code=PRIVACY_DECLINED, reason=reason), reply_to=msg)
    t0 = time.perf_counter()
    total = client_transitions(data.split.train, data.num_items, window=model_cfg.transitions_window,
                               decay=model_cfg.transitions_decay)  # (V + 1, V + 1)
    metrics = {"num-examples": int(len(data.split)), "train-loss": 0.0}
    priv = cfg.privacy
    if priv.mode != "dp-sgd":  # no DP: the exact counts
        metrics["train-seconds"] = time.perf_counter() - t0
        return total, MetricRecord(metrics), None

    from privacy.accounting import default_delta
    from privacy.ledger import LedgerEntry, PrivacyLedger
    from privacy.policy import load_policy

    if not priv.state_dir:
        raise ValueError("privacy.state_dir is empty: a client needs a state directory for its privacy ledger")
    ledger = PrivacyLedger(Path(priv.state_dir) / data.name / "ledger.jsonl")
    [(sigma, rate, steps)] = release_history(priv)
    distributed = priv.noise_placement == "distributed"
    if distributed and priv.distributed_min_clients < 1:
        raise ValueError("privacy.distributed_min_clients must be >= 1 at a client with privacy.noise_placement="
                         "'distributed' (a simulation fills it in; a deployed client must set it)")
    delta = priv.delta or default_delta(len(data.split))
    mechanism = release_mechanism(sigma, min_clients=priv.distributed_min_clients if distributed else None,
                                  window=model_cfg.transitions_window, decay=model_cfg.transitions_decay)
    accountant = ledger.accountant()
    accountant.add(noise_multiplier=sigma, sample_rate=rate, steps=steps)
    eps_after = accountant.epsilon(delta, accountant=priv.accountant)

    def entry(kind: str, epsilon: float, reason: str = "") -> LedgerEntry:
        return LedgerEntry(run=run, round=RELEASE_ROUND, client=data.name, kind=kind, mechanism=mechanism,
                           noise_multiplier=sigma, sample_rate=rate, steps=steps if kind == "spend" else 0,
                           max_grad_norm=1.0, delta=delta, epsilon=epsilon, accountant=priv.accountant,
                           reason=reason)

    if priv.policy:
        policy = load_policy(priv.policy)
        at_policy_delta = accountant.epsilon(policy.delta if policy.delta is not None else delta,
                                             accountant=policy.accountant)
        decision = policy.check(noise_multiplier=sigma, epsilon_after=at_policy_delta, rounds_done=0)
        if not decision.allowed:
            spent = ledger.accountant().epsilon(delta, accountant=priv.accountant)
            receipt = ledger.receipt(ledger.append(entry("refusal", spent, decision.reason)))
            logger.warning("client %s: transition table release declined: %s", data.name, decision.reason)
            reason = receipt.attach_to(f"client {data.name}: {decision.reason}")
            return Message(Error(code=PRIVACY_DECLINED, reason=reason), reply_to=msg)
    std = noise_share(sigma, priv.distributed_min_clients) if distributed else sigma
    noisy = add_noise(total, std)  # the clipping bound is 1: std is the multiplier itself
    record = ledger.append(entry("spend", eps_after))  # durable before the sum leaves this client
    metrics.update({"train-seconds": time.perf_counter() - t0, "dp-noise-multiplier": sigma, "dp-sample-rate": rate,
                    "dp-steps": steps, "dp-max-grad-norm": 1.0, "dp-delta": delta, "dp-epsilon": float(eps_after)})
    return noisy, MetricRecord(metrics), ConfigRecord(ledger.receipt(record).to_dict())


def plain_fit(cfg: ExperimentConfig, data: ClientData, msg: Message, *,
              server_round: int) -> tuple[SASRec, MetricRecord]:
    """One round of non-private local training (FedProx's proximal term when the server sent one)."""
    mu = float(msg.content["config"].get("proximal-mu", 0.0))
    lr = round_lr(msg.content["config"], cfg.train.lr)
    model = _model(cfg, data, msg.content)
    stats = local_train(model, data.split.train, replace(cfg.train, lr=lr), epochs=cfg.federation.local_epochs,
                        seed=client_seed(cfg.federation.seed, server_round, data.name), proximal_mu=mu)
    logger.debug("client %s round %d: %d users, loss %.4f", data.name, server_round, len(data.split),
                 stats["loss"])
    metrics = MetricRecord({"num-examples": int(len(data.split)), "train-loss": float(stats["loss"]),
                            "train-seconds": float(stats["seconds"])})
    return model, metrics


def _model(config: ExperimentConfig, data: ClientData, content: RecordDict) -> SASRec:
    """The global model of a server message's ``content``; with ``model.item_features``, the
    catalogue feature matrix the server sent along (public; without it, an error naming the record)."""
    features = None
    if config.model_config(data.num_items).item_feature_names:
        if FEATURES_RECORD not in content.array_records:
            raise ValueError(f"model.item_features={config.model['item_features']!r}, but the server's message has "
                             f"no {FEATURES_RECORD!r} record with the catalogue feature matrix")
        features = content[FEATURES_RECORD]["matrix"].numpy()
    model = build_model(config, data.num_items, features)
    model.load_shareable_state(content["arrays"].to_torch_state_dict())
    if TRANSITIONS_RECORD in content.array_records and model.transition_table is not None:
        model.set_transition_table(content[TRANSITIONS_RECORD]["table"].numpy())  # evaluation: the released table
    return model


def make_client_app(config: ExperimentConfig | None = None, data: DataSource | None = None) -> ClientApp:
    """A ClientApp bound to ``config`` (or the run config) and a data source (or the simulated one)."""
    app = ClientApp()
    source = data or default_data_source

    def resolve(context: Context) -> tuple[ExperimentConfig, ClientData]:
        cfg = config or config_from_run_config(context.run_config)
        if is_deployed(context.node_config):  # the operator's policy, ledger and catalogue win
            from client.node import NodeSettings
            cfg = NodeSettings.from_node_config(context.node_config).apply(cfg)
        return cfg, source(cfg, context)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        cfg, data = resolve(context)
        server_round = int(msg.content["config"]["server-round"])
        if cfg.privacy.secure_aggregation_enabled and secure.RECORD not in msg.content:
            # the client's own configuration requires secure aggregation: no update in the clear
            reason = (f"client {data.name}: privacy.secure_aggregation={cfg.privacy.secure_aggregation!r} "
                      f"(privacy.mode={cfg.privacy.mode!r}) requires secure aggregation, and the server asked "
                      "for a plain update")
            logger.warning("%s", reason)
            return Message(Error(code=PRIVACY_DECLINED, reason=reason), reply_to=msg)
        receipt: ConfigRecord | None = None  # the ledger entry's receipt (DP-SGD only)
        if msg.content["config"].get(RELEASE_FLAG, False):  # before round 1: the transition table
            released = release_transitions(cfg, data, msg, run=str(context.run_id))
            if isinstance(released, Message):
                return released
            table, metrics, receipt = released
            n = int(metrics["num-examples"])
            if secure.RECORD in msg.content:  # the sum of the clients' tables, as an "update" from zeros
                return secure.advertise_keys(msg, context, name=data.name, trained={"table": table / max(n, 1)},
                                             metrics=metrics, weight=n, receipt=receipt,
                                             global_={"table": np.zeros_like(table)})
            content = {"arrays": ArrayRecord({"table": Array(table)}), "metrics": metrics}
            if receipt is not None:
                content[RECEIPT_RECORD] = receipt
            return Message(RecordDict(content), reply_to=msg)
        if cfg.privacy.mode == "dp-sgd":
            fitted = private_fit(cfg, data, msg, run=str(context.run_id), server_round=server_round)
            if isinstance(fitted, Message):  # declined by the client's privacy policy
                return fitted
            model, metrics, receipt = fitted
        else:
            model, metrics = plain_fit(cfg, data, msg, server_round=server_round)
        if secure.RECORD in msg.content:  # secure aggregation, stage 0: keys and metrics, no weights
            trained = {k: v.numpy() for k, v in model.shareable_state().items()}
            return secure.advertise_keys(msg, context, name=data.name, trained=trained, metrics=metrics,
                                         weight=int(metrics["num-examples"]), receipt=receipt)
        content = {"arrays": ArrayRecord(model.shareable_state()), "metrics": metrics}
        if receipt is not None:
            content[RECEIPT_RECORD] = receipt
        return Message(RecordDict(content), reply_to=msg)

    @app.train(secure.ACTION)
    def secure_stage(msg: Message, context: Context) -> Message:
        return secure.handle_stage(msg, context)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        cfg, data = resolve(context)
        device = select_device(cfg.train.device)
        model = _model(cfg, data, msg.content).to(device)
        m = evaluate_model(model, data.eval_split, which="test", exclude_history=cfg.eval.exclude_history,
                           sampled=False, device=device)
        metrics = MetricRecord({"num-examples": int(len(data.eval_split)), "ndcg@10": float(m["ndcg@10"]),
                                "hr@10": float(m["hr@10"]), "mrr": float(m["mrr"])})
        return Message(RecordDict({"metrics": metrics}), reply_to=msg)

    return app


app = make_client_app()
