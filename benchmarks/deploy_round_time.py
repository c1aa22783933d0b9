"""Round time in a deployment vs a simulation of the same federation and configuration.

    python benchmarks/deploy_round_time.py --name tiny --rounds 3 --regions 3

The federation: the SYNTHETIC live-commerce log (``--set`` its ``data.synthetic.*`` size), one
client per region. The deployment is ``server.deploy.LocalFederation`` on 127.0.0.1: SuperLink
with TLS, node authentication and a state database, one SuperNode per region holding that region's
users as a file (``fedrec deploy demo-data``), launched with ``flwr run``. The simulation is
``fedrec simulate``'s runner with ``federation.partition = "attribute"`` on ``region``: the same
users per client, the same model and privacy settings (DP-SGD, secure aggregation on).

Quoted per arm: every round's server-side seconds (``metrics.jsonl`` ``seconds``: send, train,
secure-aggregation stages, aggregate; evaluation only in the last round) and the secure-aggregation
stage times; the median over rounds 2.. (round 1 includes the simulation's Ray start-up and the
deployment's first app installation). Run the two arms back to back on an otherwise idle machine.

Writes ``benchmarks/results/deploy-round-time-<name>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SYNTHETIC = {"num_users": 150, "num_items": 40, "min_length": 4, "max_length": 12}
SETTINGS = {"model.d_model": 16, "model.max_len": 12, "train.precision": "fp32", "eval.sampled": False,
            "privacy.mode": "dp-sgd", "privacy.noise_multiplier": 1.0}


def kebab(key: str) -> str:
    return ".".join(part.replace("_", "-") for part in key.split("."))


def rows_of(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def deployment(root: Path, *, regions: int, rounds: int, synthetic: dict) -> list[dict]:
    from server.deploy import LocalFederation

    demo = [f"data.synthetic.{k}={v}" for k, v in synthetic.items()]
    fed = LocalFederation(root, regions=regions, demo_overrides=demo, env_base={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        fed.start_superlink()
        names = sorted(fed.demo["nodes"])
        fed.register(names)
        nodes = [fed.start_node(n) for n in names]
        run_config = {kebab(k): v for k, v in SETTINGS.items()}
        run_config.update({"data.catalogue": fed.demo["catalogue"], "federation.num-rounds": rounds,
                           "federation.num-clients": len(names), "federation.min-train-clients": len(names),
                           "federation.evaluate-every": rounds, "federation.run-dir": str(root / "run")})
        launched = fed.launch(ROOT, run_config)
        if launched.returncode != 0:
            raise RuntimeError(launched.stdout + launched.stderr)
        metrics = root / "run" / "metrics.jsonl"
        deadline = time.monotonic() + 3600
        while not (metrics.exists() and len(rows_of(metrics)) >= rounds):
            if time.monotonic() > deadline or any(p.poll() is not None for p in nodes):
                raise RuntimeError(f"the deployment did not finish {rounds} rounds; see {root}")
            time.sleep(1)
        return rows_of(metrics)
    finally:
        fed.close()


def simulation(root: Path, *, regions: int, rounds: int, synthetic: dict) -> list[dict]:
    from core_model.config import load_config
    from simulations.runner import simulate

    overrides = [f"data.synthetic.{k}={v}" for k, v in {**synthetic, "num_regions": regions}.items()]
    overrides += [f"{k}={json.dumps(v) if isinstance(v, str) else str(v).lower() if isinstance(v, bool) else v}"
                  for k, v in SETTINGS.items()]
    overrides += ['federation.partition="attribute"', 'federation.partition_attribute="region"',
                  f"federation.num_rounds={rounds}", f"federation.evaluate_every={rounds}",
                  f"federation.min_train_clients={regions}"]
    simulate(load_config(None, overrides), root / "run")
    return rows_of(root / "run" / "metrics.jsonl")


def summary(rows: list[dict]) -> dict:
    later = [r["seconds"] for r in rows[1:]] or [rows[0]["seconds"]]
    return {"round_seconds": [round(r["seconds"], 2) for r in rows],
            "median_round_seconds_after_1": statistics.median(later),
            "secagg_seconds": [{k: round(v, 2) for k, v in r.get("secagg_seconds", {}).items()} for r in rows],
            "clients_ok": [r["clients_ok"] for r in rows]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--name", required=True)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--regions", type=int, default=3)
    parser.add_argument("--set", dest="synthetic", action="append", default=[], metavar="KEY=VALUE",
                        help="data.synthetic setting, e.g. --set num_users=600")
    args = parser.parse_args()
    synthetic = dict(SYNTHETIC)
    for item in args.synthetic:
        key, _, value = item.partition("=")
        synthetic[key] = int(value)
    result = {"date": time.strftime("%Y-%m-%d"), "regions": args.regions, "rounds": args.rounds,
              "synthetic": synthetic, "settings": SETTINGS, "load_average_before": os.getloadavg()}
    with tempfile.TemporaryDirectory(prefix="deploy-bench-") as tmp:
        for arm, fn in (("deployment", deployment), ("simulation", simulation)):
            t0 = time.perf_counter()
            rows = fn(Path(tmp) / arm, regions=args.regions, rounds=args.rounds, synthetic=synthetic)
            result[arm] = {**summary(rows), "wall_seconds": round(time.perf_counter() - t0, 1)}
            print(arm, json.dumps(result[arm]), flush=True)
    result["load_average_after"] = os.getloadavg()
    result["ratio_median_round"] = (result["deployment"]["median_round_seconds_after_1"]
                                    / result["simulation"]["median_round_seconds_after_1"])
    out = ROOT / "benchmarks" / "results" / f"deploy-round-time-{args.name}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"deployment / simulation median round time: {result['ratio_median_round']:.2f}x; wrote {out}")


if __name__ == "__main__":
    main()
