"""The privacy ledger of one client: an append-only, crash-safe, signed and hash-chained JSON-lines file.

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

Signatures and the hash chain
-----------------------------
Each client has its own Ed25519 key, made from 32 bytes of OS randomness (``secrets``) on the
ledger's first append and kept next to it: ``ledger.key`` (PKCS#8 PEM, mode 0600, never leaves the
client) and ``ledger.pub`` (SubjectPublicKeyInfo PEM, the key auditors verify with; the raw 32 bytes
as hex travel in every receipt). Every entry carries, besides the event's fields:

* ``seq``: its position in the ledger, 0 for the first line;
* ``prev_hash``: the SHA-256 (hex) of the previous entry's canonical bytes, or :data:`GENESIS_HASH`
  (64 zeros) for the first entry;
* ``signature``: Ed25519 over the entry's own canonical bytes (hex).

The **canonical bytes** of an entry (:func:`canonical_json`) are the JSON object of all its keys
*except* ``signature`` (so ``seq`` and ``prev_hash`` are signed), with sorted keys, no whitespace,
non-ASCII characters as themselves, encoded as UTF-8; numbers as Python's ``json`` writes them (the
shortest repr that reads back to the same float; ``Infinity`` for an infinite epsilon). The entry's
hash (:attr:`LedgerRecord.hash`) is the SHA-256 of those bytes. A line on disk is the canonical JSON
of the whole entry, signature included. Verification recomputes the canonical bytes from the line
as read, so a changed character anywhere (a number rewritten as ``1`` instead of ``1.0`` included)
breaks the signature.

Example line (one per entry; wrapped here)::

    {"accountant":"prv","client":"eu-west","delta":1e-05,"epsilon":2.71,"kind":"spend",
     "max_grad_norm":1.0,"mechanism":"DP-SGD: ...","noise_multiplier":1.1,
     "prev_hash":"9f2c...","reason":"","round":3,"run":"r1","sample_rate":0.05,"seq":2,
     "signature":"5be1...","steps":40,"time":"2025-01-01T12:00:00+00:00"}

A **receipt** (:class:`Receipt`) is what the client hands the server with each spend or refusal:
the entry's canonical bytes, hash and signature and the client's public key. The server keeps them
(``receipts.jsonl``); :mod:`privacy.audit` checks the ledger against them.

**Unsigned ledgers** written before entries were signed (no ``seq``, ``prev_hash``, ``signature``)
are still read and replayed. The next append signs and chains on as usual: its ``seq`` is its line
index and its ``prev_hash`` the hash of the last unsigned line's canonical bytes. Unsigned lines
may only come before the first signed one; the audit reports them as unsigned (not verifiable),
and an unsigned line after a signed one as tampering.

Reading does not verify: :meth:`entries` and :meth:`records` check each line's structure;
:mod:`privacy.audit` checks signatures, the chain and the receipts. One writer at a time: the
ledger is not locked against two processes appending concurrently.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import numbers
import os
import re
import secrets
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from core_model.validation import check_fields
from privacy.accounting import ACCOUNTANTS, PrivacyAccountant

logger = logging.getLogger(__name__)

KINDS = ("spend", "refusal")
MECHANISM = "DP-SGD: Poisson-sampled users, per-user clipping, Gaussian noise"
"""The mechanism this project's clients run (the usual value of :attr:`LedgerEntry.mechanism`)."""
GENESIS_HASH = "0" * 64
"""``prev_hash`` of a ledger's first entry (no previous entry): 64 hex zeros."""
CHAIN_FIELDS = ("seq", "prev_hash", "signature")
"""The keys a signed line has besides the :class:`LedgerEntry` fields."""
KEY_MODE = 0o600
"""File mode of the private key (``ledger.key``): readable and writable by its owner only."""

_HEX64 = re.compile(r"[0-9a-f]{64}")
_HEX128 = re.compile(r"[0-9a-f]{128}")


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


