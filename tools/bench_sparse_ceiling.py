"""What this CPU's core does with 2:4 sparse GEMM inner loops, outside TVM: how fast each
kernel form of ``backends.cpu_sparse`` runs in a plain hand-written loop, to tell a kernel
that codegen can still improve from one near what the machine gives (measured loops, not a
proof of a bound: a better loop may exist).

    .venv/bin/python tools/bench_sparse_ceiling.py               # AVX-512 hosts (gcc -march=x86-64-v4)
    .venv/bin/python tools/bench_sparse_ceiling.py --rounds 9

Hand-written C (AVX-512 intrinsics, ``gcc -O3``), one thread, every operand in L1, 16-lane
FMAs. Each loop is timed in alternating rounds (median); the table gives its FMA instructions
per second and its *useful* multiply-adds against the ``fma`` loop's (dense: every lane of
every FMA is a multiply-add a dense GEMM needs), so a 2:4 form at ratio 1.0 matches dense and
2.0 is the most 2:4 can give (half the multiply-adds):

* ``fma``: 4 rows x 4 columns of accumulators, register operands only (a dense GEMM tile's
  inner loop: the core's FMA rate).
* ``rows_offsets``: per-row 2:4 as ``cpu_sparse``'s ``BROADCAST`` kernel does it, one
  broadcast kept weight times the ``x`` row (``xt``, 16-lane vectors) its position selects,
  each FMA with its own load; positions precomputed as offsets (no decode).
* ``rows_decode``: the same, decoding the 2-bit positions in the loop (hwc's kernel).
* ``pairs``: rows ``2i``, ``2i + 1`` keep the same positions (``Sparse24.pairs``): one ``x``
  load feeds both rows' FMAs.
* ``permute``: ``x`` stationary in registers (32 ``k`` per pixel), each row's 16 kept values
  carry their positions in their low mantissa bits and ``vpermt2ps`` gathers the ``x`` under
  them (the m = 1 ``LANES`` idea with a 32-entry table).

Every loop's result is checked against a scalar reference first (relative error < 1e-4).
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

C_SOURCE = r"""
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define R 4   /* rows (output channels) per tile */
#define MV 3  /* 16-lane vectors of m (xt columns) per row */
#define W (16 * MV)
#define KB 128 /* reduction chunk: xt is KB x W floats (24 KB, L1) */
#define P 4   /* fma / permute: columns (pixels) per tile */
#define KP 1024

static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + 1e-9 * t.tv_nsec; }

static float xt[KB * W] __attribute__((aligned(64)));
static float wv[R * KB / 2] __attribute__((aligned(64)));   /* kept values, row-major */
static int32_t off[R * KB / 2] __attribute__((aligned(64))); /* their xt row offsets */
static uint8_t meta[R * KB / 8];                             /* 2-bit positions, 4 per byte */
static float xp[P * KP] __attribute__((aligned(64)));       /* fma / permute: x of P pixels */
static float wd[R * KP] __attribute__((aligned(64)));       /* fma: dense rows */
static float wp[R * KP / 2] __attribute__((aligned(64)));   /* permute: values, index in low 5 bits */
#define YN (R * W > R * P * 16 ? R * W : R * P * 16)
static float y[YN] __attribute__((aligned(64)));
static double ref[YN];

__attribute__((noinline)) static void rows_offsets(long iters) {
  for (long it = 0; it < iters; it++) {
    __m512 acc[R][MV];
    for (int r = 0; r < R; r++) for (int j = 0; j < MV; j++) acc[r][j] = _mm512_setzero_ps();
    for (int q = 0; q < KB / 2; q++)
      for (int r = 0; r < R; r++) {
        __m512 b = _mm512_set1_ps(wv[r * (KB / 2) + q]);
        const float *x = xt + off[r * (KB / 2) + q];
        for (int j = 0; j < MV; j++) acc[r][j] = _mm512_fmadd_ps(b, _mm512_loadu_ps(x + 16 * j), acc[r][j]);
      }
    for (int r = 0; r < R; r++) for (int j = 0; j < MV; j++) _mm512_storeu_ps(y + r * W + 16 * j, _mm512_add_ps(acc[r][j], _mm512_loadu_ps(y + r * W + 16 * j)));
  }
}

