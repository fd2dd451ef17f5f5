"""Samples from shards, for one reader (a rank x data-worker pair): each source read in its turn, mixed
by weight forever (training) or each read once, round robin (evaluation).

Training: each source's shards are shuffled per epoch (the same order on every reader) and split
across readers; with fewer shards than readers, every reader reads every shard and keeps every
``readers``-th sample. Raw samples pass a shuffle buffer before they are decoded. Each sample's
source is drawn by weight; a source whose ``start_step`` is after the batch being filled weighs 0.

The position of a stream is a small state (``state()`` / ``restore()``): per source, the epoch, the
shard and byte offset to read next, the shuffle buffer as (shard, offset) references, the RNG
states; the mixing RNG. Resuming restores it in a few seeks: O(shards), not O(steps).
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
from collections import Counter

import torch
from torch.utils.data import IterableDataset, get_worker_info

from storm_lightning.data.samples import Sample, SampleProcessor
from storm_lightning.data.shards import RawSample, ShardError, read_samples_at, read_shard
from storm_lightning.errors import DataError

log = logging.getLogger(__name__)


def worker_role(batches_taken: int = 0) -> tuple[int, int]:
    """(role, workers) of this data worker. A DataLoader takes batches from its workers in turn,
    always starting with worker 0; after ``batches_taken`` batches the next one was due from worker
    ``batches_taken % workers``, so on resume worker ``i`` plays the part of worker
    ``(i + batches_taken) % workers``: same shards, same stream, same turn."""
    info = get_worker_info()
    worker, workers = (info.id, info.num_workers) if info else (0, 1)
    return (worker + batches_taken) % workers, workers


def world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def reader_position(batches_taken: int = 0) -> tuple[int, int]:
    """(index, count) of this reader among all ranks x data workers."""
    (rank, ranks), (role, workers) = world(), worker_role(batches_taken)
    return rank * workers + role, ranks * workers


class SourceReader:
    """The raw samples of one source for one reader, through its shuffle buffer; resumable."""

    def __init__(self, shards: list[str], seed: int, index: int, reader: int, readers: int, infinite: bool,
                 shuffle_buffer: int) -> None:
        self.shards, self.seed, self.index = shards, seed, index
        self.fingerprint = shards_fingerprint(shards)  # once: state() is taken before every sample a batcher draws
        self.reader, self.readers, self.infinite, self.shuffle_buffer = reader, readers, infinite, shuffle_buffer
        self.split = len(shards) >= readers  # else every reader reads every shard, keeps every readers-th sample
        self.rng = random.Random(f"{seed}-{index}-{reader}-shuffle")  # str seeds are hashed stably (sha512)
        self.epoch, self.shard_pos, self.offset, self.ordinal = 0, 0, 0, 0
        self.draining = False  # the epoch's shards are read: the buffer empties, in shuffled order
        self.buffer: list[tuple[int, RawSample]] = []  # (shard_pos, sample)
        self.good = 0  # usable samples this epoch, counted by the stream
        self._mine = self._epoch_shards()
        self._samples = None  # the open shard's iterator, from (shard_pos, offset)

    def _epoch_shards(self) -> list[str]:
        shards = list(self.shards)
        if self.infinite:
            random.Random(f"{self.seed}-{self.index}-{self.epoch}").shuffle(shards)  # same order on every reader
        return shards[self.reader::self.readers] if self.split else shards

    def next_raw(self) -> RawSample | None:
        """The next raw sample, or None when a finite pass is over. Raises ShardError for unreadable tar
        data, positioned to go on with the next shard."""
        while True:
            if not self.draining:
                raw = self._read()
                if raw is None:
                    self.rng.shuffle(self.buffer)
                    self.draining = True
                    continue
                if self.shuffle_buffer <= 1:
                    return raw
                self.buffer.append((self.shard_pos, raw))
                if len(self.buffer) >= self.shuffle_buffer:
                    return self.buffer.pop(self.rng.randrange(len(self.buffer)))[1]
                continue
            if self.buffer:
                return self.buffer.pop(0)[1]
            if not self.infinite:
                return None
            if not self.good:
                raise DataError(f"no usable sample in a whole pass over {self.shards}")
            self.epoch, self.shard_pos, self.offset, self.ordinal, self.good = self.epoch + 1, 0, 0, 0, 0
            self.draining, self._mine = False, self._epoch_shards()

    def _read(self) -> RawSample | None:
        while self.shard_pos < len(self._mine):
            if self._samples is None:
                self._samples = read_shard(self._mine[self.shard_pos], self.offset)
            try:
                raw = next(self._samples, None)
            except ShardError:
                self._next_shard()
                raise
            if raw is None:
                self._next_shard()
                continue
            self.offset, self.ordinal = raw.end, self.ordinal + 1
            if self.split or (self.ordinal - 1) % self.readers == self.reader:
                return raw
        return None

    def _next_shard(self) -> None:
        self.shard_pos, self.offset, self._samples = self.shard_pos + 1, 0, None

    def state(self) -> dict:
        return {"epoch": self.epoch, "shard_pos": self.shard_pos, "offset": self.offset, "ordinal": self.ordinal,
                "draining": self.draining, "good": self.good, "rng": self.rng.getstate(),
                "buffer": [(pos, raw.offset) for pos, raw in self.buffer], "shards": self.fingerprint,
                "index": self.index}

    def restore_fresh(self) -> None:
        self.__init__(self.shards, self.seed, self.index, self.reader, self.readers, self.infinite, self.shuffle_buffer)

    def restore(self, state: dict) -> None:
        # the shard order and shuffle were seeded with the source's place in the list it had then: keep
        # that seed, or a source moved in the list would resume in another shard (duplicates and losses)
        self.index = state.get("index", self.index)
        self.epoch, self.shard_pos, self.offset = state["epoch"], state["shard_pos"], state["offset"]
        self.ordinal, self.draining, self.good = state["ordinal"], state["draining"], state["good"]
        self.rng.setstate(_tuples(state["rng"]))
        self._mine, self._samples = self._epoch_shards(), None
        wanted: dict[int, list[int]] = {}
        for pos, offset in state["buffer"]:
            wanted.setdefault(pos, []).append(offset)
        found = {pos: read_samples_at(self._mine[pos], offsets) for pos, offsets in wanted.items()}
        self.buffer = [(pos, found[pos][offset]) for pos, offset in state["buffer"]]


def shards_fingerprint(shards: list[str]) -> str:
    """What the byte offsets of a saved position refer to: each shard's name and size, in order (a
    shard replaced by another of the same name would have offsets land in the middle of other samples)."""
    listing = "\n".join(f"{os.path.basename(p)} {os.path.getsize(p)}" for p in shards)
    return hashlib.sha1(listing.encode()).hexdigest()


def _tuples(value):
    """RNG states come back from a checkpoint with their tuples intact or as lists: make them tuples."""
    return tuple(_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


class ShardStream(IterableDataset):
    """Samples of several sources (``ShardSource``): mixed by weight forever (``infinite``), or each
    source once, interleaved round robin. Bad samples are skipped and counted; a source whose share of
    bad samples passes ``max_skip_rate`` (after ``skip_rate_after`` samples) stops the run."""

    def __init__(self, sources: list, shard_lists: list[list[str]], processor: SampleProcessor, infinite: bool,
                 shuffle_buffer: int = 0, seed: int = 0, max_skip_rate: float = 1.0, skip_rate_after: int = 100) -> None:
        self.sources, self.shard_lists, self.processor = sources, shard_lists, processor
        self.infinite, self.shuffle_buffer, self.seed = infinite, shuffle_buffer, seed
        self.max_skip_rate, self.skip_rate_after = max_skip_rate, skip_rate_after
        self.step = 0  # the training batch being filled, set by the batcher: sources with start_step > step wait
        self.skipped: Counter = Counter()  # bad samples not yet reported in a batch
        self.seen: Counter = Counter()  # per source, this reader, since the start
        self.bad: Counter = Counter()
        self.readers: list[SourceReader] = []
        self.mix = random.Random()

    def open(self, batches_taken: int = 0) -> None:
        """Create the source readers for this process's place among all readers."""
        reader, readers = reader_position(batches_taken)
        shuffle = self.shuffle_buffer if self.infinite else 0
        self.readers = [SourceReader(shards, self.seed, i, reader, readers, self.infinite, shuffle)
                        for i, shards in enumerate(self.shard_lists)]
        self.mix = random.Random(f"{self.seed}-{reader}-mix")

    def __iter__(self):
        if not self.infinite:  # each pass from the start; round robin, so a limited evaluation sees every source
            self.open()
            live = list(range(len(self.sources)))
            while live:
                for i in list(live):
                    sample = self._next(i)
                    if sample is None:
                        live.remove(i)
                    else:
                        yield sample
            return
        if not self.readers:  # (a batcher opens and restores a training stream before iterating it)
            self.open()
        while True:
            # a waiting source gets weight 0 rather than leaving the list, so a mix without start_steps
            # draws exactly as it always did
            weights = [s.weight if s.start_step <= self.step else 0.0 for s in self.sources]
            yield self._next(self.mix.choices(range(len(self.sources)), weights)[0])

    def _next(self, i: int) -> Sample | None:
        """The next usable sample of source ``i`` (None at the end of a finite pass)."""
        source, reader = self.sources[i], self.readers[i]
        while True:
            try:
                raw = reader.next_raw()
            except ShardError as exn:  # the rest of that shard is lost: one bad sample
                self._count_bad(source, str(exn), "?", "?")
                continue
            if raw is None:
                return None
            try:
                sample = self.processor(raw, source)
            except Exception as exn:  # a bad sample costs one sample, never the run (unless too many do)
                self._count_bad(source, f"{type(exn).__name__}: {exn}", f"'{raw.key}'", raw.shard)
                continue
            reader.good += 1
            self.seen[source.name] += 1
            sample.skipped, self.skipped = dict(self.skipped), Counter()
            return sample

    def _count_bad(self, source, what: str, key: str, shard: str) -> None:
        """Count and log one bad sample; stop the run when the source's skip rate is too high."""
        self.skipped[source.name] += 1
        self.seen[source.name] += 1
        self.bad[source.name] += 1
        log.warning("source '%s': skipped %s (shard %s): %s", source.name, key, shard, what)
        seen, bad = self.seen[source.name], self.bad[source.name]
        if seen >= self.skip_rate_after and bad / seen > self.max_skip_rate:
            raise DataError(
                f"source '{source.name}': {bad} of {seen} samples skipped ({bad / seen:.0%}), over "
                f"data.max_skip_rate={self.max_skip_rate}. Last bad: sample {key} in shard {shard}: {what}. "
                "Repair or drop that source, or raise data.max_skip_rate"
            )

    def state(self) -> dict:
        """The position after the last sample handed out (see the module docstring)."""
        return {"sources": {s.name: r.state() for s, r in zip(self.sources, self.readers)},
                "mix": self.mix.getstate(), "skipped": dict(self.skipped), "seen": dict(self.seen),
                "bad": dict(self.bad)}

    def restore(self, state: dict) -> None:
        for source, reader in zip(self.sources, self.readers):
            saved = state["sources"].get(source.name)
            if saved is None or saved["shards"] != reader.fingerprint:
                log.warning("data source '%s' is new or its shards are not those of the checkpoint (names, sizes): "
                            "it starts from its beginning", source.name)
                continue
            try:
                reader.restore(saved)
            except (ShardError, OSError, KeyError, StopIteration) as exn:
                log.warning("data source '%s': its saved position cannot be read back (%s): it starts from its "
                            "beginning", source.name, exn)
                reader.restore_fresh()
        self.mix.setstate(_tuples(state["mix"]))
        self.skipped, self.seen, self.bad = Counter(state["skipped"]), Counter(state["seen"]), Counter(state["bad"])

