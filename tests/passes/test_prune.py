"""prune: the numpy math without IR, dependency groups on residual / concat / depthwise /
flatten graphs (structural), and pruned modules against the original with the same channels
zeroed (numerical; exact up to float32 summation order), parameter counts, bad input."""

from __future__ import annotations

import itertools

import numpy as np
import onnx
import pytest

import pass_graphs as G
from hwcompress.errors import DataError, RecipeError
from hwcompress.passes import ChannelPrune, fold_bn, prune
from hwcompress.passes.fuse import canonicalize_clip
from hwcompress.passes.prune import apply_removal, mask_channels, plan_prune, prune_groups
from hwcompress.passes.prune_groups import analyze, format_groups
from hwcompress.passes.prune_importance import allowed_widths, distribute, filter_norms, lstsq_refit, nearest_width, thinet_order
from hwcompress.recipe import Recipe

# Pruned vs masked: the same sums without the zero terms; float32 reassociation only.
RTOL = 1e-5


# ---------------------------------------------------------------------------- math


def test_filter_norms():
    w = np.arange(24, dtype=np.float32).reshape(2, 3, 2, 2) - 10
    np.testing.assert_allclose(filter_norms(w, 0, 1), np.abs(w).reshape(2, -1).sum(1))
    np.testing.assert_allclose(filter_norms(w.reshape(2, 12).T, 1, 2), np.sqrt((w.reshape(2, -1) ** 2).sum(1)))


def test_thinet_greedy_first_step_is_optimal_and_order_is_complete():
    rng = np.random.default_rng(0)
    z = rng.standard_normal((6, 40))
    gram = z @ z.T
    order = thinet_order(gram, 6)
    assert sorted(order) == list(range(6))
    best_pair = min(itertools.combinations(range(6), 2), key=lambda r: gram[np.ix_(r, r)].sum())
    # greedy picks the smallest single contribution first, then the best partner for it
    assert order[0] == int(np.argmin(np.diag(gram)))
    cost = gram[np.ix_(order[:2], order[:2])].sum()
    assert cost <= min(gram[np.ix_([order[0], c], [order[0], c])].sum() for c in range(6) if c != order[0]) + 1e-9
    assert gram[np.ix_(best_pair, best_pair)].sum() <= cost + 1e-9
    with pytest.raises(ValueError):
        thinet_order(gram, 7)


def test_lstsq_refit_recovers_a_linear_map():
    rng = np.random.default_rng(1)
    a, w = rng.standard_normal((200, 5)), rng.standard_normal((5, 3))
    np.testing.assert_allclose(lstsq_refit(a, a @ w, ridge=0.0), w, rtol=1e-9, atol=1e-9)


def test_widths_and_distribution():
    assert allowed_widths(20, 8) == [20, 16, 8]
    assert allowed_widths(16, 1)[:3] == [16, 15, 14]
    assert nearest_width(64, 0.4, 8) == 40  # 38.4 -> 40
    assert nearest_width(16, 0.9, 8) == 8  # never below one multiple
    widths = [allowed_widths(16, 4), allowed_widths(32, 4)]

    def params(w):
        return 10 * w[0] + 10 * w[1]

    got = distribute(widths, params, 0.5 * params([16, 32]))
    assert params(got) <= 240 and got == [8, 16]  # even fractions without sensitivity
    cheap_second = distribute(widths, params, 0.5 * params([16, 32]), cost=lambda g, w: (16 - w) if g == 0 else 0.0)
    assert cheap_second[0] == 16  # the insensitive group pays


def test_config_validates_and_round_trips():
    for bad in ({"ratio": 1.0}, {"ratio": -0.1}, {"ratio": "0.4"}, {"criterion": "l3"}, {"round_to": 0}, {"per_layer": {"g0": 1.5}}):
        with pytest.raises((TypeError, ValueError)):
            ChannelPrune(**bad)
    with pytest.raises(ValueError, match="calibration"):
        ChannelPrune(0.4, criterion="reconstruct")
    cfg = ChannelPrune(0.4, criterion="l2", per_layer={"g1": 0.5}, round_to=4, calib="calib/")
    again = Recipe.from_dict(Recipe((cfg,)).to_dict())
    assert again.steps[0] == cfg and again.steps[0].calib == "calib/" and not again.exact
    in_memory = Recipe((ChannelPrune(0.3, calib=np.zeros((2, 3), "float32")),)).to_dict()
    assert "calib" not in in_memory["steps"][0]  # arrays never go into recipes / manifests


# ---------------------------------------------------------------------------- graphs


