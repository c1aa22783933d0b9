"""Side by side on the same inputs: Flower's own SecAgg+ (legacy workflow) and fedrec's SecAgg+.

    python benchmarks/flower_secagg_baseline.py --clients 10 --d-model 64 288 --reps 3

For each client count n and model size (``--d-model``: the SASRec model on ML-1M's 3,416 items;
64 gives 282,048 parameters, 288 gives 2,043,360) one Flower simulation (``run_simulation``, 1 CPU
per client) runs four arms, one round each, rotating their order every repetition:

* ``flower-plain``: Flower's legacy ``default_fit_workflow`` (the fit step of ``DefaultWorkflow``)
  with a legacy ``flwr.server.strategy.FedAvg``; the clients are ``NumPyClient``\\ s;
* ``flower-secagg``: ``SecAggPlusWorkflow`` (the fit workflow Flower's SecAgg+ examples put in
  ``DefaultWorkflow``) with the same strategy, the clients behind ``secaggplus_mod``; same graph
  size as ours (``num_shares`` = our degree + 1, ``reconstruction_threshold`` = our threshold),
  ``max_weight`` = ``--max-weight`` (1000, Flower's default), its default ``clipping_range`` 8 and
  ``quantization_range`` 2**22;
* ``fedrec-plain``: our round without secure aggregation (``flwr.serverapp.strategy.FedAvg``
  ``configure_train`` / ``aggregate_train`` over the replies, as ``server/server_app.py`` does);
* ``fedrec-secagg``: ``server.secure_aggregation.SecureRound`` with ``client.secure_aggregation``
  on the clients (the real adapters and protocol; the default bound 2**24 and 24 fractional bits).

The inputs are fixed: the global model ``w`` is SASRec's initialisation (seed 0) with two
coordinates set to +/- ``--outlier`` (a weight outside Flower's clipping range once scaled by
``n_k / max_weight``); client ``k`` (its partition id) has ``n_k = 400 + (97 k mod 600)`` users and
returns ``w_k = float32(w + u_k)`` with ``u_k ~ N(0, 0.01^2)`` drawn from ``default_rng([seed, k])``
instead of training (the benchmark's own ClientApp calls our adapters' ``advertise_keys`` /
``handle_stage`` with these weights, so nothing of the protocol is mocked). Every arm should give
the FedAvg aggregate ``sum_k n_k w_k / sum_k n_k``; the reference is computed in float64 in this
process. Quoted per arm: the largest absolute error over the ordinary coordinates (max over
repetitions), the aggregate at the two outlier coordinates, and the round time (send, client work,
aggregation: from the workflow's start to the aggregated model) as the median over the timed
repetitions (repetition 0 warms the Ray actors up and is not timed); per stack the ratio
secure / plain of the medians.

Writes ``benchmarks/results/secagg-vs-flower.json`` (``--name`` changes the suffix).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ARMS = ("flower-plain", "flower-secagg", "fedrec-plain", "fedrec-secagg")
NUM_ITEMS = 3416  # ML-1M's catalogue
UPDATE_STD = 0.01
SEED = 0
TIMEOUT = 600.0


def client_users(pid: int) -> int:
    """``n_k``: the FedAvg weight of client ``pid`` (400..999)."""
    return 400 + (97 * pid) % 600


def client_weights(pid: int, global_: list[np.ndarray]) -> list[np.ndarray]:
    """``w_k = float32(w + u_k)``, ``u_k ~ N(0, UPDATE_STD^2)`` from ``default_rng([SEED, pid])``."""
    rng = np.random.default_rng([SEED, pid])
    return [(g + rng.normal(0.0, UPDATE_STD, g.shape).astype(np.float32)).astype(np.float32) for g in global_]


def global_model(d_model: int, outlier: float) -> dict[str, np.ndarray]:
    import torch

    from core_model.config import load_config
    from core_model.model import SASRec

    torch.manual_seed(SEED)
    state = SASRec(load_config(None, [f"model.d_model={d_model}"]).model_config(NUM_ITEMS)).shareable_state()
    out = {k: v.detach().numpy().astype(np.float32).copy() for k, v in state.items()}
    first = out[next(iter(out))].reshape(-1)  # a view: sets the first array's first two values
    first[0], first[1] = outlier, -outlier
    return out


def make_client_app(names: list[str]):
    """One ClientApp serving all four arms; each message goes to the stack that sent it."""
    from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
    from flwr.client import NumPyClient
    from flwr.client.mod import secaggplus_mod
    from flwr.clientapp import ClientApp
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

    from client import secure_aggregation as secure

    class FixedClient(NumPyClient):
        def __init__(self, pid: int) -> None:
            self.pid = pid

        def fit(self, parameters, config):
            return client_weights(self.pid, parameters), client_users(self.pid), {}

    def client_fn(context: Context):
        return FixedClient(int(context.node_config["partition-id"])).to_client()

    legacy_plain = ClientApp(client_fn=client_fn)
    legacy_secagg = ClientApp(client_fn=client_fn, mods=[secaggplus_mod])
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        if RECORD_KEY_CONFIGS in msg.content.config_records:  # Flower's SecAgg+ stages
            return legacy_secagg(msg, context)
        if "arrays" not in msg.content:  # Flower's legacy FitIns
            return legacy_plain(msg, context)
        pid = int(context.node_config["partition-id"])
        global_ = [msg.content["arrays"][k].numpy() for k in names]
        trained = dict(zip(names, client_weights(pid, global_)))
        metrics = MetricRecord({"num-examples": client_users(pid), "train-loss": 0.0})
        if secure.RECORD in msg.content:  # our SecAgg+, stage 0
            return secure.advertise_keys(msg, context, name=f"client-{pid}", trained=trained, metrics=metrics,
                                         weight=client_users(pid))
        arrays = ArrayRecord({k: Array(v) for k, v in trained.items()})
        return Message(RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=msg)

    @app.train(secure.ACTION)
    def secure_stage(msg: Message, context: Context) -> Message:
        return secure.handle_stage(msg, context)

    return app


def make_server_app(*, n: int, global_: dict[str, np.ndarray], reps: int, max_weight: float,
                    out: list[dict[str, Any]]):
    """The ServerApp: ``reps + 1`` repetitions of the four arms, rotated; appends to ``out``."""
    from flwr.app import Array, ArrayRecord, ConfigRecord, Context
    from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays
    from flwr.compat.common import recorddict_compat as compat
    from flwr.server import ServerConfig
    from flwr.server.client_manager import SimpleClientManager
    from flwr.server.compat.app_utils import start_update_client_manager_thread
    from flwr.server.compat.legacy_context import LegacyContext
    from flwr.server.strategy import FedAvg as LegacyFedAvg
    from flwr.server.workflow import SecAggPlusWorkflow
    from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key
    from flwr.server.workflow.default_workflows import default_fit_workflow
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp.strategy import FedAvg

    from privacy.secagg import choose_graph
    from server.secure_aggregation import SecureRound
    from server.server_app import _reply_order, wait_for_nodes

    names = list(global_)
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        wait_for_nodes(grid, n, timeout=TIMEOUT)
        legacy = LegacyContext(context, config=ServerConfig(num_rounds=1),
                               strategy=LegacyFedAvg(fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=n,
                                                     min_available_clients=n, accept_failures=False),
                               client_manager=SimpleClientManager())
        thread, stop, registered = start_update_client_manager_thread(grid, legacy.client_manager)
        registered.wait()
        graph = choose_graph(list(range(1, n + 1)))
        flower_secagg = SecAggPlusWorkflow(num_shares=graph.degree + 1, reconstruction_threshold=graph.threshold,
                                           max_weight=max_weight, timeout=TIMEOUT)
        strategy = FedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=n, min_available_nodes=n,
                          weighted_by_key="num-examples")
        arrays = ArrayRecord({k: Array(v) for k, v in global_.items()})
        parameters = ndarrays_to_parameters(list(global_.values()))

        def legacy_round(rnd: int, workflow) -> list[np.ndarray]:
            legacy.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord(
                {Key.CURRENT_ROUND: rnd, Key.START_TIME: time.time()})
            legacy.state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(parameters, True)
            workflow(grid, legacy)
            result = compat.arrayrecord_to_parameters(legacy.state.array_records[MAIN_PARAMS_RECORD], True)
            return parameters_to_ndarrays(result)

        def our_round(rnd: int, secure: bool) -> tuple[list[np.ndarray], dict[str, float]]:
            messages = list(strategy.configure_train(rnd, arrays, ConfigRecord({}), grid))
            stages: dict[str, float] = {}
            if secure:
                result = SecureRound(grid, server_round=rnd, bound=2.0**24, scale_bits=24,
                                     timeout=TIMEOUT).run(messages, arrays)
                if result.reply is None:
                    raise RuntimeError(f"round {rnd}: our secure aggregation aborted: {result.record}")
                replies, stages = [result.reply], result.record["secagg_seconds"]
            else:
                replies = sorted(grid.send_and_receive(messages, timeout=TIMEOUT), key=_reply_order)
            new, _ = strategy.aggregate_train(rnd, replies)
            return [new[k].numpy() for k in names], stages

        rnd = 0
        try:
            for rep in range(reps + 1):
                for arm in ARMS[rep % len(ARMS):] + ARMS[:rep % len(ARMS)]:
                    rnd += 1
                    stages: dict[str, float] = {}
                    t0 = time.perf_counter()
                    if arm == "flower-plain":
                        result = legacy_round(rnd, default_fit_workflow)
                    elif arm == "flower-secagg":
                        result = legacy_round(rnd, flower_secagg)
                    else:
                        result, stages = our_round(rnd, secure=arm == "fedrec-secagg")
                    seconds = time.perf_counter() - t0
                    out.append({"rep": rep, "arm": arm, "seconds": seconds, "stages": stages,
                                "aggregate": [np.asarray(a, dtype=np.float64) for a in result]})
                    print(f"n={n} rep {rep} {arm}: {seconds:.2f} s", flush=True)
        finally:
            stop.set()
            thread.join()

    return app


def summarize(*, n: int, global_: dict[str, np.ndarray], runs: list[dict[str, Any]], reps: int) -> dict[str, Any]:
    """Errors against the float64 FedAvg of the clients' weights, and median times per arm."""
    values = list(global_.values())
    users = [client_users(pid) for pid in range(n)]
    reference = [np.zeros(v.shape, dtype=np.float64) for v in values]
    for pid, n_k in enumerate(users):
        for ref, w_k in zip(reference, client_weights(pid, values)):
            ref += n_k * w_k.astype(np.float64)
    reference = [r / sum(users) for r in reference]
    flat_ref = np.concatenate([r.reshape(-1) for r in reference])
    arms: dict[str, Any] = {}
    for arm in ARMS:
        mine = [r for r in runs if r["arm"] == arm]
        errors, outliers = [], []
        for r in mine:
            flat = np.concatenate([a.reshape(-1) for a in r["aggregate"]])
            if flat.shape != flat_ref.shape:
                raise RuntimeError(f"{arm}: aggregate of {flat.size} values, expected {flat_ref.size}")
            errors.append(float(np.abs(flat[2:] - flat_ref[2:]).max()))
            outliers.append([float(flat[0]), float(flat[1])])
        timed = [r["seconds"] for r in mine if r["rep"] > 0]
        row: dict[str, Any] = {"round_seconds_median": statistics.median(timed), "round_seconds": timed,
                               "max_abs_error": max(errors), "outlier_coordinates": outliers[0]}
        stages = [r["stages"] for r in mine if r["rep"] > 0 and r["stages"]]
        if stages:
            row["stage_seconds_median"] = {k: statistics.median(s[k] for s in stages) for k in stages[0]}
        arms[arm] = row
    median = {arm: arms[arm]["round_seconds_median"] for arm in ARMS}
    return {"clients": n, "parameters": int(flat_ref.size), "users": users, "timed_reps": reps,
            "reference_outlier_coordinates": [float(flat_ref[0]), float(flat_ref[1])], "arms": arms,
            "ratio_flower": median["flower-secagg"] / median["flower-plain"],
            "ratio_fedrec": median["fedrec-secagg"] / median["fedrec-plain"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[10])
    parser.add_argument("--d-model", type=int, nargs="+", default=[64, 288],
                        help="SASRec width on ML-1M's catalogue: 64 -> 282,048 parameters, 288 -> 2,043,360")
    parser.add_argument("--reps", type=int, default=3, help="timed repetitions of the four arms (plus one warm-up)")
    parser.add_argument("--max-weight", type=float, default=1000.0, help="Flower's SecAgg+ max_weight")
    parser.add_argument("--outlier", type=float, default=20.0, help="|value| of the two outlier coordinates")
    parser.add_argument("--name", default="", help="suffix of the results file")
    parser.add_argument("--out-dir", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    if args.reps < 1:
        parser.error(f"--reps must be >= 1, got {args.reps}")
    if any(n < 2 for n in args.clients):
        parser.error(f"--clients must be >= 2 (secure aggregation needs 2 clients), got {args.clients}")

    from flwr.simulation import run_simulation

    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    backend = {"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
               "init_args": {"num_cpus": os.cpu_count() or 1, "logging_level": "ERROR", "log_to_driver": False,
                             "include_dashboard": False}}
    rows = []
    for n in args.clients:
        for d in args.d_model:
            global_ = global_model(d, args.outlier)
            runs: list[dict[str, Any]] = []
            run_simulation(server_app=make_server_app(n=n, global_=global_, reps=args.reps,
                                                      max_weight=args.max_weight, out=runs),
                           client_app=make_client_app(list(global_)), num_supernodes=n, backend_config=backend)
            if len(runs) != len(ARMS) * (args.reps + 1):
                raise RuntimeError(f"n={n}, d_model={d}: {len(runs)} rounds ran, expected "
                                   f"{len(ARMS) * (args.reps + 1)} (see the log above)")
            row = {"d_model": d, **summarize(n=n, global_=global_, runs=runs, reps=args.reps)}
            rows.append(row)
            print(f"n={n} d_model={d} ({row['parameters']:,} parameters): " + "; ".join(
                f"{arm} {a['round_seconds_median']:.2f} s, max |error| {a['max_abs_error']:.1e}, outliers "
                f"{a['outlier_coordinates'][0]:.3f} / {a['outlier_coordinates'][1]:.3f}"
                for arm, a in row["arms"].items()) + f"; secure/plain: Flower {row['ratio_flower']:.2f}x, "
                f"fedrec {row['ratio_fedrec']:.2f}x (reference outliers {row['reference_outlier_coordinates'][0]:.3f}"
                f" / {row['reference_outlier_coordinates'][1]:.3f})", flush=True)
    out = {"date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv), "update_std": UPDATE_STD,
           "max_weight": args.max_weight, "clipping_range": 8.0, "quantization_range": 2**22, "outlier": args.outlier,
           "rows": rows}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    target = args.out_dir / f"secagg-vs-flower{'-' + args.name if args.name else ''}.json"
    target.write_text(json.dumps(out, indent=2) + "\n")
    print(f"-> {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
