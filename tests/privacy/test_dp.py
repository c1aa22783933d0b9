"""User-level DP-SGD local training (privacy/dp.py) with real Opacus on a tiny SASRec."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from core_model.config import PrivacyConfig
from core_model.train import TrainConfig, local_train
from privacy.accounting import PrivacyAccountant
from privacy.dp import dp_local_train, plan_dp, shared_noise_multiplier

from tiny_users import model, users  # tests/privacy/tiny_users.py

TRAIN = TrainConfig(lr=0.01, precision="fp32", device="cpu", length_buckets=False)


def test_plan_rate_steps_delta_and_calibrated_noise():
    p = plan_dp(PrivacyConfig(mode="dp-sgd", noise_multiplier=1.1), num_users=600, batch_size=64, planned_epochs=3)
    assert p.steps_per_epoch == 10 and p.sample_rate == pytest.approx(0.1)
    assert p.delta == pytest.approx(1 / 6000) and p.noise_multiplier == 1.1
    target = PrivacyConfig(mode="dp-sgd", target_epsilon=4.0, delta=1e-4)
    p = plan_dp(target, num_users=600, batch_size=64, planned_epochs=20)
    acc = PrivacyAccountant()
    acc.add(noise_multiplier=p.noise_multiplier, sample_rate=p.sample_rate, steps=20 * p.steps_per_epoch)
    assert 3.9 < acc.epsilon(1e-4) <= 4.0 + 1e-6  # the whole horizon spends the target, not one round
    longer = plan_dp(target, num_users=600, batch_size=64, planned_epochs=40)
    assert longer.noise_multiplier > p.noise_multiplier
    for kwargs, name in [(dict(num_users=0, batch_size=8, planned_epochs=1), "num_users"),
                         (dict(num_users=10, batch_size=0, planned_epochs=1), "batch_size"),
                         (dict(num_users=10, batch_size=8, planned_epochs=0), "planned_epochs")]:
        with pytest.raises(ValueError, match=name):
            plan_dp(target, **kwargs)


def test_one_sample_rate_for_every_client():
    cfg = PrivacyConfig(mode="dp-sgd", noise_multiplier=1.0, sample_rate=0.5)
    for n in (306, 1468, 7):  # the batch size no longer matters: q = 1/2 everywhere
        p = plan_dp(cfg, num_users=n, batch_size=256, planned_epochs=1)
        assert p.sample_rate == 0.5 and p.steps_per_epoch == 2
    third = plan_dp(replace(cfg, sample_rate=1 / 3), num_users=10, batch_size=1, planned_epochs=1)
    assert third.steps_per_epoch == 3 and third.sample_rate == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match=r"sample_rate=1/3 needs at least 3 users at a client .* has 2"):
        plan_dp(replace(cfg, sample_rate=1 / 3), num_users=2, batch_size=1, planned_epochs=1)
    for bad in (0.3, 1.5, -0.5):
        with pytest.raises(ValueError, match=rf"privacy.sample_rate must be 0 .* or 1/k .*, got {bad}"):
            PrivacyConfig(sample_rate=bad)


def test_a_sample_rate_that_does_not_divide_the_users_takes_exactly_k_steps_per_epoch():
    # Opacus samples at 1 / len(loader), so the loader must have exactly k batches; batches of
    # ceil(n / k) users would give only 3 for 5 users at k = 4
    for n, k in ((7, 3), (5, 4), (9, 4)):
        plan = plan_dp(PrivacyConfig(mode="dp-sgd", noise_multiplier=1.0, sample_rate=1 / k), num_users=n,
                       batch_size=1, planned_epochs=1)
        stats = dp_local_train(model(), users(n), TRAIN, plan, epochs=2)
        assert stats["steps"] == 2 * k


def test_shared_noise_multiplier_is_the_largest_client_calibration():
    cfg = PrivacyConfig(mode="dp-sgd", noise_multiplier=1.0)
    sizes = [306, 1468]
    sigma = shared_noise_multiplier(cfg, client_sizes=sizes, batch_size=256, target_epsilon=8.0, steps=150)
    spent = []
    for n in sizes:  # every client at its own q = 1 / ceil(n / 256) and delta = 1 / (10 n)
        acc = PrivacyAccountant()
        acc.add(noise_multiplier=sigma, sample_rate=1 / -(-n // 256), steps=150)
        spent.append(acc.epsilon(1 / (10 * n)))
    assert max(spent) == pytest.approx(8.0, abs=0.01) and spent[0] == max(spent)  # q = 1/2 is the worst
    # one rate for all: now the largest client (smallest delta) is the one that spends the target
    same_q = shared_noise_multiplier(replace(cfg, sample_rate=0.5), client_sizes=sizes, batch_size=256,
                                     target_epsilon=8.0, steps=150)
    assert same_q > sigma
    with pytest.raises(ValueError, match="client_sizes is empty"):
        shared_noise_multiplier(cfg, client_sizes=[], batch_size=256, target_epsilon=8.0, steps=150)


def test_sample_rate_for_epsilon_lets_every_client_spend_the_whole_budget():
    # distributed noise: one multiplier (set by the largest client at q = 1/2), each client's own rate
    sizes, steps = (306, 662, 1468), 150
    base = PrivacyConfig(mode="dp-sgd", noise_multiplier=1.0, noise_placement="distributed", sample_rate=0.5)
    sigma = shared_noise_multiplier(base, client_sizes=sizes, batch_size=256, target_epsilon=8.0, steps=steps)
    cfg = replace(base, noise_multiplier=sigma, sample_rate=0.0, sample_rate_for_epsilon=8.0)
    plans = [plan_dp(cfg, num_users=n, batch_size=256, planned_epochs=1, planned_steps=steps) for n in sizes]
    for p in plans:
        acc = PrivacyAccountant()
        acc.add(noise_multiplier=p.noise_multiplier, sample_rate=p.sample_rate, steps=steps)
        assert 8.0 - 0.01 <= acc.epsilon(p.delta) <= 8.0  # every client, not only the largest
        assert p.noise_multiplier == sigma and p.steps_per_epoch == -(-1 // p.sample_rate)
    rates = [p.sample_rate for p in plans]
    assert rates[0] > rates[1] > rates[2] == pytest.approx(0.5, abs=0.005)  # larger delta, higher rate
    with pytest.raises(ValueError, match="privacy.sample_rate_for_epsilon needs the planned steps"):
        plan_dp(cfg, num_users=306, batch_size=256, planned_epochs=1)
    with pytest.raises(ValueError, match=r"gives this client of 3 users the rate .*, an expected batch below one user"):
        plan_dp(replace(cfg, sample_rate_for_epsilon=0.5), num_users=3, batch_size=256, planned_epochs=1,
                planned_steps=steps)
    for bad, needle in [(dict(noise_placement="local"), "0 unless privacy.noise_placement='distributed'"),
                        (dict(sample_rate=0.5), "and privacy.sample_rate=0"),
                        (dict(sample_rate_for_epsilon=-1.0), "a finite number >= 0")]:
        with pytest.raises(ValueError, match=r"privacy.sample_rate_for_epsilon must be .*" + needle.replace("(", r"\(")):
            replace(cfg, **bad)


def test_dp_training_samples_users_at_the_plan_rate_not_one_over_the_batches():
    # q = 0.3 is no 1/k: the loader has ceil(1/q) = 4 batches an epoch, but each user is in each with p = 0.3
    n, epochs = 50, 10
    plan = plan_dp(PrivacyConfig(mode="dp-sgd", noise_multiplier=1.0), num_users=n, batch_size=n, planned_epochs=1)
    plan = replace(plan, sample_rate=0.3, steps_per_epoch=4)
    stats = dp_local_train(model(), users(n), TRAIN, plan, epochs=epochs)
    assert stats["steps"] == 40
    expected, sd = 40 * n * 0.3, (40 * n * 0.3 * 0.7) ** 0.5  # 600 +- 20.5; 1/k = 1/4 would give 500
    assert abs(stats["users_sampled"] - expected) < 4 * sd


def test_privacy_config_errors():
    with pytest.raises(ValueError, match="privacy.noise_multiplier must be > 0 with target_epsilon = 0"):
        PrivacyConfig(mode="dp-sgd")
    with pytest.raises(ValueError, match="exactly one"):
        PrivacyConfig(mode="dp-sgd", noise_multiplier=1.0, target_epsilon=2.0)
    with pytest.raises(ValueError, match="privacy.mode"):
        PrivacyConfig(mode="dp")
    with pytest.raises(ValueError, match="privacy.max_grad_norm"):
        PrivacyConfig(max_grad_norm=0.0)


def test_zero_noise_and_a_huge_clip_equal_plain_training():
    data = users(10)
    plain, private = model(), model()
    # q = 1: every user is in every step, so both take the same full-batch steps
    local_train(plain, data, replace(TRAIN, batch_size=10), epochs=4, seed=0)
    plan = plan_dp(PrivacyConfig(mode="dp-sgd", noise_multiplier=1.0, max_grad_norm=1e6), num_users=10,
                   batch_size=10, planned_epochs=4)
    plan = replace(plan, noise_multiplier=0.0)
    stats = dp_local_train(private, data, TRAIN, plan, epochs=4)
    assert stats["steps"] == 4 and stats["users_sampled"] == 40
    a, b = plain.shareable_state(), private.shareable_state()
    assert set(a) == set(b) and not any("_module" in k for k in b)
    moved = max((plain.shareable_state()[k] - model().shareable_state()[k]).abs().max().item() for k in a)
    assert moved > 1e-3  # training did move the weights
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5, rtol=1e-4), k


def test_noise_and_clipping_change_the_update():
    data = users(10)
    plain, private = model(), model()
    local_train(plain, data, replace(TRAIN, batch_size=10), epochs=2, seed=0)
    plan = plan_dp(PrivacyConfig(mode="dp-sgd", noise_multiplier=1.0, max_grad_norm=0.1), num_users=10,
                   batch_size=10, planned_epochs=2)
    dp_local_train(private, data, TRAIN, plan, epochs=2)
    a, b = plain.shareable_state(), private.shareable_state()
    assert max((a[k] - b[k]).abs().max().item() for k in a) > 1e-3


@pytest.mark.parametrize("embedding_clip_share", [0.0, 0.5])  # flat and group clipping
def test_empty_poisson_batches_take_noise_only_steps_and_are_counted(embedding_clip_share):
    data = users(3)
    plan = plan_dp(PrivacyConfig(mode="dp-sgd", noise_multiplier=1.0, embedding_clip_share=embedding_clip_share),
                   num_users=3, batch_size=1, planned_epochs=10)
    assert plan.steps_per_epoch == 3 and plan.sample_rate == pytest.approx(1 / 3)
    m = model()
    stats = dp_local_train(m, data, TRAIN, plan, epochs=10)
    # 30 steps of Poisson(1/3) sampling over 3 users: P(no empty batch) = (8/27)^30, about 1e-16
    assert stats["steps"] == 30 and stats["users_sampled"] < 90
    assert all(torch.isfinite(v).all() for v in m.shareable_state().values())
    assert m.packed  # restored for evaluation and serving


def test_the_plan_must_match_the_data():
    plan = plan_dp(PrivacyConfig(mode="dp-sgd", noise_multiplier=1.0), num_users=5, batch_size=2, planned_epochs=1)
    with pytest.raises(ValueError, match="plan is for 5 users, the data has 4"):
        dp_local_train(model(), users(4), TRAIN, plan, epochs=1)


def test_pieces_of_a_poisson_batch_give_the_same_step_as_one_piece():
    # q = 1 (every user in every step), no noise, a clip small enough to bind: the clipped per-user
    # gradients summed over pieces of 3 users must equal those of the whole batch at once
    data = users(10)
    plan = plan_dp(PrivacyConfig(mode="dp-sgd", noise_multiplier=1.0, max_grad_norm=0.05), num_users=10,
                   batch_size=10, planned_epochs=3)
    plan = replace(plan, noise_multiplier=0.0)
    whole, pieces = model(), model()
    a_stats = dp_local_train(whole, data, TRAIN, plan, epochs=3, physical_batch_size=100)
    b_stats = dp_local_train(pieces, data, TRAIN, plan, epochs=3, physical_batch_size=3)
    assert a_stats["steps"] == b_stats["steps"] == 3 and b_stats["users_sampled"] == 30
    assert b_stats["loss"] == pytest.approx(a_stats["loss"], rel=1e-4)
    a, b = whole.shareable_state(), pieces.shareable_state()
    assert max((a[k] - model().shareable_state()[k]).abs().max().item() for k in a) > 1e-3
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6, rtol=1e-5), k
    with pytest.raises(ValueError, match="physical_batch_size must be >= 1, got 0"):
        dp_local_train(model(), data, TRAIN, plan, epochs=1, physical_batch_size=0)
    with pytest.raises(ValueError, match="privacy.physical_batch_size"):
        PrivacyConfig(physical_batch_size=0)


@pytest.mark.parametrize("item_dim,item_bias", [(0, False), (3, False), (0, True)])  # model.item_dim, .item_bias
def test_opacus_ew_and_hooks_modes_take_the_same_clipped_step(item_dim, item_bias):
    # q = 1, no noise, a clip that binds: the two ways Opacus computes per-user gradients must agree
    data = users(10)
    plan = plan_dp(PrivacyConfig(mode="dp-sgd", noise_multiplier=1.0, max_grad_norm=0.05), num_users=10,
                   batch_size=10, planned_epochs=2)
    plan = replace(plan, noise_multiplier=0.0)
    hooks, ew = model(item_dim=item_dim, item_bias=item_bias), model(item_dim=item_dim, item_bias=item_bias)
    start = hooks.shareable_state()
    assert ("item_in.weight" in start) == (item_dim > 0) and start["item_emb.weight"].shape == (13, item_dim or 8)
    assert ("output.bias" in start) == item_bias
    dp_local_train(hooks, data, TRAIN, plan, epochs=2, grad_sample_mode="hooks")
    dp_local_train(ew, data, TRAIN, plan, epochs=2, grad_sample_mode="ew")
    a, b = hooks.shareable_state(), ew.shareable_state()
    assert set(a) == set(b) == set(start)
    assert min((a[k] - start[k]).abs().max().item() for k in a if k != "pos_emb.weight") > 1e-4  # all trained
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6, rtol=1e-5), k


@pytest.mark.parametrize("share", [0.8, 0.5])  # at 0.5 both groups have the same bound and stay two groups
def test_group_clipping_clips_the_embedding_table_and_the_rest_separately(share):
    # q = 1 (every user in the one step), no noise, plain SGD: the update must be
    # -lr * sum_u clip(g_u) / n with each user's embedding part clipped to C sqrt(s) and the rest
    # to C sqrt(1 - s), computed here one user at a time without Opacus
    import math

    import numpy as np

    from core_model.train import SequenceBatches
    from privacy.dp import group_clip_bounds

    data, clip = users(10), 0.05
    plan = plan_dp(PrivacyConfig(mode="dp-sgd", noise_multiplier=1.0, max_grad_norm=clip, embedding_clip_share=share),
                   num_users=10, batch_size=10, planned_epochs=1)
    assert plan.embedding_clip_share == share
    plan = replace(plan, noise_multiplier=0.0)
    trained = model()
    dp_local_train(trained, data, TRAIN, plan, epochs=1, sgd=True)

    ref = model()
    names = [n for n, p in ref.named_parameters()]
    bounds = group_clip_bounds(ref, clip, share)
    assert bounds[names.index("item_emb.weight")] == pytest.approx(clip * math.sqrt(share))
    assert all(b == pytest.approx(clip * math.sqrt(1 - share)) for n, b in zip(names, bounds) if n != "item_emb.weight")
    assert math.hypot(clip * math.sqrt(share), clip * math.sqrt(1 - share)) == pytest.approx(clip)  # sensitivity C
    ref.packed = False
    batches = SequenceBatches(data, ref.config.max_len)
    total = {n: torch.zeros_like(p) for n, p in ref.named_parameters()}
    emb_clipped = rest_clipped = 0
    for u in range(len(data)):
        inputs, targets = batches.batch(np.array([u]))
        ref.zero_grad()
        ref(inputs, targets)[1].backward()
        grads = {n: p.grad.clone() for n, p in ref.named_parameters()}
        emb = grads["item_emb.weight"].norm()
        rest = torch.sqrt(sum((g ** 2).sum() for n, g in grads.items() if n != "item_emb.weight"))
        e_scale = min(1.0, clip * math.sqrt(share) / (float(emb) + 1e-6))
        r_scale = min(1.0, clip * math.sqrt(1 - share) / (float(rest) + 1e-6))
        emb_clipped, rest_clipped = emb_clipped + (e_scale < 1), rest_clipped + (r_scale < 1)
        for n, g in grads.items():
            total[n] += g * (e_scale if n == "item_emb.weight" else r_scale)
    assert emb_clipped == 10 and rest_clipped >= 5  # both bounds bind, so a flat clip would differ
    start = dict(model().named_parameters())
    for n, p in trained.named_parameters():
        expected = start[n].detach() - TRAIN.lr * total[n] / len(data)
        assert torch.allclose(p.detach(), expected, atol=1e-7, rtol=1e-5), n

    flat = model()  # the same step with flat clipping to C moves the weights differently
    dp_local_train(flat, data, TRAIN, replace(plan, embedding_clip_share=0.0), epochs=1, sgd=True)
    assert max((a - b).abs().max().item() for a, b in zip(flat.parameters(), trained.parameters())) > 1e-6


def test_embedding_clip_share_errors():
    for bad in (-0.1, 1.0, 1.5):
        with pytest.raises(ValueError, match=rf"privacy.embedding_clip_share must be in \[0, 1\).*got {bad}"):
            PrivacyConfig(embedding_clip_share=bad)
    from privacy.dp import group_clip_bounds
    with pytest.raises(ValueError, match="embedding_clip_share must be in \\(0, 1\\) for group clipping, got 0"):
        group_clip_bounds(model(), 1.0, 0)


@pytest.mark.parametrize("long_histories", ["last", "random"])
def test_random_windows_reach_the_early_history_and_keep_one_example_per_user(monkeypatch, long_histories):
    from core_model.train import SequenceBatches

    T = model().config.max_len
    # 6 users with 3 windows each: items 1-4 only in the earliest window, 9-12 only in the last
    data = [np.concatenate([np.full(T, 1 + u % 4), np.full(T, 5 + u % 4), np.full(T + 1, 9 + u % 4)])
            for u in range(6)]
    calls = []
    original = SequenceBatches.batch

    def recording(self, rows):
        calls.append((self.owners[rows].copy(), original(self, rows)[1]))
        return original(self, rows)

    monkeypatch.setattr(SequenceBatches, "batch", recording)
    plan = plan_dp(PrivacyConfig(mode="dp-sgd", noise_multiplier=1.0), num_users=6, batch_size=6, planned_epochs=20)
    cfg = replace(TRAIN, long_histories=long_histories)
    stats = dp_local_train(model(), data, cfg, plan, epochs=20)
    owners = [o for o, _ in calls]
    assert sum(len(o) for o in owners) == stats["users_sampled"] > 0
    assert all(len(set(o.tolist())) == len(o) for o in owners)  # each user at most one row per step
    targets = torch.cat([t.flatten() for _, t in calls])
    early = bool(((targets >= 1) & (targets <= 4)).any())
    assert early == (long_histories == "random")  # "last" never sees the earliest window
    assert bool(((targets >= 9) & (targets <= 12)).any())
