"""The one-run empirical audit's math and canaries (privacy/canaries.py): hand-computed p-values,
the closed form of the pure-DP bound, soundness against an epsilon-DP randomized response, and the
canary users a client trains on."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from client.client_app import ClientData
from core_model.config import load_config
from core_model.data import LeaveOneOutSplit
from core_model.model import ModelConfig, SASRec
from privacy.canaries import (Canaries, audit_scores, canary_scores, empirical_audit, epsilon_lower_bound,
                              guess_sizes, make_canaries, p_value)
from simulations.clients import with_canaries


def test_p_value_by_hand():
    # r = 2 guesses, both right; epsilon 0: q = 1/2, beta = P[Bin(2, 1/2) >= 2] = 1/4
    assert p_value(m=10, r=2, v=2, epsilon=0.0, delta=0.0) == pytest.approx(0.25)
    # alpha = max(P[Bin = 1] / 1, P[Bin in {0, 1}] / 2) = max(0.5, 0.375) = 0.5; p = 1/4 + 0.5 * 2 * 10 * 0.01
    assert p_value(m=10, r=2, v=2, epsilon=0.0, delta=0.01) == pytest.approx(0.35)
    # epsilon 1: q = e / (1 + e); beta = q^2
    q = math.e / (1 + math.e)
    assert p_value(m=10, r=2, v=2, epsilon=1.0, delta=0.0) == pytest.approx(q * q)
    assert p_value(m=10, r=4, v=0, epsilon=1.0, delta=0.0) == 1.0


def test_pure_dp_bound_has_a_closed_form_when_every_guess_is_right():
    # P[Bin(r, q) >= r] = q^r = 0.05  ->  q = 0.05^(1/r), epsilon = log(q / (1 - q))
    for r in (20, 100):
        q = 0.05 ** (1 / r)
        assert epsilon_lower_bound(m=1000, r=r, v=r, delta=0.0) == pytest.approx(math.log(q / (1 - q)), abs=1e-5)


def test_bound_is_zero_at_chance_and_grows_with_correct_guesses_and_shrinks_with_delta():
    assert epsilon_lower_bound(m=1000, r=100, v=50, delta=0.0) == 0.0
    bounds = [epsilon_lower_bound(m=1000, r=100, v=v, delta=0.0) for v in (60, 70, 80, 90, 100)]
    assert bounds == sorted(bounds) and bounds[0] > 0
    assert epsilon_lower_bound(m=1000, r=100, v=90, delta=1e-4) < epsilon_lower_bound(m=1000, r=100, v=90, delta=0)


@pytest.mark.parametrize("bad", [dict(v=3, r=2), dict(epsilon=-1.0), dict(delta=1.5)])
def test_p_value_rejects_bad_arguments(bad):
    kwargs = dict(m=10, r=2, v=1, epsilon=1.0, delta=0.0) | bad
    with pytest.raises(ValueError, match="v <= r|epsilon must be|delta must be"):
        p_value(**kwargs)


def test_bound_is_sound_against_an_epsilon_dp_randomized_response():
    """Guesses from an eps-DP mechanism (randomized response on the inclusion bit): the lower bound
    may exceed eps in at most ~5 % of trials (95 % confidence), and it is not vacuous."""
    rng = np.random.default_rng(0)
    for eps in (1.0, 2.0):
        q = 1 / (1 + math.exp(-eps))
        bounds = []
        for _ in range(60):
            included = rng.random(1000) < 0.5
            said_in = np.where(rng.random(1000) < q, included, ~included)
            bounds.append(audit_scores(said_in + 0.5 * rng.random(1000), included, delta=0.0).epsilon_lower_bound)
        bounds = np.array(bounds)
        assert (bounds > eps).mean() <= 0.1
        assert bounds.mean() > 0.6 * eps


def test_audit_scores_perfect_random_and_reversed_attacks():
    rng = np.random.default_rng(1)
    included = rng.random(400) < 0.5
    perfect = audit_scores(included + rng.random(400) * 0.1, included, delta=0.0)
    assert perfect.auc == pytest.approx(1.0)
    fits = min(included.sum(), (~included).sum())  # k in and k out can all be right only up to here
    assert all(g.correct == g.guesses for g in perfect.grid if g.k <= fits)
    k = max(x for x in guess_sizes(400) if x <= fits)
    q = (0.05 / len(perfect.grid)) ** (1 / (2 * k))  # Bonferroni over the grid
    assert perfect.epsilon_lower_bound == pytest.approx(math.log(q / (1 - q)), abs=1e-4)
    assert audit_scores(rng.random(400), included, delta=0.0).epsilon_lower_bound < 0.5
    reversed_ = audit_scores(-(included + rng.random(400) * 0.1), included, delta=0.0)
    assert reversed_.epsilon_lower_bound == 0.0 and reversed_.auc == pytest.approx(0.0)


def test_audit_scores_rejects_nan_and_mismatched_input():
    with pytest.raises(ValueError, match="finite"):
        audit_scores(np.array([0.1, np.nan, 0.3]), np.array([True, False, True]), delta=0.0)
    with pytest.raises(ValueError, match="same >= 2 canaries"):
        audit_scores(np.zeros(3), np.zeros(2, dtype=bool), delta=0.0)


def test_make_canaries_draws_distinct_catalogue_items_and_fresh_bits():
    c = make_canaries(num=300, length=12, num_items=50, clients=["a", "b", "c"])
    assert c.histories.shape == (300, 12) and c.histories.min() >= 1 and c.histories.max() <= 50
    assert all(len(set(h)) == 12 for h in c.histories.tolist())
    assert sorted(c.clients.count(x) for x in "abc") == [100, 100, 100]
    assert 100 < c.included.sum() < 200
    other = make_canaries(num=300, length=12, num_items=50, clients=["a", "b", "c"])
    assert not np.array_equal(c.included, other.included)  # OS randomness: never the same bits twice
    assert sum(len(c.of_client(x)) for x in "abc") == c.included.sum()


@pytest.mark.parametrize("kwargs, match", [
    (dict(num=0), "num \\(canaries\\) must be an int >= 1, got 0"),
    (dict(length=2), "length \\(canary history\\) must be an int in \\[3, 50\\]"),
    (dict(length=51), "got 51"),
    (dict(clients=[]), "at least one client"),
])
def test_make_canaries_rejects_bad_parameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_canaries(**(dict(num=10, length=5, num_items=50, clients=["a"]) | kwargs))


def test_canary_file_round_trip_and_errors(tmp_path):
    c = make_canaries(num=20, length=5, num_items=30, clients=["x", "y"], seed=3)
    c.save(tmp_path / "canaries.json")
    back = Canaries.load(tmp_path / "canaries.json")
    assert np.array_equal(back.histories, c.histories) and np.array_equal(back.included, c.included)
    assert back.clients == c.clients
    with pytest.raises(FileNotFoundError, match="missing.json does not exist"):
        Canaries.load(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text(json.dumps({"histories": [[1, 2, 3]]}))
    with pytest.raises(ValueError, match="bad.json: not a canary file"):
        Canaries.load(tmp_path / "bad.json")
    with pytest.raises(ValueError, match="item ids must be in 1..30"):
        Canaries(histories=np.array([[0, 1, 2]]), clients=("x",), included=np.array([True]), num_items=30)


def test_a_client_trains_on_its_included_canaries_and_evaluates_without_them():
    split = LeaveOneOutSplit(train=[np.array([1, 2]), np.array([3, 4, 5])], valid_targets=np.array([3, 6]),
                             test_targets=np.array([4, 7]), user_index=np.array([0, 1]), num_items=9)
    canaries = [np.array([9, 8, 7, 6, 5]), np.array([1, 3, 5, 7, 9])]
    data = ClientData(split=with_canaries(split, canaries), num_items=9, name="a", canaries=2)
    assert len(data.split) == 4 and [t.tolist() for t in data.split.train[2:]] == [[9, 8, 7], [1, 3, 5]]
    assert data.split.valid_targets.tolist() == [3, 6, 6, 7] and data.split.test_targets.tolist() == [4, 7, 5, 9]
    assert data.split.user_index.tolist() == [0, 1, -1, -1]
    assert len(data.eval_split) == 2 and data.eval_split.test_targets.tolist() == [4, 7]


def test_canary_scores_are_the_mean_log_likelihood_of_the_training_part():
    import torch
    import torch.nn.functional as F

    torch.manual_seed(0)
    model = SASRec(ModelConfig(num_items=11, d_model=8, num_heads=1, num_blocks=1, max_len=5))
    histories = np.array([[1, 2, 3, 4, 5, 6], [7, 8, 9, 10, 11, 1]])
    scores = canary_scores(model, histories, max_len=5)
    model.eval()
    for row, h in enumerate(histories):
        train = torch.tensor(h[:-2]).unsqueeze(0)  # (1, 4): what a member trains on
        with torch.no_grad():
            logits = model.output(model.encode(train[:, :-1]))[0]  # (3, V + 1)
        want = -F.cross_entropy(logits, train[0, 1:]).item()
        assert scores[row] == pytest.approx(want, rel=1e-5)


def test_privacy_config_checks_the_canary_settings():
    with pytest.raises(ValueError, match="privacy.audit_canaries"):
        load_config(None, ["privacy.audit_canaries=-1"])
    with pytest.raises(ValueError, match="privacy.audit_canary_length"):
        load_config(None, ["privacy.audit_canary_length=2"])


def test_empirical_audit_of_a_run_without_canaries_says_how_to_get_them(tmp_path):
    with pytest.raises(FileNotFoundError, match="trained without canaries.*privacy.audit_canaries=1000"):
        empirical_audit(tmp_path)


def test_a_canary_file_for_another_catalogue_is_refused_by_name(tmp_path):
    from simulations.clients import simulated_client_data

    make_canaries(num=4, length=5, num_items=7, clients=["iid-0000"], seed=0).save(tmp_path / "c.json")
    cfg = load_config(None, ["data.synthetic.num_users=60", "data.synthetic.num_items=30", "federation.partition=iid",
                             "federation.num_clients=2", f'privacy.audit_canary_file="{tmp_path / "c.json"}"'])
    with pytest.raises(ValueError, match="c.json: canaries drawn for a catalogue of 7 items, but the data has 30"):
        simulated_client_data(cfg, 0)
