"""Latency of ``Recommender.recommend(history, k=10)`` for one history against the full catalogue.

    python benchmarks/recommend_latency.py --checkpoint runs/bench-ml-1m/model.pt [--requests 2000]

Histories are real ML-1M test histories (raw item ids, the last ``max_len`` items are read), one
request at a time, single process, after 50 warm-up requests. Reports p50, p90, p99 and the mean.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from core_model.config import DataConfig  # noqa: E402
from core_model.pipeline import load_log, split_log  # noqa: E402
from core_model.recommend import Recommender  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (serving usually pins one)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "recommend-latency.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rec = Recommender.from_checkpoint(args.checkpoint, device="cpu")
    ckpt = torch.load(args.checkpoint, weights_only=True)
    split = split_log(load_log(DataConfig(**ckpt["data_config"])), DataConfig(**ckpt["data_config"]))
    rng = np.random.default_rng(0)
    rows = rng.integers(0, len(split), args.requests + 50)
    histories = [[rec.items.raw(int(i)) for i in split.test_inputs()[r]] for r in rows]
    times = []
    for n, history in enumerate(histories):
        t0 = time.perf_counter()
        rec.recommend(history, k=10)
        if n >= 50:
            times.append((time.perf_counter() - t0) * 1000)
    ms = np.array(times)
    out = {"requests": len(ms), "catalogue_items": len(rec.items), "threads": args.threads,
           "mean_history_len": float(np.mean([len(h) for h in histories])),
           "p50_ms": float(np.percentile(ms, 50)), "p90_ms": float(np.percentile(ms, 90)),
           "p99_ms": float(np.percentile(ms, 99)), "mean_ms": float(ms.mean()),
           "date": time.strftime("%Y-%m-%d"), "checkpoint": str(args.checkpoint)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
