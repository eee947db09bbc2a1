"""What every part of the farm shares: its error, tracker addresses and free ports."""

from __future__ import annotations

import socket

from ..errors import DataError, HwcError

LOOPBACK = "127.0.0.1"
DEFAULT_TRACKER_PORT = 9190


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


def last_line(e: BaseException) -> str:
    """The last non-blank line of an error's message (TVM's remote errors carry a traceback)."""
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    return lines[-1] if lines else type(e).__name__
