"""Benchmark video reading: storm_lightning.data.video.read_video against the alternatives.

    python benchmarks/bench_decode.py                  # the full set (generation ~2 minutes the first time)
    python benchmarks/bench_decode.py --quick          # a small set, a smoke run under a minute
    python benchmarks/bench_decode.py --out DIR        # where the generated videos are cached (re-runs reuse them)

Generates, deterministically with PyAV (x264 ultrafast, a keyframe every 250 frames, 2 B-frames; a textured
background panning every frame): a 10-minute 640x360 30 fps H.264 video in mp4 and the same stream remuxed to
mkv (no frame count in the container), a 20-minute mkv (memory must stay flat when the length doubles), a
2-minute 1280x720 mp4, a 2-minute VP9 webm (when PyAV's FFmpeg has libvpx-vp9), a 2-minute variable-frame-rate
mp4, and the 10-minute video's frames at 1 fps as JPEGs (a frame folder).

Each measurement runs in a fresh subprocess that imports the same modules (storm_lightning.data.video, torch,
av) whatever the reader, then reads N frames resized to 224x224 from the file's path: ``cold`` is the first
read, ``warm`` the best of two more (a data worker's steady state; not repeated when the first takes over 5 s).
``peak RSS`` is the whole process's (``ru_maxrss``, imports included: the ``imports only`` row is that floor),
``over imports`` its growth from just before the first read. Readers:

- ``ours``: ``read_video`` (``read_frame_folder`` for the folder);
- ``decode all``: PyAV decoding every frame and keeping none: the cost of any reader that decodes everything;
- ``decord`` and ``torchcodec``, where they import (``pip install decord torchcodec``; torchcodec also needs
  FFmpeg's shared libraries on the loader path), given the same frame indices as ours; decord resizes while
  decoding, torchcodec's frames are resized like media.resize_frames.

Then (not with --quick) the decoder threading comparison behind ``video._THREAD_TYPE`` (seek path: 32 frames
over the 10-minute mkv; sequential path: the 300 frames of a 10-second clip), the checks against the targets,
and the data module's throughput: for each video, a shard of ``SHARD_SAMPLES`` samples of it (a question and
the video, or the frame folder stored frame by frame as ``storm-shards convert`` stores it), read by
``StormDataModule`` with 2 workers, 32 frames at 224 px, batches of 1: samples per second after the first
batch (the bundled 32-frame clips too).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from fractions import Fraction

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

SIZE = 224
FRAME_COUNTS = (32, 128)
KEYINT = 250
WORKER_TIMEOUT = 600  # seconds for one measurement
SHARD_SAMPLES = 8


# --- generation ----------------------------------------------------------------------------------------------


def _texture(width: int, height: int):
    """A (2H, 2W) uint8 luma texture: 8x8 random blocks over a diagonal ramp (something for x264 to code)."""
    import numpy as np

    rng = np.random.default_rng(0)
    blocks = rng.integers(0, 256, (2 * height // 8 + 1, 2 * width // 8 + 1), dtype=np.uint8)
    tex = np.kron(blocks, np.ones((8, 8), np.uint8))[: 2 * height, : 2 * width]
    y, x = np.mgrid[0 : 2 * height, 0 : 2 * width]
    return ((tex.astype(np.uint16) + (x + y) % 256) // 2).astype(np.uint8)


def _frame_yuv(i: int, width: int, height: int, texture):
    """Frame ``i`` as a yuv420p array (H * 3 / 2, W): the texture panned by (4, 2) pixels a frame."""
    import numpy as np

    x0, y0 = (i * 4) % width, (i * 2) % height
    luma = texture[y0 : y0 + height, x0 : x0 + width]
    u = np.full((height // 4, width), (i * 3) % 256, np.uint8)
    v = np.ascontiguousarray(texture[y0 : y0 + height : 2, x0 : x0 + width : 2]).reshape(height // 4, width)
    return np.concatenate([luma, u, v])


def _encode(path: str, width: int, height: int, frames: int, codec: str = "libx264", vfr: bool = False) -> None:
    import av
    import numpy as np

    texture = _texture(width, height)
    gaps = np.random.default_rng(1).choice([1, 1, 2, 3, 5], size=frames)  # VFR: 1-5 ticks of 1/60 s a frame
    with av.open(path, "w") as container:
        if codec == "libx264":
            params = f"keyint={KEYINT}:min-keyint={KEYINT}:scenecut=0:bframes=2"
            stream = container.add_stream(codec, rate=30, options={"preset": "ultrafast", "x264-params": params})
        else:  # libvpx-vp9, as fast as it goes
            stream = container.add_stream(codec, rate=30, options={"deadline": "realtime", "cpu-used": "8"})
            stream.codec_context.gop_size = KEYINT
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.codec_context.time_base = Fraction(1, 60 if vfr else 30)
        pts = 0
        for i in range(frames):
            frame = av.VideoFrame.from_ndarray(_frame_yuv(i, width, height, texture), format="yuv420p")
            frame.pts, frame.time_base = pts, stream.codec_context.time_base
            pts += int(gaps[i]) if vfr else 1
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def _remux(src: str, dst: str) -> None:
    import av

    with av.open(src) as source, av.open(dst, "w") as target:
        stream = target.add_stream_from_template(source.streams.video[0])
        for packet in source.demux(source.streams.video[0]):
            if packet.dts is not None:
                packet.stream = stream
                target.mux(packet)


def _encode_mkv(path: str, width: int, height: int, frames: int) -> None:
    """An H.264 mkv: encoded to a temporary mp4 (whose index says the frame count), then remuxed."""
    with tempfile.TemporaryDirectory() as tmp:
        mp4 = os.path.join(tmp, "video.mp4")
        _encode(mp4, width, height, frames)
        _remux(mp4, path)


def _frame_folder(path: str, width: int, height: int, seconds: int) -> None:
    """The 30 fps video's frames at 1 fps (frame 30 * k), as JPEGs rendered from the same content."""
    import av

    os.makedirs(path)
    texture = _texture(width, height)
    for k in range(seconds):
        frame = av.VideoFrame.from_ndarray(_frame_yuv(30 * k, width, height, texture), format="yuv420p")
        frame.to_image().save(os.path.join(path, f"{k:06d}.jpg"), quality=90)


