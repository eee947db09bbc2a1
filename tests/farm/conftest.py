"""Farm fixtures: one loopback tracker for the folder, servers per test; every process group
started here is stopped and checked gone."""

from __future__ import annotations

import os
import threading

import psutil
import pytest

from hwcompress import farm


def group_members(pgid: int) -> list[psutil.Process]:
    members = []
    for p in psutil.process_iter(["pid"]):
        try:
            if os.getpgid(p.pid) == pgid:
                members.append(p)
        except (ProcessLookupError, psutil.Error):
            pass
    return members


def farm_descendants() -> list[psutil.Process]:
    """Children of this test process that run a TVM tracker or server."""
    found = []
    for p in psutil.Process().children(recursive=True):
        try:
            if any("tvm.exec.rpc_" in part for part in p.cmdline()):
                found.append(p)
        except psutil.Error:
            pass
    return found


class Started:
    """Farm processes a test starts; ``stop_all`` stops them and asserts their groups are gone."""

    def __init__(self) -> None:
        self.procs: list[farm.FarmProcess] = []

    def add(self, proc: farm.FarmProcess) -> farm.FarmProcess:
        self.procs.append(proc)
        return proc

    def servers(self, tracker: str, key: str, count: int) -> list[farm.FarmProcess]:
        """Start ``count`` servers of ``key`` at once (each one takes seconds to import TVM)."""
        results: list = [None] * count

        def start(i):
            try:
                results[i] = farm.start_server(tracker, key, timeout=90)
            except Exception as e:  # noqa: BLE001 - re-raised below
                results[i] = e

        threads = [threading.Thread(target=start, args=(i,)) for i in range(count)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for r in results:
            if isinstance(r, farm.FarmProcess):
                self.add(r)
        for r in results:
            if isinstance(r, BaseException):
                raise r
        return results

    def stop_all(self) -> None:
        for proc in self.procs:
            proc.stop()
        leftovers = {proc.pid: group_members(proc.pid) for proc in self.procs}
        assert not any(leftovers.values()), f"processes left in farm process groups: {leftovers}"


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
