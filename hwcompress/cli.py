"""``hwc``: thin command line over the library. Arguments become the same objects the Python
API takes; user errors print one line and exit 2."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from .errors import DataError, HwcError, RecipeError
from .targets import DataLayout


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hwc", description="Hardware-aware compiler frontend on Apache TVM.")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress messages")
    sub = p.add_subparsers(dest="command", required=True)

    b = sub.add_parser("build", help="compile an ONNX model into a verified artifact")
    b.add_argument("model", help="ONNX model file")
    b.add_argument("--target", default="host", help="target name (see `hwc targets`) or target TOML path")
    b.add_argument("-o", "--out", default="artifact", help="artifact directory (default: artifact)")
    b.add_argument("--input-shape", action="append", default=[], metavar="NAME=D1,D2,...", help="fix an input's shape")
    b.add_argument("--recipe", help="recipe TOML file")
    b.add_argument("--db", action="append", default=[], metavar="DIR", help="MetaSchedule database to apply")
    b.add_argument("--verify-input", action="append", default=[], metavar="[NAME=]FILE.npy", help="also verify on these inputs")
    b.add_argument("--rtol", type=float, default=None, help="verification relative tolerance (default 1e-3)")
    b.add_argument("--atol", type=float, default=None, help="verification absolute tolerance (default 1e-4)")
    b.add_argument("--no-verify", action="store_true", help="skip the comparison with ONNX Runtime")
    b.add_argument("--prune", type=float, metavar="RATIO", help="channel pruning: remove this fraction of the parameters (e.g. 0.4)")
    b.add_argument("--prune-criterion", choices=("l1", "l2", "reconstruct"), default=None,
                   help="channel importance (default: reconstruct with --calib, else l1; reconstruct needs --calib)")
    b.add_argument("--int8", action="store_true", help="static INT8 quantization with integer kernels (needs --calib)")
    b.add_argument("--calibration", choices=("minmax", "percentile", "entropy", "data-free"), default=None,
                   help="with --int8: how activation ranges are chosen (default minmax); data-free: no --calib, "
                        "DFQ weight steps and ranges from synthetic inputs")
    b.add_argument("--sparse-2-4", action="store_true",
                   help="2:4 structured sparsity on sparse kernels, where measured at least 5%% faster than dense (no fine-tuning)")
    b.add_argument("--sparse-pairs", action="store_true",
                   help="with --sparse-2-4: output channels 2i, 2i+1 keep the same positions, so CPU kernels load each input "
                        "once for both (ResNet-50's 1x1 convs 1.4-1.76x over dense instead of 0.9-1.4x; loses some accuracy)")
    b.add_argument("--calib", metavar="DIR",
                   help="calibration data for --prune and --int8: .npy files of samples, .npz keyed by input name, or images")
    _optimize_args(b)

    r = sub.add_parser("run", help="run an artifact on inputs, optionally timing it")
    r.add_argument("artifact")
    r.add_argument("--input", action="append", default=[], metavar="[NAME=]FILE", help=".npy per input, or one .npz by name")
    r.add_argument("--output", metavar="FILE", help="write outputs: .npy (single output) or .npz")
    r.add_argument("--bench", type=int, default=0, metavar="N", help="time N runs after warm-up")
    r.add_argument("--warmup", type=int, default=3, metavar="W", help="warm-up runs before timing (default 3)")
    r.add_argument("--json", action="store_true", help="print one JSON object")
    r.add_argument("--tracker", metavar="HOST:PORT", help="run on a farm device through a TVM RPC tracker")
    r.add_argument("--key", help="device key on the tracker (default: the target's [tuning].rpc_key)")

    i = sub.add_parser("inspect", help="parameters, FLOPs and memory traffic per layer")
    i.add_argument("path", help="ONNX model or artifact directory")
    i.add_argument("--input-shape", action="append", default=[], metavar="NAME=D1,D2,...")
    i.add_argument("--json", action="store_true", help="print one JSON object")
    i.add_argument("--prune-groups", action="store_true", help="print the channel pruning groups (what is cut together)")
    i.add_argument("--calib", metavar="DIR", help="with --prune-groups: also each group's sensitivity (output error vs kept width) on this data")
    i.add_argument("--target", default="host", help="with --calib: the target whose channel_multiple rounds the widths (default host)")

    u = sub.add_parser("tune", help="autotune the model's kernels for a target (MetaSchedule + XGBoost)")
    u.add_argument("model", help="ONNX model file")
    u.add_argument("--target", default="host", help="target name or target TOML path")
    u.add_argument("--trials", type=int, default=64, help="total measurement trials, counting earlier runs (default 64)")
    u.add_argument("--work-dir", help="database folder (default tuning/<model>-<target>); reused to resume")
    u.add_argument("--input-shape", action="append", default=[], metavar="NAME=D1,D2,...")
    u.add_argument("--recipe", help="recipe TOML file (tune the model as it will be built)")
    u.add_argument("--tracker", metavar="HOST:PORT", help="measure on farm devices through a TVM RPC tracker")
    u.add_argument("--key", help="device key on the tracker (default: the target's [tuning].rpc_key)")
    _optimize_args(u, " (tune for builds made with the same setting)")
    u.add_argument("--json", action="store_true", help="print one JSON object at the end")

    f = sub.add_parser("farm", help="device farm over TVM's RPC tracker")
    farm_sub = f.add_subparsers(dest="farm_command", required=True)
    ft = farm_sub.add_parser("tracker", help="run an RPC tracker (until Ctrl-C)")
    ft.add_argument("--host", default="127.0.0.1", help="bind address (default loopback)")
    ft.add_argument("--port", type=int, default=9190)
    fs = farm_sub.add_parser("serve", help="run a device server registered with a tracker (until Ctrl-C)")
    fs.add_argument("--tracker", required=True, metavar="HOST:PORT")
    fs.add_argument("--key", required=True, help="device key, e.g. the target's [tuning].rpc_key")
    fs.add_argument("--host", default="127.0.0.1", help="bind address (default loopback; 0.0.0.0 for a remote tracker)")
    fq = farm_sub.add_parser("status", help="servers and queues per key")
    fq.add_argument("--tracker", default="127.0.0.1:9190", metavar="HOST:PORT")
    fq.add_argument("--json", action="store_true")

    t = sub.add_parser("targets", help="list the shipped targets")
    t.add_argument("--json", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="hwc: %(message)s", stream=sys.stderr)
    if not args.quiet and not getattr(args, "json", False):
        logging.getLogger("hwcompress").setLevel(logging.INFO)
    try:
        return _COMMANDS[args.command](args)
    except HwcError as e:
        print(f"hwc: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("hwc: interrupted", file=sys.stderr)
        return 130


def _optimize_args(parser, note: str = "") -> None:
    parser.add_argument("--no-fold-bn", action="store_true", help="keep BatchNorm unfolded" + note)
    parser.add_argument("--no-fuse", action="store_true", help="one kernel per op (no operator fusion)" + note)
    parser.add_argument(
        "--no-fuse-blocks",
        action="store_true",
        help="no multi-layer kernels (CPU: inverted-residual blocks as one kernel)" + note,
    )
    parser.add_argument(
        "--winograd",
        choices=("on", "off", "auto"),
        default="auto",
        help="Winograd for 3x3 stride-1 convs (default auto: the target's [hardware].winograd)" + note,
    )
    parser.add_argument(
        "--layout",
        choices=("auto", *(k.value for k in DataLayout)),
        default="auto",
        help="conv layout (default auto: the target's [hardware].conv_layout)" + note,
    )


def _optimize(args):
    from .optimize import Optimize

    return Optimize(
        fold_bn=not args.no_fold_bn, fuse=not args.no_fuse, blocks=not args.no_fuse_blocks, winograd=args.winograd, layout=args.layout
    )


def _shapes(items: list[str]) -> dict:
    from .frontend.load import parse_shape_arg

    return dict(parse_shape_arg(s) for s in items)


def _cmd_build(args) -> int:
    from .api import compile as compile_model

    verify_inputs = _read_inputs(args.verify_input) if args.verify_input else None
    artifact = compile_model(
        args.model,
        target=args.target,
        out=args.out,
        input_shapes=_shapes(args.input_shape),
        recipe=_build_recipe(args),
        databases=args.db,
        verify=not args.no_verify,
        verify_inputs=verify_inputs,
        rtol=args.rtol,
        atol=args.atol,
        optimize=_optimize(args),
    )
    v = artifact.manifest["verification"]
    if v["status"] == "passed":
        worst = max(c["max_abs_err"] for c in v["cases"])
        ref = "ONNX Runtime" if v.get("reference", "onnxruntime") == "onnxruntime" else "the compressed graph"
        check = f"verified vs {ref} ({v['mode']}), max abs err {worst:.2e}"
    else:
        check = f"not verified: {v['reason']}"
    print(f"{artifact.path}: {artifact.spec.name} artifact; {check}")
    q = artifact.manifest.get("quantization")
    if q is not None:
        fallback = ", ".join(f"{f['name']} ({f['reason']})" for f in q["float_fallback"]) or "none"
        print(f"int8: {len(q['layers'])} layers, output SQNR {q.get('output_sqnr_db')} dB on calibration data; float fallback: {fallback}")
    s = artifact.manifest.get("sparsity")
    if s is not None:
        how = (
            f"measured at least {s.get('min_speedup', 1.0)}x faster than dense{_timed(s.get('timing'))}" if s["measured"]
            else f"not measured: {s['not_measured_because']}"
        )  # fmt: skip
        pairs = "; output-channel pairs share positions" if s.get("pairs") else ""
        print(f"sparse-2-4: {s['sparse_layers']} of {len(s['layers'])} conv/matmul layers sparse ({how}){pairs}")
    return 0


def _timed(timing: dict | None) -> str:
    """How a sparsity report's layers were timed, as a clause of the build summary."""
    if not timing:
        return ""
    regime = timing["regime"]
    if timing.get("chosen") != "auto":
        return f", timed {regime} as the recipe asks"
    fits = "exceed" if regime == "cold" else "fit in"
    return f", timed {regime}: the model's weights {fits} this host's last-level cache"


