"""Multimodal projectors: visual tokens of a clip -> tokens in the LLM's embedding space.

Interface (``Projector``)::

    forward(x: (B, T, N, input_dim)) -> (B, T, N, output_dim)

``T`` frames of ``N`` tokens each, tokens row-major within a frame; an image is a clip with ``T = 1``.

- ``MLPProjector``: the VILA baseline, a 2-layer GELU MLP applied to every token on its own.
- ``MambaTemporalProjector``: STORM's temporal projector, ``L`` residual layers
  ``x + BiMambaMixer(LayerNorm(x))`` run over all ``T * N`` tokens of a clip as one sequence, in the order
  left-to-right, top-to-bottom, frame-to-frame, scanned in both directions.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.utils.checkpoint
import torch.nn.functional as F
from torch import Tensor, nn

from storm_lightning.errors import ConfigError
from storm_lightning.ops import selective_scan
from storm_lightning.ops.kernels import mamba_ssm_kernels

ScanBackend = Literal["auto", "torch", "mamba_ssm"]


class Projector(nn.Module):
    input_dim: int
    output_dim: int

    def shard_units(self) -> list[nn.Module]:
        """The blocks FSDP shards one by one."""
        return []

    def _check_input(self, x: Tensor) -> None:
        assert x.ndim == 4 and x.shape[-1] == self.input_dim, (
            f"{type(self).__name__} expects (B, T, N, {self.input_dim}), got {tuple(x.shape)}"
        )


class MLPProjector(Projector):
    """``Linear(input_dim, hidden_dim) -> GELU -> Linear(hidden_dim, output_dim)`` on every token."""

    def __init__(self, input_dim: int, output_dim: int, hidden_dim: int | None = None) -> None:
        super().__init__()
        self.input_dim, self.output_dim = input_dim, output_dim
        hidden_dim = hidden_dim or output_dim
        self.mlp = nn.Sequential(nn.Linear(input_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, output_dim))

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x)
        return self.mlp(x)


class BiMambaMixer(nn.Module):
    """A Mamba (S6) mixer over a sequence ``(B, L, d_model) -> (B, L, d_model)``, optionally bidirectional.

    Forward-direction parameters have mamba-ssm ``Mamba``'s names and layouts (``in_proj``, ``conv1d``,
    ``x_proj``, ``dt_proj``, ``A_log``, ``D``, ``out_proj``), so a unidirectional mixer's state dict loads
    into ``mamba_ssm.Mamba`` or transformers' ``MambaMixer`` and back.

    The backward direction (``bidirectional=True``) follows Vision Mamba's "v2" bidirectional block: it
    has its own ``conv1d_b``, ``x_proj_b``, ``dt_proj_b``, ``A_b_log`` and ``D_b``, runs on the reversed
    sequence, and shares ``in_proj`` (hence the input and the gate ``z``) and ``out_proj`` with the forward
    direction. The two directions' gated outputs are averaged before ``out_proj``, so at initialisation
    the output scale matches a unidirectional mixer.
    """

    def __init__(
        self,
        d_model: int,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        dt_rank: int | None = None,
        bidirectional: bool = True,
        backend: ScanBackend = "auto",
        dt_min: float = 0.001,
        dt_max: float = 0.1,
    ) -> None:
        super().__init__()
        if backend not in ("auto", "torch", "mamba_ssm"):
            raise ConfigError(f"model.projector.init_args.backend must be auto|torch|mamba_ssm, got '{backend}'")
        if backend == "mamba_ssm" and mamba_ssm_kernels() is None:
            raise ConfigError(
                "model.projector.init_args.backend=mamba_ssm needs CUDA and `pip install -e .[cuda]`; "
                "use backend=auto to fall back to the PyTorch scan"
            )
        self.d_model, self.d_state, self.d_conv, self.backend = d_model, d_state, d_conv, backend
        self.d_inner = expand * d_model
        self.dt_rank = dt_rank or math.ceil(d_model / 16)
        self.bidirectional = bidirectional
        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=False)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=False)
        for suffix in ("", "_b") if bidirectional else ("",):
            self._add_direction(suffix, dt_min, dt_max)

    def _add_direction(self, suffix: str, dt_min: float, dt_max: float) -> None:
        d_inner, n = self.d_inner, self.d_state
        conv = nn.Conv1d(d_inner, d_inner, self.d_conv, groups=d_inner, padding=self.d_conv - 1, bias=True)
        x_proj = nn.Linear(d_inner, self.dt_rank + 2 * n, bias=False)
        dt_proj = nn.Linear(self.dt_rank, d_inner, bias=True)
        # mamba-ssm's initialisation: dt ~ log-uniform in [dt_min, dt_max] through softplus, A = -(1..n)
        nn.init.uniform_(dt_proj.weight, -self.dt_rank**-0.5, self.dt_rank**-0.5)
        dt = torch.exp(torch.rand(d_inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=1e-4)
        with torch.no_grad():
            dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
        A_log = torch.log(torch.arange(1, n + 1, dtype=torch.float32)).repeat(d_inner, 1)
        setattr(self, f"conv1d{suffix}", conv)
        setattr(self, f"x_proj{suffix}", x_proj)
        setattr(self, f"dt_proj{suffix}", dt_proj)
        A_name = "A_log" if suffix == "" else "A_b_log"
        setattr(self, A_name, nn.Parameter(A_log))
        setattr(self, f"D{suffix}", nn.Parameter(torch.ones(d_inner)))

    def _scan_direction(self, x: Tensor, z: Tensor, suffix: str) -> Tensor:
        """One direction's conv + selective scan: ``x, z: (B, d_inner, L) -> (B, d_inner, L)``, gated."""
        conv: nn.Conv1d = getattr(self, f"conv1d{suffix}")
        x_proj: nn.Linear = getattr(self, f"x_proj{suffix}")
        dt_proj: nn.Linear = getattr(self, f"dt_proj{suffix}")
        A = -torch.exp(getattr(self, "A_log" if suffix == "" else "A_b_log").float())
        D = getattr(self, f"D{suffix}").float()
        length = x.shape[-1]
        kernels = mamba_ssm_kernels() if self.backend != "torch" and x.is_cuda else None
        if kernels is not None:
            x = kernels.causal_conv1d_fn(x, conv.weight.squeeze(1), conv.bias, activation="silu")
        else:
            x = F.silu(conv(x)[..., :length])
        x_dbl = x_proj(x.transpose(1, 2))  # (B, L, dt_rank + 2n)
        dt, B, C = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=-1)
        delta = (dt @ dt_proj.weight.t()).transpose(1, 2)  # (B, d_inner, L); bias goes in as delta_bias
        B, C = B.transpose(1, 2).contiguous(), C.transpose(1, 2).contiguous()  # (B, n, L)
        scan = kernels.selective_scan_fn if kernels is not None else selective_scan
        return scan(x, delta, A, B, C, D, z=z, delta_bias=dt_proj.bias.float(), delta_softplus=True)

    def forward(self, hidden: Tensor) -> Tensor:
        xz = self.in_proj(hidden).transpose(1, 2)  # (B, 2 * d_inner, L)
        x, z = xz.chunk(2, dim=1)
        y = self._scan_direction(x, z, "")
        if self.bidirectional:
            y_b = self._scan_direction(x.flip(-1), z.flip(-1), "_b").flip(-1)
            y = (y + y_b) / 2
        return self.out_proj(y.transpose(1, 2))


