"""Backends for one Forward-Forward layer step, and how one is chosen.

``reference`` runs the closed-form maths in plain torch on any device. ``triton`` runs fused
Triton kernels (on CUDA, or on the CPU through Triton's interpreter with ``TRITON_INTERPRET=1``).
``auto`` picks ``triton`` on a CUDA device where Triton imports, ``reference`` elsewhere, and
logs its choice.
"""

from __future__ import annotations

import logging

import torch

from ffkern.backends.base import Activations, Backend, FFLayer, StepOutput
from ffkern.backends.reference import ReferenceBackend

BACKENDS = ("auto", "reference", "triton")
PRECISIONS = ("fp32", "tf32", "bf16")

log = logging.getLogger(__name__)

__all__ = [
    "BACKENDS",
    "PRECISIONS",
    "Activations",
    "Backend",
    "FFLayer",
    "ReferenceBackend",
    "StepOutput",
    "get_backend",
]


def get_backend(name: str, device: torch.device | str, precision: str = "fp32") -> Backend:
    """The backend called ``name`` for ``device``; ``auto`` logs which one it picked."""
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    device = torch.device(device)
    if name == "auto":
        name = "triton" if device.type == "cuda" and _triton_available() else "reference"
        log.info("backend auto: picked %r for device %s", name, device)
    if name == "reference":
        if precision != "fp32":
            raise ValueError(f"the reference backend computes in float32 only, got {precision!r}")
        return ReferenceBackend()
    from ffkern.backends.triton import TritonBackend

    return TritonBackend(device=device, precision=precision)


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True
