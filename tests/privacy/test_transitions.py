"""The transition table's release (privacy/transitions.py): each user's clipped matrix against a brute
force, sensitivity 1, the noise, the server's post-processing, the budget it takes from DP-SGD, and
the composed epsilon against Google's dp-accounting PLD."""

import math

import numpy as np
import pytest
import torch

from core_model.config import PrivacyConfig
from privacy.accounting import PrivacyAccountant, noise_for_target_epsilon
from privacy.dp import plan_dp
from privacy.transitions import (add_noise, client_transitions, finish_table, release_history, release_mechanism,
                                 user_transitions)

V = 6


def dense(keys, values, n=V):
    out = np.zeros((n + 1) ** 2)
    np.add.at(out, keys, values)
    return out.reshape(n + 1, n + 1)


def brute(history, window, decay):
    m = np.zeros((V + 1, V + 1))
    for t in range(len(history)):
        for k in range(1, window + 1):
            if t + k < len(history):
                m[history[t], history[t + k]] += decay ** (k - 1)
    return m / max(np.linalg.norm(m), 1.0)


@pytest.mark.parametrize("window,decay", [(1, 1.0), (2, 0.5), (4, 0.8)])
def test_a_users_matrix_is_the_weighted_pair_count_scaled_to_norm_one(window, decay):
    history = np.array([3, 1, 3, 2, 6, 3, 1])  # repeats: (3, 1) twice at distance 1
    keys, values = user_transitions(history, V, window=window, decay=decay)
    assert np.allclose(dense(keys, values), brute(history, window, decay))
    assert np.linalg.norm(values) == pytest.approx(1.0)


def test_a_history_without_pairs_contributes_nothing_and_bad_items_are_named():
    keys, values = user_transitions(np.array([4]), V, window=3, decay=0.8)
    assert keys.size == 0 and values.size == 0
    with pytest.raises(ValueError, match=r"history items must be in 1..6, got min 0 max 7"):
        user_transitions(np.array([0, 7]), V, window=2, decay=0.8)
    with pytest.raises(ValueError, match="transitions_window must be an int >= 1, got 0"):
        client_transitions([np.array([1, 2])], V, window=0, decay=0.8)
    with pytest.raises(ValueError, match=r"transitions_decay must be in \(0, 1\], got 1.5"):
        client_transitions([np.array([1, 2])], V, window=2, decay=1.5)


def test_the_client_sum_moves_by_at_most_one_when_one_user_is_removed():
    rng = np.random.default_rng(0)
    users = [rng.integers(1, V + 1, size=rng.integers(1, 30)) for _ in range(25)]
    total = client_transitions(users, V, window=3, decay=0.8)
    assert np.allclose(total, sum(brute(h, 3, 0.8) for h in users))
    for k in range(len(users)):  # the sensitivity the noise is calibrated to
        without = client_transitions(users[:k] + users[k + 1:], V, window=3, decay=0.8)
        assert np.linalg.norm(total - without) <= 1.0 + 1e-9


def test_noise_has_the_asked_standard_deviation_and_zero_is_exact():
    total = np.zeros((300, 300))
    noisy = add_noise(total, 0.7, torch.Generator().manual_seed(0))
    assert noisy.std() == pytest.approx(0.7, rel=0.01) and abs(noisy.mean()) < 0.01
    assert np.array_equal(add_noise(total + 2.0, 0.0), total + 2.0)
    a, b = add_noise(total, 1.0), add_noise(total, 1.0)  # OS-seeded: two draws differ
    assert not np.array_equal(a, b)
    with pytest.raises(ValueError, match="finite number >= 0, got -1"):
        add_noise(total, -1)


def test_the_server_zeroes_the_padding_row_and_column_and_rejects_what_is_not_a_table():
    table = finish_table(np.ones((4, 4)))
    assert table.dtype == torch.float32 and table[0].sum() == 0 and table[:, 0].sum() == 0 and table[1:, 1:].sum() == 9
    with pytest.raises(ValueError, match=r"square matrix, got shape \(2, 3\)"):
        finish_table(np.ones((2, 3)))
    with pytest.raises(ValueError, match="non-finite"):
        finish_table(np.full((2, 2), np.nan))


def test_release_history_and_mechanism_string():
    assert release_history(PrivacyConfig(mode="dp-sgd", noise_multiplier=1.0, transitions_noise_multiplier=0.6)) \
        == [(0.6, 1.0, 1)]
    assert release_history(PrivacyConfig(mode="dp-sgd", noise_multiplier=1.0)) == []
    text = release_mechanism(0.6, min_clients=10, window=5, decay=0.8)
    assert "sensitivity 1" in text and "1/sqrt(10)" in text and "multiplier 0.6" in text
    assert "adds all of the noise" in release_mechanism(0.6, min_clients=None, window=5, decay=0.8)


