"""Per-kernel report of tuning work dirs: FLOPs, best latency, GFLOP/s, % of FP32 peak.

Reads what ``hwc tune`` / ``tools/pretune.py`` leave in a work dir and writes a markdown table
for BENCHMARKS.md, one row per tuned task (kernel), heaviest share of model time first:

* ``hwc_tune_state.json``: per task ``flops``, ``best_ms``, ``default_ms`` (when present: the
  backend's default schedule, measured), trials, errors;
* ``database_workload.json`` / ``database_tuning_record.json``: MetaSchedule's JSON database;
  each task's best *record* (failed runs dropped) is the "DB best" column;
* ``logs/``: MetaSchedule's per-task logs print each task's TIR module (parsed and
  structurally hashed to find the task's workload in the database), and
  ``task_scheduler.log`` tabulates each task's FLOPs and weight (how often the kernel occurs).
  Without logs, tasks are matched to workloads by FLOPs, and ``--model NAME`` (or a work dir
  named ``<model>-<target>``) recomputes weights with ``extract_tasks`` from the zoo model.

Peak FP32 GFLOP/s is the target spec's ``[hardware].peak_gflops_fp32`` when set; else, for a
target that runs on this machine, cores (target ``num-cores``) x FLOPs/cycle/core (from the
CPU flags: AVX-512 64, AVX2+FMA 32, AVX 16, SSE 8, NEON 16 -- two vector FP units assumed)
x clock. The clock is *measured* by default (``--clock measured``): a C loop of 10 independent
vector FMA chains (compiled with the system C compiler, ``-O2 -march=native``) runs ~0.3 s of
CPU on one core; its GFLOP/s / FLOPs-per-cycle is the clock the core really runs at under
load. The nominal clock (cpufreq max, else /proc/cpuinfo "cpu MHz", else lscpu) can be far
below it (a VM's /proc/cpuinfo shows the base clock: 2.445 GHz here, the cores run ~3.1 GHz)
and is the fallback without a compiler (``--clock nominal`` forces it; ``--clock-ghz`` sets
it). The loop is timed by its thread's CPU time, so another process sharing the core does not
lower it (the wall time then shows the contention); one core's clock is applied to all cores,
whose all-core clock can be lower. ``--gemm-threads N`` adds numpy's SGEMM rate on N OpenBLAS
threads as a cross-check of what real code reaches (on all cores it also loads all cores).
``--peak-gflops`` overrides the whole peak. Run measurements pinned (``taskset -c 0``) on a
quiet core.

    .venv/bin/python tools/tuning_report.py tuning/resnet18-host [more work dirs] [--target host] [--json]

Reading never writes to the work dirs (the database is parsed as JSON, not opened with
``JSONDatabase``, which would create missing files).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from hwcompress.tuning import mean_seconds  # noqa: E402

STATE = "hwc_tune_state.json"
WORKLOADS = "database_workload.json"
RECORDS = "database_tuning_record.json"


# ---------------------------------------------------------------------------- peak (pure)

@dataclass(frozen=True)
class Peak:
    gflops: float | None  # None: unknown
    how: str


# LLVM CPU names whose 256-bit FMAs run as two halves on two 128-bit units (one per cycle)
_HALF_WIDTH_FMA = ("znver1",)


def flops_per_cycle(flags, arch: str = "x86_64", cpu: str = "") -> tuple[int, str]:
    """FP32 FLOPs per cycle per core from CPU flags (/proc/cpuinfo spelling) and, where the
    flags do not tell, LLVM's name for the CPU (``cpu``).

    Two vector FP units per core are assumed (true of Zen 2-4, Skylake-SP Gold/Platinum and
    newer server cores; some AVX-512 parts have one 512-bit FMA unit: half of 64); Zen 1
    (``znver1``) has AVX2 but two 128-bit FMA units: one 256-bit FMA per cycle."""
    flags = set(flags.split() if isinstance(flags, str) else flags)
    if arch in ("aarch64", "arm64") or "asimd" in flags or "neon" in flags:
        return 16, "NEON: 2 x 128-bit FMA units x 4 lanes x 2 FLOPs"
    if "avx512f" in flags:
        return 64, "AVX-512: 2 x 512-bit FMA units x 16 lanes x 2 FLOPs"
    if "avx2" in flags and "fma" in flags and cpu in _HALF_WIDTH_FMA:
        return 16, f"AVX2+FMA on {cpu}: 2 x 128-bit FMA units (one 256-bit FMA per cycle) x 2 FLOPs"
    if "avx2" in flags and "fma" in flags:
        return 32, "AVX2+FMA: 2 x 256-bit FMA units x 8 lanes x 2 FLOPs"
    if "avx" in flags:
        return 16, "AVX without FMA: 256-bit add + 256-bit mul x 8 lanes"
    if "sse2" in flags or "sse" in flags:
        return 8, "SSE: 128-bit add + 128-bit mul x 4 lanes"
    return 2, "scalar: 1 FMA x 2 FLOPs (no vector flags found)"


def clock_ghz(max_freq_khz: str | None = None, cpuinfo: str | None = None, lscpu: str | None = None) -> tuple[float | None, str]:
    """The core clock in GHz from, in order, cpufreq's ``cpuinfo_max_freq`` (kHz), the text of
    /proc/cpuinfo (``cpu MHz``: the current, not the boost clock), or ``lscpu`` output."""
    if max_freq_khz and max_freq_khz.strip().isdigit() and int(max_freq_khz) > 0:
        return int(max_freq_khz) / 1e6, "cpufreq cpuinfo_max_freq"
    if cpuinfo:
        m = re.search(r"^cpu MHz\s*:\s*([\d.]+)", cpuinfo, re.M)
        if m and float(m.group(1)) > 0:
            return float(m.group(1)) / 1e3, '/proc/cpuinfo "cpu MHz" (current clock; boost may be higher)'
    if lscpu:
        for key in ("CPU max MHz", "CPU MHz"):
            m = re.search(rf"^{re.escape(key)}:\s*([\d.]+)", lscpu, re.M)
            if m and float(m.group(1)) > 0:
                return float(m.group(1)) / 1e3, f'lscpu "{key}"'
    return None, "no clock found"


def derive_peak(flags, ghz: float | None, cores: int, arch: str = "x86_64", clock_source: str = "", cpu: str = "") -> Peak:
    """cores x FLOPs/cycle (from ``flags`` and ``cpu``, see ``flops_per_cycle``) x clock."""
    per_cycle, isa = flops_per_cycle(flags, arch, cpu)
    if not ghz:
        return Peak(None, f"unknown: {cores} cores x {per_cycle} FLOPs/cycle ({isa}), but no clock found")
    gflops = cores * per_cycle * ghz
    src = f" (clock: {clock_source})" if clock_source else ""
    return Peak(gflops, f"{cores} cores x {per_cycle} FLOPs/cycle ({isa}) x {ghz:.3f} GHz = {gflops:.1f} GFLOP/s{src}")


FMA_ACCUMULATORS = 10  # independent chains: > FMA latency (4-5 cycles) x 2 units
FMA_SOURCE = r"""
typedef float vf __attribute__((vector_size(VEC)));
#define EACH(X) X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7) X(8) X(9)
#define INIT(k) vf a##k = c * (float)(k + 1);
#define STEP(k) a##k = a##k * m + c;
#define SUM(k) for (unsigned i = 0; i < LANES; i++) s += a##k[i];
#define LANES (sizeof(vf) / sizeof(float))
double hwc_fma_loop(long iters, float mul, float add) {
    vf m = (vf){0} + mul, c = (vf){0} + add;  /* broadcasts, kept in registers (element-wise
        stores made GCC reload one of them from the stack in every FMA: 7% low on Zen 1) */
    EACH(INIT)
    for (long i = 0; i < iters; i++) { EACH(STEP) }  /* 10 independent FMAs per iteration */
    double s = 0;
    EACH(SUM)
    return s;  /* returned, so the loop is not dead code */
}
"""


def fma_vector_bytes(flags, arch: str = "x86_64") -> int:
    """Vector width the FMA loop uses: the widest register ``flops_per_cycle`` counts."""
    flags = set(flags.split() if isinstance(flags, str) else flags)
    if arch in ("aarch64", "arm64") or "asimd" in flags or "neon" in flags:
        return 16
    return 64 if "avx512f" in flags else 32 if "avx" in flags else 16


def fma_loop_flops(iters: int, vector_bytes: int) -> float:
    """FP32 FLOPs of ``hwc_fma_loop(iters)``: accumulators x lanes x (mul + add) per iteration."""
    return float(iters) * FMA_ACCUMULATORS * (vector_bytes // 4) * 2


def clock_from_rate(gflops: float, per_cycle: int) -> float:
    """GHz at which a core doing ``per_cycle`` FLOPs per cycle reaches ``gflops``."""
    return gflops / per_cycle


def gemm_flops(n: int) -> float:
    return 2.0 * n**3


def gflops_per_s(flops: float, ms: float | None) -> float | None:
    """Achieved GFLOP/s of a kernel of ``flops`` FLOPs running ``ms`` milliseconds."""
    if not ms or ms <= 0 or not flops:
        return None
    return flops / (ms * 1e-3) / 1e9


def pct_of_peak(gflops: float | None, peak: float | None) -> float | None:
    if gflops is None or not peak:
        return None
    return 100.0 * gflops / peak


# ---------------------------------------------------------------------------- host facts

def _read(path: str) -> str | None:
    try:
        return Path(path).read_text()
    except OSError:
        return None


def host_clock() -> tuple[float | None, str]:
    lscpu = None
    cpuinfo = _read("/proc/cpuinfo")
    max_freq = _read("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq")
    if not max_freq and not (cpuinfo and "cpu MHz" in cpuinfo):
        try:
            lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        except (OSError, subprocess.SubprocessError):
            lscpu = None
    return clock_ghz(max_freq, cpuinfo, lscpu)


@dataclass(frozen=True)
class FmaRun:
    gflops: float  # per CPU second of the thread
    cpu_s: float
    wall_s: float

    def describe(self, vector_bytes: int, per_cycle: int) -> str:
        shared = self.cpu_s < 0.9 * self.wall_s
        return (f"measured, an FMA loop ({FMA_ACCUMULATORS} x {8 * vector_bytes}-bit chains) on 1 core ran "
                f"{self.gflops:.1f} GFLOP/s / {per_cycle} FLOPs/cycle over {self.cpu_s:.2f} s of its CPU time"
                + (f" (wall {self.wall_s:.2f} s: the core was shared)" if shared else ""))


def measure_fma(vector_bytes: int, cpu_seconds: float = 0.3) -> FmaRun | str:
    """Run the FMA loop on this thread (compiled with ``cc``); a string says why it could not."""
    import ctypes
    import tempfile
    import time

    with tempfile.TemporaryDirectory() as tmp:
        src, lib = Path(tmp) / "fma.c", Path(tmp) / "fma.so"
        src.write_text(FMA_SOURCE)
        cmd = ["cc", "-O2", "-march=native", "-ffp-contract=fast", f"-DVEC={vector_bytes}", "-shared", "-fPIC", "-o", str(lib), str(src)]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.SubprocessError) as e:
            return f"no C compiler ({type(e).__name__})"
        if done.returncode != 0:
            return f"cc failed: {done.stderr.strip()[:200]}"
        loop = ctypes.CDLL(str(lib)).hwc_fma_loop
    loop.restype, loop.argtypes = ctypes.c_double, [ctypes.c_long, ctypes.c_float, ctypes.c_float]
    iters = 1 << 20
    while True:
        wall, cpu = time.perf_counter(), time.thread_time()
        loop(iters, 0.9999, 1e-4)  # stays finite and away from denormals
        wall, cpu = time.perf_counter() - wall, time.thread_time() - cpu
        if cpu >= cpu_seconds or iters > 1 << 34:
            return FmaRun(fma_loop_flops(iters, vector_bytes) / cpu / 1e9, cpu, wall)
        iters *= 2 if cpu < cpu_seconds / 8 else 4 if cpu < cpu_seconds / 2 else 2


def measured_clock(flags, arch: str, cpu: str = "") -> tuple[float | None, str]:
    per_cycle, _ = flops_per_cycle(flags, arch, cpu)
    width = fma_vector_bytes(flags, arch)
    run = measure_fma(width)
    if isinstance(run, str):
        return None, run
    return clock_from_rate(run.gflops, per_cycle), run.describe(width, per_cycle)


def measure_gemm(threads: int, n: int = 2048) -> str:
    """numpy SGEMM GFLOP/s on ``threads`` OpenBLAS threads (best of 3), in a subprocess so
    the thread count takes effect."""
    code = (f"import numpy as np, time\na = np.random.rand({n}, {n}).astype(np.float32)\nb = a.copy()\na @ b\nts = []\n"
            f"for _ in range(3):\n    t = time.perf_counter(); a @ b; ts.append(time.perf_counter() - t)\n"
            f"print({gemm_flops(n)} / min(ts) / 1e9)")
    env = {**os.environ, "OPENBLAS_NUM_THREADS": str(threads), "OMP_NUM_THREADS": str(threads)}
    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
        return f"numpy SGEMM {n}x{n} on {threads} thread(s): {float(out.stdout.strip()):.1f} GFLOP/s"
    except (OSError, subprocess.SubprocessError, ValueError) as e:
        return f"numpy SGEMM on {threads} thread(s) failed ({type(e).__name__})"


def peak_for(spec, override: float | None = None, clock: float | None = None, measure: bool = True, gemm_threads: int = 0) -> Peak:
    """The FP32 peak of ``spec``: ``override``, the spec's ``peak_gflops_fp32``, or derived for
    a CPU target that runs on this machine (clock: ``clock``, measured, else nominal; with
    ``gemm_threads``, numpy's SGEMM rate is appended as a cross-check)."""
    from hwcompress.targets import host_arch, host_cpu_features, host_cpu_name, runnable_here

    if override:
        return Peak(override, f"{override:.1f} GFLOP/s given with --peak-gflops")
    if spec.hardware.peak_gflops_fp32:
        return Peak(spec.hardware.peak_gflops_fp32, f"{spec.hardware.peak_gflops_fp32:.1f} GFLOP/s from target {spec.name}'s [hardware].peak_gflops_fp32")
    ok, why = runnable_here(spec)
    if spec.kind != "llvm" or not ok:
        return Peak(None, f"unknown: target {spec.name} sets no [hardware].peak_gflops_fp32 and is not this machine ({why or spec.kind})")
    cores = int(spec.tvm.get("num-cores") or os.cpu_count() or 1)
    flags, arch, cpu = host_cpu_features(), host_arch(), host_cpu_name()
    nominal, nominal_source = host_clock()
    ghz, source = (clock, "--clock-ghz") if clock else (None, "")
    if not ghz and measure:
        ghz, source = measured_clock(flags, arch, cpu)
        if ghz and nominal:
            source += f"; the nominal clock is {nominal:.3f} GHz, from {nominal_source}"
        elif not ghz:
            source = f"nominal {nominal_source} (measuring failed: {source})"
    if not ghz:
        ghz, source = nominal, source or nominal_source
    peak = derive_peak(flags, ghz, cores, arch, source, cpu)
    if gemm_threads:
        peak = Peak(peak.gflops, f"{peak.how}; cross-check: {measure_gemm(gemm_threads)}")
    return peak


# ---------------------------------------------------------------------------- work dirs

def parse_scheduler_table(text: str) -> dict[str, tuple[float, int]]:
    """``{task name: (FLOPs, weight)}`` from the tables MetaSchedule prints to
    ``logs/...task_scheduler.log`` (the last table wins; resumed runs append new tables)."""
    out = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.split("|")]
        if len(cells) >= 4 and cells[0].isdigit() and re.fullmatch(r"\d+(\.\d+)?(e[+-]?\d+)?", cells[2]) and cells[3].isdigit():
            out[cells[1]] = (float(cells[2]), int(cells[3]))
    return out


