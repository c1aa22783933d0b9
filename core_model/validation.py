"""Validation of config dataclasses: one error message format for every setting."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


def check_fields(obj: Any, checks: Iterable[tuple[str, bool, str]], *, prefix: str = "") -> None:
    """Raise ``ValueError("<prefix><name> must be <expected>, got <value>")`` for the first failed check."""
    for name, ok, expected in checks:
        if not ok:
            raise ValueError(f"{prefix}{name} must be {expected}, got {getattr(obj, name)!r}")
