"""storm-lightning: token-efficient long-video language models of the STORM family, on PyTorch Lightning."""

__version__ = "0.1.0"
