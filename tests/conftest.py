"""Fixtures shared by the test modules."""

from __future__ import annotations

from pathlib import Path

import pytest

# Real slides, masks and format fixtures live in ../shared/data beside the repository root. A fresh
# checkout does not have them, so the tests that need them skip.
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Return the shared data folder, or skip the test when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared test data not found at {SHARED_DATA}")
    return SHARED_DATA
