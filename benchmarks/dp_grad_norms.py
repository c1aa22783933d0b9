"""Per-user gradient norms (what DP-SGD clips) at initialisation and at a run's final model.

    python benchmarks/dp_grad_norms.py --run-dir /tmp/x4/q2 --users 200

Reads the run's ``config.json`` and ``model.pt`` (a ``fedrec simulate`` or ``benchmarks/federated.py``
run directory), draws ``--users`` random users of the run's data (seed 0) and prints the 10th, 50th
and 90th percentiles of their whole-history gradient norms (each user's own loss, all parameters,
dropout on as in training) for a freshly initialised model of the same configuration and for the
trained one, and the fraction above ``privacy.max_grad_norm``. A clip far above the typical norm
adds noise for nothing; far below it, every user's gradient is normalised.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from core_model.model import SASRec  # noqa: E402
from core_model.train import SequenceBatches, load_checkpoint  # noqa: E402
from simulations.clients import load_federation  # noqa: E402
from simulations.runner import load_run_config  # noqa: E402


def norms(model: SASRec, batches: SequenceBatches) -> np.ndarray:
    model.train()
    model.packed = False
    out = []
    for i in range(len(batches.lengths)):
        inputs, targets = batches.batch(np.array([i]))
        model.zero_grad()
        _, loss = model(inputs, targets)
        loss.backward()
        out.append(float(torch.sqrt(sum((p.grad ** 2).sum() for p in model.parameters() if p.grad is not None))))
    return np.array(out)


def load_run_sample(run_dir: Path, users: int) -> tuple[Any, SASRec, SASRec, list[np.ndarray]]:
    """A run's config, its trained ``model.pt``, a fresh model of the same configuration (seed 0,
    the same public catalogue features) and ``users`` random users' training histories (seed 0)."""
    cfg = load_run_config(run_dir)
    trained, _ = load_checkpoint(run_dir / "model.pt")
    _, split, _ = load_federation(cfg)
    rows = np.random.default_rng(0).choice(len(split.train), min(users, len(split.train)), replace=False)
    torch.manual_seed(0)
    fresh = SASRec(trained.config)
    if trained.feat_in is not None:  # the same public catalogue features
        fresh.set_item_features(trained.item_feature_matrix)
    return cfg, trained, fresh, [np.asarray(split.train[r]) for r in rows]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-dir", type=Path, required=True)
    parser.add_argument("--users", type=int, default=200)
    args = parser.parse_args()
    torch.set_num_threads(1)
    cfg, trained, fresh, histories = load_run_sample(args.run_dir, args.users)
    batches = SequenceBatches(histories, trained.config.max_len)
    clip = cfg.privacy.max_grad_norm
    for name, model in (("initialisation", fresh), ("trained", trained)):
        g = norms(model, batches)
        p10, p50, p90 = np.percentile(g, [10, 50, 90])
        print(f"{name}: per-user gradient norm p10 {p10:.3f}, median {p50:.3f}, p90 {p90:.3f}; "
              f"{np.mean(g > clip):.0%} above the clip {clip:g} ({len(g)} users)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