def _build_recipe(args):
    """``--recipe`` plus a ``prune`` step from ``--prune`` and an ``int8`` step from ``--int8``;
    ``--calib`` feeds both, and a recipe file's int8 step without data (None: no recipe)."""
    if args.prune is None and args.prune_criterion is not None:
        raise RecipeError("--prune-criterion needs --prune RATIO")
    if not args.int8 and args.calibration is not None:
        raise RecipeError("--calibration needs --int8")
    if args.sparse_pairs and not args.sparse_2_4:
        raise RecipeError("--sparse-pairs needs --sparse-2-4")
    if args.prune is None and not args.int8 and not args.calib and not args.sparse_2_4:
        return args.recipe
    from dataclasses import replace

    from .passes import ChannelPrune, Int8DataFree, Int8Static, Sparse24
    from .recipe import Recipe, as_recipe

    recipe = as_recipe(args.recipe)
    steps = list(recipe.steps)
    waiting = [i for i, s in enumerate(steps) if type(s) is Int8Static and s.data is None]
    if args.calib and args.prune is None and not args.int8 and not waiting:
        raise RecipeError("--calib needs --prune RATIO or --int8")
    for i in waiting if args.calib else ():
        steps[i] = replace(steps[i], data=args.calib)
    if args.prune is not None:
        if any(isinstance(s, ChannelPrune) for s in steps):
            raise RecipeError("the recipe already has a prune step; drop --prune or the step")
        try:
            # data-free L1 lost 39 points on the Fashion classifier at 20% where reconstruct lost
            # 0.3 (BENCHMARKS.md): with calibration data, reconstruct is the default
            criterion = args.prune_criterion or ("reconstruct" if args.calib else "l1")
            steps.append(ChannelPrune(ratio=args.prune, criterion=criterion, calib=args.calib))
        except (TypeError, ValueError) as e:
            raise RecipeError(f"--prune: {e}") from None
    if args.sparse_2_4:
        if any(isinstance(s, Sparse24) for s in steps):
            raise RecipeError("the recipe already has a sparse-2-4 step; drop --sparse-2-4 or the step")
        steps.append(Sparse24(pairs=args.sparse_pairs))
    if args.int8:
        if any(isinstance(s, Int8Static) for s in steps):
            raise RecipeError("the recipe already has an int8 step; drop --int8 or the step")
        if args.calibration == "data-free":
            if args.calib and args.prune is None:
                raise RecipeError("--calibration data-free takes no --calib (with data choose minmax, percentile or entropy)")
            steps.append(Int8DataFree())
        elif not args.calib:
            raise RecipeError("--int8 needs calibration data: --calib DIR (.npy/.npz samples or images), or --calibration data-free")
        else:
            method = {"calibration": args.calibration} if args.calibration else {}
            steps.append(Int8Static(data=args.calib, **method))
    return Recipe(tuple(steps))


