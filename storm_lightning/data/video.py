"""Read a few frames of a long video with bounded memory and cost, whatever the container.

A read goes through four steps:

1. **Open** the first video stream and check its frame size against :class:`ReadLimits` before decoding.
2. **Index** the stream by demuxing its packets once, without decoding them: every frame's presentation
   timestamp (pts) and every keyframe. This gives the exact frame count and an exact frame index <-> pts map
   also when the container declares no frame count (mkv, webm), for variable frame rates and B-frames.
3. **Sample** frame indices from the frames' timestamps (:class:`FrameSampling`).
4. **Decode** only what the wanted frames need: seek to the keyframe before a wanted frame when that skips
   enough frames, else decode on. Each wanted frame is resized to ``(3, size, size)`` uint8 as soon as it is
   decoded; nothing else is kept. Memory is the kept frames plus the decoder's few reference frames, whatever
   the video's length, but for the index: 24 bytes a frame (2.6 MB for an hour at 30 fps).

"Frame ``i``" always means the ``i``-th frame of a full sequential decode, in presentation order: every packet
decoded in order, packets the decoder rejects skipped (as the ffmpeg command line does). The frames returned
are bit for bit those of that decode, however they were reached (``tests/test_video.py`` checks it).

Rotation: a stream's display matrix (phone videos) is applied, by multiples of 90 degrees, so frames come out
as a player shows them; mirroring in the matrix is ignored.
"""

from __future__ import annotations

import array
import contextlib
import io
import itertools
import math
import os
import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import av
import numpy as np
import torch
from av.video.reformatter import VideoReformatter
from PIL import Image

from storm_lightning.data.media import IMAGE_EXTS, MAX_FRAME_PIXELS, to_rgb, uniform_indices, upright


class VideoReadError(ValueError):
    """The source is not a readable video (no video stream, no frames, corrupt)."""


class VideoTooLarge(VideoReadError):
    """The video's frames, or the frames asked for, are over a :class:`ReadLimits` limit."""


class VideoTooSlow(VideoReadError):
    """The read ran over :attr:`ReadLimits.max_seconds`."""


@dataclass(frozen=True)
class FrameSampling:
    """Which frames of a video to take.

    ``frames``: uniform sampling, this many frames spread over ``[start, end)`` (the centres of equal segments,
    like :func:`~storm_lightning.data.media.uniform_indices`; frames repeat when the range has fewer).
    ``fps``: time-based sampling (LLaVA-Video style), the frame nearest to each of ``start, start + 1/fps, ...``
    up to ``end``; when that is more than ``max_frames`` (default ``frames``), ``max_frames`` uniform frames
    instead. ``start``/``end``: clip bounds in seconds from the first frame; only frames whose time is in
    ``[start, end)`` are candidates.
    """

    frames: int = 32
    fps: float | None = None
    max_frames: int | None = None
    start: float | None = None
    end: float | None = None

    def __post_init__(self):
        if self.frames < 1:
            raise ValueError(f"frames must be >= 1, got {self.frames}")
        if self.fps is not None and not 0 < self.fps < math.inf:
            raise ValueError(f"fps must be > 0 and finite, got {self.fps}")
        for name in ("start", "end"):
            value = getattr(self, name)
            if value is not None and not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number of seconds, got {value}")
        if self.max_frames is not None and self.max_frames < 1:
            raise ValueError(f"max_frames must be >= 1, got {self.max_frames}")
        if self.start is not None and self.end is not None and not self.start < self.end:
            raise ValueError(f"start ({self.start}) must be before end ({self.end})")


@dataclass(frozen=True)
class ReadLimits:
    """A read over any limit raises VideoTooLarge / VideoTooSlow (the data pipeline skips and counts the sample).

    ``max_frame_pixels``: width * height of the decoded stream, checked before decoding anything.
    ``max_frames``: frames kept per sample (repeats included: they are in the returned tensor).
    ``max_seconds``: wall-clock budget per read, checked between packets and decoded frames.
    """

    max_frame_pixels: int = MAX_FRAME_PIXELS
    max_frames: int = 1024
    max_seconds: float | None = None


@dataclass
class Clip:
    """Sampled frames of one video.

    ``frames``: (T, 3, size, size) uint8. ``indices``: each frame's index in the full sequential decode
    (presentation order). ``timestamps``: each frame's time in seconds from the first frame.
    ``total_frames``: frames in the whole video (not only in ``[start, end)``). ``fps``: average frame rate.
    """

    frames: torch.Tensor
    indices: list[int]
    timestamps: list[float]
    total_frames: int
    fps: float


