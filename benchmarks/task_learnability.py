"""How fast a model learns chosen synthetic tasks alone: clips drawn in memory, held-out accuracy by step.

A storm-fit run mixes every task and takes minutes per try; this trains the model section of a config
on only the video tasks named (fresh clips from ``storm_lightning.data.synth`` every step, no mp4
round trip), optionally with ``--images N`` image questions per step on where the shape is
(``image_position``; ``--images-first K``: K steps of those alone before any clip), and prints held-out accuracy per category every ``--eval-every`` steps, with how
many different letters the model answered (``1l``: one letter for everything, the plateau).

    python benchmarks/task_learnability.py --config conf/sft.yaml --tasks direction --steps 300
    python benchmarks/task_learnability.py --config conf/sft.yaml --tasks direction --images 8 --steps 300

Optimiser as ``storm-fit``'s (``StormModel.configure_optimizers`` over ``--steps``), gradient clipping
1.0; one sample per clip, the answer letter only.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from storm_lightning.data import synth
from storm_lightning.data.batching import collate
from storm_lightning.data.records import multiple_choice_prompt
from storm_lightning.data.samples import Sample
from storm_lightning.host_memory import keep_freed_memory
from storm_lightning.inference import build_model
from storm_lightning.tokenizer import OPTION_LETTERS, encode_conversation

VIDEO_TASKS = {f.__name__.removeprefix("video_"): f for f in synth.VIDEO_TASKS}


def as_sample(tokenizer, tag: str, question: str, options: list[str], answer: int, pixels: np.ndarray,
              category: str) -> Sample:
    conversation = [{"from": "human", "value": f"{tag}\n{multiple_choice_prompt(question, options)}"},
                    {"from": "gpt", "value": OPTION_LETTERS[answer]}]
    ids, labels = encode_conversation(tokenizer, conversation, 4096)
    return Sample(key="", source=category, input_ids=torch.tensor(ids), labels=torch.tensor(labels),
                  pixel_values=torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous(), clip_frames=len(pixels),
                  category=category, answer=answer, options=options)


def clip_sample(rng, tokenizer, tasks: list[str], frames: int, size: int) -> Sample:
    clip, task = VIDEO_TASKS[tasks[rng.integers(len(tasks))]](rng, frames, size)
    return as_sample(tokenizer, "<video>", task["question"], task["options"], task["options"].index(task["correct"]),
                     np.stack(clip), task["category"])


def position_sample(rng, tokenizer, size: int) -> Sample:
    """The bundled ``image_position`` question (``synth.image_frame``: a shape in one quadrant)."""
    frame, _, shape, quadrant = synth.image_frame(rng, size)
    return as_sample(tokenizer, "<image>", f"Where is the {shape}?", list(synth.QUADRANTS),
                     synth.QUADRANTS.index(quadrant), frame[None], "image_position")


@torch.no_grad()
def evaluate(model, samples: list[Sample], pad_id: int) -> str:
    model.eval()
    scores: dict[str, list] = {}
    for i in range(0, len(samples), 16):
        batch = samples[i:i + 16]
        for sample, row in zip(batch, model(collate(batch, pad_id))["choice_scores"]):
            pred = int(row[:len(sample.options)].argmax())
            hits, letters = scores.setdefault(sample.category, [[], set()])
            hits.append(pred == sample.answer)
            letters.add(pred)
    model.train()
    return " ".join(f"{c}={100 * np.mean(h):.0f}({len(letters)}l)" for c, (h, letters) in sorted(scores.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="the training config (the model section is used)")
    parser.add_argument("--tasks", nargs="+", default=["direction"], choices=list(VIDEO_TASKS))
    parser.add_argument("--images", type=int, default=0, help="image_position questions per step")
    parser.add_argument("--batch", type=int, default=8, help="clips per step")
    parser.add_argument("--images-first", type=int, default=0,
                        help="this many steps of image_position questions alone (no clips) before the mix")
    parser.add_argument("--frames", type=int, default=32)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--eval-clips", type=int, default=160)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.images_first and not args.images:
        parser.error("--images-first needs --images N > 0: its steps have no clips")

    keep_freed_memory()
    torch.manual_seed(args.seed)
    model, _ = build_model(args.config)
    model.train()
    tokenizer, size = model.tokenizer, model.vision.image_size
    held_out = np.random.default_rng([args.seed, 1])
    evalset = [clip_sample(held_out, tokenizer, args.tasks, args.frames, size) for _ in range(args.eval_clips)]
    evalset += [position_sample(held_out, tokenizer, size) for _ in range(64 if args.images else 0)]

    model.hparams.schedule_steps = args.steps  # no Trainer to count the steps
    optimization = model.configure_optimizers()  # storm-fit's groups, AdamW and warmup + cosine schedule
    optimizer, schedule = optimization["optimizer"], optimization["lr_scheduler"]["scheduler"]
    rng = np.random.default_rng([args.seed, 0])
    start, losses = time.perf_counter(), []
    for step in range(args.steps):
        clips = 0 if step < args.images_first else args.batch
        batch = [clip_sample(rng, tokenizer, args.tasks, args.frames, size) for _ in range(clips)]
        batch += [position_sample(rng, tokenizer, size) for _ in range(args.images)]
        loss = model(collate(batch, tokenizer.pad_token_id))["loss"]
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            print(f"step {step + 1} loss {np.mean(losses[-args.eval_every:]):.3f} "
                  f"{evaluate(model, evalset, tokenizer.pad_token_id)} {time.perf_counter() - start:.0f} s", flush=True)


if __name__ == "__main__":
    main()
