#!/usr/bin/env python
"""Reproducible model zoo built with onnx.helper + numpy only (no torch, no downloads).

Models look like CNNs exported from PyTorch: opset 17, IR version 8, input
``input`` float32 NCHW, Conv (no bias) + BatchNormalization (inference form,
with running statistics) + Relu / Clip(0, 6), residual Add, depthwise convs,
GlobalAveragePool + Flatten + Gemm classifier.

* :func:`resnet18` -- torchvision's ResNet-18 topology, 1000 classes, batch dim ``N``.
* :func:`mobilenet_v2` -- torchvision's MobileNetV2 topology, 1000 classes, batch dim ``N``.
* :func:`small_cnn` -- a tiny, fully static [1,3,32,32] -> [1,10] CNN (< 200 KB)
  with a residual block and a depthwise-separable block.

Weights are He-normal (``fan_out``, as torchvision initializes convs) drawn
from ``numpy.random.default_rng(seed)``. BatchNorm running mean/variance are
*calibrated*: while the graph is built, a fixed synthetic batch is pushed
through it in float64 numpy and each BatchNormalization gets the per-channel
mean/variance of its actual input (rounded to 4 significant digits), so that
activations stay O(1) however deep the net is -- as in a trained net, whose
running statistics match its activations. Gammas are drawn from [0.5, 1.0]
([0.2, 0.5] for the last BN of a residual branch), betas from N(0, 0.05), and
the classifier is scaled so the logits have a standard deviation of about 3
on the calibration batch (O(1..10) on any normalized input). The same seed
gives byte-identical models.

CLI::

    python tools/zoo.py --out DIR [--models resnet18,mobilenet_v2,small_cnn] [--seed 0] [--input-size 224]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import onnx
from numpy.lib.stride_tricks import sliding_window_view
from onnx import TensorProto, helper, numpy_helper

__all__ = ["resnet18", "mobilenet_v2", "small_cnn", "MODELS", "OPSET", "IR_VERSION", "save", "main"]

OPSET = 17
#: onnxruntime refuses IR versions newer than it knows; opset 17 needs IR >= 8.
IR_VERSION = 8
BN_EPS = 1e-5
LOGIT_STD = 3.0


def _round_sig(a: np.ndarray, digits: int = 4) -> np.ndarray:
    """Round to ``digits`` significant digits (makes calibrated stats immune to BLAS summation order)."""
    a = np.asarray(a, dtype=np.float64)
    out = np.zeros_like(a)
    nz = a != 0
    exp = np.floor(np.log10(np.abs(a[nz])))
    scale = 10.0 ** (digits - 1 - exp)
    out[nz] = np.round(a[nz] * scale) / scale
    return out


class _Tensor:
    """A graph tensor name plus its calibration value (float64 numpy, NCHW)."""

    __slots__ = ("name", "value")

    def __init__(self, name: str, value: np.ndarray):
        self.name = name
        self.value = value

    @property
    def channels(self) -> int:
        return self.value.shape[1]


class _Builder:
    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self._clip_bounds: tuple[str, str] | None = None

    # ---- helpers -----------------------------------------------------------------
    def _init(self, name: str, arr: np.ndarray) -> np.ndarray:
        arr = np.ascontiguousarray(arr, dtype=np.float32)
        self.inits.append(numpy_helper.from_array(arr, name))
        return arr.astype(np.float64)

    def _node(self, op: str, inputs: list[str], output: str, name: str, **attrs) -> None:
        self.nodes.append(helper.make_node(op, inputs, [output], name=name, **attrs))

    # ---- layers ------------------------------------------------------------------
    def conv(self, x: _Tensor, name: str, cout: int, k: int, stride: int = 1, group: int = 1) -> _Tensor:
        cin = x.channels
        assert cin % group == 0 and cout % group == 0
        fan_out = (cout // group) * k * k
        w = self.rng.standard_normal((cout, cin // group, k, k)) * np.sqrt(2.0 / fan_out)
        wv = self._init(f"{name}.weight", w)
        pad = k // 2
        out = f"/{name}/Conv_output_0"
        self._node("Conv", [x.name, f"{name}.weight"], out, f"/{name}/Conv",
                   dilations=[1, 1], group=group, kernel_shape=[k, k],
                   pads=[pad, pad, pad, pad], strides=[stride, stride])
        return _Tensor(out, _np_conv(x.value, wv, stride, pad, group))

    def bn(self, x: _Tensor, name: str, gamma_range=(0.5, 1.0)) -> _Tensor:
        c = x.channels
        v = x.value
        mean = _round_sig(v.mean(axis=(0, 2, 3)))
        var = _round_sig(np.maximum(v.var(axis=(0, 2, 3)), 1e-4))
        gamma = self.rng.uniform(*gamma_range, size=c)
        beta = self.rng.normal(0.0, 0.05, size=c)
        g = self._init(f"{name}.weight", gamma)
        b = self._init(f"{name}.bias", beta)
        m = self._init(f"{name}.running_mean", mean)
        s2 = self._init(f"{name}.running_var", var)
        out = f"/{name}/BatchNormalization_output_0"
        self._node("BatchNormalization",
                   [x.name, f"{name}.weight", f"{name}.bias", f"{name}.running_mean", f"{name}.running_var"],
                   out, f"/{name}/BatchNormalization", epsilon=BN_EPS, momentum=0.9)
        r = lambda a: a[None, :, None, None]  # noqa: E731
        y = r(g) * (v - r(m)) / np.sqrt(r(s2) + BN_EPS) + r(b)
        return _Tensor(out, y)

    def relu(self, x: _Tensor, name: str) -> _Tensor:
        out = f"/{name}/Relu_output_0"
        self._node("Relu", [x.name], out, f"/{name}/Relu")
        return _Tensor(out, np.maximum(x.value, 0.0))

    def relu6(self, x: _Tensor, name: str) -> _Tensor:
        if self._clip_bounds is None:
            self._init("clip_min", np.array(0.0))
            self._init("clip_max", np.array(6.0))
            self._clip_bounds = ("clip_min", "clip_max")
        out = f"/{name}/Clip_output_0"
        self._node("Clip", [x.name, *self._clip_bounds], out, f"/{name}/Clip")
        return _Tensor(out, np.clip(x.value, 0.0, 6.0))

    def add(self, a: _Tensor, b: _Tensor, name: str) -> _Tensor:
        out = f"/{name}/Add_output_0"
        self._node("Add", [a.name, b.name], out, f"/{name}/Add")
        return _Tensor(out, a.value + b.value)

    def maxpool(self, x: _Tensor, name: str, k: int = 3, stride: int = 2, pad: int = 1) -> _Tensor:
        out = f"/{name}/MaxPool_output_0"
        self._node("MaxPool", [x.name], out, f"/{name}/MaxPool", kernel_shape=[k, k],
                   pads=[pad, pad, pad, pad], strides=[stride, stride], ceil_mode=0)
        xp = np.pad(x.value, ((0, 0), (0, 0), (pad, pad), (pad, pad)), constant_values=-np.inf)
        win = sliding_window_view(xp, (k, k), axis=(2, 3))[:, :, ::stride, ::stride]
        return _Tensor(out, win.max(axis=(4, 5)))

    def classifier(self, x: _Tensor, name: str, num_classes: int) -> _Tensor:
        gap = f"/{name}/GlobalAveragePool_output_0"
        self._node("GlobalAveragePool", [x.name], gap, f"/{name}/GlobalAveragePool")
        flat = f"/{name}/Flatten_output_0"
        self._node("Flatten", [gap], flat, f"/{name}/Flatten", axis=1)
        feats = x.value.mean(axis=(2, 3))
        w = self.rng.standard_normal((num_classes, feats.shape[1]))
        b = self.rng.normal(0.0, 0.01, size=num_classes)
        raw = feats @ w.T
        scale = float(_round_sig(np.array(LOGIT_STD / max(raw.std(), 1e-12)), 3))
        wv = self._init(f"{name}.weight", w * scale)
        bv = self._init(f"{name}.bias", b)
        out = "logits"
        self._node("Gemm", [flat, f"{name}.weight", f"{name}.bias"], out, f"/{name}/Gemm",
                   alpha=1.0, beta=1.0, transB=1)
        return _Tensor(out, feats @ wv.T + bv)

    def model(self, graph_name: str, x: _Tensor, y: _Tensor, in_shape, out_shape, doc: str) -> onnx.ModelProto:
        graph = helper.make_graph(
            self.nodes, graph_name,
            [helper.make_tensor_value_info(x.name, TensorProto.FLOAT, in_shape)],
            [helper.make_tensor_value_info(y.name, TensorProto.FLOAT, out_shape)],
            initializer=self.inits,
        )
        m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="hwcompress-zoo", producer_version="1", doc_string=doc)
        m.ir_version = IR_VERSION
        onnx.checker.check_model(m)
        return m


def _np_conv(x: np.ndarray, w: np.ndarray, stride: int, pad: int, group: int) -> np.ndarray:
    """Reference NCHW convolution in numpy (group == 1 or depthwise)."""
    k = w.shape[2]
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    ho = (xp.shape[2] - k) // stride + 1
    wo = (xp.shape[3] - k) // stride + 1
    if group == 1:
        win = sliding_window_view(xp, (k, k), axis=(2, 3))[:, :, ::stride, ::stride]
        return np.tensordot(win, w, axes=([1, 4, 5], [1, 2, 3])).transpose(0, 3, 1, 2)
    if group == x.shape[1] and w.shape[1] == 1:
        out = np.zeros((x.shape[0], w.shape[0], ho, wo))
        for i in range(k):
            for j in range(k):
                out += xp[:, :, i:i + stride * (ho - 1) + 1:stride, j:j + stride * (wo - 1) + 1:stride] \
                    * w[None, :, 0, i, j, None, None]
        return out
    raise NotImplementedError("only group=1 and depthwise convolutions")


def _calibration_batch(seed: int, size: int, channels: int = 3, batch: int = 2) -> np.ndarray:
    """Smooth-ish synthetic images, zero mean, unit variance (like normalized photos)."""
    rng = np.random.default_rng([seed, 0xCA1])
    f = 8
    low = rng.standard_normal((batch, channels, size // f + 1, size // f + 1))
    up = np.repeat(np.repeat(low, f, axis=2), f, axis=3)[:, :, :size, :size]
    x = 0.8 * up + 0.6 * rng.standard_normal((batch, channels, size, size))
    return x


def _input(seed: int, size: int) -> _Tensor:
    return _Tensor("input", _calibration_batch(seed, size))


# ---- ResNets ----------------------------------------------------------------------------
def _resnet(name: str, title: str, stages, block, input_size: int, seed: int, num_classes: int) -> onnx.ModelProto:
    """Stem, ``stages`` of ``(width, blocks, stride)`` made of ``block(b, x, prefix, width,
    stride)``, classifier: torchvision's ResNet layout and names."""
    if input_size < 32:
        raise ValueError(f"{name} needs input_size >= 32")
    b = _Builder(seed)
    x = _input(seed, input_size)
    inp = x
    x = b.relu(b.bn(b.conv(x, "conv1", 64, 7, 2), "bn1"), "relu")
    x = b.maxpool(x, "maxpool")
    for li, (width, blocks, s) in enumerate(stages, start=1):
        for bi in range(blocks):
            x = block(b, x, f"layer{li}.{bi}", width, s if bi == 0 else 1)
    y = b.classifier(x, "fc", num_classes)
    return b.model(name, inp, y, ["N", 3, input_size, input_size], ["N", num_classes],
                   f"{title}, random He-normal weights (seed {seed}), calibrated BatchNorm; hwcompress tools/zoo.py")