# Scaling: FFmpeg's scaler converts yuv -> rgb24 and resizes in one pass. Its bilinear filter widens with the
# downscale factor (antialiased, like torch's antialias=True); FULL_CHR_H_INT|ACCURATE_RND interpolate chroma
# at full resolution, without which chroma edges come out blurred (mean abs diff to an antialiased resize of
# the source rgb 7-9 instead of 0.7-2.5). Measured per frame on 2 cores (textured frame, single thread),
# against full-size rgb24 + torch bilinear antialias (media.resize_frames):
#     640x360 -> 224: 0.46 ms vs 1.5 ms     640x360 -> 64: 0.16 ms vs 0.86 ms
#    1280x720 -> 224: 0.90 ms vs 5.2 ms    1280x720 -> 64: 0.32 ms vs 4.3 ms
# with a mean abs difference to torch's result of ~1 on smooth content, and closer than torch's to an
# antialiased resize of the original rgb (0.7-2.5 vs 1.2-2.8): 3-16x faster at the same quality.
# The flags are libswscale's SWS_* values, passed as one int: PyAV 16 names them (Interpolation.FULL_CHR_H_INT
# ...), PyAV 15 (the version lmms-eval 0.7.3 pins) takes the same int. PyAV 16 also takes the scaler's thread
# count (one: frames are scaled one at a time, the decoder has the threads).
_SWS_BILINEAR, _SWS_FULL_CHR_H_INT, _SWS_ACCURATE_RND = 0x2, 0x2000, 0x40000
_SCALE_FLAGS = _SWS_BILINEAR | _SWS_FULL_CHR_H_INT | _SWS_ACCURATE_RND
_SCALER_THREADS = {"threads": 1} if int(av.__version__.split(".")[0]) >= 16 else {}

# Decoder threading: "AUTO" (frame + slice threads, FFmpeg's thread count). Measured on 2 cores, best of 5 reads
# (wall s / CPU s), the seek path (32 frames over the video) and the sequential path (all 300 frames of 10 s):
#                          AUTO         FRAME        SLICE        NONE
#   640x360 mkv, seek     0.65 / 0.94  0.68 / 0.96  0.76 / 0.92  0.70 / 0.70
#   640x360 mkv, seq      0.27 / 0.33  0.27 / 0.34  0.34 / 0.36  0.32 / 0.32
#  1280x720 mp4, seek     1.11 / 1.76  1.16 / 1.81  1.05 / 1.61  1.52 / 1.52
#  1280x720 mp4, seq      0.45 / 0.70  0.52 / 0.77  0.61 / 0.74  0.66 / 0.65
# Frame threading does add latency per seek (a seek and its keyframe: 1.75 ms with AUTO, 1.24 ms without) and
# ~35% CPU on the seek path at 360p, but AUTO is the fastest or near it in wall time on both paths, by 15-30%
# on the sequential path and at 720p. (`python benchmarks/bench_decode.py` re-measures the first column pair.)
_THREAD_TYPE = "AUTO"

# Seek to the keyframe before a wanted frame when that skips over this many frames, else decode on. A seek
# plus decoding its keyframe costs what 3-4 frames of sequential decoding do (640x360 H.264: 1.2-1.75 ms vs
# 0.4-0.5 ms a frame); reading 128-600 frames of the 10-minute video took the same time, within noise, for
# any threshold from 0 to 64.
_SEEK_MIN_SKIP = 4


def read_video(source, sampling: FrameSampling, size: int, limits: ReadLimits = ReadLimits()) -> Clip:
    """Decode the frames ``sampling`` picks from a video, each resized to ``(3, size, size)`` uint8.

    ``source``: the video's bytes, a path (str / os.PathLike), or a seekable binary file object holding just
    the video (e.g. ``tarfile.TarFile.extractfile``: a slice of a tar file). Raises :class:`VideoReadError`
    (or its subclasses :class:`VideoTooLarge` / :class:`VideoTooSlow`) with a one-line message for anything
    it cannot read.
    """
    try:
        return _read_video(_Opener(source), sampling, size, limits)
    except av.error.FFmpegError as e:  # from opening or demuxing; a packet the decoder rejects is skipped
        raise VideoReadError(f"not a readable video: {_one_line(e)}") from None


