"""Numerical kernels: the selective scan (numba's fused loops on a CPU, chunked PyTorch elsewhere), and access
to mamba-ssm's CUDA kernels."""

from storm_lightning.ops.selective_scan import selective_scan, selective_scan_reference

__all__ = ["selective_scan", "selective_scan_reference"]
