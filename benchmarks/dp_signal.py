"""How much signal one user's clipped gradient carries, by how much of the history it sees.

    python benchmarks/dp_signal.py --run-dir /tmp/x4/q2 --users 1000 --lengths 12 25 50

DP-SGD adds noise of a fixed size to the sum of the clipped per-user gradients, so what a step
learns is the mean of those clipped gradients over users: its norm per user, ``|E[clip(g_u)]|``,
is the signal side of the signal-to-noise ratio. Training on more of each user's history (a
larger ``model.max_len``) costs compute but may average out the position-to-position noise in a
user's own gradient and so raise that mean. This script measures it: for ``--users`` random users
(seed 0) of the run's data it computes each user's whole-history gradient (all parameters,
dropout on, as in training) with the history cut to its last ``L`` items for each ``--lengths``
``L``, clips it to ``privacy.max_grad_norm`` and prints the unbiased estimate of
``|E[clip(g_u)]|`` (from ``|sum c_u|^2 - sum |c_u|^2`` over pairs of distinct users, so that
``N`` random unit vectors do not read as ``1 / sqrt(N)``), at the run's trained model and at a
fresh initialisation of the same configuration. Lengths above the model's ``max_len`` are skipped.

``--windows`` also measures, at the model's ``max_len``, the two ways to use the rest of a long
history (``SequenceBatches(windows=True)`` cuts it into windows of ``max_len``): ``random``, one
window per user drawn in proportion to its positions (``train.long_histories="random"``), whose
expected clipped gradient ``sum_w p_w clip(g_w)`` is computed exactly over the user's windows; and
``whole``, the gradient of the user's mean loss over all positions (every window) clipped once.

    python benchmarks/dp_signal.py --run-dir /tmp/s13/len75/eps-8 --users 300 --lengths 75 --windows
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dp_grad_norms import load_run_sample  # noqa: E402  (benchmarks/dp_grad_norms.py, this script's folder)
from core_model.model import SASRec  # noqa: E402
from core_model.train import SequenceBatches  # noqa: E402


def mean_clipped_norm(model: SASRec, histories: list[np.ndarray], length: int, clip: float) -> tuple[float, float]:
    """(unbiased |E[clip(g_u)]|, median raw gradient norm) over ``histories`` cut to ``length``."""
    model.train()
    model.packed = False
    batches = SequenceBatches([h[-(length + 1):] for h in histories], length)
    params = [p for p in model.parameters() if p.requires_grad]
    total = [torch.zeros_like(p) for p in params]
    sq, raw = 0.0, []
    for i in range(len(histories)):
        inputs, targets = batches.batch(np.array([i]))
        model.zero_grad()
        _, loss = model(inputs, targets)
        loss.backward()
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        norm = float(torch.sqrt(sum((g ** 2).sum() for g in grads)))
        raw.append(norm)
        scale = min(1.0, clip / max(norm, 1e-12))
        for t, g in zip(total, grads):
            t.add_(g, alpha=scale)
        sq += (norm * scale) ** 2
    n = len(histories)
    pairs = float(sum((t ** 2).sum() for t in total)) - sq
    return float(np.sqrt(max(pairs, 0.0) / (n * (n - 1)))), float(np.median(raw))


def window_signal(model: SASRec, histories: list[np.ndarray], clip: float, how: str) -> float:
    """Unbiased |E[c_u]| over ``histories`` where ``c_u`` is a user's expected clipped contribution:
    ``how="random"``: sum over windows w of p_w clip(g_w), p_w = positions of w / the user's positions;
    ``how="whole"``: clip(sum_w p_w g_w), the gradient of the mean loss over every position."""
    model.train()
    model.packed = False
    params = [p for p in model.parameters() if p.requires_grad]
    total = [torch.zeros_like(p) for p in params]
    sq = 0.0
    for h in histories:
        b = SequenceBatches([h], model.config.max_len, windows=True)
        weights = b.lengths / max(int(b.lengths.sum()), 1)
        contribution = [torch.zeros_like(p) for p in params]
        model.zero_grad()
        for row in range(len(b)):
            inputs, targets = b.batch(np.array([row]))
            _, loss = model(inputs, targets)
            if how == "whole":  # accumulate the weighted window gradients, clip once below
                (loss * float(weights[row])).backward()
                continue
            model.zero_grad()
            loss.backward()
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
            norm = float(torch.sqrt(sum((g ** 2).sum() for g in grads)))
            for c, g in zip(contribution, grads):
                c.add_(g, alpha=float(weights[row]) * min(1.0, clip / max(norm, 1e-12)))
        if how == "whole":
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
            norm = float(torch.sqrt(sum((g ** 2).sum() for g in grads)))
            contribution = [g * min(1.0, clip / max(norm, 1e-12)) for g in grads]
        for t, c in zip(total, contribution):
            t.add_(c)
        sq += float(sum((c ** 2).sum() for c in contribution))
    n = len(histories)
    pairs = float(sum((t ** 2).sum() for t in total)) - sq
    return float(np.sqrt(max(pairs, 0.0) / (n * (n - 1))))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-dir", type=Path, required=True)
    parser.add_argument("--users", type=int, default=1000)
    parser.add_argument("--lengths", type=int, nargs="+", default=[12, 25, 50])
    parser.add_argument("--windows", action="store_true",
                        help="also one random window per user and the whole-history gradient, at max_len")
    args = parser.parse_args()
    torch.set_num_threads(1)
    cfg, trained, fresh, histories = load_run_sample(args.run_dir, args.users)
    clip = cfg.privacy.max_grad_norm
    long_enough = {L: float(np.mean([len(h) - 1 >= L for h in histories])) for L in args.lengths}
    print(f"{len(histories)} users; clip {clip:g}; share of them with at least L training positions: "
          + ", ".join(f"L={L}: {v:.0%}" for L, v in long_enough.items()))
    for name, model in (("initialisation", fresh), ("trained", trained)):
        for L in args.lengths:
            if L > model.config.max_len:
                print(f"{name}: L={L} skipped (model.max_len {model.config.max_len})")
                continue
            torch.manual_seed(1)
            signal, median = mean_clipped_norm(model, histories, L, clip)
            print(f"{name}: L={L}: |E[clip(g_u)]| = {signal:.4f} (per unit clip: {signal / clip:.4f}); "
                  f"median raw norm {median:.3f}", flush=True)
        if args.windows:
            for how in ("random", "whole"):
                torch.manual_seed(1)
                signal = window_signal(model, histories, clip, how)
                print(f"{name}: windows of {model.config.max_len}, {how}: |E[c_u]| = {signal:.4f} "
                      f"(per unit clip: {signal / clip:.4f})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