def _concat_graph(hw: int = 6):
    """conv A (8) and conv B (4) of the input, concat, + conv C (12) residual, conv D (6)."""
    g = G._Graph(3)
    a = g.node("Relu", [g.conv("input", 3, 8, bias=True)])
    b = g.node("Relu", [g.conv("input", 3, 4, bias=True)])
    cat = g.node("Concat", [a, b], axis=1)
    y = g.node("Add", [cat, g.conv("input", 3, 12, bias=True)])
    y = g.conv(g.node("Relu", [y]), 12, 6, bias=True)
    return g.model((1, 3, hw, hw), y, (1, 6, hw, hw))


def _split_concat_graph(hw: int = 6):
    """Two independent convs concatenated, then a conv: the concat inputs stay two groups."""
    g = G._Graph(4)
    a = g.node("Relu", [g.conv("input", 3, 8)])
    b = g.node("Relu", [g.conv("input", 3, 4)])
    y = g.conv(g.node("Concat", [a, b], axis=1), 12, 6)
    return g.model((1, 3, hw, hw), y, (1, 6, hw, hw))


def _flatten_graph(hw: int = 4):
    """conv (6) -> relu -> Flatten (6*4*4 features) -> Gemm: features go channel-major."""
    g = G._Graph(5)
    y = g.node("Flatten", [g.node("Relu", [g.conv("input", 2, 6, bias=True)])], axis=1)
    w = g.const(g.rng.standard_normal((5, 6 * hw * hw)) * 0.1, "w")
    y = g.node("Gemm", [y, w, g.const(g.rng.standard_normal(5), "b")], transB=1)
    return g.model((2, 2, hw, hw), y, (2, 5))


def _chain_graph():
    """conv 3->16 (no bias) -> relu -> conv 16->8 (no bias): parameter counts by hand."""
    g = G._Graph(6)
    y = g.conv(g.node("Relu", [g.conv("input", 3, 16)]), 16, 8)
    return g.model((1, 3, 6, 6), y, (1, 8, 6, 6))


def _import(model):
    import hwcompress

    return fold_bn(hwcompress.import_onnx(model))


def _by_name(groups, op_role):
    return [g for g in groups if any((m.op, m.role) == op_role for m in g.members)]


def test_groups_residual_block_locks_the_skip_on_the_graph_input():
    groups = prune_groups(_import(G.residual_block()))
    inner = [g for g in groups if g.prunable]
    assert len(inner) == 1 and inner[0].channels == 8  # the first conv's filters
    assert [m.role for m in inner[0].members].count("source") == 1
    skip = [g for g in groups if not g.prunable]
    assert skip and all("untracked" in g.reason or "output" in g.reason for g in skip)


def _separable_graph(hw: int = 6):
    """1x1 expand (8->16) + ReLU, depthwise 3x3 + ReLU, 1x1 project (16->8)."""
    g = G._Graph(8)
    y = g.node("Relu", [g.bn(g.conv("input", 8, 16, k=1), 16)])
    y = g.node("Relu", [g.bn(g.conv(y, 16, 16, group=16, bias=True), 16)])
    y = g.conv(y, 16, 8, k=1, bias=True)
    return g.model((1, 8, hw, hw), y, (1, 8, hw, hw))


def test_groups_depthwise_follows_expand():
    groups = prune_groups(_import(_separable_graph()))
    expand = _by_name(groups, ("nn.conv2d", "depthwise"))
    assert len(expand) == 1 and expand[0].prunable and expand[0].channels == 16
    roles = [m.role for m in expand[0].members]
    assert roles.count("source") == 1 and roles.count("depthwise") == 1 and roles.count("consumer") == 1
    assert "depthwise" in format_groups(groups)


def test_groups_unknown_kernels_lock_and_say_why():
    """A call_tir kernel (here the importer's Clip, before prune's canonicalization turns it
    into R.clip) has its shapes baked in: its channels are locked, with the reason."""
    mod = _import(G.inverted_residual(c=8, expand=3))
    groups = analyze(mod["main"], mod).groups
    assert not any(g.prunable for g in groups)
    assert any("call_tir" in g.reason for g in groups)


def test_groups_concat_with_residual_is_one_group():
    groups = prune_groups(_import(_concat_graph()))
    big = [g for g in groups if g.channels == 12]
    assert len(big) == 1 and big[0].prunable
    assert [m.role for m in big[0].members].count("source") == 3  # A, B and C cut together


def test_groups_plain_concat_keeps_inputs_apart():
    groups = [g for g in prune_groups(_import(_split_concat_graph())) if g.prunable]
    assert sorted(g.channels for g in groups) == [4, 8]
    for g in groups:
        assert any(m.role == "consumer" for m in g.members)


