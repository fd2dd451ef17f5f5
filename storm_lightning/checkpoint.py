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
import math
import os
import pickle
from pathlib import Path
from typing import Any, Callable, TypeVar

import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO

from storm_lightning.errors import ConfigError, MissingPathError, UnsafeFileError, UserError, one_line_errors

T = TypeVar("T")

# every checkpoint storm-fit writes holds the text of the config that trained it under this key: a later
# run writing its config.yaml into the same folder cannot change what the checkpoint is read as
RUN_CONFIG = "storm_run_config"
# and the fingerprint of the tokenizer it was trained with (tokenizer.tokenizer_fingerprint): a tokenizer
# retrained in the same folder (storm-shards synth again) gives other ids to the same tokens
TOKENIZER_FINGERPRINT = "storm_tokenizer_fingerprint"

log = logging.getLogger(__name__)


def check_tokenizer(checkpoint: dict, fingerprint: str, tokenizer_path: str, what: str,
                    hint: str = "point data.tokenizer_path at the tokenizer that run used") -> None:
    """A one-line ``ConfigError`` when ``checkpoint`` was trained with another tokenizer (vocabulary or
    chat template: ``tokenizer.tokenizer_fingerprint``) than the one at ``tokenizer_path``. Checkpoints
    written before fingerprints were kept are not checked."""
    theirs = checkpoint.get(TOKENIZER_FINGERPRINT)
    if isinstance(theirs, str) and theirs != fingerprint:
        raise ConfigError(f"{what} was trained with another tokenizer than the one in '{tokenizer_path}' (vocabulary "
                          f"and chat template {fingerprint}, the checkpoint's {theirs}): {hint}")


def load_checkpoint_file(path: str | Path, what: str) -> dict:
    """A single-file checkpoint, weights only (tensors and plain data; nothing in it can run), or a
    one-line ``UserError`` naming ``what`` and the file: not a local file, a folder (a sharded checkpoint
    needs conf/fsdp.yaml or storm-consolidate), a pickled object, a TorchScript archive, a cut file."""
    text = str(path)
    if "://" in text:
        raise UnsafeFileError(f"{what}: '{text}' is not a local file: download checkpoints yourself and check them")
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{what}: '{path}' is a folder: a sharded (FSDP2) checkpoint loads with --config "
                        "conf/fsdp.yaml, or make one file of it with storm-consolidate")
    if not path.is_file():
        raise MissingPathError(f"{what}: no such checkpoint file '{path}'")
    checkpoint = _weights_only(lambda: torch.load(path, map_location="cpu", weights_only=True), path, what,
                               "is not a readable checkpoint")
    if not isinstance(checkpoint, dict):
        raise UserError(f"{what}: {path} holds a {type(checkpoint).__name__}, not a checkpoint")
    return checkpoint


def load_pretrained(load: Callable[[], T], path: str, key: str) -> T:
    """``load()`` (transformers' ``from_pretrained`` of the directory ``path``), with its failures as one
    line naming ``key``: a pickled ``pytorch_model.bin`` (transformers loads it weights-only and refuses
    it), weights of another shape, an unreadable file."""
    return _weights_only(load, path, key, "does not load")


def _weights_only(load: Callable[[], T], path, key: str, failure: str) -> T:
    """``load()`` (a weights-only read), its failures as one line: a pickled object (UnsafeFileError),
    anything else unreadable (UserError: ``{key}: {path} {failure} (...)``)."""
    from safetensors import SafetensorError

    try:
        return load()
    except pickle.UnpicklingError as exn:
        first = str(exn).strip().splitlines()[0] if str(exn).strip() else type(exn).__name__
        raise UnsafeFileError(f"{key}: {path} holds more than tensors and plain data, refused ({first})") from None
    except (RuntimeError, OSError, EOFError, ValueError, MemoryError, RecursionError, SafetensorError) as exn:
        raise UserError(f"{key}: {path} {failure} ({type(exn).__name__}: {' '.join(str(exn).split())[:300]})") from None


class AtomicCheckpointIO(TorchCheckpointIO):
    def load_checkpoint(self, path, map_location: Any = None, weights_only: bool | None = None) -> dict:
        """``--ckpt_path``: weights only, local files only (Lightning's own loader unpickles URLs freely);
        a checkpoint Lightning wrote, not weights alone (``model.init_from`` takes those)."""
        checkpoint = load_checkpoint_file(path, "--ckpt_path")
        if not {"pytorch-lightning_version", "state_dict"} <= checkpoint.keys():
            raise UserError(f"--ckpt_path {path}: holds weights only, not a checkpoint of a run: give it as "
                            f"--model.init_from={path} instead (fit, validate and test take it)")
        return checkpoint

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
    """Raise ``UnsafeFileError`` unless a sharded checkpoint folder holds only data, of the sizes it says.

    Reads each ``*.metadata`` with an unpickler that knows the metadata classes only; checks that every
    storage file it names is a regular file inside the folder and every entry lies within its file;
    that its nesting paths (``planner_data``) spell their own keys (torch grows a list to an index it
    reads there: a 1 KB file could ask for 10^11 entries) and its tensors fit in the bytes stored; and
    loads each non-tensor entry and Lightning's ``meta.pt`` with ``torch.load(weights_only=True)``.
    Unpickling is deterministic: once these loads succeed, torch's own unrestricted loads of the same
    bytes can only build the same objects.
    """
    folder = Path(folder)
    metadata_files = sorted(folder.glob("*.metadata"))
    if not metadata_files:
        raise MissingPathError(f"'{folder}' is not a sharded checkpoint folder (no .metadata)")
    for path in metadata_files:
        try:
            _verify_index(folder, path)
        except UnsafeFileError:
            raise
        except Exception as exn:  # anything else the index makes torch or us trip on
            raise UnsafeFileError(f"{path}: not a valid checkpoint index ({type(exn).__name__}: "
                                  f"{' '.join(str(exn).split())[:200]})") from None
    extra = folder / "meta.pt"  # Lightning's non-tensor state (loops, callbacks, hyperparameters)
    if extra.exists():
        _regular_file(extra, folder)
        _weights_only_load(extra, str(extra))