def test_target_epsilon_covers_the_release_and_the_dp_sgd_steps():
    delta, q, steps = 1e-5, 0.5, 30
    sigma = noise_for_target_epsilon(target_epsilon=8.0, delta=delta, sample_rate=q, steps=steps,
                                     preceding=[(0.7, 1.0, 1)], accountant="rdp")
    composed = PrivacyAccountant([(0.7, 1.0, 1), (sigma, q, steps)]).epsilon(delta, "rdp")
    assert 7.99 <= composed <= 8.0
    alone = noise_for_target_epsilon(target_epsilon=8.0, delta=delta, sample_rate=q, steps=steps, accountant="rdp")
    assert sigma > alone * 1.2  # the release takes a real share of the budget
    with pytest.raises(ValueError, match=r"already costs epsilon .* leaves nothing of target_epsilon=4.0"):
        noise_for_target_epsilon(target_epsilon=4.0, delta=delta, sample_rate=q, steps=steps,
                                 preceding=[(0.5, 1.0, 1)], accountant="rdp")
    # plan_dp sees the release in the privacy config
    priv = PrivacyConfig(mode="dp-sgd", target_epsilon=8.0, delta=delta, sample_rate=0.5, accountant="rdp",
                         transitions_noise_multiplier=0.7)
    plan = plan_dp(priv, num_users=100, batch_size=10, planned_epochs=1, planned_steps=steps)
    assert plan.noise_multiplier == sigma


def test_composed_epsilon_within_one_percent_of_dp_accounting_pld():
    dp_accounting = pytest.importorskip("dp_accounting")
    s1, s2, q, steps, delta = 0.7, 5.6, 0.5, 150, 1 / 14680
    event = dp_accounting.ComposedDpEvent([
        dp_accounting.GaussianDpEvent(s1),
        dp_accounting.SelfComposedDpEvent(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(s2)),
                                          steps)])
    pld = dp_accounting.pld.PLDAccountant().compose(event).get_epsilon(delta)
    ours = PrivacyAccountant([(s1, 1.0, 1), (s2, q, steps)]).epsilon(delta)
    assert ours == pytest.approx(pld, rel=0.01)
    # the release alone is the Gaussian mechanism: at our epsilon its exact delta (Balle & Wang, ICML
    # 2018) is at most the stated one (our epsilon is an upper bound) and close to it
    eps = PrivacyAccountant([(s1, 1.0, 1)]).epsilon(delta)
    phi = lambda x: 0.5 * math.erfc(-x / math.sqrt(2))  # noqa: E731
    exact = phi(-eps * s1 + 1 / (2 * s1)) - math.exp(eps) * phi(-eps * s1 - 1 / (2 * s1))
    assert 0.95 * delta <= exact <= delta


@pytest.mark.parametrize("settings, match", [
    (['privacy.mode="dp-sgd"', "privacy.noise_multiplier=1.0", "model.transitions=true"],
     "transitions_noise_multiplier must be > 0 with model.transitions = true"),
    (['privacy.mode="dp-sgd"', "privacy.noise_multiplier=1.0", "privacy.transitions_noise_multiplier=0.7"],
     "needs model.transitions = true"),
    (["model.transitions=true", "privacy.transitions_noise_multiplier=0.7"], "needs privacy.mode = 'dp-sgd'"),
    (["privacy.transitions_noise_multiplier=-1.0"], "privacy.transitions_noise_multiplier"),
    (['privacy.mode="dp-sgd"', "privacy.noise_multiplier=1.0", "model.transitions=true",
      "privacy.transitions_noise_multiplier=0.7", 'privacy.noise_placement="distributed"',
      "privacy.sample_rate_for_epsilon=8.0"], "does not account for the transition table"),
])
def test_transition_settings_that_cannot_work_are_refused(settings, match):
    from core_model.config import load_config

    with pytest.raises(ValueError, match=match):
        load_config(None, settings)


def test_release_noise_for_a_share_of_the_target_binds_at_the_smallest_delta():
    from privacy.dp import release_noise_for_share

    priv = PrivacyConfig(mode="dp-sgd", noise_multiplier=1.0, accountant="rdp")
    sizes = [300, 1500]  # deltas 1/3000 and 1/15000
    sigma = release_noise_for_share(priv, client_sizes=sizes, target_epsilon=8.0, share=0.75)
    spent = {n: PrivacyAccountant([(sigma, 1.0, 1)]).epsilon(1 / (10 * n), "rdp") for n in sizes}
    assert 5.99 <= spent[1500] <= 6.0 and spent[300] < spent[1500]
    with pytest.raises(ValueError, match=r"share must be in \(0, 1\)"):
        release_noise_for_share(priv, client_sizes=sizes, target_epsilon=8.0, share=1.0)