def parse_task_logs(logs: Path) -> dict[str, str]:
    """``{task name: TVMScript of its module}`` from MetaSchedule's per-task logs."""
    out = {}
    for path in sorted(logs.glob("*task_[0-9]*.log")):
        text = path.read_text(errors="replace")
        m = re.search(r'Initializing Task #\d+: "([^"]+)"\n[^\n]*\n(.*?)\n\d{4}-\d\d-\d\d ', text, re.S)
        if m:
            out.setdefault(m.group(1), m.group(2))
    return out


def read_records(work: Path) -> tuple[list[str], dict[int, list[float | None]]]:
    """Workload hashes (line order) and, per workload index, each record's mean seconds in
    file order (``None`` for a failed run). Torn last lines are skipped."""
    hashes = []
    for line in _lines(work / WORKLOADS):
        hashes.append(str(line[0]))
    runs: dict[int, list[float | None]] = {}
    for line in _lines(work / RECORDS):
        idx, (_trace, run_secs, *_rest) = line[0], line[1]
        runs.setdefault(int(idx), []).append(mean_seconds(run_secs))
    return hashes, runs


def _lines(path: Path):
    if not path.is_file():
        return
    with path.open() as f:
        for line in f:
            try:
                yield json.loads(line)
            except json.JSONDecodeError:
                continue