def generate(out: str, quick: bool) -> dict[str, str]:
    """Make (or reuse) the benchmark videos in ``out``; returns {name: path}."""
    import av

    seconds = 20 if quick else 600
    tag = "20s" if quick else "10min"
    mp4 = f"{tag} 640x360 mp4"
    plan = {  # name: (file or folder name, how to make it at a path), in order
        mp4: (f"h264_640x360_{tag}.mp4", lambda p: _encode(p, 640, 360, 30 * seconds)),
        f"{tag} 640x360 mkv": (f"h264_640x360_{tag}.mkv", lambda p: _remux(videos[mp4], p)),
    }
    if not quick:
        plan["20min 640x360 mkv"] = ("h264_640x360_20min.mkv", lambda p: _encode_mkv(p, 640, 360, 36000))
        plan["2min 1280x720 mp4"] = ("h264_1280x720_2min.mp4", lambda p: _encode(p, 1280, 720, 3600))
        plan["2min 640x360 VFR mp4"] = ("h264_640x360_2min_vfr.mp4", lambda p: _encode(p, 640, 360, 3600, vfr=True))
        if "libvpx-vp9" in av.codecs_available:
            plan["2min 640x360 VP9 webm"] = ("vp9_640x360_2min.webm",
                                              lambda p: _encode(p, 640, 360, 3600, codec="libvpx-vp9"))
        else:
            print("VP9 webm skipped: PyAV's FFmpeg has no libvpx-vp9 encoder")
    plan[f"{tag} 1 fps JPEG folder"] = (f"jpeg_640x360_{tag}_1fps", lambda p: _frame_folder(p, 640, 360, seconds))
    os.makedirs(out, exist_ok=True)
    videos = {}
    for name, (filename, make) in plan.items():
        path = os.path.join(out, filename)
        if not os.path.exists(path):
            start = time.perf_counter()
            partial = os.path.join(out, "partial_" + filename)  # moved in place once complete
            subprocess.run(["rm", "-rf", partial], check=True)
            make(partial)
            os.replace(partial, path)
            print(f"generated {filename} in {time.perf_counter() - start:.0f} s", flush=True)
        videos[name] = path
    return videos


