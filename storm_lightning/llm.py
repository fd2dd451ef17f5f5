"""Language models: any transformers causal LM, fed ``inputs_embeds``.

Interface (``CausalLM``)::

    forward(input_ids (B, L), attention_mask (B, L), visual_mask (B, L), visual (V, hidden_size),
            head_mask (B, L)) -> (hidden (B, L, hidden_size), logits (head_mask.sum(), vocab))
    prefill(embeds (B, L, hidden_size), attention_mask (B, L)) -> (next-token logits (B, vocab), cache)
    step(tokens (B,), attention_mask (B, L + t), cache) -> (next-token logits (B, vocab), cache)
    generate(embeds (1, L, hidden_size), attention_mask (1, L), ...) -> new token ids

Visual tokens are written into the embeddings where ``visual_mask`` is set, in row-major order, and
the LM head runs only where ``head_mask`` is set. Everything happens in this one call so that, under
FSDP2, the root parameters (embeddings, final norm, tied head) are gathered exactly once per step.
``prefill``/``step`` are generation with the KV cache (storm-chat, storm-profile, the lmms-eval adapter).

Built from typed size arguments (random weights; the tiny default is a Qwen2) or loaded with
``from_pretrained(pretrained_path)`` from a local directory. ``trust_remote_code`` is never set.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

from storm_lightning.checkpoint import load_pretrained
from storm_lightning.errors import ConfigError, MissingPathError

log = logging.getLogger(__name__)


class CausalLM(nn.Module):
    hidden_size: int
    model: nn.Module
    weights_pending: str | None = None  # a checkpoint to read once the model is sharded (HFCausalLM's sharded_load)

    def load_pending_weights(self, device: torch.device | str = "cpu") -> None:
        """Read ``weights_pending`` into the model, sharded or not (a no-op without one)."""

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

    @functools.cached_property
    def _cache_key(self) -> str:
        """transformers renamed ``past_key_values`` to ``cache`` (5.x); use whichever this version takes."""
        return "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"

    def prefill(self, embeds: Tensor, attention_mask: Tensor) -> tuple[Tensor, object]:
        """Run a prompt given as embeddings: (logits of the token after it (B, vocab), the KV cache)."""
        out = self.model(inputs_embeds=embeds, attention_mask=attention_mask, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1], getattr(out, self._cache_key)

    def step(self, tokens: Tensor, attention_mask: Tensor, cache) -> tuple[Tensor, object]:
        """Feed one token per row (B,); ``attention_mask`` covers everything so far, the new token
        included. Returns (logits of the next token (B, vocab), the cache)."""
        out = self.model(input_ids=tokens[:, None], attention_mask=attention_mask, use_cache=True,
                         **{self._cache_key: cache})
        cache = getattr(out, self._cache_key)
        # a cache the model stopped reading (a renamed argument) would silently decode without context
        if hasattr(cache, "get_seq_length") and cache.get_seq_length() != attention_mask.shape[1]:
            raise RuntimeError(f"the KV cache holds {cache.get_seq_length()} positions, expected "
                               f"{attention_mask.shape[1]}: this transformers version ignores the cache argument")
        return out.logits[:, -1], cache

    @torch.no_grad()
    def generate(self, embeds: Tensor, attention_mask: Tensor, max_new_tokens: int, stop_ids: set[int],
                 temperature: float = 0.0, on_token: Callable[[list[int]], bool] | None = None) -> list[int]:
        """Continue one prompt (B = 1): greedy at temperature 0, else sampled. Stops after
        ``max_new_tokens``, at a token in ``stop_ids`` (not returned), or when ``on_token(tokens so far)``
        returns True (stop strings, streaming)."""
        assert embeds.shape[0] == 1, "generate continues one prompt"
        logits, cache = self.prefill(embeds, attention_mask)
        tokens: list[int] = []
        for _ in range(max_new_tokens):
            if temperature > 0:
                token = int(torch.multinomial(torch.softmax(logits[0].float() / temperature, -1), 1))
            else:
                token = int(logits[0].argmax())
            if token in stop_ids:
                break
            tokens.append(token)
            if (on_token is not None and on_token(tokens)) or len(tokens) == max_new_tokens:
                break
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones(1, 1)], dim=1)
            logits, cache = self.step(torch.tensor([token], device=embeds.device), attention_mask, cache)
        return tokens

    def forward(self, input_ids: Tensor, attention_mask: Tensor, visual_mask: Tensor | None = None,
                visual: Tensor | None = None, zero: Tensor | None = None, head_mask: Tensor | None = None,
                position_ids: Tensor | None = None, cu_seqlens: Tensor | None = None):
        embeds = self.embed_with_visual(input_ids, visual_mask, visual, zero)
        packed = {}
        if cu_seqlens is not None:  # one packed sequence (see StormModel.pack): attention within each sample
            longest = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
            packed = {"position_ids": position_ids, "cu_seq_lens_q": cu_seqlens, "cu_seq_lens_k": cu_seqlens,
                      "max_length_q": longest, "max_length_k": longest}
        hidden = self.model.get_decoder()(inputs_embeds=embeds, attention_mask=attention_mask, **packed).last_hidden_state
        logits = self.model.get_output_embeddings()(hidden[head_mask]) if head_mask is not None else None
        return hidden, logits


# config key -> (the transformers config attribute, the tiny default used when building from scratch)
_LLM_SIZES = {"model_type": ("model_type", "qwen2"), "hidden_size": ("hidden_size", 128),
              "num_layers": ("num_hidden_layers", 2), "num_heads": ("num_attention_heads", 4),
              "num_kv_heads": ("num_key_value_heads", 2), "intermediate_size": ("intermediate_size", 384),
              "vocab_size": ("vocab_size", 1024), "max_position_embeddings": ("max_position_embeddings", 8192),
              "tie_word_embeddings": ("tie_word_embeddings", True)}


PACKED_ATTENTION = "storm_packed_sdpa"


def _packed_sdpa(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                 cu_seq_lens_q: Tensor | None = None, **kwargs):
    """transformers' SDPA attention, run within each sample of a packed sequence (``cu_seq_lens_q``:
    the samples' bounds, transformers' name for them), else as it is. On a CPU, one causal SDPA per
    sample costs the sum of the samples' squared lengths, where a block-diagonal mask over the whole
    sequence would cost its squared length. Registered with transformers' ``AttentionInterface``; the
    masks are SDPA's (a packed sequence is given an all-ones mask, which SDPA's mask skips)."""
    from transformers import AttentionInterface

    sdpa = AttentionInterface()["sdpa"]
    for key_name in ("cu_seq_lens_k", "max_length_q", "max_length_k", "is_causal"):
        kwargs.pop(key_name, None)
    if cu_seq_lens_q is None:
        return sdpa(module, query, key, value, attention_mask, **kwargs)
    bounds = cu_seq_lens_q.tolist()
    parts = [sdpa(module, query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], None, is_causal=True, **kwargs)[0]
             for a, b in zip(bounds[:-1], bounds[1:])]
    return torch.cat(parts, dim=1), None  # (1, T, heads, head_dim)


def _register_packed_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    AttentionInterface.register(PACKED_ATTENTION, _packed_sdpa)
    AttentionMaskInterface.register(PACKED_ATTENTION, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])


class HFCausalLM(CausalLM):
    """A ``transformers`` causal LM. ``model_type`` is any ``AutoConfig`` type with the standard size
    names (qwen2, llama, mistral, ...); ``extra_config`` passes anything else to the config.

    Built from the size arguments (random weights; left out, the tiny default: a 2-layer, 128-wide Qwen2
    over 1024 tokens), or loaded from ``pretrained_path`` (a local ``save_pretrained`` directory), whose
    sizes come from its checkpoint: a size also given here must agree with it, or the build fails naming
    the key (a config written for Qwen2-7B then checks that the directory holds one).
    ``pretrained_weights=False`` takes only the structure from ``pretrained_path`` (its config.json; the
    weights come from elsewhere: a ``storm-export`` directory stores the LLM's config so).
    ``sharded_load=True`` (conf/fsdp.yaml) builds the structure on the meta device and leaves the
    weights of ``pretrained_path`` to ``load_pending_weights``, which ``StormModel.configure_model`` calls
    after FSDP2 has sharded the model: each rank then reads only its own rows (``sharded_load.py``).
    """

    def __init__(
        self,
        model_type: str | None = None,
        hidden_size: int | None = None,
        num_layers: int | None = None,
        num_heads: int | None = None,
        num_kv_heads: int | None = None,
        intermediate_size: int | None = None,
        vocab_size: int | None = None,
        max_position_embeddings: int | None = None,
        tie_word_embeddings: bool | None = None,
        extra_config: dict | None = None,
        pretrained_path: str | None = None,
        pretrained_weights: bool = True,
        sharded_load: bool = False,
        gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        from transformers import AutoConfig, AutoModelForCausalLM

        self.weights_pending: str | None = None  # a pretrained_path still to be read (sharded_load)

        given = {"model_type": model_type, "hidden_size": hidden_size, "num_layers": num_layers,
                 "num_heads": num_heads, "num_kv_heads": num_kv_heads, "intermediate_size": intermediate_size,
                 "vocab_size": vocab_size, "max_position_embeddings": max_position_embeddings,
                 "tie_word_embeddings": tie_word_embeddings}
        if pretrained_path is not None:
            if not Path(pretrained_path).is_dir():
                raise MissingPathError(
                    f"model.llm.init_args.pretrained_path: no such directory '{pretrained_path}'"
                )
            config = AutoConfig.from_pretrained(pretrained_path, trust_remote_code=False)
            for key, value in given.items():
                stored = getattr(config.get_text_config(), _LLM_SIZES[key][0], None)
                if value is not None and value != stored:
                    raise ConfigError(f"model.llm.init_args.{key}={value} contradicts the checkpoint in "
                                      f"{pretrained_path} ({key}={stored}): leave it out (it is read from the "
                                      "checkpoint) or point pretrained_path at another model")
            model = self._on_meta(config, pretrained_path) if pretrained_weights and sharded_load else None
            if model is None and pretrained_weights:
                model = load_pretrained(lambda: AutoModelForCausalLM.from_pretrained(
                    pretrained_path, trust_remote_code=False), pretrained_path, "model.llm.init_args.pretrained_path")
            elif model is None:
                model = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
            self.model = model
        else:
            sizes = {key: _LLM_SIZES[key][1] if value is None else value for key, value in given.items()}
            counts = [sizes[k] for k in ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size",
                                         "vocab_size")]
            if min(counts) < 1:
                raise ConfigError(
                    "model.llm.init_args: hidden_size, num_layers, num_heads, num_kv_heads, intermediate_size and "
                    f"vocab_size must be >= 1, got {', '.join(map(str, counts))}"
                )
            if sizes["hidden_size"] % sizes["num_heads"] or sizes["num_heads"] % sizes["num_kv_heads"]:
                raise ConfigError(
                    f"model.llm.init_args: hidden_size={sizes['hidden_size']} must be divisible by num_heads="
                    f"{sizes['num_heads']}, and num_heads by num_kv_heads={sizes['num_kv_heads']}"
                )
            config = AutoConfig.for_model(
                sizes.pop("model_type"),
                **{_LLM_SIZES[key][0]: value for key, value in sizes.items()},
                **(extra_config or {}),
            )
            self.model = AutoModelForCausalLM.from_config(config)
        self.hidden_size = self.model.config.hidden_size
        if self.model.config._attn_implementation == "sdpa":  # packed batches: SDPA within each sample
            _register_packed_attention()
            self.model.set_attn_implementation(PACKED_ATTENTION)
        if gradient_checkpointing:
            self.model.gradient_checkpointing_enable()

    def _on_meta(self, config, path: str) -> nn.Module | None:
        """``sharded_load``: the model with its parameters on the meta device, in the checkpoint's dtype,
        its weights pending; None (and a warning: they are then read whole) when the checkpoint is not
        safetensors holding every parameter under its own name and shape."""
        from accelerate import init_empty_weights
        from transformers import AutoModelForCausalLM

        from storm_lightning.sharded_load import misfit, read_header, stored_dtype

        self._stored = read_header(path, key="model.llm.init_args.pretrained_path")
        reason = "it holds no safetensors"
        if self._stored:
            dtype = {} if getattr(config, "dtype", None) else {"dtype": stored_dtype(self._stored)}
            with init_empty_weights(include_buffers=False):  # parameters on meta, buffers (rotary) real
                model = AutoModelForCausalLM.from_config(config, trust_remote_code=False, **dtype)
            model.tie_weights()  # the context gives each registration its own meta tensor
            reason = misfit(model, self._stored)
        if reason is None:
            self.weights_pending = path
            return model
        log.warning("model.llm.init_args.sharded_load: %s cannot be read rank by rank (%s): every rank reads "
                    "all of it", path, reason)
        return None

    def load_pending_weights(self, device: torch.device | str = "cpu") -> None:
        from storm_lightning.sharded_load import read_into

        if self.weights_pending is not None:
            read_into(self.model, self._stored, device,
                      std=getattr(self.model.config.get_text_config(), "initializer_range", 0.02))
            self.weights_pending = None