def _read_video(opener, sampling: FrameSampling, size: int, limits: ReadLimits) -> Clip:
    _check_count(sampling, limits)
    deadline = _Deadline(limits.max_seconds)
    with opener.open() as container:
        stream = _video_stream(container, limits)
        index = _index(container, stream, deadline)
        wanted = _sample(index.times, sampling, index.fps)
        slots = _slots(wanted)
        frames = np.empty((len(wanted), 3, size, size), dtype=np.uint8)  # all a read keeps
        scaler = VideoReformatter()
        for i, frame in _decode(opener, container, index, sorted(slots), limits, deadline):
            frames[slots[i]] = _rgb(frame, size, scaler, limits)
    return Clip(
        frames=torch.from_numpy(frames),
        indices=wanted,
        timestamps=[float(index.times[i]) for i in wanted],
        total_frames=len(index.pts),
        fps=index.fps,
    )


def read_frame_folder(
    images: Sequence[bytes | str | os.PathLike | Image.Image],
    sampling: FrameSampling,
    size: int,
    fps: float = 1.0,
    limits: ReadLimits = ReadLimits(),
) -> Clip:
    """A video stored as extracted frames (already in name order), frame ``i`` at ``i / fps`` seconds.

    Only the sampled images are decoded. JPEGs are decoded at a reduced scale (``Image.draft``, a DCT-domain
    1/2, 1/4 or 1/8 downscale) while that stays at least twice ``size``, then resized with Pillow's
    antialiased bilinear (media.resize_frames's filter), so a 1080p frame for a 224 target costs a fraction of a
    full decode.
    """
    if not fps > 0:
        raise ValueError(f"fps must be > 0, got {fps}")
    if not images:
        raise VideoReadError("frame folder has no images")
    _check_count(sampling, limits)
    deadline = _Deadline(limits.max_seconds)
    times = np.arange(len(images)) / fps
    wanted = _sample(times, sampling, fps)
    frames = np.empty((len(wanted), 3, size, size), dtype=np.uint8)
    for i, slots in sorted(_slots(wanted).items()):
        deadline.check()
        frames[slots] = _read_image(images[i], size, limits)
    return Clip(
        frames=torch.from_numpy(frames),
        indices=wanted,
        timestamps=[float(times[i]) for i in wanted],
        total_frames=len(images),
        fps=float(fps),
    )


def frame_files(folder: str | os.PathLike) -> list[str]:
    """The images of a frame folder in natural name order (``frame_2.jpg`` before ``frame_10.jpg``);
    hidden files (macOS's ``._frame_0001.jpg`` beside each frame, ``.DS_Store``) are not frames."""
    names = [n for n in os.listdir(folder) if n.rpartition(".")[2].lower() in IMAGE_EXTS and not n.startswith(".")]
    if not names:
        raise VideoReadError(f"{folder}: a folder without frames ({', '.join(IMAGE_EXTS)})")
    natural = lambda name: [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]  # noqa: E731
    return [os.path.join(folder, n) for n in sorted(names, key=natural)]


def read_path(path: str | os.PathLike, sampling: FrameSampling, size: int, limits: ReadLimits = ReadLimits(),
              folder_fps: float = 1.0) -> Clip:
    """A video file, or a folder of its frames (``frame_files``, frame ``i`` at ``i / folder_fps`` s)."""
    if os.path.isdir(path):
        return read_frame_folder(frame_files(path), sampling, size, fps=folder_fps, limits=limits)
    return read_video(path, sampling, size, limits)


def _check_count(sampling: FrameSampling, limits: ReadLimits) -> None:
    """Before anything is read or sampled: the most frames ``sampling`` can return (fps steps are capped
    at ``max_frames``, default ``frames``) within the limit."""
    most = (sampling.max_frames or sampling.frames) if sampling.fps is not None else sampling.frames
    if most > limits.max_frames:
        raise VideoTooLarge(f"{most} frames asked for, over the limit of {limits.max_frames}")


def _slots(wanted: list[int]) -> dict[int, list[int]]:
    """Frame index -> the positions it fills in the clip (several when frames repeat)."""
    slots: dict[int, list[int]] = {}
    for slot, i in enumerate(wanted):
        slots.setdefault(i, []).append(slot)
    return slots


