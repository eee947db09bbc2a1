"""Farm basics on loopback: addresses, process handling, status, running an artifact remotely."""

from __future__ import annotations

import time

import numpy as np
import pytest
from farm_procs import group_members

import hwcompress
from hwcompress import farm
from hwcompress.errors import DataError


@pytest.mark.parametrize(
    "text, expected",
    [("127.0.0.1:9190", ("127.0.0.1", 9190)), ("farm.local:1", ("farm.local", 1)), ("[::1]:9190", ("::1", 9190))],
)
def test_parse_tracker(text, expected):
    assert farm.parse_tracker(text) == expected


@pytest.mark.parametrize("text", ["", "9190", "host:", ":9190", "host:port", "host:0", "host:70000"])
def test_parse_tracker_rejects(text):
    with pytest.raises(DataError, match="HOST:PORT"):
        farm.parse_tracker(text)


def test_status_of_unreachable_tracker_names_it():
    port = farm.free_port()
    start = time.monotonic()
    with pytest.raises(farm.FarmError, match=f"127.0.0.1:{port}"):
        farm.status(f"127.0.0.1:{port}")
    assert time.monotonic() - start < 10  # TVM's own connect would retry for 60 s


def test_server_of_dead_tracker_fails_with_its_output():
    port = farm.free_port()
    with pytest.raises(farm.FarmError, match="RPC server 'k'"):
        farm.start_server(f"127.0.0.1:{port}", "k", timeout=8)


def test_server_listed_and_stopped_with_its_workers(tracker, started):
    (server,) = started.servers(tracker, "basic", 1)
    info = farm.status(tracker)
    assert info["tracker"] == tracker
    assert info["keys"]["basic"]["servers"] == 1
    assert {"key": "basic", "host": "127.0.0.1", "port": int(server.address.rsplit(":", 1)[1])} in info["servers"]
    table = farm.status_text(info)
    assert tracker in table and any(line.split()[:2] == ["basic", "1"] for line in table.splitlines())
    # a session forks a worker in the server's group; stop() must take it down too
    session = farm.request_session(tracker, "basic", wait_sec=30)
    assert session.cpu(0).exist
    assert len(group_members(server.pid)) >= 2
    server.stop()
    assert not group_members(server.pid)
    assert farm.servers_for(tracker, "basic") == 0
    del session


def test_request_for_unserved_key_fails_fast(tracker):
    start = time.monotonic()
    with pytest.raises(farm.FarmError, match="no live RPC server with key 'nobody'"):
        farm.request_session(tracker, "nobody", wait_sec=30)
    assert time.monotonic() - start < 10


def test_run_remote_matches_local(tracker, started, tmp_path, tiny_static_model):
    hwcompress.compile(tiny_static_model, target="host", out=tmp_path / "a", input_shapes={"input": (1, 3, 16, 16)})
    x = np.random.default_rng(0).standard_normal((1, 3, 16, 16)).astype(np.float32)
    local = hwcompress.load(tmp_path / "a").run([x])
    started.servers(tracker, "runner", 1)

    outputs, latencies = farm.run_remote(tmp_path / "a", tracker, "runner", [x])
    assert latencies is None
    assert len(outputs) == len(local) == 1
    np.testing.assert_allclose(outputs[0], local[0], rtol=1e-5, atol=1e-6)

    outputs, latencies = farm.run_remote(tmp_path / "a", tracker, "runner", {"input": x}, repeat=3, warmup=1)
    np.testing.assert_allclose(outputs[0], local[0], rtol=1e-5, atol=1e-6)
    assert len(latencies) == 3 and all(t > 0 for t in latencies)

    with pytest.raises(DataError, match="input 'input'"):
        farm.run_remote(tmp_path / "a", tracker, "runner", [x[:, :2]])