def _shortcut(b: _Builder, x: _Tensor, p: str, cout: int, stride: int) -> _Tensor:
    if stride == 1 and x.channels == cout:
        return x
    return b.bn(b.conv(x, f"{p}.downsample.0", cout, 1, stride), f"{p}.downsample.1")


def _basic_block(b: _Builder, x: _Tensor, p: str, c: int, stride: int) -> _Tensor:
    y = b.relu(b.bn(b.conv(x, f"{p}.conv1", c, 3, stride), f"{p}.bn1"), f"{p}.relu")
    y = b.bn(b.conv(y, f"{p}.conv2", c, 3, 1), f"{p}.bn2", gamma_range=(0.2, 0.5))
    return b.relu(b.add(y, _shortcut(b, x, p, c, stride), p), f"{p}.relu_1")


def _bottleneck(b: _Builder, x: _Tensor, p: str, width: int, stride: int) -> _Tensor:
    y = b.relu(b.bn(b.conv(x, f"{p}.conv1", width, 1), f"{p}.bn1"), f"{p}.relu")
    y = b.relu(b.bn(b.conv(y, f"{p}.conv2", width, 3, stride), f"{p}.bn2"), f"{p}.relu_1")
    y = b.bn(b.conv(y, f"{p}.conv3", 4 * width, 1), f"{p}.bn3", gamma_range=(0.2, 0.5))
    return b.relu(b.add(y, _shortcut(b, x, p, 4 * width, stride), p), f"{p}.relu_2")


