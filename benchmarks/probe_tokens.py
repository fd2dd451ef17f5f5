"""What the visual tokens say, read without the LLM: a linear probe per multiple-choice category.

For every multiple-choice sample of the given shards, the tokens of its image or clip are averaged into
one vector at two places: the vision tower's output (frames encoded one by one) and the visual tokens the
LLM receives (after the projector and the compressor chain). A logistic regression per category is fit
on the train shards and scored on the eval shards. The average forgets where and when each token was,
so a category the probe reads from the LLM's tokens but not from the vision tower's needs the projector
to have mixed information across tokens: for ``direction``, the vision tower's average of a clip moving
left equals that of the same clip moving right (the same frames in reverse order).

    python benchmarks/probe_tokens.py --config conf/sft.yaml                     # random weights
    python benchmarks/probe_tokens.py --config conf/sft.yaml --ckpt runs/sft/checkpoints/last.ckpt

A probe far above chance where the trained model's answers are at chance says the information reaches
the LLM and the LLM does not read it. Prints a markdown table; ``--out`` writes it with the counts as JSON.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F

from storm_lightning.data import ShardSource
from storm_lightning.data.samples import SampleProcessor
from storm_lightning.data.stream import ShardStream
from storm_lightning.inference import build_model, load_model

TRAIN = ["image=data_shards/train/image-{000000..000003}.tar",
         "video32=data_shards/train/video32-{000000..000003}.tar"]
EVAL = ["image=data_shards/eval/image-000000.tar", "video32=data_shards/eval/video32-000000.tar"]
STAGES = ("vision", "llm_input")


def parse_source(spec: str, frames: int) -> ShardSource:
    name, _, shards = spec.partition("=")
    return ShardSource(name=name, shards=shards, frames_per_clip=frames)


@torch.no_grad()
def features(model, specs: list[str], frames: int, tokenizer_path: str, limit: int) -> dict[str, dict]:
    """category -> {"labels": (n,), "options": k, stage: (n, D)} for every multiple-choice sample."""
    sources = [parse_source(s, frames) for s in specs]
    stream = ShardStream(sources, [s.shard_paths(s.name) for s in sources],
                         SampleProcessor(tokenizer_path, model.vision.image_size, 4096), infinite=False)
    rows: dict[str, dict] = defaultdict(lambda: {"labels": [], **{s: [] for s in STAGES}})
    tower: list = []  # the vision tower's output, caught during encode_media's own call
    hook = model.vision.register_forward_hook(lambda module, args, out: tower.append(out))
    for sample in stream:
        category = sample.category
        if category is None or len(rows[category]["labels"]) >= limit:
            continue
        pixels = sample.pixel_values
        tower.clear()
        visual, _ = model.encode_media(pixels, torch.tensor([len(pixels)]))
        rows[category]["vision"].append(tower[0].mean((0, 1)))
        rows[category]["llm_input"].append(visual[0].mean(0))
        rows[category]["labels"].append(sample.answer)
        rows[category]["options"] = len(sample.options)
    hook.remove()
    return {c: {"labels": torch.tensor(r["labels"]), "options": r["options"],
                **{s: torch.stack(r[s]) for s in STAGES}} for c, r in rows.items()}


def probe(train_x, train_y, test_x, test_y, classes: int, steps: int = 300, l2: float = 1e-3) -> float:
    """Accuracy of a multinomial logistic regression on standardised features (full-batch Adam)."""
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    generator = torch.Generator().manual_seed(0)
    weight = (torch.randn(train_x.shape[1], classes, generator=generator) * 0.01).requires_grad_()
    bias = torch.zeros(classes, requires_grad=True)
    optimizer = torch.optim.Adam([weight, bias], lr=1e-2)
    with torch.enable_grad():
        for _ in range(steps):
            loss = F.cross_entropy(train_x @ weight + bias, train_y) + l2 * weight.pow(2).sum()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return float(((test_x @ weight + bias).argmax(1) == test_y).float().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="the training config (the model section is used)")
    parser.add_argument("--ckpt", help="a storm-fit checkpoint; random weights (seed 0) without it")
    parser.add_argument("--train", nargs="+", default=TRAIN, help="NAME=SHARDS to fit the probes on")
    parser.add_argument("--eval", nargs="+", default=EVAL, help="NAME=SHARDS to score the probes on")
    parser.add_argument("--frames", type=int, default=32, help="frames sampled from every video")
    parser.add_argument("--limit", type=int, default=400, help="at most this many samples per category and split")
    parser.add_argument("--out", help="write the table and counts here as JSON")
    args = parser.parse_args()

    torch.manual_seed(0)
    if args.ckpt:
        model, data = load_model(args.ckpt, args.config)
    else:
        model, data = build_model(args.config)
        model.eval()
    tokenizer_path = data.get("tokenizer_path", "data_shards/tokenizer")
    start = time.perf_counter()
    train = features(model, args.train, args.frames, tokenizer_path, args.limit)
    test = features(model, args.eval, args.frames, tokenizer_path, args.limit)
    results = []
    for category in sorted(set(train) & set(test)):
        tr, te = train[category], test[category]
        majority = int(tr["labels"].mode().values)
        row = {"category": category, "train": len(tr["labels"]), "eval": len(te["labels"]),
               "chance": 100.0 / len(tr["labels"].unique()),  # image_shape offers "star", never the answer
               "majority": 100.0 * float((te["labels"] == majority).float().mean())}
        for stage in STAGES:
            row[stage] = 100.0 * probe(tr[stage], tr["labels"], te[stage], te["labels"], tr["options"])
        results.append(row)
    weights = args.ckpt or "random weights (seed 0)"
    print(f"\nLinear probe of mean-pooled visual tokens, {weights}; eval accuracy in % "
          f"({time.perf_counter() - start:.0f} s)\n")
    print("| category | train / eval samples | chance | majority letter | vision tower | LLM input |")
    print("|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['category']} | {r['train']} / {r['eval']} | {r['chance']:.1f} | {r['majority']:.1f} | "
              f"{r['vision']:.1f} | {r['llm_input']:.1f} |")
    if args.out:
        Path(args.out).write_text(json.dumps({"weights": weights, "config": args.config, "rows": results}, indent=1))


if __name__ == "__main__":
    main()
