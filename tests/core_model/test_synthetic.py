"""Tests of the synthetic live-commerce generator (core_model/synthetic.py)."""

from __future__ import annotations

import csv
from collections import Counter

import numpy as np
import pytest

from core_model import data
from core_model.data import InteractionLog, leave_one_out
from core_model.synthetic import (
    CSV_HEADER,
    EVENT_NAMES,
    SyntheticConfig,
    generate_live_commerce,
    write_csv,
)

SMALL = SyntheticConfig(num_users=600, num_items=200, num_merchants=8, num_regions=3, seed=3)


@pytest.fixture(scope="module")
def small_log() -> InteractionLog:
    return generate_live_commerce(SMALL)


def _same_log(a: InteractionLog, b: InteractionLog) -> bool:
    return (
        a.name == b.name
        and len(a.sequences) == len(b.sequences)
        and all(np.array_equal(x, y) for x, y in zip(a.sequences, b.sequences))
        and all(np.array_equal(x, y) for x, y in zip(a.timestamps, b.timestamps))
        and all(np.array_equal(x, y) for x, y in zip(a.events, b.events))
        and all(np.array_equal(x, y) for x, y in zip(a.interaction_groups, b.interaction_groups))
        and all(np.array_equal(a.user_attributes[k], b.user_attributes[k])
                for k in a.user_attributes)
        and a.item_features == b.item_features
    )


# ---------------------------------------------------------------- determinism

def test_same_seed_same_log(small_log: InteractionLog) -> None:
    assert _same_log(small_log, generate_live_commerce(SMALL))


def test_different_seeds_differ(small_log: InteractionLog) -> None:
    other = generate_live_commerce(SyntheticConfig(**{**SMALL.__dict__, "seed": 4}))
    assert not _same_log(small_log, other)
    assert other.name == "synthetic live-commerce (seed 4)"


def test_none_means_the_default_config() -> None:
    cfg = SyntheticConfig()
    assert (cfg.num_users, cfg.num_items, cfg.num_merchants, cfg.num_regions, cfg.seed) == (
        3000, 800, 20, 5, 0)
    log = generate_live_commerce(None)
    assert log.name == "synthetic live-commerce (seed 0)"
    assert (log.num_users, log.num_items) == (3000, 800)
    assert _same_log(log, generate_live_commerce(cfg))


# ---------------------------------------------------------------- validation

@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_users": 0}, "num_users must be >= 1, got 0"),
        ({"num_users": 2.5}, "num_users must be an integer >= 1, got 2.5"),
        ({"num_users": True}, "num_users must be an integer >= 1, got True"),
        ({"num_items": 0}, "num_items must be >= 1, got 0"),
        ({"num_merchants": 0}, "num_merchants must be >= 1, got 0"),
        ({"num_items": 5, "num_merchants": 6}, "num_merchants must be <= num_items (5), got 6"),
        ({"num_regions": 0}, "num_regions must be >= 1, got 0"),
        ({"num_categories": -1}, "num_categories must be >= 1, got -1"),
        ({"min_length": 0}, "min_length must be >= 1, got 0"),
        ({"max_length": 0}, "max_length must be >= 1, got 0"),
        ({"min_length": 10, "max_length": 9}, "max_length must be >= min_length (10), got 9"),
        ({"successors_per_item": 0}, "successors_per_item must be >= 1, got 0"),
        ({"transition_prob": -0.1}, "transition_prob must be in [0, 1], got -0.1"),
        ({"transition_prob": 1.5}, "transition_prob must be in [0, 1], got 1.5"),
        ({"transition_prob": "0.5"}, "transition_prob must be in [0, 1], got '0.5'"),
        ({"seed": -1}, "seed must be >= 0, got -1"),
    ],
)
def test_config_validation(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError) as err:
        SyntheticConfig(**kwargs)
    assert str(err.value) == message


# ---------------------------------------------------------------- shapes and invariants

def test_shapes_and_invariants(small_log: InteractionLog) -> None:
    log, cfg = small_log, SMALL
    assert "synthetic" in log.name.lower()
    assert any("SYNTHETIC" in note for note in log.report.notes)
    assert log.num_users == cfg.num_users and log.num_items == cfg.num_items
    assert log.report.rows_read == log.num_interactions
    assert log.event_names == EVENT_NAMES == ("view", "click", "like", "buy")
    merchants = log.item_features["merchant"]
    assert set(log.item_features) == {"merchant", "category", "title"}
    for feature in log.item_features.values():
        assert len(feature) == cfg.num_items + 1 and feature[0] == ""
    assert all(m.startswith("merchant-") for m in merchants[1:])  # every item has a merchant
    assert len(set(merchants[1:])) == cfg.num_merchants  # every merchant owns an item
    assert set(log.user_attributes["region"]) <= {f"region-{r}" for r in range(cfg.num_regions)}
    assert set(log.user_attributes["segment"]) == {"light", "regular", "heavy"}
    for u, seq in enumerate(log.sequences):
        assert seq.dtype == np.int64
        assert cfg.min_length <= len(seq) <= cfg.max_length
        assert seq.min() >= 1 and seq.max() <= cfg.num_items
        ts, ev, groups = log.timestamps[u], log.events[u], log.interaction_groups[u]
        assert len(ts) == len(ev) == len(groups) == len(seq)
        assert np.all(np.diff(ts) > 0)
        assert ev.min() >= 0 and ev.max() < len(EVENT_NAMES)
        assert list(groups) == [merchants[i] for i in seq]
    # the split used by training works on every user
    assert len(leave_one_out(log)) == cfg.num_users


