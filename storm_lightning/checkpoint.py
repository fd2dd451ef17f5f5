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