# --- one measurement (run in a fresh process) ----------------------------------------------------------------


def _reader(method: str, path: str, frames: int):
    """A function reading ``frames`` frames of ``path`` with ``method``, returning them (or a count)."""
    import av
    import numpy as np
    import torch

    from storm_lightning.data import video
    from storm_lightning.data.media import resize_frames, uniform_indices

    images = sorted(os.path.join(path, f) for f in os.listdir(path)) if os.path.isdir(path) else None
    if method == "ours" and images:
        return lambda: video.read_frame_folder(images, video.FrameSampling(frames=frames), SIZE).frames
    if method == "ours":
        return lambda: video.read_video(path, video.FrameSampling(frames=frames), SIZE).frames
    if method == "ours 10s clip":  # the sequential path: every frame of 10 seconds
        return lambda: video.read_video(path, video.FrameSampling(frames=300, start=300.0, end=310.0), SIZE).frames
    if method == "decode all" and images:
        from PIL import Image

        def pillow_all():
            for image in images:
                with Image.open(image) as img:
                    img.load()
            return len(images)

        return pillow_all
    if method == "decode all":
        def pyav_all():
            with av.open(path) as container:
                stream = container.streams.video[0]
                stream.thread_type = "AUTO"
                return sum(1 for _ in container.decode(stream))

        return pyav_all
    if method == "decord":
        import decord

        def decord_read():
            reader = decord.VideoReader(path, ctx=decord.cpu(0), width=SIZE, height=SIZE)
            batch = reader.get_batch(uniform_indices(len(reader), frames)).asnumpy()
            return torch.from_numpy(batch).permute(0, 3, 1, 2)

        return decord_read
    if method == "torchcodec":
        from torchcodec.decoders import VideoDecoder

        def torchcodec_read():
            decoder = VideoDecoder(path, dimension_order="NHWC")
            batch = decoder.get_frames_at(uniform_indices(decoder.metadata.num_frames, frames)).data
            return resize_frames(np.asarray(batch), SIZE)

        return torchcodec_read
    raise ValueError(f"unknown method {method!r}")


def _rss_now_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def _worker(method: str, path: str, frames: int, thread_type: str | None) -> dict:
    import resource

    from storm_lightning.data import video

    if thread_type:
        video._THREAD_TYPE = thread_type
    result = {}
    try:
        read = _reader(method, path, frames) if method != "imports only" else None
        before = _rss_now_mb()
        if read is not None:
            times = []
            for _ in range(3):
                start = time.perf_counter()
                read()
                times.append(time.perf_counter() - start)
                if times[0] > 5:
                    break
            result = {"cold": times[0], "warm": min(times[1:]) if len(times) > 1 else None}
    except ImportError as e:
        return {"skip": f"not importable ({e.name})"}
    except Exception as e:  # noqa: BLE001 - reported in the table
        return {"skip": f"{type(e).__name__}: {' '.join(str(e).split())[:70]}"}
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {**result, "peak_rss_mb": peak, "over_imports_mb": peak - before}


