"""Innermost loops of x86 assembly text, for tests that check what a kernel's hot loop does."""

from __future__ import annotations

import re


def fma_loops(asm: str, min_fmas: int = 6) -> list[list[str]]:
    """Innermost loops (a backward jump to a label, no other backward jump inside) of x86
    assembly text that contain at least ``min_fmas`` vector FMAs, as their instruction lines."""
    lines = asm.splitlines()
    label_at = {m.group(1): i for i, line in enumerate(lines) if (m := re.match(r"^(\.?\w+):", line))}
    loops = []
    for i, line in enumerate(lines):
        m = re.match(r"\s+j\w+\s+(\.?\w+)", line)
        if m and label_at.get(m.group(1), i) < i:
            loops.append((label_at[m.group(1)], i))
    innermost = [(a, b) for a, b in loops if not any((c, d) != (a, b) and a <= c and d <= b for c, d in loops)]
    return [lines[a : b + 1] for a, b in innermost if sum("vfmadd" in x for x in lines[a : b + 1]) >= min_fmas]


def vector_stores(body: list[str]) -> list[str]:
    """The vector moves to memory (AT&T syntax: the destination operand last) in ``body``."""
    return [x for x in body if x.strip().startswith("vmov") and "(" in x.split(",")[-1]]
