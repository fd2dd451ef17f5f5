"""Per-frame token downsamplers: patch tokens of one frame -> fewer, wider tokens.

Interface (``Downsampler``)::

    forward(x: (F, N_hat, input_dim), grid=(h, w)) -> (F, N, output_dim),  N = (h / r) * (w / r)

``output_grid(grid)`` gives the new (h / r, w / r) without running anything, so shapes can be checked
when the model is built.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from storm_lightning.errors import ConfigError


class Downsampler(nn.Module):
    input_dim: int
    output_dim: int

    def output_grid(self, grid: tuple[int, int]) -> tuple[int, int]:
        raise NotImplementedError


class PixelShuffleDownsampler(Downsampler):
    """Pixel shuffle (space-to-depth) by ``ratio`` on the patch grid, then a Linear.

    Each r x r block of neighbouring patches becomes one token of width ``r * r * input_dim``; the Linear
    maps it to ``output_dim``. The paper's setting: 32 x 32 = 1024 SigLIP patches -> 16 x 16 = 256 tokens.
    A grid that ``ratio`` does not divide (SigLIP so400m-384: 27 x 27) is padded with zero tokens at the
    bottom and right, as VILA does (``pad_odd_grid``): 27 x 27 -> 28 x 28 -> 14 x 14 = 196 tokens a frame.
    With ``pad_odd_grid: false`` such a grid fails at build time instead.
    """

    def __init__(self, input_dim: int, output_dim: int, ratio: int = 2, pad_odd_grid: bool = True) -> None:
        super().__init__()
        if ratio < 1:
            raise ConfigError(f"model.downsampler.init_args.ratio must be >= 1, got {ratio}")
        self.input_dim, self.output_dim, self.ratio, self.pad_odd_grid = input_dim, output_dim, ratio, pad_odd_grid
        self.proj = nn.Linear(input_dim * ratio * ratio, output_dim)

    def output_grid(self, grid: tuple[int, int]) -> tuple[int, int]:
        h, w = grid
        if (h % self.ratio or w % self.ratio) and not self.pad_odd_grid:
            raise ConfigError(
                f"model.downsampler.init_args.ratio={self.ratio} must divide the vision patch grid {h}x{w} "
                "(or set model.downsampler.init_args.pad_odd_grid=true)"
            )
        return -(-h // self.ratio), -(-w // self.ratio)

    def forward(self, x: Tensor, grid: tuple[int, int]) -> Tensor:
        frames, n, dim = x.shape
        h, w = grid
        assert n == h * w and dim == self.input_dim, f"expected (F, {h * w}, {self.input_dim}), got {tuple(x.shape)}"
        r = self.ratio
        (h2, w2) = self.output_grid(grid)
        x = x.view(frames, h, w, dim)
        if (h2 * r, w2 * r) != (h, w):  # zero tokens below and to the right
            x = F.pad(x, (0, 0, 0, w2 * r - w, 0, h2 * r - h))
        x = x.view(frames, h2, r, w2, r, dim).permute(0, 1, 3, 2, 4, 5)  # (F, h/r, w/r, r, r, D)
        x = x.reshape(frames, h2 * w2, r * r * dim)
        return self.proj(x)
