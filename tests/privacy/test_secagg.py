"""SecAgg+ protocol math: exact sums under dropouts, aborts below threshold, what the server sees,
quantization, the communication graph, client refusals, Shamir sharing and share encryption."""

from __future__ import annotations

import itertools
import json
import random
import re

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from privacy.secagg import (
    PRIME,
    STAGES,
    CommunicationGraph,
    Quantizer,
    SecAggAborted,
    SecAggClient,
    SecAggError,
    SecAggServer,
    choose_graph,
    default_degree,
    prg,
    shamir_reconstruct,
    shamir_share,
)

ROUND = 7


def run_round(graph, vectors, *, drop_at=None, log=None, round_id=ROUND, corrupt=None, servers=None):
    """Drive one round. ``drop_at[u] = s``: client ``u`` does not answer stage ``s`` (0..3) or later.

    A client that refuses (``SecAggAborted``) counts as dropped at that stage. ``corrupt[(u, stage)]``
    rewrites client ``u``'s reply at that stage (a stage name) before the server sees it; the server
    is appended to ``servers``. Returns ``(outcome, answered)``: the server's ``(total, summary)`` or
    the ``SecAggAborted`` it raised, and the sets ``[U1, U2, U3, U4]`` of clients that answered each
    stage.
    """
    drop_at, corrupt = drop_at or {}, corrupt or {}
    length = len(next(iter(vectors.values())))
    server = SecAggServer(graph, round_id=round_id, vector_length=length)
    if servers is not None:
        servers.append(server)
    clients = {u: SecAggClient(u, round_id) for u in graph.clients}
    calls = {
        "advertise_keys": lambda u, req: clients[u].advertise_keys(req),
        "share_keys": lambda u, req: clients[u].share_keys(req),
        "masked_input": lambda u, req: clients[u].masked_input(req, vectors[u]),
        "unmasking": lambda u, req: clients[u].unmask(req),
    }
    steps = [server.share_keys, server.masked_input, server.unmask, server.aggregate]
    requests = server.advertise_keys()
    answered = []
    for s, stage in enumerate(STAGES):
        replies = {}
        for u, request in requests.items():
            if drop_at.get(u, 99) <= s:
                continue
            try:
                replies[u] = calls[stage](u, request)
            except SecAggAborted:
                continue
            if (u, stage) in corrupt:
                replies[u] = corrupt[(u, stage)](replies[u])
        answered.append(frozenset(replies))
        if log is not None:
            log.append((stage, replies))
        try:
            requests = steps[s](replies)
        except SecAggAborted as error:
            return error, answered
    return requests, answered


def needed_secrets(graph, answered):
    """Owners whose secret the server must rebuild: every U3 client, and U2 - U3 clients next to U3."""
    _, u2, u3, _ = answered
    return set(u3) | {v for v in u2 - u3 if graph.neighbours[v] & u3}


def plain_sum(vectors, ids):
    total = np.zeros(len(next(iter(vectors.values()))), dtype=np.uint64)
    for u in ids:
        total += vectors[u]
    return total


def random_vectors(ids, length, seed, quantizer):
    rng = np.random.default_rng(seed)
    return {u: quantizer.quantize(rng.uniform(-quantizer.bound, quantizer.bound, length)) for u in ids}


# ------------------------------------------------------------------------------ exact sums

