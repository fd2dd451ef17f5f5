"""How much frame order the projector writes into the visual tokens, and how hard the scan is pushed.

A clip of a shape moving right, played backwards, is the same shape moving left: the vision tower sees
the same frames, so whatever tells the two apart in the *average* of the visual tokens comes from the
projector mixing tokens across frames. For ``count`` clips, reversed playback keeps the answer, so
their figure is a control for what time reversal changes in general. Per category, over clips drawn in
memory with ``storm_lightning.data.synth`` (no mp4):

- ``projector / tokens``: norm of the projector's contribution ``projector(x) - x`` against that of its
  input ``x``, per token (how much the residual Mamba layers change the tokens at all);
- ``reversal / spread``: the mean distance between a clip's and its reversal's mean-pooled contribution,
  over the mean distance of clips' mean-pooled contributions from their average (near 0: the average
  does not know the order of the frames; near 1: order matters as much as content);
- gradient norms of the scan's temporal parameters (``x_proj``: B, C, dt; ``dt_proj``; ``A_log``)
  and of the projections around it (``in_proj``, ``out_proj``), for a random linear readout of the
  mean-pooled tokens: how strongly a loss on the average can reshape what the scan remembers.

    python benchmarks/temporal_signal.py --config conf/sft.yaml                       # random weights
    python benchmarks/temporal_signal.py --config conf/sft.yaml --ckpt runs/sft/checkpoints/last.ckpt

Needs a ``MambaTemporalProjector`` for the gradient rows; prints a markdown table.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from storm_lightning.data import synth
from storm_lightning.inference import build_model, load_model

TASKS = {"direction": synth.video_direction, "count": synth.video_count}
GRAD_GROUPS = ("x_proj", "dt_proj", "A_log", "in_proj", "out_proj")


def grad_group(name: str) -> str:
    """``layers.0.mixer.x_proj_b.weight`` -> ``x_proj``; ``layers.1.mixer.A_b_log`` -> ``A_log``."""
    parts = name.split(".")
    leaf = parts[-2] if parts[-1] in ("weight", "bias") and len(parts) > 1 else parts[-1]
    return "A_log" if leaf == "A_b_log" else leaf.removesuffix("_b")


def clips(task: str, n: int, frames: int, size: int, seed: int) -> list[torch.Tensor]:
    rng = np.random.default_rng(seed)
    return [torch.from_numpy(np.stack(TASKS[task](rng, frames, size)[0])).permute(0, 3, 1, 2) for _ in range(n)]


def projector_io(model, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 (T, 3, S, S) -> the projector's input and output, each (1, T, N, D), caught during the
    model's own ``encode_media``."""
    caught = []
    hook = model.projector.register_forward_hook(lambda module, args, out: caught.append((args[0], out)))
    try:
        model.encode_media(pixels, torch.tensor([len(pixels)]))
    finally:
        hook.remove()
    return caught[0]


def measure(model, videos: list[torch.Tensor]) -> dict[str, float]:
    with torch.no_grad():
        ratio, forward, backward = [], [], []
        for clip in videos:
            tokens, out = projector_io(model, clip)
            ratio.append(float((out - tokens).norm(dim=-1).mean() / tokens.norm(dim=-1).mean()))
            forward.append((out - tokens).mean((1, 2))[0])
            tokens, out = projector_io(model, clip.flip(0))
            backward.append((out - tokens).mean((1, 2))[0])
        forward, backward = torch.stack(forward), torch.stack(backward)
        spread = (forward - forward.mean(0)).norm(dim=1).mean()
    row = {"projector / tokens": float(np.mean(ratio)),
           "reversal / spread": float((forward - backward).norm(dim=1).mean() / spread)}

    readout = torch.randn(model.projector.output_dim, generator=torch.Generator().manual_seed(0))
    model.zero_grad(set_to_none=True)
    with torch.enable_grad():
        for clip in videos:
            _, out = projector_io(model, clip)
            (out.mean((1, 2))[0] @ readout).backward()
    for group in GRAD_GROUPS:
        grads = [p.grad for name, p in model.projector.named_parameters()
                 if p.grad is not None and grad_group(name) == group]
        row[f"grad {group}"] = float(torch.stack([g.norm() for g in grads]).norm()) if grads else float("nan")
    model.zero_grad(set_to_none=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="the training config (the model section is used)")
    parser.add_argument("--ckpt", help="a storm-fit checkpoint; random weights (seed 0) without it")
    parser.add_argument("--clips", type=int, default=16, help="clips per category")
    parser.add_argument("--frames", type=int, default=32)
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    args = parser.parse_args()

    torch.manual_seed(0)
    model = load_model(args.ckpt, args.config)[0] if args.ckpt else build_model(args.config)[0]
    model.eval()
    start = time.perf_counter()
    rows = {task: measure(model, clips(task, args.clips, args.frames, model.vision.image_size, seed=i))
            for i, task in enumerate(args.tasks)}
    columns = list(next(iter(rows.values())))
    weights = args.ckpt or "random weights (seed 0)"
    print(f"\nTime order in the mean-pooled projector output, {weights}, {args.clips} clips of "
          f"{args.frames} frames per category ({time.perf_counter() - start:.0f} s)\n")
    print("| category | " + " | ".join(columns) + " |")
    print("|---|" + "---|" * len(columns))
    for task, row in rows.items():
        print(f"| {task} | " + " | ".join(f"{row[c]:.3g}" for c in columns) + " |")


if __name__ == "__main__":
    main()
