"""Token compressors, applied in order after the projector.

Interface (``Compressor``)::

    forward(x: (B, T, N, D), grid=(h, w)) -> (x': (B, T', N', D), grid'=(h', w'))
    output_shape(frames=T, grid=(h, w), training) -> (T', (h', w'))     # no tensors: for checks/budgets

Tokens are row-major on the ``h x w`` grid (``N = h * w``). An image is a clip with ``T = 1`` and passes
through the temporal compressors unchanged (``ceil(1 / k) = 1``).

- ``TemporalAveragePool(k)``: mean of every ``k`` consecutive frames, ``T -> ceil(T / k)``. When ``k``
  does not divide ``T`` the last group holds the ``T mod k`` remaining frames and is their mean (never
  padded with zeros, never dropped).
- ``SpatialAveragePool(p)``: ``p x p`` mean pooling on each frame's grid, ``(h, w) -> (h / p, w / p)``;
  ``p`` must divide both sides (checked when the model is built).
- ``TemporalSample(s)``: keep frames ``0, s, 2s, ...``, ``T -> ceil(T / s)``. Test-time by default:
  it is the identity in training mode unless ``in_training=True``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from storm_lightning.errors import ConfigError

Grid = tuple[int, int]


class Compressor(nn.Module):
    def output_shape(self, frames: int, grid: Grid, training: bool) -> tuple[int, Grid]:
        raise NotImplementedError

    def forward(self, x: Tensor, grid: Grid) -> tuple[Tensor, Grid]:
        raise NotImplementedError


def _check(x: Tensor, grid: Grid) -> None:
    assert x.ndim == 4 and x.shape[2] == grid[0] * grid[1], (
        f"compressor expects (B, T, {grid[0]}*{grid[1]}, D), got {tuple(x.shape)}"
    )


class TemporalAveragePool(Compressor):
    def __init__(self, kernel_size: int = 4) -> None:
        super().__init__()
        if kernel_size < 1:
            raise ConfigError(f"TemporalAveragePool kernel_size must be >= 1, got {kernel_size}")
        self.kernel_size = kernel_size

    def output_shape(self, frames: int, grid: Grid, training: bool) -> tuple[int, Grid]:
        return -(-frames // self.kernel_size), grid

    def forward(self, x: Tensor, grid: Grid) -> tuple[Tensor, Grid]:
        _check(x, grid)
        k, t = self.kernel_size, x.shape[1]
        full = t - t % k
        pooled = x[:, :full].unflatten(1, (full // k, k)).mean(2)
        if full < t:  # the remainder group: mean of the frames that are there
            pooled = torch.cat([pooled, x[:, full:].mean(1, keepdim=True)], dim=1)
        return pooled, grid

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}"


class SpatialAveragePool(Compressor):
    def __init__(self, kernel_size: int = 2) -> None:
        super().__init__()
        if kernel_size < 1:
            raise ConfigError(f"SpatialAveragePool kernel_size must be >= 1, got {kernel_size}")
        self.kernel_size = kernel_size

    def output_shape(self, frames: int, grid: Grid, training: bool) -> tuple[int, Grid]:
        h, w = grid
        p = self.kernel_size
        if h % p or w % p:
            raise ConfigError(f"SpatialAveragePool kernel_size={p} must divide the {h}x{w} token grid")
        return frames, (h // p, w // p)

    def forward(self, x: Tensor, grid: Grid) -> tuple[Tensor, Grid]:
        _check(x, grid)
        b, t, _, d = x.shape
        _, (h2, w2) = self.output_shape(t, grid, self.training)
        maps = x.reshape(b * t, *grid, d).permute(0, 3, 1, 2)  # (B*T, D, h, w)
        pooled = F.avg_pool2d(maps, self.kernel_size)
        return pooled.permute(0, 2, 3, 1).reshape(b, t, h2 * w2, d), (h2, w2)

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}"


class TemporalSample(Compressor):
    def __init__(self, stride: int = 2, in_training: bool = False) -> None:
        super().__init__()
        if stride < 1:
            raise ConfigError(f"TemporalSample stride must be >= 1, got {stride}")
        self.stride, self.in_training = stride, in_training

    def _active(self, training: bool) -> bool:
        return self.in_training or not training

    def output_shape(self, frames: int, grid: Grid, training: bool) -> tuple[int, Grid]:
        return (-(-frames // self.stride) if self._active(training) else frames), grid

    def forward(self, x: Tensor, grid: Grid) -> tuple[Tensor, Grid]:
        _check(x, grid)
        return (x[:, :: self.stride] if self._active(self.training) else x), grid

    def extra_repr(self) -> str:
        return f"stride={self.stride}, in_training={self.in_training}"


def chain_output_shape(compressors, frames: int, grid: Grid, training: bool) -> tuple[int, Grid]:
    """Frames and grid after every compressor in order (raises if one cannot apply)."""
    for c in compressors:
        frames, grid = c.output_shape(frames, grid, training)
    return frames, grid


class VisualTokenCount:
    """``frames -> visual tokens`` a clip of that many frames gives after ``compressors`` in training (an
    image: 1 frame). Picklable and parameter-free, for data workers (batching by token budget)."""

    def __init__(self, grid: Grid, compressors: tuple[Compressor, ...]) -> None:
        self.grid, self.compressors = grid, compressors

    def __call__(self, frames: int) -> int:
        t, (h, w) = chain_output_shape(self.compressors, frames, self.grid, training=True)
        return t * h * w
