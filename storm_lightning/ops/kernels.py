"""Optional CUDA kernels from mamba-ssm and causal-conv1d (``pip install -e ".[cuda]"``).

mamba-ssm cannot even be imported without CUDA (it imports ``selective_scan_cuda``), so the import is
attempted once, lazily, and only when CUDA is available.
"""

from __future__ import annotations

import functools
from types import SimpleNamespace

import torch


@functools.cache
def mamba_ssm_kernels() -> SimpleNamespace | None:
    """``selective_scan_fn`` and ``causal_conv1d_fn`` when CUDA and both packages are usable, else None."""
    if not torch.cuda.is_available():
        return None
    try:
        from causal_conv1d import causal_conv1d_fn
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except Exception:  # ImportError, or an extension built for another torch/CUDA
        return None
    return SimpleNamespace(selective_scan_fn=selective_scan_fn, causal_conv1d_fn=causal_conv1d_fn)
