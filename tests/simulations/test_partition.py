"""Partitioners: every scheme is disjoint, complete and seeded; hand-checked assignments;
skew grows as the Dirichlet alpha shrinks; every bad parameter is an error naming it."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import require_shared
from core_model.data import InteractionLog, LoadReport, Vocabulary, leave_one_out
from core_model.synthetic import SyntheticConfig, generate_live_commerce
from simulations.partition import (
    SCHEMES,
    Partition,
    label_distribution,
    natural_key,
    partition_users,
)

RANDOM_SCHEMES = ("iid", "dirichlet-size", "dirichlet-label")


def make_log(lengths, *, attributes=None, groups=None) -> InteractionLog:
    """A tiny log: user ``u`` has ``lengths[u]`` interactions with items 1, 2, ..."""
    seqs = [np.arange(1, n + 1, dtype=np.int64) for n in lengths]
    return InteractionLog(
        name="tiny", sequences=seqs,
        items=Vocabulary(tuple(str(i) for i in range(1, max(lengths) + 1)), offset=1),
        users=Vocabulary(tuple(f"u{u}" for u in range(len(lengths)))),
        report=LoadReport(source="memory"),
        interaction_groups=None if groups is None else [np.array(g, dtype=str) for g in groups],
        user_attributes={k: np.array(v, dtype=str) for k, v in (attributes or {}).items()},
    )


@pytest.fixture(scope="module")
def synthetic():
    log = generate_live_commerce(SyntheticConfig(num_users=300, num_items=50, num_merchants=5,
                                                 seed=0))
    return log, leave_one_out(log)


def scheme_kwargs(scheme: str) -> dict:
    return {"attribute": {"attribute": "region"}, "group": {},
            "iid": {"num_clients": 7}, "dirichlet-size": {"num_clients": 7},
            "dirichlet-label": {"num_clients": 7}}[scheme]


def same(a: Partition, b: Partition) -> bool:
    return a.names == b.names and all(np.array_equal(x, y) for x, y in zip(a.rows, b.rows))


# -- every scheme ------------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", SCHEMES)
def test_every_scheme_is_disjoint_complete_and_deterministic(synthetic, scheme):
    log, split = synthetic
    part = partition_users(log, split, scheme=scheme, seed=3, **scheme_kwargs(scheme))
    part.validate(len(split))
    owner = part.client_of_rows()
    assert owner.shape == (len(split),) and owner.min() == 0
    assert np.array_equal(np.bincount(owner, minlength=part.num_clients), part.sizes())
    assert all(np.all(np.diff(r) > 0) and r.dtype == np.int64 for r in part.rows)
    assert part.sizes().min() >= 1 and part.sizes().sum() == len(split) == 300
    assert part.scheme == scheme
    assert same(part, partition_users(log, split, scheme=scheme, seed=3, **scheme_kwargs(scheme)))


@pytest.mark.parametrize("scheme", RANDOM_SCHEMES)
def test_random_schemes_change_with_the_seed(synthetic, scheme):
    log, split = synthetic
    a = partition_users(log, split, scheme=scheme, seed=0, **scheme_kwargs(scheme))
    b = partition_users(log, split, scheme=scheme, seed=1, **scheme_kwargs(scheme))
    assert not same(a, b)


@pytest.mark.parametrize("scheme", ("attribute", "group"))
def test_data_driven_schemes_ignore_the_seed(synthetic, scheme):
    log, split = synthetic
    a = partition_users(log, split, scheme=scheme, seed=0, **scheme_kwargs(scheme))
    b = partition_users(log, split, scheme=scheme, seed=1, **scheme_kwargs(scheme))
    assert same(a, b)


# -- attribute and group: hand examples --------------------------------------------------------


def test_attribute_groups_users_by_value_in_natural_order():
    # user 2 is too short for leave-one-out, so split rows are users 0, 1, 3, 4, 5
    log = make_log([3, 4, 2, 3, 5, 3],
                   attributes={"region": ["b", "10", "a", "2", "10", "b"]})
    split = leave_one_out(log)
    assert split.user_index.tolist() == [0, 1, 3, 4, 5]
    part = partition_users(log, split, scheme="attribute", attribute="region")
    assert part.names == ("2", "10", "b")            # "a" belonged only to the removed user
    assert [r.tolist() for r in part.rows] == [[2], [1, 3], [0, 4]]
    rep = part.report()
    assert rep["sizes"] == {"2": 1, "10": 2, "b": 2}
    assert (rep["clients"], rep["users"], rep["min_users"], rep["median_users"],
            rep["max_users"]) == (3, 5, 1, 2.0, 2)
    assert "'region'" in rep["notes"][0]


def test_group_takes_the_majority_group_and_breaks_ties_by_smallest_label():
    groups = [["m1", "m2", "m2"],             # majority m2
              ["m10", "m2", "m10", "m2"],     # tie: m2 < m10 in natural order
              ["m1", "m1", "m10"],            # majority m1
              ["m3", "m3", "m3"]]             # all m3
    log = make_log([3, 4, 3, 3], groups=groups)
    part = partition_users(log, leave_one_out(log), scheme="group")
    assert part.names == ("m1", "m2", "m3")            # m10 is nobody's main group
    assert [r.tolist() for r in part.rows] == [[2], [0, 1], [3]]
    notes = " ".join(part.notes)
    assert "4 of 13 interactions (30.8%), of 3 users" in notes
    assert "1 groups have no client" in notes and "m10" in notes


def test_natural_key_orders_digit_runs_numerically():
    values = ["10", "other", "2", "community-10", "community-2", "9"]
    assert sorted(values, key=natural_key) == ["2", "9", "10", "community-2",
                                               "community-10", "other"]


# -- random schemes ----------------------------------------------------------------------------


def test_iid_sizes_differ_by_at_most_one(synthetic):
    log, split = synthetic
    part = partition_users(log, split, scheme="iid", num_clients=7, seed=0)
    assert sorted(part.sizes().tolist()) == [42] + [43] * 6      # 300 = 6 * 43 + 42
    assert part.names[0] == "iid-0000" and part.names[-1] == "iid-0006"


def cv(sizes: np.ndarray) -> float:
    return float(sizes.std() / sizes.mean())


def test_dirichlet_size_is_more_skewed_for_small_alpha(synthetic):
    log, split = synthetic
    small = [cv(partition_users(log, split, scheme="dirichlet-size", num_clients=10,
                                alpha=0.1, seed=s).sizes()) for s in range(5)]
    large = [cv(partition_users(log, split, scheme="dirichlet-size", num_clients=10,
                                alpha=100.0, seed=s).sizes()) for s in range(5)]
    assert min(small) > max(large)
    assert max(large) < 0.2 and np.mean(small) > 0.8


def test_dirichlet_size_keeps_min_users_even_for_tiny_alpha(synthetic):
    log, split = synthetic
    part = partition_users(log, split, scheme="dirichlet-size", num_clients=20, alpha=0.01,
                           seed=0, min_users=5)
    assert part.sizes().min() >= 5 and part.sizes().sum() == 300


def label_skew(part: Partition, labels: np.ndarray) -> float:
    """Mean total-variation distance between each client's label shares and the global ones."""
    _, shares = label_distribution(part, labels)
    _, counts = np.unique(labels, return_counts=True)
    return float(0.5 * np.abs(shares - counts / counts.sum()).sum(axis=1).mean())