# --- opening -------------------------------------------------------------------------------------------------


class _Deadline:
    def __init__(self, seconds: float | None):
        self.seconds = seconds
        self.at = None if seconds is None else time.monotonic() + seconds

    def check(self) -> None:
        if self.at is not None and time.monotonic() > self.at:
            raise VideoTooSlow(f"read took over {self.seconds} s")


class _Opener:
    """Opens the source; again when a read must restart decoding from the very first packet (seeking there
    is unreliable: demuxers land on the first keyframe, after frames a sequential decode outputs)."""

    def __init__(self, source):
        if isinstance(source, (bytes, bytearray, memoryview)):
            self.source = bytes(source)
        elif isinstance(source, (str, os.PathLike)):
            self.source = os.fspath(source)
        elif hasattr(source, "read") and hasattr(source, "seek"):
            self.source = source
        else:
            raise TypeError(f"source must be bytes, a path or a seekable binary file, not {type(source).__name__}")

    def open(self) -> av.container.InputContainer:
        if isinstance(self.source, bytes):
            target = io.BytesIO(self.source)
        else:
            target = self.source
            if not isinstance(target, str):
                target.seek(0)  # FFmpeg reads and seeks the file object by absolute offsets
        return av.open(target, mode="r")


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split())


def _video_stream(container, limits: ReadLimits):
    if not container.streams.video:
        raise VideoReadError("no video stream")
    stream = container.streams.video[0]
    width, height = stream.codec_context.width, stream.codec_context.height
    if width * height > limits.max_frame_pixels:
        raise VideoTooLarge(f"{width}x{height} frames, over the limit of {limits.max_frame_pixels} pixels")
    stream.thread_type = _THREAD_TYPE
    return stream


# --- index ---------------------------------------------------------------------------------------------------


@dataclass
class _Index:
    """Frame ``i`` of the sequential decode has timestamp ``pts[i]`` (stream time base).

    ``pts[:head]`` are the frames the decoder outputs up to and including the first one at or after the first
    keyframe, recorded by decoding them: usually just that keyframe, but a stream cut before a keyframe
    outputs corrupt or dropped frames there, whose count no packet tells. Frames ``head - 1`` onwards are
    found by pts after a seek (``pts[head - 1:]`` is sorted and unique); earlier ones only by decoding from
    the first packet and counting. ``keyframes``: sorted pts of the keyframes from the first one, where a
    decode can start.
    """

    pts: np.ndarray
    head: int
    keyframes: np.ndarray
    times: np.ndarray  # (N,) float64 seconds from the first frame
    fps: float

    def index_of(self, pts: int) -> int | None:
        """The frame with this pts, or None for a frame before ``head - 1`` (not found by pts)."""
        tail = self.pts[self.head - 1 :]
        if pts < tail[0]:
            return None
        i = int(np.searchsorted(tail, pts))
        if i == len(tail) or tail[i] != pts:
            raise VideoReadError(f"the decoder gave a frame (pts {pts}) the container does not list")
        return self.head - 1 + i

    def seek_point(self, i: int) -> int | None:
        """Number of the last keyframe at or before frame ``i`` (by pts); None when only a decode from the
        first packet reaches frame ``i``."""
        if i < self.head - 1:
            return None
        key = int(np.searchsorted(self.keyframes, self.pts[i], side="right")) - 1
        return key if key >= 0 else None

    def frames_skipped(self, key: int, position: int) -> int:
        """Frames a seek to keyframe number ``key`` saves decoding, when the last frame output is ``position``."""
        tail = self.pts[self.head - 1 :]
        return self.head - 1 + int(np.searchsorted(tail, self.keyframes[key])) - position - 1


