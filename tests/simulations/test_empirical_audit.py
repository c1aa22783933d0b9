"""`fedrec audit --empirical` on real simulations (Flower's simulation engine, real Opacus): the same
canary users in a DP-SGD run and in a run without DP.

- The DP run's empirical lower bound stays below its claimed epsilon: the audit passes.
- Without DP the same attack finds a lower bound clearly above the DP run's (the model memorises
  its users).
- A client that records DP in its ledgers but releases a model trained without it (the DP run's
  model replaced by the one trained without DP; the ledgers untouched and validly signed) is caught:
  the lower bound exceeds the claim and the audit fails with ``empirical-leak``.
"""

from __future__ import annotations

import json
import shutil

import pytest

from core_model.config import load_config
from simulations.cli import main
from simulations.runner import simulate

pytestmark = pytest.mark.slow

SMALL = ["data.synthetic.num_users=400", "data.synthetic.num_items=200", "data.synthetic.num_merchants=4",
         "data.synthetic.max_length=30", "model.d_model=32", "model.max_len=30", "train.precision=fp32",
         "train.lr=0.01", "train.batch_size=32", "eval.sampled=false", "federation.partition=iid",
         "federation.num_clients=2", "federation.num_rounds=4", "federation.local_epochs=3",
         "federation.evaluate_every=100", "privacy.audit_canaries=300", "privacy.audit_canary_length=20"]


def _report(out):
    return json.loads((out / "report.json").read_text())


def test_empirical_audit_passes_dp_detects_no_dp_and_catches_a_model_trained_without_dp(tmp_path, capsys):
    dp, nodp = tmp_path / "dp", tmp_path / "no-dp"
    simulate(load_config(None, SMALL + ['privacy.mode="dp-sgd"', "privacy.noise_multiplier=4.0"]), dp)
    canaries = json.loads((dp / "canaries.json").read_text())
    assert len(canaries["histories"]) == 300 and 0 < sum(canaries["included"]) < 300
    simulate(load_config(None, SMALL + [f'privacy.audit_canary_file="{dp / "canaries.json"}"']), nodp)
    assert not (nodp / "canaries.json").exists()  # the same canaries and bits as the DP run

    assert main(["audit", str(dp), "--empirical", "--out", str(tmp_path / "a-dp")]) == 0
    assert "PASSED" in capsys.readouterr().out
    with_dp = _report(tmp_path / "a-dp")
    e = with_dp["empirical"]
    claimed = with_dp["federation"]["epsilon"]
    assert e["claimed_epsilon"] == claimed and e["consistent"] is True
    assert e["epsilon_lower_bound"] <= claimed < 1.5
    assert e["canaries"] == 300 and e["delta"] == with_dp["federation"]["delta"]
    assert sorted(p.name for p in (tmp_path / "a-dp").iterdir()) == [
        "canaries.png", "epsilon.png", "report.json", "report.md"]

    assert main(["audit", str(nodp), "--empirical", "--delta", str(e["delta"]), "--out",
                 str(tmp_path / "a-nodp")]) == 0
    printed = capsys.readouterr().out
    assert "NO DP CLAIMED" in printed and "epsilon lower bound" in printed
    without = _report(tmp_path / "a-nodp")["empirical"]
    assert without["claimed_epsilon"] is None and without["delta"] == e["delta"]
    assert without["auc"] > 0.85 > e["auc"]
    assert without["epsilon_lower_bound"] > e["epsilon_lower_bound"] + 1.0
    md = (tmp_path / "a-nodp" / "report.md").read_text()
    assert "NO DIFFERENTIAL PRIVACY CLAIMED" in md and "Empirical lower bound: epsilon >=" in md

    # a "DP" run whose released model was trained without DP: ledgers intact, model leaks
    shutil.copy(nodp / "model.pt", dp / "model.pt")
    assert main(["audit", str(dp), "--empirical", "--out", str(tmp_path / "a-lie")]) == 1
    printed = capsys.readouterr().out
    assert "PROBLEM client (run): empirical-leak: lower bound" in printed and "FAILED" in printed
    lie = _report(tmp_path / "a-lie")
    assert lie["ok"] is False and lie["empirical"]["consistent"] is False
    assert lie["empirical"]["epsilon_lower_bound"] > lie["federation"]["epsilon"]
    assert all(c["verified"] for c in lie["clients"])  # the ledgers themselves are fine


def test_empirical_audit_of_a_run_without_canaries_is_a_clear_error(tmp_path, capsys):
    run = tmp_path / "run"
    simulate(load_config(None, SMALL[:-2] + ["federation.num_rounds=1", "federation.local_epochs=1",
                                             "data.synthetic.num_users=100"]), run)
    assert main(["audit", str(run), "--empirical"]) != 0
    err = capsys.readouterr().err
    assert "canaries.json does not exist: this run was trained without canaries" in err