@dataclass
class Row:
    work_dir: str
    task: str
    weight: int | None = None
    flops: float = 0.0
    flops_source: str = ""
    trials: int | None = None
    errors: int | None = None
    db_best_ms: float | None = None
    state_best_ms: float | None = None
    default_ms: float | None = None
    gflops: float | None = None
    pct_peak: float | None = None
    share: float | None = None  # of the weighted total time of the work dir's tasks
    finished: bool = False

    @property
    def best_ms(self) -> float | None:
        return self.db_best_ms if self.db_best_ms is not None else self.state_best_ms


@dataclass
class WorkReport:
    work_dir: str
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def totals(self) -> dict:
        timed = [r for r in self.rows if r.best_ms is not None]
        ms = sum((r.weight or 1) * r.best_ms for r in timed)
        flops = sum((r.weight or 1) * r.flops for r in timed)
        default = [r for r in timed if r.default_ms is not None]
        out = {"kernels": len(self.rows), "weighted_ms": ms, "weighted_gflop": flops / 1e9, "gflops": gflops_per_s(flops, ms)}
        if default and len(default) == len(timed):
            out["weighted_default_ms"] = sum((r.weight or 1) * r.default_ms for r in default)
        return out


def report_work_dir(work: Path, peak: Peak, model_tasks: dict[str, tuple[int, str]] | None = None) -> WorkReport:
    """The rows of one work dir.

    Task name <-> database workload: by the structural hash of the module each task log
    prints; without logs, by FLOPs (a state task whose FLOPs equal exactly one workload's).
    Weights: the scheduler log's, else ``model_tasks`` (``{task name: (weight, workload
    hash)}`` recomputed from the model; matched by hash, so renamed kernels still match)."""
    rep = WorkReport(str(work))
    state = {}
    if (work / STATE).is_file():
        state = {t["name"]: t for t in json.loads((work / STATE).read_text()).get("tasks", [])}
    else:
        rep.notes.append(f"no {STATE}")
    logs = work / "logs"
    sched = {}
    for path in sorted(logs.glob("*task_scheduler.log")) if logs.is_dir() else []:
        sched.update(parse_scheduler_table(path.read_text(errors="replace")))
    hashes, runs = read_records(work)
    index_of = {h: i for i, h in enumerate(hashes)}

    name_to_idx: dict[str, int] = {}
    scripts = parse_task_logs(logs) if logs.is_dir() else {}
    if scripts:
        import tvm_ffi
        from tvm.script import from_source

        for name, src in scripts.items():
            try:
                h = str(tvm_ffi.structural_hash(from_source(src)))
            except Exception as e:  # a log the parser cannot read: that task has no DB column
                rep.notes.append(f"{name}: could not parse its module from the log ({type(e).__name__})")
                continue
            if h in index_of:
                name_to_idx[name] = index_of[h]
    names = list(dict.fromkeys([*state, *sched, *name_to_idx]))
    wl_flops: dict[int, float] = {}
    if hashes and len(name_to_idx) < len(hashes):
        wl_flops = _workload_flops(work)
        free = [i for i in range(len(hashes)) if i not in name_to_idx.values()]
        by_flops = {}
        for i in free:
            by_flops.setdefault(wl_flops[i], []).append(i)
        matched = 0
        for name in names:
            flops = float(state.get(name, {}).get("flops") or sched.get(name, (0.0, 0))[0])
            if name not in name_to_idx and flops and len(by_flops.get(flops, [])) == 1:
                name_to_idx[name] = by_flops.pop(flops)[0]
                matched += 1
        if matched:
            rep.notes.append(f"{matched} task(s) matched to database workloads by FLOPs (no task log)")
    model_by_hash = {h: (name, w) for name, (w, h) in (model_tasks or {}).items()}
    unnamed = [i for i in range(len(hashes)) if i not in name_to_idx.values()]
    if unnamed:
        rep.notes.append(f"{len(unnamed)} database workload(s) matched to no task of the state/logs: "
                         "named by the model's task (`--model`) or by hash")

    def db_best(i):
        valid = [x for x in runs.get(i, []) if x is not None]
        return 1e3 * min(valid) if valid else None

    for name in names:
        st = state.get(name, {})
        row = Row(str(work), name, finished=bool(st.get("finished", False)))
        row.trials, row.errors = st.get("trials"), st.get("errors")
        row.state_best_ms, row.default_ms = st.get("best_ms"), st.get("default_ms")
        idx = name_to_idx.get(name)
        if st.get("flops"):
            row.flops, row.flops_source = float(st["flops"]), "state"
        elif name in sched:
            row.flops, row.flops_source = sched[name][0], "scheduler log"
        elif idx is not None:
            row.flops, row.flops_source = (wl_flops or _workload_flops(work))[idx], "recomputed"
        if name in sched:
            row.weight = sched[name][1]
        elif idx is not None and hashes[idx] in model_by_hash:
            row.weight = model_by_hash[hashes[idx]][1]
        if idx is not None:
            row.db_best_ms = db_best(idx)
            if row.trials is None:  # no state file: count the database's records
                row.trials = len(runs.get(idx, []))
                row.errors = sum(1 for x in runs.get(idx, []) if x is None)
        rep.rows.append(row)
    for i in unnamed:
        model_name, weight = model_by_hash.get(hashes[i], (None, None))
        row = Row(str(work), model_name or f"workload {hashes[i]}", weight=weight, db_best_ms=db_best(i),
                  trials=len(runs.get(i, [])), errors=sum(1 for x in runs.get(i, []) if x is None))
        row.flops, row.flops_source = wl_flops[i], "recomputed"
        rep.rows.append(row)
    if model_tasks:
        stale = [r.task for r in rep.rows if r.weight is None]
        if stale:
            rep.notes.append(f"{len(stale)} kernel(s) are not in the model as built now (changed since tuning?)")
    if any(r.weight is None for r in rep.rows):
        rep.notes.append("weight unknown for some kernels (shown `1?`): counted once")

    total = sum((r.weight or 1) * r.best_ms for r in rep.rows if r.best_ms is not None)
    for r in rep.rows:
        r.gflops = gflops_per_s(r.flops, r.best_ms)
        r.pct_peak = pct_of_peak(r.gflops, peak.gflops)
        r.share = (r.weight or 1) * r.best_ms / total if r.best_ms is not None and total else None
    rep.rows.sort(key=lambda r: (-(r.share or 0.0), -(r.weight or 1) * r.flops))
    return rep


