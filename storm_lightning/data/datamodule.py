"""``StormDataModule``: the sources of a run (``ShardSource``) and their loaders, and the data position
in checkpoints.

The data path, one module a step: ``shards`` (tar -> raw samples) -> ``samples`` (validate, decode,
tokenize: ``Sample``) -> ``stream`` (mix sources, shuffle, skip bad samples; resumable) -> ``batching``
(``Batch``, batchers) -> here (loaders, checkpoints) -> the model.
"""

from __future__ import annotations

import glob
import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass

import lightning as L
import torch
from braceexpand import braceexpand
from torch.utils.data import DataLoader

from storm_lightning.data.batching import Batch, Collate, ResumableBatches, TokenBudgetBatches
from storm_lightning.data.samples import SampleProcessor
from storm_lightning.data.stream import ShardStream, world
from storm_lightning.data.video import ReadLimits
from storm_lightning.errors import ConfigError, MissingPathError
from storm_lightning.tokenizer import check_chat_format, check_system_prompt, load_tokenizer

log = logging.getLogger(__name__)


@dataclass
class ShardSource:
    """One source of shards. ``shards``: a brace pattern (``train/video32-{000000..000003}.tar``) or a
    glob of local files. Videos: ``frames_per_clip`` frames sampled uniformly over each clip, or, with
    ``fps``, one frame every ``1/fps`` seconds, at most ``max_frames`` (default ``frames_per_clip``;
    more are sampled uniformly down to it). ``start_step``: the training batch (per rank; the optimizer
    step without gradient accumulation) from which this source joins the mix; before it, the other
    sources share the batches by their weights. A curriculum in one run: e.g. images alone first, so
    that *where* things are is learnt before clips ask which way they move (docs/results.md)."""

    name: str
    shards: str
    weight: float = 1.0
    frames_per_clip: int = 32
    start_step: int = 0
    fps: float | None = None
    max_frames: int | None = None

    def shard_paths(self, key: str) -> list[str]:
        """Every shard of the pattern, as absolute paths (a relative glob can pick up a file named
        "pipe:...", which some readers run). A name the braces spell out exactly must exist: a run that
        quietly trained on 3 of 4 shards would be silent data loss."""
        found = {pattern: sorted(glob.glob(pattern)) for pattern in braceexpand(self.shards)}
        # each shard once, in order: overlapping patterns ("{image-*,image-hd-*}") would read one twice
        paths = list(dict.fromkeys(os.path.abspath(p) for matches in found.values() for p in matches))
        if not paths:
            raise MissingPathError(f"{key}: no shard matches '{self.shards}' (source '{self.name}')")
        missing = [pattern for pattern, matches in found.items() if not matches and not glob.has_magic(pattern)]
        if missing:
            raise MissingPathError(f"{key}: no shard '{missing[0]}'{f' (and {len(missing) - 1} more)' if missing[1:] else ''}"
                                   f" of '{self.shards}' (source '{self.name}')")
        return paths

    def check(self, key: str, limits: ReadLimits) -> None:
        frames = self.max_frames or self.frames_per_clip
        if not (math.isfinite(self.weight) and self.weight >= 0) or self.start_step < 0:
            raise ConfigError(f"{key} ('{self.name}'): weight must be a finite number >= 0 and start_step >= 0, "
                              f"got {self.weight}, {self.start_step}")
        if not 1 <= self.frames_per_clip <= limits.max_frames or not 1 <= frames <= limits.max_frames:
            raise ConfigError(f"{key} ('{self.name}'): frames_per_clip and max_frames must be in [1, "
                              f"data.max_frames={limits.max_frames}], got {self.frames_per_clip}, {self.max_frames}")
        if self.fps is not None and not (math.isfinite(self.fps) and self.fps > 0):
            raise ConfigError(f"{key} ('{self.name}'): fps must be a number > 0, got {self.fps}")