@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), n=st.integers(2, 12), length=st.integers(1, 40), seed=st.integers(0, 2**32))
def test_sum_is_exact_under_random_dropouts_or_the_round_aborts(data, n, length, seed):
    degree = data.draw(st.sampled_from([k for k in range(1, n) if n * k % 2 == 0]), label="degree")
    threshold = data.draw(st.integers(degree // 2 + 1, degree), label="threshold")
    ids = random.Random(seed).sample(range(1, 10 * n), n)
    graph = choose_graph(ids, degree=degree, threshold=threshold, rng=random.Random(seed))
    drops = data.draw(st.lists(st.sampled_from((None,) * 8 + (0, 1, 2, 3)), min_size=n, max_size=n),
                      label="drop stage per client")
    quantizer = Quantizer(4.0, max_clients=n)
    vectors = random_vectors(ids, length, seed, quantizer)

    outcome, answered = run_round(graph, vectors,
                                  drop_at={u: s for u, s in zip(ids, drops) if s is not None})

    u1, u2, u3, u4 = answered
    need = needed_secrets(graph, answered)
    short = {v: len(graph.neighbours[v] & u4) for v in need if len(graph.neighbours[v] & u4) < threshold}
    event("exact sum" if u3 and not short else "aborted")
    if u3 and not short:
        total, summary = outcome
        assert total.dtype == np.uint64 and total.shape == (length,)
        np.testing.assert_array_equal(total, plain_sum(vectors, u3))
        assert summary.survivors == tuple(sorted(u3))
        assert summary.dropped == {
            "advertise_keys": tuple(sorted(set(ids) - u1)), "share_keys": tuple(sorted(u1 - u2)),
            "masked_input": tuple(sorted(u2 - u3)), "unmasking": tuple(sorted(u3 - u4))}
        assert set(summary.keys_reconstructed) == need - u3
    else:
        assert isinstance(outcome, SecAggAborted), f"expected an abort, got a result; short: {short}"
        if u3:
            assert outcome.client_id in short and outcome.available == short[outcome.client_id]
            assert outcome.needed == threshold > outcome.available


# ------------------------------------------------------------------ malformed replies: dropouts

def _short_by_one(key):
    return lambda r: dict(r, **{key: r[key][:-1]})


MALFORMED = [  # (stage, rewrite of client 2's reply, what the server says)
    ("advertise_keys", lambda r: dict(r, c_pk=r["c_pk"][:31]), "field 'c_pk' must be 32 bytes, got 31 bytes"),
    ("advertise_keys", lambda r: dict(r, s_pk=bytes(32)),
     "field 's_pk' is not a usable X25519 public key"),  # a low-order point: every neighbour's agreement would fail
    ("share_keys", lambda r: dict(r, receivers=r["receivers"][:-1], ciphertexts=r["ciphertexts"][:-1]),
     r"receivers \[1, 3, 4\] differ from the alive neighbours it was sent \[1, 3, 4, 5\]"),
    ("share_keys", lambda r: dict(r, ciphertexts=[c[:-1] for c in r["ciphertexts"]]),
     "field 'ciphertexts' must be a list of 4 byte strings of 160 bytes each"),
    ("masked_input", lambda r: dict(r, masked=r["masked"][:-8]), "field 'masked' must be 48 bytes, got 40 bytes"),
    ("masked_input", lambda r: {}, r"field 'masked' is missing \(fields: \[\]\)"),
    ("unmasking", lambda r: dict(r, seed_owners=r["seed_owners"][:-1], seed_shares=r["seed_shares"][:-1]),
     r"seed_owners \[1, 3, 4\] differ from the request \[1, 3, 4, 5\]"),
    ("unmasking", lambda r: dict(r, seed_shares=[b"\xff" * 66] + r["seed_shares"][1:]),
     "the share for client 1 is outside the field"),
]


@pytest.mark.parametrize("stage,rewrite,reason", MALFORMED)
def test_a_malformed_reply_is_a_dropout_at_its_stage_and_the_sum_stays_exact(stage, rewrite, reason):
    # 5 clients, complete graph: degree 4, threshold 3; client 2's reply at `stage` is malformed
    graph = choose_graph(range(1, 6))
    vectors = random_vectors(range(1, 6), 6, 3, Quantizer(1.0, max_clients=5))
    servers = []
    (total, summary), answered = run_round(graph, vectors, corrupt={(2, stage): rewrite}, servers=servers)

    (server,) = servers
    assert list(server.rejected[stage]) == [2]
    assert re.search(reason, server.rejected[stage][2]), server.rejected[stage][2]
    assert server.rejected[stage][2].startswith(f"round {ROUND}, {stage} reply of client 2: ")
    assert all(not reasons for s, reasons in server.rejected.items() if s != stage)
    assert summary.dropped == {s: (2,) if s == stage else () for s in STAGES}
    # a client rejected before its masked input is out of the sum (its neighbours' masks with it
    # removed as for any dropout); one rejected at unmasking is in it (its shares are not needed)
    in_sum = [1, 2, 3, 4, 5] if stage == "unmasking" else [1, 3, 4, 5]
    assert summary.survivors == tuple(in_sum)
    np.testing.assert_array_equal(total, plain_sum(vectors, in_sum))
    if stage == "masked_input":  # it shared its keys: its mask key was rebuilt to cancel its pairwise masks
        assert summary.keys_reconstructed == (2,)


def test_malformed_replies_below_threshold_abort_explicitly_and_are_still_recorded():
    graph = choose_graph(range(1, 6))  # threshold 3
    vectors = random_vectors(range(1, 6), 6, 3, Quantizer(1.0, max_clients=5))
    bad = lambda r: dict(r, seed_shares=[b"\xff" * 66] + r["seed_shares"][1:])  # noqa: E731
    servers = []
    outcome, _ = run_round(graph, vectors, corrupt={(u, "unmasking"): bad for u in (1, 2, 3)}, servers=servers)
    assert isinstance(outcome, SecAggAborted) and outcome.available == 2 and outcome.needed == 3
    assert "cannot reconstruct the self-mask seed of client 1: 2 share(s) available, 3 needed" in str(outcome)
    assert sorted(servers[0].rejected["unmasking"]) == [1, 2, 3]
    with pytest.raises(RuntimeError, match="no result"):
        servers[0].result()

    # at share_keys: three of four neighbours rejected, client 1 refuses to mask (its secrets could
    # never be rebuilt), nobody is left with a masked input
    servers = []
    outcome, answered = run_round(graph, vectors, corrupt={(u, "share_keys"): _short_by_one("receivers")
                                                           for u in (2, 3, 4)}, servers=servers)
    assert isinstance(outcome, SecAggAborted) and "no masked input was received" in str(outcome)
    assert sorted(servers[0].rejected["share_keys"]) == [2, 3, 4]


def test_no_dropouts_sum_dequantizes_to_the_float_sum():
    quantizer = Quantizer(1.0, max_clients=5)
    rng = np.random.default_rng(0)
    floats = {u: rng.uniform(-1, 1, 50).astype(np.float32) for u in range(1, 6)}
    vectors = {u: quantizer.quantize(x) for u, x in floats.items()}
    (total, summary), _ = run_round(choose_graph(range(1, 6)), vectors)
    np.testing.assert_array_equal(total, plain_sum(vectors, range(1, 6)))
    expected = sum(x.astype(np.float64) for x in floats.values())
    assert np.max(np.abs(quantizer.dequantize(total) - expected)) <= 5 * 2.0**-25
    assert summary.survivors == (1, 2, 3, 4, 5) and summary.components == 1
    assert summary.keys_reconstructed == () and summary.seeds_reconstructed == (1, 2, 3, 4, 5)
    assert json.loads(json.dumps(summary.to_dict()))["dropped"] == {stage: [] for stage in STAGES}


def test_sparse_graph_with_one_dropout_at_every_stage():
    graph = choose_graph(range(1, 17), degree=6, rng=random.Random(3))  # threshold 4: 2 may drop
    # four clients of which no neighbourhood holds more than 2, dropping at stages 0, 1, 2, 3
    a, b, c, d = next(drop for drop in itertools.combinations(graph.clients, 4)
                      if all(len(vs & set(drop)) <= 2 for vs in graph.neighbours.values()))
    vectors = random_vectors(graph.clients, 30, 1, Quantizer(1.0, max_clients=16))
    (total, summary), _ = run_round(graph, vectors, drop_at={a: 0, b: 1, c: 2, d: 3})
    survivors = set(graph.clients) - {a, b, c}
    np.testing.assert_array_equal(total, plain_sum(vectors, survivors))
    assert summary.survivors == tuple(sorted(survivors)) and summary.components == 1
    assert summary.dropped == {"advertise_keys": (a,), "share_keys": (b,), "masked_input": (c,),
                               "unmasking": (d,)}  # d's input still counts
    assert summary.keys_reconstructed == (c,)  # dropped after sharing its keys
    assert (summary.degree, summary.threshold) == (6, 4)


# A graph where the survivors' seeds all have enough shares but the mask key of client 9 (which
# dropped after sharing its keys) is held only by 1, 2, 3; 2 and 3 answer nothing at unmasking.
EDGES = [(9, 1), (9, 2), (9, 3), (2, 4), (2, 5), (3, 6), (3, 7), (1, 4), (1, 6), (4, 5), (5, 8),
         (6, 7), (7, 8)]


def edge_graph(edges, threshold):
    neighbours = {}
    for a, b in edges:
        neighbours.setdefault(a, set()).add(b)
        neighbours.setdefault(b, set()).add(a)
    return CommunicationGraph(neighbours=neighbours, threshold=threshold)


def test_abort_names_the_dropped_client_whose_key_has_too_few_shares():
    graph = edge_graph(EDGES, threshold=2)
    vectors = random_vectors(range(1, 10), 8, 2, Quantizer(1.0, max_clients=9))

    (total, summary), _ = run_round(graph, vectors, drop_at={9: 2, 2: 3})  # 1 and 3 hold 9's key
    np.testing.assert_array_equal(total, plain_sum(vectors, range(1, 9)))
    assert summary.keys_reconstructed == (9,)

    outcome, _ = run_round(graph, vectors, drop_at={9: 2, 2: 3, 3: 3})  # only 1 holds 9's key
    assert isinstance(outcome, SecAggAborted)
    assert str(outcome) == (f"round {ROUND}: cannot reconstruct the mask private key of client 9: "
                            "1 share(s) available, 2 needed")
    assert (outcome.client_id, outcome.available, outcome.needed, outcome.stage) == (9, 1, 2, "unmasking")


def test_a_dropped_client_with_no_surviving_neighbour_needs_no_reconstruction():
    graph = edge_graph([(1, 2), (2, 3), (3, 1), (4, 5), (5, 6), (6, 4)], threshold=2)
    vectors = random_vectors(range(1, 7), 8, 4, Quantizer(1.0, max_clients=6))
    (total, summary), _ = run_round(graph, vectors, drop_at={4: 2, 5: 2, 6: 2})
    np.testing.assert_array_equal(total, plain_sum(vectors, [1, 2, 3]))
    assert summary.keys_reconstructed == () and summary.dropped["masked_input"] == (4, 5, 6)


def test_abort_when_survivors_seeds_have_too_few_shares_and_no_result_is_left():
    graph = choose_graph(range(1, 6))  # complete: degree 4, threshold 3
    vectors = random_vectors(range(1, 6), 8, 3, Quantizer(1.0, max_clients=5))
    server = SecAggServer(graph, round_id=ROUND, vector_length=8)
    clients = {u: SecAggClient(u, ROUND) for u in range(1, 6)}
    requests = server.advertise_keys()
    requests = server.share_keys({u: clients[u].advertise_keys(r) for u, r in requests.items()})
    requests = server.masked_input({u: clients[u].share_keys(r) for u, r in requests.items()})
    requests = server.unmask({u: clients[u].masked_input(r, vectors[u]) for u, r in requests.items()})
    replies = {u: clients[u].unmask(requests[u]) for u in (1, 2)}
    with pytest.raises(SecAggAborted, match=r"cannot reconstruct the self-mask seed of client 1: "
                                            r"1 share\(s\) available, 3 needed \(and 4 more"):
        server.aggregate(replies)
    with pytest.raises(RuntimeError, match="no result"):
        server.result()


def test_abort_when_no_masked_input_arrives():
    vectors = random_vectors(range(1, 4), 4, 4, Quantizer(1.0, max_clients=3))
    outcome, _ = run_round(choose_graph(range(1, 4)), vectors, drop_at={1: 2, 2: 2, 3: 2})
    assert isinstance(outcome, SecAggAborted) and "no masked input was received" in str(outcome)


def test_client_refuses_when_too_few_neighbours_are_alive():
    graph = choose_graph(range(1, 6))  # threshold 3 of 4
    server = SecAggServer(graph, round_id=ROUND, vector_length=4)
    clients = {u: SecAggClient(u, ROUND) for u in range(1, 6)}
    requests = server.advertise_keys()
    requests = server.share_keys({u: clients[u].advertise_keys(requests[u]) for u in (1, 2, 3)})
    with pytest.raises(SecAggAborted, match="only 2 of client 1's 4 neighbours are alive, threshold 3"):
        clients[1].share_keys(requests[1])


def test_server_steps_run_in_order():
    server = SecAggServer(choose_graph(range(1, 4)), round_id=ROUND, vector_length=4)
    with pytest.raises(RuntimeError, match=r"aggregate\(\) called out of order.*advertise_keys\(\)"):
        server.aggregate({})
    server.advertise_keys()
    with pytest.raises(SecAggError, match=r"replies from client\(s\) \[4\], which were not asked"):
        server.share_keys({4: {}})


# ----------------------------------------------------------------------------- server's view

def test_server_sees_uniform_masked_vectors_and_only_the_exact_sum():
    length, n = 100_000, 4
    quantizer = Quantizer(1.0, max_clients=n)
    t = np.linspace(0, 20 * np.pi, length)
    floats = {u: (0.9 * np.sin(u * t)).astype(np.float32) for u in range(1, n + 1)}
    vectors = {u: quantizer.quantize(x) for u, x in floats.items()}
    log = []
    (total, _), _ = run_round(choose_graph(range(1, n + 1)), vectors, log=log)

    received = {stage: replies for stage, replies in log}
    assert set(received) == set(STAGES)
    for u, reply in received["masked_input"].items():
        masked = np.frombuffer(reply["masked"], dtype="<u8")
        truth = vectors[u].view(np.int64).astype(np.float64)
        assert abs(np.corrcoef(truth, truth)[0, 1] - 1) < 1e-12  # the update itself is far from noise
        r = np.corrcoef(masked.astype(np.float64), truth)[0, 1]
        assert abs(r) < 0.05, f"client {u}: masked vector correlates with its update (r = {r:.3f})"
        uniform = masked / 2.0**64
        assert abs(uniform.mean() - 0.5) < 0.01 and abs(uniform.std() - 12**-0.5) < 0.01
        assert not np.any(masked == vectors[u])  # P(one coordinate equal by chance) ~ 1e5 / 2**64
    for stage in ("advertise_keys", "share_keys", "unmasking"):  # nothing else carries the update
        for reply in received[stage].values():
            blob = b"".join(v if isinstance(v, bytes) else b"".join(x for x in v if isinstance(x, bytes))
                            for v in reply.values() if isinstance(v, (bytes, list)))
            assert len(blob) < 1000
    np.testing.assert_array_equal(total, plain_sum(vectors, range(1, n + 1)))
    expected = sum(x.astype(np.float64) for x in floats.values())
    assert np.max(np.abs(quantizer.dequantize(total) - expected)) <= n * 2.0**-25


# --------------------------------------------------------------------------------- quantizer

def test_quantizer_round_trip_and_negative_sums():
    quantizer = Quantizer(2.0, max_clients=3, scale_bits=16)
    values = np.array([-2.0, -1.2345678, -2.0**-17, 0.0, 0.3, 1.999999, 2.0])
    q = quantizer.quantize(values)
    assert q.dtype == np.uint64 and q[0] == 2**64 - 2 * 2**16  # -2 * 2**16 as two's complement
    back = quantizer.dequantize(q)
    assert back.dtype == np.float64 and np.max(np.abs(back - values)) <= 2.0**-17
    assert quantizer.dequantize(q + q + q)[0] == -6.0  # wraps mod 2**64, reads back as int64
    q32 = quantizer.quantize(values.astype(np.float32))
    assert np.max(np.abs(quantizer.dequantize(q32) - values.astype(np.float32))) <= 2.0**-17


def test_quantizer_defaults():
    quantizer = Quantizer(1.0, max_clients=2**38)
    assert quantizer.scale_bits == 24
    x = np.random.default_rng(5).uniform(-1, 1, 1000)
    assert np.max(np.abs(quantizer.dequantize(quantizer.quantize(x)) - x)) <= 2.0**-25


@pytest.mark.parametrize("values,message", [
    (np.array([0.0, 1.5, -3.0]), r"values\[1\] = 1\.5 is outside the quantization bound \[-1\.0, 1\.0\]"),
    (np.array([0.0, -1.0000001]), r"values\[1\] = -1\.0000001 is outside the quantization bound"),
    (np.array([0.5, np.nan, 2.0]), r"values\[1\] = nan is not finite \(quantization bound \[-1\.0, 1\.0\]\)"),
    (np.array([np.inf]), r"values\[0\] = inf is not finite"),
    (np.array([1, 2]), "values must be a float numpy array, got dtype int64"),
    (np.zeros((2, 2)), r"values must be 1-D, got shape \(2, 2\)"),
])
def test_quantizer_rejects_bad_values_naming_the_first(values, message):
    with pytest.raises(ValueError, match=message):
        Quantizer(1.0, max_clients=4).quantize(values)


@pytest.mark.parametrize("kwargs,message", [
    (dict(bound=1.0, max_clients=2**39, scale_bits=24),
     r"max_clients \* ceil\(bound \* 2\*\*scale_bits\) must be < 2\*\*63 .* got 549755813888 \* 16777216"),
    (dict(bound=2.0**40, max_clients=1, scale_bits=24), r"must be < 2\*\*63"),
    (dict(bound=0.0, max_clients=1), r"bound must be a finite number > 0, got 0\.0"),
    (dict(bound=float("nan"), max_clients=1), "bound must be a finite number > 0, got nan"),
    (dict(bound=1.0, max_clients=0), "max_clients must be an int >= 1, got 0"),
    (dict(bound=1.0, max_clients=1, scale_bits=63), r"scale_bits must be an int in \[0, 62\], got 63"),
])
def test_quantizer_rejects_bad_parameters(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Quantizer(**kwargs)
    assert Quantizer(1.0, max_clients=2**39 - 1)  # just below the overflow limit


def test_dequantize_needs_uint64():
    with pytest.raises(ValueError, match="total must be a uint64 numpy array, got dtype int64"):
        Quantizer(1.0, max_clients=1).dequantize(np.zeros(3, dtype=np.int64))


# ------------------------------------------------------------------------------------- graph

@pytest.mark.parametrize("n,degree", [(2, 1), (3, 2), (5, 4), (12, 11), (13, 12), (16, 12),
                                      (33, 16), (100, 20), (1000, 30)])
def test_default_degree(n, degree):
    assert default_degree(n) == degree


@pytest.mark.parametrize("n", [2, 3, 4, 7, 12, 13, 20, 64])
def test_default_graph_is_regular_symmetric_connected_with_majority_threshold(n):
    ids = [1000 + 3 * i for i in range(n)]
    graph = choose_graph(ids)
    k = default_degree(n)
    assert graph.clients == tuple(ids)
    assert all(len(graph.neighbours[u]) == k and u not in graph.neighbours[u] for u in ids)
    assert all(u in graph.neighbours[v] for u in ids for v in graph.neighbours[u])
    assert graph.degree == k and graph.threshold == k // 2 + 1
    if n <= 12:
        assert all(graph.neighbours[u] == set(ids) - {u} for u in ids)
    seen, stack = {ids[0]}, [ids[0]]
    while stack:
        for v in graph.neighbours[stack.pop()] - seen:
            seen.add(v)
            stack.append(v)
    assert seen == set(ids)


def test_odd_degree_graph_and_random_layout():
    graph = choose_graph(range(1, 9), degree=3, threshold=3)
    assert all(len(vs) == 3 for vs in graph.neighbours.values()) and graph.threshold == 3
    layouts = {tuple(sorted(choose_graph(range(1, 31), degree=4).neighbours[1])) for _ in range(5)}
    assert len(layouts) > 1  # OS randomness: the neighbourhoods differ between calls
    seeded = [choose_graph(range(1, 31), degree=4, rng=random.Random(1)).neighbours for _ in range(2)]
    assert seeded[0] == seeded[1]


@pytest.mark.parametrize("ids,kwargs,message", [
    (range(1, 11), dict(degree=10),
     r"degree must be an int in \[1, 9\] \(at most n - 1 for 10 clients\), got 10"),
    (range(1, 11), dict(degree=0), r"degree must be an int in \[1, 9\].*got 0"),
    (range(1, 11), dict(degree=True), r"degree must be an int in \[1, 9\].*got True"),
    (range(1, 8), dict(degree=3), r"degree must be even when the number of clients is odd \(no "
                                  r"3-regular graph on 7 clients\), got 3"),
    (range(1, 11), dict(degree=4, threshold=2), r"threshold must be an int in \[3, 4\] \(more than "
                                                r"half of degree 4, at most the degree\), got 2"),
    (range(1, 11), dict(degree=4, threshold=5), r"threshold must be an int in \[3, 4\].*got 5"),
    ([1], {}, "secure aggregation needs at least 2 clients, got 1"),
    ([1, 2, 2], {}, r"client_ids must be distinct, got \[2\]"),
    ([0, 1], {}, r"client id must be an int in \[1, 2\*\*64 - 1\], got 0"),
])
def test_graph_overrides_are_validated(ids, kwargs, message):
    with pytest.raises(ValueError, match=message):
        choose_graph(ids, **kwargs)


def test_communication_graph_validates_symmetry_and_threshold():
    with pytest.raises(ValueError, match="symmetric: 2 is a neighbour of 1 but 1 is not a neighbour of 2"):
        CommunicationGraph(neighbours={1: {2, 3}, 2: {3}, 3: {1, 2}}, threshold=1)
    with pytest.raises(ValueError, match=r"threshold must be an int in \[2, 2\] for client 1 with 2 "
                                         r"neighbours \(more than half of them\), got 1"):
        CommunicationGraph(neighbours={1: {2, 3}, 2: {1, 3}, 3: {1, 2}}, threshold=1)


# ------------------------------------------------------------------- client-side refusals

def run_to_unmasking(n=4, length=6):
    graph = choose_graph(range(1, n + 1))
    vectors = random_vectors(range(1, n + 1), length, 6, Quantizer(1.0, max_clients=n))
    server = SecAggServer(graph, round_id=ROUND, vector_length=length)
    clients = {u: SecAggClient(u, ROUND) for u in graph.clients}
    requests = server.advertise_keys()
    requests = server.share_keys({u: clients[u].advertise_keys(r) for u, r in requests.items()})
    stage2 = server.masked_input({u: clients[u].share_keys(r) for u, r in requests.items()})
    return server, clients, vectors, stage2


@pytest.mark.parametrize("survivors,dropped,message", [
    ([2, 3], [3, 4], r"client\(s\) \[3\] are listed both as survivors and as dropped"),
    ([2, 3, 4], [1], "the request lists the client itself"),
    ([2, 3], [4, 9], r"client\(s\) \[9\] did not share keys with this client"),
    ([2, 3], [], r"the request omits neighbour\(s\) \[4\] that this client masked with"),
    ([2, 2, 3], [4], r"field 'survivors' lists client\(s\) \[2\] more than once"),
])
def test_client_refuses_an_inconsistent_unmasking_request_and_stays_usable(survivors, dropped, message):
    server, clients, vectors, stage2 = run_to_unmasking()
    stage3 = server.unmask({u: clients[u].masked_input(r, vectors[u]) for u, r in stage2.items()})
    bad = dict(stage3[1], survivors=survivors, dropped=dropped)
    with pytest.raises(SecAggError, match=message):
        clients[1].unmask(bad)
    reply = clients[1].unmask(stage3[1])  # the refusal changed nothing
    assert reply["seed_owners"] == [2, 3, 4] and reply["key_owners"] == []
    with pytest.raises(SecAggError, match="out of order"):  # one unmasking answer per round
        clients[1].unmask(dict(stage3[1], survivors=[], dropped=[2, 3, 4]))


def test_client_refuses_a_threshold_of_half_its_neighbourhood():
    graph = choose_graph(range(1, 6))
    server = SecAggServer(graph, round_id=ROUND, vector_length=4)
    clients = {u: SecAggClient(u, ROUND) for u in graph.clients}
    requests = server.advertise_keys()
    requests = server.share_keys({u: clients[u].advertise_keys(r) for u, r in requests.items()})
    with pytest.raises(SecAggError, match="threshold 2 is not more than half of 4 neighbours"):
        clients[1].share_keys(dict(requests[1], threshold=2))
    with pytest.raises(SecAggError, match="request is for round 8, this is round 7"):
        clients[1].share_keys(dict(requests[1], round=8))


def test_client_checks_its_vector():
    _, clients, vectors, stage2 = run_to_unmasking(length=6)
    with pytest.raises(ValueError, match="vector must have the round's length 6, got 5"):
        clients[1].masked_input(stage2[1], vectors[1][:5])
    with pytest.raises(ValueError, match="vector must be a 1-D uint64 numpy array"):
        clients[1].masked_input(stage2[1], vectors[1].view(np.int64))


# ------------------------------------------------------------------------------------ Shamir

def test_shamir_any_threshold_shares_reconstruct_fewer_do_not():
    secret = int.from_bytes(bytes(range(32)), "big")
    shares = shamir_share(secret, xs=[3, 11, 12, 40, 2**64 - 1], threshold=3)
    assert [x for x, _ in shares] == [3, 11, 12, 40, 2**64 - 1]
    for subset in itertools.combinations(shares, 3):
        assert shamir_reconstruct(subset, threshold=3) == secret
    assert shamir_reconstruct(reversed(shares), threshold=3) == secret
    for subset in itertools.combinations(shares, 2):
        assert shamir_reconstruct(subset, threshold=2) != secret  # interpolating too few points
        with pytest.raises(ValueError, match="2 shares given, threshold 3 needed"):
            shamir_reconstruct(subset, threshold=3)
    assert all(y != secret for _, y in shares)


def test_shamir_rejects_duplicate_or_bad_x():
    shares = shamir_share(5, xs=[1, 2, 3], threshold=2)
    with pytest.raises(ValueError, match=r"duplicate share x-coordinate\(s\) \[2\]"):
        shamir_reconstruct([shares[1], (2, shares[1][1] + 1), shares[2]], threshold=2)
    with pytest.raises(ValueError, match="share x-coordinates must be ints in"):
        shamir_reconstruct([(0, 5), shares[1]], threshold=2)
    with pytest.raises(ValueError, match=r"duplicate share x-coordinate\(s\) \[4\]"):
        shamir_share(5, xs=[4, 4, 5], threshold=2)
    with pytest.raises(ValueError, match=r"threshold must be an int in \[1, 3\]"):
        shamir_share(5, xs=[1, 2, 3], threshold=4)
    with pytest.raises(ValueError, match="secret must be an int in"):
        shamir_share(PRIME, xs=[1, 2], threshold=1)


# -------------------------------------------------------------------------------------- AEAD

def test_a_tampered_ciphertext_is_refused_and_the_client_masks_without_its_sender(caplog):
    _, clients, vectors, stage2 = run_to_unmasking()
    request = stage2[1]
    blob = bytearray(request["ciphertexts"][0])
    blob[20] ^= 1
    tampered = dict(request, ciphertexts=[bytes(blob)] + request["ciphertexts"][1:])
    state = clients[1].to_state()
    reply = clients[1].masked_input(tampered, vectors[1])
    assert reply["refused"] == [2] and set(clients[1]._held) == {3, 4}
    assert (r"client 1: the share ciphertext said to be from client 2 in round 7 fails authentication "
            r"(tampered, or routed") in caplog.text
    genuine = SecAggClient.from_state(state).masked_input(request, vectors[1])
    assert "refused" not in genuine and genuine["masked"] != reply["masked"]  # masked with 2 as well


def test_misrouted_ciphertexts_are_refused():
    _, clients, vectors, stage2 = run_to_unmasking()
    from_2_to_1 = stage2[1]["ciphertexts"][stage2[1]["senders"].index(2)]
    # delivered to client 3 as if client 2 had addressed it to 3: different key (pair 2-3)
    to_3 = dict(stage2[3], ciphertexts=[from_2_to_1 if s == 2 else c
                                        for s, c in zip(stage2[3]["senders"], stage2[3]["ciphertexts"])])
    assert clients[3].masked_input(to_3, vectors[3])["refused"] == [2]
    # reflected back to client 2 as if from client 1: same key (pair 1-2), direction bound in the AAD
    back = dict(stage2[2], ciphertexts=[from_2_to_1 if s == 1 else c
                                        for s, c in zip(stage2[2]["senders"], stage2[2]["ciphertexts"])])
    assert clients[2].masked_input(back, vectors[2])["refused"] == [1]


def test_ciphertexts_from_another_round_are_all_refused_and_the_client_cannot_go_on():
    _, clients, vectors, stage2 = run_to_unmasking()
    other = SecAggClient(1, ROUND + 1)
    other.__dict__.update({k: v for k, v in clients[1].__dict__.items() if k != "round_id"})
    with pytest.raises(SecAggAborted, match=r"only 0 of client 1's neighbours shared keys \(3 refused\), "
                                            "threshold 2 needed"):
        other.masked_input(dict(stage2[1], round=ROUND + 1), vectors[1])


@pytest.mark.parametrize("to", [[1], [1, 3, 4, 5]])
def test_a_client_whose_ciphertexts_fail_is_left_out_and_the_sum_stays_exact(to):
    # client 2's ciphertexts to `to` are garbage of the right size: the server cannot see it; its
    # receivers refuse them, mask without client 2 and say so; client 2 is left out of the sum
    graph = choose_graph(range(1, 6))  # complete, threshold 3
    vectors = random_vectors(range(1, 6), 6, 3, Quantizer(1.0, max_clients=5))

    def garbage(reply):
        return dict(reply, ciphertexts=[bytes(len(c)) if v in to else c
                                        for v, c in zip(reply["receivers"], reply["ciphertexts"])])

    servers = []
    (total, summary), _ = run_round(graph, vectors, corrupt={(2, "share_keys"): garbage}, servers=servers)
    assert summary.survivors == (1, 3, 4, 5)
    # its pairwise masks with the clients that did mask with it are removed with its rebuilt key
    assert summary.keys_reconstructed == ((2,) if to == [1] else ())
    assert summary.dropped == {"advertise_keys": (), "share_keys": (), "masked_input": (2,), "unmasking": ()}
    np.testing.assert_array_equal(total, plain_sum(vectors, [1, 3, 4, 5]))
    reason = servers[0].rejected["masked_input"][2]
    assert reason == (f"round {ROUND}, masked_input: client(s) {to} refused the share ciphertext(s) of client 2 "
                      "(authentication failed or shares outside the field); its masked input is left out")


def test_a_refusal_of_a_client_that_sent_no_ciphertext_is_malformed():
    graph = choose_graph(range(1, 6))
    vectors = random_vectors(range(1, 6), 6, 3, Quantizer(1.0, max_clients=5))
    servers = []
    (total, summary), _ = run_round(graph, vectors, corrupt={(2, "masked_input"): lambda r: dict(r, refused=[9])},
                                    servers=servers)
    assert "it refused client(s) [9], which sent it no ciphertext" in servers[0].rejected["masked_input"][2]
    np.testing.assert_array_equal(total, plain_sum(vectors, [1, 3, 4, 5]))


# --------------------------------------------------------------------------------------- PRG

def test_prg_is_deterministic_per_seed_and_purpose():
    seed = bytes(range(32))
    a = prg(seed, 1000, purpose="self-mask")
    assert a.dtype == np.uint64 and a.shape == (1000,)
    np.testing.assert_array_equal(a[:10], prg(seed, 10, purpose="self-mask"))
    assert not np.any(a == prg(seed, 1000, purpose="pairwise-mask"))
    assert not np.any(a == prg(bytes(31) + b"\x01", 1000, purpose="self-mask"))
    with pytest.raises(ValueError, match="purpose must be one of"):
        prg(seed, 3, purpose="other")


# ------------------------------------------------------------------- client state between stages

def test_a_client_rebuilt_from_its_state_at_every_stage_gives_the_exact_sum():
    """A client that is a fresh process at every stage (Flower's ClientApp) keeps only to_state()."""
    quantizer = Quantizer(1.0, max_clients=5)
    graph = choose_graph(range(1, 6), rng=random.Random(3))
    vectors = random_vectors(range(1, 6), 17, 3, quantizer)
    states = {u: SecAggClient(u, ROUND).to_state() for u in graph.clients}

    def step(u, method, *args):
        client = SecAggClient.from_state(json_roundtrip(states[u]))
        reply = getattr(client, method)(*args)
        states[u] = client.to_state()
        return reply

    server = SecAggServer(graph, round_id=ROUND, vector_length=17)
    requests = server.advertise_keys()
    replies = {u: step(u, "advertise_keys", r) for u, r in requests.items()}
    after_keys = states[1]
    requests = server.share_keys(replies)
    replies = {u: step(u, "share_keys", r) for u, r in requests.items() if u != 5}  # 5 drops here
    requests = server.masked_input(replies)
    replies = {u: step(u, "masked_input", r, vectors[u]) for u, r in requests.items()}
    after_masking = states[1]
    requests = server.unmask(replies)
    replies = {u: step(u, "unmask", r) for u, r in requests.items()}
    total, summary = server.aggregate(replies)
    np.testing.assert_array_equal(total, plain_sum(vectors, [1, 2, 3, 4]))
    assert summary.dropped["share_keys"] == (5,)
    # the private keys are in the state until the masked input is sent, and gone after
    assert len(after_keys["c_key"]) == len(after_keys["s_key"]) == 32 and after_keys["seed"] == b""
    assert after_masking["c_key"] == after_masking["s_key"] == after_masking["seed"] == b""
    assert len(after_masking["held_ids"]) == 3 and states[1]["held_ids"] == [] and states[1]["next"] == 4


def json_roundtrip(state):
    """Through JSON (bytes as hex), as a store outside the process would keep it: no Python objects."""
    encoded = json.dumps({k: (v.hex() if isinstance(v, bytes) else [x.hex() for x in v]
                              if isinstance(v, list) and v and isinstance(v[0], bytes) else v)
                          for k, v in state.items()})
    raw = {"c_key", "s_key", "seed"}
    listed = {"peer_c_pks", "peer_s_pks", "held_seed_shares", "held_key_shares"}
    return {k: bytes.fromhex(v) if k in raw else [bytes.fromhex(x) for x in v] if k in listed else v
            for k, v in json.loads(encoded).items()}


def test_a_state_that_cannot_be_right_is_refused():
    client = SecAggClient(2, ROUND)
    client.advertise_keys({"stage": "advertise_keys", "round": ROUND})
    state = client.to_state()
    assert SecAggClient.from_state(state).to_state() == state
    with pytest.raises(SecAggError, match="field 'c_key' is empty, but the client's next stage \\(share_keys\\)"):
        SecAggClient.from_state({**state, "c_key": b""})
    with pytest.raises(SecAggError, match="field 's_key' must be 32 bytes, got 31 bytes"):
        SecAggClient.from_state({**state, "s_key": bytes(31)})
    with pytest.raises(SecAggError, match="field 'next' must be in \\[0, 4\\], got 7"):
        SecAggClient.from_state({**state, "next": 7})
    with pytest.raises(SecAggError, match="field 'peer_c_pks' must be a list of 1 byte strings"):
        SecAggClient.from_state({**state, "peer_ids": [3]})
    with pytest.raises(SecAggError, match="field 'threshold' is missing"):
        SecAggClient.from_state({k: v for k, v in state.items() if k != "threshold"})
