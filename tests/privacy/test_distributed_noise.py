"""Distributed noise (privacy.noise_placement="distributed"): one client's step is linear in its
noisy clipped-gradient sum with the same factor at every client, and carries exactly its share
sigma / sqrt(t) of the noise; the server refuses sums with fewer than t clients; the settings are
checked."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from core_model.config import load_config
from core_model.model import SASRec
from core_model.train import SequenceBatches, TrainConfig
from privacy.dp import DPPlan, dp_local_train, noise_share
from server.server_app import distributed_noise_shortfall

from tiny_users import T, model, users  # tests/privacy/tiny_users.py

TRAIN = TrainConfig(lr=1.0, precision="fp32", device="cpu", length_buckets=False)  # big steps: float32 rounding of w + step stays far below them


def clipped_sum(m: SASRec, train: list[np.ndarray], clip: float) -> torch.Tensor:
    """Brute force: each user's gradient alone, clipped to ``clip`` (flat), summed."""
    batches = SequenceBatches(train, T)
    total = None
    for u in range(len(train)):
        m.zero_grad()
        inputs, targets = batches.batch(np.array([u]))
        _, loss = m(inputs, targets)
        loss.backward()
        g = torch.cat([p.grad.flatten() for p in m.parameters()])
        g = g * min(1.0, clip / (g.norm().item() + 1e-12))
        total = g if total is None else total + g
    return total


def flat(m: SASRec) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in m.parameters()])


def plan(n: int, noise: float, clip: float) -> DPPlan:
    return DPPlan(noise_multiplier=noise, sample_rate=1.0, steps_per_epoch=1, max_grad_norm=clip, delta=1e-5,
                  accountant="prv", num_users=n)


def test_noise_share_adds_up_to_the_whole_noise_in_variance():
    assert noise_share(2.0, 4) == pytest.approx(1.0)
    assert 4 * noise_share(1.3, 4) ** 2 == pytest.approx(1.3 ** 2)
    with pytest.raises(ValueError, match="min_clients must be an int >= 1, got 0"):
        noise_share(1.0, 0)
    with pytest.raises(ValueError, match="noise_multiplier must be > 0"):
        noise_share(0.0, 3)


@pytest.mark.parametrize("n", [5, 9])
def test_one_sgd_step_is_minus_lr_times_the_clipped_sum_over_n(n):
    """q = 1 (every user sampled), no noise: n * update = -lr * (sum of clipped per-user gradients),
    whatever n, so that clients of different sizes add up on the same scale."""
    train = users(n, seed=n)
    m = model()
    want = -TRAIN.lr * clipped_sum(model(), train, clip=0.05)
    before = flat(m)
    stats = dp_local_train(m, train, TRAIN, plan(n, 0.0, 0.05), epochs=1, max_steps=1, sgd=True)
    assert stats["steps"] == 1
    got = n * (flat(m) - before)
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-5)  # |want| up to ~3e-2


def test_the_step_carries_exactly_the_noise_share():
    n, clip, sigma, t = 6, 0.05, 2.0, 4
    train = users(n, seed=1)
    signal = -TRAIN.lr * clipped_sum(model(), train, clip=clip)
    m = model()
    before = flat(m)
    dp_local_train(m, train, TRAIN, plan(n, noise_share(sigma, t), clip), epochs=1, max_steps=1, sgd=True)
    noise = (n * (flat(m) - before) - signal) / (-TRAIN.lr * clip)  # in units of C: N(0, (sigma / sqrt t)^2)
    assert noise.numel() > 500  # 648 parameters: the std is estimated within ~3 %
    assert noise.std().item() == pytest.approx(sigma / math.sqrt(t), rel=0.1)  # not sigma, not sigma / t
    assert abs(noise.mean().item()) < 0.2  # 5 standard errors of the mean of 648 draws


def test_server_refuses_sums_with_too_few_clients_or_split_survivors():
    assert distributed_noise_shortfall(in_sum=4, components=1, min_clients=4) == ""
    assert distributed_noise_shortfall(in_sum=5, components=1, min_clients=4) == ""
    assert "only 3 clients' noise shares are in the sum, at least 4" in distributed_noise_shortfall(
        in_sum=3, components=1, min_clients=4)
    assert "split into 2 groups" in distributed_noise_shortfall(in_sum=6, components=2, min_clients=4)


@pytest.mark.parametrize("settings, match", [
    (['privacy.noise_placement="central"'], "privacy.noise_placement"),
    (['privacy.noise_placement="distributed"'], "unless mode='dp-sgd'"),
    (['privacy.mode="dp-sgd"', "privacy.noise_multiplier=1.0", 'privacy.noise_placement="distributed"',
      'privacy.secure_aggregation="off"'], "when secure aggregation is off"),
    (['privacy.mode="dp-sgd"', "privacy.noise_multiplier=1.0", 'privacy.noise_placement="distributed"',
      "federation.local_epochs=2"], "federation.local_epochs must be 1"),
    (["privacy.distributed_min_clients=-1"], "privacy.distributed_min_clients"),
    (['privacy.mode="dp-sgd"', "privacy.target_epsilon=8.0", 'privacy.noise_placement="distributed"'],
     "one noise_multiplier shared by every client"),
])
def test_distributed_noise_settings_are_checked(settings, match):
    with pytest.raises(ValueError, match=match):
        load_config(None, settings)