def test_groups_flatten_then_gemm():
    groups = prune_groups(_import(_flatten_graph()))
    conv = _by_name(groups, ("nn.conv2d", "source"))[0]
    assert conv.prunable and any(m.op == "matmul" and m.role == "consumer" for m in conv.members)


# ---------------------------------------------------------------------------- rewrite vs masked original


def _run(mod, x):
    import tvm
    from tvm import relax

    from hwcompress.targets import load_target

    ex = tvm.compile(mod, load_target("host").tvm_target())
    return relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()


def _input(model, seed=2):
    shape = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


GRAPHS = {
    "residual": lambda: G.residual_block(),
    "separable": _separable_graph,
    "concat_residual": _concat_graph,
    "split_concat": _split_concat_graph,
    "flatten_gemm": _flatten_graph,
    "inverted_residual_relu6": lambda: G.inverted_residual(),  # ReLU6 (Clip) + depthwise follow
}


@pytest.mark.parametrize("name", sorted(GRAPHS))
@pytest.mark.parametrize("fold", [True, False])
def test_pruned_matches_masked_original(name, fold):
    """Every prunable group loses half its channels (lowest L1 first); the pruned module has
    smaller weights and computes what the original computes with those channels zeroed."""
    from hwcompress import analysis

    model = GRAPHS[name]()
    mod = _import(model) if fold else G.raw_import(model)  # unfolded: batch_norm follows channels
    mod = canonicalize_clip(mod)  # as prune() does: the importer's Clip kernels become R.clip
    a = analyze(mod["main"], mod)
    assert any(g.prunable for g in a.groups)
    cfg = ChannelPrune(per_layer={g.name: 0.5 for g in a.groups if g.prunable}, round_to=1)
    plan = plan_prune(mod, cfg)
    pruned = apply_removal(mod, a, plan.removed)
    masked = mask_channels(mod, a, plan.removed)
    before, after = analysis.summarize(mod), analysis.summarize(pruned)
    assert after.params == plan.params_estimate < before.params
    assert after.flops < before.flops
    x = _input(model)
    ref, got = _run(masked, x), _run(pruned, x)
    assert np.abs(got - ref).max() <= RTOL * max(np.abs(ref).max(), 1.0)
    assert np.abs(_run(mod, x) - ref).max() > 1e-3  # the masks really changed something


def test_relu6_and_depthwise_follow_their_channels():
    groups = prune_groups(_import(G.inverted_residual()))
    expanded = [g for g in groups if any(m.role == "depthwise" for m in g.members)]
    assert len(expanded) == 1 and expanded[0].prunable and expanded[0].channels == 24
    assert any(m.op == "clip" for m in expanded[0].members)


def test_parameter_counts_by_hand():
    mod = _import(_chain_graph())
    pruned = prune(mod, ChannelPrune(per_layer={"g0": 0.5}, round_to=4))
    from hwcompress import analysis

    assert analysis.summarize(mod).params == 16 * 3 * 9 + 8 * 16 * 9
    assert analysis.summarize(pruned).params == 8 * 3 * 9 + 8 * 8 * 9
    shapes = [tuple(c.value.numpy().shape) for c in _consts(pruned)]
    assert (8, 3, 3, 3) in shapes and (8, 8, 3, 3) in shapes


def _consts(mod):
    from tvm import relax

    found = []
    relax.analysis.post_order_visit(mod["main"].body, lambda e: found.append(e) if type(e).__name__ == "GenericConst" else None)
    return found


@pytest.mark.parametrize("target,multiple", [("host", 8), ("npu-stub", 16)])
def test_global_ratio_rounds_to_the_target_multiple(target, multiple):
    """Host: its channel_multiple; an NPU target: also the NPU's channel multiples (npu-stub:
    input 4, output 16: the 16-channel group cannot shrink at all)."""
    from hwcompress.passes.prune import _multiple
    from hwcompress.targets import load_target

    spec = load_target(target)
    assert _multiple(ChannelPrune(0.3), spec) == multiple
    mod = _import(_separable_graph())
    plan = plan_prune(mod, ChannelPrune(0.3), spec)
    for g, w in zip(plan.groups, plan.widths):
        assert w == g.channels or w % multiple == 0
    assert (plan.params_estimate < plan.params_before) == (multiple < 16)


