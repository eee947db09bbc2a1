"""Device farm on TVM's own RPC tracker: start trackers and device servers, measure and run on them.

A farm is one ``tvm.exec.rpc_tracker`` and any number of ``tvm.exec.rpc_server`` processes that
register with it under a key (one key per device type, e.g. ``rasp4b``). Clients ask the tracker
for a free server of a key and talk to that server directly.

TVM's client blocks forever when it asks for a key that no server serves: the tracker simply
queues the request. Everything here that waits for a device waits a bounded time and then raises
``FarmError`` naming the key and the tracker.

Modules: ``base`` (the error, addresses, ports), ``processes`` (start and stop trackers and
servers by process group), ``status`` (tracker queries), ``session`` (bounded session requests,
``run_remote``), ``runner`` (``rpc_runner`` for MetaSchedule). None imports TVM at load.
"""

from .base import DEFAULT_TRACKER_PORT, LOOPBACK, FarmError, free_port, parse_tracker
from .processes import FarmProcess, start_server, start_tracker
from .runner import rpc_runner
from .session import request_session, run_remote
from .status import servers_for, status, status_text, wait_for_server

__all__ = [
    "DEFAULT_TRACKER_PORT",
    "LOOPBACK",
    "FarmError",
    "FarmProcess",
    "free_port",
    "parse_tracker",
    "request_session",
    "rpc_runner",
    "run_remote",
    "servers_for",
    "start_server",
    "start_tracker",
    "status",
    "status_text",
    "wait_for_server",
]