def _read_inputs(items: list[str]):
    """``FILE.npy`` (positional), ``NAME=FILE.npy`` (by name), or one ``.npz`` keyed by name."""
    from .runtime import load_array_file

    named, positional = {}, []
    for item in items:
        name, sep, file = item.partition("=")
        if not sep:
            name, file = None, item
        if not Path(file).is_file():
            raise DataError(f"input file not found: {file}")
        loaded = load_array_file(file)
        if isinstance(loaded, dict):
            named.update(loaded)
        elif name:
            named[name] = loaded
        else:
            positional.append(loaded)
    if named and positional:
        raise DataError("give inputs either all by name (NAME=FILE or .npz) or all positionally")
    return named or positional


def _cmd_run(args) -> int:
    import numpy as np

    if args.tracker:
        outputs, latencies, names, mode = _run_on_farm(args)
    else:
        from .runtime import load

        artifact = load(args.artifact)
        if not args.input:
            raise DataError(f"no --input given (model inputs: {', '.join(i['name'] for i in artifact.inputs)})")
        inputs = artifact.check_inputs(_read_inputs(args.input))
        outputs = artifact.run(inputs)
        latencies = artifact.bench(inputs, repeat=args.bench, warmup=args.warmup) if args.bench else None
        names, mode = [o["name"] for o in artifact.outputs], artifact.mode
    if args.output:
        _write_outputs(Path(args.output), outputs, names)
    report = {"outputs": [{"name": n, "shape": list(a.shape), "dtype": str(a.dtype)} for n, a in zip(names, outputs)]}
    if latencies:
        report.update(
            median_ms=float(np.median(latencies)),
            p90_ms=float(np.percentile(latencies, 90)),
            runs=len(latencies),
            mode=mode,
        )
    if args.json:
        print(json.dumps(report))
        return 0
    for o in report["outputs"]:
        print(f"output {o['name']}: shape {o['shape']} {o['dtype']}")
    if latencies:
        note = " (under emulation: not device speed)" if mode == "emulated" else ""
        print(f"latency over {report['runs']} runs: median {report['median_ms']:.3f} ms, p90 {report['p90_ms']:.3f} ms{note}")
    return 0


