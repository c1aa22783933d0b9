"""Ranking metrics for next-item prediction under leave-one-out.

Two protocols:

* **Full ranking** (default; Klenitskiy & Vasilev 2023): the target is ranked against every item of
  the catalogue. With ``exclude_history=True`` (default) the items already in the user's input
  history are removed from the ranking first, as a recommender would never show them again; a
  target that is itself in the history then counts as a miss (rank = catalogue size + 1).
* **Sampled-100** (the SASRec paper, Kang & McAuley 2018): the target is ranked against 100 items
  drawn uniformly from those not in the user's history (seeded, so the figures are repeatable).

Ties are broken by item index (the lower index ranks first), so integer-valued scorers such as
popularity get a deterministic rank. Ranks are 1-based.

Metrics from ranks ``r`` (one target per user, so Recall@k equals HR@k):
``HR@k = mean(r <= k)``, ``NDCG@k = mean(1[r <= k] / log2(r + 1))``, ``MRR = mean(1 / r)``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

Scorer = Callable[[torch.Tensor], torch.Tensor]
"""(B, T) left-padded histories -> (B, num_items) scores, column i scoring item i + 1."""


def metrics_from_ranks(ranks: np.ndarray, *, prefix: str = "") -> dict[str, float]:
    """HR@10, NDCG@10, Recall@20 and MRR from 1-based ranks."""
    r = np.asarray(ranks, dtype=np.float64)
    if r.size == 0:
        raise ValueError("metrics_from_ranks needs at least one rank, got none")
    if np.any(r < 1):
        raise ValueError(f"ranks must be >= 1, got min {r.min()}")
    hit10 = r <= 10
    return {
        f"{prefix}hr@10": float(hit10.mean()),
        f"{prefix}ndcg@10": float((hit10 / np.log2(r + 1.0)).mean()),
        f"{prefix}recall@20": float((r <= 20).mean()),
        f"{prefix}mrr": float((1.0 / r).mean()),
    }


def pad_histories(histories: Sequence[np.ndarray], max_len: int) -> torch.Tensor:
    """Left-pad the last ``max_len`` items of each history into a (B, T) int64 tensor."""
    T = min(max_len, max((len(h) for h in histories), default=1)) or 1
    out = np.zeros((len(histories), T), dtype=np.int64)
    for row, h in enumerate(histories):
        tail = np.asarray(h[-T:], dtype=np.int64)
        if tail.size:
            out[row, T - tail.size:] = tail
    return torch.from_numpy(out)


def _history_mask(histories: Sequence[np.ndarray], num_items: int) -> torch.Tensor:
    """(B, num_items) bool: item i + 1 is in the user's (full, uncut) history."""
    mask = torch.zeros(len(histories), num_items + 1, dtype=torch.bool)
    for row, h in enumerate(histories):
        mask[row, torch.as_tensor(np.asarray(h, dtype=np.int64))] = True
    return mask[:, 1:]


def rank_targets(
    scorer: Scorer,
    histories: Sequence[np.ndarray],
    targets: np.ndarray,
    *,
    num_items: int,
    max_len: int,
    exclude_history: bool = True,
    sampled_negatives: int | None = None,
    seed: int = 0,
    batch_size: int = 512,
    device: torch.device | str = "cpu",
) -> np.ndarray:
    """1-based rank of each target (full ranking, or among ``sampled_negatives`` negatives)."""
    if len(histories) != len(targets):
        raise ValueError(f"got {len(histories)} histories but {len(targets)} targets")
    targets = np.asarray(targets, dtype=np.int64)
    if targets.size and (targets.min() < 1 or targets.max() > num_items):
        raise ValueError(f"targets must be item indices in 1..{num_items}, got range "
                         f"{targets.min()}..{targets.max()}")
    gen = torch.Generator().manual_seed(seed)
    item_idx = torch.arange(num_items)
    ranks = np.empty(len(targets), dtype=np.int64)
    for start in range(0, len(targets), batch_size):
        hist = histories[start:start + batch_size]
        tgt = torch.as_tensor(targets[start:start + batch_size]) - 1  # (B,) column of the target
        scores = scorer(pad_histories(hist, max_len).to(device)).float().cpu()  # (B, V)
        seen = _history_mask(hist, num_items)  # (B, V)
        t_score = scores.gather(1, tgt[:, None])  # (B, 1)
        beats = (scores > t_score) | ((scores == t_score) & (item_idx[None, :] < tgt[:, None]))  # (B, V)
        if sampled_negatives is None:
            if exclude_history:
                beats &= ~seen
            r = beats.sum(dim=1) + 1  # (B,)
            if exclude_history:
                r = torch.where(seen.gather(1, tgt[:, None]).squeeze(1), num_items + 1, r)
        else:
            r = torch.empty(len(hist), dtype=torch.int64)
            for row in range(len(hist)):
                allowed = (~seen[row]).clone()
                allowed[tgt[row]] = False
                pool = allowed.nonzero().squeeze(1)
                if pool.numel() < sampled_negatives:
                    raise ValueError(f"user row {start + row} has only {pool.numel()} items outside its "
                                     f"history, fewer than sampled_negatives={sampled_negatives}")
                neg = pool[torch.randperm(pool.numel(), generator=gen)[:sampled_negatives]]
                r[row] = beats[row, neg].sum() + 1
        ranks[start:start + len(hist)] = r.numpy()
    return ranks


def evaluate_ranking(
    scorer: Scorer,
    histories: Sequence[np.ndarray],
    targets: np.ndarray,
    *,
    num_items: int,
    max_len: int,
    exclude_history: bool = True,
    sampled: bool = True,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> dict[str, float]:
    """Full-ranking metrics, plus the sampled-100 ones (prefixed ``sampled_``) when ``sampled``."""
    kwargs = dict(num_items=num_items, max_len=max_len, exclude_history=exclude_history,
                  seed=seed, device=device)
    out = metrics_from_ranks(rank_targets(scorer, histories, targets, **kwargs))
    if sampled:
        out.update(metrics_from_ranks(
            rank_targets(scorer, histories, targets, sampled_negatives=100, **kwargs),
            prefix="sampled_"))
    out["users"] = float(len(targets))
    return out


class Popularity:
    """Baseline: scores every item by its number of occurrences in the training sequences."""

    def __init__(self, train: Sequence[np.ndarray], num_items: int) -> None:
        counts = np.bincount(np.concatenate([np.asarray(s, dtype=np.int64) for s in train] or [[0]]),
                             minlength=num_items + 1)[: num_items + 1]
        self.counts = torch.as_tensor(counts[1:], dtype=torch.float32)  # (V,)

    def __call__(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.counts.expand(inputs.shape[0], -1)  # (B, V)
