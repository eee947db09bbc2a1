"""Device farm on TVM's own RPC tracker: start trackers and device servers, measure and run on them.

A farm is one ``tvm.exec.rpc_tracker`` and any number of ``tvm.exec.rpc_server`` processes that
register with it under a key (one key per device type, e.g. ``rasp4b``). Clients ask the tracker
for a free server of a key and talk to that server directly.

TVM's client blocks forever when it asks for a key that no server serves: the tracker simply
queues the request. Everything here that waits for a device waits a bounded time and then raises
``FarmError`` naming the key and the tracker.

Processes are started in their own session (process group) and stopped by group: a TVM server
forks a listener and one child per session, which outlive a plain kill of the parent.
"""

from __future__ import annotations

import functools
import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from .errors import DataError, HwcError

LOOPBACK = "127.0.0.1"
DEFAULT_TRACKER_PORT = 9190
_POLL_SEC = 1.0


class FarmError(HwcError):
    """The device farm cannot serve a request: tracker unreachable, no live server for a key,
    a session lost or failed on the device."""


def parse_tracker(text: str) -> tuple[str, int]:
    """``"HOST:PORT"`` -> ``(host, port)``; ``DataError`` for anything else."""
    host, sep, port = str(text).strip().rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise DataError(f"tracker address must be HOST:PORT with a port in 1-65535, got {text!r}")
    return host, int(port)


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port that nothing listens on right now (the OS's pick)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------- processes


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
                _summary((host, p), 2.0)
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


# ---------------------------------------------------------------------------- tracker queries


def _tracker_session(addr: tuple[str, int], timeout: float):
    """A ``tvm.rpc.TrackerSession`` whose socket operations time out after ``timeout`` s."""
    from tvm import rpc

    try:
        # TVM's connect retries a refused connection for 60 s; probe first so a dead tracker fails now
        socket.create_connection(addr, timeout=timeout).close()
        session = rpc.connect_tracker(*addr)
    except (OSError, RuntimeError) as e:
        raise FarmError(f"cannot reach the RPC tracker at {addr[0]}:{addr[1]}: {e}") from None
    session._sock.settimeout(timeout)  # TVM exposes no timeout for tracker calls
    return session


def _summary(addr: tuple[str, int], timeout: float) -> dict:
    session = _tracker_session(addr, timeout)
    try:
        return session.summary()
    except (OSError, RuntimeError) as e:
        raise FarmError(f"RPC tracker at {addr[0]}:{addr[1]} did not answer: {e}") from None
    finally:
        session.close()


def status(tracker: str, timeout: float = 5.0) -> dict:
    """What the tracker knows: servers and queue per key.

    Returns ``{"tracker": "HOST:PORT", "servers": [{"key", "host", "port"}],
    "keys": {key: {"servers": n, "free": n, "pending": n}}}``; ``free`` counts idle servers,
    ``pending`` queued requests. ``FarmError`` if the tracker cannot be reached.
    """
    addr = parse_tracker(tracker)
    summary = _summary(addr, timeout)
    servers = []
    for info in summary.get("server_info", []):
        key = info.get("key", "").split(":", 1)[-1]
        host, port = info.get("addr", [None, None])
        servers.append({"key": key, "host": host, "port": port})
    keys: dict[str, dict] = {}
    for key, queue in summary.get("queue_info", {}).items():
        keys[key] = {"servers": 0, "free": queue.get("free", 0), "pending": queue.get("pending", 0)}
    for s in servers:
        keys.setdefault(s["key"], {"servers": 0, "free": 0, "pending": 0})["servers"] += 1
    return {"tracker": f"{addr[0]}:{addr[1]}", "servers": servers, "keys": keys}


def status_text(info: dict) -> str:
    """``status()``'s result as the table ``hwc farm status`` prints."""
    rows = [("key", "servers", "free", "pending")]
    rows += [(k, str(v["servers"]), str(v["free"]), str(v["pending"])) for k, v in sorted(info["keys"].items())]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = [f"tracker {info['tracker']}: {len(info['servers'])} server(s)"]
    lines += ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    return "\n".join(lines)


def servers_for(tracker: str, key: str, timeout: float = 5.0) -> int:
    """How many servers of ``key`` the tracker lists (busy or free)."""
    return status(tracker, timeout)["keys"].get(key, {}).get("servers", 0)


def wait_for_server(tracker: str, key: str, wait_sec: float) -> int:
    """Wait up to ``wait_sec`` for a server of ``key`` to be registered; ``FarmError`` if none is."""
    deadline = time.monotonic() + wait_sec
    while True:
        count = servers_for(tracker, key)
        if count:
            return count
        if time.monotonic() >= deadline:
            raise FarmError(
                f"no live RPC server with key '{key}' on tracker {tracker} (waited {wait_sec:g} s); "
                f"start one with `hwc farm serve --tracker {tracker} --key {key}`"
            )
        time.sleep(_POLL_SEC)


def request_session(tracker: str, key: str, wait_sec: float = 30.0, session_timeout_sec: float = 0, priority: int = 1):
    """An ``RPCSession`` on a free server of ``key``, waiting at most ``wait_sec`` for one.

    Unlike ``TrackerSession.request`` this never blocks forever: it fails as soon as the tracker
    lists no server for the key, and after ``wait_sec`` when all of them stay busy.
    ``session_timeout_sec`` (0: none) lets the server end a session that runs longer.
    """
    from tvm import rpc
    from tvm.rpc import base

    addr = parse_tracker(tracker)
    deadline = time.monotonic() + wait_sec
    last_error = ""
    while True:
        if not servers_for(tracker, key):
            raise FarmError(
                f"no live RPC server with key '{key}' on tracker {tracker}" + (f" ({last_error})" if last_error else "")
            )
        session = _tracker_session(addr, 10.0)
        try:
            base.sendjson(session._sock, [base.TrackerCode.REQUEST, key, "", priority])
            reply = _await_reply(session, tracker, key, deadline)
        finally:
            # closing the socket withdraws a request still queued at the tracker
            session.close()
        if reply is None:
            busy = servers_for(tracker, key)
            raise FarmError(
                f"no server with key '{key}' on tracker {tracker} became free within {wait_sec:g} s ({busy} registered, all busy)"
                if busy
                else f"no live RPC server with key '{key}' on tracker {tracker}"
            )
        url, port, matchkey = reply
        try:
            return rpc.connect(url, port, matchkey, session_timeout_sec)
        except Exception as e:  # noqa: BLE001 - the server died between the tracker's answer and our connect
            last_error = f"server {url}:{port} refused the session: {_last_line(e)}"
            if time.monotonic() >= deadline:
                raise FarmError(f"could not open a session on a '{key}' server of tracker {tracker}: {last_error}") from None


def _await_reply(session, tracker: str, key: str, deadline: float):
    """The tracker's ``[url, port, matchkey]`` for a queued request, or ``None`` after ``deadline``
    or once no server of ``key`` is left."""
    from tvm.rpc import base

    sock = session._sock
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return None
        readable, _, _ = select.select([sock], [], [], min(remaining, 2.0))
        if readable:
            value = base.recvjson(sock)
            if value[0] != base.TrackerCode.SUCCESS:
                raise FarmError(f"tracker {tracker} refused the request for '{key}': {value}")
            return value[1]
        if not servers_for(tracker, key):
            return None


def _last_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    return lines[-1] if lines else type(e).__name__


# ---------------------------------------------------------------------------- running artifacts


def run_remote(
    artifact_dir,
    tracker: str,
    key: str,
    inputs,
    repeat: int = 0,
    warmup: int = 0,
    wait_sec: float = 30.0,
    session_timeout_sec: float = 300.0,
) -> tuple[list[np.ndarray], list[float] | None]:
    """Run an artifact on a farm device of ``key``: ``(outputs, latencies_ms or None)``.

    Uploads ``module.so``, runs ``main`` once on the inputs, and when ``repeat > 0`` times
    ``repeat`` more runs (after ``warmup`` untimed ones) with the VM's time evaluator.
    """
    import tvm
    from tvm import relax

    from .export import MODULE, read_manifest
    from .runtime import _to_numpy, check_inputs
    from .targets import spec_from_dict

    if repeat < 0 or warmup < 0:
        raise DataError(f"repeat and warmup must be >= 0, got {repeat} and {warmup}")
    directory = Path(artifact_dir)
    manifest = read_manifest(directory)
    arrays = check_inputs(manifest["inputs"], inputs)
    kind = spec_from_dict(manifest["target"]).kind
    session = request_session(tracker, key, wait_sec, session_timeout_sec)
    where = f"device '{key}' (tracker {tracker})"
    try:
        session.upload(str(directory / MODULE), MODULE)
        lib = session.load_module(MODULE)
        device = session.cuda(0) if kind == "cuda" else session.cpu(0)
        vm = relax.VirtualMachine(lib, device)
        args = [tvm.runtime.tensor(a, device) for a in arrays]
        outputs = _to_numpy(vm["main"](*args))
        latencies = None
        if repeat:
            for _ in range(warmup):
                vm["main"](*args)
            # a saved closure times without re-sending the arguments; it also works for tuple outputs
            vm.save_function("main", "hwc_timed_main", *args)
            result = vm.time_evaluator("hwc_timed_main", device, number=1, repeat=repeat)()
            latencies = [float(t) * 1e3 for t in result.results]
    except HwcError:
        raise
    except Exception as e:  # noqa: BLE001 - TVM raises plain errors for remote failures
        raise FarmError(f"running {directory} on {where} failed: {_last_line(e)}") from None
    return outputs, latencies


# ---------------------------------------------------------------------------- tuning


def rpc_runner(
    tracker: str,
    key: str,
    session_timeout_sec: int = 60,
    wait_for_device_sec: float = 60.0,
    max_workers: int = 1,
    retries: int = 1,
    evaluator_config=None,
):
    """A MetaSchedule runner that measures candidates on farm servers of ``key``.

    Fails now with ``FarmError`` when the tracker lists no server for the key. During tuning,
    a candidate whose server dies is measured again on another one (``retries`` times); a
    request for a device waits at most ``wait_for_device_sec``; and when no server is left,
    the next batch waits that long for one to come back, then ``FarmError`` ends the job
    (``tune_relax`` raises it). ``session_timeout_sec`` bounds one candidate's measurement.
    """
    from tvm.s_tir.meta_schedule.runner import RPCConfig

    host, port = parse_tracker(tracker)
    if not servers_for(tracker, key):
        raise FarmError(
            f"no live RPC server with key '{key}' on tracker {tracker}; "
            f"start one with `hwc farm serve --tracker {tracker} --key {key}`"
        )
    config = RPCConfig(host, port, key, session_priority=1, session_timeout_sec=session_timeout_sec)
    create = functools.partial(_create_session, tracker=tracker, wait_sec=wait_for_device_sec)
    return _runner_class()(
        rpc_config=config,
        evaluator_config=evaluator_config,
        f_create_session=create,
        max_workers=max_workers,
        farm_tracker=tracker,
        farm_wait_sec=wait_for_device_sec,
        farm_retries=retries,
    )


def _create_session(rpc_config, tracker: str, wait_sec: float):
    """``RPCRunner``'s session factory, run in its worker process: a bounded request."""
    return request_session(tracker, rpc_config.tracker_key, wait_sec, rpc_config.session_timeout_sec, rpc_config.session_priority)


def _measure(retries: int, *args):
    """TVM's RPC measurement, repeated on another server when it fails for a reason other than
    the candidate running past its session time (a server lost mid-way, most often)."""
    from tvm.s_tir.meta_schedule.runner.rpc_runner import _worker_func

    for attempt in range(retries + 1):
        try:
            return _worker_func(*args)
        except FarmError:
            raise
        except Exception as e:  # TVM reports a lost connection as a plain error
            if attempt == retries or "RPCSessionTimeoutError" in str(e):
                raise
    raise AssertionError("unreachable")


@functools.cache
def _runner_class():
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.runner import RPCRunner
    from tvm.s_tir.meta_schedule.runner.rpc_runner import RPCRunnerFuture
    from tvm_ffi import register_error

    # lets a FarmError raised in run() reach the caller of tune_relax as FarmError, not RuntimeError
    register_error(FarmError)

    @derived_object
    class FarmRunner(RPCRunner._cls):  # derived objects are extended through _cls
        """``RPCRunner`` with bounded waits for devices and re-measuring on server loss."""

        def __init__(self, *args, farm_tracker: str, farm_wait_sec: float, farm_retries: int, max_workers: int = 1, **kwargs):
            super().__init__(*args, max_workers=max_workers, **kwargs)
            self.farm_tracker = farm_tracker
            self.farm_wait_sec = farm_wait_sec
            self.farm_retries = farm_retries
            # TVM gives the runner's pool no timeout: a server that vanishes without closing its
            # socket (a powered-off board) would block the job forever
            self.pool._timeout = (farm_retries + 1) * (self.rpc_config.session_timeout_sec + farm_wait_sec) + 30

        def run(self, runner_inputs):
            wait_for_server(self.farm_tracker, self.rpc_config.tracker_key, self.farm_wait_sec)
            futures = []
            for runner_input in runner_inputs:
                future = self.pool.submit(
                    _measure,
                    self.farm_retries,
                    self.f_create_session,
                    self.f_upload_module,
                    self.f_alloc_argument,
                    self.f_run_evaluator,
                    self.f_cleanup,
                    self.rpc_config,
                    self.evaluator_config,
                    self.alloc_repeat,
                    str(runner_input.artifact_path),
                    str(runner_input.device_type),
                    tuple(arg_info.as_json() for arg_info in runner_input.args_info),
                )
                futures.append(RPCRunnerFuture(future=future, timeout_sec=self.pool._timeout))
            return futures

    return FarmRunner
