"""Launch configuration shared by the Forward-Forward kernels: precisions and block sizes.

Precision contract (every kernel in this package follows it):

==========  ==========================  ======================  ============================
precision   matmul operands             ``tl.dot`` mode         everything else
==========  ==========================  ======================  ============================
``fp32``    float32                     ``"ieee"`` (exact FMA)  float32
``tf32``    float32 in memory           ``"tf32"`` (10-bit      float32
            (rounded to tf32 by the     mantissa products)
            tensor cores)
``bf16``    bfloat16: ``x`` and ``h``   bfloat16 inputs,        float32
            are stored as bfloat16; the float32 accumulator
            float32 master ``W`` is
            cast per tile
==========  ==========================  ======================  ============================

Whatever the precision, products accumulate in float32; master weights, biases and optimizer
state are float32; the per-row statistics (``q``, ``g``, ``c``, ``r``) and the per-unit peer
statistics are float32 and are computed from the float32 accumulator, before any rounding of
``h`` to bfloat16.

Only ``fp32`` runs under Triton's CPU interpreter (it has no bfloat16 arithmetic and no tensor
cores), so :func:`check_precision` rejects ``tf32`` and ``bf16`` there.

Block sizes come from a small table rather than ``triton.autotune``: the weight-gradient kernel
updates the parameters in place, so every autotuning trial would apply the update again (unless
each trial restored the parameters), and autotuning under the interpreter would take minutes.
The GPU rows are sized for the target shapes (thousands of rows, widths near 2000) on Hopper:
128-wide tiles for the tensor-core precisions, 64-wide for exact fp32, which runs on the FMA
units and gains nothing from larger tiles but register pressure.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch

PRECISIONS = ("fp32", "tf32", "bf16")

# tl.dot's input_precision per precision. bf16 operands ignore it; "tf32" is Triton's default
# on NVIDIA GPUs, so passing it there changes nothing.
DOT_PRECISION = {"fp32": "ieee", "tf32": "tf32", "bf16": "tf32"}

# Launches per kernel name since import, counted by the wrappers; the tests read it to prove
# that the kernels (and not a torch fallback) produced their results.
LAUNCH_COUNTS: Counter[str] = Counter()

# When true, every output buffer the wrappers allocate starts as NaN instead of uninitialized
# memory, so an element a kernel forgot to write shows up in a comparison. Tests switch it on;
# it costs one fill per buffer, so it stays off in training.
POISON_OUTPUTS = False


def empty(shape: tuple[int, ...], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """An output buffer: ``torch.empty``, or NaN-filled under :data:`POISON_OUTPUTS`."""
    out = torch.empty(shape, device=device, dtype=dtype)
    return out.fill_(float("nan")) if POISON_OUTPUTS else out


@dataclass(frozen=True)
class GemmConfig:
    """Tile sizes and launch parameters of one GEMM kernel."""

    block_m: int  # rows of the output tile
    block_n: int  # columns of the output tile
    block_k: int  # depth of one step of the reduction loop
    group_m: int  # output-tile rows that share a column band (L2 reuse of the right operand)
    num_warps: int
    num_stages: int


# Interpreter: one fixed configuration. Its cost is Python overhead per simulated program and
# per op, nearly independent of the block size, so fairly large blocks run fastest (64 x 64
# tiles were 5x faster than 32 x 32 on the test shapes); they still leave the test shapes
# (1, 7, 33, 130, 1000, 2049) partial tiles at the edges.
_INTERPRETER = GemmConfig(64, 64, 32, 4, 4, 1)

# GPU (Hopper), checked by compiling for sm_90 offline with python -m ffkern.kernels.sm90_check
# (every configuration lowers to wgmma where it should, fits shared memory, spills nothing);
# never timed, for want of a GPU. Tensor-core precisions use 128 x 128 tiles and 8 warps (two
# warpgroups issuing wgmma), with a 64-deep reduction step in bf16 (3 stages: 128 KiB of shared
# memory in the forward GEMM, 89 KiB in the weight gradient) and 32 in tf32 (3 stages, 96 KiB).
# Exact fp32 runs on the FMA units and gains nothing from larger tiles but register pressure.
_GPU_FORWARD = {
    "fp32": GemmConfig(64, 64, 32, 8, 4, 3),
    "tf32": GemmConfig(128, 128, 32, 8, 8, 3),
    "bf16": GemmConfig(128, 128, 64, 8, 8, 3),
}
_GPU_WGRAD = {
    "fp32": GemmConfig(64, 64, 32, 8, 4, 3),
    "tf32": GemmConfig(128, 128, 32, 8, 8, 3),
    "bf16": GemmConfig(128, 128, 64, 8, 8, 3),
}

# The row kernels: columns handled per loop step, and rows per launch of the row statistics.
ROW_BLOCK_INTERPRETER = 1024
ROW_BLOCK_GPU = 1024


def gemm_config(precision: str, interpreted: bool, kernel: str = "forward") -> GemmConfig:
    """The block sizes of GEMM ``kernel`` ("forward" or "wgrad") for ``precision``."""
    if interpreted:
        return _INTERPRETER
    return (_GPU_FORWARD if kernel == "forward" else _GPU_WGRAD)[precision]


def row_block(interpreted: bool) -> int:
    """Columns per loop step of the row kernel."""
    return ROW_BLOCK_INTERPRETER if interpreted else ROW_BLOCK_GPU


def is_interpreted(kernel: object) -> bool:
    """Whether ``kernel`` (a ``triton.jit`` object) runs on Triton's CPU interpreter.

    ``triton.jit`` decides once, when the kernel is defined, from ``TRITON_INTERPRET``; asking
    the kernel object rather than the environment keeps the answer true even if the variable
    changed after import.
    """
    return type(kernel).__name__ == "InterpretedFunction"


def check_precision(precision: str, interpreted: bool, device_type: str) -> None:
    """Raise ``ValueError`` when ``precision`` cannot run on this device or on the interpreter."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if device_type == "cpu" and not interpreted:
        raise ValueError(
            "Triton kernels on a CPU device need Triton's interpreter: set TRITON_INTERPRET=1 "
            "before triton is first imported (got a CPU device with the interpreter off)"
        )
    if device_type not in ("cpu", "cuda"):
        raise ValueError(f"the triton backend runs on 'cuda' or 'cpu' devices, got {device_type!r}")
    if interpreted and precision != "fp32":
        raise ValueError(
            f"Triton's interpreter computes in fp32 only (no bfloat16 arithmetic, no tensor "
            f"cores), got precision {precision!r}; use precision 'fp32' or a CUDA device"
        )
