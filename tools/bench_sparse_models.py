"""Whole models: the dense build against the ``--sparse-2-4`` builds, timed interleaved in one
process (two threads unless ``TVM_NUM_THREADS`` says otherwise).

    .venv/bin/python tools/bench_sparse_models.py                          # mlp, resnet18, mobilenet_v2
    .venv/bin/python tools/bench_sparse_models.py --models mlp --timings auto,warm --rounds 15
    .venv/bin/python tools/bench_sparse_models.py --models model.onnx --input-shape input=1,3,224,224
    TVM_NUM_THREADS=1 taskset -c 1 .venv/bin/python tools/bench_sparse_models.py --models mlp
    .venv/bin/python tools/bench_sparse_models.py --models mobilenet_v2 --pairs   # + Sparse24(pairs=True)

Per model, host builds made as ``hwc build`` makes them: dense; ``--sparse-2-4`` (the
measured per-layer decision: a layer goes sparse where its sparse kernel timed >= 5% faster;
timed cold when the model's weights exceed the last-level cache, or as ``--timings`` says:
one build each, e.g. ``--timings auto,warm``); and every eligible layer 2:4
(``decide="all"``, what a decision-free tool would do). Printed: per build the latency
(median of the rounds), dense over it (medians, and the fastest rounds: noise only adds
time), and for measured builds the layers made sparse and
how they were timed. The sparse builds compute a pruned model: their outputs are not the dense one's.

``mlp``: a batch-1 MLP 2048-2048-2048-1024-1000 with ReLUs (random weights, 46 MB: the layer
sizes issue 7 names); ``resnet18`` / ``resnet50`` / ``mobilenet_v2``: ``tools/zoo.py``'s, 224x224,
batch 1 (``resnet50``: the 1x1 convs issue 7 names, not in the default list: its builds take
minutes).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

MLP_WIDTHS = (2048, 2048, 2048, 1024, 1000)


def mlp(widths=MLP_WIDTHS, seed: int = 0):
    """ONNX MLP ``input [1, widths[0]] -> output [1, widths[-1]]``: MatMul + ReLU between."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    nodes, inits, prev = [], [], "input"
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        inits.append(numpy_helper.from_array((rng.standard_normal((a, b)) / np.sqrt(a)).astype(np.float32), f"w{i}"))
        last = i == len(widths) - 2
        nodes.append(helper.make_node("MatMul", [prev, f"w{i}"], ["output" if last else f"mm{i}"]))
        if not last:
            nodes.append(helper.make_node("Relu", [f"mm{i}"], [f"h{i}"]))
            prev = f"h{i}"
    graph = helper.make_graph(
        nodes, "mlp", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, widths[0]])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, widths[-1]])], inits,
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def model_path(name: str, tmp: Path) -> tuple[Path, dict]:
    """The ONNX file and input shapes of a named model (or of an ONNX path)."""
    import onnx

    if name == "mlp":
        path = tmp / "mlp.onnx"
        onnx.save(mlp(), path)
        return path, {"input": [1, MLP_WIDTHS[0]]}
    if name in ("resnet18", "resnet50", "mobilenet_v2"):
        import zoo

        return zoo.save(zoo.MODELS[name](), tmp / f"{name}.onnx"), {"input": [1, 3, 224, 224]}
    return Path(name), {}


