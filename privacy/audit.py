"""Privacy budget audit of a run: are the clients' ledgers intact, and do their epsilons add up?

:func:`audit_run` reads a run directory (a simulation's, or a folder of ledgers collected from a
deployment) and returns an :class:`AuditReport`; :mod:`privacy.audit_report` writes it as
``report.md``, ``report.json`` and plots (``fedrec audit RUN --out DIR``). No Flower imports.

What is checked, per client
---------------------------
1. **Signatures and chain** (:mod:`privacy.ledger`): every signed line's Ed25519 signature with the
   client's public key (``ledger.pub`` next to the ledger, else the key its receipts carry);
   ``seq`` numbers in file order; each entry's ``prev_hash`` against the hash of the entry before
   it (``GENESIS_HASH`` for the first). A line whose content no longer matches its signature is
   *edited* (or, when the next entry still commits to its content, carries a *bad signature*: it
   was re-signed with another key); a line that duplicates a validly signed position is
   *inserted*; a missing position is *deleted*; entries out of ``seq`` order are *reordered*.
2. **Receipts** (``receipts.jsonl``, written by the server as the replies arrived): every receipt
   must verify on its own (hash, signature) and name a ledger line with exactly its canonical
   bytes and signature; a receipt without its line means the entry was *edited* (a line at that
   position differs: the changed fields are named) or *deleted*. The public key in ``ledger.pub``
   must be the one the server received. A line of a receipted run without a receipt is only noted:
   under the write-ahead contract the entry is written before the reply, so a crash or dropout in
   between leaves a ledger that over-reports, which is safe.
3. **Independent recomputation**: the cumulative epsilon after every entry (in chain order),
   recomputed from the recorded events (``steps`` steps of the Poisson-subsampled Gaussian mechanism with
   ``noise_multiplier`` and ``sample_rate``; add/remove-one-user neighbours) with Google's
   ``dp_accounting`` PLD accountant (Meiser & Mohammadi, CCS 2018; Doroshenko et al., PETS 2022),
   not with ``privacy.accounting`` or Opacus, at the entry's ``delta``. See :func:`epsilon_agrees`
   for the 1 % rule.
4. **Policy** (when a policy file is recorded in the run's ``config.json`` or given): the
   recomputed epsilon at the policy's delta against ``max_epsilon``, noise against
   ``min_noise_multiplier``, spends against ``max_rounds``.
5. **Empirical leakage** (``empirical=True``, a run trained with canaries): a membership test on
   the canary users gives a lower bound on epsilon from the final model alone
   (:mod:`privacy.canaries`); a lower bound above the claimed epsilon is a problem.

What it cannot check: a client that lies consistently (records in ledger and receipts what it did
not run, e.g. less noise than it recorded); entries a key holder wrote after the last receipt; how
much the model leaks beyond the lower bound that the canaries give.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from privacy.ledger import (GENESIS_HASH, LedgerError, LedgerRecord, Receipt, load_public_key, parse_line,
                            utc_now)
from privacy.policy import PrivacyPolicy, load_policy

logger = logging.getLogger(__name__)

TOLERANCE = 0.01
"""Largest relative difference allowed between a ledger's epsilon and the recomputed one (1 %)."""
PRV_EPS_ERROR = 0.01
"""Opacus' PRV accountant reports an upper bound, its estimate plus ``eps_error`` (0.01 by default,
``PRVAccountant.get_epsilon``): a PRV ledger may lie up to this much *above* the recomputation."""
RDP_ORDERS = tuple([1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)))
"""The RDP orders Opacus' RDP accountant uses (for the upper end of the check of RDP ledgers)."""
UNIT_OF_PRIVACY = ("one user's whole history at this client (neighbouring data sets add or remove one "
                   "user)")
ERROR, WARNING, INFO = "error", "warning", "info"
TAMPERING = ("corrupt", "edited", "deleted", "inserted", "reordered", "bad-signature", "chain-broken",
             "unsigned-after-signed", "key-mismatch", "ledger-missing", "receipt-invalid")
"""Finding kinds that mean the ledger or the receipts were changed after they were written."""
CANNOT_CHECK = (
    "A client that lies consistently, recording in its ledger and its receipts a mechanism it did not "
    "run (e.g. less noise than recorded), passes: the audit checks what was recorded and whether the "
    "numbers follow from it, not what was run. The empirical audit (`--empirical`, a run trained with "
    "canary users) tests what the trained model leaks, but only as a lower bound.",
    "Entries that the key holder (the client) appended after its last receipt, or a ledger it rewrote "
    "before sending any receipt, cannot be told from genuine ones.",
)


@dataclass
class Finding:
    """One thing the audit found. ``severity``: ``error`` (tampering, an epsilon that does not add
    up, a policy limit crossed: the audit fails), ``warning`` (something could not be verified) or
    ``info``."""

    severity: str
    kind: str
    client: str
    round: int | None
    message: str
    line: int | None = None
    seq: int | None = None

    def where(self) -> str:
        parts = [f"client {self.client}"]
        if self.round is not None:
            parts.append(f"round {self.round}")
        if self.line is not None:
            parts.append(f"line {self.line}")
        return ", ".join(parts)


@dataclass
class EntryAudit:
    """One ledger line as audited (``epsilon``: the ledger's; ``epsilon_recomputed``: dp_accounting PLD)."""

    line: int
    seq: int | None
    run: str
    round: int
    kind: str
    noise_multiplier: float
    sample_rate: float
    steps: int
    max_grad_norm: float
    delta: float
    accountant: str
    epsilon: float
    epsilon_recomputed: float | None = None
    epsilon_rdp_bound: float | None = None
    relative_difference: float | None = None
    epsilon_ok: bool | None = None
    epsilon_at_policy_delta: float | None = None
    signature: str = "unchecked"  # valid / invalid / unsigned / unchecked (no public key)
    receipt: str = "n/a"  # matched / none / n/a (no receipts) / other run
    status: str = "ok"  # ok, or the kind of the finding about this line
    reason: str = ""
    event: str = ""


