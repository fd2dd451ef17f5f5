"""Multiple-choice accuracy of one checkpoint under test-time token compression: the table in docs/results.md.

Each variant is one ``storm-fit test`` run of the same checkpoint with another compressor chain (and,
for the long rows, 128-frame clips), reading the per-sample ``predictions.json`` it writes:

    python benchmarks/eval_compression.py --config conf/sft.yaml --ckpt runs/sft/checkpoints/last.ckpt

Prints a markdown table (accuracy per category, %, and the visual tokens per 32- or 128-frame clip) and
writes it with the raw counts to ``--out`` as JSON.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

C = "storm_lightning.compressors."
VIDEO32 = '[{name: video32, shards: "data_shards/eval/video32-000000.tar", frames_per_clip: 32}]'
VIDEO128 = '[{name: video128, shards: "data_shards/eval/video128-000000.tar", frames_per_clip: 128}]'
IMAGE = '[{name: image, shards: "data_shards/eval/image-000000.tar"}]'
N = 16  # visual tokens per frame in the tiny configs (4x4)

# name, compressor chain, validation sources, frames per clip, visual tokens per clip
VARIANTS = [
    ("none", "[]", VIDEO32, 32, 32 * N),
    ("T-pool 4", f"[{{class_path: {C}TemporalAveragePool, init_args: {{kernel_size: 4}}}}]", VIDEO32, 32, 8 * N),
    ("T-sample 2", f"[{{class_path: {C}TemporalSample, init_args: {{stride: 2}}}}]", VIDEO32, 32, 16 * N),
    ("T-sample 4", f"[{{class_path: {C}TemporalSample, init_args: {{stride: 4}}}}]", VIDEO32, 32, 8 * N),
    ("S-pool 2", f"[{{class_path: {C}SpatialAveragePool, init_args: {{kernel_size: 2}}}}]", VIDEO32, 32, 32 * N // 4),
    ("128 frames, T-sample 4", f"[{{class_path: {C}TemporalSample, init_args: {{stride: 4}}}}]", VIDEO128, 128,
     32 * N),
    ("images, none", "[]", IMAGE, 1, N),
]
CATEGORIES = ["direction", "order", "flash", "count", "image_color", "image_shape", "image_position"]
# image_shape lists four shapes but "star" is never the answer: one fixed letter scores a third
CHANCE = {"direction": 25.0, "order": 12.5, "flash": 12.5, "count": 25.0, "image_color": 12.5, "image_shape": 33.3,
          "image_position": 25.0}


def run_variant(config: list[str], ckpt: str, name: str, compressors: str, sources: str, workdir: Path) -> list[dict]:
    run = "eval_" + "".join(c if c.isalnum() else "_" for c in name)
    shutil.rmtree(workdir / run, ignore_errors=True)
    cmd = [sys.executable, "-c", "from storm_lightning.fit import fit_main; fit_main()", "test", *config,
           f"--ckpt_path={ckpt}", f"--model.compressors={compressors}", f"--data.val_sources={sources}",
           f"--trainer.logger.init_args.save_dir={workdir}", f"--trainer.logger.init_args.name={run}",
           "--trainer.enable_progress_bar=false", "--trainer.callbacks=[]"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"{name}: storm-fit test failed\n{done.stderr[-3000:]}")
    return json.loads((workdir / run / "predictions.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", action="append", required=True, help="the training config(s)")
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--out", default=None, help="JSON with the table and counts")
    parser.add_argument("--workdir", default=None,
                        help="where each variant's test run goes (default: eval_compression/ beside the run's checkpoints/)")
    args = parser.parse_args()
    config = [a for c in args.config for a in ("--config", c)]
    workdir = Path(args.workdir) if args.workdir else Path(args.ckpt).resolve().parent.parent / "eval_compression"

    rows = {}
    for name, compressors, sources, frames, tokens in VARIANTS:
        start = time.perf_counter()
        preds = run_variant(config, args.ckpt, name, compressors, sources, workdir)
        right, total = defaultdict(int), defaultdict(int)
        for p in preds:
            right[p["category"]] += p["correct"]
            total[p["category"]] += 1
        rows[name] = {"frames": frames, "visual_tokens": tokens, "right": dict(right), "total": dict(total),
                      "seconds": round(time.perf_counter() - start, 1)}
        print(f"{name}: {sum(right.values())}/{sum(total.values())} in {rows[name]['seconds']} s", file=sys.stderr)

    cats = [c for c in CATEGORIES if any(c in r["total"] for r in rows.values())]
    head = "| variant | frames | visual tokens | " + " | ".join(cats) + " | mean |"
    lines = [head, "|" + "---|" * (4 + len(cats)),
             "| chance | | | " + " | ".join(f"{CHANCE[c]:.1f}" for c in cats) + " | |"]
    for name, r in rows.items():
        accs = [100 * r["right"][c] / r["total"][c] if r["total"].get(c) else None for c in cats]
        shown = [a for a in accs if a is not None]
        cells = ["" if a is None else f"{a:.1f}" for a in accs]
        lines.append(f"| {name} | {r['frames']} | {r['visual_tokens']} | " + " | ".join(cells)
                     + f" | {sum(shown) / len(shown):.1f} |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        Path(args.out).write_text(json.dumps({"checkpoint": args.ckpt, "config": args.config, "rows": rows,
                                              "table": table}, indent=1))


if __name__ == "__main__":
    main()