def test_dirichlet_label_is_more_skewed_for_small_alpha(synthetic):
    log, split = synthetic
    labels = log.user_attributes["region"][split.user_index]
    skew = {alpha: np.mean([label_skew(partition_users(
        log, split, scheme="dirichlet-label", num_clients=5, alpha=alpha, seed=s), labels)
        for s in range(3)]) for alpha in (0.1, 100.0)}
    assert skew[0.1] > 0.4 > 0.1 > skew[100.0]


def test_dirichlet_label_leaves_no_client_below_min_users(synthetic):
    log, split = synthetic
    part = partition_users(log, split, scheme="dirichlet-label", num_clients=30, alpha=0.05,
                           seed=0, min_users=4)
    assert part.sizes().min() >= 4
    part.validate(len(split))
    moved = int(part.notes[1].split()[0])
    assert moved > 0                       # with alpha=0.05 most clients start empty


def test_dirichlet_label_uses_the_given_attribute(synthetic):
    log, split = synthetic
    part = partition_users(log, split, scheme="dirichlet-label", num_clients=4,
                           attribute="segment", seed=0)
    assert "'segment'" in part.notes[0]


# -- errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, message", [
    ({"scheme": "regions"}, "scheme must be one of"),
    ({"scheme": "iid"}, "num_clients must be an integer >= 1 for scheme 'iid', got None"),
    ({"scheme": "dirichlet-size", "num_clients": 0}, "num_clients must be an integer >= 1"),
    ({"scheme": "iid", "num_clients": 2.5}, "got 2.5"),
    ({"scheme": "dirichlet-label", "num_clients": 301},
     "num_clients must be <= the 300 users of the split"),
    ({"scheme": "dirichlet-size", "num_clients": 3, "alpha": 0}, "alpha must be a finite "
                                                                "number > 0, got 0"),
    ({"scheme": "dirichlet-label", "num_clients": 3, "alpha": -1.0}, "got -1.0"),
    ({"scheme": "dirichlet-size", "num_clients": 3, "alpha": float("nan")}, "got nan"),
    ({"scheme": "iid", "num_clients": 100, "min_users": 4},
     "min_users * num_clients must be <= the 300 users of the split, got 4 * 100 = 400"),
    ({"scheme": "iid", "num_clients": 3, "min_users": 0}, "min_users must be an integer >= 1"),
    ({"scheme": "iid", "num_clients": 3, "seed": -1}, "seed must be an integer >= 0, got -1"),
    ({"scheme": "attribute"}, "attribute is required for scheme 'attribute'"),
    ({"scheme": "attribute", "attribute": "zip"},
     "attribute 'zip' is not a user attribute of 'synthetic live-commerce (seed 0)'; "
     "available: ['region', 'segment']"),
    ({"scheme": "dirichlet-label", "num_clients": 3, "attribute": "age"},
     "available: ['region', 'segment']"),
    ({"scheme": "attribute", "attribute": "region", "num_clients": 3},
     "num_clients must equal the number of distinct 'region' values (5)"),
    ({"scheme": "group", "num_clients": 2}, "distinct group values (5)"),
    ({"scheme": "attribute", "attribute": "region", "min_users": 100},
     "min_users is 100 but"),
])
def test_bad_parameters_name_the_parameter(synthetic, kwargs, message):
    log, split = synthetic
    with pytest.raises(ValueError) as err:
        partition_users(log, split, **kwargs)
    assert message in str(err.value)


