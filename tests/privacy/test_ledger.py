"""Privacy ledger: round trip, crash safety (a real SIGKILL and a hand-made torn line), corruption."""

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
from privacy.ledger import MECHANISM, LedgerEntry, LedgerError, PrivacyLedger

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
    written = [entry(0), entry(1, sigma=1.2), entry(2, kind="refusal", sigma=0.1), entry(3, sigma=1.2)]
    for e in written:
        ledger.append(e)
    assert ledger.entries() == written
    assert ledger.rounds_spent() == 3
    assert ledger.accountant().history == [(1.0, 0.1, 2), (1.2, 0.1, 4)]  # the refusal spent nothing
    assert all(json.loads(line) == e.to_dict()
               for line, e in zip(ledger.path.read_text().splitlines(), written))


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
    lines[1] = lines[1].replace('"steps": 2', '"steps": "two"')
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
