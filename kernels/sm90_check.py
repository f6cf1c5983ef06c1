"""Compile every kernel configuration for Hopper (sm_90) without a GPU, and report its resources.

Triton ships ``ptxas``, so a kernel can be lowered all the way to a cubin on a machine with no
GPU. This checks what the interpreter cannot: that each kernel compiles for the GPU with the
block sizes of :mod:`ffkern.kernels.config`, how much shared memory it asks for (an H200 SM
has 227 KiB), whether the tensor-core precisions lower to ``wgmma``, and how many registers
each thread uses and how many bytes it spills to the stack (``STACK``). Run it with the
interpreter off::

    env -u TRITON_INTERPRET python -m ffkern.kernels.sm90_check

A configuration that fails to compile or spills more than ``MAX_SPILL_BYTES`` per thread
makes the check fail. It says nothing about speed.
"""

from __future__ import annotations

import inspect
import logging
import os
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from .config import DOT_PRECISION, PRECISIONS, ROW_BLOCK_GPU, gemm_config, is_interpreted
from .ff_forward import ff_forward_kernel, ff_row_stats_kernel
from .ff_row import ff_row_kernel
from .ff_wgrad import UPDATE_ADAM, UPDATE_NONE, UPDATE_SGD, ff_wgrad_kernel

log = logging.getLogger(__name__)

HOPPER = GPUTarget("cuda", 90, 32)
MAX_SPILL_BYTES = 64  # per thread; more fails the check

# Runtime scalars that are floats; every other non-pointer, non-constexpr argument is an int.
FLOAT_ARGS = {
    "goodness_scale", "norm_scale", "norm_eps", "positive_sign", "theta", "inv_temperature",
    "coef_scale", "inv_rows", "lr", "weight_decay", "momentum", "beta1", "beta2", "step_size",
    "sqrt_bias2", "eps",
}  # fmt: skip


# A launch at the target shape (8192 rows, 2000 -> 2000, contiguous tensors) specializes its
# integer arguments as Triton's launcher does: unit strides become the constant 1, and sizes,
# row strides and pointers are known multiples of 16. Without this the compiler cannot prove
# rows contiguous, and the check would judge code that no real launch runs.
UNIT_STRIDES = {"stride_xk", "stride_wk", "stride_hd", "stride_zd", "stride_od"}
MULTIPLES_OF_16 = {
    "N", "D", "K", "n_pos", "stride_xn", "stride_wd", "stride_hn", "stride_zn", "stride_on",
}  # fmt: skip


def compile_for_hopper(
    kernel, pointer_types: dict[str, str], constexprs: dict[str, object], warps: int, stages: int
) -> dict[str, object]:
    """Compile ``kernel`` for sm_90; returns its shared memory, wgmma use and ptxas resources."""
    signature, attrs = {}, {}
    constexprs = dict(constexprs)
    for i, name in enumerate(inspect.signature(kernel.fn).parameters):
        if name in UNIT_STRIDES:
            constexprs[name] = 1
        if name in constexprs:
            signature[name] = "constexpr"
            continue
        if name.endswith("_ptr"):
            signature[name] = pointer_types.get(name, "*fp32")
        else:
            signature[name] = "fp32" if name in FLOAT_ARGS else "i32"
        if name.endswith("_ptr") or name in MULTIPLES_OF_16:
            attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(
        src, target=HOPPER, options={"num_warps": warps, "num_stages": stages}
    )
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(compiled.asm["cubin"])
    tools = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    usage = subprocess.run(
        [os.path.join(tools, "cuobjdump"), "-res-usage", f.name],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    os.unlink(f.name)
    fields = {}
    for line in usage.splitlines():
        if "REG:" in line:
            fields = dict(item.split(":", 1) for item in line.split() if ":" in item)
    return {
        "shared": compiled.metadata.shared,
        "wgmma": "wgmma" in compiled.asm["ptx"],
        "registers": int(fields.get("REG", -1)),
        "spilled": int(fields.get("STACK", -1)),
    }


def configurations():
    """(label, kernel, pointer types, constexprs, warps, stages) of every launch the code makes."""
    for precision in PRECISIONS:
        operand = "*bf16" if precision == "bf16" else "*fp32"
        fwd = gemm_config(precision, False, "forward")
        wgr = gemm_config(precision, False, "wgrad")
        x_types = ("*fp32", "*bf16") if precision == "bf16" else ("*fp32",)
        for x_type in x_types:
            for peer in (False, True):
                yield (
                    f"forward {precision} x={x_type[1:]} peer={peer}",
                    ff_forward_kernel,
                    {"x_ptr": x_type, "h_ptr": operand},
                    {
                        "BLOCK_M": fwd.block_m, "BLOCK_N": fwd.block_n, "BLOCK_K": fwd.block_k,
                        "DOT_PRECISION": DOT_PRECISION[precision], "PEER": peer,
                    },
                    fwd.num_warps,
                    fwd.num_stages,
                )  # fmt: skip
        for x_type in x_types:
            for update in (UPDATE_NONE, UPDATE_SGD, UPDATE_ADAM):
                yield (
                    f"wgrad {precision} x={x_type[1:]} update={update}",
                    ff_wgrad_kernel,
                    {"x_ptr": x_type, "h_ptr": operand},
                    {
                        "BLOCK_M": wgr.block_m, "BLOCK_N": wgr.block_n, "BLOCK_K": wgr.block_k,
                        "DOT_PRECISION": DOT_PRECISION[precision], "PEER": True,
                        "UPDATE": update,
                    },
                    wgr.num_warps,
                    wgr.num_stages,
                )  # fmt: skip
    for logistic in (False, True):
        yield (
            f"row_stats logistic={logistic}",
            ff_row_stats_kernel,
            {},
            {"BLOCK": ROW_BLOCK_GPU, "LOGISTIC": logistic},
            4,
            1,
        )
    for out in ("*fp32", "*bf16"):
        yield (
            f"row out={out[1:]}",
            ff_row_kernel,
            {"h_ptr": out, "dz_ptr": out, "y_ptr": out},
            {"BLOCK_D": ROW_BLOCK_GPU, "PEER": True, "NORMALIZED": True},
            4,
            1,
        )


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if is_interpreted(ff_forward_kernel):
        log.error("TRITON_INTERPRET=1 is set: the kernels were built for the interpreter")
        return 2
    failures = 0
    for label, kernel, pointers, constexprs, warps, stages in configurations():
        try:
            r = compile_for_hopper(kernel, pointers, constexprs, warps, stages)
        except Exception as exc:  # report every failing configuration, then fail
            failures += 1
            log.error("FAIL %-36s %s: %s", label, type(exc).__name__, exc)
            continue
        # A few bytes of stack are bookkeeping; hundreds mean the tile does not fit.
        verdict = "ok  " if r["spilled"] <= MAX_SPILL_BYTES else "SPILL"
        failures += verdict != "ok  "
        log.info(
            "%s %-36s shared %6d B  wgmma %-5s  registers %3d  spilled %4d B",
            verdict, label, r["shared"], r["wgmma"], r["registers"], r["spilled"],
        )  # fmt: skip
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
