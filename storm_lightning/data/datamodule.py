"""WebDataset shards -> padded multimodal batches.

Shard format (``docs/data.md``): each sample is ``<key>.json`` (LLaVA conversations) plus at most one
media entry ``<key>.{jpg,png,webp}`` or ``<key>.{mp4,webm,mkv}``. Entries are read as raw bytes and
decoded here: webdataset's default decoders are never used (they unpickle ``.pkl``/``.pyd``).

Training mixes several sources by weight, forever (Lightning's ``max_steps`` ends the run). Validation
reads each source once, interleaving them round robin. Shards are split across ranks and data workers;
when there are fewer shards than readers, every reader reads all shards and keeps every
``readers``-th sample instead.

A batch (``collate``)::

    input_ids, labels, attention_mask : (B, L)         labels = -100 except assistant tokens
    pixel_values                      : (F, 3, S, S)   uint8, all frames of the batch's media, or None
    frames_per_sample                 : (B,)           T of each sample's media, 0 for text-only
    frame_indices                     : list of B lists, the source-video frame of each frame
    clip_frames                       : list of B ints, frames in each source clip (1 image, 0 text)
    skipped                           : {source: samples skipped since the previous batch}
"""

from __future__ import annotations

import glob
import itertools
import json
import logging
import math
import os
import random
from collections import Counter
from dataclasses import dataclass, field

import lightning as L
import torch
import webdataset as wds
from braceexpand import braceexpand
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from storm_lightning.errors import ConfigError, MissingPathError
from storm_lightning.data.media import IMAGE_EXTS, VIDEO_EXTS, decode_image, decode_video
from storm_lightning.tokenizer import (
    IGNORE_INDEX,
    IMAGE_TOKEN,
    VIDEO_TOKEN,
    encode_conversation,
    load_tokenizer,
    media_token_ids,
)

log = logging.getLogger(__name__)


@dataclass
class ShardSource:
    """One source of shards. ``shards``: a brace pattern (``train/video32-{000000..000003}.tar``) or a
    glob. ``frames_per_clip``: frames sampled uniformly over each video of this source.
    ``start_step``: the training batch (per rank; the optimizer step without gradient accumulation) from
    which this source joins the mix; before it, the other sources share the batches by their weights.
    A curriculum in one run: e.g. images alone first, so that *where* things are is learnt before
    clips ask which way they move (docs/results.md)."""

    name: str
    shards: str
    weight: float = 1.0
    frames_per_clip: int = 32
    start_step: int = 0

    def shard_paths(self, key: str) -> list[str]:
        # absolute paths: webdataset runs a name that starts with "pipe:" as a shell command, and a
        # relative glob can pick up a file so named
        paths = [os.path.abspath(p) for pattern in braceexpand(self.shards) for p in sorted(glob.glob(pattern))]
        if not paths:
            raise MissingPathError(f"{key}: no shard matches '{self.shards}' (source '{self.name}')")
        return paths


