"""What the CUDA tests read out of a built module: its CUDA source, and PTX from nvcc."""

from __future__ import annotations


def cuda_source(ex) -> str:
    """The CUDA C source of the device module imported by executable ``ex``."""

    def walk(m):
        yield m
        for sub in m.imports:
            yield from walk(sub)

    (cuda,) = [m for m in walk(ex.mod) if m.kind == "cuda"]
    return cuda.inspect_source()


def ptx(source: str, arch: str) -> str:
    """``source`` compiled to PTX by nvcc for ``arch`` (e.g. ``sm_87``)."""
    import tvm
    from tvm.support import nvcc

    with tvm.target.Target({"kind": "cuda", "arch": arch}):
        return bytes(nvcc.compile_cuda(source, target_format="ptx", arch=["-arch", arch], compiler="nvcc")).decode()
