"""Language models: any transformers causal LM, fed ``inputs_embeds``.

Interface (``CausalLM``)::

    forward(input_ids (B, L), attention_mask (B, L), visual_mask (B, L), visual (V, hidden_size),
            head_mask (B, L)) -> (hidden (B, L, hidden_size), logits (head_mask.sum(), vocab))

Visual tokens are written into the embeddings where ``visual_mask`` is set, in row-major order, and
the LM head runs only where ``head_mask`` is set. Everything happens in this one call so that, under
FSDP2, the root parameters (embeddings, final norm, tied head) are gathered exactly once per step.

Built from typed size arguments (random weights; the tiny default is a Qwen2) or loaded with
``from_pretrained(pretrained_path)`` from a local directory. ``trust_remote_code`` is never set.
"""

from __future__ import annotations

from pathlib import Path

from torch import Tensor, nn

from storm_lightning.errors import ConfigError, MissingPathError


class CausalLM(nn.Module):
    hidden_size: int
    model: nn.Module

    @property
    def vocab_size(self) -> int:
        return self.model.get_input_embeddings().num_embeddings

    def embed(self, input_ids: Tensor) -> Tensor:
        return self.model.get_input_embeddings()(input_ids)

    def embed_with_visual(self, input_ids: Tensor, visual_mask: Tensor | None = None, visual: Tensor | None = None,
                          zero: Tensor | None = None) -> Tensor:
        embeds = self.embed(input_ids)
        if visual is not None:
            assert visual.shape == (int(visual_mask.sum()), self.hidden_size), (
                f"{int(visual_mask.sum())} visual slots of width {self.hidden_size}, got {tuple(visual.shape)}")
            embeds = embeds.masked_scatter(visual_mask.unsqueeze(-1), visual.to(embeds.dtype))
        if zero is not None:  # dummy work joins the graph with weight 0 (see StormModel.encode_media)
            embeds = embeds + zero.to(embeds.dtype)
        return embeds

    def resize_vocab(self, size: int) -> None:
        self.model.resize_token_embeddings(size, mean_resizing=False)

    def shard_units(self) -> list[nn.Module]:
        """The blocks FSDP shards one by one (the decoder layers)."""
        return list(self.model.get_decoder().layers)

    def forward(self, input_ids: Tensor, attention_mask: Tensor, visual_mask: Tensor | None = None,
                visual: Tensor | None = None, zero: Tensor | None = None, head_mask: Tensor | None = None):
        embeds = self.embed_with_visual(input_ids, visual_mask, visual, zero)
        hidden = self.model.get_decoder()(inputs_embeds=embeds, attention_mask=attention_mask).last_hidden_state
        logits = self.model.get_output_embeddings()(hidden[head_mask]) if head_mask is not None else None
        return hidden, logits


class HFCausalLM(CausalLM):
    """A ``transformers`` causal LM. ``model_type`` is any ``AutoConfig`` type with the standard size
    names (qwen2, llama, mistral, ...); ``extra_config`` passes anything else to the config."""

    def __init__(
        self,
        model_type: str = "qwen2",
        hidden_size: int = 128,
        num_layers: int = 2,
        num_heads: int = 4,
        num_kv_heads: int = 2,
        intermediate_size: int = 384,
        vocab_size: int = 1024,
        max_position_embeddings: int = 8192,
        tie_word_embeddings: bool = True,
        extra_config: dict | None = None,
        pretrained_path: str | None = None,
        gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        from transformers import AutoConfig, AutoModelForCausalLM

        if pretrained_path is not None:
            if not Path(pretrained_path).is_dir():
                raise MissingPathError(
                    f"model.llm.init_args.pretrained_path: no such directory '{pretrained_path}'"
                )
            self.model = AutoModelForCausalLM.from_pretrained(pretrained_path, trust_remote_code=False)
        else:
            if min(hidden_size, num_layers, num_heads, num_kv_heads, intermediate_size, vocab_size) < 1:
                raise ConfigError(
                    f"model.llm.init_args: hidden_size, num_layers, num_heads, num_kv_heads, intermediate_size and "
                    f"vocab_size must be >= 1, got {hidden_size}, {num_layers}, {num_heads}, {num_kv_heads}, "
                    f"{intermediate_size}, {vocab_size}"
                )
            if hidden_size % num_heads or num_heads % num_kv_heads:
                raise ConfigError(
                    f"model.llm.init_args: hidden_size={hidden_size} must be divisible by num_heads={num_heads}, "
                    f"and num_heads by num_kv_heads={num_kv_heads}"
                )
            config = AutoConfig.for_model(
                model_type,
                hidden_size=hidden_size,
                num_hidden_layers=num_layers,
                num_attention_heads=num_heads,
                num_key_value_heads=num_kv_heads,
                intermediate_size=intermediate_size,
                vocab_size=vocab_size,
                max_position_embeddings=max_position_embeddings,
                tie_word_embeddings=tie_word_embeddings,
                **(extra_config or {}),
            )
            self.model = AutoModelForCausalLM.from_config(config)
        self.hidden_size = self.model.config.hidden_size
        if gradient_checkpointing:
            self.model.gradient_checkpointing_enable()
