"""`fedrec audit` on a real DP-SGD simulation (Flower's simulation engine, secure aggregation on by
default): every client verified against the server's receipts, every epsilon recomputed within 1 %;
one edited ledger line makes it fail and the report names that client and round."""

from __future__ import annotations

import json

import pytest

from core_model.config import load_config
from privacy.ledger import canonical_json
from simulations.cli import main
from simulations.runner import simulate

pytestmark = pytest.mark.slow

TINY = ["data.synthetic.num_users=150", "data.synthetic.num_items=40", "data.synthetic.num_merchants=4",
        "data.synthetic.max_length=20", "model.d_model=16", "model.max_len=20", "train.precision=fp32",
        "train.lr=0.005", "train.batch_size=16", "eval.sampled=false", "federation.partition=iid",
        "federation.num_clients=3", 'privacy.mode="dp-sgd"', "privacy.noise_multiplier=1.0",
        "federation.num_rounds=2"]


def test_fedrec_audit_of_a_dp_simulation_then_of_an_edited_ledger(tmp_path, capsys):
    run = tmp_path / "run"
    simulate(load_config(None, TINY), run)
    receipts = [json.loads(line) for line in (run / "receipts.jsonl").read_text().splitlines()]
    assert sorted((r["round"], r["outcome"], r["secure_aggregation"]) for r in receipts) == [
        (1, "trained", True)] * 3 + [(2, "trained", True)] * 3

    out = tmp_path / "audit"
    assert main(["audit", str(run), "--out", str(out)]) == 0
    assert "PASSED" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["epsilon.png", "report.json", "report.md"]
    report = json.loads((out / "report.json").read_text())
    assert report["ok"] is True and report["layout"] == "simulation run"
    assert len(report["clients"]) == 3 and all(c["verified"] and c["receipts"] == 2 for c in report["clients"])
    for c in report["clients"]:
        assert [(e["round"], e["signature"], e["receipt"]) for e in c["entries"]] == [
            (1, "valid", "matched"), (2, "valid", "matched")]
        assert all(e["epsilon_ok"] and abs(e["relative_difference"]) < 0.01 for e in c["entries"])
    assert [(v["round"], v["secure_aggregation"], len(v["in_sum"])) for v in report["server_view"]] == [
        (1, True, 3), (2, True, 3)]
    assert report["federation"]["epsilon"] == pytest.approx(
        max(c["entries"][-1]["epsilon"] for c in report["clients"]), rel=0.01)

    client = report["clients"][1]["client"]
    path = run / "clients" / client / "ledger.jsonl"
    lines = [json.loads(line) for line in path.read_bytes().splitlines()]
    lines[1]["noise_multiplier"] = 2.0  # round 2 claims twice the noise it used
    path.write_bytes(b"".join(canonical_json(o) + b"\n" for o in lines))
    assert main(["audit", str(run), "--out", str(out)]) == 1
    printed = capsys.readouterr().out
    assert f"PROBLEM client {client}, round 2, line 2: edited:" in printed and "noise_multiplier 1.0 -> 2.0" in printed
    md = (out / "report.md").read_text()
    assert "**Verdict: FAILED.**" in md and f"| {client} | 2 | 2 | edited |" in md
