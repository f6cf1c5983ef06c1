r"""Forward GEMM of one FF layer with the normalization, bias, ReLU and row statistics fused.

The layer input arrives unnormalized, as rows ``x`` (N, K) and their scale ``r`` (N,), and the
normalized copy ``x̂ = r ⊙ x`` is never written: because ``r`` is a per-row factor it commutes
with the product, so it is applied to the accumulator in the epilogue::

    acc  = x Wᵀ                       (N, D) float32 accumulator, one (BLOCK_M, BLOCK_N) tile
    z    = r ⊙ acc + b                = x̂ Wᵀ + b
    h    = relu(z)                    the only (N, D) tensor written
    q_i  = Σ_j h_ij²                  row sum of squares
    p_j  = Σ_{i < n_pos} h_ij         column sum over positive rows (peer normalization only)

``q`` and ``p`` need whole rows and whole columns, which no single program holds. Each program
writes its tile's share to a partial buffer, ``q_part[t, i]`` for column tile ``t`` and
``p_part[u, j]`` for row tile ``u``, and the partials are summed afterwards in a fixed order.
That costs (N + D) · #tiles floats, a few hundred KiB at the target shapes, and keeps the
result bit-for-bit reproducible, which float32 atomics would not.

The second, tiny kernel of this module turns ``q`` into every per-row quantity the rest of the
step needs, without another pass over ``h``::

    g_i  = q_i  (goodness "sum")   or   q_i / D  ("mean")
    r'_i = 1 / sqrt(q_i / D + ε)   (norm "rms")   or   1 / sqrt(q_i + ε)  ("l2")
    u_i  = s_i (g_i - θ) / T       s_i = σ₊ for i < n_pos, -σ₊ after
    ℓ_i  = softplus(-u_i) = max(-u_i, 0) + log(1 + exp(-|u_i|))
    c_i  = -κ s_i σ(-u_i) / (T N)  so that the FF part of dz is c ⊙ h

The sign ``σ₊`` is +1 for Hinton's objective (positives want goodness above θ) and -1 for the
reversed one (positives below θ). The logistic part (``u``, ``ℓ``, ``c``) is optional
(``LOGISTIC``): another objective (SymBa, say) computes its own ``(L, c)`` from ``g`` in torch
and skips it. ``L = (1/N) Σ ℓ_i`` is reduced the same
way as ``q``: one partial per program, summed afterwards.

Precision: see :mod:`ffkern.kernels.config`. ``x`` is float32 or bfloat16; each tile of ``x``
and of the float32 master ``W`` is cast to the dtype of ``h`` (the operand dtype) before
``tl.dot``. ``q`` and ``p`` come from the float32 ``h``, before it is rounded for storage.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .config import (
    DOT_PRECISION,
    LAUNCH_COUNTS,
    empty,
    gemm_config,
    is_interpreted,
    row_block,
)


@triton.jit
def ff_forward_kernel(
    x_ptr,  # (N, K) layer input rows, unnormalized; float32 or bfloat16
    scale_ptr,  # (N,) float32 input row scale r
    w_ptr,  # (D, K) float32 master weight W
    b_ptr,  # (D,) float32 bias b
    h_ptr,  # (N, D) out: activities h, in the operand dtype
    q_part_ptr,  # (T, N) out: float32 partial row sums of h², one row per column tile
    p_part_ptr,  # (U, D) out: float32 partial column sums of h over positive rows (PEER)
    N,
    D,
    K,
    stride_xn,
    stride_xk,
    stride_wd,
    stride_wk,
    stride_hn,
    stride_hd,
    n_pos,  # rows 0 .. n_pos-1 are positive
    group_m,  # row tiles that walk the column tiles together (L2 reuse of W)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,  # "ieee" or "tf32"
    PEER: tl.constexpr,  # emit p_part
):
    # Work split: one program per (BLOCK_M rows) x (BLOCK_N units) tile of h, grouped so that
    # group_m consecutive programs share a band of W.
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(N, BLOCK_M)
    tiles_n = tl.cdiv(D, BLOCK_N)
    band = group_m * tiles_n
    first_m = (pid // band) * group_m
    rows_in_group = tl.minimum(tiles_m - first_m, group_m)
    pid_m = first_m + (pid % band) % rows_in_group
    pid_n = (pid % band) // rows_in_group
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < N
    mask_n = offs_n < D
    operand = h_ptr.dtype.element_ty
    # ---- acc = x Wᵀ over the K loop -------------------------------------------------------
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + offs_k
        mask_k = kk < K
        x = tl.load(
            x_ptr + offs_m[:, None] * stride_xn + kk[None, :] * stride_xk,
            mask=mask_m[:, None] & mask_k[None, :],
            other=0.0,
        )
        # W is read as its transpose tile (BLOCK_K, BLOCK_N) straight from the (D, K) layout.
        w_t = tl.load(
            w_ptr + offs_n[None, :] * stride_wd + kk[:, None] * stride_wk,
            mask=mask_k[:, None] & mask_n[None, :],
            other=0.0,
        )
        acc = tl.dot(x.to(operand), w_t.to(operand), acc, input_precision=DOT_PRECISION)
    # ---- epilogue: z = r ⊙ acc + b, h = relu(z), partial statistics --------------------------
    r = tl.load(scale_ptr + offs_m, mask=mask_m, other=0.0)
    b = tl.load(b_ptr + offs_n, mask=mask_n, other=0.0)
    z = acc * r[:, None] + b[None, :]
    valid = mask_m[:, None] & mask_n[None, :]
    h = tl.where(valid, tl.maximum(z, 0.0), 0.0)
    tl.store(
        h_ptr + offs_m[:, None] * stride_hn + offs_n[None, :] * stride_hd,
        h.to(operand),
        mask=valid,
    )
    q_part = tl.sum(h * h, axis=1)
    tl.store(q_part_ptr + pid_n * N + offs_m, q_part, mask=mask_m)
    if PEER:
        positive = offs_m < n_pos
        p_part = tl.sum(tl.where(positive[:, None], h, 0.0), axis=0)
        tl.store(p_part_ptr + pid_m * D + offs_n, p_part, mask=mask_n)


@triton.jit
def ff_row_stats_kernel(
    q_part_ptr,  # (T, N) float32 partial row sums of h²
    q_ptr,  # (N,) out: float32 q
    g_ptr,  # (N,) out: float32 goodness g
    scale_out_ptr,  # (N,) out: float32 r', the normalization scale of h
    coef_ptr,  # (N,) out: float32 c (LOGISTIC)
    loss_part_ptr,  # (cdiv(N, BLOCK),) out: float32 partial sums of ℓ / N (LOGISTIC)
    N,
    T,  # number of partials per row
    n_pos,
    goodness_scale,  # 1 for "sum", 1/D for "mean"
    norm_scale,  # 1/D for "rms", 1 for "l2"
    norm_eps,  # ε
    positive_sign,  # σ₊: +1 (logistic) or -1 (reversed)
    theta,  # θ
    inv_temperature,  # 1/T
    coef_scale,  # κ / (T N)
    inv_rows,  # 1/N
    BLOCK: tl.constexpr,
    LOGISTIC: tl.constexpr,
):
    # Work split: one program per BLOCK rows; each sums its rows' T partials in order.
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    q = tl.zeros((BLOCK,), dtype=tl.float32)
    for t in range(0, T):
        q += tl.load(q_part_ptr + t * N + offs, mask=mask, other=0.0)
    g = q * goodness_scale
    scale_out = 1.0 / tl.sqrt(q * norm_scale + norm_eps)
    tl.store(q_ptr + offs, q, mask=mask)
    tl.store(g_ptr + offs, g, mask=mask)
    tl.store(scale_out_ptr + offs, scale_out, mask=mask)
    if LOGISTIC:
        s = tl.where(offs < n_pos, positive_sign, -positive_sign)
        u = s * (g - theta) * inv_temperature
        # softplus(-u) and σ(-u) from e = exp(-|u|) <= 1, which cannot overflow.
        e = tl.exp(-tl.abs(u))
        loss = tl.maximum(-u, 0.0) + tl.log(1.0 + e)
        sigma = tl.where(u > 0, e, 1.0) / (1.0 + e)
        coef = -coef_scale * s * sigma
        tl.store(coef_ptr + offs, coef, mask=mask)
        tl.store(loss_part_ptr + pid, tl.sum(tl.where(mask, loss, 0.0), axis=0) * inv_rows)


def forward_gemm(
    x: torch.Tensor,
    scale: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    n_pos: int = 0,
    peer: bool = False,
    precision: str = "fp32",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``h = relu(r ⊙ (x Wᵀ) + b)`` with its row sums of squares and positive column sums.

    Returns ``(h, q_part, p)``: ``h`` (N, D) in float32 (bfloat16 for ``precision="bf16"``),
    ``q_part`` (T, N) the float32 partial row sums of ``h²`` (sum over the first axis, or pass
    it to :func:`row_stats`), and ``p`` (D,) the float32 column sums of ``h`` over the first
    ``n_pos`` rows when ``peer`` is true (``None`` otherwise). Shapes and dtypes are the
    caller's to check (the backend does); ``x`` may have any strides.
    """
    n, k = x.shape
    d = weight.shape[0]
    interpreted = is_interpreted(ff_forward_kernel)
    cfg = gemm_config(precision, interpreted)
    operand = torch.bfloat16 if precision == "bf16" else torch.float32
    tiles_m = triton.cdiv(n, cfg.block_m)
    tiles_n = triton.cdiv(d, cfg.block_n)
    h = empty((n, d), x.device, operand)
    q_part = empty((tiles_n, n), x.device, torch.float32)
    p_part = empty((tiles_m if peer else 1, d), x.device, torch.float32)
    LAUNCH_COUNTS["ff_forward_kernel"] += 1
    ff_forward_kernel[(tiles_m * tiles_n,)](
        x,
        scale,
        weight,
        bias,
        h,
        q_part,
        p_part,
        n,
        d,
        k,
        x.stride(0),
        x.stride(1),
        weight.stride(0),
        weight.stride(1),
        h.stride(0),
        h.stride(1),
        n_pos,
        cfg.group_m,
        BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k,
        DOT_PRECISION=DOT_PRECISION[precision],
        PEER=peer,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    return h, q_part, (p_part.sum(dim=0) if peer else None)


def row_stats(
    q_part: torch.Tensor,
    width: int,
    n_pos: int,
    goodness: str,
    norm: str,
    norm_eps: float,
    logistic: tuple[float, float, float, float] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Per-row statistics from the partial sums of squares of a layer of ``width`` units.

    ``logistic`` is ``(θ, T, κ, σ₊)`` to also compute the logistic loss and its coefficient
    (σ₊ = +1 for Hinton's objective, -1 for the reversed one), or ``None`` to skip them.
    Returns ``(q, g, r', c, L)``, with ``c`` and the scalar ``L`` None when ``logistic`` is
    None. All results are float32 tensors on the device (no host sync).
    """
    t, n = q_part.shape
    block = row_block(is_interpreted(ff_row_stats_kernel))
    programs = triton.cdiv(n, block)
    dev = q_part.device
    q = empty((n,), dev, torch.float32)
    g = empty((n,), dev, torch.float32)
    scale_out = empty((n,), dev, torch.float32)
    # Without the logistic part, c and the loss partials are never written: q stands in.
    coef, loss_part = q, q
    if logistic is not None:
        coef = empty((n,), dev, torch.float32)
        loss_part = empty((programs,), dev, torch.float32)
    theta, temperature, kappa, positive_sign = (
        (0.0, 1.0, 0.0, 1.0) if logistic is None else logistic
    )
    LAUNCH_COUNTS["ff_row_stats_kernel"] += 1
    ff_row_stats_kernel[(programs,)](
        q_part,
        q,
        g,
        scale_out,
        coef,
        loss_part,
        n,
        t,
        n_pos,
        1.0 if goodness == "sum" else 1.0 / width,
        1.0 / width if norm == "rms" else 1.0,
        norm_eps,
        float(positive_sign),
        theta,
        1.0 / temperature,
        kappa / (temperature * n),
        1.0 / n,
        BLOCK=block,
        LOGISTIC=logistic is not None,
    )
    if logistic is None:
        return q, g, scale_out, None, None
    return q, g, scale_out, coef, loss_part.sum()