def _workload_flops(work: Path) -> dict[int, float]:
    """FLOPs of each database workload (by line index), as MetaSchedule counts them."""
    from tvm.s_tir import meta_schedule as ms
    from tvm.s_tir.analysis import estimate_tir_flops

    # MetaSchedule counts at least 1 FLOP per task (a reshape has 0)
    return {i: max(1.0, float(estimate_tir_flops(ms.database.Workload.from_json(line).mod))) for i, line in enumerate(_lines(work / WORKLOADS))}


# ---------------------------------------------------------------------------- output

def _f(x, fmt, none="-"):
    return none if x is None else format(x, fmt)


def markdown(reports: list[WorkReport], peak: Peak, target: str) -> str:
    out = [f"FP32 peak ({target}): {peak.how}", ""]
    for rep in reports:
        tot = rep.totals()
        out.append(f"### `{rep.work_dir}`")
        out.append("")
        head = ["kernel", "weight", "MFLOP", "trials", "DB best ms", "state best ms", "default ms", "default / best", "GFLOP/s", "% peak", "share of time"]
        out.append("| " + " | ".join(head) + " |")
        out.append("|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|")
        for r in rep.rows:
            speedup = f"{r.default_ms / r.best_ms:.2f}x" if r.default_ms and r.best_ms else "-"
            out.append("| " + " | ".join([
                f"`{r.task}`", _f(r.weight, "d", "1?"), f"{r.flops / 1e6:.2f}" if r.flops else "-",
                _f(r.trials, "d"), _f(r.db_best_ms, ".4g"), _f(r.state_best_ms, ".4g"), _f(r.default_ms, ".4g"),
                speedup, _f(r.gflops, ".1f"), _f(r.pct_peak, ".1f"), _f(None if r.share is None else 100 * r.share, ".1f") + ("%" if r.share is not None else ""),
            ]) + " |")
        line = (f"Total over {tot['kernels']} kernels, each counted `weight` times: {tot['weighted_ms']:.3f} ms of kernel time, "
                f"{tot['weighted_gflop']:.3f} GFLOP, {_f(tot['gflops'], '.1f')} GFLOP/s")
        if peak.gflops and tot["gflops"]:
            line += f" ({100 * tot['gflops'] / peak.gflops:.1f}% of peak)"
        if "weighted_default_ms" in tot:
            line += f"; default schedules {tot['weighted_default_ms']:.3f} ms"
        out += ["", line + "."]
        for note in rep.notes:
            out.append(f"- note: {note}")
        out.append("")
    out.append("DB best: the fastest valid record of the kernel's workload in the database; state best: "
               "`hwc_tune_state.json`'s `best_ms`; default: the default schedule measured (when recorded). "
               "GFLOP/s and % peak use DB best (else state best). Share of time: weight x best / sum over kernels. "
               "FLOPs are MetaSchedule's count of the kernel's TIR: a Winograd kernel counts the transformed "
               "algorithm's FLOPs, fewer than the direct convolution's, so its GFLOP/s understates the equivalent rate.")
    return "\n".join(out)


