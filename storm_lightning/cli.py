"""Command-line entry points: ``storm-fit`` (LightningCLI) and ``storm-shards`` (shard tools)."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

from lightning.pytorch.accelerators import CPUAccelerator
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_info

from storm_lightning.checkpoint import AtomicCheckpointIO
from storm_lightning.data import StormDataModule
from storm_lightning.errors import ConfigError, MissingPathError, one_line_errors
from storm_lightning.host_memory import keep_freed_memory
from storm_lightning.model import StormModel


def config_error(message: str) -> None:
    """One line on stderr, exit status 2: a config error needs its key named, not a traceback."""
    text = " ".join(line.strip() for line in str(message).strip().splitlines())
    sys.stderr.write(f"storm-fit: config error: {text}\n")
    sys.exit(2)


# `storm-fit fit` writes the run's config.yaml; the other subcommands record theirs beside it under
# another name, so that evaluating with other frames or compressors never changes what storm-chat,
# storm-export and a resumed run read as the trained model's config
def config_filename(subcommand: str) -> str:
    return "config.yaml" if subcommand == "fit" else f"{subcommand}_config.yaml"


class StormArgumentParser(LightningArgumentParser):
    """Parse errors (unknown key, wrong type) as one line instead of the whole usage text."""

    def error(self, message: str, ex: Exception | None = None):
        if not self.exit_on_error:  # jsonargparse probing internally: keep its behaviour
            return super().error(message, ex)
        config_error(f"{message} (`storm-fit fit --help` lists every key)")


class StormCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        # one tokenizer for data and model: set data.tokenizer_path only
        parser.link_arguments("data.tokenizer_path", "model.tokenizer_path")

    def instantiate_trainer(self, **kwargs):
        trainer = super().instantiate_trainer(**kwargs)
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:  # the default: make saves atomic
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        if isinstance(trainer.accelerator, CPUAccelerator) and keep_freed_memory():  # see host_memory
            rank_zero_info("Host memory: freed blocks are kept for reuse, not returned to the OS "
                           "(faster CPU steps; STORM_KEEP_FREED_MEMORY=0 turns this off)")
        return trainer


class Terminated(BaseException):
    """SIGTERM: stop now, wherever the run is, data loading included. Lightning alone would stop only at
    the next step boundary, which a stalled data loader never reaches. Checkpoint saves are atomic
    (``AtomicCheckpointIO``), so stopping anywhere leaves no half-written file."""


def _terminate(signum, frame) -> None:
    if os.getpid() != _MAIN_PID:  # a forked data worker: leave quietly, the main process stops the run
        sys.exit(128 + signum)
    raise Terminated(signum)


_MAIN_PID = os.getpid()


def fit_main(args: list[str] | None = None) -> None:
    """``storm-fit [fit|validate|test|predict] --config conf/sft.yaml [--key=value ...]``."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a model hub
    argv = list(sys.argv[1:] if args is None else args)
    if not argv or argv[0] not in ("fit", "validate", "test", "predict", "-h", "--help"):
        argv = ["fit", *argv]  # `storm-fit --config x.yaml` means fit
    sys.argv = [sys.argv[0], *argv]
    subcommand = argv[0] if argv[0] in ("fit", "validate", "test", "predict") else "fit"
    # a UserError is raised while building components, in StormModel.setup (before any data), or when
    # a checkpoint is refused
    global _MAIN_PID
    _MAIN_PID = os.getpid()
    signal.signal(signal.SIGTERM, _terminate)  # Lightning adds its own handler in front of it
    try:
        with one_line_errors("storm-fit"):
            StormCLI(StormModel, StormDataModule, parser_class=StormArgumentParser, auto_configure_optimizers=False,
                     save_config_kwargs={"overwrite": True, "config_filename": config_filename(subcommand)})
    except Terminated:
        sys.stderr.write("storm-fit: stopped by SIGTERM; resume from the last checkpoint with --ckpt_path\n")
        sys.exit(128 + signal.SIGTERM)


