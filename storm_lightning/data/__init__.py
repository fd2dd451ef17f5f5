from storm_lightning.data.datamodule import ShardSource, StormDataModule

__all__ = ["ShardSource", "StormDataModule"]