def canonical_json(obj: Mapping[str, Any]) -> bytes:
    """The canonical bytes of a JSON object: sorted keys, no whitespace, UTF-8 (see the module docstring)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def sha256_hex(data: bytes) -> str:
    """SHA-256 of ``data`` as 64 lowercase hex digits."""
    return hashlib.sha256(data).hexdigest()


def verify_signature(public_key: str, body: bytes, signature: str) -> bool:
    """Whether ``signature`` (hex) is the Ed25519 signature of ``body`` by ``public_key`` (raw, hex)."""
    try:
        key = Ed25519PublicKey.from_public_bytes(bytes.fromhex(public_key))
        key.verify(bytes.fromhex(signature), body)
    except (ValueError, InvalidSignature):
        return False
    return True


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


@dataclass(frozen=True)
class LedgerRecord:
    """One line of a ledger as read: the event (:class:`LedgerEntry`) and its place in the chain.

    ``line`` is the 1-based line number; ``body`` the canonical bytes (everything but the
    signature, recomputed from the line as read). ``seq``, ``prev_hash`` and ``signature`` are
    ``None`` for an unsigned line written before ledgers were signed.
    """

    entry: LedgerEntry
    line: int
    body: bytes = field(repr=False)
    seq: int | None = None
    prev_hash: str | None = None
    signature: str | None = None

    @property
    def signed(self) -> bool:
        return self.signature is not None

    @property
    def hash(self) -> str:
        """SHA-256 (hex) of :attr:`body`: what the next entry's ``prev_hash`` must be."""
        return sha256_hex(self.body)

    def verify(self, public_key: str) -> bool:
        """Whether the line is signed and its signature verifies with ``public_key`` (raw, hex)."""
        return self.signed and verify_signature(public_key, self.body, self.signature)


def parse_line(raw: bytes, *, path: str | Path, line: int) -> LedgerRecord:
    """One complete ledger line (without its newline) as a :class:`LedgerRecord`.

    Raises :class:`LedgerError` (``path:line:``) when it is not JSON, not a ledger entry, or
    carries only some of :data:`CHAIN_FIELDS` or malformed ones.
    """
    try:
        obj = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise LedgerError(path, line, f"not a JSON line: {err}") from None
    if not isinstance(obj, dict):
        raise LedgerError(path, line, f"not a ledger entry: a ledger entry must be a JSON object, got {obj!r}")
    chain = [k for k in CHAIN_FIELDS if k in obj]
    if chain and len(chain) != len(CHAIN_FIELDS):
        raise LedgerError(path, line, f"not a ledger entry: a signed entry has all of {list(CHAIN_FIELDS)}, "
                                      f"this one only {chain}")
    if chain:
        seq, prev_hash, signature = (obj[k] for k in CHAIN_FIELDS)
        checks = [("seq", isinstance(seq, int) and not isinstance(seq, bool) and seq >= 0, "an int >= 0"),
                  ("prev_hash", isinstance(prev_hash, str) and _HEX64.fullmatch(prev_hash), "64 lowercase hex digits"),
                  ("signature", isinstance(signature, str) and _HEX128.fullmatch(signature),
                   "128 lowercase hex digits")]
        for name, ok, expected in checks:
            if not ok:
                raise LedgerError(path, line, f"not a ledger entry: {name} must be {expected}, got {obj[name]!r}")
    try:
        entry = LedgerEntry.from_dict({k: v for k, v in obj.items() if k not in CHAIN_FIELDS})
    except (ValueError, TypeError) as err:
        raise LedgerError(path, line, f"not a ledger entry: {err}") from None
    body = canonical_json({k: v for k, v in obj.items() if k != "signature"})
    if not chain:
        return LedgerRecord(entry=entry, line=line, body=body)
    return LedgerRecord(entry=entry, line=line, body=body, seq=obj["seq"], prev_hash=obj["prev_hash"],
                        signature=obj["signature"])


@dataclass(frozen=True)
class Receipt:
    """What a client hands the server for one ledger entry: proof of what it recorded.

    ``body`` is the entry's canonical bytes as text, ``entry_hash`` their SHA-256, ``signature``
    the client's Ed25519 signature over them, ``public_key`` the client's raw public key (hex);
    ``client``, ``round``, ``kind`` and ``seq`` repeat the body's so that receipts can be read
    without parsing it (:meth:`problems` checks that they agree).
    """

    client: str
    round: int
    kind: str
    seq: int
    entry_hash: str
    signature: str
    public_key: str
    body: str

    @classmethod
    def of(cls, record: LedgerRecord, public_key: str) -> Receipt:
        if not record.signed:
            raise ValueError(f"line {record.line} is unsigned: only signed entries have receipts")
        return cls(client=record.entry.client, round=record.entry.round, kind=record.entry.kind, seq=record.seq,
                   entry_hash=record.hash, signature=record.signature, public_key=public_key,
                   body=record.body.decode("utf-8"))

    def to_dict(self) -> dict[str, str | int]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Receipt:
        """Inverse of :meth:`to_dict`; every key is required, with its type, and unknown keys are an error."""
        if not isinstance(data, Mapping):
            raise ValueError(f"a receipt must be a mapping, got {data!r}")
        types = {f.name: f.type for f in fields(cls)}
        unknown = sorted(set(data) - set(types))
        missing = [name for name in types if name not in data]
        if unknown or missing:
            raise ValueError(f"a receipt has the keys {list(types)}; unknown {unknown}, missing {missing}")
        for name, kind in types.items():
            value = data[name]
            ok = (isinstance(value, int) and not isinstance(value, bool)) if kind == "int" else isinstance(value, str)
            if not ok:
                raise ValueError(f"receipt {name} must be {kind}, got {value!r}")
        return cls(**{name: data[name] for name in types})

    def problems(self) -> list[str]:
        """What is wrong with the receipt on its own ([] when nothing): hash, signature, fields."""
        body = self.body.encode("utf-8")
        out = []
        if sha256_hex(body) != self.entry_hash:
            out.append("entry_hash is not the SHA-256 of the receipt's body")
        if not verify_signature(self.public_key, body, self.signature):
            out.append("the signature does not verify over the receipt's body with the receipt's public key")
        try:
            obj = json.loads(self.body)
            fields_ok = all(obj.get(k) == getattr(self, k) for k in ("client", "round", "kind", "seq"))
        except (json.JSONDecodeError, AttributeError):
            fields_ok = False
        if not fields_ok:
            out.append("client / round / kind / seq differ from the receipt's body")
        return out

    def attach_to(self, reason: str) -> str:
        """``reason`` with this receipt appended (error replies carry no records; see :func:`split_receipt`)."""
        return f"{reason}{RECEIPT_MARK}{json.dumps(self.to_dict(), separators=(',', ':'))}]"


