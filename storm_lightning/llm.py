"""Language models: any transformers causal LM, fed ``inputs_embeds``.

Interface (``CausalLM``)::

    embed(input_ids: (B, L)) -> (B, L, hidden_size)
    forward(inputs_embeds: (B, L, hidden_size), attention_mask: (B, L)) -> logits (B, L, vocab)

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

    def resize_vocab(self, size: int) -> None:
        self.model.resize_token_embeddings(size, mean_resizing=False)

    def forward(self, inputs_embeds: Tensor, attention_mask: Tensor, **kwargs):
        assert inputs_embeds.shape[-1] == self.hidden_size, f"LLM expects width {self.hidden_size}"
        return self.model(inputs_embeds=inputs_embeds, attention_mask=attention_mask, **kwargs)


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