@dataclass
class ClientAudit:
    client: str
    ledger: str
    public_key: str | None = None
    public_key_source: str | None = None
    receipts: int = 0
    entries: list[EntryAudit] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    verified: bool = False


@dataclass
class AuditReport:
    run_dir: str
    layout: str
    created: str
    clients: list[ClientAudit]
    findings: list[Finding]
    federation: dict[str, Any]
    server_view: list[dict[str, Any]]
    policy: dict[str, Any] | None
    checked: list[str]
    not_checked: list[str]
    accountant: str
    empirical: dict[str, Any] | None = None

    @property
    def problems(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == ERROR]

    @property
    def ok(self) -> bool:
        """No tampering, no epsilon mismatch, no policy limit crossed."""
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "problems": len(self.problems), **asdict(self)}


# ---------------------------------------------------------------------------------------- recomputation


def spend_event(noise_multiplier: float, sample_rate: float, steps: int) -> Any:
    """The ``dp_accounting`` event of one spend: ``steps`` Poisson-subsampled Gaussian steps."""
    import dp_accounting

    return dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(sample_rate, dp_accounting.GaussianDpEvent(noise_multiplier)), steps)


class Recomputation:
    """Cumulative epsilon over a ledger's spends, fed one entry at a time.

    The PLD is dp_accounting's: for each spend the same calls its ``PLDAccountant`` makes for
    ``SelfComposedDpEvent(PoissonSampledDpEvent(q, GaussianDpEvent(sigma)), steps)``
    (``from_gaussian_mechanism(sigma, sampling_prob=q).self_compose(steps)``, add/remove-one
    neighbours, discretization 1e-4), composed onto the running PLD; a test checks that the result
    equals ``PLDAccountant``'s. Building a subsampled Gaussian PLD takes 0.2-0.7 s and every round of
    a client usually has the same parameters, so each distinct ``(sigma, q, steps)`` is built once
    per ``cache`` (pass one dict to share it between clients). With ``rdp``, dp_accounting's RDP
    accountant at Opacus' orders runs alongside (the upper end of the check of RDP ledgers).
    """

    VALUE_DISCRETIZATION_INTERVAL = 1e-4  # PLDAccountant's default

    def __init__(self, *, rdp: bool = False, cache: dict[tuple[float, float, int], Any] | None = None) -> None:
        import dp_accounting
        from dp_accounting import rdp as rdp_lib
        from dp_accounting.pld import privacy_loss_distribution

        self._relation = dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE
        self._plds = privacy_loss_distribution
        self._pld = privacy_loss_distribution.identity(value_discretization_interval=self.VALUE_DISCRETIZATION_INTERVAL)
        self._rdp = rdp_lib.RdpAccountant(list(RDP_ORDERS), self._relation) if rdp else None
        self._cache = {} if cache is None else cache
        self.spent = False
        self.noiseless = False

    def _event_pld(self, noise_multiplier: float, sample_rate: float, steps: int) -> Any:
        key = (noise_multiplier, sample_rate, steps)
        if key not in self._cache:
            self._cache[key] = self._plds.from_gaussian_mechanism(
                standard_deviation=noise_multiplier, value_discretization_interval=self.VALUE_DISCRETIZATION_INTERVAL,
                sampling_prob=sample_rate, neighboring_relation=self._relation).self_compose(steps)
        return self._cache[key]

    def add(self, noise_multiplier: float, sample_rate: float, steps: int) -> Any:
        """Compose one spend; returns its dp_accounting event (nothing is composed for ``steps == 0``)."""
        event = spend_event(noise_multiplier, sample_rate, steps)
        if steps > 0:
            if noise_multiplier == 0:
                self.noiseless = True  # no privacy at all, as PLDAccountant's non-DP event
            else:
                self._pld = self._pld.compose(self._event_pld(noise_multiplier, sample_rate, steps))
            if self._rdp is not None:
                self._rdp.compose(event)
            self.spent = True
        return event

    def epsilon(self, delta: float) -> float:
        if not self.spent:
            return 0.0
        return math.inf if self.noiseless else float(self._pld.get_epsilon_for_delta(delta))

    def rdp_epsilon(self, delta: float) -> float | None:
        if self._rdp is None:
            return None
        return float(self._rdp.get_epsilon(delta)) if self.spent else 0.0


def recompute_epsilons(events: Iterable[tuple[float, float, int]], delta: float) -> list[float]:
    """Cumulative epsilon at ``delta`` after each ``(noise_multiplier, sample_rate, steps)``, by PLD."""
    rec = Recomputation()
    out = []
    for sigma, q, steps in events:
        rec.add(sigma, q, steps)
        out.append(rec.epsilon(delta))
    return out