__attribute__((noinline)) static void rows_decode(long iters) {
  for (long it = 0; it < iters; it++) {
    __m512 acc[R][MV];
    for (int r = 0; r < R; r++) for (int j = 0; j < MV; j++) acc[r][j] = _mm512_setzero_ps();
    for (int b8 = 0; b8 < KB / 8; b8++)
      for (int r = 0; r < R; r++) {
        unsigned mb = meta[r * (KB / 8) + b8];
#pragma GCC unroll 4
        for (int u = 0; u < 4; u++) {
          __m512 b = _mm512_set1_ps(wv[r * (KB / 2) + 4 * b8 + u]);
          const float *x = xt + (8 * b8 + 4 * (u / 2) + ((mb >> (2 * u)) & 3)) * W;
          for (int j = 0; j < MV; j++) acc[r][j] = _mm512_fmadd_ps(b, _mm512_loadu_ps(x + 16 * j), acc[r][j]);
        }
      }
    for (int r = 0; r < R; r++) for (int j = 0; j < MV; j++) _mm512_storeu_ps(y + r * W + 16 * j, _mm512_add_ps(acc[r][j], _mm512_loadu_ps(y + r * W + 16 * j)));
  }
}

/* rows 2i, 2i + 1 use row 2i's positions (meta of the even rows; the reference does the same) */
__attribute__((noinline)) static void pairs(long iters) {
  for (long it = 0; it < iters; it++) {
    __m512 acc[R][MV];
    for (int r = 0; r < R; r++) for (int j = 0; j < MV; j++) acc[r][j] = _mm512_setzero_ps();
    for (int b8 = 0; b8 < KB / 8; b8++)
      for (int p2 = 0; p2 < R / 2; p2++) {
        unsigned mb = meta[2 * p2 * (KB / 8) + b8];
#pragma GCC unroll 4
        for (int u = 0; u < 4; u++) {
          __m512 b0 = _mm512_set1_ps(wv[2 * p2 * (KB / 2) + 4 * b8 + u]);
          __m512 b1 = _mm512_set1_ps(wv[(2 * p2 + 1) * (KB / 2) + 4 * b8 + u]);
          const float *x = xt + (8 * b8 + 4 * (u / 2) + ((mb >> (2 * u)) & 3)) * W;
          for (int j = 0; j < MV; j++) {
            __m512 xv = _mm512_loadu_ps(x + 16 * j);
            acc[2 * p2][j] = _mm512_fmadd_ps(b0, xv, acc[2 * p2][j]);
            acc[2 * p2 + 1][j] = _mm512_fmadd_ps(b1, xv, acc[2 * p2 + 1][j]);
          }
        }
      }
    for (int r = 0; r < R; r++) for (int j = 0; j < MV; j++) _mm512_storeu_ps(y + r * W + 16 * j, _mm512_add_ps(acc[r][j], _mm512_loadu_ps(y + r * W + 16 * j)));
  }
}

__attribute__((noinline)) static void dense_fma(long iters) {
  for (long it = 0; it < iters; it++) {
    __m512 acc[R][P];
    for (int r = 0; r < R; r++) for (int p = 0; p < P; p++) acc[r][p] = _mm512_setzero_ps();
    for (int c = 0; c < KP / 16; c++) {
      __m512 xv[P];
      for (int p = 0; p < P; p++) xv[p] = _mm512_load_ps(xp + p * KP + 16 * c);
      for (int r = 0; r < R; r++) {
        __m512 w = _mm512_load_ps(wd + r * KP + 16 * c);
        for (int p = 0; p < P; p++) acc[r][p] = _mm512_fmadd_ps(w, xv[p], acc[r][p]);
      }
    }
    for (int r = 0; r < R; r++) for (int p = 0; p < P; p++) _mm512_storeu_ps(y + (r * P + p) * 16, _mm512_add_ps(acc[r][p], _mm512_loadu_ps(y + (r * P + p) * 16)));
  }
}

