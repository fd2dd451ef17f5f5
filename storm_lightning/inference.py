"""Loading a trained STORM for inference, and generation with a KV cache.

``load_model(checkpoint)`` rebuilds the model from the ``config.yaml`` that ``storm-fit`` saved beside
the run (``runs/<name>/config.yaml`` for ``runs/<name>/checkpoints/*.ckpt``) and loads the weights with
``weights_only=True``. ``generate`` answers one prompt about one image or video, streaming tokens.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from pathlib import Path

import torch
import yaml

from storm_lightning.compressors import Compressor
from storm_lightning.checkpoint import RUN_CONFIG, TOKENIZER_FINGERPRINT, check_tokenizer, load_checkpoint_file
from storm_lightning.config_yaml import check_yaml
from storm_lightning.errors import ConfigError, MissingPathError, UserError
from storm_lightning.lora import merge
from storm_lightning.model import StormModel
from storm_lightning.data.batching import Batch
from storm_lightning.tokenizer import IM_END, IMAGE_TOKEN, VIDEO_TOKEN, encode_prompt


def find_config(checkpoint: str) -> Path:
    ckpt = Path(checkpoint)
    for candidate in (ckpt.parent / "config.yaml", ckpt.parent.parent / "config.yaml"):
        if candidate.is_file():
            return candidate
    raise MissingPathError(f"no config.yaml beside '{checkpoint}' or its parent: pass --config")


def usable_device(name: str | None, key: str) -> torch.device:
    """``name`` (default: cuda when available, else cpu) as a device this machine has, or a one-line
    ConfigError naming ``key``."""
    try:
        device = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:
        raise ConfigError(f"{key}={name!r}: not a torch device (cpu, cuda, cuda:N)") from None
    count = torch.cuda.device_count() if device.type == "cuda" else 0
    if device.type not in ("cpu", "cuda") or (device.type == "cuda" and (device.index or 0) >= count):
        raise ConfigError(f"{key}={name!r}: not usable here (CUDA devices: {torch.cuda.device_count()})")
    return device


def load_config(config: str, need_model: bool = True, text: str | None = None) -> dict:
    """The ``model`` and ``data`` sections of a storm-fit config (other sections are ignored): the file
    ``config``, or ``text`` (a checkpoint's own config; ``config`` then names it). A file that is not one
    (unreadable, not YAML, not a mapping, no model section when ``need_model``) is a one-line UserError."""
    if text is None and not Path(config).is_file():
        raise MissingPathError(f"--config: no such file '{config}'")
    try:
        if text is None:
            with open(config, encoding="utf-8") as f:
                text = f.read()
        full = yaml.safe_load(text)
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exn:
        raise UserError(f"--config {config}: not a readable YAML file ({' '.join(str(exn).split())[:200]})") from None
    check_yaml(text, full, f"--config {config}")
    if not isinstance(full, dict) or (need_model and not isinstance(full.get("model"), dict)):
        wanted = "a 'model' section" if need_model else "a 'data' section"
        raise UserError(f"--config {config}: not a storm-fit config (expected a mapping with {wanted})")
    data = full.get("data") or {}
    if not isinstance(data, dict):
        raise UserError(f"--config {config}: its 'data' section is not a mapping")
    return {"model": full.get("model"), "data": data}


def model_config(config: str, text: str | None = None) -> tuple[dict, dict]:
    """(the model section ready to build: no init_from, the data's tokenizer; the data section)."""
    sections = load_config(config, text=text)
    model_cfg = dict(sections["model"])
    model_cfg["init_from"] = None  # weights come from the checkpoint being loaded, not the previous stage
    for key in ("tokenizer_path", "system_prompt"):  # linked from the data section by storm-fit
        model_cfg[key] = sections["data"].get(key, model_cfg.get(key))
    return model_cfg, sections["data"]


# modules (comma-separated) besides storm_lightning whose classes a model config may name outside storm-fit
TRUSTED_MODULES = "STORM_TRUSTED_MODULES"


def instantiate(model_cfg: dict, compressors: list[Compressor] | None = None, source: str = "config") -> StormModel:
    """A StormModel (random weights) from a model config dict; ``compressors`` replaces the chain.
    ``source`` names the file the config came from, for errors."""
    from jsonargparse import ArgumentError, ArgumentParser

    refuse_foreign(model_cfg, StormModel, source, "model")
    model_cfg = dict(model_cfg, compressors=[] if compressors is not None else model_cfg.get("compressors", []))
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(StormModel, "model")
    try:
        model = parser.instantiate(parser.parse_object({"model": model_cfg})).model
    except ConfigError:
        raise
    except (ArgumentError, ValueError, TypeError, ImportError) as exn:  # not a component, a wrong value
        raise ConfigError(f"{source}: the model section does not build: {' '.join(str(exn).split())[:400]}") from None
    if compressors is not None:
        model.compressors = torch.nn.ModuleList(compressors)
        model._check_sizes()
    return model


def check_fits(model_cfg: dict, stored: int, source: str, weights: str) -> None:
    """Refuse, in one line, a model config that asks for far more parameters than ``stored``, the number
    its weights file holds, before building it: a 3 KB config.json saying ``vocab_size: 6000000`` took
    gigabytes before any shape was compared. The config's model is built on the meta device (nothing
    allocated, no pretrained weights read); one that cannot be built there is compared after loading."""
    import copy

    skeleton_cfg = copy.deepcopy(model_cfg)
    for key in STRUCTURE_FROM_CONFIG:
        init_args = _init_args(skeleton_cfg, key)
        if init_args.get("pretrained_path"):
            init_args["pretrained_weights"] = False
        if init_args.get("sharded_load"):
            init_args["sharded_load"] = False
        if init_args.get("checkpoint_path"):
            init_args["checkpoint_path"] = None
    skeleton_cfg["init_from"] = None
    try:
        with torch.device("meta"):
            skeleton = instantiate(skeleton_cfg, None, source=source)
    except UserError:
        raise
    except Exception:  # a component that needs real tensors to build: the load compares shapes
        return
    wanted = sum(p.numel() for p in skeleton.parameters())
    if wanted > stored + stored // 10 + 65536:
        raise ConfigError(f"{source}: describes a model of {wanted:,} parameters, and {weights} holds {stored:,} "
                          "values: the config does not belong to these weights")


def build_model(config: str, compressors: list[Compressor] | None = None,
                text: str | None = None) -> tuple[StormModel, dict]:
    """A StormModel from a storm-fit config (random weights, or its components' pretrained ones), and the
    config's data section."""
    model_cfg, data = model_config(config, text)
    model = instantiate(model_cfg, compressors, source=config)
    model.llm.load_pending_weights()  # sharded_load (conf/fsdp.yaml): one process reads them whole
    return model, data


def load_model(checkpoint: str, config: str | None = None, compressors: list[Compressor] | None = None):
    """(model in eval mode with the checkpoint's weights, the config's data section).
    ``checkpoint`` is a storm-fit ``.ckpt`` or a ``storm-export`` directory."""
    if Path(checkpoint).is_dir() and (Path(checkpoint) / EXPORT_CONFIG).is_file():
        return from_pretrained(checkpoint, compressors), {}
    model, data, _, _ = _load_checkpoint(checkpoint, config, compressors)
    return model, data


MAX_CONFIG_CHARS = 1_000_000


def _load_checkpoint(checkpoint: str, config: str | None, compressors: list[Compressor] | None):
    """(model in eval mode, data section, the config's name, its text when it is the checkpoint's own).
    Without ``config``, the config the checkpoint was trained with: the copy storm-fit puts in every
    checkpoint (``RUN_CONFIG``), else the run's config.yaml (checkpoints written before that copy)."""
    state = load_checkpoint_file(checkpoint, "--checkpoint")
    text = state.get(RUN_CONFIG) if config is None else None
    if isinstance(text, str) and len(text) > MAX_CONFIG_CHARS:  # storm-fit's are a few KB
        raise UserError(f"{checkpoint}: its training config is {len(text)} characters, over {MAX_CONFIG_CHARS}: "
                        "pass --config")
    if isinstance(text, str):
        config = f"{checkpoint} (its training config)"
    else:
        text, config = None, str(config or find_config(checkpoint))
    weights = state.get("state_dict", state)
    stored = sum(v.numel() for v in weights.values() if isinstance(v, torch.Tensor)) if isinstance(weights, dict) else None
    if stored is not None:
        check_fits(model_config(config, text)[0], stored, config, checkpoint)
    model, data = build_model(config, compressors, text)
    check_tokenizer(state, model.tokenizer_fingerprint, model.hparams.tokenizer_path, checkpoint)
    _load_weights(model, weights, f"{checkpoint} does not fit the model of {config}")
    return model.eval(), data, config, text


def _load_weights(model: StormModel, state: dict, what: str) -> None:
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as exn:  # missing, unexpected, other shapes, not a dict
        detail = " ".join(str(exn).split())
        raise ConfigError(f"{what}: {detail[:300]}{' ...' if len(detail) > 300 else ''}") from None


EXPORT_CONFIG, EXPORT_WEIGHTS = "config.json", "model.safetensors"

# components whose init_args may name a transformers checkpoint directory (pretrained_path)
STRUCTURE_FROM_CONFIG = ("vision", "llm")
EXPORT_NAMES = {EXPORT_CONFIG, EXPORT_WEIGHTS, "tokenizer", *STRUCTURE_FROM_CONFIG}  # what an export holds


def _init_args(model_cfg: dict, key: str) -> dict:
    """A component's init_args in a model config, edited in place ({} when it has none)."""
    component = model_cfg.get(key)
    init_args = component.get("init_args") if isinstance(component, dict) else None
    return init_args if isinstance(init_args, dict) else {}


def export(checkpoint: str, out_dir: str, config: str | None = None) -> Path:
    """A storm-fit checkpoint -> a Hugging Face style directory: ``config.json`` (the components'
    class_path/init_args), ``model.safetensors``, ``tokenizer/``, and for a component built from a
    ``pretrained_path`` its transformers config in ``<component>/config.json`` (so the directory does not
    need the original checkpoints: their weights are in model.safetensors). ``from_pretrained`` loads it.
    An existing ``out_dir`` must be an export (it is replaced whole)."""
    final = Path(out_dir)
    if final.exists() and not final.is_dir():
        raise UserError(f"--out {out_dir}: exists and is not a directory")
    if final.is_dir():
        others = sorted(p.name for p in final.iterdir() if p.name not in EXPORT_NAMES)
        if others:
            raise UserError(f"--out {out_dir}: holds other files than an export's ({others[:3]}): an export "
                            "replaces its folder whole; give a new folder")
    for stale in [*final.parent.glob(f".{final.name}.tmp*"), *final.parent.glob(f".{final.name}.old*")]:
        shutil.rmtree(stale, ignore_errors=True)  # left by a killed export
    model, _, config, text = _load_checkpoint(checkpoint, config, None)
    model_cfg, _ = model_config(config, text)
    for component, key in ((model.llm, "lora_llm"), (model.vision, "lora_vision")):  # adapters into the weights
        component.model = merge(component.model)
        model_cfg[key] = None
    final.parent.mkdir(parents=True, exist_ok=True)
    # written beside, then put in place: a kill midway leaves the previous export whole, never a mix
    out = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp", dir=final.parent))
    try:
        _write_export(model, model_cfg, out)
        if final.exists():
            old = final.with_name(f".{final.name}.old{os.getpid()}")
            final.rename(old)
            out.rename(final)
            shutil.rmtree(old)
        else:
            out.rename(final)
    finally:
        if out.exists():
            shutil.rmtree(out)
    return final


def _write_export(model: StormModel, model_cfg: dict, out: Path) -> None:
    import json

    from safetensors.torch import save_model

    for key in STRUCTURE_FROM_CONFIG:
        init_args = _init_args(model_cfg, key)
        if init_args.get("pretrained_path"):
            getattr(model, key).model.config.save_pretrained(out / key)
            init_args["pretrained_path"], init_args["pretrained_weights"] = key, False  # relative to the export
        if init_args.get("checkpoint_path"):  # a timm tower: its structure is its model_name's
            init_args["checkpoint_path"] = None
    model.tokenizer.save_pretrained(out / "tokenizer")
    model_cfg["tokenizer_path"] = "tokenizer"  # relative to the export directory
    config = {"format": "storm-lightning", "model": model_cfg, TOKENIZER_FINGERPRINT: model.tokenizer_fingerprint}
    (out / EXPORT_CONFIG).write_text(json.dumps(config, indent=1))
    save_model(model, str(out / EXPORT_WEIGHTS))  # tied embeddings are stored once


def _inside(root: Path, relative: Path) -> bool:
    """``relative`` names a path inside ``root`` once links are followed (a link out is not inside)."""
    if relative.is_absolute() or ".." in relative.parts:
        return False
    return (root / relative).resolve().is_relative_to(root.resolve())


def from_pretrained(directory: str, compressors: list[Compressor] | None = None) -> StormModel:
    """Load a ``storm-export`` directory (safetensors: no code runs while loading)."""
    import json

    from safetensors.torch import load_model as load_safetensors

    root = Path(directory)
    if not (root / EXPORT_CONFIG).is_file():
        raise MissingPathError(f"'{directory}' is not a storm-export directory (no {EXPORT_CONFIG})")
    try:
        spec = json.loads((root / EXPORT_CONFIG).read_text())
        model_cfg = dict(spec["model"])
        tokenizer = Path(str(model_cfg["tokenizer_path"]))
    except (ValueError, KeyError, TypeError, RecursionError) as exn:
        raise ConfigError(f"{root / EXPORT_CONFIG}: not a storm-export config ({type(exn).__name__}: {exn})") from None
    if not _inside(root, tokenizer):  # its tokenizer is its own too
        raise ConfigError(f"{root / EXPORT_CONFIG}: model.tokenizer_path must be a folder inside the export "
                          f"directory, got '{tokenizer}'")
    model_cfg["tokenizer_path"] = str(root / tokenizer)
    model_cfg["init_from"] = None  # the weights are this directory's
    for key in STRUCTURE_FROM_CONFIG:  # so are a pretrained component's: only its structure is read
        init_args = _init_args(model_cfg, key)
        if init_args.get("pretrained_path"):
            path = Path(str(init_args["pretrained_path"]))
            if not _inside(root, path):
                raise ConfigError(f"{root / EXPORT_CONFIG}: model.{key}.init_args.pretrained_path must be a folder "
                                  f"inside the export directory, got '{path}'")
            init_args["pretrained_path"], init_args["pretrained_weights"] = str(root / path), False
        if init_args.get("checkpoint_path"):
            init_args["checkpoint_path"] = None
    refuse_foreign(model_cfg, StormModel, str(root / EXPORT_CONFIG), "model")  # before anything else is read
    weights = root / EXPORT_WEIGHTS
    if not weights.is_file() or weights.is_symlink():
        raise UserError(f"{weights}: missing, or not a regular file")
    from storm_lightning.sharded_load import read_header

    stored = sum(math.prod(tensor.shape) for tensor in read_header(root, str(weights)).values())
    check_fits(model_cfg, stored, str(root / EXPORT_CONFIG), str(weights))
    model = instantiate(model_cfg, compressors, source=str(root / EXPORT_CONFIG))
    check_tokenizer(spec, model.tokenizer_fingerprint, str(root / tokenizer), str(root),
                    "its tokenizer folder was changed after the export; export the checkpoint again")
    try:
        missing, unexpected = load_safetensors(model, str(weights), strict=False)  # tied weights: stored once
    except Exception as exn:  # safetensors' errors: a bad header, a cut file
        raise UserError(f"{weights}: not a readable safetensors file ({type(exn).__name__}: "
                        f"{' '.join(str(exn).split())[:200]})") from None
    if missing or unexpected:
        raise ConfigError(f"{root / EXPORT_WEIGHTS} does not fit {root / EXPORT_CONFIG}: missing {missing[:3]}, "
                          f"unexpected {unexpected[:3]}")
    return model.eval()


def refuse_foreign(section: dict, cls: type, source: str, name: str) -> None:
    """Refuse a config section (the arguments of ``cls``) naming a class or function outside
    storm_lightning before jsonargparse imports it: a class_path is imported before it is checked to be
    a component, and a run's config.yaml or an export's config.json may come from anyone. Modules the
    user trusts go in the environment variable ``STORM_TRUSTED_MODULES``."""
    trusted = ("storm_lightning.", *(f"{m.strip()}." for m in os.environ.get(TRUSTED_MODULES, "").split(",") if m.strip()))
    dotted = _dotted_keys(section)
    if dotted:
        raise ConfigError(f"{source}: the {name} section has dotted keys {dotted[:3]}: write them nested")
    typed = _typed_keys(cls)
    named = [p for key, value in section.items() for p in _class_paths(value, component=key in typed)]
    foreign = sorted({v for v in named if not v.startswith(trusted)})
    if foreign:
        raise ConfigError(f"{source}: names classes outside storm_lightning: {foreign[:3]} (to load your own "
                          f"components, name their modules in {TRUSTED_MODULES}, comma-separated)")


def _typed_keys(cls: type) -> set[str]:
    """``cls``'s arguments that jsonargparse builds from a class or resolves to a function (components,
    LoRA settings, callables): each may be given a {class_path, init_args} or a bare "module.name"
    string, and both are imported."""
    import collections.abc
    import typing

    def leaves(hint) -> list:
        if typing.get_origin(hint) is collections.abc.Callable:
            return [collections.abc.Callable]
        args = typing.get_args(hint)
        return [leaf for arg in args for leaf in leaves(arg)] if args else [hint]

    hints = typing.get_type_hints(cls.__init__)
    plain = (str, int, float, bool, type(None))
    return {name for name, hint in hints.items()
            if any(isinstance(leaf, type) and leaf not in plain for leaf in leaves(hint))}


def _dotted_keys(config) -> list[str]:
    """Keys holding a "." (jsonargparse reads "projector.class_path" as a nested key)."""
    if isinstance(config, dict):
        own = [k for k in config if isinstance(k, str) and "." in k]
        return own + [d for v in config.values() for d in _dotted_keys(v)]
    if isinstance(config, list):
        return [d for v in config for d in _dotted_keys(v)]
    return []


def _class_paths(config, component: bool = False) -> list[str]:
    """Every class a model config would make jsonargparse import."""
    if isinstance(config, str):  # a bare class name (no module) names an already imported subclass
        return [config] if component and "." in config else []
    if isinstance(config, dict):
        own = [config["class_path"]] if isinstance(config.get("class_path"), str) else []
        return own + [p for k, v in config.items() for p in _class_paths(v, component and k == "class_path")]
    if isinstance(config, list):
        return [p for v in config for p in _class_paths(v, component)]
    return []


def media_batch(model: StormModel, prompt: str, pixel_values: torch.Tensor | None) -> Batch:
    """A one-sample batch ending with the assistant header. One placeholder in ``prompt`` stays where it
    is; with no medium, or more than one placeholder for the one medium, they are removed as words of
    the text, and the medium's placeholder opens the prompt."""
    placeholders = prompt.count(IMAGE_TOKEN) + prompt.count(VIDEO_TOKEN)
    if pixel_values is None or placeholders > 1:
        prompt = prompt.replace(IMAGE_TOKEN, "").replace(VIDEO_TOKEN, "")
    if pixel_values is not None:
        tag = VIDEO_TOKEN if len(pixel_values) > 1 else IMAGE_TOKEN
        if IMAGE_TOKEN not in prompt and VIDEO_TOKEN not in prompt:
            prompt = f"{tag}\n{prompt}"
    ids = encode_prompt(model.tokenizer, [{"from": "human", "value": prompt}], model.hparams.system_prompt)
    return Batch.prompt(ids, pixel_values)


def stop_token_ids(tokenizer) -> set[int]:
    """The tokens that end an answer: the chat template's end of turn and the tokenizer's end of text."""
    ids = {tokenizer.convert_tokens_to_ids(IM_END) if IM_END in tokenizer.get_vocab() else None, tokenizer.eos_token_id}
    return {i for i in ids if i is not None}


@torch.no_grad()
def generate(model: StormModel, prompt: str, pixel_values: torch.Tensor | None = None, max_new_tokens: int = 64,
             temperature: float = 0.0, stream: bool = False, until: tuple[str, ...] = ()) -> str:
    """Answer ``prompt`` about ``pixel_values`` ((T, 3, S, S) uint8, or None): greedy at temperature 0,
    with the KV cache (``CausalLM.generate``). ``stream`` prints the answer as it comes; the answer ends
    before the first of the ``until`` strings."""
    inputs, attention, _ = model.build_inputs(media_batch(model, prompt, pixel_values).to(model.device))
    tok = model.tokenizer
    shown = 0

    def on_token(tokens: list[int]) -> bool:
        nonlocal shown
        text = tok.decode(tokens, skip_special_tokens=True)
        if stream and not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            print(text[shown:], end="", flush=True)
            shown = len(text)
        return any(stop in text for stop in until)

    tokens = model.llm.generate(inputs, attention, max_new_tokens, stop_token_ids(tok), temperature, on_token)
    text = tok.decode(tokens, skip_special_tokens=True)
    if stream:
        print(text[shown:], flush=True)
    for stop in until:
        text = text.split(stop)[0]
    return text.strip()
