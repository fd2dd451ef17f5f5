"""Vision backbones: frames in, patch tokens out.

Interface (``VisionBackbone``)::

    forward(pixel_values: (F, 3, image_size, image_size)) -> (F, N_hat, hidden_size)

with ``N_hat = grid[0] * grid[1]`` patch tokens in row-major order (left-to-right, top-to-bottom) and no
CLS/register tokens. ``F`` is all frames of a batch (images count as one frame). Each backbone also says
how its pixels must be prepared: ``image_size``, ``image_mean``, ``image_std``.

Weights are never downloaded: real checkpoints load from a local directory or file.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor, nn

from storm_lightning.checkpoint import load_checkpoint_file, load_pretrained
from storm_lightning.errors import ConfigError, MissingPathError

log = logging.getLogger(__name__)


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


# config key -> (the transformers config attribute, the tiny default used when building from scratch)
_SIGLIP_SIZES = {"patch_size": ("patch_size", 8), "hidden_size": ("hidden_size", 64),
                 "num_layers": ("num_hidden_layers", 2), "num_heads": ("num_attention_heads", 4),
                 "intermediate_size": ("intermediate_size", 128)}


class SiglipVisionBackbone(VisionBackbone):
    """A transformers SigLIP or SigLIP2 vision tower.

    Built from the size arguments (random weights; left out, the tiny defaults: 64 px, patch 8, width 64,
    2 layers, 4 heads, MLP 128), or loaded from ``pretrained_path``, a local ``save_pretrained`` directory
    of a SigLIP vision tower or a whole SigLIP model (its text tower is not loaded), fixed-resolution
    (``siglip``, e.g. so400m-patch14-384, SigLIP2's fixed-size releases) or SigLIP2 NaFlex
    (``siglip2``). A loaded tower's sizes come from its checkpoint: a size also given here must agree
    with it, or the build fails naming the key. ``image_size`` may differ from the checkpoint's: the
    tower then runs at that size with its position embeddings interpolated (e.g. so400m-384, a 27 x 27
    grid, at 448 px: 32 x 32), with one log line. ``select_layer=-2`` takes the penultimate layer, as VILA.
    ``pretrained_weights=False`` takes only the structure from ``pretrained_path`` (its config.json; the
    weights come from elsewhere: a ``storm-export`` directory stores the tower's config so).
    """

    def __init__(
        self,
        image_size: int | None = None,
        patch_size: int | None = None,
        hidden_size: int | None = None,
        num_layers: int | None = None,
        num_heads: int | None = None,
        intermediate_size: int | None = None,
        select_layer: int = -1,
        pretrained_path: str | None = None,
        pretrained_weights: bool = True,
        variant: Literal["siglip", "siglip2"] = "siglip",
        gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        given = {"patch_size": patch_size, "hidden_size": hidden_size, "num_layers": num_layers,
                 "num_heads": num_heads, "intermediate_size": intermediate_size}
        if pretrained_path is not None:
            self.model = _load_siglip(pretrained_path, pretrained_weights)
            config = self.model.config
            for key, value in given.items():
                stored = getattr(config, _SIGLIP_SIZES[key][0])
                if value is not None and value != stored:
                    raise ConfigError(f"model.vision.init_args.{key}={value} contradicts the checkpoint in "
                                      f"{pretrained_path} ({key}={stored}): leave it out (it is read from the "
                                      "checkpoint) or point pretrained_path at another tower")
        else:
            sizes = {key: value if value is not None else _SIGLIP_SIZES[key][1] for key, value in given.items()}
            if min(sizes.values()) < 1 or sizes["hidden_size"] % sizes["num_heads"]:
                raise ConfigError(f"model.vision.init_args: {sizes} must all be >= 1, and hidden_size a multiple "
                                  "of num_heads")
            self.model = _new_siglip(variant, image_size or 64, sizes)
            config = self.model.config
        self.patch_size, self.hidden_size = config.patch_size, config.hidden_size
        self.siglip2 = _is_siglip2(config)
        native = _native_image_size(config)
        self.image_size = image_size or native
        # a SigLIP patch embedding is a stride-p convolution: 384 px at patch 14 is 27 patches (6 px unused);
        # NaFlex cuts the image into patches itself, so there it must be a multiple
        if self.image_size < self.patch_size or (self.siglip2 and self.image_size % self.patch_size):
            raise ConfigError(f"model.vision.init_args.image_size={self.image_size} must be at least patch_size="
                              f"{self.patch_size}{' and a multiple of it (SigLIP2 NaFlex)' if self.siglip2 else ''}")
        # SigLIP2 NaFlex resizes its position embeddings to every input; SigLIP interpolates when told to
        self.interpolate = not self.siglip2 and self.image_size != native
        if self.interpolate:
            log.info("vision tower: %d px (%d x %d patches) with position embeddings interpolated from its %d px",
                     self.image_size, *self.grid, native)
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
        if self.siglip2:  # NaFlex takes patches: (F, h*w, p*p*3), row-major, channels last within a patch
            f, (h, w), p = len(pixel_values), self.grid, self.patch_size
            patches = pixel_values.reshape(f, 3, h, p, w, p).permute(0, 2, 4, 3, 5, 1).reshape(f, h * w, p * p * 3)
            inputs = {"pixel_values": patches, "pixel_attention_mask": patches.new_ones(f, h * w, dtype=torch.long),
                      "spatial_shapes": torch.tensor([[h, w]] * f, device=patches.device)}
        else:
            inputs = {"pixel_values": pixel_values, "interpolate_pos_encoding": self.interpolate}
        if self.select_layer == -1:
            return self.model(**inputs).last_hidden_state
        return self.model(**inputs, output_hidden_states=True).hidden_states[self.select_layer]


def _is_siglip2(config) -> bool:
    return config.model_type.startswith("siglip2")


def _native_image_size(config) -> int:
    """The image size a tower was trained at (SigLIP2 NaFlex: the side of its position-embedding grid)."""
    if _is_siglip2(config):
        return math.isqrt(config.num_patches) * config.patch_size
    return config.image_size


def _load_siglip(path: str, weights: bool = True) -> nn.Module:
    """A SigLIP / SigLIP2 vision tower from a local directory (a vision tower's or a whole model's); with
    ``weights=False`` only its config is read (random weights)."""
    from transformers import AutoConfig, Siglip2VisionModel, SiglipVisionModel

    _require_dir(path, "model.vision.init_args.pretrained_path")
    try:
        model_type = AutoConfig.from_pretrained(path, trust_remote_code=False).model_type
    except (OSError, ValueError) as exn:
        raise ConfigError(f"model.vision.init_args.pretrained_path: {path} has no readable config.json ({exn})") from None
    towers = {"siglip": SiglipVisionModel, "siglip_vision_model": SiglipVisionModel,
              "siglip2": Siglip2VisionModel, "siglip2_vision_model": Siglip2VisionModel}
    if model_type not in towers:
        raise ConfigError(f"model.vision.init_args.pretrained_path: {path} holds a '{model_type}' model, not a SigLIP "
                          "or SigLIP2 tower (use TimmViTBackbone for other vision transformers)")
    # the pooling head is not used: not loaded, never run
    if weights:
        return load_pretrained(lambda: towers[model_type].from_pretrained(path, vision_use_head=False), path,
                               "model.vision.init_args.pretrained_path")
    config = AutoConfig.from_pretrained(path, trust_remote_code=False)
    config = getattr(config, "vision_config", config)  # a whole SigLIP model's: its vision tower's
    config.vision_use_head = False
    return towers[model_type](config)


def _new_siglip(variant: str, image_size: int, sizes: dict) -> nn.Module:
    from transformers import Siglip2VisionConfig, Siglip2VisionModel, SiglipVisionConfig, SiglipVisionModel

    if variant not in ("siglip", "siglip2"):
        raise ConfigError(f"model.vision.init_args.variant must be siglip or siglip2, got {variant!r}")
    common = {"patch_size": sizes["patch_size"], "hidden_size": sizes["hidden_size"],
              "num_hidden_layers": sizes["num_layers"], "num_attention_heads": sizes["num_heads"],
              "intermediate_size": sizes["intermediate_size"], "vision_use_head": False}
    if variant == "siglip2":
        side = image_size // sizes["patch_size"]
        return Siglip2VisionModel(Siglip2VisionConfig(num_patches=side * side, **common))
    return SiglipVisionModel(SiglipVisionConfig(image_size=image_size, **common))


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
            key = "model.vision.init_args.checkpoint_path"
            state = load_checkpoint_file(checkpoint_path, key)
            state = state.get("state_dict", state.get("model", state))
            try:
                missing, unexpected = self.model.load_state_dict(state, strict=False)
            except (RuntimeError, TypeError, AttributeError) as exn:  # other shapes, not tensors
                raise ConfigError(f"{key}: {checkpoint_path} does not fit {model_name} "
                                  f"({' '.join(str(exn).split())[:300]})") from None
            missing = [k for k in missing if not k.startswith("head")]
            if missing:
                raise ConfigError(f"{key}: {checkpoint_path} lacks weights for {missing[:5]}... ({len(missing)} keys)")
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
