"""Federated simulations on Flower's simulation engine (Ray): ``fedrec simulate``.

One run directory holds everything: ``config.json`` (resolved settings), ``partition.json``
(clients and their sizes), ``metrics.jsonl`` (one line per round), ``checkpoint.pt`` (resume
state), ``model.pt`` (the servable global model), ``rounds.png`` and ``results.json`` (final
full-ranking metrics of the global model on every user's test target, computed centrally,
which a simulation may do because it holds all the data). With DP-SGD also ``clients/<client>/``
(each client's privacy ledger and its key pair, unless ``privacy.state_dir`` is set) and
``receipts.jsonl`` (the server's receipts of the ledger entries); ``fedrec audit`` reads them.
With ``privacy.audit_canaries`` also ``canaries.json`` (the canary users and their inclusion bits,
for ``fedrec audit --empirical``).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from core_model.config import ExperimentConfig, build_config
from core_model.evaluate import Popularity, evaluate_ranking
from core_model.train import evaluate_model, load_checkpoint, select_device

if TYPE_CHECKING:
    from flwr.clientapp import ClientApp

logger = logging.getLogger(__name__)


def backend_config(config: ExperimentConfig) -> dict[str, Any]:
    """Ray resources: ``client_cpus`` CPUs per client; a GPU share when CUDA is present."""
    gpus = config.federation.client_gpus
    if gpus < 0:
        gpus = 0.25 if torch.cuda.is_available() else 0.0
    return {
        "client_resources": {"num_cpus": config.federation.client_cpus, "num_gpus": gpus},
        "init_args": {"num_cpus": os.cpu_count() or 1, "logging_level": "ERROR", "log_to_driver": False,
                      "include_dashboard": False},
    }


def server_view(config: ExperimentConfig, run_dir: Path) -> dict[str, Any]:
    """What the server saw of the clients' updates, and the secure rounds that were aborted."""
    from server.secure_aggregation import what_the_server_saw

    priv = config.privacy
    out: dict[str, Any] = {"secure_aggregation": priv.secure_aggregation_enabled,
                           "server_saw": what_the_server_saw(secure=priv.secure_aggregation_enabled,
                                                             dp=priv.mode == "dp-sgd")}
    if priv.mode == "dp-sgd" and priv.noise_placement == "distributed":
        out["server_saw"] += (f" (distributed noise: each client's update carries 1/sqrt({priv.distributed_min_clients})"
                              " of the noise, only the sum all of it; rounds with fewer clients in the sum aborted)")
    if priv.secure_aggregation_enabled:
        rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if line]
        out["secagg_rounds_aborted"] = [r["round"] for r in rows if r.get("secagg_aborted")]
        if any(r.get("secagg_components", 1) > 1 for r in rows):
            out["server_saw"] += " (in some rounds, one sum per connected component of the survivors)"
    return out


def write_canaries(config: ExperimentConfig, run_dir: Path, *, num_items: int, clients: Sequence[str]) -> Path:
    """Draw the run's canary users (``privacy.audit_canaries``, OS randomness) into ``run_dir/canaries.json``."""
    from privacy.canaries import CANARY_FILE, make_canaries

    priv = config.privacy
    canaries = make_canaries(num=priv.audit_canaries, length=priv.audit_canary_length, num_items=num_items,
                             clients=list(clients))
    path = Path(run_dir) / CANARY_FILE
    canaries.save(path)
    logger.info("empirical audit: %d canary users (%d included) of %d items each, written to %s",
                len(canaries), int(canaries.included.sum()), priv.audit_canary_length, path)
    return path


def load_run_config(run_dir: Path) -> ExperimentConfig:
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: {run_dir} is not a fedrec run directory")
    return build_config(json.loads(path.read_text()))


