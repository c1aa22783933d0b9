"""Tiny users and a tiny SASRec for the DP-SGD tests (test_dp.py, test_distributed_noise.py)."""

from __future__ import annotations

import numpy as np
import torch

from core_model.model import ModelConfig, SASRec

V, T = 12, 8


def users(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(1, V + 1, int(rng.integers(3, T + 2))) for _ in range(n)]


def model(**overrides) -> SASRec:
    torch.manual_seed(0)
    return SASRec(ModelConfig(num_items=V, max_len=T, d_model=8, num_blocks=1, dropout=0.0, **overrides))