def test_reconstruct_refits_and_beats_l1_on_the_output():
    model = _split_concat_graph(hw=8)
    mod = _import(model)
    rng = np.random.default_rng(7)
    calib = [rng.standard_normal((1, 3, 8, 8)).astype(np.float32) for _ in range(16)]
    x = _input(model, seed=9)
    ref = _run(mod, x)
    errs = {}
    for crit in ("l1", "reconstruct"):
        cfg = ChannelPrune(per_layer={"g0": 0.5, "g1": 0.5}, round_to=1, criterion=crit, calib=calib)
        out = _run(prune(mod, cfg), x)
        errs[crit] = float(((out - ref) ** 2).sum() / (ref**2).sum())
    assert errs["reconstruct"] < errs["l1"]


def test_sensitivity_distribution_with_calibration():
    mod = _import(_split_concat_graph(hw=8))
    calib = np.random.default_rng(3).standard_normal((8, 3, 8, 8)).astype(np.float32)
    plan = plan_prune(mod, ChannelPrune(0.3, round_to=2, calib=calib))
    assert plan.sensitivity and all(curve[max(curve)] == 0.0 for curve in plan.sensitivity.values())
    assert plan.params_estimate <= 0.7 * plan.params_before + 1


# ---------------------------------------------------------------------------- errors


def test_bad_calibration_and_names(tmp_path):
    mod = _import(_chain_graph())
    with pytest.raises(DataError, match="shape"):
        prune(mod, ChannelPrune(0.3, calib=np.zeros((4, 1, 6, 6), "float32")))
    with pytest.raises(DataError, match="not found"):
        prune(mod, ChannelPrune(0.3, calib=str(tmp_path / "missing")))
    (tmp_path / "junk.npy").write_text("not numpy")
    with pytest.raises(DataError, match="junk.npy"):
        prune(mod, ChannelPrune(0.3, calib=str(tmp_path)))
    with pytest.raises(RecipeError, match="no pruning group"):
        prune(mod, ChannelPrune(per_layer={"nope": 0.5}))


def test_cli_prune_groups_and_bad_calib(tmp_path, capsys):
    from hwcompress.cli import main

    path = tmp_path / "m.onnx"
    onnx.save(_separable_graph(), path)
    assert main(["inspect", str(path), "--prune-groups"]) == 0
    assert "depthwise" in capsys.readouterr().out
    calib = tmp_path / "calib"
    calib.mkdir()
    np.save(calib / "b0.npy", np.zeros((1, 5, 6, 6), "float32"))  # 5 channels, the model takes 8
    code = main(["-q", "build", str(path), "--prune", "0.3", "--calib", str(calib), "-o", str(tmp_path / "art"), "--no-verify"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "calibration input 'input'" in err[0]
    assert main(["-q", "build", str(path), "--prune", "0.3", "--prune-criterion", "reconstruct"]) == 2


def test_cli_prints_each_groups_sensitivity(tmp_path, capsys):
    """``inspect --prune-groups --calib``: output error per kept width, 0 at full width and
    growing as channels go (the curve the global ratio is distributed by)."""
    import json

    from hwcompress.cli import main

    path = tmp_path / "m.onnx"
    model = _separable_graph()
    onnx.save(model, path)
    calib = tmp_path / "calib"
    calib.mkdir()
    np.save(calib / "b0.npy", _input(model))
    assert main(["-q", "inspect", str(path), "--prune-groups", "--calib", str(calib), "--json"]) == 0
    groups = json.loads(capsys.readouterr().out)
    curves = [g["sensitivity"] for g in groups if g["prunable"]]
    assert curves and all(c for c in curves)
    for curve in curves:
        errs = [err for _, err in sorted(((int(w), e) for w, e in curve.items()), reverse=True)]
        assert errs[0] == 0.0 and errs[-1] > 0 and errs == sorted(errs)
    assert main(["-q", "inspect", str(path), "--calib", str(calib)]) == 2  # --calib needs --prune-groups


def test_pruned_build_is_verified_against_the_pruned_graph(tmp_path):
    """A lossy recipe cannot match ONNX Runtime on the original model: the build is checked
    against the pruned graph run by TVM's own pipeline, on random and on the user's inputs."""
    import hwcompress
    from hwcompress.recipe import Recipe

    model = _separable_graph()
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    art = hwcompress.compile(str(path), out=str(tmp_path / "art"), recipe=Recipe((ChannelPrune(0.3, round_to=1),)),
                             verify_inputs=[_input(model)])  # fmt: skip
    v = art.manifest["verification"]
    assert v["status"] == "passed" and v["reference"].startswith("compressed graph")
    assert [c["inputs"] for c in v["cases"]] == ["random(seed=0)", "user"]
