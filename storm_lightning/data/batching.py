"""Samples -> batches: the one ``Batch`` definition, ``collate``, and the two training batchers.

``Batch`` is what the model receives from training, evaluation, ``storm-chat`` and the benchmarks
alike; every producer builds it through its constructor (``collate``, ``Batch.prompt``), and its shapes
are checked there.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor
from torch.utils.data import IterableDataset

from storm_lightning.data.samples import Sample
from storm_lightning.data.stream import ShardStream, worker_role
from storm_lightning.tokenizer import IGNORE_INDEX

log = logging.getLogger(__name__)


@dataclass
class Batch:
    """A padded batch of B samples (right padding to the longest, L tokens).

    input_ids, labels, attention_mask : (B, L)   labels -100 except assistant tokens; mask 1 on real tokens
    pixel_values                      : (F, 3, S, S) uint8, the frames of every sample's medium in sample
                                        order (F = frames_per_sample.sum()), or None
    frames_per_sample                 : (B,) frames of each sample's medium: T for a video, 1 for an image, 0
    frame_indices, timestamps         : per sample, each frame's index in its source video and its time (s)
    clip_frames                       : per sample, frames in the source clip (1 for an image, 0 for text)
    keys, sources                     : per sample, its key in its shard and its source's name
    options, answer, category         : per sample, the multiple-choice fields (None when it has none)
    duration                          : per sample, its duration group ("long", "600"; None when it has none)
    skipped                           : {source: bad samples skipped since the previous batch}
    reader_state                      : where the data stream that made this batch stands after it (the
                                        data module keeps it for checkpoints; None for the model)
    """

    input_ids: Tensor
    labels: Tensor
    attention_mask: Tensor
    frames_per_sample: Tensor
    pixel_values: Tensor | None = None
    frame_indices: list[list[int]] = field(default_factory=list)
    timestamps: list[list[float]] = field(default_factory=list)
    clip_frames: list[int] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)
    options: list[list[str] | None] = field(default_factory=list)
    answer: list[int | None] = field(default_factory=list)
    category: list[str | None] = field(default_factory=list)
    duration: list[str | None] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=dict)
    reader_state: dict | None = None

    def __post_init__(self) -> None:
        b, length = self.input_ids.shape
        assert self.labels.shape == self.attention_mask.shape == (b, length), "labels/attention_mask != input_ids shape"
        assert self.frames_per_sample.shape == (b,), f"frames_per_sample {tuple(self.frames_per_sample.shape)} != ({b},)"
        frames = int(self.frames_per_sample.sum())
        if self.pixel_values is None:
            assert frames == 0, f"{frames} frames announced, no pixel_values"
        else:
            assert self.pixel_values.ndim == 4 and len(self.pixel_values) == frames, (
                f"pixel_values {tuple(self.pixel_values.shape)} for {frames} frames")

    def __len__(self) -> int:
        return len(self.input_ids)

    def to(self, device, non_blocking: bool = False) -> Batch:
        """The tensors on ``device`` (Lightning moves a batch by calling this)."""
        moved = {f.name: getattr(self, f.name).to(device, non_blocking=non_blocking)
                 for f in dataclasses.fields(self) if isinstance(getattr(self, f.name), Tensor)}
        return dataclasses.replace(self, **moved)

    @classmethod
    def prompt(cls, input_ids: list[int], pixel_values: Tensor | None = None) -> Batch:
        """A one-sample batch to generate from: the prompt's token ids, its medium's frames or None."""
        ids = torch.tensor([input_ids])
        frames = 0 if pixel_values is None else len(pixel_values)
        return cls(input_ids=ids, labels=torch.full_like(ids, IGNORE_INDEX), attention_mask=torch.ones_like(ids),
                   frames_per_sample=torch.tensor([frames]), pixel_values=pixel_values)


def collate(samples: list[Sample], pad_id: int, reader_state: dict | None = None) -> Batch:
    length = max(len(s.input_ids) for s in samples)
    input_ids = torch.full((len(samples), length), pad_id, dtype=torch.long)
    labels = torch.full((len(samples), length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(samples), length), dtype=torch.long)
    for i, s in enumerate(samples):
        n = len(s.input_ids)
        input_ids[i, :n], labels[i, :n], attention_mask[i, :n] = s.input_ids, s.labels, 1
    media = [s.pixel_values for s in samples if s.pixel_values is not None]
    skipped: Counter = Counter()
    for s in samples:
        skipped.update(s.skipped)
    return Batch(
        input_ids=input_ids, labels=labels, attention_mask=attention_mask,
        frames_per_sample=torch.tensor([s.frames for s in samples]),
        pixel_values=torch.cat(media) if media else None,
        frame_indices=[s.frame_indices for s in samples], timestamps=[s.timestamps for s in samples],
        clip_frames=[s.clip_frames for s in samples], keys=[s.key for s in samples],
        sources=[s.source for s in samples], options=[s.options for s in samples],
        answer=[s.answer for s in samples], category=[s.category for s in samples],
        duration=[s.duration for s in samples],
        skipped=dict(skipped), reader_state=reader_state,
    )


class Collate:  # a picklable callable, for worker processes
    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, samples: list[Sample]) -> Batch:
        return collate(samples, self.pad_id)


class _Batches(IterableDataset):
    """Training batches of samples from a stream (``_fill``, one per subclass), each carrying the
    stream's position after it (``Batch.reader_state``).

    ``resume``: where the checkpoint left this rank's readers, ``{"taken": batches taken,
    "states": {role: reader_state}}``; each worker restores the state of the role it takes over
    (``worker_role``) and goes on from there. A checkpoint without reader states (older ones) is
    reached by replaying ``taken`` batches. The stream is told each batch's training step (for the
    sources' ``start_step``): the worker playing role ``r`` of ``W`` makes steps r, r + W, ...
    """

    def __init__(self, samples: ShardStream, pad_id: int, resume: dict | None = None) -> None:
        self.samples, self.pad_id, self.resume = samples, pad_id, resume or {"taken": 0, "states": {}}

    def _fill(self, samples: Iterator[Sample], state: Callable[[], dict]) -> Iterator[tuple[list[Sample], dict]]:
        """(batch, the stream's state after it)."""
        raise NotImplementedError

    def __iter__(self):
        taken, states = self.resume["taken"], self.resume["states"]
        role, workers = worker_role(taken)
        self.samples.open(taken)
        saved = states.get(role)
        if saved is not None:
            self.samples.restore(saved["stream"])
            self.samples.step = saved["step"]
            replay = 0
        else:  # no position for this role: a fresh start, or a checkpoint that predates reader states
            self.samples.step = role
            replay = 0 if states else -(-(taken - role) // workers) if taken > role else 0
        if replay:
            log.info("this checkpoint has no data reader positions (older storm-lightning): replaying %d batches",
                     replay)
        for i, (batch, state) in enumerate(self._fill(iter(self.samples), self.samples.state)):
            # the next batch's first sample is drawn after this (with a token budget, the one sample
            # that did not fit was drawn before: a start_step holds give or take that sample)
            self.samples.step += workers
            if i >= replay:
                yield collate(batch, self.pad_id, {"role": role, "step": self.samples.step, "stream": state})
            elif i and i % 100 == 0:
                log.info("replayed %d of %d batches", i, replay)


class ResumableBatches(_Batches):
    """Batches of ``batch_size`` samples, or fewer where the next sample would take the batch over
    ``max_frames`` frames (an image is one; ``data.max_batch_frames``)."""

    def __init__(self, samples: ShardStream, batch_size: int, pad_id: int, resume: dict | None = None,
                 max_frames: int | None = None) -> None:
        super().__init__(samples, pad_id, resume)
        self.batch_size, self.max_frames = batch_size, max_frames

    def _fill(self, samples, state):
        batch, frames = [], 0
        while True:
            before = state()  # where the stream stands if this sample opens the next batch
            sample = next(samples)
            if batch and self.max_frames is not None and frames + sample.frames > self.max_frames:
                yield batch, before
                batch, frames = [], 0
            batch.append(sample)
            frames += sample.frames
            if len(batch) == self.batch_size:
                yield batch, state()
                batch, frames = [], 0


class TokenBudgetBatches(_Batches):
    """Batches of whole samples packed up to ``budget`` LLM tokens (text + visual after compression).

    ``visual_tokens(frames)`` gives a clip's visual tokens after the model's compressors (1 frame: an
    image), linked from the model by ``storm-fit``. A sample alone over the budget is a batch of one
    (and a warning). At most ``max_samples`` samples and ``max_frames`` frames (an image is one) per
    batch (a sample never has more: ``data.max_batch_frames`` is checked against the sources).
    """

    def __init__(self, samples: ShardStream, budget: int, visual_tokens: Callable[[int], int], pad_id: int,
                 max_samples: int = 256, resume: dict | None = None, max_frames: int | None = None) -> None:
        super().__init__(samples, pad_id, resume)
        self.budget, self.visual_tokens, self.max_samples = budget, visual_tokens, max_samples
        self.max_frames = max_frames

    def cost(self, sample: Sample) -> int:
        frames = sample.frames
        return len(sample.input_ids) - (1 if frames else 0) + (self.visual_tokens(frames) if frames else 0)

    def _fill(self, samples, state):
        batch, used, frames = [], 0, 0
        while True:
            before = state()  # where the stream stands if this sample opens the next batch
            sample = next(samples)
            cost = self.cost(sample)
            too_many_frames = self.max_frames is not None and frames + sample.frames > self.max_frames
            if batch and (used + cost > self.budget or len(batch) == self.max_samples or too_many_frames):
                yield batch, before
                batch, used, frames = [], 0, 0
            if cost > self.budget:
                log.warning("sample '%s' alone needs %d tokens, over data.token_budget=%d", sample.key, cost,
                            self.budget)
            batch.append(sample)
            used += cost
            frames += sample.frames