__attribute__((noinline)) static void permute(long iters) {
  for (long it = 0; it < iters; it++) {
    __m512 acc[R][P];
    for (int r = 0; r < R; r++) for (int p = 0; p < P; p++) acc[r][p] = _mm512_setzero_ps();
    for (int c = 0; c < KP / 32; c++) {
      __m512 lo[P], hi[P];
      for (int p = 0; p < P; p++) { lo[p] = _mm512_load_ps(xp + p * KP + 32 * c); hi[p] = _mm512_load_ps(xp + p * KP + 32 * c + 16); }
      for (int r = 0; r < R; r++) {
        __m512 w = _mm512_load_ps(wp + r * (KP / 2) + 16 * c);
        __m512i idx = _mm512_castps_si512(w);
        for (int p = 0; p < P; p++) acc[r][p] = _mm512_fmadd_ps(w, _mm512_permutex2var_ps(lo[p], idx, hi[p]), acc[r][p]);
      }
    }
    for (int r = 0; r < R; r++) for (int p = 0; p < P; p++) _mm512_storeu_ps(y + (r * P + p) * 16, _mm512_add_ps(acc[r][p], _mm512_loadu_ps(y + (r * P + p) * 16)));
  }
}

static int pos_of(int r, int q) { int b8 = q / 4, u = q % 4; return 8 * b8 + 4 * (u / 2) + ((meta[r * (KB / 8) + b8] >> (2 * u)) & 3); }

static void reference(int kind) { /* 0: rows, 1: pairs, 2: fma, 3: permute; one iteration */
  memset(ref, 0, sizeof ref);
  for (int r = 0; r < R; r++) {
    if (kind <= 1)
      for (int q = 0; q < KB / 2; q++) for (int l = 0; l < W; l++) ref[r * W + l] += (double)wv[r * (KB / 2) + q] * xt[pos_of(kind ? r - r % 2 : r, q) * W + l];
    else
      for (int p = 0; p < P; p++) for (int l = 0; l < 16; l++)
        for (int c = 0; c < KP / (kind == 2 ? 16 : 32); c++) {
          if (kind == 2) ref[(r * P + p) * 16 + l] += (double)wd[r * KP + 16 * c + l] * xp[p * KP + 16 * c + l];
          else { float w = wp[r * (KP / 2) + 16 * c + l]; uint32_t u; memcpy(&u, &w, 4);
                 ref[(r * P + p) * 16 + l] += (double)w * xp[p * KP + 32 * c + (u & 31)]; }
        }
  }
}

static double check(void (*f)(long), int kind) {
  memset(y, 0, sizeof y); f(1); reference(kind);
  double e = 0, s = 0; int n = kind <= 1 ? R * W : R * P * 16;
  for (int i = 0; i < n; i++) { e = fmax(e, fabs(y[i] - ref[i])); s = fmax(s, fabs(ref[i])); }
  return e / s;
}

static int cmp(const void *a, const void *b) { double d = *(const double *)a - *(const double *)b; return (d > 0) - (d < 0); }

