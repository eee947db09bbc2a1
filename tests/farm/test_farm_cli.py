"""`hwc farm tracker|serve|status` and `hwc run --tracker`: the CLI over hwcompress.farm."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from farm_procs import group_members

import hwcompress
from hwcompress import farm


def hwc(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "hwcompress", *map(str, args)], capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def cli_tracker():
    """`hwc farm tracker` as users start it, in its own process group."""
    port = farm.free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "hwcompress", "farm", "tracker", "--port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )
    try:
        line = proc.stdout.readline()
        assert f"tracker on 127.0.0.1:{port}" in line, line + proc.stderr.read()
        yield f"127.0.0.1:{port}"
    finally:
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C does: hwc stops its tracker's group
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        deadline = time.time() + 20
        while group_members(proc.pid) and time.time() < deadline:
            time.sleep(0.5)
        assert not group_members(proc.pid), "hwc farm tracker left processes behind"


def test_status_and_run_through_the_cli(cli_tracker, started, tmp_path, tiny_static_model):
    r = hwc("farm", "status", "--tracker", cli_tracker, "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["servers"] == []
    started.servers(cli_tracker, "cli-dev", 1)
    r = hwc("farm", "status", "--tracker", cli_tracker)
    assert r.returncode == 0 and "cli-dev" in r.stdout

    hwcompress.compile(tiny_static_model, out=tmp_path / "a")
    x = np.random.default_rng(0).standard_normal((1, 3, 16, 16)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    r = hwc("run", tmp_path / "a", "--input", tmp_path / "x.npy", "--tracker", cli_tracker, "--key", "cli-dev",
            "--bench", "3", "--json", "--output", tmp_path / "y.npy")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["mode"] == "rpc:cli-dev" and report["runs"] == 3
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), hwcompress.load(tmp_path / "a").run(x)[0], rtol=1e-5, atol=1e-6)


def test_unreachable_tracker_is_one_line_error(tmp_path):
    r = hwc("farm", "status", "--tracker", f"127.0.0.1:{farm.free_port()}")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.count("hwc: error") == 1