def epsilon_agrees(ledger: float, recomputed: float, *, accountant: str,
                   rdp_bound: float | None = None) -> tuple[bool, float | None]:
    """Whether a ledger's epsilon agrees with the PLD recomputation; ``(ok, relative difference)``.

    * ``prv`` ledgers: ``-1 % <= (ledger - pld) / pld`` and ``ledger - pld <= 1 % * pld + 0.01``
      (:data:`PRV_EPS_ERROR`: Opacus' PRV accountant returns its estimate plus ``eps_error`` = 0.01;
      without that allowance every epsilon below 1 would be flagged). Under-reporting gets no
      allowance beyond the 1 %.
    * ``rdp`` ledgers: RDP is a looser bound than PLD by design (sigma 1, q 0.1, 1000 steps:
      21.2 vs 19.0), so the ledger must lie between ``pld * 0.99`` and ``rdp_bound * 1.01``
      (dp_accounting's RDP at Opacus' orders).
    * No spend yet: the ledger must say 0. A noiseless spend: both infinite.
    """
    if math.isinf(ledger) or math.isinf(recomputed):
        return math.isinf(ledger) and math.isinf(recomputed), None
    if recomputed == 0.0:
        return ledger == 0.0, None
    rel = (ledger - recomputed) / recomputed
    if ledger < recomputed * (1 - TOLERANCE):
        return False, rel
    if accountant == "rdp" and rdp_bound is not None:
        return ledger <= rdp_bound * (1 + TOLERANCE), rel
    return ledger - recomputed <= TOLERANCE * recomputed + PRV_EPS_ERROR, rel


# ---------------------------------------------------------------------------------------- reading a run


@dataclass
class ReceiptLine:
    """One line of ``receipts.jsonl``."""

    line: int
    round: int | None
    outcome: str
    secure: bool | None
    received: str
    receipt: Receipt


def read_receipts(path: Path) -> tuple[list[ReceiptLine], list[Finding]]:
    """The receipts in ``path`` and findings about lines that could not be used."""
    receipts: list[ReceiptLine] = []
    findings: list[Finding] = []
    data = path.read_bytes()
    lines = data.split(b"\n")
    for n, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw.decode("utf-8"))
            receipt = Receipt.from_dict(obj["receipt"])
        except (UnicodeDecodeError, ValueError, KeyError, TypeError) as err:
            torn = n == len(lines) and not data.endswith(b"\n")
            if torn:
                findings.append(Finding(INFO, "torn-line", "(server)", None,
                                        f"{path}:{n}: a torn last line (the server stopped mid-write); skipped"))
            else:
                findings.append(Finding(ERROR, "receipt-invalid", "(server)", None,
                                        f"{path}:{n}: not a receipt line ({err}): the receipts file was damaged "
                                        "or edited", line=n))
            continue
        problems = receipt.problems()
        if problems:
            findings.append(Finding(ERROR, "receipt-invalid", receipt.client, receipt.round,
                                    f"{path.name}:{n}: the receipt does not hold up on its own: "
                                    f"{'; '.join(problems)} (the server's receipts were edited, or the client "
                                    "sent a bad receipt)", seq=receipt.seq))
            continue
        receipts.append(ReceiptLine(line=n, round=obj.get("round"), outcome=str(obj.get("outcome", "")),
                                    secure=obj.get("secure_aggregation"), received=str(obj.get("received", "")),
                                    receipt=receipt))
    return receipts, findings


def find_ledgers(run_dir: Path, config: Mapping[str, Any] | None) -> dict[str, Path]:
    """``{client: ledger path}``: ``RUN/clients/<client>/ledger.jsonl`` (a simulation), the run's
    ``privacy.state_dir``, ``RUN/<client>/ledger.jsonl`` (collected ledgers), or ``RUN/ledger.jsonl``."""
    folders = [run_dir / "clients"]
    state_dir = ((config or {}).get("privacy") or {}).get("state_dir")
    if state_dir:
        folders.append(Path(state_dir))
    folders.append(run_dir)
    for folder in folders:
        found = {p.parent.name: p for p in sorted(folder.glob("*/ledger.jsonl")) if p.is_file()}
        if found:
            return found
    if (run_dir / "ledger.jsonl").is_file():
        return {run_dir.resolve().name: run_dir / "ledger.jsonl"}
    return {}


# ---------------------------------------------------------------------------------------- one client


@dataclass
class _Slot:
    """A complete line of a ledger: its record, or why it could not be read."""

    line: int
    record: LedgerRecord | None
    error: str = ""
    signature: str = "unchecked"
    status: str = "ok"
    receipted: bool = False

    @property
    def position(self) -> int:
        """The seq the line claims (its own for a signed line, its line index otherwise)."""
        return self.record.seq if self.record is not None and self.record.signed else self.line - 1


def _round_of(slot: _Slot | None) -> int | None:
    return slot.record.entry.round if slot is not None and slot.record is not None else None


def _describe(slot: _Slot) -> str:
    if slot.record is None:
        return f"line {slot.line}"
    e = slot.record.entry
    seq = f", seq {slot.record.seq}" if slot.record.signed else ""
    return f"round {e.round} ({e.kind}{seq}, line {slot.line})"


def _diff(receipt_body: str, slot: _Slot) -> str:
    """The fields in which the ledger line differs from the receipt's body: ``name receipt -> ledger``."""
    want = json.loads(receipt_body)
    have = json.loads(slot.record.body.decode("utf-8")) if slot.record is not None else {}
    changes = [f"{k} {want.get(k)!r} -> {have.get(k)!r}" for k in sorted(set(want) | set(have))
               if want.get(k) != have.get(k) or type(want.get(k)) is not type(have.get(k))]
    return ", ".join(changes) if changes else "the same fields, written differently"