def _run_on_farm(args):
    """``hwc run --tracker``: the artifact runs on a farm device, not here."""
    from . import farm
    from .export import read_manifest
    from .targets import spec_from_dict

    manifest = read_manifest(args.artifact)
    key = args.key or spec_from_dict(manifest["target"]).tuning.rpc_key
    if not key:
        raise DataError(f"--key is needed: target {manifest['target']['name']} has no [tuning].rpc_key")
    if not args.input:
        raise DataError(f"no --input given (model inputs: {', '.join(i['name'] for i in manifest['inputs'])})")
    outputs, latencies = farm.run_remote(args.artifact, args.tracker, key, _read_inputs(args.input), repeat=args.bench, warmup=args.warmup)
    return outputs, latencies, [o["name"] for o in manifest["outputs"]], f"rpc:{key}"


def _write_outputs(path: Path, outputs, names) -> None:
    import numpy as np

    if path.suffix == ".npz":
        np.savez(path, **dict(zip(names, outputs)))
    elif len(outputs) == 1:
        np.save(path, outputs[0])
    else:
        raise DataError(f"--output {path}: the model has {len(outputs)} outputs; use a .npz file")


def _cmd_inspect(args) -> int:
    from . import analysis

    path = Path(args.path)
    if path.is_dir():
        from .export import read_manifest

        manifest = read_manifest(path)
        summary = manifest["inspect"]["after"]
        offload = manifest.get("offload")  # NPU targets: what runs where
        if args.json:
            print(json.dumps(summary if offload is None else {**summary, "offload": offload}))
        else:
            layers = tuple(analysis.Layer(**{**l, "shape": tuple(l["shape"])}) for l in summary["layers"])
            print(analysis.format_table(analysis.Summary(summary["params"], summary["flops"], summary["bytes"], layers)))
            if offload is not None:
                from .codegen.npu.offload import format_offload

                print(format_offload(offload))
        return 0
    from .frontend import import_onnx

    mod = import_onnx(path, _shapes(args.input_shape))
    if args.prune_groups:
        from .passes import fold_bn
        from .passes.prune import prune_groups
        from .passes.prune_groups import format_groups

        mod = fold_bn(mod)  # as `hwc build` prunes: BN folded first
        groups = prune_groups(mod)
        curves = {}
        if args.calib:
            from .passes.prune import prune_sensitivity

            from .targets import load_target

            curves = prune_sensitivity(mod, args.calib, load_target(args.target))
        if args.json:
            print(json.dumps([{"name": g.name, "channels": g.channels, "prunable": g.prunable, "reason": g.reason,
                               "members": [vars(m) for m in g.members], "sensitivity": curves.get(g.name)}
                              for g in groups]))  # fmt: skip
        else:
            print(format_groups(groups, curves))
        return 0
    if args.calib:
        raise DataError("--calib needs --prune-groups")
    summary = analysis.summarize(mod)
    print(json.dumps(summary.to_dict()) if args.json else analysis.format_table(summary))
    return 0


