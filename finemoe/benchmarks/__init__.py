"""Benchmarks measured side by side in one process (torch only, no CLI code)."""

import os

# The environment that decides how the CPU allocator treats the MoE layer's large temporaries; every
# benchmark prints it, since ratios measured under different settings are not comparable.
ALLOCATOR_VARS = (
    "MALLOC_MMAP_THRESHOLD_",
    "MALLOC_TRIM_THRESHOLD_",
    "MALLOC_TOP_PAD_",
    "GLIBC_TUNABLES",
    "LD_PRELOAD",
)


def allocator_settings() -> dict[str, str | None]:
    return {k: os.environ.get(k) for k in ALLOCATOR_VARS}