class MambaLayer(nn.Module):
    """``x + BiMambaMixer(LayerNorm(x))`` (the paper's Eq. for X^(l))."""

    def __init__(self, dim: int, **mixer_kwargs) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.mixer = BiMambaMixer(dim, **mixer_kwargs)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.mixer(self.norm(x))


class MambaTemporalProjector(Projector):
    """STORM's temporal projector: ``num_layers`` Mamba layers over the tokens of all frames of a clip.

    The mixers run at ``input_dim``; if ``output_dim`` differs, a final Linear maps to it (STORM's
    downsampler Linear usually maps straight to the LLM width, making that Linear unnecessary).
    ``backend``: ``auto`` uses mamba-ssm's CUDA kernels on CUDA tensors when installed, else the PyTorch
    scan (``storm_lightning.ops.selective_scan``); ``torch`` always the latter; ``mamba_ssm`` requires
    the kernels. ``gradient_checkpointing`` recomputes each layer in backward instead of storing it.
    """

    def __init__(
        self,
        input_dim: int,
        output_dim: int,
        num_layers: int = 2,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        bidirectional: bool = True,
        backend: ScanBackend = "auto",
        gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        if min(num_layers, d_state, d_conv, expand) < 1:
            raise ConfigError(f"model.projector.init_args: num_layers, d_state, d_conv and expand must be >= 1, got "
                              f"{num_layers}, {d_state}, {d_conv}, {expand}")
        self.input_dim, self.output_dim = input_dim, output_dim
        self.layers = nn.ModuleList(
            MambaLayer(input_dim, d_state=d_state, d_conv=d_conv, expand=expand, bidirectional=bidirectional,
                       backend=backend)
            for _ in range(num_layers)
        )
        self.backend, self.gradient_checkpointing = backend, gradient_checkpointing
        self.out = nn.Linear(input_dim, output_dim) if output_dim != input_dim else nn.Identity()

    def shard_units(self) -> list[nn.Module]:
        return list(self.layers)

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x)
        b, t, n, d = x.shape
        seq = x.reshape(b, t * n, d)  # frame-major, row-major inside each frame: the scan order
        for layer in self.layers:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                seq = torch.utils.checkpoint.checkpoint(layer, seq, use_reentrant=False)
            else:
                seq = layer(seq)
        return self.out(seq).view(b, t, n, self.output_dim)
