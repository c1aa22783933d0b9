"""Privacy audit: signatures, chain and receipts catch each kind of tampering and name the client and
round; the independent recomputation (dp_accounting PLD) agrees with the ledger within 1 % and flags
an epsilon that does not; policy limits; the `fedrec audit` command's errors."""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from privacy.accounting import PrivacyAccountant
from privacy.audit import TOLERANCE, audit_run, epsilon_agrees, recompute_epsilons
from privacy.audit_report import write_report
from privacy.ledger import MECHANISM, LedgerEntry, PrivacyLedger, canonical_json

SIGMA, Q, STEPS, DELTA = 2.0, 0.1, 5, 1e-5  # cheap to recompute (about 0.2 s per entry)
CLIENTS = ("eu-west", "us-east")


@functools.cache
def epsilons(rounds: int = 4) -> tuple[float, ...]:
    return tuple(recompute_epsilons([(SIGMA, Q, STEPS)] * rounds, DELTA))


def entry(client: str, rnd: int, epsilon: float | None = None, **changes) -> LedgerEntry:
    fields = dict(run="7", round=rnd, client=client, kind="spend", mechanism=MECHANISM, noise_multiplier=SIGMA,
                  sample_rate=Q, steps=STEPS, max_grad_norm=1.0, delta=DELTA,
                  epsilon=epsilons()[rnd - 1] if epsilon is None else epsilon, accountant="prv",
                  time="2025-01-01T12:00:00+00:00")
    return LedgerEntry(**{**fields, **changes})