@dataclass
class SampleProcessor:
    """Raw tar entries of one sample -> model-ready tensors. Raises on any bad sample."""

    tokenizer_path: str
    image_size: int
    max_length: int
    frames_per_clip: int | None = None  # overrides every source's frames_per_clip (evaluation)
    _tokenizer: object = field(default=None, init=False, repr=False)

    @property
    def tokenizer(self):
        if self._tokenizer is None:  # loaded lazily, once per worker process
            self._tokenizer = load_tokenizer(self.tokenizer_path)
        return self._tokenizer

    def __call__(self, raw: dict, source: ShardSource) -> dict:
        if "json" not in raw:
            raise ValueError("no .json entry")
        meta = json.loads(raw["json"].decode("utf-8"))
        conversations = meta["conversations"]
        image_ext = next((e for e in IMAGE_EXTS if e in raw), None)
        video_ext = next((e for e in VIDEO_EXTS if e in raw), None)
        pixel_values, frame_indices, clip_frames = None, [], 0
        if video_ext is not None:
            frames = self.frames_per_clip or source.frames_per_clip
            pixel_values, frame_indices, clip_frames = decode_video(raw[video_ext], frames, self.image_size)
            placeholder = VIDEO_TOKEN
        elif image_ext is not None:
            pixel_values, frame_indices, clip_frames = decode_image(raw[image_ext], self.image_size), [0], 1
            placeholder = IMAGE_TOKEN

        human_text = "".join(t.get("value", "") for t in conversations if t.get("from") in ("human", "user"))
        n_placeholders = human_text.count(IMAGE_TOKEN) + human_text.count(VIDEO_TOKEN)
        if pixel_values is None and n_placeholders:
            raise ValueError("media placeholder but no media entry")
        if pixel_values is not None:
            if n_placeholders > 1:
                raise ValueError(f"{n_placeholders} media placeholders for one media entry")
            conversations = [dict(t) for t in conversations]
            first_human = next(t for t in conversations if t.get("from") in ("human", "user"))
            if n_placeholders == 0:  # LLaVA convention: media goes first
                first_human["value"] = f"{placeholder}\n{first_human['value']}"
            else:  # either placeholder word works for either medium
                first_human["value"] = first_human["value"].replace(IMAGE_TOKEN, placeholder).replace(
                    VIDEO_TOKEN, placeholder
                )

        ids, labels = encode_conversation(self.tokenizer, conversations, self.max_length)
        if pixel_values is not None and not set(media_token_ids(self.tokenizer)) & set(ids):
            raise ValueError(f"media placeholder truncated away by max_length={self.max_length}")
        if all(label == IGNORE_INDEX for label in labels):
            raise ValueError(f"no assistant token left within max_length={self.max_length}")
        sample = {
            "input_ids": torch.tensor(ids),
            "labels": torch.tensor(labels),
            "pixel_values": pixel_values,
            "frame_indices": frame_indices,
            "clip_frames": clip_frames,
            "key": raw.get("__key__", ""),
            "source": source.name,
        }
        for extra in ("options", "answer", "category"):
            if extra in meta:
                sample[extra] = meta[extra]
        return sample


def _worker_role(batches_taken: int = 0) -> tuple[int, int]:
    """(role, workers) of this data worker. A DataLoader takes batches from its workers in turn,
    always starting with worker 0; after ``batches_taken`` batches the next one was due from worker
    ``batches_taken % workers``, so on resume worker ``i`` plays the part of worker
    ``(i + batches_taken) % workers``: same shards, same stream, same turn."""
    info = get_worker_info()
    worker, workers = (info.id, info.num_workers) if info else (0, 1)
    return (worker + batches_taken) % workers, workers


def _reader_position(batches_taken: int = 0) -> tuple[int, int]:
    """(index, count) of this reader among all ranks x data workers."""
    rank, world = 0, 1
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    worker, workers = _worker_role(batches_taken)
    return rank * workers + worker, world * workers


