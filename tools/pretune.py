"""Regenerate the shipped pre-tuned databases under schedules/<target>/.

Tunes the zoo models (resumable work dirs under tuning/), then keeps only the best record of
each kernel and writes them to schedules/<target>/, which every build for that target applies.

    python tools/pretune.py --target host --models resnet18,mobilenet_v2,fashion --trials 2000
    python tools/pretune.py --target host --ship-only        # re-extract from existing work dirs
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
        "fashion": (lambda: str(ROOT / "examples" / "fashion_resnet.onnx"), {"input": (1, 1, 28, 28)}),
    }


def ship(work_dirs: list[Path], out: Path) -> int:
    """Write the best record per workload found in ``work_dirs`` into a JSON database at
    ``out`` (replacing what was there). Returns the number of records written."""
    import tvm_ffi
    from tvm.s_tir import meta_schedule as ms

    from hwcompress.build import database_files

    best = {}
    for work in work_dirs:
        workload, records = database_files(work)
        db = ms.database.JSONDatabase(path_workload=str(workload), path_tuning_record=str(records))
        for record in db.get_all_tuning_records():
            if not record.run_secs:
                continue
            secs = sum(float(s) for s in record.run_secs) / len(record.run_secs)
            if secs >= 1e9:  # MetaSchedule's marker of a failed run
                continue
            key = tvm_ffi.structural_hash(record.workload.mod)
            if key not in best or secs < best[key][0]:
                best[key] = (secs, record)
    out.mkdir(parents=True, exist_ok=True)
    for name in ("database_workload.json", "database_tuning_record.json"):
        (out / name).unlink(missing_ok=True)
    shipped = ms.database.JSONDatabase(work_dir=str(out))
    for _, record in best.values():
        workload = shipped.commit_workload(record.workload.mod)
        shipped.commit_tuning_record(
            ms.database.TuningRecord(record.trace, workload, record.run_secs, record.target, record.args_info)
        )
    return len(best)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--target", default="host")
    p.add_argument("--models", default="resnet18,mobilenet_v2,fashion")
    p.add_argument("--trials", type=int, default=2000, help="per model, counting earlier runs")
    p.add_argument("--ship-only", action="store_true", help="do not tune; ship from existing work dirs")
    args = p.parse_args(argv)

    import hwcompress

    zoo = models()
    work_dirs = []
    for name in args.models.split(","):
        work = ROOT / "tuning" / f"{name}-{args.target}"
        work_dirs.append(work)
        if not args.ship_only:
            make, shapes = zoo[name]
            result = hwcompress.tune(make(), args.target, args.trials, work_dir=work, input_shapes=shapes)
            print(result.table())
    count = ship([w for w in work_dirs if (w / "database_tuning_record.json").is_file()], ROOT / "schedules" / args.target)
    print(f"schedules/{args.target}: {count} kernels")
    return 0


if __name__ == "__main__":
    sys.exit(main())
