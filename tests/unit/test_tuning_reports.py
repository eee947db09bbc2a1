"""Pure functions of tools/tuning_report.py and tools/bench_tuning_efficiency.py (no tuning)."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from tool_modules import load_tool

ROOT = Path(__file__).resolve().parents[2]


report = load_tool("tuning_report")
eff = load_tool("bench_tuning_efficiency")

ZEN3_FLAGS = "fpu vme sse sse2 ssse3 fma cx16 sse4_1 sse4_2 avx f16c avx2 bmi2 sha_ni"
SKX_FLAGS = "sse sse2 fma avx avx2 avx512f avx512dq avx512cd avx512bw avx512vl avx512_vnni"


# ---------------------------------------------------------------------------- peak

@pytest.mark.parametrize(
    "flags, arch, per_cycle",
    [
        (ZEN3_FLAGS, "x86_64", 32),
        (SKX_FLAGS, "x86_64", 64),
        ("sse sse2 avx", "x86_64", 16),
        ("sse sse2", "x86_64", 8),
        ("fp asimd evtstrm aes pmull sha1 sha2 crc32 cpuid", "aarch64", 16),
        ("", "x86_64", 2),
        ("avx avx2", "x86_64", 16),  # AVX2 without FMA: no fused multiply-add
    ],
)
def test_flops_per_cycle_from_flags(flags, arch, per_cycle):
    assert report.flops_per_cycle(flags, arch)[0] == per_cycle
    assert report.flops_per_cycle(set(flags.split()), arch)[0] == per_cycle


def test_zen1_counts_half_width_fmas():
    # Zen 1 has AVX2 + FMA, like Zen 3, but runs a 256-bit FMA as two halves on its two
    # 128-bit units: 16 FLOPs per cycle, which only LLVM's CPU name tells apart
    assert report.flops_per_cycle(ZEN3_FLAGS, "x86_64", "znver1")[0] == 16
    assert report.flops_per_cycle(ZEN3_FLAGS, "x86_64", "znver3")[0] == 32
    assert report.derive_peak(ZEN3_FLAGS, 2.3, 2, cpu="znver1").gflops == pytest.approx(2 * 16 * 2.3)


def test_derive_peak_zen3_two_cores():
    peak = report.derive_peak(ZEN3_FLAGS, 2.445402, 2, "x86_64", "test")
    assert peak.gflops == pytest.approx(2 * 32 * 2.445402)
    assert "AVX2+FMA" in peak.how and "2 cores" in peak.how and "156.5" in peak.how


def test_derive_peak_avx512_and_unknown_clock():
    assert report.derive_peak(SKX_FLAGS, 3.0, 4).gflops == pytest.approx(4 * 64 * 3.0)
    unknown = report.derive_peak(ZEN3_FLAGS, None, 2)
    assert unknown.gflops is None and "no clock" in unknown.how


def test_clock_sources_in_order():
    cpuinfo = "processor\t: 0\nmodel name\t: AMD EPYC\ncpu MHz\t\t: 2445.402\n"
    lscpu = "Model name:  AMD EPYC\nCPU max MHz:  3500.0000\nCPU MHz:  2445.402\n"
    assert report.clock_ghz("3500000\n", cpuinfo, lscpu) == (3.5, "cpufreq cpuinfo_max_freq")
    ghz, source = report.clock_ghz(None, cpuinfo, lscpu)
    assert ghz == pytest.approx(2.445402) and "cpu MHz" in source
    ghz, source = report.clock_ghz(None, "model name: x\n", lscpu)
    assert ghz == pytest.approx(3.5) and "CPU max MHz" in source
    assert report.clock_ghz(None, None, None)[0] is None


def test_fma_loop_arithmetic():
    assert report.fma_vector_bytes(ZEN3_FLAGS) == 32
    assert report.fma_vector_bytes(SKX_FLAGS) == 64
    assert report.fma_vector_bytes("sse sse2") == 16
    assert report.fma_vector_bytes("fp asimd", "aarch64") == 16
    # 10 chains x 8 lanes x 2 FLOPs per iteration
    assert report.fma_loop_flops(1_000_000, 32) == pytest.approx(1.6e8)
    # one Zen 3 core at 101.5 GFLOP/s with 32 FLOPs/cycle runs at 3.17 GHz, not the nominal 2.445
    assert report.clock_from_rate(101.5, 32) == pytest.approx(3.172, abs=1e-3)
    assert report.derive_peak(ZEN3_FLAGS, 3.172, 2).gflops == pytest.approx(203.0, abs=0.1)


def test_fma_run_reports_a_shared_core():
    quiet = report.FmaRun(100.0, 0.30, 0.31).describe(32, 32)
    shared = report.FmaRun(100.0, 0.30, 0.90).describe(32, 32)
    assert "256-bit" in quiet and "100.0 GFLOP/s" in quiet and "shared" not in quiet
    assert "the core was shared" in shared


@pytest.mark.skipif(shutil.which("cc") is None, reason="needs a C compiler")
def test_measured_clock_is_plausible():
    # a real measurement (~0.05 s of CPU): the clock of any core this runs on is 0.5-7 GHz,
    # whether or not another process shares the core (the loop is timed by its CPU time)
    from hwcompress.targets import host_arch, host_cpu_features, host_cpu_name

    flags, arch = host_cpu_features(), host_arch()
    run = report.measure_fma(report.fma_vector_bytes(flags, arch), cpu_seconds=0.05)
    assert isinstance(run, report.FmaRun), run
    per_cycle = report.flops_per_cycle(flags, arch, host_cpu_name())[0]
    assert 0.5 < report.clock_from_rate(run.gflops, per_cycle) < 7.0
    assert run.cpu_s >= 0.05 and run.wall_s >= 0.9 * run.cpu_s


def test_gemm_cross_check_format():
    line = report.measure_gemm(1, n=128)
    assert re.fullmatch(r"numpy SGEMM 128x128 on 1 thread\(s\): [\d.]+ GFLOP/s", line), line


# ---------------------------------------------------------------------------- GFLOP/s

def test_gflops_arithmetic():
    # 231.3 MFLOP in 4.138 ms = 55.9 GFLOP/s
    assert report.gflops_per_s(231_286_272, 4.13823236) == pytest.approx(55.89, abs=0.01)
    assert report.gflops_per_s(1e9, 1000.0) == pytest.approx(1.0)
    assert report.gflops_per_s(1e9, None) is None
    assert report.gflops_per_s(1e9, 0.0) is None
    assert report.pct_of_peak(50.0, 200.0) == pytest.approx(25.0)
    assert report.pct_of_peak(50.0, None) is None


# ---------------------------------------------------------------------------- work dir parsing

SCHED_LOG = """\
2026-11-22 10:15:32 [INFO] [task_scheduler.cc:344]
 ID |                           Name |      FLOP | Weight | Speed (GFLOPS) | Latency (us) | Weighted Latency (us) | Trials | Done
