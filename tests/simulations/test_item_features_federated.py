"""Public catalogue features (``model.item_features``) in a real Flower simulation with DP-SGD,
distributed noise and secure aggregation: the server sends the matrix with every message, the
clients train its projections, no update carries the matrix, and the saved model holds it."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from core_model.config import load_config
from core_model.features import catalogue_features
from core_model.train import load_checkpoint
from simulations.clients import load_federation
from simulations.runner import simulate

pytestmark = pytest.mark.slow

TINY = ["data.synthetic.num_users=160", "data.synthetic.num_items=40", "data.synthetic.num_merchants=4",
        "data.synthetic.max_length=20", "model.d_model=16", "model.max_len=20", "train.precision=fp32",
        "train.lr=1.0", "train.batch_size=16", "eval.sampled=false", "federation.partition=iid",
        "federation.num_clients=4", "federation.num_rounds=2", "federation.lr_schedule=constant",
        'privacy.mode="dp-sgd"', "privacy.noise_multiplier=1.5", 'privacy.noise_placement="distributed"',
        'model.item_features="category,merchant"']


def test_features_travel_from_the_server_and_are_trained_but_never_sent_back(tmp_path):
    run = tmp_path / "run"
    cfg = load_config(None, TINY)
    shared = {}

    def on_round(record):
        shared[record["round"]] = torch.load(run / "checkpoint.pt", weights_only=True)["model"]

    results = simulate(cfg, run, on_round=on_round)
    rounds = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["aggregated"] for r in rounds] == [True] * 2
    # the clients' evaluation rebuilds the model from the evaluate message's feature record too
    assert rounds[-1]["eval_clients_failed"] == 0 and rounds[-1]["test_ndcg@10"] > 0
    assert all("item_feature_matrix" not in state for state in shared.values())  # never in an update
    assert not torch.equal(shared[1]["feat_out.weight"], shared[2]["feat_out.weight"])  # trained
    model, _ = load_checkpoint(run / "model.pt")
    log, _, _ = load_federation(cfg)
    expected = catalogue_features(log.item_features, ["category", "merchant"], log.num_items)
    np.testing.assert_allclose(model.item_feature_matrix.numpy(), expected.matrix)
    assert model.config.num_item_features == len(expected.columns)
    assert results["test"]["ndcg@10"] > 0
    # no federation.server_ema: model.pt is the last iterate and there is no second file
    assert not (run / "model-last.pt").exists() and "test_last_iterate" not in results
