r"""Weight-gradient GEMM of one FF layer with the optimizer update fused into its epilogue.

Neither the pre-activation gradient ``dz`` nor the normalized input ``x̂`` is ever written:
each program rebuilds the tiles it needs from ``h`` (N, D), the row coefficients ``c`` (N,),
the peer coefficients ``φ`` (D,), the unnormalized input ``x`` (N, K) and its scale ``r`` (N,)::

    dz_ij  = c_i h_ij + [i < n_pos] φ_j 1[h_ij > 0]       (1[h > 0] = 1[z > 0])
    dzr_ij = r_i dz_ij                                   so that dzrᵀ x = dzᵀ (r ⊙ x) = dzᵀ x̂
    dW     = Σ_i dzr_iᵀ x_i                              (D, K), accumulated over row blocks
    db     = Σ_i dz_i                                    (D,), by the programs of column tile 0

The epilogue then applies one optimizer step to its tile of ``W`` (and, in column tile 0, to
the matching slice of ``b``), so ``dW`` never reaches memory either. The update equations are
those of :mod:`ffkern.optim`, with ``γ = dW + λ W`` the decayed gradient:

    SGD:   v = μ v + γ;   W = W - η v
    Adam:  m = β1 m + (1 - β1) γ;   v = β2 v + (1 - β2) γ²;
           W = W - (η / (1 - β1^t)) · m / (sqrt(v) / sqrt(1 - β2^t) + ε)

``(1 - β1^t)`` and ``sqrt(1 - β2^t)`` are computed on the host from the step count, which the
host already knows, so no value crosses from the device.

Data parallelism: with a ``reduce`` hook every rank must average ``dW`` and ``db`` before the
update, so ``UPDATE = 0`` stores them instead and the caller reduces and then updates in torch.
That writes and rereads ``dW`` (2 · D · K floats, plus the optimizer's own pass), which the
fused epilogue avoids; it is the price of exchanging gradients between ranks.

Precision: see :mod:`ffkern.kernels.config`. ``dzr`` is formed in float32 and rounded to the
operand dtype (bfloat16 for ``bf16``) just before ``tl.dot``, like the ``x`` tile; the
accumulator, ``db``, the master weights and the optimizer state are float32.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ffkern.optim import OptimConfig

from .config import DOT_PRECISION, LAUNCH_COUNTS, empty, gemm_config, is_interpreted

UPDATE_NONE, UPDATE_SGD, UPDATE_ADAM = 0, 1, 2


@triton.jit
def _sgd_step(p, grad, buf, lr, weight_decay, momentum):
    # γ = g + λ p;  v = μ v + γ;  p = p - η v
    grad = grad + weight_decay * p
    buf = momentum * buf + grad
    return p - lr * buf, buf


@triton.jit
def _adam_step(p, grad, m, v, weight_decay, beta1, beta2, step_size, sqrt_bias2, eps):
    # γ = g + λ p;  m, v moving moments;  p = p - step_size · m / (sqrt(v) / sqrt_bias2 + ε)
    grad = grad + weight_decay * p
    m = beta1 * m + (1.0 - beta1) * grad
    v = beta2 * v + (1.0 - beta2) * grad * grad
    return p - step_size * (m / (tl.sqrt(v) / sqrt_bias2 + eps)), m, v


@triton.jit
def _update(
    p_ptr,
    s1_ptr,
    s2_ptr,
    offsets,
    mask,
    grad,
    lr,
    weight_decay,
    momentum,
    beta1,
    beta2,
    step_size,
    sqrt_bias2,
    eps,
    UPDATE: tl.constexpr,
):
    # Load a parameter block and its state, apply one SGD or Adam step with gradient grad,
    # store them back.
    p = tl.load(p_ptr + offsets, mask=mask, other=0.0)
    s1 = tl.load(s1_ptr + offsets, mask=mask, other=0.0)
    if UPDATE == 1:
        p, s1 = _sgd_step(p, grad, s1, lr, weight_decay, momentum)
    else:
        s2 = tl.load(s2_ptr + offsets, mask=mask, other=0.0)
        p, s1, s2 = _adam_step(
            p, grad, s1, s2, weight_decay, beta1, beta2, step_size, sqrt_bias2, eps
        )
        tl.store(s2_ptr + offsets, s2, mask=mask)
    tl.store(p_ptr + offsets, p, mask=mask)
    tl.store(s1_ptr + offsets, s1, mask=mask)


@triton.jit
def ff_wgrad_kernel(
    h_ptr,  # (N, D) activities h, operand dtype
    x_ptr,  # (N, K) layer input rows, unnormalized; float32 or bfloat16
    scale_ptr,  # (N,) float32 input row scale r
    coef_ptr,  # (N,) float32 row coefficients c
    peer_ptr,  # (D,) float32 peer coefficients φ (PEER)
    w_ptr,  # (D, K) float32 master weight, updated in place (UPDATE > 0)
    b_ptr,  # (D,) float32 bias, updated in place (UPDATE > 0)
    w_s1_ptr,  # (D, K) float32: SGD momentum or Adam m of W; out: dW when UPDATE = 0
    w_s2_ptr,  # (D, K) float32: Adam v of W (UPDATE = 2)
    b_s1_ptr,  # (D,) float32: SGD momentum or Adam m of b; out: db when UPDATE = 0
    b_s2_ptr,  # (D,) float32: Adam v of b (UPDATE = 2)
    N,
    D,
    K,
    stride_hn,
    stride_hd,
    stride_xn,
    stride_xk,
    stride_wd,  # shared by W and its state tensors
    stride_wk,
    n_pos,
    lr,  # η (SGD)
    weight_decay,  # λ
    momentum,  # μ (SGD)
    beta1,
    beta2,
    step_size,  # η / (1 - β1^t) (Adam)
    sqrt_bias2,  # sqrt(1 - β2^t) (Adam)
    eps,  # Adam ε
    group_m,
    BLOCK_M: tl.constexpr,  # units (rows of dW) per tile
    BLOCK_N: tl.constexpr,  # inputs (columns of dW) per tile
    BLOCK_K: tl.constexpr,  # batch rows per step of the reduction loop
    DOT_PRECISION: tl.constexpr,
    PEER: tl.constexpr,
    UPDATE: tl.constexpr,  # 0: store dW, db; 1: SGD; 2: Adam
):
    # Work split: one program per (BLOCK_M units) x (BLOCK_N inputs) tile of dW, reducing over
    # all N rows; column tile 0 also reduces db for its units.
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(D, BLOCK_M)
    tiles_n = tl.cdiv(K, BLOCK_N)
    band = group_m * tiles_n
    first_m = (pid // band) * group_m
    rows_in_group = tl.minimum(tiles_m - first_m, group_m)
    pid_m = first_m + (pid % band) % rows_in_group
    pid_n = (pid % band) // rows_in_group
    offs_d = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_b = tl.arange(0, BLOCK_K)
    mask_d = offs_d < D
    mask_k = offs_k < K
    operand = h_ptr.dtype.element_ty
    if PEER:
        peer = tl.load(peer_ptr + offs_d, mask=mask_d, other=0.0)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    db = tl.zeros((BLOCK_M,), dtype=tl.float32)
    # ---- dW = Σ_i dzr_iᵀ x_i over row blocks ---------------------------------------------
    for i0 in range(0, N, BLOCK_K):
        rows = i0 + offs_b
        mask_i = rows < N
        # h read as its transpose tile (BLOCK_M units, BLOCK_K rows).
        h_t = tl.load(
            h_ptr + rows[None, :] * stride_hn + offs_d[:, None] * stride_hd,
            mask=mask_d[:, None] & mask_i[None, :],
            other=0.0,
        ).to(tl.float32)
        c = tl.load(coef_ptr + rows, mask=mask_i, other=0.0)
        r = tl.load(scale_ptr + rows, mask=mask_i, other=0.0)
        dz_t = h_t * c[None, :]
        if PEER:
            on = (rows[None, :] < n_pos) & (h_t > 0.0)
            dz_t += tl.where(on, peer[:, None], 0.0)
        if pid_n == 0:
            db += tl.sum(dz_t, axis=1)
        x = tl.load(
            x_ptr + rows[:, None] * stride_xn + offs_k[None, :] * stride_xk,
            mask=mask_i[:, None] & mask_k[None, :],
            other=0.0,
        )
        dzr_t = (dz_t * r[None, :]).to(operand)
        acc = tl.dot(dzr_t, x.to(operand), acc, input_precision=DOT_PRECISION)
    # ---- epilogue: the optimizer step on this tile (or store dW, db) ------------------------
    if UPDATE == 0:
        tile = offs_d[:, None] * stride_wd + offs_k[None, :] * stride_wk
        tl.store(w_s1_ptr + tile, acc, mask=mask_d[:, None] & mask_k[None, :])
        if pid_n == 0:
            tl.store(b_s1_ptr + offs_d, db, mask=mask_d)
    else:
        # Adam holds dW, W and two state tiles at once; for a whole 128 x 128 tile that
        # overflows the register file (ptxas spilled ~0.7 KB per thread for sm_90), so the
        # tile is updated in two column halves, one after the other (no spill).
        halves = tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1)))
        for half in tl.static_range(2):
            cols = pid_n * BLOCK_N + half * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2)
            _update(
                w_ptr, w_s1_ptr, w_s2_ptr,
                offs_d[:, None] * stride_wd + cols[None, :] * stride_wk,
                mask_d[:, None] & (cols[None, :] < K),
                halves[half],
                lr, weight_decay, momentum, beta1, beta2, step_size, sqrt_bias2, eps, UPDATE,
            )  # fmt: skip
        if pid_n == 0:
            _update(
                b_ptr, b_s1_ptr, b_s2_ptr, offs_d, mask_d, db,
                lr, weight_decay, momentum, beta1, beta2, step_size, sqrt_bias2, eps, UPDATE,
            )  # fmt: skip


def _launch(
    h: torch.Tensor,
    x: torch.Tensor,
    scale: torch.Tensor,
    coef: torch.Tensor,
    peer: torch.Tensor | None,
    n_pos: int,
    weight: torch.Tensor,
    bias: torch.Tensor,
    w_state: tuple[torch.Tensor, torch.Tensor],
    b_state: tuple[torch.Tensor, torch.Tensor],
    scalars: tuple[float, ...],
    update: int,
    precision: str,
) -> None:
    n, k = x.shape
    d = h.shape[1]
    cfg = gemm_config(precision, is_interpreted(ff_wgrad_kernel), "wgrad")
    # dW is (D, K): its tile rows run over units, its columns over inputs, its depth over rows.
    tiles = triton.cdiv(d, cfg.block_m) * triton.cdiv(k, cfg.block_n)
    LAUNCH_COUNTS["ff_wgrad_kernel"] += 1
    ff_wgrad_kernel[(tiles,)](
        h,
        x,
        scale,
        coef,
        coef if peer is None else peer,
        weight,
        bias,
        w_state[0],
        w_state[1],
        b_state[0],
        b_state[1],
        n,
        d,
        k,
        h.stride(0),
        h.stride(1),
        x.stride(0),
        x.stride(1),
        weight.stride(0),
        weight.stride(1),
        n_pos,
        *scalars,
        cfg.group_m,
        BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k,
        DOT_PRECISION=DOT_PRECISION[precision],
        PEER=peer is not None,
        UPDATE=update,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )


def weight_grad(
    h: torch.Tensor,
    x: torch.Tensor,
    scale: torch.Tensor,
    coef: torch.Tensor,
    peer: torch.Tensor | None,
    n_pos: int,
    precision: str = "fp32",
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dW, db)`` of the layer, materialized (for a data-parallel reduce before the update).

    ``peer`` is the per-unit peer coefficient φ (D,) or ``None`` when peer normalization is
    off. ``dW`` has the (D, K) layout of the weight.
    """
    d, k = h.shape[1], x.shape[1]
    dw = empty((d, k), h.device, torch.float32)
    db = empty((d,), h.device, torch.float32)
    scalars = (0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0)
    _launch(h, x, scale, coef, peer, n_pos, dw, db, (dw, dw), (db, db), scalars, 0, precision)
    return dw, db