def resnet18(input_size: int = 224, seed: int = 0, num_classes: int = 1000) -> onnx.ModelProto:
    """ResNet-18 (torchvision topology), input [N,3,S,S], output logits [N,num_classes]."""
    stages = [(64, 2, 1), (128, 2, 2), (256, 2, 2), (512, 2, 2)]
    return _resnet("resnet18", "ResNet-18", stages, _basic_block, input_size, seed, num_classes)


def resnet50(input_size: int = 224, seed: int = 0, num_classes: int = 1000) -> onnx.ModelProto:
    """ResNet-50 (torchvision topology, v1.5: the stride in the 3x3 conv), input [N,3,S,S],
    output logits [N,num_classes]: the 1x1 convs that issue 7's 2:4 speed goal names."""
    stages = [(64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)]
    return _resnet("resnet50", "ResNet-50", stages, _bottleneck, input_size, seed, num_classes)


# ---- MobileNetV2 -----------------------------------------------------------------------
_MBV2_SETTINGS = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]


def mobilenet_v2(input_size: int = 224, seed: int = 0, num_classes: int = 1000) -> onnx.ModelProto:
    """MobileNetV2 width 1.0 (torchvision topology), input [N,3,S,S], output logits [N,num_classes]."""
    if input_size < 32:
        raise ValueError("mobilenet_v2 needs input_size >= 32")
    b = _Builder(seed)
    x = _input(seed, input_size)
    inp = x
    x = b.relu6(b.bn(b.conv(x, "features.0.0", 32, 3, 2), "features.0.1"), "features.0.2")
    idx = 1
    cin = 32
    for t, c, n, s in _MBV2_SETTINGS:
        for i in range(n):
            stride = s if i == 0 else 1
            p = f"features.{idx}.conv"
            hidden = cin * t
            y = x
            j = 0
            if t != 1:
                y = b.relu6(b.bn(b.conv(y, f"{p}.{j}.0", hidden, 1), f"{p}.{j}.1"), f"{p}.{j}.2")
                j += 1
            y = b.relu6(b.bn(b.conv(y, f"{p}.{j}.0", hidden, 3, stride, group=hidden), f"{p}.{j}.1"), f"{p}.{j}.2")
            j += 1
            residual = stride == 1 and cin == c
            y = b.bn(b.conv(y, f"{p}.{j}", c, 1), f"{p}.{j + 1}",
                     gamma_range=(0.2, 0.5) if residual else (0.5, 1.0))
            if residual:
                y = b.add(x, y, f"features.{idx}")
            x = y
            cin = c
            idx += 1
    x = b.relu6(b.bn(b.conv(x, f"features.{idx}.0", 1280, 1), f"features.{idx}.1"), f"features.{idx}.2")
    y = b.classifier(x, "classifier.1", num_classes)
    return b.model("mobilenet_v2", inp, y, ["N", 3, input_size, input_size], ["N", num_classes],
                   f"MobileNetV2, random He-normal weights (seed {seed}), calibrated BatchNorm; hwcompress tools/zoo.py")