def _model_tasks(model: str | None, work: Path, spec) -> dict[str, tuple[int, str]] | None:
    """``{task name: (weight, workload hash)}`` recomputed from a zoo model (``extract_tasks``),
    when ``model`` is given or the work dir has no scheduler log and is named ``<model>-<target>``."""
    name = "_hwc_tools_bench_tuning_efficiency"
    eff = sys.modules.get(name)
    if eff is None:
        spec_ = importlib.util.spec_from_file_location(name, ROOT / "tools" / "bench_tuning_efficiency.py")
        eff = sys.modules[name] = importlib.util.module_from_spec(spec_)
        spec_.loader.exec_module(eff)
    if model is None:
        if any((work / "logs").glob("*task_scheduler.log")):
            return None
        model = next((m for m in eff.MODELS if work.name.startswith(f"{m}-")), None)
        if model is None:
            return None
    if model not in eff.MODELS:
        raise SystemExit(f"--model: unknown model {model!r} (one of {', '.join(sorted(eff.MODELS))})")
    import tvm_ffi

    return {info.name: (info.weight, str(tvm_ffi.structural_hash(task.dispatched[0]))) for task, info in eff.model_tasks(model, spec)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("work_dirs", nargs="+", type=Path)
    p.add_argument("--target", default="host", help="target spec the work dirs were tuned for (for the peak)")
    p.add_argument("--peak-gflops", type=float, default=None, help="override the FP32 peak")
    p.add_argument("--clock-ghz", type=float, default=None, help="clock for the derived peak (e.g. the all-core boost)")
    p.add_argument("--clock", choices=("measured", "nominal"), default="measured",
                   help="derived peak's clock: measured with an FMA loop on one core (default), or the nominal one the OS reports")
    p.add_argument("--gemm-threads", type=int, default=0, help="also time numpy SGEMM on N threads as a cross-check (0: no)")
    p.add_argument("--model", default=None,
                   help="zoo model (tools/bench_tuning_efficiency.py MODELS) to recompute task weights from; "
                        "default: from the work dir's logs, else from a work dir named <model>-<target>")
    p.add_argument("--json", action="store_true", help="JSON instead of markdown")
    args = p.parse_args(argv)

    from hwcompress.targets import load_target

    spec = load_target(args.target)
    peak = peak_for(spec, args.peak_gflops, args.clock_ghz, args.clock == "measured", args.gemm_threads)
    reports = []
    for work in args.work_dirs:
        if not ((work / STATE).is_file() or (work / RECORDS).is_file()):
            p.error(f"{work}: no {STATE} or {RECORDS}: not a tuning work dir")
        reports.append(report_work_dir(work, peak, _model_tasks(args.model, work, spec)))
    if args.json:
        print(json.dumps({
            "target": spec.name,
            "peak_gflops_fp32": peak.gflops,
            "peak_derivation": peak.how,
            "work_dirs": [{"work_dir": r.work_dir, "totals": r.totals(), "notes": r.notes,
                           "kernels": [{**asdict(row), "best_ms": row.best_ms} for row in r.rows]} for r in reports],
        }, indent=1))
    else:
        print(markdown(reports, peak, spec.name))
    return 0


if __name__ == "__main__":
    sys.exit(main())