def weight_grad_update_(
    h: torch.Tensor,
    x: torch.Tensor,
    scale: torch.Tensor,
    coef: torch.Tensor,
    peer: torch.Tensor | None,
    n_pos: int,
    weight: torch.Tensor,
    bias: torch.Tensor,
    state: dict[str, torch.Tensor],
    opt: OptimConfig,
    lr: float,
    step: int,
    precision: str = "fp32",
) -> None:
    """Compute ``dW``, ``db`` tile by tile and apply one optimizer step to ``weight``, ``bias``.

    ``state`` holds the optimizer state under the keys of
    :func:`ffkern.backends.reference.ensure_opt_state` ("weight.momentum", ... for SGD;
    "weight.exp_avg", "weight.exp_avg_sq", ... for Adam), each with its parameter's layout.
    ``step`` is the 1-based count of this update (Adam's t). Everything is updated in place.
    """
    beta1, beta2 = opt.betas
    if opt.name == "sgd":
        w_state = (state["weight.momentum"],) * 2
        b_state = (state["bias.momentum"],) * 2
        update = UPDATE_SGD
    else:
        w_state = (state["weight.exp_avg"], state["weight.exp_avg_sq"])
        b_state = (state["bias.exp_avg"], state["bias.exp_avg_sq"])
        update = UPDATE_ADAM
    scalars = (
        lr,
        opt.weight_decay,
        opt.momentum,
        beta1,
        beta2,
        lr / (1.0 - beta1**step),
        math.sqrt(1.0 - beta2**step),
        opt.eps,
    )
    _launch(
        h, x, scale, coef, peer, n_pos, weight, bias, w_state, b_state, scalars, update, precision
    )