# ---- small CNN -------------------------------------------------------------------------
def small_cnn(seed: int = 0, input_size: int = 32, num_classes: int = 10) -> onnx.ModelProto:
    """Tiny fully static CNN [1,3,S,S] -> [1,num_classes]: conv stem, a residual basic block,
    a depthwise-separable block with ReLU6, GAP + Gemm head (about 27k parameters, ~110 KB)."""
    if input_size < 8:
        raise ValueError("small_cnn needs input_size >= 8")
    b = _Builder(seed)
    x = _input(seed, input_size)
    inp = x
    x = b.relu(b.bn(b.conv(x, "stem.conv", 16, 3), "stem.bn"), "stem.relu")
    x = b.relu(b.bn(b.conv(x, "down.conv", 32, 3, 2), "down.bn"), "down.relu")
    y = b.relu(b.bn(b.conv(x, "block.conv1", 32, 3), "block.bn1"), "block.relu1")
    y = b.bn(b.conv(y, "block.conv2", 32, 3), "block.bn2", gamma_range=(0.2, 0.5))
    x = b.relu(b.add(y, x, "block"), "block.relu2")
    x = b.relu6(b.bn(b.conv(x, "dw.conv", 32, 3, 2, group=32), "dw.bn"), "dw.relu6")
    x = b.relu6(b.bn(b.conv(x, "pw.conv", 64, 1), "pw.bn"), "pw.relu6")
    y = b.classifier(x, "fc", num_classes)
    return b.model("small_cnn", inp, y, [1, 3, input_size, input_size], [1, num_classes],
                   f"small_cnn, random He-normal weights (seed {seed}), calibrated BatchNorm; hwcompress tools/zoo.py")


MODELS = {"resnet18": resnet18, "resnet50": resnet50, "mobilenet_v2": mobilenet_v2, "small_cnn": small_cnn}


def save(model: onnx.ModelProto, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(model.SerializeToString())
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Write reproducible ONNX zoo models (onnx.helper + numpy).")
    ap.add_argument("--out", required=True, help="output folder; writes OUT/<name>.onnx")
    ap.add_argument("--models", default=",".join(MODELS), help=f"comma-separated subset of {','.join(MODELS)}")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--input-size", type=int, default=None,
                    help="spatial size (default: 224 for resnet18/resnet50/mobilenet_v2, 32 for small_cnn)")
    args = ap.parse_args(argv)
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        ap.error(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(MODELS)}")
    for name in names:
        kw = {"seed": args.seed}
        if args.input_size is not None:
            kw["input_size"] = args.input_size
        path = save(MODELS[name](**kw), Path(args.out) / f"{name}.onnx")
        print(f"{path} ({path.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
