"""Fused Triton kernels for Forward-Forward layer steps (installed as ``ffkern.kernels``).

- :mod:`.ff_forward`: the forward GEMM with normalization, bias, ReLU and partial row and column
  sums in its epilogue, and the row-statistics kernel (``q → g, r'``, logistic loss, ``c``);
- :mod:`.ff_wgrad`: the weight-gradient GEMM that rebuilds ``dz`` from ``h`` per tile and applies
  SGD or Adam in its epilogue;
- :mod:`.ff_row`: the unfused row kernel (``z → h, g, ℓ, c, dz, r'``) used between cuBLAS calls;
- :mod:`.config`: the precision contract, block sizes and launch bookkeeping;
- :mod:`.sm90_check`: compiles every configuration for Hopper offline and reports resources.

Importing this package imports nothing from Triton; the kernel modules do, and none of them
queries the GPU at import. Design notes and cost estimates are in ``kernels/NOTES.md``.
"""
