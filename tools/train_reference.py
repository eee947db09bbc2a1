#!/usr/bin/env python
"""Train the reference Fashion-MNIST classifier and export it to ONNX.

Produces ``examples/fashion_resnet.onnx`` (dynamic batch dim ``N``, input ``input``
float32 [N,1,28,28], output ``logits`` [N,10]) and ``examples/fashion_resnet.json``
(metadata: accuracy, normalization, seed, timings).

Needs PyTorch (CPU) -- a *tools-only* dependency, see requirements-tools.txt;
the hwcompress package itself never imports torch::

    .venv/bin/pip install -r requirements-tools.txt
    .venv/bin/python tools/train_reference.py

Data: Debian's ``dataset-fashion-mnist`` (IDX files, read by tools/datasets.py).
Runs deterministically: fixed seeds, ``torch.use_deterministic_algorithms(True)``,
2 intra-op threads.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import datasets  # noqa: E402  (tools/datasets.py)

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        idt = x if self.shortcut is None else self.shortcut(x)
        return F.relu(out + idt)


class FashionResNet(nn.Module):
    """Small ResNet: stem 3x3 conv, 3 stages of basic blocks (16/32/64 ch), GAP, Linear."""

    def __init__(self, widths=(16, 32, 64), blocks=(1, 1, 1), num_classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU())
        layers = []
        cin = widths[0]
        for i, (w, n) in enumerate(zip(widths, blocks)):
            for j in range(n):
                layers.append(BasicBlock(cin, w, 2 if (i > 0 and j == 0) else 1))
                cin = w
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        # zero-init the last BN of each residual branch: each block starts as identity
        for m in self.modules():
            if isinstance(m, BasicBlock):
                nn.init.zeros_(m.bn2.weight)

    def forward(self, x):
        x = self.layers(self.stem(x))
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return self.fc(x)


def set_determinism(seed: int, threads: int) -> None:
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.manual_seed(seed)
    np.random.seed(seed)
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 1000) -> float:
    model.eval()
    correct = 0
    for i in range(0, x.shape[0], batch):
        correct += (model(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum().item()
    return correct / x.shape[0]


def ort_accuracy(path: Path, x: np.ndarray, y: np.ndarray, batch: int = 1000) -> float:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    correct = 0
    for i in range(0, x.shape[0], batch):
        logits = sess.run(["logits"], {"input": x[i:i + batch]})[0]
        correct += int((logits.argmax(1) == y[i:i + batch]).sum())
    return correct / x.shape[0]


def export_onnx(model: nn.Module, path: Path, dynamic_batch: bool) -> None:
    """Export with the TorchScript exporter (dynamo=False: onnxscript is not needed)."""
    import onnx

    model.eval()
    dummy = torch.zeros(1, 1, 28, 28)
    kwargs = dict(
        input_names=["input"],
        output_names=["logits"],
        opset_version=17,
        do_constant_folding=True,
        dynamo=False,
    )
    if dynamic_batch:
        kwargs["dynamic_axes"] = {"input": {0: "N"}, "logits": {0: "N"}}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(model, (dummy,), str(path), **kwargs)
    m = onnx.load(str(path))
    # onnxruntime refuses IR versions newer than it knows; opset 17 only needs IR 8
    if m.ir_version > 8:
        m.ir_version = 8
    m.producer_name = "hwcompress-tools/train_reference.py"
    m.doc_string = (
        "Small ResNet trained on Fashion-MNIST. input: float32 [N,1,28,28], "
        f"(pixel/255 - {datasets.FASHION_MNIST_MEAN}) / {datasets.FASHION_MNIST_STD}; output: logits [N,10]."
    )
    onnx.checker.check_model(m, full_check=True)
    onnx.save(m, str(path))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="examples", help="folder for fashion_resnet.onnx/.json (default: examples)")
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=0.1, help="peak LR of the one-cycle schedule (SGD, nesterov)")
    ap.add_argument("--weight-decay", type=float, default=5e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--limit-train", type=int, default=None, help="use only the first N training images (smoke tests)")
    ap.add_argument("--time-batches", type=int, default=0, help="only time this many training steps and exit")
    args = ap.parse_args(argv)

    set_determinism(args.seed, args.threads)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, python {platform.python_version()}", flush=True)

    xtr_np, ytr_np = datasets.load_fashion_mnist("train", limit=args.limit_train)
    xte_np, yte_np = datasets.load_fashion_mnist("test")
    xtr, ytr = torch.from_numpy(xtr_np), torch.from_numpy(ytr_np)
    xte, yte = torch.from_numpy(xte_np), torch.from_numpy(yte_np)
    n = xtr.shape[0]

    model = FashionResNet()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"FashionResNet: {n_params} parameters; train {n}, test {xte.shape[0]}", flush=True)

    steps_per_epoch = (n + args.batch_size - 1) // args.batch_size
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, nesterov=True, weight_decay=args.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, epochs=args.epochs,
                                                steps_per_epoch=steps_per_epoch, pct_start=0.25)
    gen = torch.Generator().manual_seed(args.seed)

    t0 = time.perf_counter()
    cpu0 = time.process_time()
    step = 0
    history = []
    for epoch in range(args.epochs):
        model.train()
        perm = torch.randperm(n, generator=gen)
        loss_sum, seen = 0.0, 0
        te = time.perf_counter()
        for i in range(0, n, args.batch_size):
            idx = perm[i:i + args.batch_size]
            xb, yb = xtr[idx], ytr[idx]
            # augmentation: random horizontal flip (garments are left/right symmetric)
            flip = torch.rand(xb.shape[0], generator=gen) < 0.5
            xb = torch.where(flip[:, None, None, None], xb.flip(3), xb)
            loss = F.cross_entropy(model(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += loss.item() * xb.shape[0]
            seen += xb.shape[0]
            step += 1
            if args.time_batches and step >= args.time_batches:
                dt = time.perf_counter() - t0
                print(f"{step} steps in {dt:.2f}s -> {dt / step * steps_per_epoch:.0f}s per epoch estimated")
                return 0
        acc = evaluate(model, xte, yte)
        history.append({"epoch": epoch + 1, "train_loss": round(loss_sum / seen, 4), "test_accuracy": acc,
                        "seconds": round(time.perf_counter() - te, 1)})
        print(f"epoch {epoch + 1}/{args.epochs}: loss {loss_sum / seen:.4f}  test acc {acc:.4f}  "
              f"({time.perf_counter() - te:.0f}s)", flush=True)
    train_seconds = time.perf_counter() - t0
    train_cpu_seconds = time.process_time() - cpu0

    torch_acc = evaluate(model, xte, yte)
    out = Path(args.out)
    onnx_path = out / "fashion_resnet.onnx"
    export_onnx(model, onnx_path, dynamic_batch=True)
    ort_acc = ort_accuracy(onnx_path, xte_np, yte_np)
    print(f"test accuracy (10,000 images): torch {torch_acc:.4f}  onnxruntime {ort_acc:.4f}", flush=True)
    if abs(torch_acc - ort_acc) > 0.002:
        print("WARNING: onnxruntime accuracy differs from torch by more than 0.2%", file=sys.stderr)

    meta = {
        "model": "fashion_resnet.onnx",
        "dataset": "Fashion-MNIST (Debian package dataset-fashion-mnist), 60,000 train / 10,000 test",
        "test_accuracy": round(torch_acc, 4),
        "test_accuracy_onnxruntime": round(ort_acc, 4),
        "epochs": args.epochs,
        "seed": args.seed,
        "input": {
            "name": "input",
            "shape": ["N", 1, 28, 28],
            "dtype": "float32",
            "layout": "NCHW, grayscale",
            "normalization": {
                "formula": "x = (pixel / 255 - mean) / std",
                "mean": datasets.FASHION_MNIST_MEAN,
                "std": datasets.FASHION_MNIST_STD,
                "note": "mean/std of the training pixels in [0,1]; tools/datasets.py load_fashion_mnist applies it",
            },
        },
        "output": {"name": "logits", "shape": ["N", 10], "dtype": "float32",
                   "classes": list(datasets.FASHION_MNIST_CLASSES)},
        "architecture": "ResNet: 3x3 conv stem (16) + BN + ReLU, 3 stages x 1 basic block (16/32/64 ch, "
                        "stride 1/2/2, 1x1 conv+BN projection shortcuts), global average pool, Linear(64,10)",
        "parameters": n_params,
        "training": {
            "optimizer": "SGD momentum 0.9 nesterov",
            "lr_schedule": f"OneCycle max_lr {args.lr}, pct_start 0.25",
            "weight_decay": args.weight_decay,
            "batch_size": args.batch_size,
            "augmentation": "random horizontal flip",
            "threads": args.threads,
            "deterministic_algorithms": True,
            "history": history,
        },
        "onnx": {"opset": 17, "exporter": "torch.onnx.export(dynamo=False) (TorchScript exporter; "
                 "folds BatchNorm into Conv in eval mode)", "dynamic_axes": {"input": {"0": "N"}, "logits": {"0": "N"}}},
        "torch_version": torch.__version__,
        "train_seconds": round(train_seconds, 1),
        "train_cpu_seconds": round(train_cpu_seconds, 1),
        "command": "python tools/train_reference.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    (out / "fashion_resnet.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(f"wrote {onnx_path} ({onnx_path.stat().st_size} bytes) and {out / 'fashion_resnet.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
