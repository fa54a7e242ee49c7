"""Shared pytest fixtures.

The parity vectors made from the official code live in ``tests/golden/data`` (``python -m tests.golden.make``,
docs/parity.md).  Every parity test runs on them (``golden_src`` = ``golden-repo``) and, where the team's larger set
exists (``../shared/golden`` next to the checkout, or ``VIAR_GOLDEN``), on that one too (``golden-shared``); on a
clone without it those cases are simply not collected.  Everything else runs offline on data the tests make.
"""
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tests.golden import vectors  # noqa: E402  (after the path insertion)

GOLDEN_SOURCES = vectors.sources()


@pytest.fixture(scope='module', params=sorted(GOLDEN_SOURCES), ids=lambda name: f'golden-{name}')
def golden_src(request) -> Path:
    """The folder of one set of parity vectors (tests/golden/data; ../shared/golden where it exists)."""
    return GOLDEN_SOURCES[request.param]


@pytest.fixture(scope='session')
def repo_dir() -> Path:
    return REPO
