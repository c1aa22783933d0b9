"""The server's moving average of the rounds' models (``federation.server_ema``): the arithmetic
against a hand computation, save/restore, and every error path."""

from __future__ import annotations

import pytest
import torch

from core_model.config import load_config
from server.server_app import WeightAverage


def test_the_average_is_the_bias_corrected_weighted_mean_of_the_rounds():
    w = [{"a": torch.tensor([1.0, 2.0]), "b": torch.tensor([[4.0]])},
         {"a": torch.tensor([3.0, -2.0]), "b": torch.tensor([[0.0]])},
         {"a": torch.tensor([5.0, 0.0]), "b": torch.tensor([[1.0]])}]
    avg = WeightAverage(0.5)
    avg.update(w[0])
    torch.testing.assert_close(avg.average(), w[0])  # one round: that round's model, not half of it
    avg.update(w[1])
    avg.update(w[2])
    # weights 0.5 ** (3 - i): 1/4, 1/2, 1 for rounds 1, 2, 3, normalised by 7/4
    expected = {k: (w[0][k] + 2 * w[1][k] + 4 * w[2][k]) / 7 for k in w[0]}
    torch.testing.assert_close(avg.average(), expected)
    assert avg.average()["a"].dtype == torch.float32 and avg.count == 3


def test_save_and_restore_continue_the_same_average():
    torch.manual_seed(0)
    rounds = [{"x": torch.randn(4, 3)} for _ in range(5)]
    straight = WeightAverage(0.9)
    for w in rounds:
        straight.update(w)
    first = WeightAverage(0.9)
    for w in rounds[:2]:
        first.update(w)
    resumed = WeightAverage.restore(first.state(), 0.9)
    for w in rounds[2:]:
        resumed.update(w)
    assert torch.equal(resumed.average()["x"], straight.average()["x"])


def test_errors_name_the_parameter_and_what_was_expected():
    with pytest.raises(ValueError, match=r"federation.server_ema=1.0: expected a decay in \(0, 1\)"):
        WeightAverage(1.0)
    with pytest.raises(ValueError, match="no rounds yet"):
        WeightAverage(0.5).average()
    avg = WeightAverage(0.5)
    avg.update({"a": torch.zeros(2)})
    with pytest.raises(ValueError, match=r"keys \['b'\], the average has \['a'\]"):
        avg.update({"b": torch.zeros(2)})
    with pytest.raises(ValueError, match="decay 0.5, the config's federation.server_ema is 0.9"):
        WeightAverage.restore(avg.state(), 0.9)
    for bad in ("1.0", "-0.1"):
        with pytest.raises(ValueError, match=r"federation.server_ema.*in \[0, 1\) \(0: off\)"):
            load_config(None, [f"federation.server_ema={bad}"])
