"""Top-k recommendations for one history from a saved model.

    >>> rec = Recommender.from_checkpoint("runs/ml1m/model.pt")
    >>> rec.recommend(["1", "2", "3"], k=5)          # raw item ids, oldest first
    [Recommendation(item='1196', score=7.31, title='Star Wars ...'), ...]

Items already in the history are not recommended again unless ``exclude_history=False``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from core_model.data import Vocabulary
from core_model.model import SASRec
from core_model.train import load_checkpoint, select_device


@dataclass(frozen=True)
class Recommendation:
    item: str
    score: float
    title: str = ""


class Recommender:
    """A trained model plus the item vocabulary it was trained with."""

    def __init__(self, model: SASRec, items: Vocabulary, *, titles: Sequence[str] | None = None,
                 device: torch.device | str = "cpu") -> None:
        if len(items) != model.config.num_items:
            raise ValueError(f"vocabulary has {len(items)} items but the model scores "
                             f"{model.config.num_items}")
        self.model = model.to(device).eval()
        self.items = items
        self.titles = list(titles) if titles is not None else None
        self.device = torch.device(device)

    @classmethod
    def from_checkpoint(cls, path: str | Path, *, device: str = "auto") -> Recommender:
        dev = select_device(device)
        model, ckpt = load_checkpoint(path, dev)
        if "items" not in ckpt:
            raise ValueError(f"{path} has no item vocabulary; it cannot map recommendations to item ids")
        return cls(model, Vocabulary.from_dict(ckpt["items"]), titles=ckpt.get("item_titles"), device=dev)

    def encode_history(self, history: Sequence[str | int]) -> np.ndarray:
        """Raw item ids -> indices; an unknown id is a ValueError naming it and its position."""
        out = np.empty(len(history), dtype=np.int64)
        for pos, raw in enumerate(history):
            if raw not in self.items:
                raise ValueError(f"history item {raw!r} at position {pos} is not in the model's "
                                 f"catalogue of {len(self.items)} items")
            out[pos] = self.items.index(raw)
        return out

    @torch.no_grad()
    def recommend(self, history: Sequence[str | int], k: int = 10, *,
                  exclude_history: bool = True) -> list[Recommendation]:
        """The ``k`` best-scoring items to follow ``history`` (raw ids, oldest first)."""
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        idx = self.encode_history(history)
        if idx.size == 0:
            raise ValueError("history is empty; give at least one item id")
        inputs = torch.from_numpy(idx[-self.model.config.max_len:]).unsqueeze(0).to(self.device)  # (1, T)
        scores = self.model.score(inputs)[0].float()  # (V,) column i = item i + 1
        if exclude_history:
            scores[torch.from_numpy(idx - 1).to(self.device)] = float("-inf")
        k = min(k, int(torch.isfinite(scores).sum()))
        top = torch.topk(scores, k)
        out = []
        for score, col in zip(top.values.tolist(), top.indices.tolist()):
            title = self.titles[col + 1] if self.titles else ""
            out.append(Recommendation(item=self.items.raw(col + 1), score=float(score), title=title))
        return out
