"""Farm fixtures: one loopback tracker for the folder, servers per test; every process group
started here is stopped and checked gone."""

from __future__ import annotations

import pytest
from farm_procs import Started, farm_descendants

from hwcompress import farm


@pytest.fixture(scope="session")
def tracker():
    """A loopback tracker on a free port (address ``HOST:PORT``)."""
    started = Started()
    started.add(farm.start_tracker(port=0, timeout=90))
    yield started.procs[0].address
    started.stop_all()
    assert not farm_descendants(), "a tracker or server process outlived the tests"


@pytest.fixture
def started():
    s = Started()
    yield s
    s.stop_all()
