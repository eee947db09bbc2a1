"""Build-and-run helpers for the graph-pass tests (host target, default schedules)."""

from __future__ import annotations

import re

import pytest

pytest.importorskip("onnxruntime")


class HostBuild:
    """``legalize`` (fused or not) + default schedule + build for the host target."""

    def __init__(self):
        from hwcompress.targets import load_target

        self.spec = load_target("host")

    def legalize(self, mod, fuse: bool = True):
        import tvm

        from hwcompress.build import legalize_passes

        with self.spec.tvm_target():
            return tvm.transform.Sequential(legalize_passes(fuse))(mod)

    def kernels(self, mod, fuse: bool = True) -> list[str]:
        """Kernel names ``main`` calls, in call order, without the numbering suffix."""
        import tvm
        from tvm import relax

        names = []

        def visit(e):
            if isinstance(e, relax.Call) and isinstance(e.op, tvm.ir.Op) and e.op.name == "relax.call_tir":
                names.append(re.sub(r"\d+$", "", e.args[0].name_hint))

        relax.analysis.post_order_visit(self.legalize(mod, fuse)["main"].body, visit)
        return names

    def run(self, mod, x, fuse: bool = True):
        import tvm

        from hwcompress import build as B

        ex = B.build(B.schedule(self.legalize(mod, fuse), self.spec), self.spec)
        return tvm.relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()


@pytest.fixture(scope="session")
def host_build() -> HostBuild:
    return HostBuild()
