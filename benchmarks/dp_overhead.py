"""DP-SGD overhead: one client's local-epoch time with DP vs without, same data, same process.

    python benchmarks/dp_overhead.py --dataset ml-1m --region 0 --reps 5

Takes one ML-1M region client's users (the users whose zip code starts with ``--region``), the
default model and the federated local settings (``--set`` overrides apply), and times one local
epoch per arm, the arms interleaved in every repetition so that machine noise hits all alike:

* ``plain-default``: non-private, default precision (bf16 autocast on CPUs with native bf16);
* ``plain-fp32``: non-private, float32 (DP-SGD runs in float32, so this is the like-for-like base);
* ``plain-fp32-unbucketed``: the same with random batches instead of length-bucketed ones (DP-SGD's
  Poisson batches are random users, padded to the longest of them);
* ``dp-hooks`` / ``dp-ew``: user-level DP-SGD (Poisson sampling, per-user clipping, noise) with
  Opacus' ``hooks`` and ``ew`` per-sample gradient modes, each Poisson batch run in length-sorted
  pieces of ``privacy.physical_batch_size`` users (the default path);
* ``dp-hooks-one-piece``: ``hooks`` with the whole Poisson batch at once, padded to its longest user
  (the path before pieces).

Reports the median epoch seconds per arm and the ratio of medians against both bases, and the
peak RSS increase of each arm over the process' RSS before it (sampled every 0.2 s). Writes
``benchmarks/results/dp-overhead-<dataset>.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from core_model.config import PrivacyConfig, load_config  # noqa: E402
from core_model.features import build_model  # noqa: E402
from core_model.model import SASRec  # noqa: E402
from core_model.train import local_train  # noqa: E402
from privacy.dp import dp_local_train, plan_dp  # noqa: E402
from simulations.clients import load_federation  # noqa: E402

from federated import PeakMemory  # noqa: E402  (benchmarks/federated.py, this script's folder)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", choices=["ml-1m"], default="ml-1m")
    parser.add_argument("--data-root", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--region", default="0", help="the client: ML-1M zip-code region (first digit)")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--noise", type=float, default=1.0)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    path = args.data_root / "ml-1m"
    if not path.exists():
        print(f"data {path} is absent; pass --data-root", file=sys.stderr)
        return 2
    cfg = load_config(None, [f'data.kind="ml-1m"', f'data.path="{path}"', 'federation.partition="attribute"',
                             'federation.partition_attribute="region"', "train.batch_size=32",
                             *args.overrides])
    torch.set_num_threads(cfg.train.num_threads or torch.get_num_threads())
    log, split, partition = load_federation(cfg)
    if args.region not in partition.names:
        print(f"--region {args.region!r}: the regions are {list(partition.names)}", file=sys.stderr)
        return 2
    cid = partition.names.index(args.region)
    client = split.subset(partition.rows[cid])
    train = client.train
    torch.manual_seed(0)
    initial = build_model(cfg, log.num_items, log.item_features).shareable_state()
    pieces = cfg.privacy.physical_batch_size
    plan = plan_dp(PrivacyConfig(mode="dp-sgd", noise_multiplier=args.noise), num_users=len(train),
                   batch_size=cfg.train.batch_size, planned_epochs=1)

    def fresh() -> SASRec:
        model = build_model(cfg, log.num_items, log.item_features)
        model.load_shareable_state(initial)
        return model

    arms = {
        "plain-default": lambda m: local_train(m, train, cfg.train, epochs=1, seed=0)["seconds"],
        "plain-fp32": lambda m: local_train(m, train, replace(cfg.train, precision="fp32"), epochs=1,
                                            seed=0)["seconds"],
        "plain-fp32-unbucketed": lambda m: local_train(m, train, replace(cfg.train, precision="fp32",
                                                                         length_buckets=False),
                                                       epochs=1, seed=0)["seconds"],
        "dp-hooks": lambda m: dp_local_train(m, train, cfg.train, plan, epochs=1, grad_sample_mode="hooks",
                                             physical_batch_size=pieces)["seconds"],
        "dp-ew": lambda m: dp_local_train(m, train, cfg.train, plan, epochs=1, grad_sample_mode="ew",
                                          physical_batch_size=pieces)["seconds"],
        "dp-hooks-one-piece": lambda m: dp_local_train(m, train, cfg.train, plan, epochs=1, grad_sample_mode="hooks",
                                                       physical_batch_size=len(train))["seconds"],
    }
    times: dict[str, list[float]] = {k: [] for k in arms}
    peaks: dict[str, float] = {k: 0.0 for k in arms}
    for rep in range(args.reps):
        for name, run in arms.items():
            with PeakMemory(interval=0.2, children=False) as mem:
                seconds = run(fresh())
            times[name].append(seconds)
            peaks[name] = max(peaks[name], (mem.peak - mem.base) / 2 ** 30)
            print(f"rep {rep + 1}/{args.reps} {name:22s} {seconds:7.2f} s/epoch  +{peaks[name]:.2f} GB", flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "command": " ".join(sys.argv), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                    "cuda": torch.cuda.is_available()},
        "client": {"region": args.region, "users": len(train), "positions": int(sum(max(len(s) - 1, 0) for s in train))},
        "batch_size": cfg.train.batch_size, "dp": {"noise_multiplier": plan.noise_multiplier,
                                                   "sample_rate": plan.sample_rate,
                                                   "steps_per_epoch": plan.steps_per_epoch,
                                                   "max_grad_norm": plan.max_grad_norm},
        "epoch_seconds": times, "median_epoch_seconds": med,
        "ratio_vs_plain_fp32": {k: med[k] / med["plain-fp32"] for k in med},
        "ratio_vs_plain_default": {k: med[k] / med["plain-default"] for k in med},
        "peak_rss_increase_gb": peaks,
    }
    out = args.out or ROOT / "benchmarks" / "results" / f"dp-overhead-{args.dataset}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    for k in med:
        print(f"{k:22s} median {med[k]:7.2f} s/epoch  x{result['ratio_vs_plain_fp32'][k]:.2f} vs fp32  "
              f"x{result['ratio_vs_plain_default'][k]:.2f} vs default  peak +{peaks[k]:.2f} GB")
    print(f"-> {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
