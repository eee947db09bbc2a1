"""Regenerate the shipped pre-tuned databases under schedules/<target>/.

Tunes the zoo models (resumable work dirs under tuning/), then keeps only the best record of
each kernel, where it beats the kernel's default schedule (the seed ``hwc tune`` measured),
and writes them to schedules/<target>/, which every build for that target applies.

    python tools/pretune.py --target host --models resnet18,mobilenet_v2,fashion --trials 2000
    python tools/pretune.py --target host --ship-only        # re-extract from existing work dirs
    python tools/pretune.py --target host --coverage         # kernels the shipped database still matches
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _zoo():
    spec = importlib.util.spec_from_file_location("_hwc_tools_zoo", ROOT / "tools" / "zoo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def models():
    zoo = _zoo()
    return {
        "resnet18": (lambda: zoo.resnet18(), {"input": (1, 3, 224, 224)}),
        "mobilenet_v2": (lambda: zoo.mobilenet_v2(), {"input": (1, 3, 224, 224)}),
        # batch 8: the README's main job builds it that way
        "fashion": (lambda: str(ROOT / "examples" / "fashion_resnet.onnx"), {"input": (8, 1, 28, 28)}),
    }


def ship(work_dirs: list[Path], out: Path, target: str = "host", emit=print) -> int:
    """Write the best record per workload found in ``work_dirs`` into a JSON database at
    ``out`` (replacing what was there), if it beats the workload's default schedule.

    Tuning seeds each work dir with the default schedule of every kernel (``hwc tune``); the
    seed is recognized as the record whose kernel is the default schedule's kernel. A record
    no faster than the seed would only replace the default by itself or something slower, and
    a workload without a seed (tuned before seeding, or the default rules changed since) has
    no baseline: neither is shipped. Prints one line per workload; returns the records written.
    """
    import tvm_ffi
    from tvm.s_tir import meta_schedule as ms

    from hwcompress.backends import get_backend
    from hwcompress.build import database_files
    from hwcompress.targets import load_target
    from hwcompress.tuning import mean_seconds

    spec = load_target(target)
    make = get_backend(spec).default_trace
    schedule_of = make(spec.tvm_target()) if make is not None else None
    best, default, names, default_kernels = {}, {}, {}, {}
    for work in work_dirs:
        workload, records = database_files(work)
        db = ms.database.JSONDatabase(path_workload=str(workload), path_tuning_record=str(records))
        seeded = _seeded_tasks(work)
        for record in db.get_all_tuning_records():
            secs = mean_seconds(record.run_secs)  # None: a failed run
            if secs is None or not record.trace.insts:  # MetaSchedule never applies an empty trace
                continue
            key = tvm_ffi.structural_hash(record.workload.mod)
            if key not in default_kernels:
                default_kernels[key] = _default_kernel(schedule_of, record.workload.mod)
            if _is_default(record, default_kernels[key]):
                default[key] = min(secs, default.get(key, secs))
                name = _task_name(seeded, secs, work)
                if name and key not in names:
                    names[key] = name
            elif key not in best or secs < best[key][0]:
                best[key] = (secs, record)
    out.mkdir(parents=True, exist_ok=True)
    for name in ("database_workload.json", "database_tuning_record.json"):
        (out / name).unlink(missing_ok=True)
    shipped = ms.database.JSONDatabase(work_dir=str(out))
    count = 0
    rows = [("kernel", "default ms", "best ms", "speedup", "")]
    for key in sorted(set(best) | set(default), key=lambda k: names.get(k, f"~{k & 0xFFFFFFFF:08x}")):
        base, (secs, record) = default.get(key), best.get(key, (None, None))
        speedup = f"{base / secs:.2f}x" if base and secs else "-"
        if record is None:
            verdict = "not shipped: no tuned record"
        elif base is None:
            verdict = "not shipped: no measured default schedule (re-run tuning to seed it)"
        elif secs >= base:
            verdict = "not shipped: not faster than the default"
        else:
            workload = shipped.commit_workload(record.workload.mod)
            shipped.commit_tuning_record(
                ms.database.TuningRecord(record.trace, workload, record.run_secs, record.target, record.args_info)
            )
            verdict, count = "shipped", count + 1
        rows.append((names.get(key, f"kernel #{key & 0xFFFFFFFF:08x}"), _ms(base), _ms(secs), speedup, verdict))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for row in rows:
        emit("  ".join([row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:4], widths[1:])] + [row[4]]))
    return count


def _default_kernel(schedule_of, workload_mod):
    """(kernel, trace length) of the seed ``hwc tune`` gives a workload; None if the backend
    has no default schedule as a trace."""
    from hwcompress.tuning import seed_schedule

    if schedule_of is None:
        return None
    try:
        sch = seed_schedule(schedule_of, workload_mod)
    except Exception:  # noqa: BLE001 (no baseline: nothing is shipped for this workload)
        return None
    return sch.mod, len(sch.trace.insts)


def _is_default(record, default_kernel) -> bool:
    """Whether ``record`` is the seed: its trace replays to the default schedule's kernel."""
    import tvm_ffi
    from tvm import s_tir

    if default_kernel is None:
        return False
    kernel, length = default_kernel
    if len(record.trace.insts) != length:  # cheap first: most records are search candidates
        return False
    sch = s_tir.Schedule(record.workload.mod)
    try:
        record.trace.apply_to_schedule(sch, remove_postproc=False)
    except Exception:  # noqa: BLE001 (a trace for other rules: not the seed)
        return False
    return tvm_ffi.structural_equal(sch.mod, kernel)


