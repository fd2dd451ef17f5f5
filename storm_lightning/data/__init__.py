"""The data path: shards -> samples -> stream -> batches -> ``StormDataModule`` (see datamodule.py).

``Batch``, ``ShardSource`` and ``StormDataModule`` are imported on first use, so that a tool which only
reads videos or shards (``storm-shards``, a decode benchmark) does not load Lightning.
"""

import importlib

_EXPORTS = {"Batch": "storm_lightning.data.batching", "ShardSource": "storm_lightning.data.datamodule",
            "StormDataModule": "storm_lightning.data.datamodule"}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'storm_lightning.data' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