RECEIPT_MARK = " [ledger receipt "
"""Where a receipt starts in an error reason: ``<reason> [ledger receipt {...json...}]``."""


def split_receipt(reason: str) -> tuple[str, Receipt | None]:
    """``(reason without the receipt, receipt)`` from an error reason; ``(reason, None)`` when it has none."""
    at = reason.rfind(RECEIPT_MARK)
    if at < 0 or not reason.endswith("]"):
        return reason, None
    try:
        receipt = Receipt.from_dict(json.loads(reason[at + len(RECEIPT_MARK):-1]))
    except ValueError:  # json.JSONDecodeError is a ValueError
        logger.warning("an error reason ends with a malformed ledger receipt; kept as text: %s", reason[at:])
        return reason, None
    return reason[:at], receipt


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def public_key_hex(key: Ed25519PublicKey) -> str:
    """The raw 32-byte public key as 64 hex digits (the form receipts carry)."""
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw).hex()


def load_public_key(path: str | Path) -> str:
    """Read a ``ledger.pub`` (PEM) and return the raw key as hex; :class:`LedgerError` when it is not one."""
    path = Path(path)
    try:
        key = serialization.load_pem_public_key(path.read_bytes())
    except ValueError as err:
        raise LedgerError(path, 0, f"not a PEM public key: {err}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise LedgerError(path, 0, f"not an Ed25519 public key (a {type(key).__name__})")
    return public_key_hex(key)


def _load_private_key(path: Path) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError) as err:
        raise LedgerError(path, 0, f"not an unencrypted PEM private key: {err}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise LedgerError(path, 0, f"not an Ed25519 private key (a {type(key).__name__})")
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        logger.warning("%s: the ledger's signing key has mode %o: others may read it and sign entries in "
                       "this client's name; it should be %o", path, mode, KEY_MODE)
    return key


def _write_private_key(path: Path) -> None:
    """Create the key from OS randomness, atomically and without ever replacing an existing one."""
    key = Ed25519PrivateKey.from_private_bytes(secrets.token_bytes(32))
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, KEY_MODE)
    try:
        os.write(fd, pem)
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(tmp, path)  # atomic, and fails rather than replace a key another process made first
    except FileExistsError:
        pass
    finally:
        os.unlink(tmp)
    _fsync_dir(path.parent)


def _write_public_key(path: Path, key: Ed25519PublicKey) -> None:
    pem = key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        os.write(fd, pem)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    _fsync_dir(path.parent)


