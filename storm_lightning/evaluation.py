"""Multiple-choice evaluation: option scores from the LM head, accuracy per group, prediction records.

A multiple-choice sample is scored by the logits of the option letters (``A``, ``B``, ...) at the
position that predicts the first token of its last answer: deterministic, no generation. Accuracy is
kept overall, per ``category``, per clip length (``clip_frames``) and per ``duration`` group, and
synchronised across ranks; ``storm-fit test`` also writes every prediction to ``predictions.json``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import MeanMetric

from storm_lightning.data.batching import Batch
from storm_lightning.tokenizer import OPTION_LETTERS


def clip_bucket(frames: int) -> str:
    """Clip-length bucket for accuracy reports: frames of the source clip."""
    if frames <= 1:
        return "image" if frames == 1 else "text"
    for upper in (16, 64, 256, 1024):
        if frames <= upper:
            return f"le{upper}"
    return "gt1024"


def option_token_ids(tokenizer) -> list[int]:
    """The first token of each option letter."""
    return [tokenizer.encode(letter, add_special_tokens=False)[0] for letter in OPTION_LETTERS]


def choice_scores(logits: Tensor, keep: Tensor, option_ids: list[int]) -> Tensor:
    """Option-letter logits where each row's last answer's first token is predicted, (B, OPTIONS);
    rows without an answer: zeros. ``logits``: (keep.sum(), vocab), the LM head at the ``keep`` (B, L)
    positions. Teacher forcing does not leak the answer: that position only attends to the prompt."""
    starts = keep & ~F.pad(keep, (1, 0))[:, :-1]  # first target position of each assistant turn
    last = torch.where(starts, torch.arange(keep.shape[1], device=keep.device), -1).amax(1)
    flat = keep.flatten().cumsum(0).view_as(keep) - 1  # index into `logits` of each kept position
    index = flat[torch.arange(len(keep), device=keep.device), last.clamp_min(0)]
    scores = logits[index.clamp_min(0)][:, option_ids].float()
    return torch.where((last >= 0)[:, None], scores, torch.zeros_like(scores))


class MultipleChoiceMetrics(nn.Module):
    """Accuracy per stage and group (torchmetrics, created on first use) and the test predictions."""

    def __init__(self) -> None:
        super().__init__()
        # group name -> metric; a plain dict: a category may hold any character ("Action.Counting"), which
        # a module name may not. The metrics hold no weights, and are created on the scores' device.
        self.accuracy: dict[str, MeanMetric] = {}
        self.predictions: list[dict] = []

    def update(self, batch: Batch, scores: Tensor, stage: str) -> None:
        for i, options in enumerate(batch.options):
            if not options or batch.answer[i] is None:
                continue
            prediction = int(scores[i, : len(options)].argmax())
            correct = float(prediction == int(batch.answer[i]))
            groups = ["overall", f"category/{batch.category[i] or 'none'}",
                      f"clip_frames/{clip_bucket(batch.clip_frames[i])}"]
            if batch.duration[i] is not None:  # benchmarks' own duration groups
                groups.append(f"duration/{batch.duration[i]}")
            for group in groups:
                self._metric(f"{stage}/accuracy/{group}", scores.device).update(correct)
            if stage == "test":
                self.predictions.append({
                    "key": batch.keys[i], "source": batch.sources[i], "category": batch.category[i],
                    "duration": batch.duration[i], "clip_frames": batch.clip_frames[i],
                    "frames": int(batch.frames_per_sample[i]), "options": options, "answer": int(batch.answer[i]),
                    "prediction": prediction, "correct": bool(correct),
                    "scores": [round(float(x), 4) for x in scores[i, : len(options)]],
                })

    def _metric(self, name: str, device) -> MeanMetric:
        if name not in self.accuracy:
            self.accuracy[name] = MeanMetric().to(device)
        return self.accuracy[name]

    def compute(self, stage: str, world_size: int, device) -> dict[str, Tensor]:
        """Every accuracy of ``stage``, synchronised across ranks, then reset.

        Ranks see different categories, so first agree on the union of names, then compute in one
        sorted order: every rank makes the same collective calls.
        """
        names = sorted(k for k in self.accuracy if k.startswith(f"{stage}/"))
        if world_size > 1:
            gathered: list = [None] * world_size
            torch.distributed.all_gather_object(gathered, names)
            names = sorted(set().union(*gathered))
        values = {}
        for name in names:
            metric = self._metric(name, device)
            values[name] = metric.compute()  # synchronises the ranks
            metric.reset()
        return values

    def write_predictions(self, path: Path) -> int:
        """Write and forget the test predictions; returns how many."""
        count = len(self.predictions)
        if count:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(self.predictions, indent=1))
        self.predictions = []
        return count
