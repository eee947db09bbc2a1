"""``tools/bench_sparse_ceiling.py``: its C loops compute what a scalar reference computes (the
tool refuses to report rates otherwise), on AVX-512 hosts; elsewhere one error line, exit 2."""

from __future__ import annotations

import re
import shutil

import pytest
from tool_modules import load_tool

ceiling = load_tool("bench_sparse_ceiling")


@pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc")
def test_ceiling_loops_are_checked_then_timed(capsys):
    rc = ceiling.main(["--rounds", "1"])
    out, err = capsys.readouterr()
    if "avx512f" not in ceiling.host_flags():
        assert rc == 2 and err.strip() == "error: this host has no AVX-512 (avx512f): these loops are AVX-512 only"
        return
    assert rc == 0, err
    rows = re.findall(r"^\| (\w+) \| [\d.]+ \| [\d.]+ \| ([\d.]+)x \|$", out, re.M)
    assert [name for name, _ in rows] == ["fma", "rows_offsets", "rows_decode", "pairs", "permute"]
    assert dict(rows)["fma"] == "1.00"


def test_ceiling_rejects_bad_rounds(capsys):
    assert ceiling.main(["--rounds", "0"]) == 2
    assert capsys.readouterr().err.strip() == "error: --rounds must be 1..64, got 0"
