"""Empirical privacy audit: the same federated run with and without DP-SGD, the same canary users.

    python benchmarks/empirical_audit.py --name ml1m-regions --dataset ml-1m --canaries 1000 \
        --epsilon 8 --set federation.partition=attribute --set federation.partition_attribute=region \
        --set federation.num_rounds=10 --set federation.local_epochs=1 --set train.batch_size=512 \
        --set train.lr=5e-2 --set model.d_model=32 --set model.max_len=50 --set eval.sampled=false

1. A DP-SGD run (``privacy.target_epsilon`` = ``--epsilon``, secure aggregation on) trained with
   ``--canaries`` canary users (``privacy.audit_canaries``; each included with probability 1/2).
2. The same configuration without DP, trained with the *same* canaries and inclusion bits
   (``privacy.audit_canary_file`` of the first run), so that the two bounds differ only by DP.
3. ``fedrec audit RUN --empirical`` on both (``privacy.audit.audit_run``), at the DP run's delta:
   the DP run's lower bound must not exceed its claimed epsilon; the run without DP shows what the
   same attack finds when nothing protects the canaries.

Writes ``benchmarks/results/empirical-audit-<name>.json`` and, with ``--report DIR``, the DP run's
full audit report (Markdown, JSON, PNGs) into ``DIR/dp`` and the other into ``DIR/no-dp``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from federated import data_settings  # noqa: E402  (benchmarks/federated.py, this script's folder)
from privacy_utility import DATASETS  # noqa: E402
from core_model.config import load_config  # noqa: E402
from privacy.audit import audit_run  # noqa: E402
from privacy.audit_report import write_report  # noqa: E402
from simulations.runner import simulate  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--name", required=True)
    parser.add_argument("--dataset", choices=sorted(DATASETS), default="synthetic")
    parser.add_argument("--data-root", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--canaries", type=int, default=1000)
    parser.add_argument("--canary-length", type=int, default=20)
    parser.add_argument("--epsilon", type=float, default=8.0, help="target epsilon of the DP run")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--runs", type=Path, default=Path("runs"), help="where the run directories go (relative: to the working directory)")
    parser.add_argument("--report", type=Path, help="write both audit reports under this folder")
    args = parser.parse_args()

    data = data_settings(*DATASETS[args.dataset], args.data_root)
    if data is None:
        return 2
    common = data + list(args.overrides) + [f"privacy.audit_canaries={args.canaries}",
                                            f"privacy.audit_canary_length={args.canary_length}"]
    stamp = time.strftime("%Y%m%d-%H%M%S")
    dp_run = args.runs / f"empirical-audit-{args.name}-{stamp}" / "dp"
    nodp_run = dp_run.parent / "no-dp"
    out: dict = {"name": args.name, "dataset": args.dataset, "settings": common, "epsilon_target": args.epsilon,
                 "date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv)}
    for label, run, extra in (
            ("dp", dp_run, ['privacy.mode="dp-sgd"', f"privacy.target_epsilon={args.epsilon}"]),
            ("no-dp", nodp_run, [f'privacy.audit_canary_file="{(dp_run / "canaries.json").resolve()}"'])):
        t0 = time.perf_counter()
        results = simulate(load_config(None, common + extra), run)
        wall = time.perf_counter() - t0
        delta = out["dp"]["audit"]["delta"] if label == "no-dp" else None
        report = audit_run(run, empirical=True, empirical_delta=delta)
        if args.report:
            write_report(report, args.report / label)
        e = dict(report.empirical)
        e.pop("scores")
        out[label] = {"run": str(run), "wall_seconds": wall, "test": results["test"],
                      "federation": report.federation, "audit_ok": report.ok, "audit": e}
        print(f"{label}: NDCG@10 {results['test']['ndcg@10']:.4f}; claimed epsilon {e['claimed_epsilon']}; "
              f"canary AUC {e['auc']:.3f}; lower bound {e['epsilon_lower_bound']:.3f} at delta {e['delta']:.3g} "
              f"({wall / 60:.1f} min)", flush=True)
    path = ROOT / "benchmarks" / "results" / f"empirical-audit-{args.name}.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