def _seeded_tasks(work: Path) -> dict[str, float]:
    """Task name -> default ms from the work dir's tuning state (only to name workloads)."""
    import json

    from hwcompress.tuning import STATE

    try:
        tasks = json.loads((work / STATE).read_text())["tasks"]
        return {t["name"]: t["default_ms"] for t in tasks if t.get("default_ms")}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def _task_name(seeded: dict[str, float], secs: float, work: Path) -> str | None:
    for name, ms_ in seeded.items():
        if abs(ms_ - 1e3 * secs) <= 1e-4 * ms_:
            return f"{work.name}/{name}"
    return None


def _ms(secs) -> str:
    return f"{1e3 * secs:.4g}" if secs is not None else "-"


def coverage(target: str, names: list[str], emit=print, databases=None) -> dict[str, tuple[int, int]]:
    """Per model, ``(kernels the shipped database schedules, kernels)`` in the module ``tune``
    tunes and ``hwc build`` lowers (``tuning.legalized_model``). A database goes stale when a change to the frontend, the passes
    or a backend's computes changes a kernel's workload: its records then match nothing and the
    build silently runs default schedules, so check this after such changes (and re-tune).
    ``databases``: these instead of the shipped ones."""
    from hwcompress import api, build
    from hwcompress.targets import load_target
    from hwcompress.tuning import legalized_model

    spec = load_target(target)
    dbs = api.find_shipped_databases(spec) if databases is None else [Path(d) for d in databases]
    zoo = models()
    out = {}
    for name in names:
        make, shapes = zoo[name]
        lowered = build.apply_databases(legalized_model(make(), spec, shapes), spec, dbs)
        tuned, total = build.scheduled_kernels(lowered), build.kernels(lowered)
        out[name] = (len(tuned), len(total))
        emit(f"{name}: {len(tuned)} of {len(total)} kernels tuned by {', '.join(str(d) for d in dbs) or '(no shipped database)'}"
             + (f" ({', '.join(tuned)})" if tuned else ""))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--target", default="host")
    p.add_argument("--models", default="resnet18,mobilenet_v2,fashion", help="NAME[:TRIALS],... (TRIALS overrides --trials)")
    p.add_argument("--trials", type=int, default=2000, help="per model, counting earlier runs")
    p.add_argument("--trials-per-iter", type=int, default=64, help="candidates per search round (amortizes the search)")
    p.add_argument("--ship-only", action="store_true", help="do not tune; ship from existing work dirs")
    p.add_argument("--coverage", action="store_true", help="only report how many kernels of each model the shipped database tunes")
    args = p.parse_args(argv)
    if args.coverage:
        coverage(args.target, [item.partition(":")[0] for item in args.models.split(",")])
        return 0

    import hwcompress

    zoo = models()
    work_dirs = []
    for item in args.models.split(","):
        name, _, trials = item.partition(":")
        work = ROOT / "tuning" / f"{name}-{args.target}"
        work_dirs.append(work)
        if not args.ship_only:
            make, shapes = zoo[name]
            result = hwcompress.tune(
                make(), args.target, int(trials or args.trials), work_dir=work, input_shapes=shapes,
                trials_per_iter=args.trials_per_iter,
            )
            print(result.table())
    count = ship(
        [w for w in work_dirs if (w / "database_tuning_record.json").is_file()], ROOT / "schedules" / args.target, args.target
    )
    print(f"schedules/{args.target}: {count} kernels")
    return 0


if __name__ == "__main__":
    sys.exit(main())