----------------------------------------------------------------------------------------------------------------------------------
  0 |              fused_matmul_add9 |   1025000 |      1 |            N/A |          N/A |                   N/A |      0 |
  1 | fused_conv2d10_add7_add8_relu4 | 231286272 |      2 |            N/A |          N/A |                   N/A |      0 |
----------------------------------------------------------------------------------------------------------------------------------
"""


def test_parse_scheduler_table():
    assert report.parse_scheduler_table(SCHED_LOG) == {
        "fused_matmul_add9": (1025000.0, 1),
        "fused_conv2d10_add7_add8_relu4": (231286272.0, 2),
    }


def test_read_records_best_and_failures(tmp_path):
    (tmp_path / "database_workload.json").write_text('["111","x"]\n["222","y"]\n')
    rec = lambda i, secs: json.dumps([i, [[], secs, {}, []]])  # noqa: E731
    (tmp_path / "database_tuning_record.json").write_text(
        "\n".join([rec(0, [0.002, 0.004]), rec(1, [1e10]), rec(0, [0.001]), '[1, [[], [0.5'])  # torn last line
    )
    hashes, runs = report.read_records(tmp_path)
    assert hashes == ["111", "222"]
    assert runs == {0: [pytest.approx(0.003), 0.001], 1: [None]}


# ---------------------------------------------------------------------------- trials to 5%

def test_best_so_far_skips_failures():
    assert eff.best_so_far([None, 3.0, None, 4.0, 2.0, 2.5]) == [None, 3.0, 3.0, 3.0, 2.0, 2.0]
    assert eff.best_so_far([]) == []


def test_trials_to_reach_within_5pct():
    curve = eff.best_so_far([None, 10.0, 8.0, 6.0, 5.2, 5.0])
    best = 5.0
    assert eff.trials_to_reach(curve, 1.05 * best) == 5  # 5.2 <= 5.25
    assert eff.trials_to_reach(curve, 1.0 * best) == 6
    assert eff.trials_to_reach(curve, 4.0) is None
    assert eff.trials_to_reach([None, None], 1.0) is None
    assert eff.trials_to_reach(curve, 100.0) == 2  # the first valid trial


def test_trials_ratio_and_censoring():
    assert eff.trials_ratio(64, 16, 256) == (4.0, "4.00")
    assert eff.trials_ratio(None, 32, 256) == (8.0, ">=8.00")  # random never got there
    assert eff.trials_ratio(16, None, 256) == (16 / 256, "<=0.06")
    assert eff.trials_ratio(None, None, 256) == (None, "-")


def test_task_result_and_summary():
    info = eff.TaskInfo("conv", 1e8, 2)
    xgb = eff.Run("xgb", "x", [4.0, 3.0, 1.0, 1.0])
    rnd = eff.Run("random", "r", [None, 2.0, 2.0, 1.04])
    res = eff.TaskResult(info, {"xgb": xgb, "random": rnd}, 4)
    assert res.best_ms == 1.0
    assert res.trials_to_5pct("xgb") == 3 and res.trials_to_5pct("random") == 4
    assert res.ratio()[0] == pytest.approx(4 / 3)
    agg = eff.summary([res], 4)
    assert agg["xgb_trials_to_5pct_sum"] == 3 and agg["random_trials_to_5pct_sum"] == 4
    assert agg["xgb_weighted_best_ms"] == pytest.approx(2.0)
    assert agg["random_weighted_best_ms"] == pytest.approx(2.08)
    assert agg["xgb_fewer_trials_tasks"] == 1
    assert eff.geomean([2.0, 8.0]) == pytest.approx(4.0)


def test_partial_results_saved_and_reported(tmp_path):
    # an interrupted run: task "a" finished by both methods, task "b" stopped during xgb
    done = eff.TaskResult(eff.TaskInfo("a", 1e8, 1), {"xgb": eff.Run("xgb", "x", [3.0, 1.0]),
                                                     "random": eff.Run("random", "r", [2.0, 2.0])}, 2)
    partial = eff.TaskResult(eff.TaskInfo("b", 2e8, 2), {"xgb": eff.Run("xgb", "x", [5.0], partial=True)}, 2)
    meta = {"model": "m", "target": "host", "tasks": 2, "trials": 2, "per_iter": 64, "population": 512, "seed": 0}
    agg = eff.save(tmp_path, meta, [done, partial])
    assert agg["tasks"] == 1 and agg["xgb_trials_to_5pct_sum"] == 2 and agg["random_trials_to_5pct_sum"] == 2
    assert not partial.complete and partial.trials_to_5pct("random") is None
    meta2, results = eff.load(tmp_path)
    assert meta2 == meta
    assert [r.complete for r in results] == [True, False]
    assert results[1].runs["xgb"].latencies_ms == [5.0] and results[1].runs["xgb"].partial
    table = eff.markdown(results, eff.summary(results, 2), meta2)
    assert "(1 trials so far)" in table and "(not run)" in table and "all 1 finished" in table
    assert (tmp_path / "curves.csv").read_text().count("\n") == 1 + 4 + 1


def test_combined_report_over_seeds():
    def run(seed, xgb, rnd):
        res = eff.TaskResult(eff.TaskInfo("a", 1e8, 1), {"xgb": eff.Run("xgb", "x", xgb), "random": eff.Run("random", "r", rnd)}, 2)
        return {"model": "m", "target": "host", "tasks": 1, "trials": 2, "per_iter": 32, "population": 128, "seed": seed}, [res]

    # seed 0: xgb 1 trial to 5%, random 2; seed 1: random never gets within 5% (counted as the budget, 2)
    text = eff.combined_report([run(0, [1.0, 1.0], [2.0, 1.0]), run(1, [1.0, 1.0], [2.0, 2.0])])
    assert text.count("| **all 1 finished**") == 2
    assert "All 2 runs (seeds 0, 1), 2 finished (task, seed) pairs" in text
    assert "xgb 2 (0 never), random 4 (1 never)" in text and "random / xgb 2.00 (sum)" in text
    assert eff.combined_report([run(0, [1.0, 1.0], [2.0, 1.0])]).count("All ") == 0  # one run: its table alone
    with pytest.raises(SystemExit, match="different trial budgets"):
        meta, res = run(1, [1.0, 1.0], [2.0, 2.0])
        eff.combined_report([run(0, [1.0, 1.0], [2.0, 1.0]), ({**meta, "trials": 3}, res)])
