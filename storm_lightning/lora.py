"""LoRA adapters (peft) on the LLM and, optionally, on the vision tower.

``model.lora_llm`` / ``model.lora_vision`` (``LoraSettings``) wrap that component's transformers model in a
peft ``PeftModel``: its own weights stay fixed, the low-rank adapters train (with that component's
learning rate), the downsampler and projector train fully as ever. State-dict keys of a wrapped model
gain ``base_model.model.`` and, for adapted layers, ``.base_layer``: ``load_compatible`` maps a plain
checkpoint (a previous stage's ``init_from``) onto them, and ``storm-export`` merges the adapters into
plain weights (``merge``), so an exported model needs neither peft nor these settings.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from storm_lightning.errors import ConfigError


@dataclass
class LoraSettings:
    """``rank``/``alpha``/``dropout`` of each adapter; ``target_modules``: the Linear layers to adapt, by
    name (``q_proj``, ...) or ``all-linear`` (every Linear but the output head)."""

    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    target_modules: list[str] | str = field(default="all-linear")


def add_lora(module: nn.Module, settings: LoraSettings, key: str) -> nn.Module:
    """``module`` (a transformers model) wrapped with adapters; only the adapters require gradients."""
    from peft import LoraConfig, get_peft_model

    if settings.rank < 1 or settings.alpha <= 0 or not 0 <= settings.dropout < 1:
        raise ConfigError(f"{key}: rank must be >= 1, alpha > 0 and dropout in [0, 1), got {settings}")
    config = LoraConfig(r=settings.rank, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                        target_modules=settings.target_modules)
    tied = _tied_embeddings(module)
    try:
        wrapped = get_peft_model(module, config)
    except ValueError as exn:  # target modules not found, ...
        raise ConfigError(f"{key}.target_modules={settings.target_modules!r}: {exn}") from None
    adapted = [name for name in tied if hasattr(wrapped.base_model.model.get_submodule(name), "lora_A")]
    if adapted:  # trained, the adapter acts on one side only; merged, it would change both (the export)
        raise ConfigError(f"{key}.target_modules={settings.target_modules!r} adapts {', '.join(adapted)}, which "
                          "shares its weight with the other end of the model (tie_word_embeddings): merged "
                          "into an export it would change both. Leave it out (all-linear adapts every "
                          "Linear but the output head)")
    return wrapped


def _tied_embeddings(module: nn.Module) -> list[str]:
    """Names of the input embedding and output head when they share one weight, else []."""
    get_in, get_out = getattr(module, "get_input_embeddings", None), getattr(module, "get_output_embeddings", None)
    ends = [get_in() if get_in else None, get_out() if get_out else None]
    if None in ends or getattr(ends[0], "weight", None) is not getattr(ends[1], "weight", 0):
        return []
    return [name for name, sub in module.named_modules() if any(sub is end for end in ends)]


def merge(module: nn.Module) -> nn.Module:
    """The adapters added into the weights, the plain transformers model back (a no-op without them)."""
    return module.merge_and_unload() if hasattr(module, "merge_and_unload") else module


def plain_key(key: str) -> str:
    """A state-dict key as it would be without adapters."""
    return key.replace("base_model.model.", "").replace(".base_layer.", ".")


def load_compatible(model: nn.Module, state: dict) -> tuple[list[str], list[str]]:
    """Load ``state`` whether it and ``model`` have adapters or not, matching keys by ``plain_key``.
    Returns (missing, unexpected); the adapters themselves count as missing only when ``state`` has
    adapters at all (a plain checkpoint starts them at their initialisation)."""
    own = {plain_key(k): k for k in model.state_dict()}
    mapped, unexpected = {}, []
    for key, value in state.items():
        target = own.get(plain_key(key))
        if target is None:
            unexpected.append(key)
        else:
            mapped[target] = value
    result = model.load_state_dict(mapped, strict=False)
    has_adapters = any("lora_" in k for k in state)
    missing = [k for k in result.missing_keys if has_adapters or "lora_" not in k]
    return missing, unexpected