class _ClientCheck:
    """Verification of one client's ledger against its key and receipts (see the module docstring)."""

    def __init__(self, client: str, path: Path, receipts: list[ReceiptLine] | None) -> None:
        self.client = client
        self.path = path
        self.receipts = receipts  # None: no receipts file at all
        self.findings: list[Finding] = []
        self.slots: list[_Slot] = []
        self.by_line: dict[int, Finding] = {}
        self.public_key: str | None = None
        self.key_source: str | None = None
        self.mechanisms: set[str] = set()
        self._deleted_spans: list[tuple[int, int, Finding]] = []

    def add(self, severity: str, kind: str, message: str, slot: _Slot | None = None, *,
            round_: int | None = None, seq: int | None = None, replace: bool = False) -> None:
        """Record a finding. Tampering findings are one per line: a later one is dropped, or with
        ``replace`` takes the earlier one's place (a receipt's precise diagnosis over the chain's)."""
        finding = Finding(severity, kind, self.client, _round_of(slot) if slot is not None else round_, message,
                          line=slot.line if slot is not None else None,
                          seq=(slot.record.seq if slot is not None and slot.record is not None else seq))
        if slot is not None and kind in TAMPERING:
            old = self.by_line.get(slot.line)
            if old is not None:
                if not replace:
                    return  # the first diagnosis stands
                self.findings.remove(old)
            self.by_line[slot.line] = finding
            slot.status = kind
        self.findings.append(finding)

    # -------------------------------------------------------------------------------- reading

    def read(self) -> None:
        data = self.path.read_bytes()
        lines = data.split(b"\n")
        if lines[-1]:
            self.findings.append(Finding(INFO, "torn-line", self.client, None,
                                         f"{self.path}:{len(lines)}: a torn last line ({len(lines[-1])} bytes, a "
                                         "crash mid-write: its update was never sent); skipped, as the client does",
                                         line=len(lines)))
        for n, raw in enumerate(lines[:-1], start=1):
            try:
                self.slots.append(_Slot(n, parse_line(raw, path=self.path, line=n)))
            except LedgerError as err:
                slot = _Slot(n, None, error=err.reason)
                self.slots.append(slot)
                self.add(ERROR, "corrupt", f"line {n} is not a ledger entry ({err.reason}): damaged or edited",
                         slot)

    def choose_key(self) -> None:
        pub = self.path.with_suffix(".pub")
        ledger_key = None
        if pub.is_file():
            try:
                ledger_key = load_public_key(pub)
            except LedgerError as err:
                self.add(ERROR, "key-mismatch", f"{pub} is not a usable public key: {err.reason}")
        receipt_keys = sorted({r.receipt.public_key for r in self.receipts or []})
        if len(receipt_keys) > 1:
            self.add(ERROR, "key-mismatch", f"the client's receipts carry {len(receipt_keys)} different public keys "
                                            f"({', '.join(k[:16] + '...' for k in receipt_keys)}): it changed keys")
        if ledger_key and receipt_keys and ledger_key not in receipt_keys:
            self.add(ERROR, "key-mismatch", f"{pub.name} holds key {ledger_key[:16]}..., but the server received "
                                            f"{receipt_keys[0][:16]}... with the receipts: the ledger was re-keyed")
        if ledger_key:
            self.public_key, self.key_source = ledger_key, pub.name
        elif receipt_keys:
            self.public_key, self.key_source = receipt_keys[0], "receipts"
            self.findings.append(Finding(WARNING, "no-public-key", self.client, None,
                                         f"no {pub.name} next to the ledger: signatures checked with the key "
                                         "the server received with the receipts"))
        elif any(s.record is not None and s.record.signed for s in self.slots):
            self.findings.append(Finding(WARNING, "no-public-key", self.client, None,
                                         f"no {pub.name} and no receipts: signatures not checked (the chain is)"))

    # -------------------------------------------------------------------------------- the ledger alone

    def check_chain(self) -> None:
        signed = [s for s in self.slots if s.record is not None and s.record.signed]
        first_signed = signed[0].line if signed else None
        legacy = []
        for s in self.slots:
            if s.record is None:
                continue
            if not s.record.signed:
                s.signature = "unsigned"
                if first_signed is None or s.line < first_signed:
                    legacy.append(s)
                else:
                    self.add(ERROR, "unsigned-after-signed", f"{_describe(s)} is unsigned although signed entries "
                                                             "come before it: its signature was removed, or it was "
                                                             "inserted", s)
            elif self.public_key is not None:
                s.signature = "valid" if s.record.verify(self.public_key) else "invalid"
        if legacy:
            self.findings.append(Finding(WARNING, "unsigned", self.client, None,
                                         f"lines {legacy[0].line}-{legacy[-1].line} are unsigned (written before "
                                         "ledgers were signed): their integrity cannot be verified"
                                         + (", except that the first signed entry commits to the last of them"
                                            if signed else "")))
        trusted = [s for s in signed if s.signature in ("valid", "unchecked")]
        # order: validly signed entries must appear in seq order
        top: _Slot | None = None
        for s in trusted:
            if top is not None and s.record.seq < top.record.seq:
                self.add(ERROR, "reordered", f"{_describe(s)} comes after {_describe(top)} in the file, but its "
                                             "seq is smaller: entries were reordered", s)
            elif top is None or s.record.seq > top.record.seq:
                top = s
        by_seq: dict[int, _Slot] = {}
        for s in trusted:
            if s.record.seq in by_seq:
                other = by_seq[s.record.seq]
                self.add(ERROR, "chain-broken", f"{_describe(s)} and {_describe(other)} are both validly signed with "
                                                f"seq {s.record.seq}: the chain was forked by the key holder", s)
            else:
                by_seq[s.record.seq] = s
        for s in legacy:
            by_seq.setdefault(s.line - 1, s)
        claims: dict[int, list[_Slot]] = {}
        for s in self.slots:
            if s.record is None or s.signature == "invalid" or s.status == "unsigned-after-signed":
                claims.setdefault(s.position, []).append(s)
        last = max([*by_seq, *claims], default=-1)
        missing: list[int] = []
        for seq in range(last + 1):
            s = by_seq.get(seq)
            if s is None:
                if seq not in claims:
                    missing.append(seq)
                for c in claims.get(seq, []):
                    self._diagnose_unverified(c, by_seq.get(seq + 1))
                continue
            if missing:
                self._deleted(missing, by_seq)
                missing = []
            if s.record.signed:
                prev = by_seq.get(seq - 1)
                expected = GENESIS_HASH if seq == 0 else (prev.record.hash if prev is not None else None)
                if expected is not None and s.record.prev_hash != expected:
                    if prev is not None and not prev.record.signed:
                        self.add(ERROR, "edited", f"unsigned {_describe(prev)} no longer has the hash that the "
                                                  f"next signed entry ({_describe(s)}) committed to: it was edited",
                                 prev)
                    else:
                        what = ("the first entry does not start from the genesis hash" if seq == 0 else
                                f"its prev_hash is not the hash of {_describe(prev)}")
                        self.add(ERROR, "chain-broken", f"{_describe(s)}: {what}: the entry before it was replaced "
                                                        "by one signed with the client's key", s)
        for seq, cs in claims.items():
            for c in cs:
                if seq in by_seq and c.record is not None and c is not by_seq[seq]:
                    self.add(ERROR, "inserted", f"line {c.line} (claims round {c.record.entry.round}, seq {seq}) is "
                                                "not signed by this client's key and is not in the chain (the "
                                                f"validly signed seq {seq} is {_describe(by_seq[seq])}): inserted", c)

    def _diagnose_unverified(self, s: _Slot, nxt: _Slot | None) -> None:
        if s.record is None:
            return  # already reported as corrupt
        if s.status == "unsigned-after-signed":
            return
        if nxt is not None and nxt.record.signed and nxt.record.prev_hash == s.record.hash:
            self.add(ERROR, "bad-signature", f"{_describe(s)}: the content is what the next entry committed to, but "
                                             "the signature does not verify with the client's key: re-signed with "
                                             "another key, or the signature was altered", s)
        else:
            tail = (", and the next entry's prev_hash no longer matches it" if nxt is not None else
                    " (the last entry: edited, or forged with another key)")
            self.add(ERROR, "edited", f"{_describe(s)} was changed after it was signed: its signature does not "
                                      f"verify{tail}", s)

    def _deleted(self, missing: list[int], by_seq: dict[int, _Slot]) -> None:
        before = by_seq.get(missing[0] - 1)
        after = by_seq.get(missing[-1] + 1)
        span = f"seq {missing[0]}" if len(missing) == 1 else f"seq {missing[0]}-{missing[-1]}"
        where = " and ".join(x for x in [f"after {_describe(before)}" if before else "",
                                         f"before {_describe(after)}" if after else ""] if x)
        finding = Finding(ERROR, "deleted", self.client, None,
                          f"{len(missing)} entr{'y' if len(missing) == 1 else 'ies'} ({span}) missing {where}: "
                          "deleted", seq=missing[0])
        self.findings.append(finding)
        self._deleted_spans.append((missing[0], missing[-1], finding))

    # -------------------------------------------------------------------------------- receipts

    def check_receipts(self) -> None:
        if self.receipts is None:
            return
        by_hash = {s.record.hash: s for s in self.slots if s.record is not None}
        for r in self.receipts:
            rc = r.receipt
            s = by_hash.get(rc.entry_hash)
            when = f"receipt received {r.received}" if r.received else "receipt"
            if s is not None:
                s.receipted = True
                if s.record.signature != rc.signature:
                    self.add(ERROR, "bad-signature", f"{_describe(s)}: the content is what the server received, but "
                                                     f"the signature differs from the one in its {when}: re-signed",
                             s, replace=s.status in ("bad-signature", "edited"))
                continue
            same = [t for t in self.slots if t.record is not None and t.record.signed and t.record.seq == rc.seq]
            if not same:
                body = json.loads(rc.body)
                same = [t for t in self.slots if t.record is not None and t.record.entry.round == rc.round
                        and t.record.entry.kind == rc.kind and t.record.entry.run == body.get("run")]
            if same:
                t = same[0]
                t.receipted = True
                self.add(ERROR, "edited", f"{_describe(t)} differs from the entry the server holds a receipt for "
                                          f"(round {rc.round}, seq {rc.seq}, {when}): {_diff(rc.body, t)} "
                                          "(receipt -> ledger)", t, replace=True)
            else:
                # the ledger-only finding about the gap is superseded by this one, which names the round
                for first, last, gap in self._deleted_spans:
                    if first <= rc.seq <= last and gap in self.findings:
                        self.findings.remove(gap)
                self.add(ERROR, "deleted", f"round {rc.round} ({rc.kind}, seq {rc.seq}): the server holds a receipt "
                                           f"for it ({when}), but it is not in the ledger: deleted",
                         round_=rc.round, seq=rc.seq)
        runs = {json.loads(r.receipt.body).get("run") for r in self.receipts}
        for s in self.slots:
            if s.record is not None and s.record.signed and not s.receipted and s.status == "edited" and self.receipts:
                # no receipt names this position: not a genuine entry that was changed, but a forged one
                self.add(ERROR, "inserted", f"{_describe(s)} does not verify with the client's key and the server "
                                            "never received a receipt for it: forged and inserted", s, replace=True)
            if s.record is None or s.receipted or s.status != "ok":
                continue
            if s.record.entry.run in runs:
                self.add(INFO, "no-receipt", f"{_describe(s)} has no receipt: the reply never reached the server "
                                             "(a crash or dropout after the write-ahead entry; the ledger then "
                                             "over-reports, which is safe)", s)
            elif runs:
                s.status = "other-run"

    # -------------------------------------------------------------------------------- epsilons

    def recompute(self, policy: PrivacyPolicy | None, cache: dict | None = None) -> list[EntryAudit]:
        # in chain order (seq; an unsigned line's position is its line): the order the client accounted in,
        # so that reordered lines are reported once, as reordered, and not again as wrong epsilons
        records = sorted((s for s in self.slots if s.record is not None and s.status != "inserted"),
                         key=lambda s: (s.position, s.line))
        self.mechanisms = {s.record.entry.mechanism for s in records}
        rdp = any(s.record.entry.accountant == "rdp" for s in records)
        rec = Recomputation(rdp=rdp, cache=cache)
        rows = []
        spends = 0
        for s in records:
            e = s.record.entry
            event = rec.add(e.noise_multiplier, e.sample_rate, e.steps) if e.kind == "spend" else None
            pld = rec.epsilon(e.delta)
            bound = rec.rdp_epsilon(e.delta) if e.accountant == "rdp" else None
            ok, rel = epsilon_agrees(e.epsilon, pld, accountant=e.accountant, rdp_bound=bound)
            receipt = ("n/a" if self.receipts is None else "matched" if s.receipted else
                       "other run" if s.status == "other-run" else "none")
            row = EntryAudit(line=s.line, seq=s.record.seq, run=e.run, round=e.round, kind=e.kind,
                             noise_multiplier=e.noise_multiplier, sample_rate=e.sample_rate, steps=e.steps,
                             max_grad_norm=e.max_grad_norm, delta=e.delta, accountant=e.accountant,
                             epsilon=e.epsilon, epsilon_recomputed=pld, epsilon_rdp_bound=bound,
                             relative_difference=rel, epsilon_ok=ok, signature=s.signature, receipt=receipt,
                             status=s.status if s.status != "other-run" else "ok", reason=e.reason,
                             event=repr(event) if event is not None else "")
            if not ok:
                rel_text = f"{rel:+.2%}" if rel is not None else "n/a"
                bound_text = f", RDP bound {bound:.4f}" if bound is not None else ""
                self.add(ERROR, "epsilon-mismatch",
                         f"{_describe(s)}: the ledger says epsilon {e.epsilon:.6g} at delta {e.delta:.3g} "
                         f"({e.accountant}); recomputed from the recorded events with dp_accounting PLD: "
                         f"{pld:.6g}{bound_text} ({rel_text}, beyond the {TOLERANCE:.0%} tolerance)", s)
                if row.status == "ok":
                    row.status = "epsilon-mismatch"
            if policy is not None:
                pdelta = policy.delta if policy.delta is not None else e.delta
                row.epsilon_at_policy_delta = rec.epsilon(pdelta)
                if e.kind == "spend":
                    spends += 1
                    self._check_policy(policy, s, row.epsilon_at_policy_delta, pdelta, spends)
            rows.append(row)
        return rows

    def _check_policy(self, policy: PrivacyPolicy, s: _Slot, eps: float, delta: float, spends: int) -> None:
        e = s.record.entry
        broken = []
        if eps > policy.max_epsilon * (1 + TOLERANCE):
            broken.append(f"epsilon {eps:.4g} at delta {delta:.3g} (recomputed, PLD) exceeds the policy's "
                          f"max_epsilon {policy.max_epsilon:g}")
        if e.noise_multiplier < policy.min_noise_multiplier:
            broken.append(f"noise_multiplier {e.noise_multiplier:g} is below the policy's min_noise_multiplier "
                          f"{policy.min_noise_multiplier:g}")
        if policy.max_rounds is not None and spends > policy.max_rounds:
            broken.append(f"spend number {spends} exceeds the policy's max_rounds {policy.max_rounds}")
        if broken:
            kind = "budget-exceeded" if "max_epsilon" in broken[0] else "policy-violated"
            self.findings.append(Finding(ERROR, kind, self.client, e.round, f"{_describe(s)}: {'; '.join(broken)}",
                                         line=s.line, seq=s.record.seq))


