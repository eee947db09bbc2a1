"""hwc makes TVM's runtime use every available CPU (TVM's x86 default is half of them)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from hwcompress.threads import available_cpus

_PROBE = """
import json, os
import hwcompress, tvm
print(json.dumps({"env": os.environ.get("TVM_NUM_THREADS"), "runtime": tvm.runtime.num_threads()}))
"""


def _probe(env_update: dict) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("TVM_NUM_THREADS", "OMP_NUM_THREADS")}
    env.update(env_update)
    out = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, check=True, timeout=120)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_runtime_uses_every_available_cpu():
    pytest.importorskip("tvm")
    got = _probe({})
    assert got["env"] == str(available_cpus())
    assert got["runtime"] == available_cpus()


def test_user_choice_is_kept():
    pytest.importorskip("tvm")
    assert _probe({"TVM_NUM_THREADS": "1"}) == {"env": "1", "runtime": 1}
    assert _probe({"OMP_NUM_THREADS": "1"})["runtime"] == 1
