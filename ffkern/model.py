"""Hinton's supervised Forward-Forward network: label embedding, negatives, predictors.

Inputs carry their label: the first ``C`` pixels of an image are overwritten by a one-hot code
scaled by ``label_scale`` (a *neutral* label writes ``label_scale / C`` into all ``C``). A
positive row is an image with its true label, a negative row the same image with a wrong one:

- ``random`` negatives draw the wrong label uniformly from the ``C - 1`` others;
- ``hard`` negatives draw it with probability ``p_c / Σ_{c' ≠ y} p_{c'}`` for ``c ≠ y``, where
  ``p`` is the model's own current prediction for the image: the softmax head's probabilities
  on the neutral-label pass that the same step computes anyway (so hard negatives cost no extra
  forward pass). The true label has probability zero.

Each layer is trained by its backend on its local loss (:mod:`ffkern.reference`); its
normalized output is the next layer's input. Two predictors:

- goodness: for every label ``c``, run the image with label ``c`` and add the goodness of every
  layer except the first (all layers when there is one); predict the label with the most;
- softmax: a linear softmax classifier on the concatenated normalized activities (same layers)
  of the neutral-label pass, trained with its closed-form cross-entropy gradient on every
  minibatch. Its gradient does not reach the FF layers.

With the ``reversed`` objective positives are trained to have *low* goodness, so the goodness
predictor picks the label with the least goodness; hard negatives still come from the softmax
head, whose probabilities do not depend on the objective's sign.

Variants (see :mod:`ffkern.variants`):

- ``negatives="hybrid"`` is unsupervised FF (Hinton §3.2): no label is written into the input,
  a positive is a real image and its negative a hybrid of it with another image of the batch
  (:mod:`ffkern.variants.hybrid`). The softmax head then reads the last three hidden layers
  (all of them when there are fewer), is trained alongside on the real images, and is the
  only predictor;
- ``augment="jitter"`` shifts each positive image before its label is written
  (:mod:`ffkern.variants.augment`); the negatives of the step are made from the shifted image;
- ``model="recurrent"`` is a different network,
  :class:`ffkern.variants.recurrent.RecurrentFFNetwork`; :func:`build_network` picks the class
  from the configuration.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import torch

from ffkern import optim, reference
from ffkern.backends import Activations, Backend, FFLayer, get_backend
from ffkern.config import FFConfig
from ffkern.variants import augment, hybrid

log = logging.getLogger(__name__)

Reduce = Callable[[torch.Tensor], torch.Tensor]


class FFNetwork:
    """A stack of FF layers with a label-embedding input and an optional softmax head."""

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
        if num_classes < 2:
            raise ValueError(f"num_classes must be at least 2, got {num_classes}")
        writes_label = not config.unsupervised and config.model == "feedforward"
        if in_features < num_classes and writes_label:
            raise ValueError(
                f"the label is written into the first {num_classes} input features, but the "
                f"input has only {in_features}"
            )
        if config.model != "feedforward" and type(self) is FFNetwork:
            raise ValueError(
                f"FFNetwork is the feedforward model, got model={config.model!r}; "
                "use ffkern.model.build_network"
            )
        self.config = config
        self.in_features = in_features
        self.num_classes = num_classes
        self.image_shape = resolve_image_shape(in_features, image_shape, config)
        self.device = torch.device(device)
        self.backend = backend if backend is not None else get_backend("reference", self.device)
        self.objective = config.layer_objective()
        self.opt = config.optim()
        # Initialization draws from a CPU generator so that the same seed gives the same
        # weights on every device; sampling during training uses a generator on the device.
        init_gen = torch.Generator().manual_seed(config.seed if seed is None else seed)
        self.layers = self._build_layers(init_gen)
        for i in config.freeze:
            self.layers[i - 1].frozen = True
        self.head_weight = torch.zeros(num_classes, self.feature_dim, device=self.device)
        self.head_bias = torch.zeros(num_classes, device=self.device)
        self.head_state: dict[str, torch.Tensor] = {}
        self.head_step = 0
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed((config.seed if seed is None else seed) + 1)

    def _build_layers(self, gen: torch.Generator) -> list[FFLayer]:
        """One layer per width, each fed by the one below (the image for the first)."""
        widths = (self.in_features, *self.config.layers)
        return [self._init_layer(widths[i], widths[i + 1], gen) for i in range(len(widths) - 1)]

    def _init_layer(self, fan_in: int, fan_out: int, gen: torch.Generator) -> FFLayer:
        weight = torch.randn(fan_out, fan_in, generator=gen) / fan_in**0.5
        return FFLayer(
            weight=weight.to(self.device),
            bias=torch.zeros(fan_out, device=self.device),
            peer_mean=torch.zeros(fan_out, device=self.device),
        )

    # -- inputs --------------------------------------------------------------------------------

    @property
    def scored_layers(self) -> range:
        """Indices of the layers whose goodness and activities the predictors use.

        Supervised: every layer but the first (which sees the label pixels directly), or the
        only one. Unsupervised (hybrid negatives): the last three layers, or all if fewer.
        """
        n = len(self.layers)
        if self.config.unsupervised:
            return range(max(0, n - 3), n)
        return range(1 if n > 1 else 0, n)

    @property
    def default_method(self) -> str:
        """The predictor :meth:`predict` uses when none is named: the head when unsupervised."""
        return "softmax" if self.config.unsupervised else "goodness"

    @property
    def feature_dim(self) -> int:
        """Width of the softmax head's input."""
        return sum(self.config.layers[i] for i in self.scored_layers)

    def embed(self, x: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        """``x`` (B, K) with its first C features replaced by the label code (None: neutral).

        An unsupervised network (hybrid negatives) writes no label: ``embed(x, None)`` is ``x``
        itself, and asking it to embed labels is an error (its negatives are hybrids, not
        wrong labels, so a caller that embeds labels is building the wrong batch).
        """
        if self.config.unsupervised:
            if labels is not None:
                raise ValueError(
                    "an unsupervised network (negatives='hybrid') has no label input; its "
                    "negatives are hybrids of images (FFNetwork.train_step makes them)"
                )
            return x
        out = x.clone()
        c, s = self.num_classes, self.config.label_scale
        if labels is None:
            out[:, :c] = s / c
        else:
            out[:, :c] = 0.0
            out[torch.arange(x.shape[0], device=x.device), labels] = s
        return out

    def sample_negative_labels(
        self, labels: torch.Tensor, probs: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Wrong labels: uniform over the others, or ∝ ``probs`` (B, C) with the truth removed."""
        b, c = labels.shape[0], self.num_classes
        if probs is None:
            shift = torch.randint(1, c, (b,), generator=self.generator, device=labels.device)
            return (labels + shift) % c
        weights = probs.clone()
        weights[torch.arange(b, device=labels.device), labels] = 0.0
        # A row whose prediction puts all its mass on the truth falls back to uniform.
        empty = weights.sum(dim=1, keepdim=True) <= 0
        weights = torch.where(empty, torch.ones_like(weights), weights)
        weights[torch.arange(b, device=labels.device), labels] = 0.0
        return torch.multinomial(weights, 1, generator=self.generator).squeeze(1)

    # -- forward passes ------------------------------------------------------------------------

    def forward_layers(
        self, x: torch.Tensor, upto: int | None = None
    ) -> list[tuple[torch.Tensor, Activations]]:
        """Goodness and output of each layer for embedded inputs ``x``, no update."""
        inp = self.backend.normalize(x, self.objective)
        outs = []
        for layer in self.layers[: len(self.layers) if upto is None else upto]:
            g, inp = self.backend.forward(layer, inp, self.objective)
            outs.append((g, inp))
        return outs

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The softmax head's input: normalized activities of a neutral-label pass."""
        outs = self.forward_layers(self.embed(x, None))
        return torch.cat([outs[i][1].normalized() for i in self.scored_layers], dim=1)

    def goodness_scores(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C) goodness summed over the scored layers, for each candidate label.

        These are raw goodness values: the best label is the argmax, or the argmin under the
        ``reversed`` objective (see :meth:`predict`).
        """
        if self.config.unsupervised:
            raise ValueError(
                "an unsupervised network (negatives='hybrid') has no label input to score; "
                "predict with its softmax head"
            )
        b, c = x.shape[0], self.num_classes
        labels = torch.arange(c, device=x.device).repeat_interleave(b)
        outs = self.forward_layers(self.embed(x.repeat(c, 1), labels))
        total = sum(outs[i][0] for i in self.scored_layers)
        return total.reshape(c, b).t()

    def head_logits(self, feats: torch.Tensor) -> torch.Tensor:
        return torch.addmm(self.head_bias, feats, self.head_weight.t())

    @torch.no_grad()
    def predict(self, x: torch.Tensor, method: str | None = None) -> torch.Tensor:
        """Predicted labels (B,) by ``goodness`` or ``softmax``, in evaluation-sized chunks.

        ``None`` is :attr:`default_method`. The goodness predictor picks the label with the
        most goodness, or the least under the ``reversed`` objective.
        """
        method = self.default_method if method is None else method
        if method not in ("goodness", "softmax"):
            raise ValueError(f"method must be 'goodness' or 'softmax', got {method!r}")
        if method == "softmax" and not self.config.softmax_head:
            raise ValueError("this network was configured without a softmax head")
        chunks = []
        for start in range(0, x.shape[0], self.config.eval_batch_size):
            xb = x[start : start + self.config.eval_batch_size]
            if method == "goodness":
                scores = self.goodness_scores(xb)
                best = scores.argmin if self.objective.objective == "reversed" else scores.argmax
                chunks.append(best(dim=1))
            else:
                chunks.append(self.head_logits(self.features(xb)).argmax(dim=1))
        return torch.cat(chunks)

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
        """One FF step on raw images ``x`` (B, K) with true ``labels`` (B,).

        Trains every layer (or, greedily, only layer ``active``; layers below it run forward
        only) on B positives and B negatives. Returns the per-layer losses (L,) on the device.
        ``reduce`` averages gradients over data-parallel ranks (see :class:`Backend`).

        With ``augment="jitter"`` the images are shifted first. Supervised, the negatives are
        the same images with wrong labels; unsupervised (``negatives="hybrid"``) they are
        hybrids of two images, and the labels only train the softmax head.
        """
        x = self.augment(x)
        if self.config.unsupervised:
            if self.config.softmax_head:
                self._train_head(x, labels, lr, reduce)
            neg = hybrid.make_hybrids(
                x, self.require_image_shape(), self.config.blur_passes, self.generator
            )
            return self.train_layers(torch.cat([x, neg]), x.shape[0], lr, active, reduce)
        probs = None
        if self.config.softmax_head:
            probs = self._train_head(x, labels, lr, reduce)
        neg = self.sample_negative_labels(
            labels, probs if self.config.negatives == "hard" else None
        )
        batch = torch.cat([self.embed(x, labels), self.embed(x, neg)])
        return self.train_layers(batch, x.shape[0], lr, active, reduce)

    def augment(self, x: torch.Tensor) -> torch.Tensor:
        """The training images after the configured augmentation (``x`` itself for none)."""
        if self.config.augment == "none":
            return x
        return augment.jitter(x, self.require_image_shape(), self.config.max_shift, self.generator)

    def require_image_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of the images, or a ``ValueError`` saying how to provide it."""
        if self.image_shape is None:
            raise ValueError(
                f"negatives={self.config.negatives!r} / augment={self.config.augment!r} need "
                f"the (C, H, W) image shape, and {self.in_features} features are not a square "
                "single-channel image; pass image_shape=dataset.image_shape"
            )
        return self.image_shape

    def train_layers(
        self,
        batch: torch.Tensor,
        n_pos: int,
        lr: float,
        active: int | None = None,
        reduce: Reduce | None = None,
    ) -> torch.Tensor:
        """Step every layer on ``batch`` (N, K) whose first ``n_pos`` rows are positive."""
        inp = self.backend.normalize(batch, self.objective)
        losses = []
        for i, layer in enumerate(self.layers):
            if active is not None and i > active:
                break
            if active is not None and i < active:
                _, inp = self.backend.forward(layer, inp, self.objective)
                continue
            out = self.backend.step(layer, inp, n_pos, self.objective, self.opt, lr, reduce)
            losses.append(out.loss)
            inp = out.out
        return torch.stack(losses)

    def _train_head(
        self, x: torch.Tensor, labels: torch.Tensor, lr: float, reduce: Reduce | None
    ) -> torch.Tensor:
        """One softmax-head update on the neutral pass; returns its probabilities (B, C)."""
        feats = self.features(x)
        _, probs, dw, db = reference.softmax_head_grads(
            self.head_weight, self.head_bias, feats, labels
        )
        if reduce is not None:
            dw, db = reduce(dw), reduce(db)
        self.head_step += 1
        for name, param, grad in (("weight", self.head_weight, dw), ("bias", self.head_bias, db)):
            state = {}
            for s, t in optim.init_state(self.opt, param).items():
                state[s] = self.head_state.setdefault(f"{name}.{s}", t)
            optim.update_(self.opt, param, grad, state, lr, self.head_step)
        return probs

    # -- state ---------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, object]:
        """Weights, optimizer and peer state, and the sampling generator's state."""
        return {
            "in_features": self.in_features,
            "num_classes": self.num_classes,
            "layers": [layer.state_dict() for layer in self.layers],
            "head": {
                "weight": self.head_weight,
                "bias": self.head_bias,
                "state": dict(self.head_state),
                "step": self.head_step,
            },
            "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state: dict[str, object]) -> None:
        """Restore what :meth:`state_dict` saved; shapes must match this network's."""
        if state["in_features"] != self.in_features or state["num_classes"] != self.num_classes:
            raise ValueError(
                f"checkpoint is for {state['in_features']} inputs and {state['num_classes']} "
                f"classes, this network has {self.in_features} and {self.num_classes}"
            )
        layers = state["layers"]
        if len(layers) != len(self.layers):  # type: ignore[arg-type]
            raise ValueError(f"checkpoint has {len(layers)} layers, expected {len(self.layers)}")
        self.layers = [FFLayer.from_state_dict(s, self.device) for s in layers]  # type: ignore
        head = state["head"]
        self.head_weight = head["weight"].to(self.device)  # type: ignore[index]
        self.head_bias = head["bias"].to(self.device)  # type: ignore[index]
        self.head_state = {k: v.to(self.device) for k, v in head["state"].items()}  # type: ignore
        self.head_step = int(head["step"])  # type: ignore[index]
        self.generator.set_state(state["generator"])  # type: ignore[arg-type]


def resolve_image_shape(
    in_features: int, image_shape: tuple[int, int, int] | None, config: FFConfig
) -> tuple[int, int, int] | None:
    """``image_shape`` checked against ``in_features``; if None, a square grey image if any."""
    if image_shape is None:
        side = math.isqrt(in_features)
        return (1, side, side) if side * side == in_features else None
    shape = tuple(int(v) for v in image_shape)
    if len(shape) != 3 or math.prod(shape) != in_features:
        raise ValueError(
            f"image_shape must be (C, H, W) with C·H·W = {in_features} input features, "
            f"got {image_shape}"
        )
    return shape  # type: ignore[return-value]


def build_network(
    config: FFConfig,
    in_features: int,
    num_classes: int,
    device: torch.device | str = "cpu",
    backend: Backend | None = None,
    seed: int | None = None,
    image_shape: tuple[int, int, int] | None = None,
) -> FFNetwork:
    """The network ``config.model`` names: :class:`FFNetwork` or the recurrent one."""
    cls: type[FFNetwork] = FFNetwork
    if config.model == "recurrent":
        from ffkern.variants.recurrent import RecurrentFFNetwork

        cls = RecurrentFFNetwork
    return cls(config, in_features, num_classes, device, backend, seed, image_shape)