def _summary(rows: list[EntryAudit], mechanisms: set[str], policy: PrivacyPolicy | None) -> dict[str, Any]:
    spends = [r for r in rows if r.kind == "spend"]
    params: dict[tuple, list[int]] = {}
    for r in spends:
        params.setdefault((r.noise_multiplier, r.sample_rate, r.steps, r.max_grad_norm), []).append(r.round)
    last = rows[-1] if rows else None
    out: dict[str, Any] = {
        "unit_of_privacy": UNIT_OF_PRIVACY,
        "mechanisms": sorted(mechanisms),
        "accountants": sorted({r.accountant for r in rows}),
        "deltas": sorted({r.delta for r in rows}),
        "parameters": [{"noise_multiplier": k[0], "sample_rate": k[1], "steps_per_round": k[2],
                        "max_grad_norm": k[3], "rounds": v} for k, v in params.items()],
        "rounds_spent": [r.round for r in spends],
        "steps": sum(r.steps for r in spends),
        "refusals": [{"round": r.round, "reason": r.reason} for r in rows if r.kind == "refusal"],
        "runs": sorted({r.run for r in rows}),
        "epsilon": last.epsilon if last else 0.0,
        "epsilon_recomputed": last.epsilon_recomputed if last else 0.0,
        "delta": last.delta if last else None,
    }
    if policy is not None and last is not None:
        eps = last.epsilon_at_policy_delta or 0.0
        out["policy_epsilon"] = eps
        out["policy_budget_remaining"] = policy.max_epsilon - eps
    return out


