"""``storm-fit``: LightningCLI with STORM's model and data module, one-line config errors, atomic
checkpoint saves, and a SIGTERM that stops the run wherever it is."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
from pathlib import Path

from jsonargparse import get_loader, set_loader
from lightning.pytorch import Callback
from lightning.pytorch.accelerators import CPUAccelerator
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_info

from storm_lightning.checkpoint import RUN_CONFIG, AtomicCheckpointIO
from storm_lightning.config_yaml import bounded
from storm_lightning.data import StormDataModule
from storm_lightning.errors import ConfigError, DataError, UserError, one_line_errors
from storm_lightning.host_memory import keep_freed_memory
from storm_lightning.model import StormModel


def config_error(message: str) -> None:
    """One line on stderr, exit status 2: a config error needs its key named, not a traceback."""
    text = " ".join(line.strip() for line in str(message).strip().splitlines())
    sys.stderr.write(f"storm-fit: config error: {text}\n")
    sys.exit(2)


# `storm-fit fit` writes the run's config.yaml; the other subcommands record theirs beside it under
# another name, so that evaluating with other frames or compressors never changes what storm-chat,
# storm-export and a resumed run read as the trained model's config
def config_filename(subcommand: str) -> str:
    return "config.yaml" if subcommand == "fit" else f"{subcommand}_config.yaml"


class StormArgumentParser(LightningArgumentParser):
    """Parse errors (unknown key, wrong type) as one line instead of the whole usage text."""

    def error(self, message: str, ex: Exception | None = None):
        if not self.exit_on_error:  # jsonargparse probing internally: keep its behaviour
            return super().error(message, ex)
        config_error(f"{message} (`storm-fit fit --help` lists every key)")


# data settings that change what a checkpoint reads: compared with those it was trained with
COMPARED_DATA_KEYS = ("system_prompt", "tokenizer_path", "image_size", "max_length")
log = logging.getLogger(__name__)


class StormCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        # one tokenizer for data and model: set data.tokenizer_path only
        parser.link_arguments("data.tokenizer_path", "model.tokenizer_path")
        parser.link_arguments("data.system_prompt", "model.system_prompt")  # and one chat format
        # batching by token budget counts each clip's visual tokens as the model's compressors leave them
        parser.link_arguments("model", "data.visual_tokens", compute_fn=lambda model: model.visual_token_count,
                              apply_on="instantiate")

    def before_fit(self) -> None:
        self._compare_with_checkpoint("fit")

    def before_validate(self) -> None:
        self._compare_with_checkpoint("validate")

    def before_test(self) -> None:
        self._compare_with_checkpoint("test")

    def before_predict(self) -> None:
        self._compare_with_checkpoint("predict")

    def _compare_with_checkpoint(self, subcommand: str) -> None:
        """A warning naming the data settings that differ from those the ``--ckpt_path`` checkpoint was
        trained with (its embedded config): scoring it with another system prompt, say, went unsaid."""
        import torch
        import yaml

        path = self.config[subcommand].get("ckpt_path")
        if not path or not Path(str(path)).is_file():
            return  # none, "last"/"best", or a sharded folder (no embedded config)
        try:
            text = torch.load(path, map_location="cpu", weights_only=True, mmap=True).get(RUN_CONFIG)
            trained = yaml.safe_load(text) if isinstance(text, str) and len(text) <= 1_000_000 else None
            trained_data = trained["data"] if isinstance(trained, dict) and isinstance(trained.get("data"), dict) else None
        except Exception:  # unreadable: Lightning's own load says so, in one line (checkpoint.py)
            return
        if trained_data is None:
            return
        now = self.config[subcommand].data
        differ = [f"data.{key}={trained_data.get(key)!r} (now {now.get(key)!r})" for key in COMPARED_DATA_KEYS
                  if trained_data.get(key) != now.get(key)]
        if differ:
            log.warning("--ckpt_path %s was trained with other settings: %s; %s runs with this config's",
                        path, ", ".join(differ), subcommand)

    def after_validate(self) -> None:
        self._require_results("validate", "val")

    def after_test(self) -> None:
        self._require_results("test", "test")

    def _require_results(self, subcommand: str, stage: str) -> None:
        """An evaluation in which no sample could be read is an error, not an exit 0 without figures."""
        if f"{stage}/loss" not in self.trainer.callback_metrics:
            raise DataError(f"storm-fit {subcommand}: no sample of data.val_sources was evaluated (each was "
                            "skipped, or the sources are empty: see the warnings above)")
        missing = [s.name for s in self.datamodule.val_sources if s.name not in self.model.evaluated_sources]
        limit = self.trainer.limit_test_batches if stage == "test" else self.trainer.limit_val_batches
        every = isinstance(limit, float) and limit == 1.0  # (an int 1 is one batch)
        if missing and self.trainer.world_size == 1 and every:  # every batch read: a source gave none
            raise DataError(f"storm-fit {subcommand}: data.val_sources {missing} gave no sample (each was skipped, "
                            "or the source is empty: see the warnings above); the figures would leave them out")

    def instantiate_trainer(self, **kwargs):
        trainer = super().instantiate_trainer(**kwargs)
        if self.subcommand == "fit":
            trainer.callbacks.append(EmbedRunConfig())
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:  # the default: make saves atomic
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        if isinstance(trainer.accelerator, CPUAccelerator) and keep_freed_memory():  # see host_memory
            rank_zero_info("Host memory: freed blocks are kept for reuse, not returned to the OS "
                           "(faster CPU steps; STORM_KEEP_FREED_MEMORY=0 turns this off)")
        return trainer


class EmbedRunConfig(Callback):
    """Puts the text of the run's config.yaml (written by Lightning's SaveConfigCallback at setup) into
    every checkpoint (``checkpoint.RUN_CONFIG``): storm-chat, storm-export and the lmms-eval adapter read
    a checkpoint with the config that trained it, even after another run has rewritten config.yaml."""

    def __init__(self) -> None:
        self.text: str | None = None

    def on_fit_start(self, trainer, pl_module) -> None:
        path = Path(trainer.log_dir or trainer.default_root_dir) / config_filename("fit")
        self.text = path.read_text(encoding="utf-8") if path.is_file() else None

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        if self.text is not None:
            checkpoint[RUN_CONFIG] = self.text


class Terminated(BaseException):
    """SIGTERM: stop now, wherever the run is, data loading included. Lightning alone would stop only at
    the next step boundary, which a stalled data loader never reaches. Checkpoint saves are atomic
    (``AtomicCheckpointIO``), so stopping anywhere leaves no half-written file."""


def _terminate(signum, frame) -> None:
    global _TERMINATING
    if os.getpid() != _MAIN_PID:  # a forked data worker (SIGTERM to the process group): the main process
        return  # stops the run and its workers; a worker dying first would be reported as a crash
    _TERMINATING = True
    raise Terminated(signum)


_MAIN_PID = os.getpid()
_TERMINATING = False


@contextlib.contextmanager
def lightning_errors():
    """Lightning's own misconfiguration errors (``--trainer.max_steps=-5``) as config errors: one line;
    and a component's own UserError that jsonargparse wrapped while trying the types of a union
    (``--model.compressors+=TemporalSample --model.compressors.init_args.stride=0``) as itself."""
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    try:
        yield
    except MisconfigurationException as exn:
        raise ConfigError(f"trainer: {exn}") from None
    except ValueError as exn:
        cause, seen = exn, set()
        while cause is not None and id(cause) not in seen and not isinstance(cause, UserError):
            seen.add(id(cause))
            cause = cause.__cause__ or cause.__context__
        if cause is None or id(cause) in seen:
            raise
        raise cause from None


def fit_main(args: list[str] | None = None) -> None:
    """``storm-fit [fit|validate|test|predict] --config conf/sft.yaml [--key=value ...]``."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a model hub
    argv = list(sys.argv[1:] if args is None else args)
    if not argv or argv[0] not in ("fit", "validate", "test", "predict", "-h", "--help"):
        argv = ["fit", *argv]  # `storm-fit --config x.yaml` means fit
    sys.argv = [sys.argv[0], *argv]
    subcommand = argv[0] if argv[0] in ("fit", "validate", "test", "predict") else "fit"
    # a UserError is raised while building components, in StormModel.setup (before any data), or when
    # a checkpoint is refused
    global _MAIN_PID
    _MAIN_PID = os.getpid()
    signal.signal(signal.SIGTERM, _terminate)  # Lightning adds its own handler in front of it
    set_loader("yaml", bounded(get_loader("yaml")))  # aliases of aliases: refused, not expanded 10^10 times
    try:
        with one_line_errors("storm-fit"), lightning_errors():
            StormCLI(StormModel, StormDataModule, parser_class=StormArgumentParser, auto_configure_optimizers=False,
                     save_config_kwargs={"overwrite": True, "config_filename": config_filename(subcommand)})
    except (Terminated, Exception) as exn:
        if not (isinstance(exn, Terminated) or _TERMINATING):  # an error of its own, not the stop's echo
            raise
        sys.stderr.write("storm-fit: stopped by SIGTERM; resume from the last checkpoint with --ckpt_path\n")
        sys.exit(128 + signal.SIGTERM)
