r"""Recurrent Forward-Forward with top-down connections (Hinton 2022, §4).

A static image is treated as a video. Hidden layer ``l`` (1..L) keeps a state ``s_l``; at each
time step it reads the *normalized* states of the layer below and of the layer above from the
previous step. The image is the "layer below" of layer 1 and the label code the "layer above"
of layer L. With ``n(v) = r(v) ⊙ v`` the length normalization of :mod:`ffkern.reference`::

    y_0 = n(image)                      constant over time
    y_{L+1} = n(label code)             one-hot · label_scale (neutral: label_scale / C in all)
    z_l^t = n(s_{l-1}^{t-1}) Uₗᵀ + n(s_{l+1}^{t-1}) Vₗᵀ + bₗ     (s_0 = image, s_{L+1} = label)
    h_l^t = relu(z_l^t)
    s_l^t = d · s_l^{t-1} + (1 - d) · h_l^t                       damping d = 0.3

``Uₗ`` (bottom-up) and ``Vₗ`` (top-down) are stored side by side as one matrix
``Wₗ = [Uₗ | Vₗ]``, so ``z_l^t = [y_below | y_above] Wₗᵀ + bₗ``. The states are initialized by
a single bottom-up pass with no top-down input, ``s_l^0 = relu(n(s_{l-1}^0) Uₗᵀ + bₗ)``; it is
iteration 0 and is neither trained nor scored. Iterations ``t = 1 .. T`` (``T = 8`` by default,
``extra["recurrent.iterations"]``) are synchronous: every layer reads the states of step
``t - 1``.

Training. A minibatch of B images gives B positive rows (true label on top) and B negative
rows (a wrong label, drawn as in :mod:`ffkern.model`). Each layer has its FF local loss
(:func:`ffkern.reference.loss_and_coef`, any objective) on its goodness ``g_l^t`` of
``h_l^t`` at *every* iteration ``t = 1..T``, and the minibatch loss of layer ``l`` is the mean
over those T iterations, ``L_l = (1/T) Σ_t L_l^t``. The inputs from step ``t - 1`` are treated
as constants (stop-gradient through time), so the gradient of ``L_l^t`` is that of an ordinary
FF layer whose input is ``[y_below | y_above]``: with ``dz = c ⊙ h`` (plus the peer term)::

    ∂L_l^t/∂Uₗ = dzᵀ y_below        ∂L_l^t/∂Vₗ = dzᵀ y_above        ∂L_l^t/∂bₗ = Σ_i dz_i

These are accumulated over the T iterations with the weights held fixed, and each layer gets
one optimizer update per minibatch with the mean. The peer-normalization running mean is
updated at every iteration.

Prediction. For each candidate label c the network runs with c on top; the score of c is
the goodness summed over all hidden layers and averaged over iterations 3, 4 and 5, counted
from 1 as above (``extra["recurrent.score_first"]`` = 3 and ``["recurrent.score_last"]`` = 5,
inclusive): with ``G^t = Σ_l g_l^t``, ``score_c = (G^3 + G^4 + G^5) / 3``. The predicted label
has the highest score (the lowest under the ``reversed`` objective). Since an iteration only
depends on earlier ones, iterations after ``score_last`` cannot change the answer and are not
computed by :meth:`RecurrentFFNetwork.goodness_scores`; :meth:`goodness_trace` runs all T.

The softmax head (optional; needed for hard negatives) reads the normalized states of all
layers after iteration T of a run with the neutral label.

Why the reference path only: a backend's ``step`` computes the gradient *and* applies the
update in one call, and its fused kernels take one input stream per layer, whereas here every
layer reads two streams and accumulates its gradient over T iterations before one update. The
layer maths is :func:`ffkern.reference.layer_step` on the concatenated input, run in torch on
the training device (CPU or CUDA); the configured backend is not used.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from ffkern import reference
from ffkern.backends import Backend, FFLayer
from ffkern.backends.reference import apply_update
from ffkern.config import FFConfig
from ffkern.model import FFNetwork, Reduce
from ffkern.reference import LayerObjective

log = logging.getLogger(__name__)


@dataclass
class RecurrentLayerResult:
    """One recurrent layer at one iteration: its FF loss and the gradients of both streams."""

    loss: torch.Tensor  # () local loss L_l^t
    goodness: torch.Tensor  # (N,) g_l^t
    h: torch.Tensor  # (N, D) relu(z_l^t)
    dw_up: torch.Tensor  # (D, K_below) ∂L/∂U = dzᵀ y_below
    dw_down: torch.Tensor  # (D, K_above) ∂L/∂V = dzᵀ y_above
    db: torch.Tensor  # (D,) ∂L/∂b
    peer_mean: torch.Tensor  # (D,) updated running mean activity


def recurrent_layer_step(
    w_up: torch.Tensor,
    w_down: torch.Tensor,
    bias: torch.Tensor,
    below: torch.Tensor,
    above: torch.Tensor,
    n_pos: int,
    obj: LayerObjective,
    peer_mean: torch.Tensor,
    reduce: Reduce | None = None,
) -> RecurrentLayerResult:
    """Loss and closed-form gradients of one recurrent layer at one iteration.

    ``below`` (N, K_below) and ``above`` (N, K_above) are the already normalized inputs of
    step ``t - 1``, constants for the gradient; ``z = below Uᵀ + above Vᵀ + b``.
    """
    if below.shape[0] != above.shape[0]:
        raise ValueError(
            f"below and above must have the same rows, got {below.shape[0]} and {above.shape[0]}"
        )
    k = below.shape[1]
    weight = torch.cat([w_up, w_down], dim=1)
    inp = torch.cat([below, above], dim=1)
    ones = torch.ones(inp.shape[0], dtype=inp.dtype, device=inp.device)
    res = reference.layer_step(weight, bias, inp, ones, n_pos, obj, peer_mean, reduce)
    return RecurrentLayerResult(
        loss=res.loss,
        goodness=res.goodness,
        h=res.h,
        dw_up=res.dw[:, :k],
        dw_down=res.dw[:, k:],
        db=res.db,
        peer_mean=res.peer_mean,
    )


class RecurrentFFNetwork(FFNetwork):
    """Hidden layers with bottom-up and top-down inputs, run for several damped iterations.

    The public API is that of :class:`ffkern.model.FFNetwork` (``train_step``, ``predict``,
    ``goodness_scores``, ``features``, ``state_dict``); layer ``l``'s weight is ``[Uₗ | Vₗ]``
    of shape ``(D_l, D_{l-1} + D_{l+1})`` with ``D_0`` the image size and ``D_{L+1} = C``.
    """

    def __init__(
        self,
        config: FFConfig,
        in_features: int,
        num_classes: int,
        device: torch.device | str = "cpu",
        backend: Backend | None = None,
        seed: int | None = None,
        image_shape: tuple[int, int, int] | None = None,
    ) -> None:
        if config.model != "recurrent":
            raise ValueError(f"RecurrentFFNetwork needs model='recurrent', got {config.model!r}")
        super().__init__(config, in_features, num_classes, device, backend, seed, image_shape)
        self.settings = config.recurrent()
        if self.backend.name != "reference":
            log.warning(
                "the recurrent model runs on the reference path only (two input streams and "
                "gradients accumulated over iterations); backend %r is not used",
                self.backend.name,
            )

    def _build_layers(self, gen: torch.Generator) -> list[FFLayer]:
        widths = (self.in_features, *self.config.layers, self.num_classes)
        return [
            self._init_layer(widths[i] + widths[i + 2], widths[i + 1], gen)
            for i in range(len(widths) - 2)
        ]

    def below_width(self, index: int) -> int:
        """``K_below`` of 0-based layer ``index``: the columns of ``U`` in its weight."""
        return self.in_features if index == 0 else self.config.layers[index - 1]

    def bottom_up(self, index: int) -> torch.Tensor:
        """``U`` (D, K_below) of 0-based layer ``index`` (a view of its weight)."""
        return self.layers[index].weight[:, : self.below_width(index)]

    def top_down(self, index: int) -> torch.Tensor:
        """``V`` (D, K_above) of 0-based layer ``index`` (a view of its weight)."""
        return self.layers[index].weight[:, self.below_width(index) :]

    # -- inputs --------------------------------------------------------------------------------

    @property
    def scored_layers(self) -> range:
        """All hidden layers: the label enters at the top, so no layer sees it directly."""
        return range(len(self.layers))

    def label_code(self, labels: torch.Tensor | None, rows: int) -> torch.Tensor:
        """(rows, C) one-hot codes scaled by ``label_scale``; ``None``: the neutral code."""
        c, s = self.num_classes, self.config.label_scale
        if labels is None:
            return torch.full((rows, c), s / c, device=self.device)
        code = torch.zeros(rows, c, device=self.device)
        code[torch.arange(rows, device=self.device), labels] = s
        return code

    def _normalized(self, v: torch.Tensor) -> torch.Tensor:
        return v * reference.norm_scale(v, self.objective.norm, self.objective.norm_eps)[:, None]

    def embed(self, x: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        """The image is not changed: the label enters at the top (see :meth:`label_code`)."""
        return x

    # -- the dynamics --------------------------------------------------------------------------

    def _initial_states(self, image: torch.Tensor) -> list[torch.Tensor]:
        """Iteration 0: one bottom-up pass with no top-down input."""
        states, below = [], image
        for i, layer in enumerate(self.layers):
            h = torch.relu(torch.addmm(layer.bias, below, self.bottom_up(i).t()))
            states.append(h)
            below = self._normalized(h)
        return states

    def _inputs(
        self, image: torch.Tensor, top: torch.Tensor, states: list[torch.Tensor]
    ) -> list[torch.Tensor]:
        """``[y_below | y_above]`` of every layer from the states of the previous step."""
        normed = [self._normalized(s) for s in states]
        ys = [image, *normed, top]
        return [torch.cat([ys[i], ys[i + 2]], dim=1) for i in range(len(self.layers))]

    def _damp(self, old: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        d = self.settings.damping
        return d * old + (1.0 - d) * h

    @torch.no_grad()
    def run(
        self, x: torch.Tensor, codes: torch.Tensor, iterations: int
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Run ``iterations`` steps on images ``x`` (N, K) with label codes ``codes`` (N, C).

        Returns the goodness ``g_l^t`` as a (iterations, L, N) tensor, row ``t - 1`` holding
        iteration ``t``, and the states after the last iteration.
        """
        image, top = self._normalized(x), self._normalized(codes)
        states = self._initial_states(image)
        trace = []
        for _ in range(iterations):
            inputs = self._inputs(image, top, states)
            goods = []
            for i, (layer, inp) in enumerate(zip(self.layers, inputs, strict=True)):
                h = torch.relu(torch.addmm(layer.bias, inp, layer.weight.t()))
                goods.append(reference.goodness_of(h, self.objective))
                states[i] = self._damp(states[i], h)
            trace.append(torch.stack(goods))
        return torch.stack(trace), states

    def goodness_trace(self, x: torch.Tensor, iterations: int | None = None) -> torch.Tensor:
        """(iterations, B, C): ``G^t = Σ_l g_l^t`` for every candidate label; row t-1 is t.

        ``iterations`` defaults to the configured T.
        """
        t = self.settings.iterations if iterations is None else iterations
        b, c = x.shape[0], self.num_classes
        labels = torch.arange(c, device=x.device).repeat_interleave(b)
        trace, _ = self.run(x.repeat(c, 1), self.label_code(labels, b * c), t)
        return trace.sum(dim=1).reshape(t, c, b).transpose(1, 2)

    def goodness_scores(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C): goodness averaged over iterations ``score_first..score_last`` (1-based)."""
        first, last = self.settings.score_first, self.settings.score_last
        trace = self.goodness_trace(x, iterations=last)
        return trace[first - 1 : last].mean(dim=0)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Normalized states of every layer after iteration T of a neutral-label run."""
        _, states = self.run(x, self.label_code(None, x.shape[0]), self.settings.iterations)
        return torch.cat([self._normalized(s) for s in states], dim=1)

    def forward_layers(
        self, x: torch.Tensor, upto: int | None = None
    ) -> list[tuple[torch.Tensor, object]]:
        raise TypeError(
            "RecurrentFFNetwork has no single feedforward pass; use run() or goodness_trace()"
        )

    # -- training ------------------------------------------------------------------------------

    @torch.no_grad()
    def train_step(
        self,
        x: torch.Tensor,
        labels: torch.Tensor,
        lr: float,
        active: int | None = None,
        reduce: Reduce | None = None,
    ) -> torch.Tensor:
        """One minibatch: B positives and B negatives, T iterations, one update per layer.

        Returns each layer's loss averaged over the T iterations, (L,) on the device.
        """
        if active is not None:
            raise ValueError(f"the recurrent model trains all layers together; got active={active}")
        x = self.augment(x)
        probs = None
        if self.config.softmax_head:
            probs = self._train_head(x, labels, lr, reduce)
        neg = self.sample_negative_labels(
            labels, probs if self.config.negatives == "hard" else None
        )
        b = x.shape[0]
        codes = torch.cat([self.label_code(labels, b), self.label_code(neg, b)])
        return self.train_layers(torch.cat([x, x]), b, lr, codes=codes, reduce=reduce)

    def train_layers(  # type: ignore[override]
        self,
        batch: torch.Tensor,
        n_pos: int,
        lr: float,
        active: int | None = None,
        reduce: Reduce | None = None,
        codes: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Train on images ``batch`` (N, K) with label ``codes`` (N, C); first n_pos positive."""
        if codes is None or codes.shape != (batch.shape[0], self.num_classes):
            raise ValueError(
                f"codes must be ({batch.shape[0]}, {self.num_classes}) label codes, got "
                f"{None if codes is None else tuple(codes.shape)}"
            )
        if active is not None:
            raise ValueError(f"the recurrent model trains all layers together; got {active}")
        iterations = self.settings.iterations
        image, top = self._normalized(batch), self._normalized(codes)
        ones = torch.ones(batch.shape[0], device=batch.device)
        states = self._initial_states(image)
        dws = [torch.zeros_like(layer.weight) for layer in self.layers]
        dbs = [torch.zeros_like(layer.bias) for layer in self.layers]
        losses = torch.zeros(len(self.layers), device=batch.device)
        for _ in range(iterations):
            inputs = self._inputs(image, top, states)
            for i, (layer, inp) in enumerate(zip(self.layers, inputs, strict=True)):
                res = reference.layer_step(
                    layer.weight, layer.bias, inp, ones, n_pos, self.objective,
                    layer.peer_mean, reduce,
                )  # fmt: skip
                losses[i] += res.loss
                if not layer.frozen:
                    layer.peer_mean = res.peer_mean
                    dws[i] += res.dw
                    dbs[i] += res.db
                states[i] = self._damp(states[i], res.h)
        for layer, dw, db in zip(self.layers, dws, dbs, strict=True):
            if layer.frozen:
                continue
            dw, db = dw / iterations, db / iterations
            if reduce is not None:
                dw, db = reduce(dw), reduce(db)
            apply_update(layer, dw, db, self.opt, lr)
        return losses / iterations
