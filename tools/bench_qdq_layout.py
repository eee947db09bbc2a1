"""Imported QDQ models through the NHWC layout pass, with and without its quantize / dequantize split.

    taskset -c 0 env TVM_NUM_THREADS=1 .venv/bin/python tools/bench_qdq_layout.py --rounds 15 --reps 10
    .venv/bin/python tools/bench_qdq_layout.py --models small_cnn --rounds 0     # structure only

Models: ``tools/zoo.py``'s small CNN (32x32) and ResNet-18 (224x224), batch 1, through ONNX
Runtime's ``quant_pre_process`` (BN folded into the convs) and ``quantize_static`` (QDQ,
per-channel int8 weights, uint8 activations, MinMax on 8 random inputs), written to a
temporary folder. Each is built the way ``hwc build`` builds it for the host
(``api.import_model``, ``build.legalize`` / ``schedule`` / ``build``) twice:

* ``split``: as the layout pass is (``passes/layout_qdq.py``: ``quantize`` / ``dequantize``
  split into elementwise ops around ``ConvertLayout``, the zero-point pad moved inside);
* ``no split``: the same with those rewrites switched off, i.e. the layout pass before them
  (a transpose on each side of every integer conv).

Per model: ``permute_dims`` in ``main`` after the recipe, kernels and transpose kernels after
``legalize``, integer conv kernels with the requantization in their epilogue, whether the
outputs are bit-equal, and (``--rounds`` > 0) latency medians, interleaved round by round,
with the ratio split / no split (< 1: faster).
"""

from __future__ import annotations

import argparse
import contextlib
import re
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))
from benchlib import interleaved_times  # noqa: E402

SIZES = {"small_cnn": 32, "resnet18": 224}


def qdq_model(name: str, folder: Path) -> Path:
    """``name`` from the zoo, batch 1, pre-processed and quantized by ONNX Runtime (QDQ)."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    import zoo

    size = SIZES[name]
    model = getattr(zoo, name)(input_size=size)
    for value in (*model.graph.input, *model.graph.output):
        value.type.tensor_type.shape.dim[0].dim_value = 1
    fp32, pre, out = (folder / f"{name}{suffix}.onnx" for suffix in ("", "_pre", "_qdq"))
    onnx.save(model, str(fp32))
    quant_pre_process(str(fp32), str(pre))
    calib = np.random.default_rng(0).standard_normal((8, 1, 3, size, size)).astype(np.float32)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter(calib)

        def get_next(self):
            x = next(self.batches, None)
            return None if x is None else {"input": x}

    quantize_static(
        str(pre), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
    )  # fmt: skip
    return out


@contextlib.contextmanager
def no_split():
    """The layout pass without ``layout_qdq``'s rewrites (each rewriter returns its match)."""
    from hwcompress.passes import layout_qdq

    names = ("quantize_split", "dequantize_split", "pad_through_transposes")
    saved = {n: getattr(layout_qdq, n) for n in names}

    def inert(make):
        return lambda: (make()[0], lambda call, _m: call)

    try:
        for n in names:
            setattr(layout_qdq, n, inert(saved[n]))
        yield
    finally:
        for n, f in saved.items():
            setattr(layout_qdq, n, f)


def build(path: Path):
    """(facts, VM) of the host build of ``path``."""
    import tvm
    from tvm import relax

    from hwcompress import build as B
    from hwcompress.api import import_model
    from hwcompress.targets import load_target

    spec = load_target("host")
    mod = import_model(str(path), spec).mod
    ops = [b.value.op.name for blk in mod["main"].body.blocks for b in blk.bindings
           if isinstance(b.value, relax.Call) and isinstance(b.value.op, tvm.ir.Op)]  # fmt: skip
    legal = B.legalize(mod, spec)
    kernels = []

    def visit(e):
        if isinstance(e, relax.Call) and isinstance(e.op, tvm.ir.Op) and e.op.name == "relax.call_tir":
            kernels.append(re.sub(r"\d+$", "", e.args[0].name_hint))

    relax.analysis.post_order_visit(legal["main"].body, visit)
    facts = {
        "permute_dims": ops.count("relax.permute_dims"),
        "kernels": len(kernels),
        "transpose kernels": sum("transpose" in k for k in kernels),
        "int8 convs with requantization": sum("conv2d_int8" in k and "dequantize" in k for k in kernels),
    }
    vm = relax.VirtualMachine(B.build(B.schedule(legal, spec), spec), tvm.cpu())
    return facts, vm


def main(argv=None) -> int:
    import tvm

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="small_cnn,resnet18", help=f"comma-separated subset of {','.join(SIZES)}")
    ap.add_argument("--rounds", type=int, default=9, help="timing rounds (0: no timing)")
    ap.add_argument("--reps", type=int, default=5, help="runs per round")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            path = qdq_model(name, Path(tmp))
            with no_split():
                before, vm_before = build(path)
            after, vm_after = build(path)
            xs = np.random.default_rng(5).standard_normal((3, 1, 3, SIZES[name], SIZES[name])).astype(np.float32)
            same = all(
                np.array_equal(vm_before["main"](tvm.runtime.tensor(x)).numpy(), vm_after["main"](tvm.runtime.tensor(x)).numpy())
                for x in xs
            )
            print(f"{name}: no split {before}")
            print(f"{name}: split    {after}")
            print(f"{name}: outputs bit-equal on {len(xs)} inputs: {same}")
            if args.rounds > 0:
                x = tvm.runtime.tensor(xs[0])
                runners = {"no split": lambda: vm_before["main"](x), "split": lambda: vm_after["main"](x)}
                times = interleaved_times(runners, args.rounds, args.reps)
                med = {k: statistics.median(v) for k, v in times.items()}
                ratios = [a / b for a, b in zip(times["split"], times["no split"])]
                print(f"{name}: no split {med['no split'] * 1e3:.2f} ms, split {med['split'] * 1e3:.2f} ms, "
                      f"ratio of medians {med['split'] / med['no split']:.3f}, median per-round ratio "
                      f"{statistics.median(ratios):.3f}")  # fmt: skip
            sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
