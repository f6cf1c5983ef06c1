"""Profiler annotations: named NVTX ranges around the stages of a layer step.

``nvtx_range("ff.forward_gemm")`` marks a region in Nsight Systems timelines. Where the
``nvtx`` package is missing or no CUDA device is present it does nothing, silently, so the
training code can keep its annotations everywhere. Whether NVTX is usable is decided on the
first call, not at import, so importing this module never queries the GPU.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from functools import cache


@cache
def _nvtx():
    """The ``nvtx`` module when it imports and CUDA is available, else ``None``."""
    try:
        import nvtx
        import torch
    except ImportError:
        return None
    return nvtx if torch.cuda.is_available() else None


@contextlib.contextmanager
def nvtx_range(name: str) -> Iterator[None]:
    """Annotate the enclosed region as NVTX range ``name`` (a no-op without nvtx or CUDA).

    The range marks host-side time: kernels launched inside it are attributed to it in the
    timeline, but it does not wait for them to finish.
    """
    mod = _nvtx()
    if mod is None:
        yield
        return
    with mod.annotate(name, domain="ffkern"):
        yield
