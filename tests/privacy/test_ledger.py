"""Privacy ledger: round trip, crash safety (a real SIGKILL and a hand-made torn line), corruption,
signatures and the hash chain, the key files, unsigned (older) ledgers, receipts."""

import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

from privacy.accounting import PrivacyAccountant
from privacy.ledger import (CHAIN_FIELDS, GENESIS_HASH, MECHANISM, LedgerEntry, LedgerError, PrivacyLedger, Receipt,
                            canonical_json, load_public_key, sha256_hex, split_receipt, verify_signature)

REPO = Path(__file__).resolve().parents[2]


def entry(round_: int, kind: str = "spend", sigma: float = 1.0, **changes) -> LedgerEntry:
    fields = dict(run="r1", round=round_, client="eu-west", kind=kind, mechanism=MECHANISM,
                  noise_multiplier=sigma, sample_rate=0.1, steps=2, max_grad_norm=1.0, delta=1e-5,
                  epsilon=0.5 * (round_ + 1), accountant="prv",
                  reason="" if kind == "spend" else "budget would be exceeded",
                  time="2025-01-01T12:00:00+00:00")
    return LedgerEntry(**{**fields, **changes})


def test_round_trip_and_replay(tmp_path):
    ledger = PrivacyLedger(tmp_path / "new" / "ledger.jsonl")
    assert ledger.entries() == [] and ledger.rounds_spent() == 0
    # round 0: the transition table's release (privacy/transitions.py), then three training rounds
    written = [entry(0, sigma=0.7, sample_rate=1.0, steps=1), entry(1), entry(2, sigma=1.2),
               entry(3, kind="refusal", sigma=0.1), entry(4, sigma=1.2)]
    for e in written:
        ledger.append(e)
    assert ledger.entries() == written
    assert ledger.rounds_spent() == 3  # the release is accounted but is no training round
    # the refusal spent nothing
    assert ledger.accountant().history == [(0.7, 1.0, 1), (1.0, 0.1, 2), (1.2, 0.1, 4)]
    for line, e in zip(ledger.path.read_bytes().splitlines(), written):
        obj = json.loads(line)
        assert {k: v for k, v in obj.items() if k not in CHAIN_FIELDS} == e.to_dict()
        assert line == canonical_json(obj)  # each line is written in canonical form


def test_replay_of_twenty_rounds_equals_one_accountant(tmp_path):
    ledger = PrivacyLedger(tmp_path / "ledger.jsonl")
    whole = PrivacyAccountant()
    for r in range(20):
        sigma = 1.0 if r < 10 else 1.3
        ledger.append(entry(r, sigma=sigma))
        whole.add(noise_multiplier=sigma, sample_rate=0.1, steps=2)
    replayed = PrivacyLedger(ledger.path).accountant()
    assert replayed.history == whole.history
    assert replayed.epsilon(1e-5, "rdp") == pytest.approx(whole.epsilon(1e-5, "rdp"), rel=1e-12)


def test_entry_validation_and_from_dict():
    with pytest.raises(ValueError, match="kind must be one of"):
        entry(0, kind="spent")
    with pytest.raises(ValueError, match="reason must be '' for a spend and non-empty for a refusal"):
        entry(0, kind="refusal", reason="")
    with pytest.raises(ValueError, match="time must be a UTC ISO-8601 time"):
        entry(0, time="2025-01-01T12:00:00+02:00")
    with pytest.raises(ValueError, match="steps must be an int"):
        entry(0, steps=1.5)
    data = entry(0).to_dict()
    assert LedgerEntry.from_dict(data) == entry(0)
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['extra'\]"):
        LedgerEntry.from_dict({**data, "extra": 1})
    del data["delta"]
    with pytest.raises(ValueError, match=r"missing key\(s\) \['delta'\]"):
        LedgerEntry.from_dict(data)