int main(int argc, char **argv) {
  int rounds = argc > 1 ? atoi(argv[1]) : 7;
  srand(1);
  for (int i = 0; i < KB * W; i++) xt[i] = (float)rand() / RAND_MAX - 0.5f;
  for (int i = 0; i < R * KB / 2; i++) wv[i] = (float)rand() / RAND_MAX - 0.5f;
  for (int i = 0; i < R * KB / 8; i++) meta[i] = (rand() % 2) | (2 + rand() % 2) << 2 | (rand() % 2) << 4 | (2 + rand() % 2) << 6;
  for (int r = 0; r < R; r++) for (int q = 0; q < KB / 2; q++) off[r * (KB / 2) + q] = pos_of(r, q) * W;
  for (int i = 0; i < P * KP; i++) xp[i] = (float)rand() / RAND_MAX - 0.5f;
  for (int i = 0; i < R * KP; i++) wd[i] = (float)rand() / RAND_MAX - 0.5f;
  for (int i = 0; i < R * KP / 2; i++) {
    float w = (float)rand() / RAND_MAX - 0.5f; uint32_t u; memcpy(&u, &w, 4);
    int l = i % 16, g = l / 2; /* kept value l of a 32-k chunk: group g, position 0-1 or 2-3 */
    u = (u & ~31u) | (4 * g + (l % 2 ? 2 + rand() % 2 : rand() % 2)); memcpy(&wp[i], &u, 4);
  }
  struct { const char *name; void (*f)(long); int kind; double fmas, useful; } k[] = {
    {"fma", dense_fma, 2, (double)(KP / 16) * R * P, 16.0 * (KP / 16) * R * P},
    {"rows_offsets", rows_offsets, 0, (double)(KB / 2) * R * MV, 2 * 16.0 * (KB / 2) * R * MV},
    {"rows_decode", rows_decode, 0, (double)(KB / 2) * R * MV, 2 * 16.0 * (KB / 2) * R * MV},
    {"pairs", pairs, 1, (double)(KB / 2) * R * MV, 2 * 16.0 * (KB / 2) * R * MV},
    {"permute", permute, 3, (double)(KP / 32) * R * P, 2 * 16.0 * (KP / 32) * R * P},
  };
  int nk = sizeof k / sizeof k[0];
  for (int i = 0; i < nk; i++) printf("check %s %.3e\n", k[i].name, check(k[i].f, k[i].kind));
  double t[8][64];
  for (int round = 0; round < rounds; round++)
    for (int i = 0; i < nk; i++) {
      long iters = (long)(1e8 / k[i].fmas);
      double t0 = now(); k[i].f(iters); t[i][round] = (now() - t0) / iters;
    }
  for (int i = 0; i < nk; i++) {
    qsort(t[i], rounds, sizeof(double), cmp);
    double s = t[i][rounds / 2];
    printf("rate %s %.4f %.4f\n", k[i].name, k[i].fmas / s / 1e9, k[i].useful / s / 1e9);
  }
  return y[0] == 12345.0f; /* keep y live */
}
"""


def host_flags() -> set[str]:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=7, help="alternating timing rounds (median), at most 64")
    args = ap.parse_args(argv)
    if not 1 <= args.rounds <= 64:
        print(f"error: --rounds must be 1..64, got {args.rounds}", file=sys.stderr)
        return 2
    if "avx512f" not in host_flags():
        print("error: this host has no AVX-512 (avx512f): these loops are AVX-512 only", file=sys.stderr)
        return 2
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        print("error: no C compiler (gcc) on PATH", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        src, exe = Path(tmp) / "ceiling.c", Path(tmp) / "ceiling"
        src.write_text(C_SOURCE)
        subprocess.run([cc, "-O3", "-funroll-all-loops", "-march=x86-64-v4", str(src), "-o", str(exe), "-lm"], check=True)
        out = subprocess.run(["taskset", "-c", "0", str(exe), str(args.rounds)], capture_output=True, text=True).stdout
    checks = dict((m[1], float(m[2])) for m in re.finditer(r"check (\w+) (\S+)", out))
    bad = {name: err for name, err in checks.items() if not err < 1e-4}
    if bad or not checks:
        print(f"error: a loop computes the wrong result: {bad or out!r}", file=sys.stderr)
        return 1
    rates = {m[1]: (float(m[2]), float(m[3])) for m in re.finditer(r"rate (\w+) (\S+) (\S+)", out)}
    base = rates["fma"][1]
    print("| loop | G FMA instructions/s | useful G multiply-adds/s | over fma (dense) |")
    print("|---|---:|---:|---:|")
    for name, (fmas, useful) in rates.items():
        print(f"| {name} | {fmas:.2f} | {useful:.1f} | {useful / base:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
