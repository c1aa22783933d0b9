"""Shared test fixtures: where the real data sets live.

The real data (MovieLens, Twitch) are read from ``../shared/data`` next to the repository
(override with the environment variable ``FEDREC_SHARED_DATA``); they are never copied into the
repository. Tests that need them skip with a clear reason when a file is absent.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

SHARED_DATA = Path(os.environ.get("FEDREC_SHARED_DATA")
                   or Path(__file__).resolve().parents[2] / "shared" / "data")
"""Folder with the real data sets (``FEDREC_SHARED_DATA`` or ``<repo>/../shared/data``)."""


def require_shared(relative: str = "") -> Path:
    """``SHARED_DATA / relative``; skips the calling test when it does not exist."""
    path = SHARED_DATA / relative
    if not path.exists():
        pytest.skip(f"real data {path} is absent (set FEDREC_SHARED_DATA to the folder with "
                    "the shared data sets to run this test)")
    return path


@pytest.fixture
def shared_data() -> Path:
    """The shared data folder; skips the test when it is absent."""
    return require_shared()


@pytest.fixture
def shared_file() -> Callable[[str], Path]:
    """``shared_file("ml-1m/raw/users.dat")``: that path, or skip the test when it is absent."""
    return require_shared