# ---------------------------------------------------------------------------------------- the run


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _read_rounds(path: Path) -> list[dict[str, Any]] | None:
    if not path.is_file():
        return None
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return rows


def _server_view(rows: list[dict[str, Any]], receipts: list[ReceiptLine] | None, dp: bool,
                 findings: list[Finding]) -> list[dict[str, Any]]:
    """Per round of ``metrics.jsonl``: secure aggregation or not, who was in, who dropped, what the server saw."""
    out = []
    for row in rows:
        rnd = row.get("round")
        secure = bool(row.get("secure_aggregation"))
        item = {"round": rnd, "secure_aggregation": secure, "clients_sampled": row.get("clients_sampled"),
                "clients_ok": row.get("clients_ok"), "clients_failed": row.get("clients_failed"),
                "clients_declined": row.get("clients_declined", 0)}
        if secure:
            dropped = {k: v for k, v in (row.get("secagg_dropped") or {}).items() if v}
            item.update({"aborted": bool(row.get("secagg_aborted")), "in_sum": row.get("secagg_in_sum", []),
                         "dropped": dropped, "components": row.get("secagg_components")})
            if row.get("secagg_aborted"):
                saw = f"no aggregate: the round was aborted ({row.get('secagg_abort_reason', '')})"
            else:
                n = len(row.get("secagg_in_sum") or [])
                saw = f"only the sum of {n} clients' masked, quantized{', DP-noised' if dp else ''} updates"
                if (row.get("secagg_components") or 1) > 1:
                    saw += f" ({row['secagg_components']} sums, one per connected component of the survivors)"
            replied = (row.get("secagg_clients") or {}).get("advertise_keys", 0)
        else:
            saw = f"each of the {row.get('clients_ok', 0)} clients'{' DP-noised' if dp else ''} updates in the clear"
            replied = row.get("clients_ok", 0) or 0
        item["server_saw"] = saw
        if receipts is not None:
            got = sum(1 for r in receipts if r.round == rnd and r.outcome in ("trained", "declined"))
            item["receipts"] = got
            expected = (replied or 0) + (row.get("clients_declined", 0) or 0)
            if dp and got < expected:
                findings.append(Finding(WARNING, "receipts-incomplete", "(server)", rnd,
                                        f"round {rnd}: {expected} clients trained or declined, but the server holds "
                                        f"{got} receipts: {expected - got} repl{'y' if expected - got == 1 else 'ies'} "
                                        "came without one (a decline without a ledger entry, or a client that sent "
                                        "none)"))
        out.append(item)
    return out