def _index(container, stream, deadline: _Deadline) -> _Index:
    """Demux every packet of ``stream`` once; decode only the head (see :class:`_Index`).

    Packets the decoder makes no frame of are left out: empty ones (the final flush packet, dropped frames
    in avi) and those the demuxer flags to discard (before an mp4 edit list's start). Measured on 2 cores, for
    a 640x360 H.264 video: 0.08 s for 10 minutes (18000 packets) in mp4 or mkv, 0.15 s for 20 minutes,
    against 3.1 s to decode every frame of the 10 minutes.
    """
    packet_pts = array.array("q")  # 8 bytes a frame
    keyframes: list[int] = []
    head: list[int] = []
    first_key = None  # pts of the first keyframe, in decode order
    in_head = True
    for packet in container.demux(stream):
        deadline.check()
        listed = packet.size > 0 and not packet.is_discard
        if listed and packet.pts is None:
            raise VideoReadError("video packets carry no timestamps (a raw elementary stream?)")
        if listed and packet.is_keyframe:
            first_key = packet.pts if first_key is None else first_key
            keyframes.append(packet.pts)
        if listed and first_key is not None:
            packet_pts.append(packet.pts)
        if in_head:
            for frame in _decode_packet(packet):
                if frame.pts is None:
                    raise VideoReadError("decoded frames carry no timestamps")
                head.append(frame.pts)
                if first_key is not None and frame.pts >= first_key:
                    in_head = False
                    break
    if not head:
        raise VideoReadError("video has no frames")
    tail = np.frombuffer(packet_pts, dtype=np.int64)
    tail = np.sort(tail[tail > head[-1]])
    if np.any(tail[1:] == tail[:-1]):
        raise VideoReadError("video frames share timestamps")
    pts = np.concatenate([np.array(head, dtype=np.int64), tail])
    times = (pts - pts.min()) * float(stream.time_base)
    span = float(times.max())
    fps = (len(pts) - 1) / span if span > 0 else float(stream.average_rate or 1)
    return _Index(pts=pts, head=len(head), keyframes=np.sort(np.array(keyframes, dtype=np.int64)), times=times, fps=fps)


def _decode_packet(packet) -> list:
    """Frames from one packet; a packet the decoder rejects gives none (it resyncs at the next keyframe)."""
    try:
        return packet.decode()
    except av.error.InvalidDataError:
        return []


# --- sampling ------------------------------------------------------------------------------------------------


def _sample(times: np.ndarray, sampling: FrameSampling, fps: float) -> list[int]:
    """Frame indices (may repeat) for ``sampling`` over frames at ``times`` (seconds, (N,)).

    Without ``sampling.end``, the range ends half a frame after the last frame, so ``fps`` steps stop at it.
    """
    start = sampling.start if sampling.start is not None else 0.0
    end = sampling.end if sampling.end is not None else float(times.max()) + 0.5 / fps
    inside = np.flatnonzero((times >= start) & (times < end))  # in frame order
    if not len(inside):
        raise VideoReadError(f"no frames in [{start}, {end}) s (the video lasts {times.max() + 1 / fps:.2f} s)")
    cap = sampling.max_frames or sampling.frames
    # the number of fps steps before any is made: an `end` far past the video (or a timestamp that lies)
    # must not allocate seconds x fps of them
    if sampling.fps is not None and (end - start) * sampling.fps <= cap + 1:
        steps = start + np.arange(int(np.ceil((end - start) * sampling.fps))) / sampling.fps
        steps = steps[steps < end]
        if len(steps) <= cap:
            by_time = inside[np.argsort(times[inside], kind="stable")]
            return by_time[_nearest(times[by_time], steps)].tolist()
    count = cap if sampling.fps is not None else sampling.frames
    return inside[uniform_indices(len(inside), count)].tolist()


def _nearest(times: np.ndarray, steps: np.ndarray) -> np.ndarray:
    """Position in ``times`` (sorted) of the time nearest each of ``steps`` (the earlier one on a tie)."""
    after = np.searchsorted(times, steps)
    left, right = np.clip(after - 1, 0, len(times) - 1), np.clip(after, 0, len(times) - 1)
    return np.where(steps - times[left] <= times[right] - steps, left, right)


# --- decoding ------------------------------------------------------------------------------------------------


def _decode(opener, container, index: _Index, wanted: list[int], limits: ReadLimits, deadline: _Deadline):
    """Yield ``(i, frame)`` for each of the ``wanted`` frame indices (sorted, unique), in that order.

    One decode session (an iterator of ``(frame index, frame)``) runs forward; a new one starts at the
    keyframe before the next wanted frame when that skips over ``_SEEK_MIN_SKIP`` frames.
    """
    keep = set(index.pts[wanted].tolist())
    session = None
    position = -1  # index of the last frame the current session output
    with contextlib.ExitStack() as reopened:
        for w in wanted:
            key = index.seek_point(w)
            if session is None or (key is not None and index.frames_skipped(key, position) > _SEEK_MIN_SKIP):
                container, session = _session(opener, container, index, key, keep, limits, deadline, reopened)
            for position, frame in session:
                if position >= w:
                    break
            if position != w:
                raise VideoReadError(f"the decoder gave no frame {w} (the container's timestamps are wrong)")
            yield w, frame


