"""Ledger receipts in the server's round loop, in-process (the LocalGrid of test_secure_round): every
DP-SGD spend and every policy refusal reaches ``receipts.jsonl`` in plain and in secure rounds, and
the audit of the run directory verifies every client against them."""

from __future__ import annotations

import json

import pytest
from test_secure_round import TINY, run_loop, task_identity  # noqa: F401 (an autouse fixture)

from core_model.config import load_config
from privacy.audit import audit_run
from privacy.ledger import RECEIPT_MARK, PrivacyLedger, Receipt

CLIENTS = ["dirichlet-0000", "dirichlet-0001", "dirichlet-0002", "dirichlet-0003"]


@pytest.mark.parametrize("secure", ["off", "on"])
def test_spends_and_refusals_reach_receipts_jsonl_and_the_audit_passes(tmp_path, secure):
    policy = tmp_path / "policy.toml"
    policy.write_text("[policy]\nmax_epsilon = 1000.0\nmax_rounds = 1\n")  # round 2 is declined
    run = tmp_path / "run"
    cfg = load_config(None, [*TINY, "federation.num_rounds=2", 'privacy.mode="dp-sgd"', "privacy.noise_multiplier=1.0",
                             f'privacy.secure_aggregation="{secure}"', f'privacy.state_dir="{run / "clients"}"',
                             f'privacy.policy="{policy}"'])
    rows, _, _ = run_loop(cfg, run)
    assert [(r["clients_ok"], r["clients_declined"]) for r in rows] == [(4, 0), (0, 4)]
    assert all("max_rounds" in reason and RECEIPT_MARK not in reason for reason in rows[1]["declined_reasons"])

    lines = [json.loads(line) for line in (run / "receipts.jsonl").read_text().splitlines()]
    assert sorted((x["round"], x["outcome"], x["receipt"]["client"]) for x in lines) == [
        *[(1, "trained", c) for c in CLIENTS], *[(2, "declined", c) for c in CLIENTS]]
    assert all(x["secure_aggregation"] is (secure == "on") for x in lines)
    for x in lines:  # each receipt is the client's own, of the entry it wrote for that round
        receipt = Receipt.from_dict(x["receipt"])
        assert receipt.problems() == []
        ledger = PrivacyLedger(run / "clients" / receipt.client / "ledger.jsonl")
        (record,) = [r for r in ledger.records() if r.entry.round == x["round"]]
        assert (record.hash, record.signature, receipt.public_key) == (receipt.entry_hash, receipt.signature,
                                                                       ledger.public_key())
        assert record.entry.kind == ("spend" if x["round"] == 1 else "refusal")

    report = audit_run(run, policy=policy)
    assert report.ok, [(f.kind, f.client, f.round, f.message) for f in report.problems]
    assert [c.client for c in report.clients] == CLIENTS and all(c.verified and c.receipts == 2 for c in report.clients)
    assert [(v["round"], v["secure_aggregation"], v["receipts"]) for v in report.server_view] == [
        (1, secure == "on", 4), (2, secure == "on", 4)]


def test_a_spend_whose_update_never_left_still_reaches_the_receipts(tmp_path):
    """An update beyond the secure aggregation bound: the spend is in the ledger (written first), the
    error reply carries its receipt at the end of the reason, the server records it as failed."""
    run = tmp_path / "run"
    cfg = load_config(None, [*TINY, "federation.num_rounds=1", 'privacy.mode="dp-sgd"', "privacy.noise_multiplier=1.0",
                             'privacy.secure_aggregation="on"', "privacy.secagg_bound=75.0", "train.lr=1.2",
                             f'privacy.state_dir="{run / "clients"}"'])
    (row,), _, _ = run_loop(cfg, run)
    assert "dirichlet-0001" in row["secagg_dropped"]["advertise_keys"]
    error = next(e for e in row["secagg_errors"] if "client dirichlet-0001" in e)
    assert "outside the secure aggregation bound" in error and RECEIPT_MARK not in error
    lines = [json.loads(line) for line in (run / "receipts.jsonl").read_text().splitlines()]
    outcomes = {x["receipt"]["client"]: x["outcome"] for x in lines}
    assert outcomes["dirichlet-0001"] == "failed" and len(lines) == 4
    assert all(outcome == "trained" for client, outcome in outcomes.items() if client != "dirichlet-0001")
    (entry,) = PrivacyLedger(run / "clients" / "dirichlet-0001" / "ledger.jsonl").entries()
    assert entry.kind == "spend"  # over-reported: spent in the ledger, never sent
    report = audit_run(run)
    assert report.ok and all(c.verified for c in report.clients)
