r"""The ``triton`` backend: one FF layer step in three fused kernels.

With ``fusion="gemm"`` (the default) a training step of a layer is::

    forward GEMM     h = relu(r ⊙ (x Wᵀ) + b),  q_part, p        (ffkern.kernels.ff_forward)
    row statistics   q → g, r', and (L, c) from the objective    (ffkern.kernels.ff_forward)
    peer statistics  p → m, φ                                    (torch on D-vectors)
    weight gradient  dW = Σ_i (r_i dz_i)ᵀ x_i, db, fused update  (ffkern.kernels.ff_wgrad)

so the only (N, D) tensor written is ``h``, which the next layer needs anyway; ``x̂``, ``z``,
``dz`` and ``dW`` stay on chip. The maths is that of :mod:`ffkern.reference`; each kernel
module states the part it computes.

The objective (goodness ``g`` → loss ``L`` and row coefficients ``c``, with ``dz = c ⊙ h`` plus
the peer term) is one replaceable step, :meth:`TritonBackend.loss_and_coef`. The logistic loss
and its reversed form run inside the row statistics kernel; every other objective of
:mod:`ffkern.reference` (SymBa) runs in torch on the (N,) goodness vector, through
:func:`ffkern.reference.loss_and_coef`. ``TritonBackend(objective=f)`` replaces that choice by
``f(g, n_pos, obj, width) -> (L, c)`` in torch, for any objective whose gradient is a per-row
scaling of ``h``.

With a data-parallel ``reduce`` hook the fused update cannot be used, since the update needs
the average of ``dW`` over ranks: the weight-gradient kernel then stores ``dW`` and ``db``,
``reduce`` averages them and :func:`ffkern.backends.reference.apply_update` applies the update
in torch. That costs one write and two reads of ``dW`` (plus the optimizer state's own
traffic), about 2 · D · K · 4 bytes more than the fused epilogue, and several extra launches.

``fusion="row"`` is the simpler comparison mode: torch matmuls (cuBLAS) for ``z = x̂ Wᵀ + b``
and ``dW = dzᵀ x̂``, the row kernel (:mod:`ffkern.kernels.ff_row`) in between, and the torch
update. It materializes ``x̂``, ``z`` and ``dz`` and supports only the objectives the row kernel
computes (logistic and reversed). In ``bf16`` its ``dW`` comes out of cuBLAS rounded to
bfloat16 (the fused path keeps it in float32).

Precision (``fp32``, ``tf32``, ``bf16``) follows the contract of
:mod:`ffkern.kernels.config`; in ``bf16`` the activations handed to the next layer are
bfloat16 while their scales stay float32.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch

from ffkern import reference
from ffkern.backends.base import Activations, Backend, FFLayer, StepOutput
from ffkern.backends.reference import apply_update, ensure_opt_state
from ffkern.kernels import config as kconfig
from ffkern.kernels.ff_forward import ff_forward_kernel, forward_gemm, row_stats
from ffkern.kernels.ff_row import ff_row
from ffkern.kernels.ff_wgrad import weight_grad, weight_grad_update_
from ffkern.optim import OptimConfig
from ffkern.profiling import nvtx_range
from ffkern.reference import LayerObjective, Reduce

# goodness g (N,), n_pos, objective, width D -> (loss L (), row coefficients c (N,))
Objective = Callable[[torch.Tensor, int, LayerObjective, int], tuple[torch.Tensor, torch.Tensor]]

FUSIONS = ("gemm", "row")

# Objectives computed inside the kernels, with their sign σ₊ of the positive rows.
KERNEL_OBJECTIVES = {"logistic": 1.0, "reversed": -1.0}


class TritonBackend(Backend):
    """Fused Triton kernels on CUDA, or on the CPU through ``TRITON_INTERPRET=1``."""

    name = "triton"

    def __init__(
        self,
        device: torch.device | str = "cuda",
        precision: str = "fp32",
        fusion: str = "gemm",
        objective: Objective | None = None,
    ) -> None:
        self.device = torch.device(device)
        self.interpreted = kconfig.is_interpreted(ff_forward_kernel)
        kconfig.check_precision(precision, self.interpreted, self.device.type)
        if fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {FUSIONS}, got {fusion!r}")
        if fusion == "row" and objective is not None:
            raise ValueError(
                "fusion='row' computes the logistic loss inside the row kernel and takes no "
                f"objective; got objective={objective!r} (use fusion='gemm')"
            )
        self.precision = precision
        self.fusion = fusion
        self.objective = objective
        self.operand = torch.bfloat16 if precision == "bf16" else torch.float32

    def describe(self) -> str:
        where = "Triton interpreter on the CPU" if self.interpreted else f"{self.device}"
        custom = ""
        if self.objective is not None:
            custom = f", objective {getattr(self.objective, '__name__', repr(self.objective))}"
        return f"triton (precision {self.precision}, fusion {self.fusion}{custom}, {where})"

    # ---- the seam ------------------------------------------------------------------------

    def normalize(self, x: torch.Tensor, obj: LayerObjective) -> Activations:
        self._check_tensor("x", x, 2, (torch.float32, self.operand))
        return Activations(x, reference.norm_scale(x.float(), obj.norm, obj.norm_eps))

    def forward(
        self, layer: FFLayer, inp: Activations, obj: LayerObjective
    ) -> tuple[torch.Tensor, Activations]:
        x, scale = self._check(layer, inp, 0)
        if self.fusion == "row":
            g, out, _ = self._row_forward(layer, x, scale, 0, obj, peer=None)
            return g, out
        with nvtx_range("ff.forward_gemm"):
            h, q_part, _ = forward_gemm(
                x, scale, layer.weight, layer.bias, precision=self.precision
            )
        with nvtx_range("ff.row_stats"):
            _, g, scale_out, _, _ = row_stats(
                q_part, layer.out_features, 0, obj.goodness, obj.norm, obj.norm_eps
            )
        return g, Activations(h, scale_out)

    def step(
        self,
        layer: FFLayer,
        inp: Activations,
        n_pos: int,
        obj: LayerObjective,
        opt: OptimConfig,
        lr: float,
        reduce: Reduce | None = None,
    ) -> StepOutput:
        x, scale = self._check(layer, inp, n_pos)
        if self.fusion == "row":
            return self._row_step(layer, x, scale, n_pos, obj, opt, lr, reduce)
        width = layer.out_features
        peer_on = obj.peer_strength > 0 and n_pos > 0 and not layer.frozen
        with nvtx_range("ff.forward_gemm"):
            h, q_part, p_sum = forward_gemm(
                x, scale, layer.weight, layer.bias, n_pos, peer_on, self.precision
            )
        with nvtx_range("ff.row_stats"):
            g, scale_out, loss, coef = self.loss_and_coef(q_part, n_pos, obj, width)
            out = StepOutput(loss=loss, goodness=g, out=Activations(h, scale_out))
            if layer.frozen:
                return out
            peer = None
            if peer_on:
                layer.peer_mean, peer = _peer_coefficients(
                    p_sum, n_pos, layer.peer_mean, obj, reduce
                )
        with nvtx_range("ff.weight_grad_update"):
            if reduce is None:
                state = self._opt_state(layer, opt)
                weight_grad_update_(
                    h, x, scale, coef, peer, n_pos, layer.weight, layer.bias, state, opt,
                    lr, layer.step + 1, self.precision,
                )  # fmt: skip
                layer.step += 1
            else:
                dw, db = weight_grad(h, x, scale, coef, peer, n_pos, self.precision)
                apply_update(layer, reduce(dw), reduce(db), opt, lr)
        return out

    def loss_and_coef(
        self, q_part: torch.Tensor, n_pos: int, obj: LayerObjective, width: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The objective step: ``(g, r', L, c)`` from the forward GEMM's partial sums of h².

        The logistic loss (and its reversed form) is computed by the row statistics kernel in
        the same launch as ``g`` and ``r'``; any other objective, or the backend's custom
        :data:`Objective`, gets ``g`` and returns ``(L, c)`` computed in torch.
        """
        if self.objective is None and obj.objective in KERNEL_OBJECTIVES:
            sign = KERNEL_OBJECTIVES[obj.objective]
            logistic = (obj.theta(width), obj.temperature, obj.kappa(width), sign)
            _, g, scale_out, coef, loss = row_stats(
                q_part, width, n_pos, obj.goodness, obj.norm, obj.norm_eps, logistic
            )
            return g, scale_out, loss, coef
        _, g, scale_out, _, _ = row_stats(
            q_part, width, n_pos, obj.goodness, obj.norm, obj.norm_eps
        )
        fn = self.objective if self.objective is not None else reference.loss_and_coef
        loss, coef = fn(g, n_pos, obj, width)
        if coef.shape != g.shape or coef.dtype != torch.float32:
            raise ValueError(
                f"the objective must return float32 coefficients of shape {tuple(g.shape)}, "
                f"got {coef.dtype} of shape {tuple(coef.shape)}"
            )
        return g, scale_out, loss, coef.contiguous()

    # ---- fusion="row": cuBLAS + the row kernel ------------------------------------------------

    def _row_forward(
        self,
        layer: FFLayer,
        x: torch.Tensor,
        scale: torch.Tensor,
        n_pos: int,
        obj: LayerObjective,
        peer: Callable[[torch.Tensor], torch.Tensor | None] | None,
    ) -> tuple[torch.Tensor, Activations, dict[str, torch.Tensor]]:
        width = layer.out_features
        with nvtx_range("ff.forward_gemm"):
            xn = (x.float() * scale[:, None]).to(self.operand)
            z = self._matmul(xn, layer.weight.to(self.operand).t()).float() + layer.bias
        with nvtx_range("ff.row_stats"):
            phi = peer(z) if peer is not None else None
            res = ff_row(
                z, n_pos, phi, obj.goodness, obj.norm, obj.norm_eps, obj.theta(width),
                obj.temperature, obj.kappa(width), KERNEL_OBJECTIVES.get(obj.objective, 1.0),
                out_dtype=self.operand,
            )  # fmt: skip
        res["xn"] = xn
        return res["g"], Activations(res["h"], res["scale_out"]), res

    def _row_step(
        self,
        layer: FFLayer,
        x: torch.Tensor,
        scale: torch.Tensor,
        n_pos: int,
        obj: LayerObjective,
        opt: OptimConfig,
        lr: float,
        reduce: Reduce | None,
    ) -> StepOutput:
        if obj.objective not in KERNEL_OBJECTIVES:
            raise ValueError(
                f"fusion='row' computes only the objectives {tuple(KERNEL_OBJECTIVES)} (in the "
                f"row kernel), got {obj.objective!r}; use fusion='gemm'"
            )
        peer_on = obj.peer_strength > 0 and n_pos > 0 and not layer.frozen

        def peer(z: torch.Tensor) -> torch.Tensor:
            p_sum = torch.relu(z[:n_pos]).sum(dim=0)
            layer.peer_mean, phi = _peer_coefficients(p_sum, n_pos, layer.peer_mean, obj, reduce)
            return phi

        g, out, res = self._row_forward(layer, x, scale, n_pos, obj, peer if peer_on else None)
        loss = res["loss"].mean()
        if layer.frozen:
            return StepOutput(loss=loss, goodness=g, out=out)
        with nvtx_range("ff.weight_grad_update"):
            dw = self._matmul(res["dz"].t(), res["xn"]).float()
            db = res["dz"].float().sum(dim=0)
            if reduce is not None:
                dw, db = reduce(dw), reduce(db)
            apply_update(layer, dw, db, opt, lr)
        return StepOutput(loss=loss, goodness=g, out=out)

    def _matmul(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        with _tf32(self.precision == "tf32"):
            return a @ b

    # ---- validation --------------------------------------------------------------------------

    def _check_tensor(
        self, what: str, t: torch.Tensor, ndim: int, dtypes: tuple[torch.dtype, ...]
    ) -> None:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{what} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != ndim:
            raise ValueError(f"{what} must have {ndim} dimensions, got shape {tuple(t.shape)}")
        if t.dtype not in dtypes:
            names = " or ".join(str(d) for d in dict.fromkeys(dtypes))
            raise TypeError(
                f"{what} must be {names} for precision {self.precision!r}, got {t.dtype}"
            )
        if t.device.type != self.device.type or (
            self.device.index is not None and t.device.index != self.device.index
        ):
            raise ValueError(f"{what} must be on device {self.device}, got {t.device}")

    def _check(
        self, layer: FFLayer, inp: Activations, n_pos: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Validate a layer and its input; returns ``(x, scale)`` ready for the kernels."""
        f32 = (torch.float32,)
        self._check_tensor("layer.weight", layer.weight, 2, f32)
        d, k = layer.weight.shape
        self._check_tensor("layer.bias", layer.bias, 1, f32)
        self._check_tensor("layer.peer_mean", layer.peer_mean, 1, f32)
        for what, t in (("layer.bias", layer.bias), ("layer.peer_mean", layer.peer_mean)):
            if t.shape[0] != d:
                raise ValueError(f"{what} must have shape ({d},), got {tuple(t.shape)}")
        if not (layer.weight.is_contiguous() and layer.bias.is_contiguous()):
            raise ValueError(
                "layer.weight and layer.bias must be contiguous (they are updated in place "
                f"with the optimizer state's layout), got strides {layer.weight.stride()} "
                f"and {layer.bias.stride()}"
            )
        self._check_tensor("inp.x", inp.x, 2, (torch.float32, self.operand))
        n = inp.x.shape[0]
        if inp.x.shape[1] != k:
            raise ValueError(
                f"inp.x must have {k} columns (the layer's in_features), got shape "
                f"{tuple(inp.x.shape)}"
            )
        self._check_tensor("inp.scale", inp.scale, 1, f32)
        if inp.scale.shape[0] != n:
            raise ValueError(f"inp.scale must have shape ({n},), got {tuple(inp.scale.shape)}")
        if min(n, d, k) == 0:
            raise ValueError(f"empty layer step: N={n} rows, D={d} units, K={k} inputs")
        # The kernels index with 32-bit offsets.
        if max(n * k, n * d, d * k) >= 2**31:
            raise ValueError(
                f"tensors of 2**31 elements or more are not supported (32-bit indexing), got "
                f"N={n} rows, D={d} units, K={k} inputs"
            )
        if isinstance(n_pos, bool) or not isinstance(n_pos, int) or not 0 <= n_pos <= n:
            raise ValueError(f"n_pos must be an int in [0, {n}], got {n_pos!r}")
        # x may have any strides (both are passed); the kernels index scale with stride 1.
        return inp.x, inp.scale.contiguous()

    def _opt_state(self, layer: FFLayer, opt: OptimConfig) -> dict[str, torch.Tensor]:
        ensure_opt_state(layer, opt)
        state = {}
        for pname in ("weight", "bias"):
            param = getattr(layer, pname)
            for sname in opt.state_names():
                key = f"{pname}.{sname}"
                t = layer.opt_state[key]
                if t.shape != param.shape or t.dtype != torch.float32 or not t.is_contiguous():
                    raise ValueError(
                        f"opt_state[{key!r}] must be a contiguous float32 tensor of shape "
                        f"{tuple(param.shape)}, got {t.dtype} of shape {tuple(t.shape)} with "
                        f"strides {t.stride()}"
                    )
                state[key] = t
        return state


def _peer_coefficients(
    p_sum: torch.Tensor,
    n_pos: int,
    peer_mean: torch.Tensor,
    obj: LayerObjective,
    reduce: Reduce | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Running mean ``m`` and peer coefficients ``φ = (λ / n_pos)(m - m̄)`` from ``p`` (D,).

    ``p`` is the column sum of ``h`` over the positive rows, so ``p / n_pos`` is the batch's
    mean positive activity; ``reduce`` averages it over data-parallel ranks first.
    """
    batch_mean = p_sum / n_pos
    if reduce is not None:
        batch_mean = reduce(batch_mean)
    # m = ρ m + (1 - ρ) p̄ as one lerp: these D-vector ops are launch-bound on a GPU, so each
    # launch saved is a few microseconds of a step that lasts a few hundred.
    m = torch.lerp(batch_mean, peer_mean, obj.peer_momentum)
    return m, (m - m.mean()).mul_(obj.peer_strength / n_pos)


@contextlib.contextmanager
def _tf32(enabled: bool) -> Iterator[None]:
    """Let cuBLAS use (or forbid) tf32 for float32 matmuls inside the block, then restore."""
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