class ShardStream(IterableDataset):
    """Samples of several sources: mixed by weight forever (``infinite``), or each source once,
    interleaved round robin."""

    def __init__(
        self,
        sources: list[ShardSource],
        shard_lists: list[list[str]],
        processor: SampleProcessor,
        infinite: bool,
        shuffle_buffer: int = 0,
        seed: int = 0,
        max_skip_rate: float = 1.0,
        skip_rate_after: int = 100,
    ) -> None:
        self.sources, self.shard_lists, self.processor = sources, shard_lists, processor
        self.infinite, self.shuffle_buffer, self.seed = infinite, shuffle_buffer, seed
        self.max_skip_rate, self.skip_rate_after = max_skip_rate, skip_rate_after
        self.batches_taken = 0  # set when resuming: see _worker_role
        self.step = 0  # the training batch being filled, set by the batcher: sources with start_step > step wait
        self.skipped: Counter = Counter()  # per reader process, not yet reported in a batch
        self.seen: Counter = Counter()  # per source, this reader, since the start
        self.bad: Counter = Counter()

    def _count_bad(self, source: ShardSource, what: str, key, url) -> None:
        """Count and log one bad sample; stop the run when the source's skip rate is too high."""
        self.skipped[source.name] += 1
        self.seen[source.name] += 1
        self.bad[source.name] += 1
        log.warning("source '%s': skipped %s (shard %s): %s", source.name, key, url, what)
        seen, bad = self.seen[source.name], self.bad[source.name]
        if seen >= self.skip_rate_after and bad / seen > self.max_skip_rate:
            raise RuntimeError(
                f"source '{source.name}': {bad} of {seen} samples skipped ({bad / seen:.0%}), over "
                f"data.max_skip_rate={self.max_skip_rate}. Last bad: sample {key} in shard {url}: {what}. "
                "Repair or drop that source, or raise data.max_skip_rate"
            )

    def _raw_samples(self, src: int, reader: int, readers: int, epoch: int):
        shards = list(self.shard_lists[src])
        rng = random.Random(f"{self.seed}-{src}-{epoch}")  # str seeds are hashed stably (sha512)
        if self.infinite:
            rng.shuffle(shards)  # same order on every reader, then split
        split_shards = len(shards) >= readers
        mine = shards[reader::readers] if split_shards else shards

        def count_and_continue(exn: Exception) -> bool:  # unreadable tar data: count it as one bad sample
            self._count_bad(self.sources[src], f"unreadable shard data: {exn}", "?", getattr(exn, "url", mine))
            return True

        samples = wds.tarfile_to_samples(handler=count_and_continue)({"url": url} for url in mine)
        if not split_shards:
            samples = itertools.islice(samples, reader, None, readers)
        return samples

    def _source_samples(self, src: int, reader: int, readers: int):
        source = self.sources[src]
        rng = random.Random(f"{self.seed}-{src}-{reader}-shuffle")
        for epoch in itertools.count() if self.infinite else range(1):
            buffer: list[dict] = []
            produced = 0
            for raw in self._raw_samples(src, reader, readers, epoch):
                if self.shuffle_buffer > 1:  # shuffle raw bytes, before the expensive decode
                    buffer.append(raw)
                    if len(buffer) < self.shuffle_buffer:
                        continue
                    raw = buffer.pop(rng.randrange(len(buffer)))
                for sample in self._process(raw, source):
                    produced += 1
                    yield sample
            rng.shuffle(buffer)
            for raw in buffer:
                for sample in self._process(raw, source):
                    produced += 1
                    yield sample
            if self.infinite and not produced:
                raise RuntimeError(
                    f"source '{source.name}' gave no usable sample in a whole pass over {self.shard_lists[src]}"
                )

    def _process(self, raw: dict, source: ShardSource):
        """Yields the processed sample, or nothing (counted and logged) if it is bad."""
        try:
            sample = self.processor(raw, source)
        except Exception as exn:  # a bad sample costs one sample, never the run (unless too many do)
            self._count_bad(source, f"{type(exn).__name__}: {exn}", f"'{raw.get('__key__')}'", raw.get("__url__"))
            return
        self.seen[source.name] += 1
        sample["skipped"], self.skipped = dict(self.skipped), Counter()
        yield sample

    def __iter__(self):
        yield from self._samples()

    def _samples(self):
        reader, readers = _reader_position(self.batches_taken)
        streams = [self._source_samples(i, reader, readers) for i in range(len(self.sources))]
        if not self.infinite:  # round robin, so a limited validation still sees every source
            for group in itertools.zip_longest(*streams):
                yield from (sample for sample in group if sample is not None)
            return
        rng = random.Random(f"{self.seed}-{reader}-mix")
        while True:
            # a waiting source gets weight 0 rather than leaving the list, so a mix without start_steps
            # draws exactly as it always did
            weights = [s.weight if s.start_step <= self.step else 0.0 for s in self.sources]
            yield next(streams[rng.choices(range(len(streams)), weights)[0]])


