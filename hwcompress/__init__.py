"""hwcompress: a hardware-aware compiler frontend on Apache TVM.

ONNX model in; compressed, tuned, verified module for one device out. ``import hwcompress``
stays light: TVM, ONNX Runtime and XGBoost are imported only when a function needs them.

Importing it makes the TVM runtime of this process (and of the workers it starts) use every
CPU it may run on, unless ``TVM_NUM_THREADS`` / ``OMP_NUM_THREADS`` is set: TVM's own default
on x86 is half the logical CPUs, one thread on a 2-core VM (see ``hwcompress.threads``).
"""

__version__ = "0.1.0"

from .threads import use_all_cores  # noqa: E402

use_all_cores()

from .errors import HwcError  # noqa: E402
from .recipe import Recipe  # noqa: E402
from .targets import TargetSpec, list_targets, load_target  # noqa: E402

__all__ = [
    "Artifact",
    "ChannelPrune",
    "HwcError",
    "Int8DataFree",
    "Int8Static",
    "Optimize",
    "Recipe",
    "Sparse24",
    "TargetSpec",
    "compile",
    "import_onnx",
    "list_targets",
    "load",
    "load_target",
    "prune",
    "quantize",
    "sparsify",
    "tune",
]


def compile(model, target="host", out="artifact", input_shapes=None, recipe=None, **options):  # noqa: A001
    """Compile an ONNX model into a verified artifact; see ``hwcompress.api.compile``."""
    from .api import compile as _compile

    return _compile(model, target, out, input_shapes, recipe, **options)


def load(path):
    """Open an artifact directory; see ``hwcompress.runtime.load``."""
    from .runtime import load as _load

    return _load(path)


def tune(model, target="host", trials=64, work_dir=None, tracker=None, **options):
    """Autotune a model's kernels for a target; see ``hwcompress.tuning.tune``."""
    from .tuning import tune as _tune

    return _tune(model, target, trials, work_dir, tracker, **options)


def import_onnx(model, input_shapes=None):
    """Import an ONNX model into a Relax ``tvm.IRModule`` (weights bound as constants)."""
    from .frontend import import_onnx as _import

    return _import(model, input_shapes)


def prune(mod, config, spec=None):
    """Structured channel pruning of a Relax module; see ``hwcompress.passes.prune.prune``."""
    from .passes.prune import prune as _prune

    return _prune(mod, config, spec)


def quantize(mod, config, spec=None):
    """INT8 quantization of a Relax module with integer kernels (``Int8Static``); see
    ``hwcompress.passes.quantize.int8.quantize``."""
    from .passes.quantize.int8 import quantize as _quantize

    return _quantize(mod, config, spec)


def sparsify(mod, config=None, spec=None):
    """2:4 structured sparsity of a Relax module's convs / matmuls (``Sparse24``); see
    ``hwcompress.passes.sparsity.sparse24.sparsify``."""
    from .passes.sparsity import Sparse24, sparsify as _sparsify

    return _sparsify(mod, config if config is not None else Sparse24(), spec)


def __getattr__(name):
    if name in ("Int8Static", "Int8DataFree"):
        from .passes.quantize import int8

        return getattr(int8, name)
    if name == "Sparse24":
        from .passes.sparsity import Sparse24

        return Sparse24
    if name == "ChannelPrune":
        from .passes.prune import ChannelPrune

        return ChannelPrune
    if name in ("Optimize", "Switch"):
        from . import optimize

        return getattr(optimize, name)
    if name == "Artifact":
        from .runtime import Artifact

        return Artifact
    raise AttributeError(name)