def build_run(tmp_path: Path, *, receipts: bool = True, rounds: int = 4,
              entries: dict[str, list[LedgerEntry]] | None = None) -> Path:
    """A run directory as a simulation leaves it: ledgers under clients/, the server's receipts.jsonl."""
    run = tmp_path / "run"
    lines = []
    entries = entries or {c: [entry(c, r) for r in range(1, rounds + 1)] for c in CLIENTS}
    for node, (client, written) in enumerate(entries.items(), start=1):
        ledger = PrivacyLedger(run / "clients" / client / "ledger.jsonl")
        for e in written:
            receipt = ledger.receipt(ledger.append(e))
            lines.append({"round": e.round, "node_id": node, "outcome": "trained" if e.kind == "spend" else "declined",
                          "secure_aggregation": True, "received": "2025-01-01T12:00:01+00:00",
                          "receipt": receipt.to_dict()})
    if receipts:
        (run / "receipts.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return run


def ledger_path(run: Path, client: str = "eu-west") -> Path:
    return run / "clients" / client / "ledger.jsonl"


def objs(run: Path, client: str = "eu-west") -> list[dict]:
    return [json.loads(line) for line in ledger_path(run, client).read_bytes().splitlines()]


def write_objs(run: Path, items: list[dict], client: str = "eu-west") -> None:
    ledger_path(run, client).write_bytes(b"".join(canonical_json(o) + b"\n" for o in items))


def sign(obj: dict, key: Ed25519PrivateKey) -> dict:
    body = {k: v for k, v in obj.items() if k != "signature"}
    return {**body, "signature": key.sign(canonical_json(body)).hex()}


def errors(report) -> list[tuple[str, str, int | None]]:
    return [(f.kind, f.client, f.round) for f in report.problems]


def the_problem(report, kind: str):
    found = [f for f in report.problems if f.kind == kind]
    assert found, f"no {kind!r} finding; problems: {errors(report)}"
    return found[0]


# ---------------------------------------------------------------------------------------- an intact run


def test_an_intact_run_passes_and_the_report_is_written(tmp_path):
    run = build_run(tmp_path)
    report = audit_run(run)
    assert report.ok, errors(report)
    assert [c.client for c in report.clients] == list(CLIENTS) and all(c.verified for c in report.clients)
    for c in report.clients:
        assert c.public_key_source == "ledger.pub" and c.receipts == 4
        assert [(e.round, e.seq, e.signature, e.receipt, e.status) for e in c.entries] == [
            (r, r - 1, "valid", "matched", "ok") for r in range(1, 5)]
        assert all(e.epsilon_ok and abs(e.relative_difference) < 1e-9 for e in c.entries)
        assert c.summary["rounds_spent"] == [1, 2, 3, 4] and c.summary["refusals"] == []
    assert report.federation["epsilon"] == pytest.approx(epsilons()[-1])
    assert report.federation["delta"] == DELTA
    paths = write_report(report, tmp_path / "out")
    assert [p.name for p in paths] == ["report.md", "report.json", "epsilon.png"]
    assert all(p.stat().st_size > 0 for p in paths)
    assert json.loads((tmp_path / "out" / "report.json").read_text())["ok"] is True
    assert "**Verdict: PASSED.**" in (tmp_path / "out" / "report.md").read_text()


# ---------------------------------------------------------------------------------------- tampering


@pytest.mark.parametrize("receipts", [True, False], ids=["receipts", "ledger-only"])
def test_an_edited_field_is_named(tmp_path, receipts):
    run = build_run(tmp_path, receipts=receipts)
    items = objs(run)
    items[1]["epsilon"] = 0.5  # round 2: spent less than recorded, signature kept
    write_objs(run, items)
    report = audit_run(run)
    assert not report.ok
    f = the_problem(report, "edited")
    assert (f.client, f.round, f.line) == ("eu-west", 2, 2)
    if receipts:
        assert f"epsilon {epsilons()[1]!r} -> 0.5 (receipt -> ledger)" in f.message
    md = write_report(report, tmp_path / "out")[0].read_text()
    assert "| eu-west | 2 | 2 | edited |" in md and "**Verdict: FAILED.**" in md
    assert all(c.verified for c in report.clients if c.client == "us-east")


@pytest.mark.parametrize("receipts", [True, False], ids=["receipts", "ledger-only"])
def test_a_deleted_entry_is_named(tmp_path, receipts):
    run = build_run(tmp_path, receipts=receipts)
    items = objs(run)
    del items[1]  # round 2
    write_objs(run, items)
    report = audit_run(run)
    f = the_problem(report, "deleted")
    assert f.client == "eu-west"
    if receipts:
        assert f.round == 2 and "round 2 (spend, seq 1): the server holds a receipt for it" in f.message
    else:  # the ledger alone knows the position, and the rounds around it
        assert f.seq == 1 and "after round 1 (spend, seq 0, line 1)" in f.message
        assert "before round 3 (spend, seq 2, line 2)" in f.message
    assert len([p for p in report.problems if p.kind == "deleted"]) == 1


def test_a_deleted_last_entry_is_found_only_with_receipts(tmp_path):
    run = build_run(tmp_path)
    write_objs(run, objs(run)[:-1])
    f = the_problem(audit_run(run), "deleted")
    assert (f.client, f.round) == ("eu-west", 4)
    (run / "receipts.jsonl").unlink()
    report = audit_run(run)
    assert report.ok  # a limit, stated in the report
    assert any("A deleted last entry" in note for note in report.not_checked)


@pytest.mark.parametrize("receipts", [True, False], ids=["receipts", "ledger-only"])
def test_reordered_entries_are_named(tmp_path, receipts):
    run = build_run(tmp_path, receipts=receipts)
    items = objs(run)
    items[1], items[2] = items[2], items[1]  # rounds 2 and 3 swapped, each still validly signed
    write_objs(run, items)
    report = audit_run(run)
    f = the_problem(report, "reordered")
    assert (f.client, f.round, f.line) == ("eu-west", 2, 3)
    assert "round 2 (spend, seq 1, line 3) comes after round 3 (spend, seq 2, line 2)" in f.message
    assert [p.kind for p in report.problems] == ["reordered"]  # epsilons are recomputed in chain order
    entries = next(c for c in report.clients if c.client == "eu-west").entries
    assert [(e.line, e.round) for e in entries] == [(1, 1), (3, 2), (2, 3), (4, 4)]


@pytest.mark.parametrize("receipts", [True, False], ids=["receipts", "ledger-only"])
def test_an_inserted_forged_entry_is_named(tmp_path, receipts):
    run = build_run(tmp_path, receipts=receipts)
    items = objs(run)
    forged = {**items[1], "round": 3, "epsilon": 0.01}  # a copy of round 2's line, edited; it cannot be signed
    items.insert(2, forged)
    write_objs(run, items)
    report = audit_run(run)
    f = the_problem(report, "inserted")
    assert (f.client, f.round, f.line) == ("eu-west", 3, 3)
    assert not any(p.kind in ("edited", "deleted") for p in report.problems)
    entries = next(c for c in report.clients if c.client == "eu-west").entries
    assert [e.line for e in entries] == [1, 2, 4, 5]  # the forged line is left out of the recomputation


def test_a_forged_entry_signed_with_another_key_is_named(tmp_path):
    run = build_run(tmp_path)
    items = objs(run)
    forged = sign({**items[-1], "round": 5, "seq": 4, "prev_hash": "f" * 64}, Ed25519PrivateKey.generate())
    write_objs(run, [*items, forged])
    f = the_problem(audit_run(run), "inserted")
    assert (f.client, f.round, f.line) == ("eu-west", 5, 5)
    assert "never received a receipt for it: forged and inserted" in f.message


@pytest.mark.parametrize("receipts", [True, False], ids=["receipts", "ledger-only"])
def test_an_entry_re_signed_with_another_key_is_named(tmp_path, receipts):
    run = build_run(tmp_path, receipts=receipts)
    items = objs(run)
    items[1] = sign(items[1], Ed25519PrivateKey.generate())  # same content, someone else's signature
    write_objs(run, items)
    report = audit_run(run)
    f = the_problem(report, "bad-signature")
    assert (f.client, f.round, f.line) == ("eu-west", 2, 2)
    assert [p.kind for p in report.problems] == ["bad-signature"]
    entries = next(c for c in report.clients if c.client == "eu-west").entries
    assert [e.signature for e in entries] == ["valid", "invalid", "valid", "valid"]


def test_an_edited_entry_re_signed_with_another_key_is_an_edit(tmp_path):
    run = build_run(tmp_path)
    items = objs(run)
    items[1] = sign({**items[1], "noise_multiplier": 4.0}, Ed25519PrivateKey.generate())
    write_objs(run, items)
    f = the_problem(audit_run(run), "edited")
    assert (f.client, f.round) == ("eu-west", 2) and "noise_multiplier 2.0 -> 4.0" in f.message


def test_a_ledger_re_keyed_wholesale_is_caught_by_the_receipts(tmp_path):
    """The client rewrites its history with a fresh key and chain: only the receipts can tell."""
    run = build_run(tmp_path)
    path = ledger_path(run)
    for name in ("ledger.jsonl", "ledger.key", "ledger.pub"):
        (path.parent / name).unlink()
    fresh = PrivacyLedger(path)
    for r in range(1, 5):
        fresh.append(entry("eu-west", r))  # the same events, timestamps included
    report = audit_run(run)
    assert ("key-mismatch", "eu-west", None) in errors(report)
    f = the_problem(report, "bad-signature")
    assert "differs from the one in its receipt" in f.message
    (run / "receipts.jsonl").unlink()
    assert audit_run(run).ok  # without receipts a consistent rewrite cannot be seen (stated in the report)


def test_a_deleted_ledger_is_named_by_its_receipts(tmp_path):
    run = build_run(tmp_path)
    for p in ledger_path(run, "us-east").parent.iterdir():
        p.unlink()
    ledger_path(run, "us-east").parent.rmdir()
    f = the_problem(audit_run(run), "ledger-missing")
    assert f.client == "us-east" and "rounds [1, 2, 3, 4]" in f.message


def test_edited_receipts_are_reported(tmp_path):
    run = build_run(tmp_path)
    lines = (run / "receipts.jsonl").read_text().splitlines()
    obj = json.loads(lines[5])  # us-east round 2
    obj["receipt"]["body"] = obj["receipt"]["body"].replace('"steps":5', '"steps":50')
    lines[5] = json.dumps(obj)
    (run / "receipts.jsonl").write_text("\n".join(lines) + "\n")
    f = the_problem(audit_run(run), "receipt-invalid")
    assert (f.client, f.round) == ("us-east", 2) and "entry_hash is not the SHA-256" in f.message


def test_a_corrupt_line_is_named(tmp_path):
    run = build_run(tmp_path, receipts=False)
    raw = ledger_path(run).read_bytes().splitlines(keepends=True)
    raw[2] = b'{"not": "a ledger entry"}\n'
    ledger_path(run).write_bytes(b"".join(raw))
    f = the_problem(audit_run(run), "corrupt")
    assert (f.client, f.line) == ("eu-west", 3) and "line 3 is not a ledger entry" in f.message


def test_a_torn_last_line_is_not_a_problem(tmp_path):
    run = build_run(tmp_path)
    with open(ledger_path(run), "ab") as f:
        f.write(b'{"accountant":"prv","client":"eu-west","de')
    report = audit_run(run)
    assert report.ok and any(f.kind == "torn-line" and f.client == "eu-west" for f in report.findings)


def test_unsigned_older_ledgers_are_read_and_reported_as_unsigned(tmp_path):
    run = tmp_path / "run"
    ledger_path(run).parent.mkdir(parents=True)
    ledger_path(run).write_text("".join(json.dumps(entry("eu-west", r).to_dict()) + "\n" for r in (1, 2)))
    report = audit_run(run)
    assert report.ok
    assert any(f.kind == "unsigned" and f.severity == "warning" for f in report.findings)
    assert [e.signature for e in report.clients[0].entries] == ["unsigned", "unsigned"]
    write_report(report, tmp_path / "out")  # the verdict must not read as a verified ledger
    text = (tmp_path / "out" / "report.md").read_text()
    assert "**Verdict: PASSED WITH WARNINGS.**" in text and "integrity is not verified: eu-west" in text
    # the client goes on signing: the chain starts after the unsigned lines, which stay a warning
    PrivacyLedger(ledger_path(run)).append(entry("eu-west", 3))
    report = audit_run(run)
    assert report.ok and [e.signature for e in report.clients[0].entries] == ["unsigned", "unsigned", "valid"]
    # an unsigned line after signed ones is tampering (a signature stripped)
    PrivacyLedger(ledger_path(run)).append(entry("eu-west", 4))
    items = objs(run)
    unsigned = [{k: v for k, v in o.items() if k not in ("seq", "prev_hash", "signature")} for o in items]
    write_objs(run, [*items[:3], unsigned[3]])
    f = the_problem(audit_run(run), "unsigned-after-signed")
    assert (f.client, f.round) == ("eu-west", 4)
    # stripping the first signed line makes it look older, but the next entry committed to its signed form
    write_objs(run, [*items[:2], unsigned[2], items[3]])
    f = the_problem(audit_run(run), "edited")
    assert (f.client, f.round) == ("eu-west", 3)


# ---------------------------------------------------------------------------------------- recomputation


def test_golden_configuration_agrees_within_one_percent(tmp_path):
    """sigma 1.0, q 0.1, 1000 steps, delta 1/600: the ledger's PRV epsilon (Opacus, 19.02) against
    dp_accounting's PLD (19.005)."""
    delta = 1 / 600
    ledger_eps = PrivacyAccountant([(1.0, 0.1, 1000)]).epsilon(delta, "prv")
    assert ledger_eps == pytest.approx(19.02, abs=0.01)
    e = entry("eu-west", 1, noise_multiplier=1.0, sample_rate=0.1, steps=1000, delta=delta, epsilon=ledger_eps)
    report = audit_run(build_run(tmp_path, entries={"eu-west": [e]}))
    assert report.ok, errors(report)
    (row,) = report.clients[0].entries
    assert row.epsilon_recomputed == pytest.approx(19.005, abs=0.002)
    assert abs(row.relative_difference) < TOLERANCE and row.epsilon_ok
    assert "PoissonSampledDpEvent(sampling_probability=0.1" in row.event and "count=1000" in row.event


@pytest.mark.parametrize("factor", [1.05, 0.95, 0.985], ids=["inflated", "deflated", "deflated-1.5%"])
def test_a_wrong_epsilon_is_flagged(tmp_path, factor):
    """A validly signed ledger whose round-3 epsilon does not follow from its events (a client bug)."""
    written = {"eu-west": [entry("eu-west", r, epsilon=epsilons()[r - 1] * (factor if r == 3 else 1.0))
                           for r in range(1, 5)]}
    report = audit_run(build_run(tmp_path, entries=written))
    assert errors(report) == [("epsilon-mismatch", "eu-west", 3)]
    f = report.problems[0]
    assert f"recomputed from the recorded events with dp_accounting PLD: {epsilons()[2]:.6g}" in f.message
    assert f"({factor - 1:+.2%}, beyond the 1% tolerance)" in f.message


def test_recomputation_equals_dp_accountings_pld_accountant():
    """The per-event cache computes exactly what PLDAccountant computes from the events."""
    import dp_accounting
    from dp_accounting.pld import PLDAccountant

    from privacy.audit import Recomputation, spend_event

    history = [(1.0, 0.25, 4), (1.0, 0.25, 4), (1.3, 0.2, 5), (1.0, 0.25, 4)]
    rec, acc = Recomputation(), PLDAccountant(dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE)
    for sigma, q, steps in history:
        rec.add(sigma, q, steps)
        acc.compose(spend_event(sigma, q, steps))
        assert rec.epsilon(1e-3) == pytest.approx(acc.get_epsilon(1e-3), rel=1e-12)
    rec.add(0.0, 0.25, 4)
    assert rec.epsilon(1e-3) == math.inf


def test_epsilon_agreement_rule():
    # PRV: 1 % either way, plus Opacus' eps_error 0.01 above
    assert epsilon_agrees(1.0, 1.0, accountant="prv") == (True, 0.0)
    assert epsilon_agrees(0.52434, 0.51429, accountant="prv")[0]  # sigma 2, q 0.05, 20 steps: PRV vs PLD
    assert not epsilon_agrees(0.5, 0.51429, accountant="prv")[0]  # under-reported by 2.8 %
    assert not epsilon_agrees(10.0 * 1.012 + 0.01, 10.0, accountant="prv")[0]
    # RDP ledgers: between PLD (tight) and dp_accounting's RDP at Opacus' orders
    pld, rdp = recompute_epsilons([(1.5, 0.04, 2250)], 1e-5)[0], None
    from privacy.audit import Recomputation
    r = Recomputation(rdp=True)
    r.add(1.5, 0.04, 2250)
    rdp = r.rdp_epsilon(1e-5)
    assert pld == pytest.approx(6.77, abs=0.01) and rdp == pytest.approx(7.3291, abs=0.001)  # Opacus test: 7.3291
    assert epsilon_agrees(7.3291, pld, accountant="rdp", rdp_bound=rdp)[0]
    assert not epsilon_agrees(6.6, pld, accountant="rdp", rdp_bound=rdp)[0]
    assert not epsilon_agrees(7.6, pld, accountant="rdp", rdp_bound=rdp)[0]
    # nothing spent; a noiseless step
    assert epsilon_agrees(0.0, 0.0, accountant="prv")[0] and not epsilon_agrees(0.1, 0.0, accountant="prv")[0]
    assert epsilon_agrees(math.inf, math.inf, accountant="prv")[0]


def test_refusals_spend_nothing_and_policy_limits_are_checked(tmp_path):
    policy = tmp_path / "policy.toml"
    eps = epsilons()
    policy.write_text(f"[policy]\nmax_epsilon = {(eps[1] + eps[2]) / 2}\nmax_rounds = 5\n")
    written = {"eu-west": [entry("eu-west", 1), entry("eu-west", 2),
                           entry("eu-west", 3, epsilon=eps[1], kind="refusal", steps=0,
                                 reason="epsilon would exceed the budget")],
               "us-east": [entry("us-east", r) for r in range(1, 4)]}  # spends beyond the budget in round 3
    run = build_run(tmp_path, entries=written)
    (run / "config.json").write_text(json.dumps({"privacy": {"mode": "dp-sgd", "policy": str(policy)}}))
    report = audit_run(run)
    assert errors(report) == [("budget-exceeded", "us-east", 3)]
    eu = next(c for c in report.clients if c.client == "eu-west")
    assert eu.verified and eu.summary["refusals"] == [{"round": 3, "reason": "epsilon would exceed the budget"}]
    assert eu.entries[2].epsilon_recomputed == pytest.approx(eps[1]) and eu.entries[2].epsilon_ok
    assert eu.summary["policy_budget_remaining"] == pytest.approx((eps[2] - eps[1]) / 2)
    paths = write_report(report, tmp_path / "out")
    assert [p.name for p in paths] == ["report.md", "report.json", "epsilon.png", "budget.png"]


# ---------------------------------------------------------------------------------------- the command


def test_fedrec_audit_errors_name_the_path(tmp_path, capsys):
    from simulations.cli import main

    missing = tmp_path / "nope"
    assert main(["audit", str(missing)]) == 2
    assert f"fedrec audit: error: run directory {missing} does not exist" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["audit", str(empty)]) == 2
    err = capsys.readouterr().err
    assert f"fedrec audit: error: no privacy ledgers under {empty}: expected {empty / 'clients'}/<client>" in err


def test_fedrec_audit_exit_codes(tmp_path, capsys):
    from simulations.cli import main

    run = build_run(tmp_path)
    assert main(["audit", str(run), "--out", str(tmp_path / "ok")]) == 0
    assert "PASSED" in capsys.readouterr().out
    items = objs(run, "us-east")
    items[2]["sample_rate"] = 0.01
    write_objs(run, items, "us-east")
    assert main(["audit", str(run)]) == 1
    out = capsys.readouterr().out
    assert "PROBLEM client us-east, round 3, line 3: edited:" in out and "sample_rate 0.1 -> 0.01" in out
    assert (run / "audit" / "report.md").is_file()  # default --out: RUN/audit