def _regular_file(path: Path, folder: Path) -> int:
    """The size of a file of the checkpoint, refusing links, devices and FIFOs."""
    if path.is_symlink() or not path.is_file():
        raise UnsafeFileError(f"{path}: not a regular file of {folder} (a link, a device, a FIFO): refused")
    return path.stat().st_size


def _verify_index(folder: Path, path: Path) -> None:
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata, TensorStorageMetadata

    if path.stat().st_size > 2**30:
        raise UnsafeFileError(f"{path}: a checkpoint index of {path.stat().st_size} bytes: refused")
    with open(path, "rb") as f:
        try:
            metadata = _MetadataUnpickler(f, path).load()
        except UnsafeFileError:
            raise
        except Exception as exn:  # truncated, not a pickle, persistent ids, ...
            raise UnsafeFileError(f"{path}: not a readable checkpoint index ({type(exn).__name__}: {exn})") from None
    if not isinstance(metadata, Metadata) or not isinstance(metadata.state_dict_metadata, dict) or not isinstance(
            metadata.storage_data, dict):
        raise UnsafeFileError(f"{path}: holds a {type(metadata).__name__} that is not checkpoint metadata")
    sizes: dict[str, int] = {}
    by_fqn: dict[str, list] = {}
    for index, info in metadata.storage_data.items():
        relative = Path(str(info.relative_path))
        if relative.is_absolute() or ".." in relative.parts or len(relative.parts) != 1:
            raise UnsafeFileError(f"{path}: entry {index.fqn} points outside the folder ('{relative}'): refused")
        if str(relative) not in sizes:
            sizes[str(relative)] = _regular_file(folder / relative, folder)
        if not (0 <= info.offset and 0 <= info.length and info.offset + info.length <= sizes[str(relative)]):
            raise UnsafeFileError(f"{path}: entry {index.fqn} lies outside {relative} (offset {info.offset}, "
                                  f"length {info.length}, file {sizes[str(relative)]} bytes): refused")
        if getattr(info, "transform_descriptors", None):
            raise UnsafeFileError(f"{path}: entry {index.fqn} is stored with transforms "
                                  f"{list(info.transform_descriptors)} that cannot be verified: refused")
        by_fqn.setdefault(index.fqn, []).append(info)
    for key, route in (metadata.planner_data or {}).items():
        if (not isinstance(route, (tuple, list)) or ".".join(map(str, route)) != key
                or any(isinstance(step, int) and not 0 <= step < 2**20 for step in route)):
            raise UnsafeFileError(f"{path}: the nesting path of {key!r} is not its own key: refused")
    stored = sum(sizes.values())
    for fqn, item in metadata.state_dict_metadata.items():
        if isinstance(item, TensorStorageMetadata):
            numel = math.prod(item.size)
            if numel * item.properties.dtype.itemsize > stored:
                raise UnsafeFileError(f"{path}: tensor {fqn} of size {tuple(item.size)} is larger than the "
                                      f"{stored} bytes stored: refused")
        elif isinstance(item, BytesStorageMetadata):
            for info in by_fqn.get(fqn, []):
                with open(folder / str(info.relative_path), "rb") as f:
                    f.seek(info.offset)
                    data = f.read(info.length)
                _weights_only_load(io.BytesIO(data), f"{folder / str(info.relative_path)} (entry {fqn})")
        else:
            raise UnsafeFileError(f"{path}: entry {fqn} is a {type(item).__name__}: refused")


def _weights_only_load(source, name: str):
    try:
        return torch.load(source, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exn:
        first = str(exn).strip().splitlines()[0] if str(exn).strip() else type(exn).__name__
        raise UnsafeFileError(f"{name}: holds more than tensors and plain data, refused ({first})") from None
    except Exception as exn:  # a TorchScript archive, a cut file, ...
        raise UnsafeFileError(f"{name}: not a weights-only torch file ({type(exn).__name__}: "
                              f"{' '.join(str(exn).split())[:200]}): refused") from None


def consolidate(sharded: str, output: str) -> dict:
    """A sharded (FSDP2, one file per rank) checkpoint folder -> one ``.ckpt`` file that ``--ckpt_path``,
    ``model.init_from`` and ``storm-chat`` load. Runs in one process; needs memory for the full model."""
    from lightning.fabric.utilities.load import _load_distributed_checkpoint

    folder = Path(sharded)
    if not folder.is_dir():
        raise MissingPathError(f"'{sharded}' is not a sharded checkpoint folder")
    if Path(output).is_dir():
        raise UserError(f"OUTPUT {output}: is a folder: give the name of the file to write")
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
