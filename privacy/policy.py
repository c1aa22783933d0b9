"""The operator's local privacy policy: limits a client enforces on itself, whatever the server asks.

The policy file is TOML, kept by the client's operator next to the client's data (never sent by
the server)::

    [policy]
    max_epsilon = 8.0           # required: the client's total budget at `delta`
    delta = 1e-5                # optional; default: default_delta(num_users) (see delta_for)
    min_noise_multiplier = 0.5  # optional, default 0.0: refuse rounds with less noise
    max_rounds = 100            # optional, default: no limit beyond the epsilon budget
    accountant = "prv"          # optional, "prv" (default) or "rdp"

Before each round the client computes the epsilon it *would* have after the round and asks
:meth:`PrivacyPolicy.check`; a declined round is recorded in the ledger as a refusal and no
update is released.
"""

from __future__ import annotations

import math
import numbers
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from core_model.validation import check_fields
from privacy.accounting import ACCOUNTANTS, default_delta


@dataclass(frozen=True)
class Decision:
    """Whether a round may go ahead; ``reason`` says why not (``""`` when allowed)."""

    allowed: bool
    reason: str


@dataclass(frozen=True)
class PrivacyPolicy:
    """Limits on one client's privacy spend (see the module docstring for the file format)."""

    max_epsilon: float
    delta: float | None = None
    min_noise_multiplier: float = 0.0
    max_rounds: int | None = None
    accountant: str = "prv"

    def __post_init__(self) -> None:
        checks = [
            ("max_epsilon", 0 < self.max_epsilon < math.inf, "finite and > 0"),
            ("delta", self.delta is None or 0 < self.delta < 1, "in (0, 1) or absent"),
            ("min_noise_multiplier", 0 <= self.min_noise_multiplier < math.inf, "finite and >= 0"),
            ("max_rounds", self.max_rounds is None or self.max_rounds >= 1, ">= 1 or absent"),
            ("accountant", self.accountant in ACCOUNTANTS, f"one of {ACCOUNTANTS}"),
        ]
        check_fields(self, checks, prefix="policy.")

    def delta_for(self, num_users: int) -> float:
        """The policy's ``delta``, or ``default_delta(num_users)`` when the file sets none."""
        return self.delta if self.delta is not None else default_delta(num_users)

    def check(self, *, noise_multiplier: float, epsilon_after: float, rounds_done: int) -> Decision:
        """May the client release one more round?

        Parameters
        ----------
        noise_multiplier
            The noise multiplier the round would use.
        epsilon_after
            The client's cumulative epsilon (at this policy's delta and accountant) if the round
            is spent (``inf`` for a noiseless round).
        rounds_done
            Rounds this client has already spent (``PrivacyLedger.rounds_spent()``).

        Returns
        -------
        Decision
            Declined with every violated limit in ``reason`` (joined by ``"; "``), else allowed.
        """
        if isinstance(noise_multiplier, bool) or not isinstance(noise_multiplier, numbers.Real) \
                or not noise_multiplier >= 0:
            raise ValueError(f"noise_multiplier must be a number >= 0, got {noise_multiplier!r}")
        if isinstance(epsilon_after, bool) or not isinstance(epsilon_after, numbers.Real) \
                or not epsilon_after >= 0:
            raise ValueError(f"epsilon_after must be a number >= 0 (inf allowed), got {epsilon_after!r}")
        if isinstance(rounds_done, bool) or not isinstance(rounds_done, numbers.Integral) or rounds_done < 0:
            raise ValueError(f"rounds_done must be an int >= 0, got {rounds_done!r}")
        reasons = []
        if noise_multiplier < self.min_noise_multiplier:
            reasons.append(f"noise_multiplier {noise_multiplier:g} is below the policy's "
                           f"min_noise_multiplier {self.min_noise_multiplier:g}")
        if self.max_rounds is not None and rounds_done + 1 > self.max_rounds:
            reasons.append(f"round {rounds_done + 1} would exceed the policy's max_rounds "
                           f"{self.max_rounds} ({rounds_done} rounds already spent)")
        if epsilon_after > self.max_epsilon:
            reasons.append(f"epsilon after this round would be {epsilon_after:.4g} (accountant "
                           f"{self.accountant!r}), over the policy's max_epsilon {self.max_epsilon:g}: "
                           "the privacy budget would be exceeded")
        return Decision(allowed=not reasons, reason="; ".join(reasons))


def _type_error(value: Any, want: str) -> bool:
    """True when ``value`` (as read from TOML) is not of the field type ``want``."""
    is_int = isinstance(value, int) and not isinstance(value, bool)
    return not {"float": is_int or isinstance(value, float), "int": is_int,
                "str": isinstance(value, str)}[want]


def load_policy(path: str | Path) -> PrivacyPolicy:
    """Read and validate the policy file; every error names the file (and the key)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"privacy policy file {path} does not exist") from None
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ValueError(f"{path}: not valid TOML: {err}") from None
    extra = sorted(set(document) - {"policy"})
    if extra:
        raise ValueError(f"{path}: unknown table(s) or key(s) {extra}; the file has one [policy] table")
    values = document.get("policy")
    if not isinstance(values, dict):
        raise ValueError(f"{path}: missing [policy] table" if values is None
                         else f"{path}: policy must be a table, got {values!r}")
    allowed = {f.name: f.type.replace(" | None", "") for f in fields(PrivacyPolicy)}
    unknown = sorted(set(values) - set(allowed))
    if unknown:
        raise ValueError(f"{path}: unknown key(s) {', '.join('policy.' + k for k in unknown)}; "
                         f"[policy] accepts {sorted(allowed)}")
    if "max_epsilon" not in values:
        raise ValueError(f"{path}: missing key policy.max_epsilon (the client's total epsilon budget)")
    checked = {}
    for name, value in values.items():
        if _type_error(value, allowed[name]):
            raise ValueError(f"{path}: policy.{name} must be {allowed[name]}, got {value!r}")
        checked[name] = float(value) if allowed[name] == "float" else value
    try:
        return PrivacyPolicy(**checked)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None
