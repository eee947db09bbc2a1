"""Device sessions with bounded waits, and running an exported artifact on a farm device.

TVM's client blocks forever when it asks for a key that no server serves: the tracker simply
queues the request. ``request_session`` waits a bounded time and then raises ``FarmError``
naming the key and the tracker.
"""

from __future__ import annotations

import select
import time
from pathlib import Path

import numpy as np

from ..errors import DataError, HwcError
from .base import FarmError, last_line, parse_tracker
from .status import servers_for, tracker_session


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
        session = tracker_session(addr, 10.0)
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
            last_error = f"server {url}:{port} refused the session: {last_line(e)}"
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

    from ..export import MODULE, read_manifest
    from ..runtime import _to_numpy, check_inputs
    from ..targets import spec_from_dict

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
        raise FarmError(f"running {directory} on {where} failed: {last_line(e)}") from None
    return outputs, latencies
