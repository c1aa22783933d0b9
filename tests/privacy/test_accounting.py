"""Privacy accounting: golden numbers, a cross-check with dp-accounting, save/restore, planning."""

import functools
import json
import math

import pytest
from opacus.accountants import PRVAccountant, RDPAccountant

from privacy.accounting import (PrivacyAccountant, default_delta, noise_for_target_epsilon,
                                sample_rate_for_target_epsilon)

ROUNDS = 20
STEPS_PER_ROUND = 2
DELTA = 1e-5


@functools.lru_cache(maxsize=None)
def epsilon_of(sigma: float, q: float, steps: int, delta: float, accountant: str) -> float:
    acc = PrivacyAccountant()
    acc.add(noise_multiplier=sigma, sample_rate=q, steps=steps)
    return acc.epsilon(delta, accountant)


def test_golden_numbers_sigma1_q01_1000_steps():
    # FACTS.md: 600 users, batch 64 -> q = 0.1; delta = 1/600.
    assert epsilon_of(1.0, 0.1, 1000, 1 / 600, "rdp") == pytest.approx(21.23, abs=0.01)
    assert epsilon_of(1.0, 0.1, 1000, 1 / 600, "prv") == pytest.approx(19.02, abs=0.01)


def test_golden_number_from_opacus_rdp_test():
    assert epsilon_of(1.5, 0.04, 2250, 1e-5, "rdp") == pytest.approx(7.3291, rel=1e-3)


def test_prv_within_one_percent_of_dp_accounting_pld():
    dp_accounting = pytest.importorskip("dp_accounting")
    sigma, q, steps, delta = 1.0, 0.1, 1000, 1 / 600
    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps)
    pld = dp_accounting.pld.PLDAccountant().compose(event).get_epsilon(delta)
    assert epsilon_of(sigma, q, steps, delta, "prv") == pytest.approx(pld, rel=0.01)


def test_default_delta():
    assert default_delta(600) == pytest.approx(1 / 6000)
    with pytest.raises(ValueError, match="num_users must be an int >= 1, got 0"):
        default_delta(0)


def test_add_merges_like_opacus_and_counts_steps():
    acc = PrivacyAccountant()
    acc.add(noise_multiplier=1.0, sample_rate=0.1, steps=3)
    acc.add(noise_multiplier=1.0, sample_rate=0.1, steps=2)
    acc.add(noise_multiplier=1.2, sample_rate=0.1, steps=1)
    acc.add(noise_multiplier=1.2, sample_rate=0.1, steps=0)
    opacus = RDPAccountant()
    for sigma in [1.0] * 5 + [1.2]:
        opacus.step(noise_multiplier=sigma, sample_rate=0.1)
    assert acc.history == opacus.history == [(1.0, 0.1, 5), (1.2, 0.1, 1)]
    assert acc.steps == 6


@pytest.mark.parametrize("kwargs,needle", [
    ({"noise_multiplier": -1.0}, "noise_multiplier must be a finite number >= 0, got -1.0"),
    ({"sample_rate": 0.0}, "sample_rate must be a number in (0, 1], got 0.0"),
    ({"sample_rate": 1.5}, "sample_rate must be a number in (0, 1], got 1.5"),
    ({"steps": -1}, "steps must be an int >= 0, got -1"),
    ({"steps": 2.0}, "steps must be an int >= 0, got 2.0"),
])
def test_add_rejects_bad_values_and_changes_nothing(kwargs, needle):
    acc = PrivacyAccountant([(1.0, 0.1, 4)])
    with pytest.raises(ValueError) as info:
        acc.add(**{"noise_multiplier": 1.0, "sample_rate": 0.1, "steps": 1, **kwargs})
    assert needle in str(info.value)
    assert acc.history == [(1.0, 0.1, 4)]


def test_empty_is_zero_and_noiseless_is_infinite():
    assert PrivacyAccountant().epsilon(DELTA) == 0.0
    acc = PrivacyAccountant([(1.0, 0.1, 10), (0.0, 0.1, 1)])
    assert acc.epsilon(DELTA) == math.inf and acc.epsilon(DELTA, "rdp") == math.inf
    with pytest.raises(ValueError, match="accountant must be one of"):
        acc.epsilon(DELTA, "gdp")
    with pytest.raises(ValueError, match="delta must be a number in"):
        acc.epsilon(0.0)


def test_state_dict_is_json_and_rejects_bad_state():
    acc = PrivacyAccountant([(1.0, 0.1, 4), (0.8, 0.2, 1)])
    state = json.loads(json.dumps(acc.state_dict()))
    assert state == {"history": [[1.0, 0.1, 4], [0.8, 0.2, 1]]}
    assert PrivacyAccountant.from_state_dict(state).history == acc.history
    with pytest.raises(ValueError, match="unknown key"):
        PrivacyAccountant.from_state_dict({"history": [], "extra": 1})
    with pytest.raises(ValueError, match=r"history\[0\] must be"):
        PrivacyAccountant.from_state_dict({"history": [[1.0, 0.1]]})