def test_torn_last_line_is_skipped_then_truncated(tmp_path, caplog):
    ledger = PrivacyLedger(tmp_path / "ledger.jsonl")
    ledger.append(entry(0))
    ledger.append(entry(1))
    line = (json.dumps(entry(2).to_dict()) + "\n").encode()
    with open(ledger.path, "ab") as f:
        f.write(line[: len(line) // 2])  # a crash mid-write
    with caplog.at_level(logging.WARNING, logger="privacy.ledger"):
        assert ledger.entries() == [entry(0), entry(1)]
    assert f"{ledger.path}:3: skipping a torn last line" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="privacy.ledger"):
        ledger.append(replace(entry(2), epsilon=9.0))
    assert f"{ledger.path}: truncating a torn last line" in caplog.text
    assert ledger.entries() == [entry(0), entry(1), replace(entry(2), epsilon=9.0)]
    assert ledger.path.read_bytes().endswith(b"\n")


def test_corrupt_middle_line_names_path_and_line(tmp_path):
    ledger = PrivacyLedger(tmp_path / "ledger.jsonl")
    for r in range(3):
        ledger.append(entry(r))
    lines = ledger.path.read_text().splitlines(keepends=True)
    lines[1] = lines[1].replace('"steps":2', '"steps":"two"')
    ledger.path.write_text("".join(lines))
    where = re.escape(str(ledger.path))
    with pytest.raises(LedgerError, match=rf"^{where}:2: not a ledger entry: steps must be an int"):
        ledger.entries()
    lines[1] = "{not json\n"
    ledger.path.write_text("".join(lines))
    with pytest.raises(LedgerError, match=rf"^{where}:2: not a JSON line"):
        ledger.entries()


WRITER = """
import sys
from privacy.ledger import LedgerEntry, PrivacyLedger, MECHANISM
ledger = PrivacyLedger(sys.argv[1])
r = 0
while True:
    ledger.append(LedgerEntry(run="r1", round=r, client="c" * 4000, kind="spend", mechanism=MECHANISM,
                              noise_multiplier=1.0, sample_rate=0.1, steps=2, max_grad_norm=1.0,
                              delta=1e-5, epsilon=float(r), accountant="prv"))
    r += 1
"""


def test_sigkill_mid_append_leaves_a_readable_ledger(tmp_path):
    path = tmp_path / "ledger.jsonl"
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], cwd=REPO)
    try:
        deadline = time.monotonic() + 15
        while not (path.exists() and path.read_bytes().count(b"\n") >= 5):
            assert proc.poll() is None, "the writer exited on its own"
            assert time.monotonic() < deadline, "the writer wrote fewer than 5 entries in 15 s"
            time.sleep(0.01)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    ledger = PrivacyLedger(path)
    found = ledger.entries()
    assert len(found) >= 5
    assert [e.round for e in found] == list(range(len(found)))  # complete entries, none lost in between
    ledger.append(entry(len(found)))
    lines = path.read_text().splitlines()
    assert [json.loads(line)["round"] for line in lines] == list(range(len(found) + 1))
    assert path.read_bytes().endswith(b"\n")


def test_entries_are_signed_and_hash_chained(tmp_path):
    ledger = PrivacyLedger(tmp_path / "c" / "ledger.jsonl")
    returned = [ledger.append(entry(r)) for r in range(3)]
    records = ledger.records()
    assert records == returned
    key = load_public_key(tmp_path / "c" / "ledger.pub")
    assert key == ledger.public_key() and len(key) == 64
    assert [r.seq for r in records] == [0, 1, 2]
    assert records[0].prev_hash == GENESIS_HASH == "0" * 64
    assert [r.prev_hash for r in records[1:]] == [r.hash for r in records[:-1]]
    for raw, r in zip(ledger.path.read_bytes().splitlines(), records):
        obj = json.loads(raw)
        body = canonical_json({k: v for k, v in obj.items() if k != "signature"})
        assert r.body == body and r.hash == sha256_hex(body)
        assert r.verify(key) and verify_signature(key, body, obj["signature"])
    # one changed field, or another key, and the signature no longer verifies
    edited = json.loads(ledger.path.read_bytes().splitlines()[1])
    edited["epsilon"] = 0.1
    assert not verify_signature(key, canonical_json({k: v for k, v in edited.items() if k != "signature"}),
                                edited["signature"])
    other = PrivacyLedger(tmp_path / "d" / "ledger.jsonl")
    assert not records[1].verify(other.public_key())


