"""User-level DP-SGD in a real Flower simulation: ledgers, reported epsilon, a policy refusal."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from core_model.config import load_config
from privacy.accounting import PrivacyAccountant
from privacy.ledger import PrivacyLedger
from simulations.runner import simulate

pytestmark = pytest.mark.slow

TINY = ["data.synthetic.num_users=150", "data.synthetic.num_items=40", "data.synthetic.num_merchants=4",
        "data.synthetic.max_length=20", "model.d_model=16", "model.max_len=20", "train.precision=fp32",
        "train.lr=0.005", "train.batch_size=16", "eval.sampled=false", "federation.partition=iid",
        "federation.num_clients=3", 'privacy.mode="dp-sgd"', "privacy.noise_multiplier=1.0"]


def rounds(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_policy_declines_the_round_beyond_its_limit_and_ledgers_account_every_spend(tmp_path):
    policy = tmp_path / "policy.toml"
    policy.write_text("[policy]\nmax_epsilon = 1000.0\nmin_noise_multiplier = 0.5\nmax_rounds = 2\n")
    run = tmp_path / "run"
    cfg = load_config(None, [*TINY, "federation.num_rounds=3", f'privacy.policy="{policy}"'])
    simulate(cfg, run)
    rows = rounds(run)
    assert [r["round"] for r in rows] == [1, 2, 3]
    assert [(r["clients_ok"], r["clients_declined"], r["clients_failed"]) for r in rows] == [(3, 0, 0), (3, 0, 0),
                                                                                           (0, 3, 0)]
    assert rows[0]["dp_epsilon_max"] < rows[1]["dp_epsilon_max"]  # spend accumulates over rounds
    assert rows[2]["aggregated"] is False and all("max_rounds" in r for r in rows[2]["declined_reasons"])
    assert torch.load(run / "checkpoint.pt", weights_only=False)["round"] == 3  # the run went on to its end

    ledgers = sorted((run / "clients").glob("*/ledger.jsonl"))
    assert len(ledgers) == 3
    for path in ledgers:
        entries = PrivacyLedger(path).entries()
        assert [(e.round, e.kind) for e in entries] == [(1, "spend"), (2, "spend"), (3, "refusal")]
        replay = PrivacyAccountant()
        for e in entries[:2]:
            assert e.noise_multiplier == 1.0 and e.accountant == "prv" and e.delta > 0
            replay.add(noise_multiplier=e.noise_multiplier, sample_rate=e.sample_rate, steps=e.steps)
            assert e.epsilon == pytest.approx(replay.epsilon(e.delta), rel=1e-6)
        assert entries[2].epsilon == pytest.approx(entries[1].epsilon)  # a refusal spends nothing
    assert max(PrivacyLedger(p).entries()[1].epsilon for p in ledgers) == pytest.approx(rows[1]["dp_epsilon_max"])


def test_a_restarted_run_keeps_spending_from_the_ledger(tmp_path):
    """The accountant lives in the ledger, not in a process: a second run on the same state keeps adding."""
    state = tmp_path / "state"
    first = load_config(None, [*TINY, "federation.num_rounds=1", f'privacy.state_dir="{state}"'])
    simulate(first, tmp_path / "a")
    after_one = {p.parent.name: PrivacyLedger(p).entries()[-1].epsilon for p in state.glob("*/ledger.jsonl")}
    simulate(first, tmp_path / "b")
    after_two = {p.parent.name: PrivacyLedger(p).entries()[-1].epsilon for p in state.glob("*/ledger.jsonl")}
    assert set(after_one) == set(after_two) and len(after_one) == 3
    assert all(after_two[c] > after_one[c] for c in after_one)


def test_fedrec_simulate_states_epsilon_with_delta_accountant_and_unit(tmp_path, capsys):
    from simulations.cli import main

    args = ["simulate", "--out", str(tmp_path / "run"), *[f"--set={s}" for s in [*TINY, "federation.num_rounds=1"]]]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "Unit of privacy: one user's whole history at that client" in out
    assert "the server, the other clients and anyone with the model" in out
    line = next(line for line in out.splitlines() if line.startswith("round   1/1"))
    assert "user-level epsilon <=" in line and "at delta <=" in line and "(PRV, max over clients)" in line
