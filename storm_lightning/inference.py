"""Loading a trained STORM for inference, and generation with a KV cache.

``load_model(checkpoint)`` rebuilds the model from the ``config.yaml`` that ``storm-fit`` saved beside
the run (``runs/<name>/config.yaml`` for ``runs/<name>/checkpoints/*.ckpt``) and loads the weights with
``weights_only=True``. ``generate`` answers one prompt about one image or video, streaming tokens.
"""

from __future__ import annotations

from pathlib import Path

import torch
import yaml

from storm_lightning.compressors import Compressor
from storm_lightning.errors import MissingPathError
from storm_lightning.model import StormModel
from storm_lightning.tokenizer import IGNORE_INDEX, IM_END, IMAGE_TOKEN, VIDEO_TOKEN, encode_prompt


def find_config(checkpoint: str) -> Path:
    ckpt = Path(checkpoint)
    for candidate in (ckpt.parent / "config.yaml", ckpt.parent.parent / "config.yaml"):
        if candidate.is_file():
            return candidate
    raise MissingPathError(f"no config.yaml beside '{checkpoint}' or its parent: pass --config")


def load_config(config: str) -> dict:
    """The ``model`` and ``data`` sections of a storm-fit config (other sections are ignored)."""
    with open(config) as f:
        full = yaml.safe_load(f)
    return {"model": full["model"], "data": full.get("data", {})}


def build_model(config: str, compressors: list[Compressor] | None = None) -> tuple[StormModel, dict]:
    """A StormModel from a storm-fit config, random weights; ``compressors`` replaces the chain."""
    from jsonargparse import ArgumentParser

    sections = load_config(config)
    model_cfg = dict(sections["model"])
    model_cfg["init_from"] = None  # weights come from the checkpoint being loaded, not the previous stage
    model_cfg["tokenizer_path"] = sections["data"].get("tokenizer_path", model_cfg.get("tokenizer_path"))
    if compressors is not None:
        model_cfg["compressors"] = []
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(StormModel, "model")
    cfg = parser.parse_object({"model": model_cfg})
    model = parser.instantiate(cfg).model
    if compressors is not None:
        model.compressors = torch.nn.ModuleList(compressors)
        model._check_sizes()
    return model, sections["data"]


def load_model(checkpoint: str, config: str | None = None, compressors: list[Compressor] | None = None):
    """(model in eval mode with the checkpoint's weights, the config's data section)."""
    if not Path(checkpoint).is_file():
        raise MissingPathError(f"--checkpoint: no such file '{checkpoint}'")
    model, data = build_model(str(config or find_config(checkpoint)), compressors)
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    model.load_state_dict(state.get("state_dict", state))
    return model.eval(), data


def media_batch(model: StormModel, prompt: str, pixel_values: torch.Tensor | None) -> dict:
    """A one-sample batch in the model's format, ending with the assistant header."""
    if pixel_values is not None:
        tag = VIDEO_TOKEN if len(pixel_values) > 1 else IMAGE_TOKEN
        if IMAGE_TOKEN not in prompt and VIDEO_TOKEN not in prompt:
            prompt = f"{tag}\n{prompt}"
    ids = torch.tensor([encode_prompt(model.tokenizer, [{"from": "human", "value": prompt}])])
    return {
        "input_ids": ids, "labels": torch.full_like(ids, IGNORE_INDEX), "attention_mask": torch.ones_like(ids),
        "pixel_values": pixel_values,
        "frames_per_sample": torch.tensor([0 if pixel_values is None else len(pixel_values)]),
    }


@torch.no_grad()
def generate(model: StormModel, prompt: str, pixel_values: torch.Tensor | None = None, max_new_tokens: int = 64,
             temperature: float = 0.0, stream: bool = True) -> str:
    """Answer ``prompt`` about ``pixel_values`` ((T, 3, S, S) uint8, or None). Greedy at temperature 0."""
    from transformers import TextStreamer

    inputs, attention, _ = model.build_inputs(media_batch(model, prompt, pixel_values))
    tok = model.tokenizer
    streamer = TextStreamer(tok, skip_prompt=True, skip_special_tokens=True) if stream else None
    out = model.llm.model.generate(
        inputs_embeds=inputs, attention_mask=attention, max_new_tokens=max_new_tokens, use_cache=True,
        do_sample=temperature > 0, temperature=temperature if temperature > 0 else None, top_p=None, top_k=None,
        eos_token_id=tok.convert_tokens_to_ids(IM_END), pad_token_id=tok.pad_token_id, streamer=streamer,
    )
    return tok.decode(out[0], skip_special_tokens=True).strip()
