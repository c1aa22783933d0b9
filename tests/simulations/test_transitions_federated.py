"""The transition table's release in a real Flower simulation (Ray engine, real secure aggregation,
real ledgers): without DP the securely aggregated table is exactly the users' clipped counts; with
distributed DP noise each client records the release as round 0 before anything leaves, the table
carries the sum's noise, the epsilons compose with the DP-SGD rounds (checked independently by the
audit's dp-accounting PLD recomputation), and a resumed run reuses the table instead of releasing
again."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from core_model.config import load_config
from privacy.accounting import PrivacyAccountant
from privacy.audit import audit_run
from privacy.transitions import client_transitions, finish_table
from simulations.clients import load_federation
from simulations.runner import simulate

pytestmark = pytest.mark.slow

TINY = ["data.synthetic.num_users=160", "data.synthetic.num_items=40", "data.synthetic.num_merchants=4",
        "data.synthetic.max_length=20", "model.d_model=16", "model.max_len=20", "train.precision=fp32",
        "train.lr=1.0", "train.batch_size=16", "eval.sampled=false", "federation.partition=iid",
        "federation.num_clients=4", "federation.num_rounds=1", "federation.lr_schedule=constant",
        "model.transitions=true", "model.transitions_window=3"]


def exact_table(cfg) -> torch.Tensor:
    _, split, _ = load_federation(cfg)
    return finish_table(client_transitions(split.train, split.num_items, window=3, decay=0.8))


def test_securely_aggregated_table_without_noise_is_exactly_the_users_counts(tmp_path):
    cfg = load_config(None, TINY + ['privacy.secure_aggregation="on"'])
    run = tmp_path / "run"
    results = simulate(cfg, run)
    table = torch.load(run / "transitions.pt", weights_only=True)["table"]
    exact = exact_table(cfg)
    assert exact.abs().sum() > 100 and torch.allclose(table, exact, atol=1e-5)
    assert torch.equal(torch.load(run / "model.pt", weights_only=True)["state_dict"]["transition_table"], table)
    release = json.loads((run / "transitions.json").read_text())
    assert release["secure_aggregation"] and release["clients_ok"] == 4 and not release["secagg_aborted"]
    assert "dp_clients" not in release
    (row,) = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert row["round"] == 1 and 0 <= row["test_ndcg@10"] <= 1 and 0 <= results["test"]["ndcg@10"] <= 1


def test_dp_release_is_ledgered_as_round_zero_carries_the_sums_noise_and_survives_a_resume(tmp_path):
    run = tmp_path / "run"
    sigma, release_sigma = 1.5, 0.6
    settings = TINY + ['privacy.mode="dp-sgd"', f"privacy.noise_multiplier={sigma}",
                       'privacy.noise_placement="distributed"', "privacy.sample_rate=0.5",
                       f"privacy.transitions_noise_multiplier={release_sigma}"]
    cfg = load_config(None, settings)
    simulate(cfg, run)
    table = torch.load(run / "transitions.pt", weights_only=True)["table"]
    noise = (table - exact_table(cfg))[1:, 1:].double()
    # four shares of std 0.6 / sqrt(4) add up to the sum's 0.6 (1,600 entries)
    assert noise.std().item() == pytest.approx(release_sigma, rel=0.08) and abs(noise.mean().item()) < 0.06

    ledgers = sorted((run / "clients").glob("*/ledger.jsonl"))
    assert len(ledgers) == 4
    for path in ledgers:
        spends = [json.loads(line) for line in path.read_text().splitlines()]
        assert [(e["kind"], e["round"], e["noise_multiplier"], e["sample_rate"], e["steps"]) for e in spends] == [
            ("spend", 0, release_sigma, 1.0, 1), ("spend", 1, sigma, 0.5, 1)]
        assert "Gaussian release of item transitions" in spends[0]["mechanism"]
        delta = spends[0]["delta"]
        assert spends[0]["epsilon"] == pytest.approx(PrivacyAccountant([(release_sigma, 1.0, 1)]).epsilon(delta))
        assert spends[1]["epsilon"] == pytest.approx(
            PrivacyAccountant([(release_sigma, 1.0, 1), (sigma, 0.5, 1)]).epsilon(delta))
    report = audit_run(run)  # every recorded epsilon recomputed with dp-accounting's PLD, within 1 %
    assert report.ok and all(e.epsilon_ok for c in report.clients for e in c.entries if e.kind == "spend")
    release = json.loads((run / "transitions.json").read_text())
    assert release["dp_clients"] == 4 and release["dp_noise_multiplier_min"] == release_sigma

    resumed = load_config(None, [*settings, "federation.num_rounds=2"])
    simulate(resumed, run, resume=True)
    assert torch.equal(torch.load(run / "transitions.pt", weights_only=True)["table"], table)
    assert torch.equal(torch.load(run / "model.pt", weights_only=True)["state_dict"]["transition_table"], table)
    for path in ledgers:  # released once: round 0 is not spent again
        rounds = [json.loads(line)["round"] for line in path.read_text().splitlines()]
        assert rounds == [0, 1, 2]


def test_a_policy_that_forbids_the_release_stops_the_run_before_any_round(tmp_path):
    policy = tmp_path / "policy.toml"
    policy.write_text("[policy]\nmax_epsilon = 2.0\n")
    run = tmp_path / "run"
    cfg = load_config(None, TINY + ['privacy.mode="dp-sgd"', "privacy.noise_multiplier=1.5",
                                    "privacy.transitions_noise_multiplier=0.6", f'privacy.policy="{policy}"'])
    with pytest.raises(RuntimeError, match="the transition table's release failed: no client took part: 4 declined"):
        simulate(cfg, run)  # the server app's error, raised by the simulation
    release = json.loads((run / "transitions.json").read_text())
    assert release["clients_declined"] == 4 and len(release["declined_reasons"]) == 4
    assert all("over the policy's max_epsilon 2" in r for r in release["declined_reasons"])
    assert not (run / "metrics.jsonl").exists() and not (run / "transitions.pt").exists()
    for path in sorted((run / "clients").glob("*/ledger.jsonl")):
        (entry,) = [json.loads(line) for line in path.read_text().splitlines()]
        assert (entry["kind"], entry["round"], entry["epsilon"]) == ("refusal", 0, 0.0)
