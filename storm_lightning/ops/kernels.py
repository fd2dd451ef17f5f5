"""Optional CUDA kernels from mamba-ssm and causal-conv1d (``pip install -e ".[cuda]"``).

Available means the compiled extensions are there, not only the Python packages: mamba-ssm's main
branch builds ``selective_scan_cuda`` only when asked to, so ``mamba_ssm`` can import and its first
scan still raise. The extension modules themselves (``selective_scan_cuda``, ``causal_conv1d_cuda``)
and their entry points are checked, once, lazily, and only when CUDA is available; otherwise
``backend: auto`` falls back to the PyTorch scan.
"""

from __future__ import annotations

import functools
import importlib
import logging
from types import SimpleNamespace

import torch

log = logging.getLogger(__name__)
# extension module -> the functions the Python wrappers call into
EXTENSIONS = {"selective_scan_cuda": ("fwd", "bwd"), "causal_conv1d_cuda": ("causal_conv1d_fwd", "causal_conv1d_bwd")}


@functools.cache
def mamba_ssm_kernels() -> SimpleNamespace | None:
    """``selective_scan_fn`` and ``causal_conv1d_fn`` when CUDA and both compiled extensions are usable,
    else None (with the reason logged once)."""
    if not torch.cuda.is_available():
        return None
    try:
        for name, functions in EXTENSIONS.items():
            module = importlib.import_module(name)
            missing = [f for f in functions if not callable(getattr(module, f, None))]
            if missing:
                raise ImportError(f"{name} lacks {', '.join(missing)}")
        from causal_conv1d import causal_conv1d_fn
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except Exception as exn:  # ImportError, or an extension built for another torch/CUDA (OSError, ...)
        log.info("mamba-ssm kernels not usable (%s: %s): the PyTorch scan is used", type(exn).__name__, exn)
        return None
    return SimpleNamespace(selective_scan_fn=selective_scan_fn, causal_conv1d_fn=causal_conv1d_fn)
