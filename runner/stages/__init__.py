"""One module per stage; each has `run(ctx) -> metrics` and imports heavy libraries inside.

Importing this package (which every stage's import does, before anything imports torch) sets
PyTorch's CUDA caching allocator to expandable segments unless the environment chose allocator
settings already: training on packed rows of varying length otherwise fragments GPU memory
(figures: BENCHMARKS.md, "Measurements behind the code"). Only a variable is set, read by torch
when it loads; its name depends on torch's version (docs/compatibility.md).
"""

import os
from importlib import metadata


def allocator_variable() -> str | None:
    """The allocator settings variable the installed torch reads (None: no torch)."""
    try:
        major, minor = (int(x) for x in metadata.version("torch").split(".")[:2])
    except (metadata.PackageNotFoundError, ValueError):
        return None
    return "PYTORCH_ALLOC_CONF" if (major, minor) >= (2, 9) else "PYTORCH_CUDA_ALLOC_CONF"


chosen = os.environ.get("PYTORCH_ALLOC_CONF") or os.environ.get("PYTORCH_CUDA_ALLOC_CONF")
if not chosen and (name := allocator_variable()) is not None:
    os.environ[name] = "expandable_segments:True"
