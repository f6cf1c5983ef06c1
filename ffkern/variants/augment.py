r"""Jitter augmentation: a random integer shift of every training image, zeros shifted in.

For an image ``x`` of shape ``(C, H, W)`` and a per-image offset ``(δy, δx)`` drawn uniformly
from ``{-s, ..., s}²`` (``s`` = ``max_shift``, 2 by default)::

    x'[c, r, k] = x[c, r - δy, k - δx]   where 0 <= r - δy < H and 0 <= k - δx < W
    x'[c, r, k] = 0                      elsewhere (pixels that leave the frame are dropped)

so a positive ``δy`` moves the content down and a positive ``δx`` moves it right; all
channels of one image move together. Every output pixel gathers its source pixel
``(r - δy, k - δx)`` in one indexing operation for the whole batch, and a mask zeroes the
pixels whose source lies outside the frame: it runs on the batch's own device, with no loop
over images and no host synchronisation.

The shift is applied to the image *before* any label pixels are written (see
:meth:`ffkern.model.FFNetwork.train_step`), so the label stays in its fixed pixels and keeps
its value; the shifted image keeps its class.
"""

from __future__ import annotations

import torch

AUGMENTS = ("none", "jitter")
DEFAULT_MAX_SHIFT = 2


def shift_images(
    x: torch.Tensor, image_shape: tuple[int, int, int], dy: torch.Tensor, dx: torch.Tensor
) -> torch.Tensor:
    """Shift each flattened image of ``x`` (B, C·H·W) by its own ``(dy, dx)`` (B,) int64.

    Returns a new (B, C·H·W) tensor; ``x`` is not modified. Offsets may be any integers:
    an offset of ``H`` or more moves the whole image out of the frame.
    """
    c, h, w = image_shape
    b = x.shape[0]
    if x.ndim != 2 or x.shape[1] != c * h * w:
        raise ValueError(
            f"x must be (B, {c * h * w}) rows of images of shape {image_shape}, "
            f"got shape {tuple(x.shape)}"
        )
    if dy.shape != (b,) or dx.shape != (b,):
        raise ValueError(
            f"dy and dx must have shape ({b},), got {tuple(dy.shape)} and {tuple(dx.shape)}"
        )
    imgs = x.reshape(b, c, h, w)
    # Source row and column of every output pixel; out-of-frame sources are clamped to any
    # valid index for the gather and then zeroed by the mask (no padding, no host sync).
    src_r = torch.arange(h, device=x.device)[None, :] - dy[:, None]  # (B, H)
    src_c = torch.arange(w, device=x.device)[None, :] - dx[:, None]  # (B, W)
    inside = ((src_r >= 0) & (src_r < h))[:, :, None] & ((src_c >= 0) & (src_c < w))[:, None, :]
    rows = src_r.clamp(0, h - 1)[:, None, :, None]
    cols = src_c.clamp(0, w - 1)[:, None, None, :]
    bi = torch.arange(b, device=x.device)[:, None, None, None]
    ci = torch.arange(c, device=x.device)[None, :, None, None]
    out = imgs[bi, ci, rows, cols] * inside[:, None, :, :].to(x.dtype)
    return out.reshape(b, c * h * w)


def jitter(
    x: torch.Tensor,
    image_shape: tuple[int, int, int],
    max_shift: int,
    generator: torch.Generator,
) -> torch.Tensor:
    """``x`` (B, C·H·W) with each image shifted by a uniform offset in ``{-s..s}²``."""
    if max_shift < 0:
        raise ValueError(f"max_shift must be >= 0, got {max_shift}")
    b = x.shape[0]
    offsets = torch.randint(-max_shift, max_shift + 1, (2, b), generator=generator, device=x.device)
    return shift_images(x, image_shape, offsets[0], offsets[1])
