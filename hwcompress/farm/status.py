"""Tracker queries: what servers a tracker lists per key, and bounded waits for one to appear."""

from __future__ import annotations

import socket
import time

from .base import FarmError, parse_tracker

_POLL_SEC = 1.0


def tracker_session(addr: tuple[str, int], timeout: float):
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


def tracker_summary(addr: tuple[str, int], timeout: float) -> dict:
    """The tracker's raw ``summary()``; ``FarmError`` if it cannot be reached or does not answer."""
    session = tracker_session(addr, timeout)
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
    summary = tracker_summary(addr, timeout)
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
