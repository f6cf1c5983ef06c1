"""Test-session set-up shared by every test module.

Without CUDA, Triton kernels run through Triton's CPU interpreter, which must be switched on
before ``triton`` is first imported; hence this happens here, at collection time.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
