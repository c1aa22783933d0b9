"""Centralized SASRec benchmark: accuracy, time to accuracy, throughput, memory; popularity baseline.

    python benchmarks/centralized.py --dataset ml-1m   [--set train.lr=2e-3 ...] [--out FILE.json]
    python benchmarks/centralized.py --dataset ml-100k
    python benchmarks/centralized.py --dataset twitch

Reads the real data from ``../shared/data`` (``--data-root`` to change), trains the *default*
configuration of ``fedrec train`` (plus any ``--set`` overrides, which are recorded), selects the
best epoch on the validation targets, and reports leave-one-out test metrics (full ranking,
history excluded; and the SASRec paper's sampled-100 protocol). At every validation it also
records the test NDCG@10 and the wall time since the start of the script, so the time to reach a
given test NDCG@10 can be read off (the model is still selected on validation only).
Throughput is the median over epochs of training user sequences per second; peak memory is the
process' maximum resident set size.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from core_model.config import load_config  # noqa: E402
from core_model.evaluate import Popularity, evaluate_ranking  # noqa: E402
from core_model.features import build_model  # noqa: E402
from core_model.pipeline import load_log, split_log  # noqa: E402
from core_model.train import evaluate_model, fit, select_device  # noqa: E402

DATASETS = {
    "ml-1m": ("sasrec", "ml-1m/sasrec_ml-1m.txt.gz"),
    "ml-100k": ("ml-100k", "ml-100k"),
    "twitch": ("twitch", "twitch/twitch105k.csv.gz"),
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", choices=sorted(DATASETS), required=True)
    parser.add_argument("--data-root", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--out", type=Path, help="JSON results file (default benchmarks/results/<dataset>.json)")
    parser.add_argument("--run-dir", type=Path, help="where to keep metrics.jsonl and model.pt")
    args = parser.parse_args()

    start = time.perf_counter()
    kind, rel = DATASETS[args.dataset]
    path = args.data_root / rel
    if not path.exists():
        print(f"data {path} is absent; pass --data-root", file=sys.stderr)
        return 2
    cfg = load_config(None, [f'data.kind="{kind}"', f'data.path="{path}"', *args.overrides])
    log = load_log(cfg.data)
    split = split_log(log, cfg.data)
    device = select_device(cfg.train.device)
    model = build_model(cfg, log.num_items, log.item_features)
    run_dir = args.run_dir or ROOT / "runs" / f"bench-{args.dataset}"
    curve: list[dict] = []

    def on_evaluate(evaluated) -> dict:  # the test curve, of the model validation saw (the average with train.ema)
        test = evaluate_model(evaluated, split, which="test", sampled=False, device=device)
        return {"test_ndcg@10": test["ndcg@10"], "test_hr@10": test["hr@10"]}

    def on_epoch(record: dict) -> None:
        line = {k: record[k] for k in ("epoch", "train_loss", "epoch_seconds", "train_minutes")}
        if "valid_ndcg@10" in record:
            line.update({k: record[k] for k in ("valid_ndcg@10", "valid_hr@10", "test_ndcg@10", "test_hr@10")})
        line["wall_minutes"] = (time.perf_counter() - start) / 60
        line["users_per_second"] = record["users_per_second"]
        curve.append(line)
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in line.items()}), flush=True)

    result = fit(model, split, cfg.train, run_dir=run_dir, on_epoch=on_epoch, on_evaluate=on_evaluate,
                 checkpoint_extra={"items": log.items.to_dict(), "data_config": cfg.to_dict()["data"],
                                   "item_titles": log.item_features.get("title")})
    wall = (time.perf_counter() - start) / 60
    test = evaluate_model(model, split, which="test", device=device)
    pop_model = Popularity(split.train, split.num_items)
    pop = evaluate_ranking(pop_model, split.test_inputs(), split.test_targets, num_items=split.num_items,
                           max_len=model.config.max_len)
    out = {
        "dataset": args.dataset, "data": log.summary(), "users_evaluated": len(split),
        "config": cfg.to_dict(), "overrides": args.overrides,
        "protocol": "leave-one-out; full ranking over the catalogue with the user's history excluded; "
                    "sampled_* = target vs 100 uniform negatives not in the history",
        "test": test, "popularity_test": pop,
        "best_valid": result["best"], "epochs_run": result["epochs_run"], "stop_reason": result["stop_reason"],
        "train_minutes": result["train_seconds"] / 60, "wall_minutes_total": wall,
        "median_users_per_second": statistics.median(c["users_per_second"] for c in curve),
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2,
        "parameters": result["parameters"], "positions_per_epoch": result["positions_per_epoch"],
        "curve": curve,
        "machine": {"device": str(device), "torch": torch.__version__, "threads": torch.get_num_threads(),
                    "cpu": platform.processor() or platform.machine(), "python": platform.python_version()},
        "date": time.strftime("%Y-%m-%d"),
    }
    if args.dataset == "twitch":  # rewatching is the norm on Twitch: report with history included too
        out["test_history_included"] = evaluate_model(model, split, which="test", exclude_history=False,
                                                      device=device)
        out["popularity_test_history_included"] = evaluate_ranking(
            pop_model, split.test_inputs(), split.test_targets, num_items=split.num_items,
            max_len=model.config.max_len, exclude_history=False)
    target = args.out or ROOT / "benchmarks" / "results" / f"centralized-{args.dataset}.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(out, indent=2) + "\n")
    print(f"{args.dataset}: test NDCG@10 {test['ndcg@10']:.4f} HR@10 {test['hr@10']:.4f} "
          f"(sampled-100 NDCG@10 {test['sampled_ndcg@10']:.4f} HR@10 {test['sampled_hr@10']:.4f}); "
          f"popularity NDCG@10 {pop['ndcg@10']:.4f} HR@10 {pop['hr@10']:.4f}; "
          f"{result['epochs_run']} epochs, {result['train_seconds'] / 60:.1f} min training, {wall:.1f} min total; "
          f"{out['median_users_per_second']:.0f} users/s; peak RSS {out['peak_rss_gb']:.2f} GB -> {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