def shards_main(args: list[str] | None = None) -> None:
    """``storm-shards synth|convert|check``: make, import and validate WebDataset shards."""
    parser = argparse.ArgumentParser(prog="storm-shards", description=shards_main.__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    synth = sub.add_parser("synth", help="generate the synthetic temporal-reasoning shards and tokenizer")
    synth.add_argument("--out", default="data_shards")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--image-size", type=int, default=64)
    synth.add_argument("--scale", type=float, default=1.0, help="multiply every source's sample count")
    synth.add_argument("--shards-per-source", type=int, default=4)
    conv = sub.add_parser("convert", help="LLaVA-style JSON/JSONL + media folder -> shards")
    conv.add_argument("--annotations", required=True, help="a .json list of records or a .jsonl file")
    conv.add_argument("--media-root", required=True, help="the folder the records' image/video paths are in")
    conv.add_argument("--out", required=True)
    conv.add_argument("--prefix", default="data")
    conv.add_argument("--samples-per-shard", type=int, default=1000)
    conv.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    chk = sub.add_parser("check", help="read every sample of the given shards; exit 1 if any is bad")
    chk.add_argument("shards", nargs="+", help="shard paths or brace patterns")
    chk.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    opts = parser.parse_args(args)
    if opts.command == "synth":
        from storm_lightning.data.synth import synthesize

        counts = synthesize(opts.out, seed=opts.seed, image_size=opts.image_size, scale=opts.scale,
                            shards_per_source=opts.shards_per_source)
        for name, count in counts.items():
            print(f"{name}: {count} samples")
    elif opts.command == "convert":
        from storm_lightning.data.convert import convert

        report = convert(opts.annotations, opts.media_root, opts.out, prefix=opts.prefix,
                         samples_per_shard=opts.samples_per_shard, workers=opts.workers)
        print(f"{report['written']} of {report['records']} records written to {report['shards']} shards "
              f"({report['resumed_shards']} already there): {report['shard_pattern']}")
        for kind, count in report["problems_by_kind"].items():
            print(f"  left out, {kind}: {count}")
        print(f"report: {opts.out}/convert_report.json")
    else:
        from braceexpand import braceexpand

        from storm_lightning.data.convert import check

        paths = [p for pattern in opts.shards for p in braceexpand(pattern)]
        results = check(paths, workers=opts.workers)
        for r in results:
            print(f"{r['shard']}: {r['samples']} samples, {len(r['bad'])} bad")
            for b in r["bad"][:20]:
                print(f"  {b['key']}: {b['problem']}")
        sys.exit(1 if any(r["bad"] for r in results) else 0)


def chat_main(args: list[str] | None = None) -> None:
    """``storm-chat --checkpoint CKPT [--video F | --image F] --prompt "..."``: ask a trained model."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    parser = argparse.ArgumentParser(prog="storm-chat", description=chat_main.__doc__)
    parser.add_argument("--checkpoint", required=True, help="a storm-fit .ckpt or a storm-export directory")
    parser.add_argument("--config", help="the run's config.yaml (default: found beside the checkpoint)")
    media = parser.add_mutually_exclusive_group()
    media.add_argument("--video")
    media.add_argument("--image")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--frames", type=int, default=32, help="frames sampled uniformly from the video")
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
    from storm_lightning.data.media import decode_image, decode_video
    from storm_lightning.inference import generate, load_model

    for flag in ("frames", "temporal_pool", "spatial_pool", "temporal_sample", "max_new_tokens"):
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
    if opts.video:
        pixels, _, total = decode_video(open(opts.video, "rb").read(), opts.frames, size)
        before, after = model.visual_tokens(opts.frames, training=False)
        print(f"[{opts.frames} of {total} frames, {before} visual tokens -> {after} after compression]",
              file=sys.stderr)
    elif opts.image:
        pixels = decode_image(open(opts.image, "rb").read(), size)
    generate(model, opts.prompt, pixels, max_new_tokens=opts.max_new_tokens, temperature=opts.temperature)


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
