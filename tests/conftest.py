"""Shared pytest fixtures.

The parity vectors made by the official implementation live in ``../shared/golden`` next to the checkout
(override with the ``VIAR_GOLDEN`` environment variable).  Tests that need them skip with a clear reason where
that folder is absent; everything else runs offline on data the tests make themselves.
"""
import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

GOLDEN = Path(os.environ.get('VIAR_GOLDEN', REPO.parent / 'shared' / 'golden'))


@pytest.fixture(scope='session')
def golden_dir() -> Path:
    if not GOLDEN.is_dir():
        pytest.skip(f'parity vectors not found at {GOLDEN} (set VIAR_GOLDEN to the shared/golden folder)')
    return GOLDEN


@pytest.fixture(scope='session')
def repo_dir() -> Path:
    return REPO
