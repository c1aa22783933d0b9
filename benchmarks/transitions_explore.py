"""The transition table on its own, before it was a model option: which window and recency to count,
and whether a low-rank truncation of the noisy table removes noise (validation targets).

    python benchmarks/transitions_explore.py --run-dir RUN [--sigma 0.556] [--seed 1]

``RUN`` is any finished ML-1M simulation (only its ``config.json`` is read: the data, the partition
and the leave-one-out split). For windows 3 (pair weight 0.6 per step) and 5 (0.8) the table of
every user's clipped transition counts (``privacy/transitions.py``) gets Gaussian noise of standard
deviation ``--sigma`` (0.556: the Gaussian mechanism alone at epsilon 8, delta 6.8e-5, the ML-1M
regions' smallest delta), and is scored from the last 10 items (recency 0.8) or the last 20 (0.9):
the noisy table as is, the noiseless one, and the noisy one truncated to rank 32 / 64 / 128 / 256.
Prints validation NDCG@10 (leave-one-out, full ranking, history excluded).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from core_model.config import build_config  # noqa: E402
from core_model.evaluate import evaluate_ranking  # noqa: E402
from privacy.transitions import client_transitions, finish_table  # noqa: E402
from simulations.clients import load_federation  # noqa: E402


class Scorer:
    def __init__(self, table: torch.Tensor, last: int, recency: float) -> None:
        self.table, self.last, self.recency = table, last, recency

    def __call__(self, inputs: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(inputs.shape[0], self.table.shape[0])
        for j in range(min(self.last, inputs.shape[1])):
            out += self.recency ** j * self.table[inputs[:, -1 - j]]
        return out[:, 1:]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-dir", type=Path, required=True)
    parser.add_argument("--sigma", type=float, default=0.556)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    cfg = build_config(json.loads((args.run_dir / "config.json").read_text()))
    _, split, _ = load_federation(cfg)
    gen = torch.Generator().manual_seed(args.seed)

    def ndcg(table: torch.Tensor, last: int, recency: float) -> float:
        return evaluate_ranking(Scorer(table, last, recency), split.valid_inputs(), split.valid_targets,
                                num_items=split.num_items, max_len=75, exclude_history=True, sampled=False)["ndcg@10"]

    for window, decay in ((3, 0.6), (5, 0.8)):
        clean = finish_table(client_transitions(split.train, split.num_items, window=window, decay=decay))
        noisy = finish_table(clean + torch.randn(clean.shape, generator=gen) * args.sigma)
        t0 = time.perf_counter()
        u, s, vh = torch.linalg.svd(noisy)
        print(f"window {window} / decay {decay}: top singular values {[round(x, 1) for x in s[:3].tolist()]}, "
              f"noise edge ~{2 * args.sigma * math.sqrt(split.num_items):.1f} (svd {time.perf_counter() - t0:.0f} s)",
              flush=True)
        for last, recency in ((10, 0.8), (20, 0.9)):
            res = {"noisy": ndcg(noisy, last, recency), "noiseless": ndcg(clean, last, recency)}
            for rank in (32, 64, 128, 256):
                res[f"rank {rank}"] = ndcg((u[:, :rank] * s[:rank]) @ vh[:rank], last, recency)
            print(f"  last {last} items, recency {recency}: " + ", ".join(f"{k} {v:.4f}" for k, v in res.items()),
                  flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
