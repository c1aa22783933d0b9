"""Distributed noise in a real Flower simulation (Ray engine, real Opacus, real secure aggregation):
a client that drops at the masked-input stage leaves fewer noise shares in the sum than the
accounted noise needs, so the round is aborted with the model unchanged; a round with every client
is aggregated; the ledgers record one step per round at the sum's noise multiplier, and the audit
recomputes them."""

from __future__ import annotations

import json

import pytest
import torch

from core_model.config import load_config
from privacy.audit import audit_run
from simulations.runner import simulate

from secagg_apps import failing_client_app  # tests/simulations/secagg_apps.py

pytestmark = pytest.mark.slow

TINY = ["data.synthetic.num_users=160", "data.synthetic.num_items=40", "data.synthetic.num_merchants=4",
        "data.synthetic.max_length=20", "model.d_model=16", "model.max_len=20", "train.precision=fp32",
        "train.lr=1.0", "train.batch_size=16", "eval.sampled=false", "federation.partition=iid",
        "federation.num_clients=4", "federation.num_rounds=3", "federation.lr_schedule=constant",
        'privacy.mode="dp-sgd"', "privacy.noise_multiplier=1.5", 'privacy.noise_placement="distributed"']


def test_a_dropout_aborts_the_round_and_full_rounds_carry_one_accounted_step(tmp_path):
    run = tmp_path / "run"
    # the wrapped ClientApp is built before simulate() fills these in, so they are set here
    cfg = load_config(None, TINY + [f'privacy.state_dir="{run / "clients"}"', "privacy.distributed_min_clients=4"])
    models = {}

    def on_round(record):
        models[record["round"]] = torch.load(run / "checkpoint.pt", weights_only=True)["model"]

    simulate(cfg, run, on_round=on_round, client_app=failing_client_app(cfg, {2: {1}}))
    rounds = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [(r["round"], r["secagg_aborted"]) for r in rounds] == [(1, False), (2, True), (3, False)]
    assert "only 3 clients' noise shares are in the sum, at least 4" in rounds[1]["secagg_abort_reason"]
    assert rounds[1]["aggregated"] is False and rounds[0]["aggregated"] and rounds[2]["aggregated"]
    assert all(torch.equal(models[1][k], models[2][k]) for k in models[1])  # aborted: unchanged
    assert any(not torch.equal(models[2][k], models[3][k]) for k in models[2])
    assert json.loads((run / "config.json").read_text())["privacy"]["distributed_min_clients"] == 4

    report = audit_run(run)
    assert report.ok and "Distributed noise: the clients' updates are not private on their own" in (
        report.federation["statement"])
    for c in report.clients:
        spends = [e for e in c.entries if e.kind == "spend"]
        # every client trained (and recorded) each round, the dropped one too: over-reporting is safe
        assert [(e.round, e.steps, e.noise_multiplier) for e in spends] == [(1, 1, 1.5), (2, 1, 1.5), (3, 1, 1.5)]
        assert all(e.epsilon_ok for e in spends)
    ledger = next((run / "clients").glob("*/ledger.jsonl")).read_text().splitlines()[0]
    assert "distributed DP-SGD" in json.loads(ledger)["mechanism"]
    results = json.loads((run / "results.json").read_text())
    assert "distributed noise" in results["server_saw"]


def test_a_client_without_its_noise_share_count_refuses_to_train(tmp_path):
    """A client must know t (distributed_min_clients) to size its share: with 0 it trains nothing,
    and the round fails explicitly instead of sending an update with the wrong noise."""
    from client.client_app import make_client_app

    run = tmp_path / "run"
    cfg = load_config(None, TINY + [f'privacy.state_dir="{run / "clients"}"', "federation.num_rounds=1"])
    simulate(cfg, run, client_app=make_client_app(cfg))  # the app keeps t = 0; the server side fills it in
    (row,) = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert row["secagg_aborted"] is True and row["aggregated"] is False and row["clients_ok"] == 0
    assert any("privacy.distributed_min_clients must be >= 1 at a client" in e for e in row["secagg_errors"])
    assert not list((run / "clients").glob("*/ledger.jsonl"))  # nothing spent, nothing recorded
