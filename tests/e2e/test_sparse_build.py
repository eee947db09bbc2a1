"""2:4 sparsity end to end: ``hwc build --sparse-2-4`` (layers measured on this host) and the
API with every eligible layer sparse; the artifacts verify against the 2:4 graph run with
dense kernels, the manifest reports each layer, and a 2:4 artifact is smaller. 2:4 INT8
(``--sparse-2-4 --int8``): the decision measured on INT8 kernels, the chosen layers on the 2:4
INT8 kernels, verified against the quantized 2:4 graph."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tvm")

import hwcompress  # noqa: E402
from hwcompress.passes import Sparse24  # noqa: E402
from hwcompress.recipe import Recipe  # noqa: E402

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def test_cli_sparse_2_4_measures_each_layer(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "hwcompress", "build", EXAMPLES / "small_cnn.onnx", "--sparse-2-4", "-o", tmp_path / "art"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "verified vs the compressed graph" in r.stdout and "sparse-2-4:" in r.stdout
    report = json.loads((tmp_path / "art" / "manifest.json").read_text())["sparsity"]
    assert report["measured"]
    # ~110 KB of weights: timed warm, as the model runs, and the summary says why
    assert report["timing"]["regime"] == "warm" and report["timing"]["model_weight_bytes"] < 200_000
    assert "timed warm: the model's weights fit in this host's last-level cache" in r.stdout
    layers = {rec["layer"]: rec for rec in report["layers"]}
    assert "3 input channels" in layers["conv2d[0]"]["reason"]  # the stem: RGB
    assert layers["conv2d[4]"]["reason"] == "grouped / depthwise conv"
    for rec in layers.values():
        if "dense_ms" in rec:  # measured: sparse exactly where it was faster
            assert rec["sparse"] == (rec["sparse_ms"] * report["min_speedup"] < rec["dense_ms"]), rec


def test_cli_sparse_pairs(tmp_path):
    """``--sparse-pairs``: the recipe step keeps pair-shared positions, the summary says so,
    the artifact verifies (the kernels on such weights: tests/unit/test_cpu_sparse.py)."""
    r = subprocess.run(
        [sys.executable, "-m", "hwcompress", "build", EXAMPLES / "small_cnn.onnx", "--sparse-2-4", "--sparse-pairs", "-o", tmp_path / "art"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    manifest = json.loads((tmp_path / "art" / "manifest.json").read_text())
    assert manifest["sparsity"]["pairs"] and manifest["verification"]["status"] == "passed"
    assert [s.get("pairs") for s in manifest["recipe"]["steps"] if s["technique"] == "sparse-2-4"] == [True]
    assert "output-channel pairs share positions" in r.stdout


def test_every_eligible_layer_sparse_verifies_and_shrinks_the_artifact(tmp_path):
    shapes = {"input": [1, 1, 28, 28]}
    model = EXAMPLES / "fashion_resnet.onnx"
    x = np.load(EXAMPLES / "fashion_sample.npy")[:1]
    dense = hwcompress.compile(model, "host", tmp_path / "dense", shapes)
    sparse = hwcompress.compile(model, "host", tmp_path / "sparse", shapes, Recipe((Sparse24(decide="all"),)), verify_inputs=[x])
    report = sparse.manifest["sparsity"]
    assert sparse.manifest["verification"]["status"] == "passed"
    assert report["sparse_layers"] == 9 and not report["measured"]  # every conv but the 1-channel stem, and the classifier
    assert report["weight_bytes"]["ratio"] < 0.56
    saved = report["weight_bytes"]["dense"] - report["weight_bytes"]["sparse"]
    size = {a: (a.path / "module.so").stat().st_size for a in (dense, sparse)}
    assert size[dense] - size[sparse] > 0.8 * saved  # the artifact stores the compressed weights only
    assert sparse.run([x])[0].shape == (1, 10)  # accuracy without fine-tuning: tools/bench_sparse_accuracy.py


def test_cli_sparse_2_4_with_int8_measures_int8_kernels(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "hwcompress", "build", EXAMPLES / "small_cnn.onnx", "--sparse-2-4", "--int8",
         "--calibration", "data-free", "-o", tmp_path / "art"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    manifest = json.loads((tmp_path / "art" / "manifest.json").read_text())
    report = manifest["sparsity"]
    assert report["measured"] and report["int8"]
    steps = [s["technique"] for s in manifest["recipe"]["steps"]]
    assert steps.index("sparse-2-4") < steps.index("int8-data-free")
    for rec in report["layers"]:
        if "dense_ms" in rec:
            assert rec["sparse"] == (rec["sparse_ms"] * report["min_speedup"] < rec["dense_ms"]), rec
            assert rec["weight_bytes_dense"] == np.prod(rec["shape"])  # int8 bytes
    assert manifest["verification"]["status"] == "passed"


def test_every_eligible_layer_sparse_int8(tmp_path):
    """Every eligible layer 2:4 then INT8: the 2:4 layers' int8 weights keep the pattern and run
    on the 2:4 INT8 kernels (one per layer), the artifact verifies against the quantized graph."""
    from hwcompress import build as B
    from hwcompress.api import import_model
    from hwcompress.passes import Int8DataFree
    from hwcompress.targets import load_target

    shapes = {"input": [1, 1, 28, 28]}
    model = EXAMPLES / "fashion_resnet.onnx"
    recipe = Recipe((Sparse24(decide="all", permute=False), Int8DataFree()))
    art = hwcompress.compile(model, "host", tmp_path / "s8", shapes, recipe, verify_inputs=[np.load(EXAMPLES / "fashion_sample.npy")[:1]])
    report = art.manifest["sparsity"]
    assert art.manifest["verification"]["status"] == "passed" and report["int8"]
    assert report["sparse_layers"] == 9 and report["weight_bytes"]["ratio"] == 0.625  # int8 values + 2-bit positions
    spec = load_target("host")
    front = import_model(model, spec, shapes, recipe=recipe)
    main = B.legalize(front.mod, spec)["main"].script()  # one call per layer (same-shape layers share a kernel)
    assert len(re.findall(r"call_tir\((cls\.)?sparse24_gemm\d*, ", main)) == 9


def test_the_build_tells_sparse_2_4_whether_blocks_fuse():
    """``--no-fuse-blocks`` / ``--no-fuse`` reach the recipe's steps as a module attribute, so a
    measured 2:4 decision times the layers that block kernels would otherwise absorb."""
    from hwcompress.api import import_model
    from hwcompress.build import blocks_allowed
    from hwcompress.optimize import Optimize
    from hwcompress.targets import load_target

    spec, recipe = load_target("host"), Recipe((Sparse24(decide="all"),))
    for optimize, fused in ((Optimize(), True), (Optimize(blocks=False), False), (Optimize(fuse=False), False)):
        assert blocks_allowed(import_model(EXAMPLES / "small_cnn.onnx", spec, recipe=recipe, optimize=optimize).mod) == fused
