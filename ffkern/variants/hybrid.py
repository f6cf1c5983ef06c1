r"""Negative data for unsupervised FF: hybrids of two real images (Hinton 2022, §3.2).

A hybrid of images ``a`` and ``b`` (both ``(C, H, W)``) under a mask ``m`` (``(H, W)``, values
in {0, 1}, shared by all channels) is::

    x⁻ = m ⊙ a + (1 - m) ⊙ b

The mask has large regions of ones and zeros, so a hybrid keeps the short-range statistics of
real images (strokes, edges) while its long-range shape belongs to no real image: a network can
tell positives from hybrids only by learning long-range correlations. The mask is made by:

1. ``m₀``: independent fair random bits, one per pixel;
2. ``P`` blur passes (``P = 6`` by default). One pass convolves with the filter
   ``f = [1/4, 1/2, 1/4]`` along the rows and then along the columns::

       u[r, k]  = ¼ m[r, k-1] + ½ m[r, k] + ¼ m[r, k+1]
       m'[r, k] = ¼ u[r-1, k] + ½ u[r, k] + ¼ u[r+1, k]

   where a pixel outside the frame takes the value of the nearest edge pixel (replicate
   padding: ``m[r, -1] = m[r, 0]``, ``m[r, W] = m[r, W-1]``, likewise for rows). Zero padding
   would leak mask mass out of the frame and bias the border toward 0; on an 8×8 image, six
   passes with zero padding leave almost every mask all-zero, so the "hybrid" would be just the
   other image;
3. threshold: ``m = 1`` where the blurred value is ``> 0.5`` and ``0`` where it is ``<= 0.5``;
4. a mask that came out all ones or all zeros would make the "hybrid" a real image (``a`` or
   ``b`` itself) labelled negative. Such a mask is replaced by a random split of the frame:
   ``m[r, k] = 1`` for the columns ``k < κ``, with ``κ`` uniform in ``1 .. W-1`` (rows instead
   when ``W = 1``). On 28×28 images this never happened in 5000 draws; on 8×8 (the digits
   dataset) about 2.7% of masks need it, on 6×5 about 17%.

Because ``f``'s taps are powers of two, each blurred value is a multiple of ``4^(-2P)``; for
``P <= 6`` that is ``2^(-24)`` or coarser, which float32 represents exactly in [0, 1], so the
threshold is decided exactly (a value of exactly 0.5 happens and goes to 0).

The whole batch's masks are made at once on the training device as separable shifts: each
direction of a pass is one replicate pad of one pixel and a weighted sum of three shifted
slices (on the CPU this is some 15 times faster than ``conv2d`` with a (1, 3) kernel at these
sizes, and gives the same values). There is no loop over images and no autograd.

The partner ``b`` of each image ``a = x_i`` is ``x_{π(i)}`` with ``π`` a uniformly random
*cyclic* permutation of the batch: a random order ``σ`` of the indices, each sending its
element to the next one, ``π(σ_k) = σ_{(k+1) mod B}``. A cycle through all ``B`` indices has no
fixed point, so ``π(i) ≠ i`` for every ``i`` whenever ``B >= 2``: every hybrid mixes two
different images of the batch (different rows; if the batch holds duplicate images, their
pixels can still coincide).
"""

from __future__ import annotations

import torch

DEFAULT_BLUR_PASSES = 6
BLUR_FILTER = (0.25, 0.5, 0.25)


def blur_masks(bits: torch.Tensor, passes: int) -> torch.Tensor:
    """``passes`` blur passes (rows, then columns, replicate padding) of ``bits`` (B, H, W)."""
    if bits.ndim != 3:
        raise ValueError(f"bits must be (B, H, W), got shape {tuple(bits.shape)}")
    if passes < 0:
        raise ValueError(f"passes must be >= 0, got {passes}")
    m = bits
    for _ in range(passes):
        m = _blur_last_dim(m)
        m = _blur_last_dim(m.transpose(1, 2)).transpose(1, 2)
    return m


def _blur_last_dim(m: torch.Tensor) -> torch.Tensor:
    """``¼ m[k-1] + ½ m[k] + ¼ m[k+1]`` along the last dimension, edge values repeated."""
    p = torch.cat([m[..., :1], m, m[..., -1:]], dim=-1)
    f0, f1, f2 = BLUR_FILTER
    return f0 * p[..., :-2] + f1 * p[..., 1:-1] + f2 * p[..., 2:]


def make_masks(
    batch: int,
    height: int,
    width: int,
    passes: int,
    generator: torch.Generator,
    device: torch.device | str,
) -> torch.Tensor:
    """``batch`` masks (B, H, W) of 0.0 and 1.0, each with both values (steps 1-4 above)."""
    if height * width < 2:
        raise ValueError(f"a hybrid needs at least two pixels, got images of {height}x{width}")
    bits = torch.randint(0, 2, (batch, height, width), generator=generator, device=device)
    masks = blur_masks(bits.float(), passes) > 0.5
    # Step 4, for every mask at once: a split at a random column (row) where it is constant.
    along = width if width > 1 else height
    cut = torch.randint(1, along, (batch, 1, 1), generator=generator, device=device)
    index = torch.arange(along, device=device)
    index = index[None, None, :] if width > 1 else index[None, :, None]
    split = (index < cut).expand(batch, height, width)
    ones = masks.flatten(1).sum(1)
    constant = ((ones == 0) | (ones == height * width))[:, None, None]
    return torch.where(constant, split, masks).float()


def cyclic_partners(batch: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """``π`` (B,): a random cyclic permutation, so ``π[i] != i`` for every ``i`` (B >= 2)."""
    if batch < 2:
        raise ValueError(f"a hybrid needs two different images: batch must be >= 2, got {batch}")
    order = torch.randperm(batch, generator=generator, device=device)
    partner = torch.empty_like(order)
    partner[order] = order.roll(-1)
    return partner


def make_hybrids(
    x: torch.Tensor,
    image_shape: tuple[int, int, int],
    passes: int,
    generator: torch.Generator,
) -> torch.Tensor:
    """Hybrids (B, C·H·W) of each image of ``x`` (B, C·H·W) with a different one of ``x``."""
    c, h, w = image_shape
    if x.ndim != 2 or x.shape[1] != c * h * w:
        raise ValueError(
            f"x must be (B, {c * h * w}) rows of images of shape {image_shape}, "
            f"got shape {tuple(x.shape)}"
        )
    b = x.shape[0]
    partner = cyclic_partners(b, generator, x.device)
    masks = make_masks(b, h, w, passes, generator, x.device)[:, None]  # (B, 1, H, W)
    a = x.reshape(b, c, h, w)
    other = a[partner]
    return (masks * a + (1.0 - masks) * other).reshape(b, c * h * w)
