"""Checkpoint files that are never half-written.

``AtomicCheckpointIO`` writes to a temporary file in the same directory, fsyncs it and renames it over
the target (``os.replace`` is atomic on POSIX): a process killed during a save leaves the previous
checkpoint as it was. ``storm-fit`` installs it unless another CheckpointIO is configured.
``StepCheckpoint`` makes sure the final step is saved.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO


class AtomicCheckpointIO(TorchCheckpointIO):
    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        path = Path(path)
        if path.is_dir():
            raise IsADirectoryError(
                f"'{path}' is a folder, most likely a sharded checkpoint of an FSDP run: write single-file "
                "checkpoints elsewhere (the checkpoint callback's dirpath), or storm-consolidate it first"
            )
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)


class StepCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` that always leaves ``last.ckpt`` at the final step.

    Lightning 2.6 writes ``last`` at the end of training only if no ``last`` was written before, so with
    ``max_steps`` not a multiple of ``every_n_train_steps`` (and on a resumed run) the final steps were
    silently lost. Use it like ModelCheckpoint.
    """

    def on_train_end(self, trainer, pl_module) -> None:
        if self.save_last and self._last_global_step_saved != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))


def consolidate(sharded: str, output: str) -> dict:
    """A sharded (FSDP2, one file per rank) checkpoint folder -> one ``.ckpt`` file that ``--ckpt_path``,
    ``model.init_from`` and ``storm-chat`` load. Runs in one process; needs memory for the full model."""
    from lightning.fabric.utilities.load import _load_distributed_checkpoint

    folder = Path(sharded)
    if not (folder / ".metadata").is_file():
        raise FileNotFoundError(f"'{sharded}' is not a sharded checkpoint folder (no .metadata)")
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
    checkpoint = consolidate(opts.sharded, opts.output)
    print(f"{opts.output}: {len(checkpoint['state_dict'])} tensors, step {checkpoint.get('global_step')}")