def run_worker(method: str, path: str, frames: int, thread_type: str | None = None) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", method, path, str(frames)]
    if thread_type:
        cmd += ["--thread-type", thread_type]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=WORKER_TIMEOUT)
    except subprocess.TimeoutExpired:
        return {"skip": f"over {WORKER_TIMEOUT} s"}
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        return {"skip": f"exit {proc.returncode}: {proc.stderr.strip().splitlines()[-1:]}"}
    return json.loads(lines[-1])


# --- the tables ----------------------------------------------------------------------------------------------


def _importable(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def _seconds(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def _row(video: str, frames, method: str, result: dict, note: str = "") -> str:
    if "skip" in result:
        return f"| {video} | {frames} | {method} | - | - | - | - | {result['skip']} |"
    return (f"| {video} | {frames} | {method} | {_seconds(result.get('cold'))} | {_seconds(result.get('warm'))} "
            f"| {result['peak_rss_mb']:.0f} | {result['over_imports_mb']:.0f} | {note} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a small set for a smoke run (< 1 minute)")
    parser.add_argument("--out", default=os.path.join(tempfile.gettempdir(), "storm_bench_decode"),
                        help="where generated videos are cached")
    parser.add_argument("--worker", nargs=3, metavar=("METHOD", "PATH", "FRAMES"), help=argparse.SUPPRESS)
    parser.add_argument("--thread-type", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        method, path, frames = args.worker
        print(json.dumps(_worker(method, path, int(frames), args.thread_type)))
        return

    videos = generate(args.out, args.quick)
    if args.quick:  # the smoke run: the mkv (no frame count) and the frame folder
        videos = {name: path for name, path in videos.items() if not name.endswith("mp4")}
    others = [m for m in ("decord", "torchcodec") if _importable(m)]
    if len(others) < 2:
        print(f"not importable, skipped: {', '.join(sorted({'decord', 'torchcodec'} - set(others)))}")
    counts = FRAME_COUNTS[:1] if args.quick else FRAME_COUNTS
    results: dict[tuple[str, int, str], dict] = {}

    print(f"\nN frames resized to {SIZE}x{SIZE}: seconds of the read, peak RSS of the whole process (MB)\n")
    print("| video | N | reader | cold s | warm s | peak RSS | over imports | note |")
    print("|---|---|---|---|---|---|---|---|")
    print(_row("-", "-", "imports only", run_worker("imports only", next(iter(videos.values())), 0)), flush=True)
    for name, path in videos.items():
        everything = run_worker("decode all", path, 0)
        print(_row(name, "all", "decode all", everything, "every frame decoded, none kept"), flush=True)
        for count in counts:
            for method in ["ours"] + ([] if os.path.isdir(path) else others):
                results[name, count, method] = run_worker(method, path, count)
                print(_row(name, count, method, results[name, count, method]), flush=True)

    if args.quick:
        _datamodule_table({name: path for name, path in videos.items() if name.endswith("mkv")}, args.out)
        return
    long_mkv = videos["10min 640x360 mkv"]
    print(f"\ndecoder threading (video._THREAD_TYPE) on {os.path.basename(long_mkv)}, warm seconds\n")
    print("| thread type | 32 frames (seek path) | 10 s clip, 300 frames (sequential path) |")
    print("|---|---|---|")
    for thread_type in ("AUTO", "FRAME", "SLICE", "NONE"):
        sparse = run_worker("ours", long_mkv, 32, thread_type)
        dense = run_worker("ours 10s clip", long_mkv, 300, thread_type)
        print(f"| {thread_type} | {_seconds(sparse.get('warm'))} | {_seconds(dense.get('warm'))} |", flush=True)
    _check_targets(results, others)
    _datamodule_table(videos, args.out)


def _shard_of(video: str, path: str, out: str) -> str:
    """A shard of SHARD_SAMPLES samples, each a question about ``path`` (a video file or a frame folder)."""
    import io
    import json
    import tarfile

    from storm_lightning.data.video import frame_files

    shard = os.path.join(out, "shard_" + video.replace(" ", "_") + ".tar")
    if os.path.exists(shard):
        return shard
    meta = json.dumps({"conversations": [{"from": "human", "value": "<video>\nWhat happens?"},
                                         {"from": "gpt", "value": "The texture pans."}], "fps": 1.0}).encode()
    if os.path.isdir(path):
        entries = {f"frame-{i:06d}.jpg": f for i, f in enumerate(frame_files(path))}
    else:
        entries = {os.path.splitext(path)[1].lstrip("."): path}
    with tarfile.open(shard + ".partial", "w") as tar:
        for n in range(SHARD_SAMPLES):
            info = tarfile.TarInfo(f"{n:06d}.json")
            info.size = len(meta)
            tar.addfile(info, io.BytesIO(meta))
            for ext, file in entries.items():
                tar.add(file, arcname=f"{n:06d}.{ext}")
    os.replace(shard + ".partial", shard)
    return shard


def _datamodule_rate(shard: str, frames: int, size: int) -> dict:
    """Samples per second of the training loader (2 workers) over a shard, after its first batch."""
    from storm_lightning.data import ShardSource, StormDataModule

    dm = StormDataModule([ShardSource("v", shard, frames_per_clip=frames)], tokenizer_path=os.path.join(
        ROOT, "data_shards/tokenizer"), image_size=size, batch_size=1, num_workers=2, shuffle_buffer=0)
    batches = iter(dm.train_dataloader())
    next(batches)  # workers started, first sample read
    start, count = time.perf_counter(), 0
    for _ in range(2 * SHARD_SAMPLES):
        count += len(next(batches))
    return {"samples_per_s": count / (time.perf_counter() - start)}


def _datamodule_table(videos: dict[str, str], out: str) -> None:
    print(f"\ndata module, 2 workers, 32 frames at {SIZE} px, batches of 1 (samples/s after the first batch)\n")
    print("| shard of | samples/s |")
    print("|---|---|")
    bundled = os.path.join(ROOT, "data_shards/train/video32-000000.tar")
    rows = [("bundled 32-frame 64 px clips (at 64 px)", bundled, 64)]
    rows += [(name, _shard_of(name, path, out), SIZE) for name, path in videos.items()]
    for name, shard, size in rows:
        rate = _datamodule_rate(shard, 32, size)
        print(f"| {name} | {rate['samples_per_s']:.2f} |", flush=True)


def _check_targets(results: dict, others: list[str]) -> None:
    def warm(key):
        return results[key].get("warm") or results[key].get("cold") or float("nan")

    print("\ntargets (warm reads)")
    ours = results["10min 640x360 mkv", 32, "ours"]
    print(f"- 32 frames of the 10-minute mkv in < 1 s: {warm(('10min 640x360 mkv', 32, 'ours')) < 1}; "
          f"< 600 MB peak RSS: {ours.get('peak_rss_mb', 1e9) < 600} "
          f"({ours.get('peak_rss_mb', float('nan')):.0f} MB; "
          f"{ours.get('over_imports_mb', float('nan')):.0f} MB over imports)")
    for other in others:
        slower = [f"{video} N={count}" for (video, count, method), r in results.items()
                  if method == other and "skip" not in r
                  and warm((video, count, "ours")) >= warm((video, count, other))]
        print(f"- faster than {other} on every video: {not slower}"
              + (f" (not on {', '.join(slower)})" if slower else ""))
    for count in FRAME_COUNTS:
        short, long = (results[video, count, "ours"] for video in ("10min 640x360 mkv", "20min 640x360 mkv"))
        growth = long["peak_rss_mb"] / short["peak_rss_mb"] - 1
        print(f"- peak RSS within 10% when the length doubles (N={count}): {abs(growth) <= 0.1} "
              f"({short['peak_rss_mb']:.0f} -> {long['peak_rss_mb']:.0f} MB, {growth:+.1%}; over imports "
              f"{short['over_imports_mb']:.0f} -> {long['over_imports_mb']:.0f} MB)")


if __name__ == "__main__":
    main()