def test_event_mix(small_log: InteractionLog) -> None:
    counts = np.bincount(np.concatenate(small_log.events), minlength=4)
    share = dict(zip(EVENT_NAMES, counts / counts.sum()))
    assert share["view"] > share["click"] > share["like"] > share["buy"] > 0


def test_buys_follow_engagement_with_the_same_merchant(small_log: InteractionLog) -> None:
    """A buy is far likelier when the viewer clicked or liked that merchant since her last buy."""
    click, like, buy = 1, 2, 3
    buys = {True: [0, 0], False: [0, 0]}  # engaged -> [buys, interactions]
    for ev, groups in zip(small_log.events, small_log.interaction_groups):
        engaged: set[str] = set()
        for e, m in zip(ev.tolist(), groups.tolist()):
            tally = buys[m in engaged]
            tally[0] += e == buy
            tally[1] += 1
            if e in (click, like):
                engaged.add(m)
            elif e == buy:
                engaged.discard(m)
    rate_engaged = buys[True][0] / buys[True][1]
    rate_cold = buys[False][0] / buys[False][1]
    assert rate_engaged > 5 * rate_cold


def test_degenerate_sizes() -> None:
    log = generate_live_commerce(SyntheticConfig(num_users=1, num_items=1, num_merchants=1,
                                                 num_regions=1, num_categories=1,
                                                 min_length=3, max_length=3))
    assert log.sequences[0].tolist() == [1, 1, 1]
    assert log.item_features["merchant"] == ["", "merchant-00"]


# ---------------------------------------------------------------- sequential structure

def _hit_rates(log: InteractionLog, *, k: int = 10,
               train_share: float = 0.8) -> tuple[float, float]:
    """HR@k on each held-out user's last item: first-order Markov vs popularity.

    Both are fit on the full sequences of the first ``train_share`` of users. The Markov predictor
    ranks the most frequent successors of the held-out user's second-to-last item and fills up
    with the most popular items.
    """
    n_train = int(train_share * log.num_users)
    popularity: Counter[int] = Counter()
    successors: dict[int, Counter[int]] = {}
    for seq in log.sequences[:n_train]:
        s = seq.tolist()
        popularity.update(s)
        for a, b in zip(s[:-1], s[1:]):
            successors.setdefault(a, Counter())[b] += 1
    top = [i for i, _ in popularity.most_common(k)]
    hits_markov = hits_pop = 0
    held_out = log.sequences[n_train:]
    for seq in held_out:
        prev, target = int(seq[-2]), int(seq[-1])
        ranked = [i for i, _ in successors.get(prev, Counter()).most_common(k)]
        ranked += [i for i in top if i not in ranked][: k - len(ranked)]
        hits_markov += target in ranked
        hits_pop += target in top
    return hits_markov / len(held_out), hits_pop / len(held_out)


def test_markov_beats_popularity(small_log: InteractionLog) -> None:
    markov, pop = _hit_rates(small_log)
    assert markov >= pop + 0.3, (markov, pop)
    assert markov >= 3 * pop, (markov, pop)


def test_no_transitions_no_markov_advantage() -> None:
    """Negative control: with transition_prob=0 the Markov test above would fail."""
    log = generate_live_commerce(SyntheticConfig(**{**SMALL.__dict__, "transition_prob": 0.0}))
    markov, pop = _hit_rates(log)
    assert markov < pop + 0.1, (markov, pop)


# ---------------------------------------------------------------- CSV

def test_write_csv(small_log: InteractionLog, tmp_path) -> None:
    path = tmp_path / "synthetic.csv"
    assert write_csv(small_log, path) == small_log.num_interactions
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    assert tuple(rows[0]) == CSV_HEADER == ("user", "item", "timestamp", "event", "group", "region")
    assert len(rows) == small_log.num_interactions + 1
    first = rows[1]
    log = small_log
    assert first == [log.users.raw(0), log.items.raw(int(log.sequences[0][0])),
                     str(int(log.timestamps[0][0])), EVENT_NAMES[int(log.events[0][0])],
                     str(log.interaction_groups[0][0]), str(log.user_attributes["region"][0])]
    by_user: dict[str, list[str]] = {}
    for user, item, *_ in rows[1:]:
        by_user.setdefault(user, []).append(item)
    for u, seq in enumerate(log.sequences):
        assert by_user[log.users.raw(u)] == [log.items.raw(i) for i in seq.tolist()]


@pytest.mark.skipif(not hasattr(data, "read_interactions"),
                    reason="core_model.data.read_interactions not available yet")
def test_csv_round_trip(small_log: InteractionLog, tmp_path) -> None:
    path = tmp_path / "synthetic.csv"
    write_csv(small_log, path)
    back = data.read_interactions(path, user_col="user", item_col="item",
                                  timestamp_col="timestamp", event_col="event",
                                  group_col="group")
    original = {small_log.users.raw(u): u for u in range(small_log.num_users)}
    assert back.num_users == small_log.num_users
    for v, seq in enumerate(back.sequences):
        u = original[back.users.raw(v)]
        assert [back.items.raw(i) for i in seq.tolist()] == \
            [small_log.items.raw(i) for i in small_log.sequences[u].tolist()]
        if back.timestamps is not None:
            np.testing.assert_array_equal(back.timestamps[v], small_log.timestamps[u])
        if back.events is not None and back.event_names is not None:
            assert [back.event_names[e] for e in back.events[v].tolist()] == \
                [EVENT_NAMES[e] for e in small_log.events[u].tolist()]
        if back.interaction_groups is not None:
            assert list(back.interaction_groups[v]) == list(small_log.interaction_groups[u])
