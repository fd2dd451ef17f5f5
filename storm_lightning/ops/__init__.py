"""Numerical kernels: the selective scan in pure PyTorch, and access to mamba-ssm's CUDA kernels."""

from storm_lightning.ops.selective_scan import selective_scan, selective_scan_reference

__all__ = ["selective_scan", "selective_scan_reference"]