class PrivacyLedger:
    """The ledger file at ``path`` (created, with its folder and key, by the first :meth:`append`).

    The signing key lives at :attr:`key_path` (``ledger.key`` for ``ledger.jsonl``), its public
    half at :attr:`public_key_path` (``ledger.pub``).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.key_path = self.path.with_suffix(".key")
        self.public_key_path = self.path.with_suffix(".pub")
        self._key: Ed25519PrivateKey | None = None

    def _signing_key(self) -> Ed25519PrivateKey:
        """The client's key: loaded, or made on first use; ``ledger.pub`` (re)written when missing or stale."""
        if self._key is None:
            if not self.key_path.exists():
                self.key_path.parent.mkdir(parents=True, exist_ok=True)
                _write_private_key(self.key_path)
                logger.info("%s: new Ed25519 ledger signing key (public key in %s)", self.key_path,
                            self.public_key_path)
            key = _load_private_key(self.key_path)
            public = public_key_hex(key.public_key())
            try:
                stale = load_public_key(self.public_key_path) != public
            except (FileNotFoundError, LedgerError):
                stale = True
            if stale:
                _write_public_key(self.public_key_path, key.public_key())
            self._key = key
        return self._key

    def public_key(self) -> str:
        """The client's raw public key as hex (making the key pair on first use)."""
        return public_key_hex(self._signing_key().public_key())

    def receipt(self, record: LedgerRecord) -> Receipt:
        """The receipt of ``record`` (an entry :meth:`append` returned) for the server."""
        return Receipt.of(record, self.public_key())

    def append(self, entry: LedgerEntry) -> LedgerRecord:
        """Sign ``entry``, chain it to the last line, write it as one line and ``fsync`` before returning.

        A torn last line left by a crash is truncated away first (with a warning); a corrupt last
        line raises :class:`LedgerError` (the chain cannot go on from it). Returns the record as
        written (``seq``, ``prev_hash``, ``signature``, hash).
        """
        if not isinstance(entry, LedgerEntry):
            raise TypeError(f"entry must be a LedgerEntry, got {type(entry).__name__}")
        new_dirs = [p for p in [self.path.parent, *self.path.parent.parents] if not p.exists()]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        key = self._signing_key()
        created = True
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            created = False
            fd = os.open(self.path, os.O_RDWR | os.O_APPEND)
        try:
            size = os.fstat(fd).st_size
            data = os.pread(fd, size, 0) if size else b""
            if data and not data.endswith(b"\n"):
                keep = data.rfind(b"\n") + 1
                logger.warning("%s: truncating a torn last line (%d bytes without a newline, left by a "
                               "crash mid-write) before appending", self.path, size - keep)
                os.ftruncate(fd, keep)
                data = data[:keep]
            lines = data.split(b"\n")[:-1]
            if lines:
                last = parse_line(lines[-1], path=self.path, line=len(lines))
                seq = last.seq + 1 if last.signed else len(lines)
                prev_hash = last.hash
            else:
                seq, prev_hash = 0, GENESIS_HASH
            body = {**entry.to_dict(), "seq": seq, "prev_hash": prev_hash}
            body_bytes = canonical_json(body)
            signature = key.sign(body_bytes).hex()
            line = canonical_json({**body, "signature": signature}) + b"\n"
            view = memoryview(line)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        if created:  # make the new name (and any new folders) durable too
            for folder in {self.path.parent, *(d.parent for d in new_dirs)}:
                _fsync_dir(folder)
        return LedgerRecord(entry=entry, line=len(lines) + 1, body=body_bytes, seq=seq, prev_hash=prev_hash,
                            signature=signature)

    def lines(self) -> list[bytes]:
        """Every complete line (without its newline), oldest first; ``[]`` when the file does not exist.

        A torn last line (no trailing newline) is skipped with a warning: the write was cut by a
        crash, so the update it describes was never sent.
        """
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return []
        lines = data.split(b"\n")
        if lines[-1]:
            logger.warning("%s:%d: skipping a torn last line without a newline (%d bytes; a crash "
                           "mid-write, its update was never sent)", self.path, len(lines), len(lines[-1]))
        return lines[:-1]

    def records(self) -> list[LedgerRecord]:
        """Every complete line as a :class:`LedgerRecord` (not verified); a bad line raises :class:`LedgerError`."""
        return [parse_line(raw, path=self.path, line=n) for n, raw in enumerate(self.lines(), start=1)]

    def entries(self) -> list[LedgerEntry]:
        """Every complete entry, oldest first; ``[]`` when the file does not exist yet.

        A torn last line is skipped with a warning (see :meth:`lines`). Any other bad line raises
        :class:`LedgerError`.
        """
        return [record.entry for record in self.records()]

    def accountant(self) -> PrivacyAccountant:
        """The client's accountant, rebuilt by replaying the spends in order."""
        accountant = PrivacyAccountant()
        for entry in self.entries():
            if entry.kind == "spend":
                accountant.add(noise_multiplier=entry.noise_multiplier, sample_rate=entry.sample_rate,
                               steps=entry.steps)
        return accountant

    def rounds_spent(self) -> int:
        """How many training rounds released an update (spend entries of rounds >= 1; round 0 is the
        transition table's release, ``privacy/transitions.py``, which is accounted but is no round)."""
        return sum(entry.kind == "spend" and entry.round >= 1 for entry in self.entries())