def audit_run(run_dir: str | Path, *, policy: str | Path | None = None, empirical: bool = False,
              empirical_delta: float | None = None) -> AuditReport:
    """Audit the run directory ``run_dir`` (see the module docstring); ``policy`` overrides the
    policy file recorded in its ``config.json``. ``empirical``: also the canary membership test
    (the run must have been trained with canaries) at ``empirical_delta`` (default: the
    federation's delta; for a run without DP, the delta DP would have stated).

    Raises ``FileNotFoundError`` when ``run_dir`` does not exist and ``ValueError`` when it holds
    no ledger (unless ``empirical``: a run without DP can still be tested), each naming the path.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory {run_dir} does not exist" if not run_dir.exists() else
                                f"{run_dir} is not a directory: give a run directory or a folder of ledgers")
    config = _read_json(run_dir / "config.json") if (run_dir / "config.json").is_file() else None
    ledgers = find_ledgers(run_dir, config)
    receipts_path = run_dir / "receipts.jsonl"
    receipts, findings = (read_receipts(receipts_path) if receipts_path.is_file() else (None, []))
    receipt_clients = sorted({r.receipt.client for r in receipts or []})
    if not ledgers and not receipt_clients and not empirical:
        raise ValueError(f"no privacy ledgers under {run_dir}: expected {run_dir / 'clients'}/<client>/ledger.jsonl "
                         f"(a simulation run with privacy.mode=\"dp-sgd\") or {run_dir}/<client>/ledger.jsonl (ledgers "
                         "collected from a deployment)")
    priv = (config or {}).get("privacy") or {}
    checked = ["each ledger line's structure; Ed25519 signatures with the client's public key; seq order and "
               "the SHA-256 hash chain from the genesis hash",
               f"each entry's cumulative epsilon, recomputed from its recorded events with dp_accounting's PLD "
               f"accountant, within {TOLERANCE:.0%} (PRV ledgers: plus Opacus' eps_error {PRV_EPS_ERROR:g} above)"]
    not_checked = list(CANNOT_CHECK)
    if receipts is None:
        not_checked.append(f"No {receipts_path.name}: the ledgers could not be checked against what the server was "
                           "told. A deleted last entry, a truncated ledger or a ledger replaced wholesale (new key, "
                           "new chain) cannot be detected without receipts.")
    else:
        checked.append(f"each receipt in {receipts_path.name} (hash, signature) against the ledger line it names, "
                       "and the ledger's public key against the receipts'")
    policy_obj, policy_info = None, None
    policy_path = policy or priv.get("policy") or None
    if policy_path:
        try:
            policy_obj = load_policy(policy_path)
            policy_info = {"path": str(policy_path), **asdict(policy_obj)}
            checked.append(f"every spend against the policy {policy_path} (max_epsilon at the policy's delta, "
                           "min_noise_multiplier, max_rounds), as the file reads now")
        except (OSError, ValueError) as err:
            findings.append(Finding(WARNING, "policy-unreadable", "(run)", None,
                                    f"the policy file {policy_path} recorded for this run cannot be read ({err}): "
                                    "policy limits not checked"))
            not_checked.append(f"Policy limits: the policy file {policy_path} cannot be read.")
    else:
        not_checked.append("Policy limits: no policy file is recorded in the run's config.json (or given).")

    clients: list[ClientAudit] = []
    cache: dict = {}  # PLDs of the distinct events, shared by the clients
    for client in sorted(set(ledgers) | set(receipt_clients)):
        mine = None if receipts is None else [r for r in receipts if r.receipt.client == client]
        path = ledgers.get(client)
        if path is None:
            rounds = sorted({r.receipt.round for r in mine or []})
            findings.append(Finding(ERROR, "ledger-missing", client, rounds[0] if rounds else None,
                                    f"the server holds {len(mine or [])} receipts of client {client} (rounds "
                                    f"{rounds}), but there is no ledger for it under {run_dir}: deleted or "
                                    "not collected"))
            clients.append(ClientAudit(client=client, ledger="", receipts=len(mine or [])))
            continue
        check = _ClientCheck(client, path, mine)
        check.read()
        check.choose_key()
        check.check_chain()
        check.check_receipts()
        rows = check.recompute(policy_obj, cache)
        for s in check.slots:
            if s.record is not None and s.record.entry.client != client:
                check.findings.append(Finding(WARNING, "client-mismatch", client, s.record.entry.round,
                                              f"line {s.line} names client {s.record.entry.client!r}, but the ledger "
                                              f"is {client!r}'s", line=s.line))
        if check.public_key is None and any(s.record is not None and s.record.signed for s in check.slots):
            not_checked.append(f"Signatures of client {client}: no public key (no ledger.pub, no receipts).")
        findings.extend(check.findings)
        clients.append(ClientAudit(client=client, ledger=str(path), public_key=check.public_key,
                                   public_key_source=check.key_source, receipts=len(mine or []), entries=rows,
                                   summary=_summary(rows, check.mechanisms, policy_obj),
                                   verified=not any(f.severity == ERROR for f in check.findings)))
    rounds = _read_rounds(run_dir / "metrics.jsonl")
    dp = priv.get("mode") == "dp-sgd" if config else bool(ledgers)
    if rounds is None:
        server_view = []
        not_checked.append("What the server could see per round: no metrics.jsonl.")
    else:
        server_view = _server_view(rounds, receipts, dp, findings)
        checked.append("what the server could see in each round (secure aggregation, dropouts), from metrics.jsonl, "
                       "and that every reply that trained or declined came with a receipt")
    federation = _federation(clients, findings)
    emp = None
    if empirical:
        from privacy.canaries import empirical_audit
        emp = empirical_audit(run_dir, delta=empirical_delta if empirical_delta is not None else federation["delta"],
                              claimed_epsilon=federation["epsilon"])
        checked.append(f"what the final model leaks about {emp['canaries']} canary users (membership test, "
                       f"{emp['method']}): a lower bound on epsilon at delta {emp['delta']:.3g}, against the claim")
        if emp["consistent"] is False:
            findings.append(Finding(ERROR, "empirical-leak", "(run)", None, emp["verdict"]))
            federation["statement"] += " The empirical audit contradicts this claim (below)."
    elif (run_dir / "canaries.json").is_file():
        not_checked.append("Empirical leakage: the run has canaries; add --empirical to test them.")
    else:
        not_checked.append("Empirical leakage: the run was trained without canaries (privacy.audit_canaries).")
    return AuditReport(run_dir=str(run_dir), layout="simulation run" if config else "collected ledgers",
                       created=utc_now(), clients=clients, findings=findings,
                       federation=federation, server_view=server_view, policy=policy_info,
                       checked=checked, not_checked=not_checked, accountant=_accountant_version(), empirical=emp)


def _federation(clients: list[ClientAudit], findings: list[Finding]) -> dict[str, Any]:
    spent = [c for c in clients if c.entries]
    if not spent:
        return {"epsilon": None, "delta": None, "statement": "No client spent any privacy budget: the run "
                "claims no differential privacy." if not clients else "no client spent any privacy budget"}
    eps = max(c.summary["epsilon_recomputed"] for c in spent)
    eps_ledger = max(c.summary["epsilon"] for c in spent)
    delta = max(c.summary["delta"] for c in spent)
    worst = max(spent, key=lambda c: c.summary["epsilon_recomputed"])
    statement = (f"Each user's history is held by one client, so every user is protected by their client's "
                 f"guarantee: the federation is ({eps:.4g}, {delta:.3g})-DP at user level (the largest recomputed "
                 f"epsilon, client {worst.client}, at the largest delta; the ledgers say {eps_ledger:.4g}) against "
                 "everyone who saw what the clients released: the server, the other clients and anyone with a "
                 "model.")
    if any("distributed" in m for c in spent for m in c.summary.get("mechanisms", [])):
        statement += (" Distributed noise: the clients' updates are not private on their own; this holds for "
                      "parties that see only securely aggregated sums or models, provided the other clients added "
                      "their noise shares and the party knows none of them (see the mechanism of each client).")
    if any(f.severity == ERROR for f in findings):
        statement += " This holds only for what the ledgers record: the audit found problems (below)."
    return {"epsilon": eps, "epsilon_ledger": eps_ledger, "delta": delta, "client": worst.client,
            "statement": statement}


def _accountant_version() -> str:
    try:
        from importlib.metadata import version
        return f"dp_accounting {version('dp-accounting')} PLD accountant"
    except Exception:  # pragma: no cover - metadata missing
        return "dp_accounting PLD accountant"