def builds(path: Path, shapes: dict, timings: list[str], pairs: bool = False) -> tuple[dict, dict]:
    """Host VMs of the dense build, a measured 2:4 build per ``Sparse24.timing`` in
    ``timings`` and the every-layer 2:4 build (``pairs``: the same again with
    ``Sparse24(pairs=True)``); the measured builds' sparsity reports."""
    import tvm

    from hwcompress import build as B
    from hwcompress.api import import_model
    from hwcompress.passes import Sparse24
    from hwcompress.passes.sparsity import sparsity_report
    from hwcompress.recipe import Recipe
    from hwcompress.targets import load_target

    spec = load_target("host")
    recipes = {"dense": None}
    for kind, kw in (("2:4", {}),) + ((("2:4 pairs", {"pairs": True}),) if pairs else ()):
        recipes |= {f"{kind} measured ({t})": Recipe((Sparse24(timing=t, **kw),)) for t in timings}
        recipes[f"{kind} all"] = Recipe((Sparse24(decide="all", **kw),))
    vms, reports = {}, {}
    for name, recipe in recipes.items():
        front = import_model(str(path), spec, shapes, recipe=recipe)
        if "measured" in name:
            reports[name] = sparsity_report(front.mod)
        vms[name] = tvm.relax.VirtualMachine(B.build(B.schedule(B.legalize(front.mod, spec), spec), spec), tvm.cpu())
        print(f"  built {name}", file=sys.stderr, flush=True)
    return vms, reports


def bench(name: str, shapes: dict, timings: list[str], rounds: int, reps: int, tmp: Path, pairs: bool = False) -> dict:
    import tvm

    from benchlib import interleaved_times

    path, default_shapes = model_path(name, tmp)
    shapes = shapes or default_shapes
    if len(shapes) != 1:
        raise SystemExit(f"{name}: give its one input's shape, --input-shape NAME=D1,D2,...")
    vms, reports = builds(path, shapes, timings, pairs)
    x = tvm.runtime.tensor(np.random.default_rng(0).standard_normal(next(iter(shapes.values()))).astype(np.float32))
    t = interleaved_times({k: (lambda vm=vm: vm["main"](x)) for k, vm in vms.items()}, rounds, reps)
    chosen = {
        k: {"sparse": [r["layer"] for r in rep["layers"] if r.get("sparse")], "measured": sum("dense_ms" in r for r in rep["layers"]),
            "regime": (rep.get("timing") or {}).get("regime", "-")}
        for k, rep in reports.items()
    }  # fmt: skip
    return {"model": name, "ms": {k: float(np.median(v)) * 1e3 for k, v in t.items()}, "best_ms": {k: min(v) * 1e3 for k, v in t.items()}, "chosen": chosen}


def table(rows: list[dict]) -> str:
    lines = ["| model | build | ms | dense / build | fastest rounds | layers sparse | timed |", "|---|---|---:|---:|---:|---|---|"]
    for r in rows:
        for build, ms in r["ms"].items():
            c = r["chosen"].get(build)
            layers = f"{len(c['sparse'])} of {c['measured']} measured ({', '.join(c['sparse']) or 'none'})" if c else ("all eligible" if build.endswith(" all") else "")
            best = r["best_ms"]["dense"] / r["best_ms"][build]
            lines.append(f"| {r['model']} | {build} | {ms:.3f} | {r['ms']['dense'] / ms:.2f}x | {best:.2f}x | {layers} | {c['regime'] if c else ''} |")
    return "\n".join(lines)


def _shapes(specs: list[str]) -> dict:
    out = {}
    for s in specs:
        name, _, dims = s.partition("=")
        out[name] = [int(d) for d in dims.split(",")]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="mlp,resnet18,mobilenet_v2", help="mlp, resnet18, resnet50, mobilenet_v2 or ONNX paths")
    ap.add_argument("--input-shape", action="append", default=[], help="NAME=D1,D2,... (ONNX paths)")
    ap.add_argument("--timings", default="auto", help="Sparse24.timing of the measured builds, comma-separated (auto, warm, cold)")
    ap.add_argument("--rounds", type=int, default=10, help="interleaved timing rounds")
    ap.add_argument("--reps", type=int, default=10, help="runs per round")
    ap.add_argument("--pairs", action="store_true", help="also the builds with Sparse24(pairs=True) (output-channel pairs share positions)")
    args = ap.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            print(f"{name}:", file=sys.stderr, flush=True)
            rows.append(bench(name, _shapes(args.input_shape), args.timings.split(","), args.rounds, args.reps, Path(tmp), args.pairs))
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