def test_key_files_permissions_and_reuse(tmp_path, caplog):
    ledger = PrivacyLedger(tmp_path / "state" / "eu" / "ledger.jsonl")
    ledger.append(entry(0))
    key_file, pub_file = tmp_path / "state" / "eu" / "ledger.key", tmp_path / "state" / "eu" / "ledger.pub"
    assert ledger.key_path == key_file and ledger.public_key_path == pub_file
    assert key_file.stat().st_mode & 0o777 == 0o600
    assert b"PRIVATE KEY" in key_file.read_bytes() and b"PUBLIC KEY" in pub_file.read_bytes()
    assert sorted(p.name for p in key_file.parent.iterdir()) == ["ledger.jsonl", "ledger.key", "ledger.pub"]
    # a fresh process (a new PrivacyLedger) keeps the same key; a lost ledger.pub is rewritten from it
    first = ledger.public_key()
    pub_file.unlink()
    again = PrivacyLedger(ledger.path)
    again.append(entry(1))
    assert again.public_key() == first == load_public_key(pub_file)
    assert all(r.verify(first) for r in again.records())
    # a key others can read is used, with a warning
    key_file.chmod(0o644)
    with caplog.at_level(logging.WARNING, logger="privacy.ledger"):
        PrivacyLedger(ledger.path).append(entry(2))
    assert f"{key_file}: the ledger's signing key has mode 644" in caplog.text


def test_two_clients_have_different_keys(tmp_path):
    a, b = PrivacyLedger(tmp_path / "a" / "ledger.jsonl"), PrivacyLedger(tmp_path / "b" / "ledger.jsonl")
    a.append(entry(0))
    b.append(entry(0))
    assert a.public_key() != b.public_key()


def test_torn_tail_then_the_chain_goes_on_from_the_last_complete_line(tmp_path):
    ledger = PrivacyLedger(tmp_path / "ledger.jsonl")
    ledger.append(entry(0))
    second = ledger.append(entry(1))
    with open(ledger.path, "ab") as f:
        f.write(b'{"accountant":"prv","client":"eu-west","del')  # a crash mid-write
    assert [r.seq for r in ledger.records()] == [0, 1]
    third = ledger.append(entry(2))
    assert third.seq == 2 and third.prev_hash == second.hash and third.line == 3
    assert ledger.records()[-1] == third


def test_unsigned_older_ledger_is_read_and_the_chain_starts_after_it(tmp_path):
    ledger = PrivacyLedger(tmp_path / "ledger.jsonl")
    ledger.path.write_text("".join(json.dumps(entry(r).to_dict()) + "\n" for r in range(2)))  # the old format
    assert ledger.entries() == [entry(0), entry(1)]
    old = ledger.records()
    assert [r.signed for r in old] == [False, False] and old[1].seq is None
    new = ledger.append(entry(2))
    assert new.seq == 2 and new.prev_hash == old[1].hash and new.verify(ledger.public_key())
    assert ledger.entries() == [entry(0), entry(1), entry(2)]
    assert ledger.accountant().history == [(1.0, 0.1, 6)]


def test_a_partly_signed_line_is_corrupt(tmp_path):
    ledger = PrivacyLedger(tmp_path / "ledger.jsonl")
    ledger.append(entry(0))
    obj = json.loads(ledger.path.read_bytes())
    del obj["signature"]
    ledger.path.write_bytes(canonical_json(obj) + b"\n")
    with pytest.raises(LedgerError, match=r":1: not a ledger entry: a signed entry has all of"):
        ledger.entries()
    with pytest.raises(LedgerError, match=r":1: not a ledger entry"):
        ledger.append(entry(1))  # the chain cannot go on from a line it cannot read


def test_receipt_round_trip_through_an_error_reason(tmp_path):
    ledger = PrivacyLedger(tmp_path / "ledger.jsonl")
    record = ledger.append(entry(3, kind="refusal"))
    receipt = ledger.receipt(record)
    assert receipt.problems() == []
    assert (receipt.client, receipt.round, receipt.kind, receipt.seq) == ("eu-west", 3, "refusal", 0)
    assert receipt.entry_hash == record.hash and receipt.body.encode() == record.body
    assert Receipt.from_dict(receipt.to_dict()) == receipt
    reason = receipt.attach_to("client eu-west: epsilon would exceed the budget [sic]")
    assert split_receipt(reason) == ("client eu-west: epsilon would exceed the budget [sic]", receipt)
    assert split_receipt("no receipt here") == ("no receipt here", None)
    forged = Receipt.from_dict({**receipt.to_dict(), "body": receipt.body.replace('"round":3', '"round":4')})
    assert "entry_hash is not the SHA-256 of the receipt's body" in forged.problems()[0]
    with pytest.raises(ValueError, match="receipt seq must be int"):
        Receipt.from_dict({**receipt.to_dict(), "seq": "0"})
