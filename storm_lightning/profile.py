"""``storm-profile``: per-module latency of a STORM config, in the layout of the paper's Figure 8.

For every number of frames and compression ratio: vision tower, projector (downsampler + temporal
projector), compression, LLM prefill, and LLM decode per token with the KV cache. Random weights (no
checkpoint), one video of the given length plus a short prompt, median of ``--repeats`` runs after
``--warmup``. CUDA when available (bf16), else CPU (fp32). Writes a CSV and a PNG.

The compression ratio ``r`` replaces the config's compressors with ``TemporalAveragePool(r)`` (the
paper's setting, ``--compression temporal_pool``), ``TemporalSample(r)`` or ``SpatialAveragePool(sqrt r)``.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from storm_lightning.compressors import SpatialAveragePool, TemporalAveragePool, TemporalSample
from storm_lightning.data.video import ReadLimits
from storm_lightning.errors import ConfigError, MissingPathError, UserError, one_line_errors
from storm_lightning.inference import build_model, media_batch, usable_device

STAGES = ("vision", "projector", "compression", "llm_prefill")
COMPRESSIONS = {"temporal_pool": TemporalAveragePool, "temporal_sample": TemporalSample,
                "spatial_pool": lambda r: SpatialAveragePool(math.isqrt(r))}


class StageTimer:
    """Wall time of module calls, by stage, synchronising CUDA at each boundary."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.times = device, {}

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    @contextmanager
    def stage(self, name: str):
        self.sync()
        start = time.perf_counter()
        yield
        self.sync()
        self.times[name] = self.times.get(name, 0.0) + time.perf_counter() - start

    def hook(self, module: torch.nn.Module, name: str) -> None:
        def pre(*_):
            self.sync()
            self.times[name] = self.times.get(name, 0.0) - time.perf_counter()

        def post(*_):
            self.sync()
            self.times[name] += time.perf_counter()

        module.register_forward_pre_hook(pre)
        module.register_forward_hook(post)


@torch.no_grad()
def profile_once(model, timer: StageTimer, frames: int, decode_tokens: int) -> dict:
    size = model.vision.image_size
    pixels = torch.randint(0, 255, (frames, 3, size, size), dtype=torch.uint8, device=timer.device)
    batch = media_batch(model, "Describe the video in detail.", pixels).to(timer.device)
    timer.times = {}
    inputs, attention, _ = model.build_inputs(batch)  # vision, projector, compression: timed by hooks
    with timer.stage("llm_prefill"):
        logits, cache = model.llm.prefill(inputs, attention)
    with timer.stage("decode_total"):  # CausalLM.step checks that the cache is read
        for _ in range(decode_tokens):
            attention = torch.cat([attention, attention.new_ones(1, 1)], dim=1)
            logits, cache = model.llm.step(logits.argmax(-1), attention, cache)
    times = dict(timer.times)
    times["projector"] = times.pop("downsampler", 0.0) + times.get("projector", 0.0)
    times.setdefault("compression", 0.0)
    times["decode_per_token"] = times.pop("decode_total") / max(1, decode_tokens)
    times["llm_tokens"] = int(attention.shape[1]) - decode_tokens
    return times


def run(config: str, frames_list: list[int], ratios: list[int], compression: str, repeats: int, warmup: int,
        decode_tokens: int, out: str, device: str | None = None) -> list[dict]:
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    model, _ = build_model(config, compressors=[])
    model = model.to(dev, dtype).eval()
    timer = StageTimer(dev)
    for name in ("vision", "downsampler", "projector"):
        timer.hook(getattr(model, name), name)
    rows = []
    for ratio in ratios:
        chain = [] if ratio == 1 else [COMPRESSIONS[compression](ratio)]
        model.compressors = torch.nn.ModuleList(chain).to(dev)
        for c in model.compressors:
            timer.hook(c, "compression")
        for frames in frames_list:
            if frames < ratio and compression != "spatial_pool":
                continue
            runs = [profile_once(model, timer, frames, decode_tokens) for _ in range(warmup + repeats)][warmup:]
            row = {"frames": frames, "ratio": ratio, "compression": compression if ratio > 1 else "none",
                   "visual_tokens": model.visual_tokens(frames, training=False)[1],
                   "llm_tokens": runs[0]["llm_tokens"]}
            for stage in (*STAGES, "decode_per_token"):
                row[f"{stage}_ms"] = round(1e3 * statistics.median(r[stage] for r in runs), 3)
            row["total_ms"] = round(sum(row[f"{s}_ms"] for s in STAGES), 3)
            for stage in STAGES:
                row[f"{stage}_share"] = round(row[f"{stage}_ms"] / row["total_ms"], 4)
            rows.append(row)
            print(", ".join(f"{k}={v}" for k, v in row.items() if not k.endswith("_share")), file=sys.stderr)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    plot(rows, str(Path(out).with_suffix(".png")), f"{Path(config).name} on {dev.type}")
    return rows


def plot(rows: list[dict], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['frames']}f\nx{r['ratio']}" for r in rows]
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(rows)), 4))
    bottom = [0.0] * len(rows)
    for stage in STAGES:
        values = [r[f"{stage}_ms"] for r in rows]
        ax.bar(labels, values, bottom=bottom, label=stage)
        bottom = [b + v for b, v in zip(bottom, values)]
    ax.set_ylabel("latency (ms), prefill")
    ax.set_xlabel("frames / compression ratio")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(args: list[str] | None = None) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    parser = argparse.ArgumentParser(prog="storm-profile", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="conf/sft.yaml")
    parser.add_argument("--frames", type=int, nargs="+", default=[8, 16, 32, 64, 128])
    parser.add_argument("--ratios", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--compression", choices=sorted(COMPRESSIONS), default="temporal_pool")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--decode-tokens", type=int, default=16)
    parser.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--out", default="runs/profile/profile.csv", help="CSV path; the PNG goes beside it")
    opts = parser.parse_args(args)
    with one_line_errors("storm-profile"):
        for flag in ("frames", "ratios"):
            if min(getattr(opts, flag)) < 1:
                raise ConfigError(f"--{flag} must all be >= 1, got {getattr(opts, flag)}")
        if opts.repeats < 1 or opts.warmup < 0 or opts.decode_tokens < 0:
            raise ConfigError("--repeats must be >= 1, --warmup and --decode-tokens >= 0")
        most = ReadLimits().max_frames  # a clip is allocated whole: bounded as a read is
        if max(opts.frames) > most:
            raise ConfigError(f"--frames must all be <= {most} (the reader's limit), got {opts.frames}")
        if not Path(opts.config).is_file():
            raise MissingPathError(f"--config: no such file '{opts.config}'")
        if Path(opts.out).is_dir() or Path(opts.out).with_suffix(".png").is_dir():
            raise UserError(f"--out {opts.out}: is a folder: give the CSV file to write")
        device = usable_device(opts.device, "--device")
        rows = run(opts.config, opts.frames, opts.ratios, opts.compression, opts.repeats, opts.warmup,
                   opts.decode_tokens, opts.out, str(device))
    print(f"{len(rows)} rows -> {opts.out} and {Path(opts.out).with_suffix('.png')}")