def round_sigma(r: int) -> float:
    """A schedule that changes the noise once, so the history has more than one entry."""
    return 1.0 if r < ROUNDS // 2 else 1.3


@pytest.mark.parametrize("accountant", ["prv", "rdp"])
def test_restore_each_round_equals_one_accountant(accountant):
    # Reference: one Opacus accountant that saw every step of the 20 rounds.
    reference = PRVAccountant() if accountant == "prv" else RDPAccountant()
    state = PrivacyAccountant().state_dict()
    for r in range(ROUNDS):
        restored = PrivacyAccountant.from_state_dict(json.loads(json.dumps(state)))  # a fresh process
        restored.add(noise_multiplier=round_sigma(r), sample_rate=0.1, steps=STEPS_PER_ROUND)
        state = restored.state_dict()
        for _ in range(STEPS_PER_ROUND):
            reference.step(noise_multiplier=round_sigma(r), sample_rate=0.1)
    final = PrivacyAccountant.from_state_dict(state)
    assert final.history == [tuple(entry) for entry in reference.history]
    eps = final.epsilon(DELTA, accountant)
    assert eps == pytest.approx(reference.get_epsilon(DELTA), rel=1e-9)
    last_round_only = epsilon_of(round_sigma(ROUNDS - 1), 0.1, STEPS_PER_ROUND, DELTA, accountant)
    assert eps > 2 * last_round_only  # forgetting the earlier rounds would badly under-report


@pytest.fixture(scope="module")
def planned():
    """Plan eps 4 at delta 1e-5 over 20 rounds of 2 steps at q 0.1 (PRV)."""
    steps = ROUNDS * STEPS_PER_ROUND
    return steps, noise_for_target_epsilon(target_epsilon=4.0, delta=DELTA, sample_rate=0.1, steps=steps)


def test_noise_for_target_spends_just_under_target(planned):
    steps, sigma = planned
    eps = epsilon_of(sigma, 0.1, steps, DELTA, "prv")
    assert 4.0 * 0.98 <= eps <= 4.0


def test_noise_for_target_spent_round_by_round_equals_plan(planned):
    steps, sigma = planned
    state = PrivacyAccountant().state_dict()
    for _ in range(ROUNDS):
        acc = PrivacyAccountant.from_state_dict(state)
        acc.add(noise_multiplier=sigma, sample_rate=0.1, steps=STEPS_PER_ROUND)
        state = acc.state_dict()
    assert PrivacyAccountant.from_state_dict(state).epsilon(DELTA) == pytest.approx(
        epsilon_of(sigma, 0.1, steps, DELTA, "prv"), rel=1e-9)


@pytest.mark.parametrize("kwargs,needle", [
    ({"target_epsilon": 0.0}, "target_epsilon must be a finite number > 0, got 0.0"),
    ({"delta": 1.0}, "delta must be a number in (0, 1), got 1.0"),
    ({"sample_rate": 2.0}, "sample_rate must be a number in (0, 1], got 2.0"),
    ({"steps": 0}, "steps must be an int >= 1, got 0"),
    ({"accountant": "gdp"}, "accountant must be one of"),
])
def test_noise_for_target_rejects_bad_input(kwargs, needle):
    args = {"target_epsilon": 4.0, "delta": DELTA, "sample_rate": 0.1, "steps": 10, **kwargs}
    with pytest.raises(ValueError) as info:
        noise_for_target_epsilon(**args)
    assert needle in str(info.value)


# The cached one-step RDP (privacy/accounting.py) must give exactly stock Opacus' numbers: the PRV
# accountant's domain and the RDP epsilon are built from it, and a noise-multiplier search mirrors
# Opacus' bisection. Equality is exact (==), so a change in how Opacus sizes the domain fails here.
HISTORIES = [
    [(3.477, 0.5, 150)],                       # the ML-1M distributed-noise configuration at epsilon 8
    [(1.0, 0.1, 1000)],                        # FACTS.md's golden configuration
    [(1.0, 0.01, 1000), (2.0, 0.1, 30)],       # heterogeneous: a policy change mid-run
    [(0.8, 0.3, 7), (0.8, 0.25, 3), (1.6, 1.0, 2)],
    [(3.477, 0.5, 1)],                         # one step
]


