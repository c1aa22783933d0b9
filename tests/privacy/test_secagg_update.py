"""The vector a client contributes to secure aggregation, and the FedAvg delta read from the sum."""

from __future__ import annotations

import numpy as np
import pytest

from privacy.secagg import Quantizer
from privacy.secagg_update import UpdateLayout, decode_sum, encode_update


def states(rng, n):
    glob = {"w": rng.normal(size=(3, 2)).astype(np.float32), "b": rng.normal(size=4).astype(np.float32)}
    local = [{k: (v + rng.normal(scale=0.01, size=v.shape)).astype(np.float32) for k, v in glob.items()}
             for _ in range(n)]
    return glob, local


def test_sum_of_contributions_decodes_to_the_fedavg_delta_within_the_quantization_error():
    rng = np.random.default_rng(0)
    glob, local = states(rng, 3)
    users = [5, 11, 2]
    for bits in (24, 8):  # 8 bits: a coarse step that the tolerance must still cover
        q = Quantizer(100.0, max_clients=3, scale_bits=bits)
        layout = UpdateLayout.of(glob)
        assert layout.length == 6 + 4 + 1
        total = sum(encode_update(layout, local=loc, global_=glob, weight=n, quantizer=q, client=f"c{i}")
                    for i, (loc, n) in enumerate(zip(local, users)))  # uint64 sums wrap mod 2**64
        delta, weight = decode_sum(layout, total, quantizer=q)
        assert weight == 18.0
        tol = 3 * 2.0 ** -(bits + 1) / 18  # m * 2**-(scale_bits + 1) / N
        for k in glob:
            exact = sum(n * (loc[k].astype(np.float64) - glob[k]) for loc, n in zip(local, users)) / 18
            err = np.abs(delta[k] - exact).max()
            assert delta[k].shape == glob[k].shape and err <= tol, (bits, k, err, tol)
            if bits == 8:
                assert err > tol / 100  # the coarse step does show: the check compares real values
        fedavg = {k: sum(n * loc[k].astype(np.float64) for loc, n in zip(local, users)) / 18 for k in glob}
        assert all(np.abs(glob[k] + delta[k] - fedavg[k]).max() <= tol + 1e-12 for k in glob)


def test_a_contribution_beyond_the_bound_names_client_parameter_element_value_and_bound():
    glob = {"w": np.zeros((2, 3), dtype=np.float32), "b": np.zeros(2, dtype=np.float32)}
    local = {"w": np.zeros((2, 3), dtype=np.float32), "b": np.zeros(2, dtype=np.float32)}
    q = Quantizer(10.0, max_clients=2)
    layout = UpdateLayout.of(glob)
    local["w"][1, 2] = 1.25
    encode_update(layout, local=local, global_=glob, weight=8, quantizer=q, client="eu")  # 8 * 1.25 = 10: fits
    local["w"][1, 2] = 2.0
    with pytest.raises(ValueError) as err:
        encode_update(layout, local=local, global_=glob, weight=8, quantizer=q, client="eu")
    assert str(err.value) == ("client eu: w[1, 2] contributes n_k * (w_local - w_global) = 16 (8 users x change 2), "
                              "outside the secure aggregation bound [-10, 10] (privacy.secagg_bound); nothing is "
                              "clipped")
    local["w"][1, 2] = 0.0
    local["b"][:] = np.nan
    with pytest.raises(ValueError, match=r"client eu: b\[0\] contributes .* = nan .* \(2 coordinates of b are "
                                         r"outside\)"):
        encode_update(layout, local=local, global_=glob, weight=1, quantizer=q, client="eu")
    with pytest.raises(ValueError, match="client eu: its weight n_k = 11 users exceeds the secure aggregation "
                                         "bound 10"):
        encode_update(layout, local=glob, global_=glob, weight=11, quantizer=q, client="eu")
    with pytest.raises(ValueError, match="client eu: weight \\(number of users\\) must be an int >= 1, got 0"):
        encode_update(layout, local=glob, global_=glob, weight=0, quantizer=q, client="eu")
    with pytest.raises(ValueError, match="client eu's trained weights does not match the round's model"):
        encode_update(layout, local={"w": local["w"]}, global_=glob, weight=1, quantizer=q, client="eu")


def test_decode_refuses_a_sum_that_is_not_a_sum_of_contributions():
    layout = UpdateLayout.of({"b": np.zeros(2)})
    q = Quantizer(10.0, max_clients=2)
    with pytest.raises(ValueError, match="the aggregate has \\(4,\\) coordinates, the round's layout 3"):
        decode_sum(layout, np.zeros(4, dtype=np.uint64), quantizer=q)
    with pytest.raises(ValueError, match="weight coordinate is 0.0, expected the clients' summed number of users"):
        decode_sum(layout, np.zeros(3, dtype=np.uint64), quantizer=q)
