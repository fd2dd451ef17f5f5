"""Reading a pretrained checkpoint into a model built on the meta device, after FSDP2 has sharded it.

``HFCausalLM(pretrained_path=..., sharded_load=True)`` reads the checkpoint's safetensors headers
(``read_header``), builds the LLM's structure with its parameters on the meta device (no memory) in the
checkpoint's dtype, and checks that every parameter is stored under its own name and shape
(``misfit``; when not, as for models transformers converts while loading, it loads them whole instead).
``StormModel.configure_model`` shards it (``fully_shard``) and then calls ``read_into``: each rank reads,
tensor by tensor, only the rows of its own shard, in the checkpoint's dtype. No rank ever holds a full
copy of the model, and each file is mapped for one tensor at a time (mapped pages count in a process's
RSS). Unsharded (one device), the same function reads every row.

FSDP2 shards each parameter along dim 0 as ``torch.chunk`` does: rank r holds rows
``[r * c, min((r + 1) * c, n))`` with ``c = ceil(n / world)`` (checked against the shard's own shape).
An embedding or head grown past the checkpoint's vocabulary (``StormModel`` adds media tokens) gets the
checkpoint's rows, and new rows as ``resize_token_embeddings`` makes them: drawn from a normal
(``std``) for a matrix, zero for a bias.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from storm_lightning.errors import ConfigError

SINGLE, INDEX = "model.safetensors", "model.safetensors.index.json"
_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64}


@dataclass(frozen=True)
class Stored:
    """One tensor of a safetensors checkpoint: its file, shape and dtype (safetensors' name: BF16, ...)."""

    file: Path
    shape: tuple[int, ...]
    dtype: str


def read_header(directory: str | Path, key: str) -> dict[str, Stored]:
    """Every tensor of the checkpoint in ``directory`` (``model.safetensors`` or an indexed set), from
    the files' headers only; {} without safetensors. A corrupt one: ConfigError naming ``key``."""
    from safetensors import SafetensorError, safe_open

    root = Path(directory)
    if (root / INDEX).is_file():
        try:
            weight_map = json.loads((root / INDEX).read_text())["weight_map"]
            names = {str(file) for file in weight_map.values()}
        except (ValueError, KeyError, TypeError, AttributeError) as exn:
            raise ConfigError(f"{key}: {root / INDEX} is not a safetensors index ({exn})") from None
        for name in names:  # a file of this folder (a hub snapshot's are links into its blobs/: followed)
            if Path(name).name != name or name in (".", "..") or not (root / name).is_file():
                raise ConfigError(f"{key}: {root / INDEX} names '{name}', not a file in {root}")
    elif (root / SINGLE).is_file():
        names = {SINGLE}
    else:
        return {}
    header = {}
    for name in sorted(names):
        try:
            with safe_open(str(root / name), framework="pt") as f:
                for tensor in f.keys():
                    stored = f.get_slice(tensor)
                    header[tensor] = Stored(root / name, tuple(stored.get_shape()), stored.get_dtype())
        except (SafetensorError, OSError) as exn:
            raise ConfigError(f"{key}: {root / name} is not a readable safetensors file "
                              f"({' '.join(str(exn).split())})") from None
    return header


def stored_dtype(header: dict[str, Stored]) -> torch.dtype | None:
    """The floating dtype the checkpoint's tensors are stored in (the first one found)."""
    return next((_DTYPES[s.dtype] for s in header.values() if s.dtype in _DTYPES), None)


def misfit(module: nn.Module, header: dict[str, Stored]) -> str | None:
    """Why ``header`` cannot be read into ``module``'s parameters name for name and shape for shape (as
    built from the checkpoint's config, before any vocabulary growth), or None."""
    for name, param in module.named_parameters():  # a tied head is the embedding's parameter, listed once
        stored = header.get(name)
        if stored is None:
            return f"no tensor '{name}' (the checkpoint's names differ from the model's)"
        if stored.shape != tuple(param.shape):
            return f"'{name}' is {stored.shape} in the checkpoint, {tuple(param.shape)} in the model"
    own = {name for name, _ in module.named_parameters()}
    aliases = sorted(name for name, _ in module.named_parameters(remove_duplicate=False) if name not in own)
    if any(name in header for name in aliases):  # transformers then unties them: reading one would not
        return f"{[n for n in aliases if n in header]} stored apart from the weight the config ties them to"
    return None


def _rows(tensor: torch.Tensor, full_rows: int) -> tuple[int, int]:
    """The global rows [start, stop) of dim 0 that this rank's part of ``tensor`` holds."""
    from torch.distributed.tensor import DTensor, Shard

    if not isinstance(tensor, DTensor):
        return 0, full_rows
    if tuple(tensor.placements) != (Shard(0),):
        raise NotImplementedError(f"only FSDP2's Shard(0) placement is read per rank, got {tensor.placements}")
    world, rank = tensor.device_mesh.size(), tensor.device_mesh.get_local_rank()
    chunk = -(-full_rows // world)
    start = min(rank * chunk, full_rows)
    return start, min(start + chunk, full_rows)


@torch.no_grad()
def read_into(module: nn.Module, header: dict[str, Stored], device: torch.device | str, std: float) -> None:
    """Materialise ``module``'s meta parameters on ``device`` (sharded or not) and fill them from the
    checkpoint (``read_header``; ``misfit`` has passed). Buffers (rotary frequencies, built for real)
    are kept."""
    from safetensors import safe_open
    from torch.distributed.tensor import DTensor

    buffers = {name: b.clone() for name, b in module.named_buffers() if not b.is_meta}
    first, tied = {}, {}  # a parameter under a second name (a tied head) -> its first name
    for name, param in module.named_parameters(remove_duplicate=False):
        tied.update({name: first[id(param)]} if id(param) in first else {})
        first.setdefault(id(param), name)
    module.to_empty(device=device)  # one new tensor per name: ties are made again below
    for name, value in buffers.items():
        module.get_buffer(name).copy_(value)
    for name, target in tied.items():
        owner, _, attr = name.rpartition(".")
        setattr(module.get_submodule(owner), attr, module.get_parameter(target))
    for name, param in module.named_parameters():
        local = param.to_local() if isinstance(param, DTensor) else param.data
        stored = header[name]
        with safe_open(str(stored.file), framework="pt") as f:  # one tensor's pages mapped at a time
            if param.dim() == 0:
                local.copy_(f.get_tensor(name))
                continue
            start, stop = _rows(param, param.shape[0])
            assert local.shape[0] == stop - start, (name, local.shape, start, stop)
            have = max(0, min(stop, stored.shape[0]) - start)  # rows of this part the checkpoint holds
            if have:
                local[:have].copy_(f.get_slice(name)[start:start + have])
        if have < local.shape[0]:  # a vocabulary grown past the checkpoint's
            local[have:].normal_(0.0, std) if local.dim() > 1 else local[have:].zero_()
