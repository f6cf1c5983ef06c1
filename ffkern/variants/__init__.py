"""Variants of Forward-Forward training beyond Hinton's supervised recipe.

- :mod:`ffkern.variants.hybrid`: unsupervised FF whose negatives are hybrids of two images
  under a smooth random mask (Hinton 2022, §3.2);
- :mod:`ffkern.variants.augment`: random integer shifts ("jitter") of training images;
- :mod:`ffkern.variants.recurrent`: a recurrent FF network with top-down connections that
  treats a static image as a video (Hinton 2022, §4).

The SymBa and "reversed" objectives are not modules here: they are local losses, so they live
in :func:`ffkern.reference.loss_and_coef` next to the logistic loss, and every variant can use
them. Each module states its maths in its docstring; none uses ``torch.autograd``.
"""