def worker_share(batches: int) -> int:
    """Of the first ``batches`` batches of the run, how many came from the worker whose role this
    worker plays (see ``_worker_role``)."""
    role, workers = _worker_role(batches)
    return max(0, -(-(batches - role) // workers))


class _Batches(IterableDataset):
    """Batches of samples from a stream (``_batches``, one per subclass), starting after the first
    ``skip`` batches of the run.

    Resuming replays the skipped batches and throws them away (decoding included), so the batches
    that follow, and the samples skipped as bad, are exactly those of an uninterrupted run. The stream
    is told each batch's training step (for the sources' ``start_step``): a DataLoader takes batches
    from its workers in turn, so the worker playing role ``r`` of ``W`` makes steps r, r + W, ...
    """

    def __init__(self, samples: ShardStream, pad_id: int, skip: int) -> None:
        self.samples, self.pad_id, self.skip = samples, pad_id, skip
        samples.batches_taken = skip

    def _batches(self):
        raise NotImplementedError

    def __iter__(self):
        role, workers = _worker_role(self.skip)
        replay = worker_share(self.skip)
        self.samples.step = role
        for taken, batch in enumerate(self._batches()):
            # the next batch's first sample is drawn after this (with a token budget, the one sample
            # that did not fit was drawn before: a start_step holds give or take that sample)
            self.samples.step += workers
            if taken >= replay:
                yield collate(batch, self.pad_id)


class ResumableBatches(_Batches):
    """Batches of ``batch_size`` samples."""

    def __init__(self, samples: ShardStream, batch_size: int, pad_id: int, skip: int = 0) -> None:
        super().__init__(samples, pad_id, skip)
        self.batch_size = batch_size

    def _batches(self):
        batch = []
        for sample in self.samples:
            batch.append(sample)
            if len(batch) == self.batch_size:
                yield batch
                batch = []
        if batch:
            yield batch


class TokenBudgetBatches(_Batches):
    """Batches of whole samples packed up to ``budget`` LLM tokens (text + visual after compression).

    ``visual_tokens`` maps a sample's frame count (1 for an image) to its visual tokens after the
    model's compressors; the model fills it in at setup. A sample alone over the budget is a batch of
    one (and a warning). At most ``max_samples`` per batch.
    """

    def __init__(self, samples: ShardStream, budget: int, visual_tokens: dict[int, int], pad_id: int,
                 max_samples: int = 256, skip: int = 0) -> None:
        super().__init__(samples, pad_id, skip)
        self.budget, self.visual_tokens, self.max_samples = budget, visual_tokens, max_samples

    def cost(self, sample: dict) -> int:
        frames = 0 if sample["pixel_values"] is None else len(sample["pixel_values"])
        if frames and frames not in self.visual_tokens:
            raise KeyError(f"no visual-token count for {frames}-frame clips: is the model set up?")
        return len(sample["input_ids"]) - (1 if frames else 0) + self.visual_tokens.get(frames, 0)

    def _batches(self):
        batch, used = [], 0
        for sample in self.samples:
            cost = self.cost(sample)
            if batch and (used + cost > self.budget or len(batch) == self.max_samples):
                yield batch
                batch, used = [], 0
            if cost > self.budget:
                log.warning("sample '%s' alone needs %d tokens, over data.token_budget=%d", sample["key"], cost,
                            self.budget)
            batch.append(sample)
            used += cost
        if batch:
            yield batch


def collate(samples: list[dict], pad_id: int) -> dict:
    length = max(len(s["input_ids"]) for s in samples)
    input_ids = torch.full((len(samples), length), pad_id, dtype=torch.long)
    labels = torch.full((len(samples), length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(samples), length), dtype=torch.long)
    for i, s in enumerate(samples):
        n = len(s["input_ids"])
        input_ids[i, :n], labels[i, :n], attention_mask[i, :n] = s["input_ids"], s["labels"], 1
    media = [s["pixel_values"] for s in samples if s["pixel_values"] is not None]
    skipped: Counter = Counter()
    for s in samples:
        skipped.update(s["skipped"])
    batch = {
        "input_ids": input_ids,
        "labels": labels,
        "attention_mask": attention_mask,
        "pixel_values": torch.cat(media) if media else None,
        "frames_per_sample": torch.tensor([0 if s["pixel_values"] is None else len(s["pixel_values"])
                                           for s in samples]),
        "frame_indices": [s["frame_indices"] for s in samples],
        "clip_frames": [s["clip_frames"] for s in samples],
        "keys": [s["key"] for s in samples],
        "sources": [s["source"] for s in samples],
        "skipped": dict(skipped),
    }
    for extra in ("options", "answer", "category"):
        batch[extra] = [s.get(extra) for s in samples]
    return batch


class _Collate:  # a picklable callable, for worker processes
    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, samples: list[dict]) -> dict:
        return collate(samples, self.pad_id)


class StormDataModule(L.LightningDataModule):
    """Mixed text / image / video WebDataset shards for STORM.

    ``image_size`` must equal the vision backbone's (checked when fitting starts). ``train_sources``
    are mixed by ``weight``; ``val_sources`` are each read once per validation run, and by
    ``storm-fit validate|test|predict``. ``eval_frames_per_clip`` replaces every validation source's
    ``frames_per_clip`` (evaluate on more frames than trained on, without editing the source list).
    Bad samples are skipped and counted; once a source has given ``skip_rate_after`` samples, a share
    of skipped ones above ``max_skip_rate`` stops the run with the source and shard named.
    ``token_budget``: training batches hold as many samples as fit in that many LLM tokens (text plus
    visual tokens after compression) instead of ``batch_size``, so 8-frame and 128-frame clips share a
    run without padding waste or running out of memory.
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
    ) -> None:
        super().__init__()
        if not train_sources:
            raise ConfigError("data.train_sources: at least one source is required")
        for key, sources in (("train_sources", train_sources), ("val_sources", val_sources or [])):
            for i, src in enumerate(sources):
                if not (math.isfinite(src.weight) and src.weight >= 0) or src.frames_per_clip < 1 or src.start_step < 0:
                    raise ConfigError(f"data.{key}[{i}] ('{src.name}'): weight must be a finite number >= 0, "
                                      f"frames_per_clip >= 1 and start_step >= 0, got {src.weight}, "
                                      f"{src.frames_per_clip}, {src.start_step}")
        for key, value, least in (("image_size", image_size, 1), ("batch_size", batch_size, 1),
                                  ("val_batch_size", val_batch_size or 1, 1), ("num_workers", num_workers, 0),
                                  ("max_length", max_length, 2), ("shuffle_buffer", shuffle_buffer, 0),
                                  ("skip_rate_after", skip_rate_after, 1)):
            if value < least:  # a batch size of 0 would never yield a batch and keep every sample
                raise ConfigError(f"data.{key} must be >= {least}, got {value}")
        if not any(src.weight > 0 and src.start_step == 0 for src in train_sources):
            raise ConfigError("data.train_sources: at least one source needs weight > 0 and start_step: 0, "
                              "or the first batches have nothing to draw from")
        self.train_sources, self.val_sources = list(train_sources), list(val_sources or [])
        self.tokenizer_path, self.image_size = tokenizer_path, image_size
        self.batch_size, self.val_batch_size = batch_size, val_batch_size or batch_size
        self.num_workers, self.max_length = num_workers, max_length
        self.shuffle_buffer, self.seed = shuffle_buffer, seed
        if eval_frames_per_clip is not None and eval_frames_per_clip < 1:
            raise ConfigError(f"data.eval_frames_per_clip must be >= 1, got {eval_frames_per_clip}")
        self.eval_frames_per_clip = eval_frames_per_clip
        if not 0.0 <= max_skip_rate <= 1.0:
            raise ConfigError(f"data.max_skip_rate must be in [0, 1], got {max_skip_rate}")
        self.max_skip_rate, self.skip_rate_after = max_skip_rate, skip_rate_after
        if token_budget is not None and token_budget < 1:
            raise ConfigError(f"data.token_budget must be a positive number of tokens, got {token_budget}")
        self.token_budget = token_budget
        self.visual_tokens: dict[int, int] = {}  # frames -> visual tokens after compression (set by the model)
        self._resume_batches = 0  # training batches to replay and drop (set from a checkpoint)
        # fail now, before anything is read, on a missing tokenizer or shard path
        self.tokenizer = load_tokenizer(tokenizer_path, key="data.tokenizer_path")
        self.train_shards = [s.shard_paths(f"data.train_sources[{i}].shards") for i, s in enumerate(self.train_sources)]
        self.val_shards = [s.shard_paths(f"data.val_sources[{i}].shards") for i, s in enumerate(self.val_sources)]

    def video_frames(self) -> dict[str, int]:
        """frames_per_clip of every source, by config key (for the model's compressor checks)."""
        keys = {f"data.train_sources[{i}].frames_per_clip": s.frames_per_clip for i, s in enumerate(self.train_sources)}
        if self.eval_frames_per_clip is not None:
            keys["data.eval_frames_per_clip"] = self.eval_frames_per_clip
        else:
            keys.update({f"data.val_sources[{i}].frames_per_clip": s.frames_per_clip
                         for i, s in enumerate(self.val_sources)})
        return keys

    def _processor(self, frames_per_clip: int | None = None) -> SampleProcessor:
        return SampleProcessor(self.tokenizer_path, self.image_size, self.max_length, frames_per_clip)

    def _loader(self, dataset: IterableDataset, batch_size: int) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=batch_size,
            num_workers=self.num_workers,
            collate_fn=_Collate(self.tokenizer.pad_token_id),
            persistent_workers=self.num_workers > 0,
            prefetch_factor=4 if self.num_workers > 0 else None,
        )

    def frame_counts(self) -> set[int]:
        """Every clip length the training sources produce (1: images)."""
        return {1} | {s.frames_per_clip for s in self.train_sources}

    def train_dataloader(self) -> DataLoader:
        stream = ShardStream(self.train_sources, self.train_shards, self._processor(), infinite=True,
                             shuffle_buffer=self.shuffle_buffer, seed=self.seed,
                             max_skip_rate=self.max_skip_rate, skip_rate_after=self.skip_rate_after)
        pad, skip = self.tokenizer.pad_token_id, self._resume_batches
        if self.token_budget is None:
            batches = ResumableBatches(stream, self.batch_size, pad, skip=skip)
        else:
            batches = TokenBudgetBatches(stream, self.token_budget, dict(self.visual_tokens), pad, skip=skip)
        return DataLoader(batches, batch_size=None, num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0, prefetch_factor=4 if self.num_workers > 0 else None)

    # The data position in checkpoints: how many training batches this rank has taken. On resume the
    # streams replay and drop that many, so training continues on the batch it would have seen next.
    def state_dict(self) -> dict:
        trainer = getattr(self, "trainer", None)
        taken = trainer.fit_loop.total_batch_idx + 1 if trainer is not None else self._resume_batches
        return {"train_batches_taken": int(taken), "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        if state.get("seed", self.seed) != self.seed:
            log.warning("data.seed changed from %s to %s: the resumed data order differs", state["seed"], self.seed)
        self._resume_batches = int(state.get("train_batches_taken", 0))

    def val_dataloader(self) -> DataLoader | list:
        if not self.val_sources:
            return []
        stream = ShardStream(self.val_sources, self.val_shards, self._processor(self.eval_frames_per_clip),
                             infinite=False, seed=self.seed, max_skip_rate=self.max_skip_rate,
                             skip_rate_after=self.skip_rate_after)
        return self._loader(stream, self.val_batch_size)

    # `storm-fit test` and `storm-fit predict` read the validation sources once, like validation
    test_dataloader = val_dataloader
    predict_dataloader = val_dataloader
