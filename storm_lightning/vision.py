"""Vision backbones: frames in, patch tokens out.

Interface (``VisionBackbone``)::

    forward(pixel_values: (F, 3, image_size, image_size)) -> (F, N_hat, hidden_size)

with ``N_hat = grid[0] * grid[1]`` patch tokens in row-major order (left-to-right, top-to-bottom) and no
CLS/register tokens. ``F`` is all frames of a batch (images count as one frame). Each backbone also says
how its pixels must be prepared: ``image_size``, ``image_mean``, ``image_std``.

Weights are never downloaded: real checkpoints load from a local directory or file.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from storm_lightning.errors import ConfigError, MissingPathError


class VisionBackbone(nn.Module):
    hidden_size: int
    image_size: int
    patch_size: int
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]

    @property
    def grid(self) -> tuple[int, int]:
        side = self.image_size // self.patch_size
        return side, side

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    def shard_units(self) -> list[nn.Module]:
        """The blocks FSDP shards one by one."""
        return []

    def _check_input(self, pixel_values: Tensor) -> None:
        assert pixel_values.ndim == 4 and pixel_values.shape[1:] == (3, self.image_size, self.image_size), (
            f"{type(self).__name__} expects (F, 3, {self.image_size}, {self.image_size}), "
            f"got {tuple(pixel_values.shape)}"
        )


def _require_dir(path: str, key: str) -> Path:
    p = Path(path)
    if not p.is_dir():
        raise MissingPathError(f"{key}: no such directory '{path}' (expected a local from_pretrained directory)")
    return p


class SiglipVisionBackbone(VisionBackbone):
    """A transformers SigLIP vision tower.

    Built from the typed size arguments (random weights; the tiny default), or, when ``pretrained_path``
    is set, loaded with ``SiglipVisionModel.from_pretrained(pretrained_path)`` and the size arguments are
    taken from that checkpoint's config. ``select_layer=-2`` takes the penultimate layer, as VILA does.
    """

    def __init__(
        self,
        image_size: int = 64,
        patch_size: int = 8,
        hidden_size: int = 64,
        num_layers: int = 2,
        num_heads: int = 4,
        intermediate_size: int = 128,
        select_layer: int = -1,
        pretrained_path: str | None = None,
        gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        from transformers import SiglipVisionConfig, SiglipVisionModel

        if pretrained_path is not None:
            _require_dir(pretrained_path, "model.vision.init_args.pretrained_path")
            self.model = SiglipVisionModel.from_pretrained(pretrained_path)
            config = self.model.config
        else:
            if patch_size < 1 or image_size < patch_size or image_size % patch_size:
                raise ConfigError(f"model.vision.init_args.image_size={image_size} must be a positive multiple of "
                                  f"patch_size={patch_size} (>= 1)")
            if min(hidden_size, num_layers, num_heads, intermediate_size) < 1 or hidden_size % num_heads:
                raise ConfigError(f"model.vision.init_args: hidden_size={hidden_size}, num_layers={num_layers}, "
                                  f"num_heads={num_heads} and intermediate_size={intermediate_size} must be >= 1, "
                                  "and hidden_size a multiple of num_heads")
            config = SiglipVisionConfig(
                image_size=image_size,
                patch_size=patch_size,
                hidden_size=hidden_size,
                num_hidden_layers=num_layers,
                num_attention_heads=num_heads,
                intermediate_size=intermediate_size,
                vision_use_head=False,
            )
            self.model = SiglipVisionModel(config)
        self.image_size, self.patch_size, self.hidden_size = config.image_size, config.patch_size, config.hidden_size
        self.select_layer = select_layer
        if gradient_checkpointing:  # recompute each layer in backward: activation memory of one layer
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        # SigLIP normalises to [-1, 1]
        self.image_mean, self.image_std = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)

    def shard_units(self) -> list[nn.Module]:
        tower = getattr(self.model, "vision_model", self.model)  # transformers < 5 wraps it once more
        return list(tower.encoder.layers)

    def forward(self, pixel_values: Tensor) -> Tensor:
        self._check_input(pixel_values)
        if self.select_layer == -1:
            return self.model(pixel_values=pixel_values).last_hidden_state
        out = self.model(pixel_values=pixel_values, output_hidden_states=True)
        return out.hidden_states[self.select_layer]


class TimmViTBackbone(VisionBackbone):
    """A timm Vision Transformer (prefix tokens such as CLS are dropped).

    ``pretrained`` is always False at run time (no downloads); real weights come from ``checkpoint_path``,
    a local file loaded with ``weights_only=True``.
    """

    def __init__(
        self,
        model_name: str = "vit_tiny_patch16_224",
        image_size: int = 64,
        patch_size: int = 8,
        checkpoint_path: str | None = None,
        gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        import timm

        if patch_size < 1 or image_size < patch_size or image_size % patch_size:
            raise ConfigError(f"model.vision.init_args.image_size={image_size} must be a positive multiple of "
                              f"patch_size={patch_size} (>= 1)")
        self.model = timm.create_model(
            model_name, pretrained=False, num_classes=0, img_size=image_size, patch_size=patch_size
        )
        if checkpoint_path is not None:
            if not Path(checkpoint_path).is_file():
                raise MissingPathError(f"model.vision.init_args.checkpoint_path: no such file '{checkpoint_path}'")
            state = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
            state = state.get("state_dict", state.get("model", state))
            missing, unexpected = self.model.load_state_dict(state, strict=False)
            missing = [k for k in missing if not k.startswith("head")]
            if missing:
                raise RuntimeError(f"{checkpoint_path} lacks weights for {missing[:5]}... ({len(missing)} keys)")
        self.image_size, self.patch_size = image_size, patch_size
        self.hidden_size = self.model.num_features
        self.model.set_grad_checkpointing(gradient_checkpointing)
        cfg = self.model.pretrained_cfg or {}
        self.image_mean = tuple(cfg.get("mean", (0.5, 0.5, 0.5)))
        self.image_std = tuple(cfg.get("std", (0.5, 0.5, 0.5)))

    def shard_units(self) -> list[nn.Module]:
        return list(self.model.blocks)

    def forward(self, pixel_values: Tensor) -> Tensor:
        self._check_input(pixel_values)
        tokens = self.model.forward_features(pixel_values)
        return tokens[:, self.model.num_prefix_tokens :]