@pytest.mark.parametrize("history", HISTORIES, ids=range(len(HISTORIES)))
@pytest.mark.parametrize("delta", [1e-5, 6.8e-5, 1 / 600])
def test_epsilon_equals_stock_opacus_exactly(history, delta):
    ours = PrivacyAccountant(history)
    for name, stock in (("prv", PRVAccountant()), ("rdp", RDPAccountant())):
        stock.history = list(history)
        expected = stock.get_epsilon(delta)
        assert ours.epsilon(delta, name) == expected, (name, history, delta)
        assert ours.epsilon(delta, name) == expected  # again, from the cache


@pytest.mark.parametrize("target,q,steps,accountant", [
    (8.0, 0.5, 150, "prv"), (4.0, 0.1, 40, "prv"), (1.0, 0.05, 300, "rdp"), (2.0, 1.0, 10, "prv")])
def test_noise_for_target_equals_opacus_search(target, q, steps, accountant):
    from opacus.accountants.utils import get_noise_multiplier
    expected = get_noise_multiplier(target_epsilon=target, target_delta=DELTA, sample_rate=q, steps=steps,
                                    accountant=accountant, epsilon_tolerance=0.01)
    ours = noise_for_target_epsilon(target_epsilon=target, delta=DELTA, sample_rate=q, steps=steps,
                                    accountant=accountant)
    assert ours == expected
    assert target - 0.01 <= epsilon_of(ours, q, steps, DELTA, accountant) <= target


def test_noise_for_unreachable_target_names_the_request():
    # 1e9 full-batch steps: even sigma 1e6 spends ~0.2 (RDP: PRV's mesh would not fit in memory)
    with pytest.raises(ValueError) as info:
        noise_for_target_epsilon(target_epsilon=0.02, delta=1e-12, sample_rate=1.0, steps=10 ** 9,
                                 accountant="rdp", epsilon_tolerance=0.001)
    assert "no noise multiplier up to 1e+06 reaches target_epsilon=0.02 at delta=1e-12" in str(info.value)


@pytest.mark.parametrize("sigma,steps,delta,accountant", [(3.477, 150, 6.8e-5, "prv"), (1.2, 40, DELTA, "rdp")])
def test_sample_rate_for_target_spends_just_under_target_and_a_larger_rate_overspends(sigma, steps, delta, accountant):
    q = sample_rate_for_target_epsilon(target_epsilon=8.0, delta=delta, noise_multiplier=sigma, steps=steps,
                                       accountant=accountant)
    assert 0 < q < 1
    assert 8.0 - 0.01 <= epsilon_of(sigma, q, steps, delta, accountant) <= 8.0
    assert epsilon_of(sigma, min(1.0, q * 1.02), steps, delta, accountant) > 8.0  # the largest such rate


def test_sample_rate_for_target_inverts_the_noise_search():
    sigma = noise_for_target_epsilon(target_epsilon=8.0, delta=6.8e-5, sample_rate=0.5, steps=150)
    q = sample_rate_for_target_epsilon(target_epsilon=8.0, delta=6.8e-5, noise_multiplier=sigma, steps=150)
    assert q == pytest.approx(0.5, abs=0.005)
    # a larger delta (a smaller client) samples more often at the same multiplier
    assert sample_rate_for_target_epsilon(target_epsilon=8.0, delta=3.27e-4, noise_multiplier=sigma, steps=150) > q


def test_sample_rate_for_target_is_one_when_every_user_every_step_spends_less():
    q = sample_rate_for_target_epsilon(target_epsilon=8.0, delta=DELTA, noise_multiplier=50.0, steps=10)
    assert q == 1.0 and epsilon_of(50.0, 1.0, 10, DELTA, "prv") < 8.0


@pytest.mark.parametrize("kwargs,needle", [
    ({"target_epsilon": -1.0}, "target_epsilon must be a finite number > 0, got -1.0"),
    ({"delta": 0.0}, "delta must be a number in (0, 1), got 0.0"),
    ({"noise_multiplier": 0.0}, "noise_multiplier must be > 0 (no noise spends infinite epsilon), got 0.0"),
    ({"noise_multiplier": -1.0}, "noise_multiplier must be a finite number >= 0, got -1.0"),
    ({"steps": 0}, "steps must be an int >= 1, got 0"),
    ({"accountant": "gdp"}, "accountant must be one of"),
    ({"epsilon_tolerance": 5.0}, "epsilon_tolerance must be in (0, target_epsilon), got 5.0"),
])
def test_sample_rate_for_target_rejects_bad_input(kwargs, needle):
    args = {"target_epsilon": 4.0, "delta": DELTA, "noise_multiplier": 2.0, "steps": 10, **kwargs}
    with pytest.raises(ValueError) as info:
        sample_rate_for_target_epsilon(**args)
    assert needle in str(info.value)
