"""Federated SASRec on Flower's simulation engine: accuracy per round, time, memory.

    python benchmarks/federated.py --name ml1m-regions-fedavg --dataset ml-1m \
        --set federation.partition=attribute --set federation.partition_attribute=region \
        --set federation.strategy=fedavg --set federation.num_rounds=40
    python benchmarks/federated.py --name scale-100 --dataset ml-1m \
        --set federation.partition=iid --set federation.num_clients=100 --set federation.num_rounds=3

Runs ``simulations.runner.simulate`` (the code behind ``fedrec simulate``) on real data from
``../shared/data``, samples the resident memory of this process and all its children (Ray's
workers included) every second, and writes ``benchmarks/results/federated-<name>.json`` with the
per-round curve, the final full-ranking test metrics of the global model, seconds per round
(median over rounds 2..N: round 1 includes Ray's start-up) and the peak total RSS.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from core_model.config import load_config  # noqa: E402
from simulations.runner import simulate  # noqa: E402

DATASETS = {"ml-1m": ("ml-1m", "ml-1m"), "ml-100k": ("ml-100k", "ml-100k"),
            "twitch": ("twitch", "twitch/twitch105k.csv.gz")}


def data_settings(kind: str, rel: str, data_root: Path) -> list[str] | None:
    """``data.kind`` / ``data.path`` overrides for a data set under ``data_root`` (``rel`` empty: no
    file, e.g. the built-in synthetic log); None, after saying so on stderr, when the file is absent."""
    settings = [f'data.kind="{kind}"']
    if rel:
        path = data_root / rel
        if not path.exists():
            print(f"data {path} is absent; pass --data-root", file=sys.stderr)
            return None
        settings.append(f'data.path="{path}"')
    return settings


class PeakMemory:
    """Peak RSS, sampled every ``interval`` seconds: this process and all its descendants, or
    (``children=False``) this process alone. ``base`` is the RSS at construction."""

    def __init__(self, *, interval: float = 1.0, children: bool = True) -> None:
        self.interval, self.children = interval, children
        self.base = psutil.Process().memory_info().rss
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        me = psutil.Process()
        while not self._stop.is_set():
            total = 0
            for p in [me, *me.children(recursive=True)] if self.children else [me]:
                try:
                    total += p.memory_info().rss
                except psutil.Error:
                    pass
            self.peak = max(self.peak, total)
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--name", required=True)
    parser.add_argument("--dataset", choices=sorted(DATASETS), required=True)
    parser.add_argument("--data-root", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--run-dir", type=Path)
    args = parser.parse_args()
    data = data_settings(*DATASETS[args.dataset], args.data_root)
    if data is None:
        return 2
    cfg = load_config(None, [*data, *args.overrides])
    run_dir = args.run_dir or ROOT / "runs" / f"bench-federated-{args.name}"
    curve: list[dict] = []

    def on_round(record: dict) -> None:
        curve.append(record)
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in record.items()}), flush=True)

    start = time.perf_counter()
    with PeakMemory() as mem:
        results = simulate(cfg, run_dir, on_round=on_round)
    wall = time.perf_counter() - start
    seconds = [r["seconds"] for r in curve]
    out = {
        "name": args.name, "dataset": args.dataset, "overrides": args.overrides, "config": cfg.to_dict(),
        "partition": json.loads((run_dir / "partition.json").read_text()),
        "test": results["test"], "popularity_test": results["popularity_test"],
        # federation.server_ema: "test" is the served moving average; this is the last iterate
        **{k: results[k] for k in ("served_weights", "test_last_iterate") if k in results},
        "rounds": results["rounds"], "clients": results["clients"], "wall_minutes": wall / 60,
        "median_seconds_per_round": statistics.median(seconds[1:] or seconds),
        "first_round_seconds": seconds[0] if seconds else None,
        "peak_rss_gb_all_processes": mem.peak / 1024 ** 3, "curve": curve, "date": time.strftime("%Y-%m-%d"),
    }
    target = ROOT / "benchmarks" / "results" / f"federated-{args.name}.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(out, indent=2) + "\n")
    print(f"{args.name}: test NDCG@10 {results['test']['ndcg@10']:.4f} HR@10 {results['test']['hr@10']:.4f} after "
          f"{results['rounds']} rounds, {results['clients']} clients; {out['median_seconds_per_round']:.1f} s/round; "
          f"peak RSS {out['peak_rss_gb_all_processes']:.2f} GB; {wall / 60:.1f} min -> {target}")
    if "test_last_iterate" in results:
        print(f"  ({results['served_weights']}; the last iterate: NDCG@10 "
              f"{results['test_last_iterate']['ndcg@10']:.4f} HR@10 {results['test_last_iterate']['hr@10']:.4f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