def _session(opener, container, index: _Index, key: int | None, keep: set[int], limits, deadline, reopened):
    """Start decoding at keyframe number ``key`` (frames identified by pts; ``keep``: the wanted frames' pts,
    see _frames), or at the first packet (frames counted) when ``key`` is None, in a reopened container.
    Returns the container in use and the session."""
    stream = container.streams.video[0]
    needed = None if key is None else int(index.keyframes[key])
    while key is not None:
        container.seek(int(index.keyframes[key]), backward=True, any_frame=False, stream=stream)
        packets = container.demux(stream)
        first = next(packets, None)
        if first is None or first.pts is None or first.pts <= needed:
            packets = itertools.chain([first] if first else [], packets)
            return container, _by_pts(_frames(packets, deadline, keep), index)
        # Landed past the keyframe needed: demuxers that index by dts (avi, mpeg-ts) do when a GOP is shorter
        # than the B-frame delay. Aim at the keyframe before.
        key = key - 1 if key > 0 else None
    container = reopened.enter_context(opener.open())
    stream = _video_stream(container, limits)
    return container, enumerate(_frames(container.demux(stream), deadline))


def _frames(packets, deadline: _Deadline, keep: set[int] | None = None) -> Iterator[av.VideoFrame]:
    """Decode ``packets``. With ``keep`` (pts), the decoder skips the frames not in it that no other frame
    references (non-reference B-frames), which it would decode only for us to drop them."""
    for packet in packets:
        deadline.check()
        if keep is not None:
            packet.stream.codec_context.skip_frame = "DEFAULT" if packet.pts in keep else "NONREF"
        yield from _decode_packet(packet)


def _by_pts(frames: Iterator[av.VideoFrame], index: _Index) -> Iterator[tuple[int, av.VideoFrame]]:
    """Frames after a seek, with their index; frames before the head's last are skipped (see _Index)."""
    for frame in frames:
        i = index.index_of(frame.pts)
        if i is not None:
            yield i, frame


def _rgb(frame: av.VideoFrame, size: int, scaler: VideoReformatter, limits: ReadLimits) -> np.ndarray:
    """A decoded frame -> (3, size, size) uint8 (a view), rotated as displayed."""
    if frame.width * frame.height > limits.max_frame_pixels:
        raise VideoTooLarge(f"{frame.width}x{frame.height} frame, over the limit of {limits.max_frame_pixels} pixels")
    rgb = scaler.reformat(
        frame, width=size, height=size, format="rgb24", interpolation=_SCALE_FLAGS,
        src_color_range=frame.color_range, **_SCALER_THREADS,
    ).to_ndarray()
    return np.rot90(rgb, round(frame.rotation / 90) % 4).transpose(2, 0, 1)


# --- frame folders -------------------------------------------------------------------------------------------


def _read_image(image: bytes | str | os.PathLike | Image.Image, size: int, limits: ReadLimits) -> np.ndarray:
    """One extracted frame (its bytes, its path or an opened PIL image) -> (3, size, size) uint8.

    Pillow's bilinear resize widens its filter with the downscale factor: the same antialiased bilinear as
    media.resize_frames (torch's antialias=True is a port of it), without torch's thread pool per image.
    """
    try:
        opened = isinstance(image, Image.Image)  # the caller's: not closed here
        with contextlib.nullcontext(image) if opened else Image.open(
                io.BytesIO(image) if isinstance(image, (bytes, bytearray)) else image) as img:
            if img.width * img.height > limits.max_frame_pixels:
                limit = limits.max_frame_pixels
                raise VideoTooLarge(f"{img.width}x{img.height} image, over the limit of {limit} pixels")
            if img.format == "JPEG" and not opened:
                img.draft("RGB", (2 * size, 2 * size))
            rgb = Image.fromarray(to_rgb(upright(img))).resize((size, size), Image.Resampling.BILINEAR)
    except (OSError, Image.DecompressionBombError) as e:
        raise VideoReadError(f"not a readable image: {_one_line(e)}") from None
    return np.asarray(rgb).transpose(2, 0, 1)