def simulate(config: ExperimentConfig, run_dir: Path, *, resume: bool = False,
             on_round: Callable[[dict[str, Any]], None] | None = None,
             client_app: ClientApp | None = None) -> dict[str, Any]:
    """Run (or, with ``resume``, continue) the federated simulation ``config`` describes.

    ``client_app``: the ClientApp to simulate (default ``make_client_app(config)``; tests pass one
    that wraps it, e.g. to make a client fail at a given stage).
    """
    from flwr.simulation import run_simulation

    from client.client_app import make_client_app
    from server.server_app import LAST_ITERATE, make_server_app
    from simulations.clients import load_federation
    from simulations.report import plot_rounds

    run_dir = Path(run_dir)
    if resume and not (run_dir / "checkpoint.pt").exists():
        raise FileNotFoundError(f"{run_dir / 'checkpoint.pt'} does not exist: nothing to resume "
                                "(the run finished no round)")
    if not resume and (run_dir / "checkpoint.pt").exists():
        raise ValueError(f"{run_dir} already holds a run; resume it with --resume {run_dir} or choose "
                         "another --out")
    run_dir.mkdir(parents=True, exist_ok=True)
    if config.privacy.mode != "none" and not config.privacy.state_dir:
        # each simulated client keeps its privacy ledger under the run directory
        config = replace(config, privacy=replace(config.privacy, state_dir=str((run_dir / "clients").resolve())))
    t0 = time.perf_counter()
    log, split, partition = load_federation(config)
    priv, fed = config.privacy, config.federation
    if priv.noise_placement == "distributed" and not priv.distributed_min_clients:
        # every client sampled in a round must be in the sum for it to carry the whole noise
        per_round = max(int(partition.num_clients * fed.fraction_train), fed.min_train_clients)
        config = replace(config, privacy=replace(priv, distributed_min_clients=min(per_round, partition.num_clients)))
    if config.privacy.audit_canaries and not config.privacy.audit_canary_file:
        config = replace(config, privacy=replace(config.privacy, audit_canary_file=str(
            write_canaries(config, run_dir, num_items=log.num_items, clients=partition.names).resolve())))
    (run_dir / "config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")
    (run_dir / "partition.json").write_text(json.dumps(partition.report(), indent=2) + "\n")
    logger.info("%s: %d clients (%s), users per client min %d / max %d", log.name, partition.num_clients,
                partition.scheme, min(partition.sizes()), max(partition.sizes()))
    server_app = make_server_app(config, run_dir=run_dir, items=log.items,
                                 item_titles=log.item_features.get("title"), num_clients=partition.num_clients,
                                 item_features=log.item_features,
                                 on_round=on_round)
    client_app = client_app or make_client_app(config)
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    run_simulation(server_app=server_app, client_app=client_app, num_supernodes=partition.num_clients,
                   backend_config=backend_config(config))
    wall = time.perf_counter() - t0
    device = select_device(config.train.device)
    model, ckpt = load_checkpoint(run_dir / "model.pt", device)
    test = evaluate_model(model, split, which="test", exclude_history=config.eval.exclude_history,
                          sampled=config.eval.sampled, device=device)
    pop = evaluate_ranking(Popularity(split.train, split.num_items), split.test_inputs(), split.test_targets,
                           num_items=split.num_items, max_len=model.config.max_len,
                           exclude_history=config.eval.exclude_history, sampled=config.eval.sampled)
    if (run_dir / LAST_ITERATE).exists():  # federation.server_ema: model.pt is the average; the last iterate too
        last, _ = load_checkpoint(run_dir / LAST_ITERATE, device)
        test_last = evaluate_model(last, split, which="test", exclude_history=config.eval.exclude_history,
                                   sampled=config.eval.sampled, device=device)
    results = {"test": test, "popularity_test": pop, "rounds": ckpt["round"], "wall_seconds_this_process": wall,
               "clients": partition.num_clients, "data": log.summary(),
               "protocol": "leave-one-out, full ranking, history "
                           f"{'excluded' if config.eval.exclude_history else 'included'}",
               "data_synthetic": config.data.kind == "synthetic"}
    if (run_dir / LAST_ITERATE).exists():
        results.update({"served_weights": f"moving average (federation.server_ema={config.federation.server_ema})",
                        "test_last_iterate": test_last})
    results.update(server_view(config, run_dir))
    (run_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    plot_rounds(run_dir)
    return results
