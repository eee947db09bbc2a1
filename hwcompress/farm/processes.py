"""Tracker and device-server processes, each in its own process group.

A TVM server forks a listener and one child per session, which outlive a plain kill of the
parent: processes are started in their own session (process group) and stopped by group.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ..errors import DataError
from .base import DEFAULT_TRACKER_PORT, LOOPBACK, FarmError, free_port, parse_tracker
from .status import status, tracker_summary


class FarmProcess:
    """A tracker or device server running in its own process group.

    ``stop()`` (also on leaving a ``with`` block) kills the whole group, so the forked
    workers go with it. ``log_path`` holds the process's output.
    """

    def __init__(self, popen: subprocess.Popen, name: str, address: str, log_path: Path, own_log: bool):
        self.popen = popen
        self.name = name
        self.address = address
        self.log_path = log_path
        self._own_log = own_log

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def wait(self) -> int:
        """Block until the process exits (foreground ``hwc farm ...``); its exit code."""
        return self.popen.wait()

    def last_log_line(self) -> str:
        try:
            lines = [ln for ln in self.log_path.read_text(errors="replace").splitlines() if ln.strip()]
        except OSError:
            return ""
        return lines[-1].strip() if lines else ""

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM the process group, SIGKILL what is left after ``timeout`` seconds."""
        for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, timeout)):
            try:
                os.killpg(self.popen.pid, sig)
            except ProcessLookupError:
                break
            if _group_gone(self.popen, wait):
                break
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
        if self._own_log:
            self.log_path.unlink(missing_ok=True)

    def __enter__(self) -> FarmProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"FarmProcess({self.name}, {self.address}, pid={self.pid}, alive={self.alive()})"


def _group_gone(popen: subprocess.Popen, timeout: float) -> bool:
    """Wait until no process of ``popen``'s group exists (the leader reaped)."""
    deadline = time.monotonic() + timeout
    while True:
        popen.poll()
        try:
            os.killpg(popen.pid, 0)
        except ProcessLookupError:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)


def _spawn(name: str, args: list[str], address: str, log_path) -> FarmProcess:
    own_log = log_path is None
    if own_log:
        fd, log_path = tempfile.mkstemp(prefix=f"hwc-{name}-", suffix=".log")
        os.close(fd)
    log_path = Path(log_path)
    with open(log_path, "ab") as log:
        popen = subprocess.Popen(
            [sys.executable, *args], stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    return FarmProcess(popen, name, address, log_path, own_log)


def _wait_ready(proc: FarmProcess, ready, timeout: float, what: str) -> FarmProcess:
    deadline = time.monotonic() + timeout
    while True:
        if not proc.alive():
            line = proc.last_log_line()
            proc.stop()
            raise FarmError(f"{what} exited with code {proc.popen.returncode}: {line or 'no output'}")
        if ready():
            return proc
        if time.monotonic() > deadline:
            line = proc.last_log_line()
            proc.stop()
            raise FarmError(f"{what} not ready after {timeout:g} s (last output: {line or 'none'})")
        time.sleep(0.2)


def start_tracker(
    host: str = LOOPBACK, port: int = DEFAULT_TRACKER_PORT, port_end: int | None = None, timeout: float = 30.0, log_path=None
) -> FarmProcess:
    """Start ``tvm.exec.rpc_tracker`` and wait until it answers.

    ``port=0`` picks a free port; ``port_end`` (exclusive) lets TVM search ``[port, port_end)``,
    and ``.address`` then names the port it took.
    """
    port = port or free_port(host)
    port_end = port_end or port + 1
    args = ["-m", "tvm.exec.rpc_tracker", "--host", host, "--port", str(port), "--port-end", str(port_end)]
    proc = _spawn("tracker", args, f"{host}:{port}", log_path)

    def ready() -> bool:
        for p in range(port, port_end):
            try:
                tracker_summary((host, p), 2.0)
            except FarmError:
                continue
            proc.address = f"{host}:{p}"
            return True
        return False

    return _wait_ready(proc, ready, timeout, f"RPC tracker on {host}:{port}")


def start_server(
    tracker: str,
    key: str,
    host: str = LOOPBACK,
    port: int = 0,
    custom_addr: str | None = None,
    timeout: float = 30.0,
    log_path=None,
) -> FarmProcess:
    """Start ``tvm.exec.rpc_server`` for ``key`` and wait until the tracker lists it.

    ``host`` is the address the server binds (loopback by default); ``custom_addr`` is the
    address it reports to the tracker when clients must reach it under another name.
    """
    if not key or any(c in key for c in ": \t"):
        raise DataError(f"device key must be a non-empty word without ':' or spaces, got {key!r}")
    thost, tport = parse_tracker(tracker)
    port = port or free_port(host)
    args = ["-m", "tvm.exec.rpc_server", "--tracker", f"{thost}:{tport}", "--key", key]
    args += ["--host", host, "--port", str(port), "--port-end", str(port + 1)]
    if custom_addr:
        args += ["--custom-addr", custom_addr]
    proc = _spawn(f"server-{key}", args, f"{custom_addr or host}:{port}", log_path)

    def ready() -> bool:
        try:
            servers = status(tracker, timeout=2.0)["servers"]
        except FarmError:
            return False
        return any(s["key"] == key and s["port"] == port for s in servers)

    return _wait_ready(proc, ready, timeout, f"RPC server '{key}' on {host}:{port} (tracker {thost}:{tport})")
