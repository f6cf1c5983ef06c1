"""Fused Triton kernels for Forward-Forward layer steps (installed as ``ffkern.kernels``)."""
