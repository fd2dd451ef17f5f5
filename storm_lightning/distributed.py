"""Distributed training: pure FSDP2 through Lightning's ModelParallelStrategy."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from lightning.pytorch.strategies import ModelParallelStrategy
from torch.distributed.constants import default_pg_timeout

from storm_lightning.checkpoint import verify_sharded_checkpoint


class FSDP2Strategy(ModelParallelStrategy):
    """``ModelParallelStrategy`` with every process in one data-parallel (FSDP2) group.

    Lightning's ``data_parallel_size="auto"`` means one group per node (the rest would be tensor
    parallel); here it is the world size, so ``devices=N`` shards over all N processes. Works on CPU
    (gloo) as on GPUs (NCCL). ``save_distributed_checkpoint=True`` writes one file per rank.
    """

    def __init__(self, save_distributed_checkpoint: bool = True, process_group_backend: str | None = None,
                 timeout: timedelta | None = default_pg_timeout) -> None:
        super().__init__(data_parallel_size="auto", tensor_parallel_size=1,
                         save_distributed_checkpoint=save_distributed_checkpoint,
                         process_group_backend=process_group_backend, timeout=timeout)

    def setup_environment(self) -> None:
        self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()

    def load_checkpoint(self, checkpoint_path, weights_only: bool | None = None) -> dict:
        """Lightning's loading, after ``verify_sharded_checkpoint`` has made sure that a sharded folder
        holds only data (torch unpickles it without restriction); files load with ``weights_only``."""
        if Path(checkpoint_path).is_dir():
            verify_sharded_checkpoint(checkpoint_path)
        return super().load_checkpoint(checkpoint_path, weights_only=True)
