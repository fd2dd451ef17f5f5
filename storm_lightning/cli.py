"""Command-line entry points besides ``storm-fit`` (``storm_lightning/fit.py``): ``storm-shards`` (shard
tools), ``storm-chat`` and ``storm-export``. Each imports what it needs when it runs."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

from storm_lightning.errors import ConfigError, MissingPathError, UserError, one_line_errors


def _in_range(kind, low, high):
    """An argparse type: a number of ``kind`` in [low, high] (argparse prints the error in one line)."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not low <= value <= high:  # also refuses nan
            raise argparse.ArgumentTypeError(f"must be in [{low}, {high}], got {text}")
        return value

    return parse


# bounds of the media options: the reader's data.max_frames default, a generous image side, the frame
# rates a frame-folder record may carry (samples.py refuses others as bad_fps)
FRAMES, SIDE = _in_range(int, 1, 1024), _in_range(int, 1, 2048)
FPS = _in_range(float, 1e-3, 1e4)


def shards_main(args: list[str] | None = None) -> None:
    """``storm-shards synth|convert|check``: make, import and validate WebDataset shards."""
    parser = argparse.ArgumentParser(prog="storm-shards", description=shards_main.__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    synth = sub.add_parser("synth", help="generate the synthetic temporal-reasoning shards and tokenizer")
    synth.add_argument("--out", default="data_shards")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--image-size", type=_in_range(int, 16, 2048), default=64)
    synth.add_argument("--scale", type=_in_range(float, 1e-4, 1e3), default=1.0,
                       help="multiply every source's sample count")
    synth.add_argument("--shards-per-source", type=_in_range(int, 1, 10000), default=4)
    conv = sub.add_parser("convert", help="annotations (LLaVA, VILA, ms-swift, LLaMA-Factory, Video-MME, MVBench, "
                                          "MLVU, LongVideoBench) + a media folder -> shards")
    conv.add_argument("--annotations", required=True, help="a .json list of records, a .jsonl or a .parquet file")
    conv.add_argument("--media-root", required=True, help="the folder the records' image/video paths are in")
    conv.add_argument("--out", required=True)
    conv.add_argument("--format", default="auto", help="auto (per record), conversations, videomme, mvbench, mlvu "
                                                       "or longvideobench (docs/data.md)")
    conv.add_argument("--prefix", default="data")
    conv.add_argument("--samples-per-shard", type=int, default=1000)
    conv.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    conv.add_argument("--frames", type=FRAMES, help="store N frames of each video (sampled now) instead of the video")
    conv.add_argument("--size", type=SIDE, help="... resized to S x S (with --frames)")
    conv.add_argument("--fps", type=FPS, help="... one every 1/FPS seconds, at most --frames (with --frames)")
    conv.add_argument("--folder-fps", type=FPS, default=1.0, help="frame rate of frame-folder videos")
    conv.add_argument("--category", help="category of records that name none (default for mvbench: the file name)")
    chk = sub.add_parser("check", help="read every sample of the given shards as training does; exit 1 if any is bad")
    chk.add_argument("shards", nargs="+", help="shard paths or brace patterns")
    chk.add_argument("--config", help="a storm-fit config: read as its data section says (tokenizer, image size, "
                                      "max length; a listed source's frames)")
    chk.add_argument("--tokenizer", default="data_shards/tokenizer")
    chk.add_argument("--image-size", type=SIDE, default=64)
    chk.add_argument("--max-length", type=_in_range(int, 2, 10**7), default=4096)
    chk.add_argument("--frames", type=FRAMES, default=32, help="frames sampled from each video")
    chk.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    opts = parser.parse_args(args)
    for stop in (signal.SIGTERM, signal.SIGINT):
        signal.signal(stop, _stop_shards)
    with one_line_errors("storm-shards"):
        _shards(opts)


def _stop_shards(signum: int, frame) -> None:
    """SIGTERM / Ctrl-C: stop the worker processes too (they are the forkserver's children: left alone
    they ran on, writing shards into --out after the command had exited), then exit at once, not after
    the pool has finished its running shards. Shards are written to a temporary name first: none is cut."""
    import multiprocessing

    for child in multiprocessing.active_children():
        child.terminate()
    sys.stderr.write(f"storm-shards: stopped by {signal.Signals(signum).name}\n")
    sys.stderr.flush()
    os._exit(128 + signum)


def _shards(opts: argparse.Namespace) -> None:
    if opts.command == "synth":
        from storm_lightning.data.synth import synthesize

        if Path(opts.out).exists() and not Path(opts.out).is_dir():
            raise UserError(f"--out {opts.out}: exists and is not a folder")

        counts = synthesize(opts.out, seed=opts.seed, image_size=opts.image_size, scale=opts.scale,
                            shards_per_source=opts.shards_per_source)
        for name, count in counts.items():
            print(f"{name}: {count} samples")
    elif opts.command == "convert":
        from storm_lightning.data.convert import convert

        report = convert(opts.annotations, opts.media_root, opts.out, workers=opts.workers, format=opts.format,
                         prefix=opts.prefix, samples_per_shard=opts.samples_per_shard, frames=opts.frames,
                         size=opts.size, fps=opts.fps, folder_fps=opts.folder_fps, category=opts.category)
        print(f"{report['written']} of {report['records']} records written to {report['shards']} shards "
              f"({report['resumed_shards']} already there): {report['shard_pattern']}")
        if opts.frames and report["source_media_bytes"]:
            print(f"media: {report['source_media_bytes'] / 2**20:.1f} MB of source videos -> "
                  f"{report['shard_bytes'] / 2**20:.1f} MB of shards "
                  f"({report['source_media_bytes'] / max(1, report['shard_bytes']):.0f}x smaller)")
        for kind, count in report["problems_by_kind"].items():
            print(f"  left out, {kind}: {count}")
        print(f"report: {opts.out}/convert_report.json")
    else:
        from braceexpand import braceexpand

        from storm_lightning.data.convert import check

        paths = [p for pattern in opts.shards for p in braceexpand(pattern)]
        missing = [p for p in paths if not Path(p).is_file()]
        if missing:
            raise MissingPathError(f"no such shard: {missing[0]}" + (f" (and {len(missing) - 1} more)" if missing[1:] else ""))
        results = check(paths, _check_settings(opts, paths), workers=opts.workers)
        for r in results:
            print(f"{r['shard']}: {r['samples']} samples, {len(r['bad'])} bad")
            for b in r["bad"][:20]:
                print(f"  {b['key']}: {b['problem']}")
        sys.exit(1 if any(r["bad"] for r in results) else 0)


def _check_settings(opts: argparse.Namespace, paths: list[str]):
    """What training would read the shards with: the flags, or a storm-fit config's data section."""
    from storm_lightning.data import ShardSource
    from storm_lightning.data.convert import CheckSettings

    if opts.config is None:
        return CheckSettings(opts.tokenizer, opts.image_size, opts.max_length, opts.frames)
    from jsonargparse import ArgumentError, ArgumentParser

    from storm_lightning.data import StormDataModule
    from storm_lightning.inference import load_config, refuse_foreign

    # the data module training would build, so that check reads with its sizes, limits and system prompt
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(StormDataModule, "data")
    section = load_config(opts.config, need_model=False)["data"]
    refuse_foreign(section, StormDataModule, f"--config {opts.config}", "data")  # read only: nothing imported
    try:
        data = parser.instantiate(parser.parse_object({"data": section})).data
    except ArgumentError as exn:
        raise ConfigError(f"--config {opts.config}: {' '.join(str(exn).split())[:300]}") from None
    absolute = {os.path.abspath(p) for p in paths}

    def reads_these(source) -> bool:
        try:
            return bool(absolute & set(source.shard_paths("")))
        except MissingPathError:
            return False

    sources = data.train_sources + data.val_sources
    frames = next(filter(reads_these, sources), None) or ShardSource("check", "", frames_per_clip=opts.frames)
    return CheckSettings(data.tokenizer_path, data.image_size, data.max_length, frames.frames_per_clip, frames.fps,
                         frames.max_frames, data.limits, data.system_prompt)


def chat_main(args: list[str] | None = None) -> None:
    """``storm-chat --checkpoint CKPT [--video F | --image F] --prompt "..."``: ask a trained model."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    parser = argparse.ArgumentParser(prog="storm-chat", description=chat_main.__doc__)
    parser.add_argument("--checkpoint", required=True, help="a storm-fit .ckpt or a storm-export directory")
    parser.add_argument("--config", help="the run's config.yaml (default: found beside the checkpoint)")
    media = parser.add_mutually_exclusive_group()
    media.add_argument("--video", help="a video file, or a folder of its frames (JPEG/PNG, in name order)")
    media.add_argument("--image")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--frames", type=int, default=32, help="frames sampled uniformly from the video")
    parser.add_argument("--fps", type=FPS, help="instead: one frame every 1/FPS seconds, at most --max-frames")
    parser.add_argument("--max-frames", type=int, help="cap for --fps (default: --frames)")
    parser.add_argument("--start", type=float, help="clip bounds in seconds")
    parser.add_argument("--end", type=float)
    parser.add_argument("--folder-fps", type=FPS, default=1.0, help="frame rate of a --video frame folder")
    parser.add_argument("--temporal-pool", type=int, metavar="K", help="replace the compressors: pool K frames")
    parser.add_argument("--spatial-pool", type=int, metavar="P", help="... and/or pool P x P tokens")
    parser.add_argument("--temporal-sample", type=int, metavar="S", help="... and/or keep every S-th frame")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    opts = parser.parse_args(args)
    with one_line_errors("storm-chat"):
        _chat(opts)


def _chat(opts: argparse.Namespace) -> None:
    from storm_lightning.compressors import SpatialAveragePool, TemporalAveragePool, TemporalSample
    from storm_lightning.data.media import decode_image
    from storm_lightning.data.video import FrameSampling, VideoReadError, read_path
    from storm_lightning.inference import generate, load_model

    for flag in ("frames", "max_frames", "temporal_pool", "spatial_pool", "temporal_sample", "max_new_tokens"):
        value = getattr(opts, flag)
        if value is not None and value < 1:
            raise ConfigError(f"--{flag.replace('_', '-')} must be >= 1, got {value}")
    media = opts.video or opts.image
    if media is not None and not Path(media).exists():
        raise MissingPathError(f"--{'video' if opts.video else 'image'}: no such file '{media}'")
    chain = []
    if opts.temporal_pool:
        chain.append(TemporalAveragePool(opts.temporal_pool))
    if opts.spatial_pool:
        chain.append(SpatialAveragePool(opts.spatial_pool))
    if opts.temporal_sample:
        chain.append(TemporalSample(opts.temporal_sample))
    model, _ = load_model(opts.checkpoint, opts.config, chain or None)  # None: the checkpoint's chain
    size = model.vision.image_size
    pixels = None
    try:
        if opts.video:
            sampling = FrameSampling(frames=opts.frames, fps=opts.fps, max_frames=opts.max_frames, start=opts.start,
                                     end=opts.end)
            clip = read_path(opts.video, sampling, size, folder_fps=opts.folder_fps)
            pixels = clip.frames
            before, after = model.visual_tokens(len(pixels), training=False)
            print(f"[{len(pixels)} of {clip.total_frames} frames ({clip.timestamps[0]:.1f}-{clip.timestamps[-1]:.1f} s), "
                  f"{before} visual tokens -> {after} after compression]", file=sys.stderr)
        elif opts.image:
            pixels = decode_image(opts.image, size)
    except (VideoReadError, OSError, ValueError) as exn:  # not a video or image: the user's file, one line
        raise UserError(f"--{'video' if opts.video else 'image'} {media}: {' '.join(str(exn).split())}") from None
    generate(model, opts.prompt, pixels, max_new_tokens=opts.max_new_tokens, temperature=opts.temperature,
             stream=True)


def export_main(args: list[str] | None = None) -> None:
    """``storm-export --checkpoint CKPT --out DIR``: a Hugging Face style directory (config.json,
    model.safetensors, tokenizer/) that ``storm_lightning.inference.from_pretrained`` and storm-chat load."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    parser = argparse.ArgumentParser(prog="storm-export", description=export_main.__doc__)
    parser.add_argument("--checkpoint", required=True, help="a single-file .ckpt (storm-consolidate a sharded one)")
    parser.add_argument("--config", help="the run's config.yaml (default: found beside the checkpoint)")
    parser.add_argument("--out", required=True)
    opts = parser.parse_args(args)
    from storm_lightning.inference import export

    with one_line_errors("storm-export"):
        out = export(opts.checkpoint, opts.out, opts.config)
    print(f"exported to {out}: {', '.join(sorted(p.name for p in out.iterdir()))}")
