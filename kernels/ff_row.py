r"""The FF row kernel: activities, goodness, logistic loss and ``dz`` of given pre-activations.

This is the unfused building block (``TritonBackend(fusion="row")``): the matrix products run
in cuBLAS and this kernel does everything between them, for positive and negative rows in one
launch. For row ``i`` of ``z`` (N, D), with ``s_i = σ₊`` for ``i < n_pos`` and ``-σ₊`` after
(``σ₊ = +1`` for Hinton's objective, ``-1`` for the reversed one)::

    h_ij  = relu(z_ij)
    q_i   = Σ_j h_ij²
    g_i   = q_i  ("sum")   or   q_i / D  ("mean")
    u_i   = s_i (g_i - θ) / T
    ℓ_i   = softplus(-u_i)                           per-row logistic loss, L = mean_i ℓ_i
    c_i   = -κ s_i σ(-u_i) / (T N)
    dz_ij = c_i h_ij + [i < n_pos] φ_j 1[z_ij > 0]   φ: per-unit peer coefficients (PEER)
    r'_i  = 1 / sqrt(q_i / D + ε)  ("rms")   or   1 / sqrt(q_i + ε)  ("l2")
    y_ij  = r'_i h_ij                                the normalized output (NORMALIZED only)

Split reduction. ``c_i`` needs the whole row's ``q_i`` before any ``dz_ij`` can be written, and
rows of the target width (2000 and more) do not fit one block of registers. Each program
therefore owns one row and walks it twice in column blocks: the first loop accumulates ``q_i``,
the second re-reads ``z`` and writes ``h``, ``dz`` (and ``y``). The second read of a 8 KiB row
is served mostly from L2, so the cost is close to one pass; a two-kernel scheme (partial sums,
then outputs) would re-read ``z`` from HBM just the same and add a launch and a buffer. One row
per program gives N programs, plenty to fill the GPU at the batch sizes of interest (thousands).

Precision: ``z`` and ``φ`` are float32; ``h``, ``dz`` and ``y`` are stored in the dtype of the
output tensors (float32, or bfloat16 as matmul operands); ``q``, ``g``, ``ℓ``, ``c`` and ``r'``
are float32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .config import LAUNCH_COUNTS, empty, is_interpreted, row_block


@triton.jit
def ff_row_kernel(
    z_ptr,  # (N, D) float32 pre-activations
    peer_ptr,  # (D,) float32 peer coefficients φ (PEER)
    h_ptr,  # (N, D) out: activities h
    dz_ptr,  # (N, D) out: pre-activation gradient dz
    y_ptr,  # (N, D) out: normalized output r' ⊙ h (NORMALIZED)
    g_ptr,  # (N,) out: float32 goodness g
    loss_ptr,  # (N,) out: float32 per-row loss ℓ
    coef_ptr,  # (N,) out: float32 c
    scale_out_ptr,  # (N,) out: float32 r'
    N,
    D,
    stride_zn,
    stride_zd,
    stride_on,  # row stride of h, dz and y (allocated alike)
    stride_od,
    n_pos,
    goodness_scale,  # 1 for "sum", 1/D for "mean"
    norm_scale,  # 1/D for "rms", 1 for "l2"
    norm_eps,  # ε
    positive_sign,  # σ₊: +1 (logistic) or -1 (reversed)
    theta,  # θ
    inv_temperature,  # 1/T
    coef_scale,  # κ / (T N)
    BLOCK_D: tl.constexpr,
    PEER: tl.constexpr,
    NORMALIZED: tl.constexpr,
):
    # Work split: one program per row; two loops over its columns (see the module docstring).
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK_D)
    z_row = z_ptr + row * stride_zn
    # ---- loop 1: q = Σ_j relu(z_j)² ----------------------------------------------------------
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + offs
        z = tl.load(z_row + cols * stride_zd, mask=cols < D, other=0.0)
        h = tl.maximum(z, 0.0)
        acc += h * h
    q = tl.sum(acc, axis=0)
    # ---- row statistics ---------------------------------------------------------------------
    g = q * goodness_scale
    s = tl.where(row < n_pos, positive_sign, -positive_sign)
    u = s * (g - theta) * inv_temperature
    # softplus(-u) and σ(-u) from e = exp(-|u|) <= 1, which cannot overflow.
    e = tl.exp(-tl.abs(u))
    loss = tl.maximum(-u, 0.0) + tl.log(1.0 + e)
    coef = -coef_scale * s * tl.where(u > 0, e, 1.0) / (1.0 + e)
    scale_out = 1.0 / tl.sqrt(q * norm_scale + norm_eps)
    tl.store(g_ptr + row, g)
    tl.store(loss_ptr + row, loss)
    tl.store(coef_ptr + row, coef)
    tl.store(scale_out_ptr + row, scale_out)
    # ---- loop 2: h, dz = c h + [pos] φ 1[z > 0], y = r' h --------------------------------------
    positive = row < n_pos
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + offs
        mask = cols < D
        z = tl.load(z_row + cols * stride_zd, mask=mask, other=0.0)
        h = tl.maximum(z, 0.0)
        dz = coef * h
        if PEER:
            peer = tl.load(peer_ptr + cols, mask=mask, other=0.0)
            dz += tl.where(positive & (z > 0.0), peer, 0.0)
        out = row * stride_on + cols * stride_od
        tl.store(h_ptr + out, h.to(h_ptr.dtype.element_ty), mask=mask)
        tl.store(dz_ptr + out, dz.to(dz_ptr.dtype.element_ty), mask=mask)
        if NORMALIZED:
            tl.store(y_ptr + out, (scale_out * h).to(y_ptr.dtype.element_ty), mask=mask)


def ff_row(
    z: torch.Tensor,
    n_pos: int,
    peer: torch.Tensor | None,
    goodness: str,
    norm: str,
    norm_eps: float,
    theta: float,
    temperature: float,
    kappa: float,
    positive_sign: float = 1.0,
    out_dtype: torch.dtype = torch.float32,
    normalized: bool = False,
) -> dict[str, torch.Tensor]:
    """Run the row kernel on pre-activations ``z`` (N, D), float32, any strides.

    ``goodness`` is the goodness form ("sum" or "mean"), ``peer`` the per-unit peer
    coefficient φ (D,) or ``None`` when peer normalization is off, ``positive_sign`` σ₊ (+1 for
    Hinton's objective, -1 for the reversed one). Returns a dict with ``h``,
    ``dz`` (N, D) in ``out_dtype``, ``y`` (the normalized output, only when ``normalized``),
    and the float32 (N,) vectors ``g``, ``loss`` (per row; the layer loss is their mean),
    ``coef`` and ``scale_out``.
    """
    n, d = z.shape
    dev = z.device
    h = empty((n, d), dev, out_dtype)
    dz = empty((n, d), dev, out_dtype)
    y = empty((n, d), dev, out_dtype) if normalized else h
    vec = {name: empty((n,), dev, torch.float32) for name in _VECTORS}
    LAUNCH_COUNTS["ff_row_kernel"] += 1
    ff_row_kernel[(n,)](
        z,
        dz if peer is None else peer,
        h,
        dz,
        y,
        vec["g"],
        vec["loss"],
        vec["coef"],
        vec["scale_out"],
        n,
        d,
        z.stride(0),
        z.stride(1),
        h.stride(0),
        h.stride(1),
        n_pos,
        1.0 if goodness == "sum" else 1.0 / d,
        1.0 / d if norm == "rms" else 1.0,
        norm_eps,
        float(positive_sign),
        theta,
        1.0 / temperature,
        kappa / (temperature * n),
        BLOCK_D=min(row_block(is_interpreted(ff_row_kernel)), triton.next_power_of_2(d)),
        PEER=peer is not None,
        NORMALIZED=normalized,
    )
    out = {"h": h, "dz": dz, **vec}
    if normalized:
        out["y"] = y
    return out


_VECTORS = ("g", "loss", "coef", "scale_out")
