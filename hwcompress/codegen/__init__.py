"""Code generators for external (BYOC) targets; ``npu`` is the stub NPU."""
