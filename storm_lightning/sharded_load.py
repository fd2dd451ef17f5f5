"""Reading a pretrained checkpoint into a model built on the meta device, after FSDP2 has sharded it.

``HFCausalLM(pretrained_path=..., sharded_load=True)`` builds the LLM's structure with its parameters on
the meta device (no memory); ``StormModel.configure_model`` shards it (``fully_shard``) and then calls
``read_into``: each rank reads, tensor by tensor, only the rows of its own shard from the checkpoint's
safetensors files, in the checkpoint's dtype. No rank ever holds a full copy of the model, and each file
is mapped for one tensor at a time (mapped pages count in a process's RSS). Unsharded (one device), the
same function reads every row.

FSDP2 shards each parameter along dim 0 as ``torch.chunk`` does: rank r holds rows
``[r * c, min((r + 1) * c, n))`` with ``c = ceil(n / world)`` (checked against the shard's own shape).
An embedding grown past the checkpoint's vocabulary (``StormModel`` adds media tokens) gets the
checkpoint's rows and new rows drawn as ``resize_token_embeddings`` would draw them (normal, ``std``).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from storm_lightning.errors import ConfigError

SINGLE, INDEX = "model.safetensors", "model.safetensors.index.json"


def checkpoint_files(directory: str | Path, key: str) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it (``model.safetensors`` or an indexed set)."""
    from safetensors import safe_open

    root = Path(directory)
    if (root / INDEX).is_file():
        try:
            weight_map = json.loads((root / INDEX).read_text())["weight_map"]
            files = {str(name): root / str(file) for name, file in weight_map.items()}
        except (ValueError, KeyError, TypeError, AttributeError) as exn:
            raise ConfigError(f"{key}: {root / INDEX} is not a safetensors index ({exn})") from None
        for file in set(files.values()):
            if file.resolve().parent != root.resolve() or not file.is_file():
                raise ConfigError(f"{key}: {root / INDEX} names '{file.name}', not a file in {root}")
        return files
    if (root / SINGLE).is_file():
        with safe_open(str(root / SINGLE), framework="pt") as f:
            return {name: root / SINGLE for name in f.keys()}
    raise ConfigError(f"{key}: sharded_load reads safetensors, and {root} has neither {SINGLE} nor {INDEX} "
                      "(save the model with save_pretrained(..., safe_serialization=True), or set "
                      "sharded_load: false)")


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
def read_into(module: nn.Module, directory: str | Path, device: torch.device | str, key: str, std: float) -> None:
    """Materialise ``module``'s meta parameters on ``device`` (sharded or not) and fill them from the
    checkpoint in ``directory``. Buffers (rotary frequencies, built for real) are kept."""
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
    files = checkpoint_files(directory, key)
    params = dict(module.named_parameters())  # a tied head is the embedding's parameter, listed once
    missing = sorted(set(params) - set(files))
    if missing:
        raise ConfigError(f"{key}: {directory} has no tensors {missing[:5]} for this model (its names may need "
                          "transformers' own conversion: set sharded_load: false)")
    for name, param in params.items():
        local = param.to_local() if isinstance(param, DTensor) else param.data
        if param.dim() == 0:
            with safe_open(str(files[name]), framework="pt") as f:
                local.copy_(f.get_tensor(name))
            continue
        with safe_open(str(files[name]), framework="pt") as f:  # one tensor's pages mapped at a time
            stored = f.get_slice(name)
            shape = tuple(stored.get_shape())
            if shape[1:] != tuple(param.shape[1:]) or shape[0] > param.shape[0]:
                raise ConfigError(f"{key}: {name} is {shape} in {directory}, the model's is {tuple(param.shape)}")
            start, stop = _rows(param, param.shape[0])
            assert local.shape[0] == stop - start, (name, local.shape, start, stop)
            have = max(0, min(stop, shape[0]) - start)  # rows of this part the checkpoint holds
            if have:
                local[:have].copy_(stored[start:start + have])
        if have < local.shape[0]:  # a vocabulary grown past the checkpoint's
            local[have:].normal_(0.0, std)
