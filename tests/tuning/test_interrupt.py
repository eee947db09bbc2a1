"""Ctrl-C during `hwc tune`: it stops after the batch being measured (a second Ctrl-C stops at
once), exits with 130 without a traceback, leaves no worker behind, and leaves a work dir
whose database and state agree, from which `hwc tune` resumes."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import onnx
import psutil
import pytest

from hwcompress.tuning import STATE
from model_builders import one_conv

HWC = str(Path(sys.executable).parent / "hwc")
HANG_GUARD_S = 180  # not a timing assertion: only that the process does not hang


class _Tune:
    """`hwc tune` in its own process group, as a terminal runs it (Ctrl-C signals the group)."""

    def __init__(self, model: Path, work: Path, trials: int):
        self.proc = subprocess.Popen(
            [HWC, "tune", str(model), "--trials", str(trials), "--work-dir", str(work)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        self.stderr: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        for line in self.proc.stderr:
            self.stderr.append(line.rstrip("\n"))

    def wait_for_progress(self, timeout: float = 900) -> None:
        deadline = time.monotonic() + timeout
        while not any(line.startswith("tune: ") and " trials, " in line for line in self.stderr):
            assert self.proc.poll() is None, "\n".join(self.stderr)
            assert time.monotonic() < deadline, "no progress line:\n" + "\n".join(self.stderr)
            time.sleep(0.2)

    def ctrl_c(self) -> None:
        os.killpg(self.proc.pid, signal.SIGINT)

    def wait(self) -> int:
        try:
            code = self.proc.wait(timeout=HANG_GUARD_S)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            pytest.fail(f"hwc tune still running {HANG_GUARD_S} s after Ctrl-C:\n" + "\n".join(self.stderr))
        self._reader.join(5)
        return code

    def group_left(self) -> list[str]:
        """Processes still in the tuning process group (workers it should have killed)."""
        left = []
        for proc in psutil.process_iter(["pid", "cmdline"]):
            try:
                if os.getpgid(proc.info["pid"]) == self.proc.pid:
                    left.append(" ".join(proc.info["cmdline"] or []))
            except (ProcessLookupError, psutil.Error):
                continue
        return left


@pytest.fixture
def model(tmp_path) -> Path:
    path = tmp_path / "one_conv.onnx"  # one tunable kernel: the first batch comes soonest
    onnx.save(one_conv(), path)
    return path


def _consistent(work: Path) -> tuple[int, int]:
    """(trials, seeds) from the state; asserts one database record per trial and seed."""
    tasks = json.loads((work / STATE).read_text())["tasks"]
    trials = sum(t["trials"] for t in tasks)
    seeds = sum(1 for t in tasks if t.get("default_ms") is not None)
    records = (work / "database_tuning_record.json").read_text().splitlines()
    assert all(json.loads(line) for line in records)  # no torn line
    assert len(records) == trials + seeds, (len(records), trials, seeds)
    assert seeds == len(tasks)  # every task seeded (the model's kernels all have a default)
    return trials, seeds


@pytest.mark.slow
def test_ctrl_c_stops_after_the_batch_and_resumes(model, tmp_path):
    work = tmp_path / "work"
    run = _Tune(model, work, trials=200)
    run.wait_for_progress()
    run.ctrl_c()
    code = run.wait()
    err = "\n".join(run.stderr)
    assert code == 130, err
    assert "Traceback" not in err, err
    assert sum("stopping after the current batch" in line for line in run.stderr) == 1, err
    errors = [line for line in run.stderr if line.startswith("hwc: error:")]
    assert len(errors) == 1 and "trials now" in errors[0] and "resume" in errors[0], err
    assert run.group_left() == []
    trials, seeds = _consistent(work)
    assert 0 < trials < 200

    again = _Tune(model, work, trials=trials + 2)  # resumes: only the 2 trials still missing
    assert again.wait() == 0, "\n".join(again.stderr)
    assert not any("measuring the default schedule" in line for line in again.stderr)  # seeded once
    resumed, seeds_after = _consistent(work)
    assert resumed >= trials + 2 and seeds_after == seeds


@pytest.mark.slow
def test_second_ctrl_c_stops_now(model, tmp_path):
    work = tmp_path / "work"
    run = _Tune(model, work, trials=200)
    run.wait_for_progress()
    run.ctrl_c()
    # the second press must come while the first is still being honoured (the next batch)
    deadline = time.monotonic() + 60
    while not any("stopping after the current batch" in line for line in run.stderr):
        assert time.monotonic() < deadline and run.proc.poll() is None, "\n".join(run.stderr)
        time.sleep(0.1)
    run.ctrl_c()
    code = run.wait()
    err = "\n".join(run.stderr)
    assert code == 130, err
    assert "Traceback" not in err and any("stopped now" in line for line in run.stderr), err
    assert run.group_left() == []
    state = json.loads((work / STATE).read_text())  # saved, readable
    assert sum(t["trials"] for t in state["tasks"]) > 0
    records = (work / "database_tuning_record.json").read_text().splitlines()
    assert all(json.loads(line) for line in records)  # no torn line


def test_first_ctrl_c_only_asks_to_stop(capsys):
    """In-process: the handler never raises (an exception unwinding through MetaSchedule's C++
    loop from a signal is what is unsafe), and the previous handler comes back."""
    from hwcompress.tuning_workers import CtrlC

    before = signal.getsignal(signal.SIGINT)
    stopped = []
    with CtrlC(stop_now=lambda: stopped.append(True)) as ctrl_c:
        assert not ctrl_c.requested
        signal.raise_signal(signal.SIGINT)
        assert ctrl_c.requested and not stopped
    assert signal.getsignal(signal.SIGINT) is before
    assert capsys.readouterr().err.count("stopping after the current batch") == 1


def test_no_handler_outside_the_main_thread():
    from hwcompress.tuning_workers import CtrlC

    before = signal.getsignal(signal.SIGINT)
    seen = []

    def body():
        with CtrlC(stop_now=lambda: None):
            seen.append(signal.getsignal(signal.SIGINT))

    thread = threading.Thread(target=body)
    thread.start()
    thread.join()
    assert seen == [before]


def test_tensor_intrinsics_parse_the_same_with_the_cheap_stack():
    """``import_tensor_intrin`` parses TVM's tensor intrinsics with ``_cheap_stack``; one that
    reads closure variables from its enclosing frame (``get_mma_intrin``) must come out the
    same as with the real ``inspect.stack`` (a fresh process: the import is once per process)."""
    code = (
        "import tvm\n"
        "from hwcompress.tuning_workers import import_tensor_intrin\n"
        "import_tensor_intrin()\n"
        "from tvm.s_tir import TensorIntrin\n"
        "from tvm.s_tir.tensor_intrin import cuda\n"
        "desc, impl = cuda.get_mma_intrin(16, 'float16', 'float16', 'float32', True, False)\n"
        "got = TensorIntrin.get(cuda.MMA_f16f16f32_TRANS_A_INTRIN)\n"
        "tvm.ir.assert_structural_equal(got.desc, desc)\n"
        "tvm.ir.assert_structural_equal(got.impl, impl)\n"
        "assert TensorIntrin.get('dot_16x4_vnni') is not None\n"
        "print('same')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert done.returncode == 0 and done.stdout.strip() == "same", done.stderr[-2000:]