class StormDataModule(L.LightningDataModule):
    """Mixed text / image / video WebDataset shards for STORM.

    ``image_size`` must equal the vision backbone's (checked when fitting starts). ``train_sources``
    are mixed by ``weight``; ``val_sources`` are each read once per validation run, and by
    ``storm-fit validate|test|predict``. ``eval_frames_per_clip`` replaces every validation source's
    video sampling with that many uniform frames (evaluate on more frames than trained on, without
    editing the source list). Bad samples are skipped and counted; once a source has given
    ``skip_rate_after`` samples, a share of skipped ones above ``max_skip_rate`` stops the run with the
    source and shard named. ``token_budget``: training batches hold as many samples as fit in that
    many LLM tokens (text plus visual tokens after compression) instead of ``batch_size``;
    ``visual_tokens`` (frames -> visual tokens after compression) is linked from the model by
    ``storm-fit``.

    What one video read may cost (a sample over a limit is skipped and counted): decoded frames of at
    most ``max_frame_pixels`` pixels (width x height), at most ``max_frames`` frames kept, at most
    ``max_read_seconds`` seconds. What one training batch may hold: at most ``max_batch_frames`` frames
    (an image is one): a batch closes early, before a sample that would pass it; a source whose clips
    alone would pass it is refused at build time.

    Conversations are rendered with the tokenizer's own chat template when it has one, else ChatML;
    ``system_prompt`` opens every conversation that has no system turn.

    Resuming from a checkpoint continues every data reader where it stopped (``state_dict``). With
    another ``batch_size`` or ``token_budget`` that stays exact sample by sample (batches are cut
    differently from there, and ``start_step`` counts the new steps). With another ``num_workers`` or
    number of processes the readers cannot carry over: resuming is refused unless
    ``allow_data_restart``, which restarts every reader on a new order.
    """

    def __init__(
        self,
        train_sources: list[ShardSource],
        val_sources: list[ShardSource] | None = None,
        tokenizer_path: str = "data_shards/tokenizer",
        image_size: int = 64,
        batch_size: int = 8,
        val_batch_size: int | None = None,
        num_workers: int = 1,
        max_length: int = 4096,
        shuffle_buffer: int = 64,
        seed: int = 0,
        eval_frames_per_clip: int | None = None,
        max_skip_rate: float = 0.2,
        skip_rate_after: int = 100,
        token_budget: int | None = None,
        visual_tokens: Callable[[int], int] | None = None,
        max_frame_pixels: int = 8192 * 4320,
        max_frames: int = 1024,
        max_read_seconds: float | None = 120.0,
        max_batch_frames: int = 4096,
        allow_data_restart: bool = False,
        system_prompt: str | None = None,
    ) -> None:
        super().__init__()
        if not train_sources:
            raise ConfigError("data.train_sources: at least one source is required")
        for key, value, least in (("image_size", image_size, 1), ("batch_size", batch_size, 1),
                                  ("val_batch_size", val_batch_size or 1, 1), ("num_workers", num_workers, 0),
                                  ("max_length", max_length, 2), ("shuffle_buffer", shuffle_buffer, 0),
                                  ("skip_rate_after", skip_rate_after, 1), ("max_frame_pixels", max_frame_pixels, 1),
                                  ("max_frames", max_frames, 1), ("eval_frames_per_clip", eval_frames_per_clip or 1, 1),
                                  ("token_budget", token_budget or 1, 1), ("max_batch_frames", max_batch_frames, 1)):
            if value < least:  # a batch size of 0 would never yield a batch and keep every sample
                raise ConfigError(f"data.{key} must be >= {least}, got {value}")
        if not 0.0 <= max_skip_rate <= 1.0:
            raise ConfigError(f"data.max_skip_rate must be in [0, 1], got {max_skip_rate}")
        if max_read_seconds is not None and not max_read_seconds > 0:
            raise ConfigError(f"data.max_read_seconds must be > 0 (or null: no limit), got {max_read_seconds}")
        self.limits = ReadLimits(max_frame_pixels=max_frame_pixels, max_frames=max_frames,
                                 max_seconds=max_read_seconds)
        if eval_frames_per_clip is not None and eval_frames_per_clip > max_frames:
            raise ConfigError(f"data.eval_frames_per_clip={eval_frames_per_clip} is over data.max_frames={max_frames}")
        for key, sources in (("train_sources", train_sources), ("val_sources", val_sources or [])):
            for i, src in enumerate(sources):
                src.check(f"data.{key}[{i}]", self.limits)
        if not any(src.weight > 0 and src.start_step == 0 for src in train_sources):
            raise ConfigError("data.train_sources: at least one source needs weight > 0 and start_step: 0, "
                              "or the first batches have nothing to draw from")
        self.train_sources, self.val_sources = list(train_sources), list(val_sources or [])
        self.max_batch_frames, self.eval_frames_per_clip = max_batch_frames, eval_frames_per_clip
        self._check_batch_frames()
        self.tokenizer_path, self.image_size = tokenizer_path, image_size
        self.batch_size, self.val_batch_size = batch_size, val_batch_size or batch_size
        self.num_workers, self.max_length = num_workers, max_length
        self.shuffle_buffer, self.seed = shuffle_buffer, seed
        self.max_skip_rate, self.skip_rate_after = max_skip_rate, skip_rate_after
        self.token_budget, self.visual_tokens = token_budget, visual_tokens
        self.allow_data_restart = allow_data_restart
        self._reader_states: dict[int, dict] = {}  # role -> the stream state after its last consumed batch
        self._resume: dict | None = None  # loaded from a checkpoint
        self.stream_seed = seed  # the readers' seed: data.seed, unless a resume restarted the streams
        # fail now, before anything is read, on a missing tokenizer or shard path
        self.tokenizer = load_tokenizer(tokenizer_path, key="data.tokenizer_path")
        check_chat_format(self.tokenizer, "data.tokenizer_path")
        check_system_prompt(system_prompt)
        self.system_prompt = system_prompt
        for key, sources in (("train_sources", self.train_sources), ("val_sources", self.val_sources)):
            names = [s.name for s in sources]  # a resumed reader's position and the metrics are keyed by name
            twice = sorted({n for n in names if names.count(n) > 1})
            if twice:
                raise ConfigError(f"data.{key}: names {twice} more than one source: each needs a name of its own")
        self.train_shards = [s.shard_paths(f"data.train_sources[{i}].shards") for i, s in enumerate(self.train_sources)]
        self.val_shards = [s.shard_paths(f"data.val_sources[{i}].shards") for i, s in enumerate(self.val_sources)]

    def _check_batch_frames(self) -> None:
        """Every source's clips fit in a training batch alone (max_batch_frames)."""
        for key, frames in self.video_frames().items():
            if frames > self.max_batch_frames:
                raise ConfigError(f"{key}={frames} is over data.max_batch_frames={self.max_batch_frames}: one clip "
                                  "would not fit in a batch; lower one or raise data.max_batch_frames")

    def video_frames(self) -> dict[str, int]:
        """The most frames each source's clips have, by config key (for the model's compressor checks)."""
        keys = {f"data.train_sources[{i}].frames_per_clip": s.max_frames or s.frames_per_clip
                for i, s in enumerate(self.train_sources)}
        if self.eval_frames_per_clip is not None:
            keys["data.eval_frames_per_clip"] = self.eval_frames_per_clip
        else:
            keys.update({f"data.val_sources[{i}].frames_per_clip": s.max_frames or s.frames_per_clip
                         for i, s in enumerate(self.val_sources)})
        return keys

    def _processor(self, frames_per_clip: int | None = None) -> SampleProcessor:
        return SampleProcessor(self.tokenizer_path, self.image_size, self.max_length, frames_per_clip, self.limits,
                               self.system_prompt)

    def _workers(self) -> dict:
        return {"num_workers": self.num_workers, "persistent_workers": self.num_workers > 0,
                "prefetch_factor": 4 if self.num_workers > 0 else None}

    def train_dataloader(self) -> DataLoader:
        resume = self._rank_resume()
        stream = ShardStream(self.train_sources, self.train_shards, self._processor(), infinite=True,
                             shuffle_buffer=self.shuffle_buffer, seed=self.stream_seed,
                             max_skip_rate=self.max_skip_rate, skip_rate_after=self.skip_rate_after)
        pad = self.tokenizer.pad_token_id
        if self.token_budget is None:
            batches = ResumableBatches(stream, self.batch_size, pad, resume, max_frames=self.max_batch_frames)
        else:
            if self.visual_tokens is None:
                raise ConfigError("data.token_budget needs the model's visual-token counts (data.visual_tokens), "
                                  "which storm-fit links from the model")
            batches = TokenBudgetBatches(stream, self.token_budget, self.visual_tokens, pad, resume=resume,
                                         max_frames=self.max_batch_frames)
        return DataLoader(batches, batch_size=None, **self._workers())

    def val_dataloader(self) -> DataLoader | list:
        if not self.val_sources:
            return []
        stream = ShardStream(self.val_sources, self.val_shards, self._processor(self.eval_frames_per_clip),
                             infinite=False, seed=self.seed, max_skip_rate=self.max_skip_rate,
                             skip_rate_after=self.skip_rate_after)
        return DataLoader(stream, batch_size=self.val_batch_size, collate_fn=Collate(self.tokenizer.pad_token_id),
                          **self._workers())

    # `storm-fit test` and `storm-fit predict` read the validation sources once, like validation
    test_dataloader = val_dataloader
    predict_dataloader = val_dataloader

    # ---- the data position in checkpoints -----------------------------------------------------------

    def on_before_batch_transfer(self, batch: Batch, dataloader_idx: int) -> Batch:
        """Keeps where the batch's reader stands after it (a training batch, as it is consumed)."""
        if isinstance(batch, Batch) and batch.reader_state is not None:
            self._reader_states[batch.reader_state["role"]] = batch.reader_state
            batch.reader_state = None
        return batch

    def _layout(self) -> dict:
        return {"world": world()[1], "num_workers": self.num_workers, "batch_size": self.batch_size,
                "token_budget": self.token_budget}

    def state_dict(self) -> dict:
        """Batches taken and every reader's position, of every rank (gathered: called on all ranks)."""
        trainer = getattr(self, "trainer", None)
        taken = trainer.fit_loop.total_batch_idx + 1 if trainer is not None else 0
        states = [self._reader_states]
        rank, ranks = world()
        if ranks > 1:
            states = [None] * ranks
            torch.distributed.all_gather_object(states, self._reader_states)
        return {"train_batches_taken": int(taken), "seed": self.seed, "stream_seed": self.stream_seed,
                "layout": self._layout(), "readers": {r: s for r, s in enumerate(states)}}

    def load_state_dict(self, state: dict) -> None:
        self._resume = state

    def _rank_resume(self) -> dict | None:
        """This rank's part of the checkpoint's data position, after checking it still applies."""
        state = self._resume
        if state is None:
            return None
        if state.get("seed", self.seed) != self.seed:
            log.warning("data.seed changed from %s to %s: the resumed data order differs", state["seed"], self.seed)
        else:
            self.stream_seed = state.get("stream_seed", self.seed)
        saved, now = state.get("layout"), self._layout()
        readers = state.get("readers")
        if saved is not None and (saved["world"], saved["num_workers"]) != (now["world"], now["num_workers"]):
            what = (f"the data readers were {saved['world']} process(es) x data.num_workers={saved['num_workers']}, "
                    f"now {now['world']} x {now['num_workers']}")
            if not self.allow_data_restart:
                raise ConfigError(f"resuming: {what}, so the data position cannot carry over exactly. Resume with "
                                  "the same trainer.devices/num_nodes and data.num_workers, or set "
                                  "data.allow_data_restart=true to restart the data streams on a new order")
            log.warning("resuming: %s; data.allow_data_restart: the data streams restart on a new order", what)
            self.stream_seed += 1 + int(state["train_batches_taken"])
            return None
        if saved is not None and (saved["batch_size"], saved["token_budget"]) != (now["batch_size"], now["token_budget"]):
            log.warning("resuming with data.batch_size=%s, data.token_budget=%s (the checkpoint: %s, %s): every data "
                        "reader goes on with the sample after its last one, batches are cut differently from here",
                        now["batch_size"], now["token_budget"], saved["batch_size"], saved["token_budget"])
        rank = world()[0]
        states = (readers or {}).get(rank, {}) if readers is not None else {}
        return {"taken": int(state.get("train_batches_taken", 0)), "states": states}
