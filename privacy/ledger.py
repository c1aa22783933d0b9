"""The privacy ledger of one client: an append-only, crash-safe JSON-lines file.

One line per round the client was asked to train: a ``"spend"`` (it trained with DP-SGD and
released an update) or a ``"refusal"`` (its privacy policy declined; nothing was released). Each
entry records the mechanism, its parameters and the client's cumulative epsilon after the entry.
The ledger is the single persistent source of the client's accountant history:
:meth:`PrivacyLedger.accountant` replays the spends, so a client that is a fresh process every
round (as Flower clients may be) still accounts for every round it has ever released.

Contract (write-ahead): **the entry is durable before the client's update leaves it.**
:meth:`PrivacyLedger.append` writes the line with one ``write``, ``fsync``s the file (and the
directory when the file was just created) and only then returns; the client sends its update
after that. A kill at any point therefore never under-reports spend: either the entry is complete
and on disk, or the update was never sent. A kill mid-``write`` leaves a torn last line without its
newline; :meth:`entries` skips it with a warning and the next :meth:`append` truncates it away
first. Any other unreadable line is corruption and raises :class:`LedgerError` (``path:line:``).

Example line (one per entry; keys in this order)::

    {"run": "r1", "round": 3, "client": "eu-west", "kind": "spend",
     "mechanism": "DP-SGD: Poisson-sampled users, per-user clipping, Gaussian noise",
     "noise_multiplier": 1.1, "sample_rate": 0.05, "steps": 40, "max_grad_norm": 1.0,
     "delta": 1e-05, "epsilon": 2.71, "accountant": "prv", "reason": "",
     "time": "2025-01-01T12:00:00+00:00"}

One writer at a time: the ledger is not locked against two processes appending concurrently.
"""

from __future__ import annotations

import json
import logging
import math
import numbers
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from core_model.validation import check_fields
from privacy.accounting import ACCOUNTANTS, PrivacyAccountant

logger = logging.getLogger(__name__)

KINDS = ("spend", "refusal")
MECHANISM = "DP-SGD: Poisson-sampled users, per-user clipping, Gaussian noise"
"""The mechanism this project's clients run (the usual value of :attr:`LedgerEntry.mechanism`)."""


class LedgerError(ValueError):
    """A corrupt ledger. The message starts with ``path:line:`` (line 0 = the file as a whole)."""

    def __init__(self, path: str | Path, line: int, message: str) -> None:
        self.path = str(path)
        self.line = int(line)
        self.reason = message
        super().__init__(f"{self.path}:{self.line}: {message}")


def utc_now() -> str:
    """The current time as UTC ISO-8601 (``2025-01-01T12:00:00.123456+00:00``)."""
    return datetime.now(timezone.utc).isoformat()


@dataclass(frozen=True)
class LedgerEntry:
    """One round at one client: a spend (update released) or a refusal (nothing released).

    ``epsilon`` is the client's cumulative epsilon at ``delta`` by ``accountant`` after this entry
    (for a refusal: unchanged from before). ``reason`` is ``""`` for a spend and says why the round
    was declined for a refusal. For a refusal, the mechanism parameters are those requested.
    """

    run: str
    round: int
    client: str
    kind: str
    mechanism: str
    noise_multiplier: float
    sample_rate: float
    steps: int
    max_grad_norm: float
    delta: float
    epsilon: float
    accountant: str
    reason: str = ""
    time: str = field(default_factory=utc_now)

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type == "str" and not isinstance(value, str):
                raise ValueError(f"{f.name} must be a str, got {value!r}")
            if f.type == "int" and (isinstance(value, bool) or not isinstance(value, numbers.Integral)):
                raise ValueError(f"{f.name} must be an int, got {value!r}")
            if f.type == "float":
                if isinstance(value, bool) or not isinstance(value, numbers.Real):
                    raise ValueError(f"{f.name} must be a number, got {value!r}")
                object.__setattr__(self, f.name, float(value))
            if f.type == "int":
                object.__setattr__(self, f.name, int(value))
        checks = [
            ("round", self.round >= 0, ">= 0"),
            ("kind", self.kind in KINDS, f"one of {KINDS}"),
            ("mechanism", bool(self.mechanism), "non-empty"),
            ("noise_multiplier", 0 <= self.noise_multiplier < math.inf, "finite and >= 0"),
            ("sample_rate", 0 < self.sample_rate <= 1, "in (0, 1]"),
            ("steps", self.steps >= 0, ">= 0"),
            ("max_grad_norm", 0 < self.max_grad_norm < math.inf, "finite and > 0"),
            ("delta", 0 < self.delta < 1, "in (0, 1)"),
            ("epsilon", self.epsilon >= 0, ">= 0 (inf allowed)"),
            ("accountant", self.accountant in ACCOUNTANTS, f"one of {ACCOUNTANTS}"),
            ("reason", (self.reason == "") == (self.kind == "spend"),
             "'' for a spend and non-empty for a refusal"),
            ("time", _is_utc_iso(self.time), "a UTC ISO-8601 time such as '2025-01-01T12:00:00+00:00'"),
        ]
        check_fields(self, checks)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LedgerEntry:
        """Inverse of :meth:`to_dict`; every key is required and unknown keys are an error."""
        if not isinstance(data, Mapping):
            raise ValueError(f"a ledger entry must be a JSON object, got {data!r}")
        names = [f.name for f in fields(cls)]
        unknown = sorted(set(data) - set(names))
        missing = [name for name in names if name not in data]
        if unknown:
            raise ValueError(f"unknown key(s) {unknown}; a ledger entry has {names}")
        if missing:
            raise ValueError(f"missing key(s) {missing}")
        return cls(**data)


