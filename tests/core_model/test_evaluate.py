"""Ranking metrics on hand-computed rankings."""

import math

import numpy as np
import pytest
import torch

from core_model.evaluate import Popularity, evaluate_ranking, metrics_from_ranks, pad_histories, rank_targets


def fixed_scorer(scores):
    """A scorer returning the same (V,) scores for every history."""
    s = torch.tensor(scores, dtype=torch.float32)
    return lambda inputs: s.expand(inputs.shape[0], -1)


def test_metrics_from_hand_computed_ranks():
    m = metrics_from_ranks(np.array([1, 3, 11, 20]))
    assert m["hr@10"] == pytest.approx(0.5)
    assert m["ndcg@10"] == pytest.approx((1 / math.log2(2) + 1 / math.log2(4)) / 4)
    assert m["recall@20"] == pytest.approx(1.0)
    assert m["mrr"] == pytest.approx((1 + 1 / 3 + 1 / 11 + 1 / 20) / 4)


def test_metrics_reject_bad_ranks():
    with pytest.raises(ValueError, match="at least one rank"):
        metrics_from_ranks(np.array([]))
    with pytest.raises(ValueError, match="ranks must be >= 1"):
        metrics_from_ranks(np.array([0, 2]))


def test_full_ranking_with_and_without_history_exclusion():
    # items 1..5 scored 0.5, 0.9, 0.1, 0.7, 0.3 -> order 2, 4, 1, 5, 3
    scorer = fixed_scorer([0.5, 0.9, 0.1, 0.7, 0.3])
    hist = [np.array([2]), np.array([4, 2]), np.array([5])]
    targets = np.array([1, 5, 5])
    kw = dict(num_items=5, max_len=3)
    assert rank_targets(scorer, hist, targets, exclude_history=False, **kw).tolist() == [3, 4, 4]
    # excluded: user 0 loses item 2 above it; user 1 loses 4 and 2; user 2's target is in its history
    assert rank_targets(scorer, hist, targets, exclude_history=True, **kw).tolist() == [2, 2, 6]


def test_ties_are_broken_by_item_index():
    scorer = fixed_scorer([1.0, 1.0, 1.0])
    ranks = rank_targets(scorer, [np.array([], dtype=np.int64)] * 3, np.array([1, 2, 3]),
                         num_items=3, max_len=2, exclude_history=False)
    assert ranks.tolist() == [1, 2, 3]


def test_sampled_protocol_ranks_against_negatives_outside_history():
    scores = np.arange(200, 0, -1, dtype=np.float32)  # item 1 best ... item 200 worst
    scorer = fixed_scorer(scores)
    hist = [np.arange(1, 51)]  # the 50 best items are history: never negatives
    ranks = rank_targets(scorer, hist, np.array([51]), num_items=200, max_len=5, sampled_negatives=100)
    assert ranks.tolist() == [1]  # every eligible negative scores below item 51
    worst = rank_targets(scorer, hist, np.array([200]), num_items=200, max_len=5, sampled_negatives=100)
    assert worst.tolist() == [101]


def test_sampled_protocol_needs_enough_items():
    with pytest.raises(ValueError, match="fewer than sampled_negatives=100"):
        rank_targets(fixed_scorer(np.ones(50)), [np.array([1])], np.array([2]), num_items=50, max_len=2,
                     sampled_negatives=100)


def test_target_out_of_catalogue_is_an_error():
    with pytest.raises(ValueError, match="item indices in 1..5"):
        rank_targets(fixed_scorer(np.ones(5)), [np.array([1])], np.array([6]), num_items=5, max_len=2)


def test_pad_histories_left_pads_and_cuts():
    out = pad_histories([np.array([1, 2, 3, 4]), np.array([7])], max_len=3)
    assert out.tolist() == [[2, 3, 4], [0, 0, 7]]


def test_popularity_counts_training_items():
    pop = Popularity([np.array([1, 2, 2]), np.array([2, 3])], num_items=4)
    assert pop(torch.zeros(1, 2, dtype=torch.long)).tolist() == [[1.0, 3.0, 1.0, 0.0]]
    m = evaluate_ranking(pop, [np.array([1])], np.array([2]), num_items=4, max_len=2, sampled=False)
    assert m["hr@10"] == 1.0 and m["mrr"] == 1.0