def _cmd_tune(args) -> int:
    from .tuning import tune

    result = tune(
        args.model,
        target=args.target,
        trials=args.trials,
        work_dir=args.work_dir,
        tracker=args.tracker,
        key=args.key,
        input_shapes=_shapes(args.input_shape),
        recipe=args.recipe,
        progress=None if not args.quiet else (lambda line: None),
        optimize=_optimize(args),
    )
    if args.json:
        print(json.dumps(result.to_dict()))
        return 0
    print(result.table())
    print(
        f"{result.trials_run_now} trials now, {result.trials_total} in all, in {result.seconds:.0f} s; "
        f"database: {result.work_dir} (use it with `hwc build ... --db {result.work_dir}`)"
    )
    return 0


def _cmd_farm(args) -> int:
    from . import farm

    if args.farm_command == "status":
        info = farm.status(args.tracker)
        print(json.dumps(info) if args.json else farm.status_text(info))
        return 0
    if args.farm_command == "tracker":
        proc = farm.start_tracker(args.host, args.port)
        what = f"tracker on {proc.address}"
    else:
        proc = farm.start_server(args.tracker, args.key, host=args.host)
        what = f"device server '{args.key}' on {proc.address}, registered with {args.tracker}"
    with proc:
        print(f"hwc farm: {what} (log {proc.log_path}); Ctrl-C stops it", flush=True)
        try:
            code = proc.wait()
        except KeyboardInterrupt:
            return 0
        print(f"hwc farm: {what} exited with code {code}: {proc.last_log_line()}", file=sys.stderr)
    return 1


def _cmd_targets(args) -> int:
    from .targets import list_targets

    specs = list_targets()
    if args.json:
        print(json.dumps([{"name": s.name, "description": s.description} for s in specs]))
        return 0
    width = max(len(s.name) for s in specs)
    for s in specs:
        print(f"{s.name.ljust(width)}  {s.description}")
    return 0


_COMMANDS = {"build": _cmd_build, "run": _cmd_run, "inspect": _cmd_inspect, "tune": _cmd_tune, "farm": _cmd_farm, "targets": _cmd_targets}


if __name__ == "__main__":
    sys.exit(main())