def _is_utc_iso(text: str) -> bool:
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        return False
    return moment.utcoffset() == timedelta(0)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class PrivacyLedger:
    """The ledger file at ``path`` (created, with its folder, by the first :meth:`append`)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def append(self, entry: LedgerEntry) -> None:
        """Write ``entry`` as one line and make it durable (``fsync``) before returning.

        A torn last line left by a crash is truncated away first (with a warning).
        """
        if not isinstance(entry, LedgerEntry):
            raise TypeError(f"entry must be a LedgerEntry, got {type(entry).__name__}")
        line = (json.dumps(entry.to_dict()) + "\n").encode("utf-8")
        new_dirs = [p for p in [self.path.parent, *self.path.parent.parents] if not p.exists()]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        created = True
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            created = False
            fd = os.open(self.path, os.O_RDWR | os.O_APPEND)
        try:
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":
                keep = os.pread(fd, size, 0).rfind(b"\n") + 1
                logger.warning("%s: truncating a torn last line (%d bytes without a newline, left by a "
                               "crash mid-write) before appending", self.path, size - keep)
                os.ftruncate(fd, keep)
            view = memoryview(line)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        if created:  # make the new name (and any new folders) durable too
            for folder in {self.path.parent, *(d.parent for d in new_dirs)}:
                _fsync_dir(folder)

    def entries(self) -> list[LedgerEntry]:
        """Every complete entry, oldest first; ``[]`` when the file does not exist yet.

        A torn last line (no trailing newline) is skipped with a warning: the write was cut by a
        crash, so the update it describes was never sent. Any other bad line raises
        :class:`LedgerError`.
        """
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return []
        lines = data.split(b"\n")
        if lines[-1]:
            logger.warning("%s:%d: skipping a torn last line without a newline (%d bytes; a crash "
                           "mid-write, its update was never sent)", self.path, len(lines), len(lines[-1]))
        result = []
        for lineno, raw in enumerate(lines[:-1], start=1):
            try:
                result.append(LedgerEntry.from_dict(json.loads(raw.decode("utf-8"))))
            except (UnicodeDecodeError, json.JSONDecodeError) as err:
                raise LedgerError(self.path, lineno, f"not a JSON line: {err}") from None
            except (ValueError, TypeError) as err:
                raise LedgerError(self.path, lineno, f"not a ledger entry: {err}") from None
        return result

    def accountant(self) -> PrivacyAccountant:
        """The client's accountant, rebuilt by replaying the spends in order."""
        accountant = PrivacyAccountant()
        for entry in self.entries():
            if entry.kind == "spend":
                accountant.add(noise_multiplier=entry.noise_multiplier, sample_rate=entry.sample_rate,
                               steps=entry.steps)
        return accountant

    def rounds_spent(self) -> int:
        """How many rounds released an update (spend entries)."""
        return sum(entry.kind == "spend" for entry in self.entries())
