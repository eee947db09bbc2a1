"""Starting farm processes in tests and checking that none outlives its test (not a conftest:
test files import it, and ``conftest`` names collide across test folders)."""

from __future__ import annotations

import os
import threading

import psutil

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