def test_group_needs_interaction_groups():
    log = make_log([3, 3], attributes={"region": ["1", "2"]})
    with pytest.raises(ValueError, match=r"scheme 'group' needs per-interaction groups.*"
                                         r"interaction_groups=None.*\['region'\]"):
        partition_users(log, leave_one_out(log), scheme="group")


def test_dirichlet_label_without_region_needs_an_attribute():
    log = make_log([3, 3], attributes={"community": ["1", "2"]})
    with pytest.raises(ValueError, match=r"attribute 'region' is not a user attribute of "
                                         r"'tiny'; available: \['community'\]"):
        partition_users(log, leave_one_out(log), scheme="dirichlet-label", num_clients=2)


def test_split_from_another_log_is_an_error(synthetic):
    log, split = synthetic
    small = make_log([3, 3], attributes={"region": ["1", "2"]})
    with pytest.raises(ValueError, match="split.user_index must index the 2 users"):
        partition_users(small, split, scheme="iid", num_clients=2)


# -- Partition ---------------------------------------------------------------------------------


def test_partition_validate_rejects_overlap_gaps_and_range():
    rows = (np.array([0, 2]), np.array([1, 3]))
    part = Partition(names=("a", "b"), rows=rows, scheme="hand")
    part.validate(4)
    assert part.client_of_rows().tolist() == [0, 1, 0, 1]
    assert part.client_of_rows(6).tolist() == [0, 1, 0, 1, -1, -1]
    with pytest.raises(ValueError, match=r"incomplete: 1 of 5 rows belong to no client "
                                         r"\(first: \[4\]\)"):
        part.validate(5)
    with pytest.raises(ValueError, match=r"client 'b' holds row 3, outside 0..2"):
        part.validate(3)
    overlap = Partition(names=("a", "b"), rows=(np.array([0, 1]), np.array([1, 2])),
                        scheme="hand")
    with pytest.raises(ValueError, match="row 1 is held by clients 'a' and 'b'"):
        overlap.validate(3)
    twice = Partition(names=("a",), rows=(np.array([0, 0, 1]),), scheme="hand")
    with pytest.raises(ValueError, match="client 'a' holds row 0 more than once"):
        twice.validate(2)


def test_partition_rejects_bad_construction_and_is_read_only():
    with pytest.raises(ValueError, match="one entry per client, got 2 names and 1 row arrays"):
        Partition(names=("a", "b"), rows=(np.array([0]),), scheme="hand")
    with pytest.raises(ValueError, match="client names must be unique, 'a' appears"):
        Partition(names=("a", "a"), rows=(np.array([0]), np.array([1])), scheme="hand")
    with pytest.raises(ValueError, match="rows of client 'a' must be a 1-D integer array"):
        Partition(names=("a",), rows=(np.array([0.5]),), scheme="hand")
    part = Partition(names=("a",), rows=(np.array([2, 0, 1]),), scheme="hand")
    assert part.rows[0].tolist() == [0, 1, 2] and part.rows[0].dtype == np.int64
    with pytest.raises(ValueError):
        part.rows[0][0] = 5


# -- real data ---------------------------------------------------------------------------------


@pytest.mark.realdata
def test_ml1m_regions_give_ten_clients_covering_every_user():
    from core_model.data import read_movielens_1m

    log = read_movielens_1m(require_shared("ml-1m"))
    split = leave_one_out(log)
    part = partition_users(log, split, scheme="attribute", attribute="region")
    part.validate(len(split))
    assert part.names == tuple(str(d) for d in range(10))
    assert part.sizes().sum() == len(split) == 6040
    regions = log.user_attributes["region"][split.user_index]
    for name, rows in zip(part.names, part.rows):
        assert np.all(regions[rows] == name)


@pytest.mark.realdata
def test_twitch_group_scheme_matches_the_home_community_attribute():
    from core_model.data import read_twitch

    log = read_twitch(require_shared("twitch/twitch105k.csv.gz"))
    split = leave_one_out(log)
    by_attribute = partition_users(log, split, scheme="attribute", attribute="community")
    by_group = partition_users(log, split, scheme="group")
    # read_twitch's home community and the group scheme use the same rule (majority, ties ->
    # smallest label numerically), so the two federations must coincide.
    assert same(by_attribute, by_group)
    assert by_attribute.names == tuple(str(c) for c in range(11))
    assert by_attribute.sizes().sum() == len(split)
