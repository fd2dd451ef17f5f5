"""Checkpoint files that are never half-written, and sharded checkpoints that cannot run code.

``AtomicCheckpointIO`` writes to a temporary file in the same directory, fsyncs it and renames it over
the target (``os.replace`` is atomic on POSIX): a process killed during a save leaves the previous
checkpoint as it was. ``storm-fit`` installs it unless another CheckpointIO is configured.
``StepCheckpoint`` makes sure the final step is saved.

A sharded (FSDP2, ``torch.distributed.checkpoint``) checkpoint folder is unpickled by torch without
restriction: its ``.metadata`` with ``pickle.load``, and its non-tensor entries with
``torch.load(weights_only=False)``. ``verify_sharded_checkpoint`` reads every one of those with a
restricted unpickler first and refuses the folder if any refers to anything but checkpoint metadata or
plain data; every path that loads such a folder calls it (``FSDP2Strategy.load_checkpoint``,
``consolidate``).
"""

from __future__ import annotations

import io
import logging
import os
import pickle
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO

from storm_lightning.errors import MissingPathError, UnsafeFileError, one_line_errors

log = logging.getLogger(__name__)


class AtomicCheckpointIO(TorchCheckpointIO):
    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        path = Path(path)
        if path.is_dir():
            raise IsADirectoryError(
                f"'{path}' is a folder, most likely a sharded checkpoint of an FSDP run: write single-file "
                "checkpoints elsewhere (the checkpoint callback's dirpath), or storm-consolidate it first"
            )
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{TMP_PREFIX}{path.name}.tmp{os.getpid()}")
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
            fsync_dir(path.parent)  # the rename itself survives a power loss only once the folder is synced
        finally:
            tmp.unlink(missing_ok=True)


TMP_PREFIX = "."  # temporary files are hidden: ".last.ckpt.tmp<pid>"


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Delete the temporary files of saves that were killed midway (``.<name>.tmp<pid>`` whose process is
    gone); a live process's save in progress is left alone. Returns what was removed."""
    removed = []
    for tmp in Path(folder).glob(f"{TMP_PREFIX}*.tmp*"):
        pid = tmp.name.rpartition(".tmp")[2]
        if not pid.isdigit() or _process_alive(int(pid)):
            continue
        tmp.unlink(missing_ok=True)
        removed.append(tmp)
    return removed


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


class StepCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` that always leaves ``last.ckpt`` at the final step.

    Lightning 2.6 writes ``last`` at the end of training only if no ``last`` was written before, so with
    ``max_steps`` not a multiple of ``every_n_train_steps`` (and on a resumed run) the final steps were
    silently lost. Use it like ModelCheckpoint. At setup it deletes the temporary files that saves killed
    midway left in its folder.
    """

    def setup(self, trainer, pl_module, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if trainer.is_global_zero and self.dirpath and Path(self.dirpath).is_dir():
            for tmp in remove_stale_temporaries(Path(self.dirpath)):
                log.info("removed %s, left by a save that was killed midway", tmp)

    def on_train_end(self, trainer, pl_module) -> None:
        if self.save_last and self._last_global_step_saved != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))


# What the ``.metadata`` of a torch.distributed.checkpoint folder refers to: its metadata dataclasses,
# torch sizes, dtypes and layouts, and paths. Nothing that runs code when called.
_DCP_METADATA_GLOBALS = {
    *(("torch.distributed.checkpoint.metadata", name) for name in (
        "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
        "ChunkStorageMetadata", "BytesStorageMetadata", "_MEM_FORMAT_ENCODING")),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"), ("torch.serialization", "_get_layout"), ("collections", "OrderedDict"),
    ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "PureWindowsPath"),
}


class _MetadataUnpickler(pickle.Unpickler):
    def __init__(self, file, path: Path) -> None:
        super().__init__(file)
        self.path = path

    def find_class(self, module: str, name: str):
        if (module, name) in _DCP_METADATA_GLOBALS or (
                module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise UnsafeFileError(f"{self.path}: refers to {module}.{name}, which is not checkpoint metadata: refused "
                              "(nothing in it was run)")


def verify_sharded_checkpoint(folder: str | Path) -> None:
    """Raise ``UnsafeFileError`` unless every pickle in a sharded checkpoint folder holds only data.

    Reads each ``*.metadata`` with an unpickler that knows the metadata classes only, checks that every
    storage file it names is inside the folder, and loads each non-tensor entry and Lightning's
    ``meta.pt`` with ``torch.load(weights_only=True)``. Unpickling is deterministic: once these loads
    succeed, torch's own unrestricted loads of the same bytes can only build the same objects.
    """
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata

    folder = Path(folder)
    metadata_files = sorted(folder.glob("*.metadata"))
    if not metadata_files:
        raise MissingPathError(f"'{folder}' is not a sharded checkpoint folder (no .metadata)")
    for path in metadata_files:
        with open(path, "rb") as f:
            try:
                metadata = _MetadataUnpickler(f, path).load()
            except UnsafeFileError:
                raise
            except Exception as exn:  # truncated, not a pickle, persistent ids, ...
                raise UnsafeFileError(f"{path}: not a readable checkpoint index ({type(exn).__name__}: {exn})") from None
        if not isinstance(metadata, Metadata):
            raise UnsafeFileError(f"{path}: holds a {type(metadata).__name__}, not checkpoint metadata")
        storage = metadata.storage_data or {}
        for index, info in storage.items():
            relative = Path(str(info.relative_path))
            if relative.is_absolute() or ".." in relative.parts or len(relative.parts) != 1:
                raise UnsafeFileError(f"{path}: entry {index.fqn} points outside the folder ('{relative}'): refused")
        for fqn, item in metadata.state_dict_metadata.items():
            if not isinstance(item, BytesStorageMetadata):
                continue
            infos = [info for index, info in storage.items() if index.fqn == fqn]
            for info in infos:
                if getattr(info, "transform_descriptors", None):
                    raise UnsafeFileError(f"{path}: entry {fqn} is stored with transforms "
                                          f"{list(info.transform_descriptors)} that cannot be verified: refused")
                with open(folder / str(info.relative_path), "rb") as f:
                    f.seek(info.offset)
                    data = f.read(info.length)
                _weights_only_load(io.BytesIO(data), f"{folder / str(info.relative_path)} (entry {fqn})")
    extra = folder / "meta.pt"  # Lightning's non-tensor state (loops, callbacks, hyperparameters)
    if extra.is_file():
        _weights_only_load(extra, str(extra))


def _weights_only_load(source, name: str):
    try:
        return torch.load(source, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exn:
        first = str(exn).strip().splitlines()[0] if str(exn).strip() else type(exn).__name__
        raise UnsafeFileError(f"{name}: holds more than tensors and plain data, refused ({first})") from None


def consolidate(sharded: str, output: str) -> dict:
    """A sharded (FSDP2, one file per rank) checkpoint folder -> one ``.ckpt`` file that ``--ckpt_path``,
    ``model.init_from`` and ``storm-chat`` load. Runs in one process; needs memory for the full model."""
    from lightning.fabric.utilities.load import _load_distributed_checkpoint

    folder = Path(sharded)
    if not folder.is_dir():
        raise MissingPathError(f"'{sharded}' is not a sharded checkpoint folder")
    verify_sharded_checkpoint(folder)
    checkpoint = _load_distributed_checkpoint(folder)
    if "model" in checkpoint:  # FSDPStrategy's layout; ModelParallelStrategy already says state_dict
        checkpoint["state_dict"] = checkpoint.pop("model")
    optimizers = sorted((k for k in checkpoint if k.startswith("optimizer_")), key=lambda k: int(k.split("_")[1]))
    if optimizers:  # back into the list a single-file checkpoint holds
        checkpoint["optimizer_states"] = [checkpoint.pop(k) for k in optimizers]
    AtomicCheckpointIO().save_checkpoint(checkpoint, output)
    return checkpoint


def consolidate_main(args: list[str] | None = None) -> None:
    """``storm-consolidate SHARDED_DIR OUTPUT.ckpt``"""
    import argparse

    parser = argparse.ArgumentParser(prog="storm-consolidate", description=consolidate.__doc__)
    parser.add_argument("sharded", help="e.g. runs/sft/checkpoints/last.ckpt (a folder under FSDP2)")
    parser.add_argument("output", help="the single-file checkpoint to write")
    opts = parser.parse_args(args)
    with one_line_errors("storm-consolidate"):
        checkpoint = consolidate(opts.sharded, opts.output)
    print(f"{opts.output}: {len(checkpoint['state_dict'])} tensors, step {checkpoint.get('global_step')}")
