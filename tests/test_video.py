"""storm_lightning.data.video: exact frames, bounded memory and bounded cost on every container.

The videos are generated here with PyAV: 64x64, a few hundred frames, a gradient that moves every frame and
the frame number drawn as 9 black/white blocks along the bottom (read back by ``_counter``).
"""

from __future__ import annotations

import io
import os
import re
import tarfile
from fractions import Fraction

import av
import numpy as np
import pytest
import torch
from av.video.reformatter import VideoReformatter
from PIL import Image

from storm_lightning.data import video as V
from storm_lightning.data.media import resize_frames, uniform_indices

SIDE = 64  # frame width and height
FRAMES = 300
BLOCK = 7  # width of a counter bit
HAS_VP9 = "libvpx-vp9" in av.codecs_available
# writing a display matrix needs PyAV 16 (reading one, frame.rotation, works on 15: .ci/run's eval environment)
CAN_ROTATE = hasattr(av.video.stream.VideoStream, "set_display_rotation")


# --- generating videos ---------------------------------------------------------------------------------------


def _image(i: int, side: int = SIDE) -> np.ndarray:
    """Frame ``i``: (side, side, 3) uint8, a moving gradient with ``i`` in binary along the bottom."""
    y, x = np.mgrid[0:side, 0:side]
    img = np.stack([(x * 4 + i * 7) % 256, (y * 4 + i * 3) % 256, (x + y + i * 5) % 256], axis=-1).astype(np.uint8)
    for bit in range(9):
        img[side - 12 :, bit * BLOCK : (bit + 1) * BLOCK] = 255 if (i >> bit) & 1 else 0
    return img


def _counter(frame: np.ndarray) -> int:
    """The frame number drawn by ``_image``, from a (3, SIDE, SIDE) frame."""
    blocks = [frame[:, SIDE - 8 : SIDE - 4, bit * BLOCK + 2 : bit * BLOCK + 5] for bit in range(9)]
    return sum(1 << bit for bit, block in enumerate(blocks) if block.mean() > 128)


def _encode(path, codec="libx264", frames=FRAMES, gop=30, bframes=2, options=None, pts=None, time_base=None,
            rotation=None, pix_fmt="yuv420p", side=SIDE):
    """Write a video; ``pts``: each frame's timestamp in ``time_base`` (default: 30 fps from 0)."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=30, options=options or {})
        stream.width = stream.height = side
        stream.pix_fmt = pix_fmt
        stream.codec_context.gop_size = gop
        stream.codec_context.max_b_frames = bframes
        stream.codec_context.time_base = time_base or Fraction(1, 30)
        if rotation is not None:
            stream.set_display_rotation(rotation)
        for i in range(frames):
            frame = av.VideoFrame.from_ndarray(_image(i, side), format="rgb24")
            frame.pts, frame.time_base = (pts[i] if pts is not None else i), stream.codec_context.time_base
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return str(path)


def _remux(src, dst, skip: int = 0):
    """Copy the video stream of ``src`` into ``dst``'s container, leaving out its first ``skip`` packets."""
    with av.open(src) as source, av.open(str(dst), "w") as target:
        stream = target.add_stream_from_template(source.streams.video[0])
        for n, packet in enumerate(source.demux(source.streams.video[0])):
            if n >= skip and packet.dts is not None:
                packet.stream = stream
                target.mux(packet)
    return str(dst)


def _packets(path) -> list[tuple[int | None, bool]]:
    """(pts, keyframe) of every non-empty packet, in decode order."""
    with av.open(path) as container:
        return [(p.pts, p.is_keyframe) for p in container.demux(video=0) if p.size]


def _reference(path, size: int) -> list[np.ndarray]:
    """Every frame of a full sequential decode (packets the decoder rejects skipped), converted as the
    reader converts them: the frames read_video must return bit for bit."""
    scaler, frames = VideoReformatter(), []
    with av.open(path) as container:
        for packet in container.demux(video=0):
            try:
                decoded = packet.decode()
            except av.error.InvalidDataError:
                continue
            frames += [V._rgb(frame, size, scaler, V.ReadLimits()).copy() for frame in decoded]
    return frames


VFR_PTS = np.cumsum([0] + [int(g) for g in np.random.default_rng(0).choice([10, 33, 34, 50, 120], FRAMES - 1)])


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    """name -> path of every test video."""
    d = tmp_path_factory.mktemp("videos")
    ms = Fraction(1, 1000)
    out = {
        "mp4 h264 b-frames": _encode(d / "a.mp4", bframes=3),
        "mkv h264": _encode(d / "a.mkv"),
        "mov h264": _encode(d / "a.mov"),
        "mp4 open gop": _encode(d / "open.mp4", options={"x264-params": "open-gop=1"}),
        "avi mpeg4 b-frames": _encode(d / "a.avi", codec="mpeg4"),
        "avi mjpeg": _encode(d / "j.avi", codec="mjpeg", pix_fmt="yuvj420p", bframes=0),
        "mp4 vfr": _encode(d / "vfr.mp4", pts=VFR_PTS, time_base=ms),
        "mkv vfr": _encode(d / "vfr.mkv", pts=VFR_PTS, time_base=ms),
        "mp4 start 1.5 s": _encode(d / "late.mp4", pts=[1500 + 33 * i for i in range(FRAMES)], time_base=ms),
        "mkv start 1.5 s": _encode(d / "late.mkv", pts=[1500 + 33 * i for i in range(FRAMES)], time_base=ms),
        # GOPs shorter than the B-frame delay: these demuxers index by dts and a seek to a keyframe's pts
        # lands on the next keyframe
        "avi mpeg4 gop 3": _encode(d / "short.avi", codec="mpeg4", gop=3),
        "ts h264 gop 3": _encode(d / "short.ts", gop=3, bframes=3, options={"x264-params": "scenecut=0"}),
    }
    if CAN_ROTATE:
        out["mp4 rotated 90"] = _encode(d / "rot.mp4", rotation=90)
    if HAS_VP9:
        out["webm vp9"] = _encode(d / "a.webm", codec="libvpx-vp9", bframes=0,
                                  options={"deadline": "realtime", "cpu-used": "8"})
    # cut before a keyframe: H.264 drops the frames before it, mpeg4 outputs extra corrupt ones, VP9 rejects
    # the packets (errors the reader skips, as the ffmpeg command line does)
    out["mkv h264 cut mid-gop"] = _remux(out["mp4 h264 b-frames"], d / "cut.mkv", skip=10)
    out["avi mpeg4 cut mid-gop"] = _remux(out["avi mpeg4 b-frames"], d / "cut.avi", skip=10)
    if HAS_VP9:
        out["webm vp9 cut mid-gop"] = _remux(out["webm vp9"], d / "cut.webm", skip=10)
    return out


CUT = ("mkv h264 cut mid-gop", "avi mpeg4 cut mid-gop") + (("webm vp9 cut mid-gop",) if HAS_VP9 else ())
NAMES = ["mp4 h264 b-frames", "mkv h264", "mov h264", "mp4 open gop", "avi mpeg4 b-frames", "avi mjpeg", "mp4 vfr",
         "mkv vfr", "mp4 start 1.5 s", "mkv start 1.5 s",
         pytest.param("mp4 rotated 90", marks=pytest.mark.skipif(not CAN_ROTATE, reason="needs PyAV 16 to write")),
         "avi mpeg4 gop 3", "ts h264 gop 3",
         pytest.param("webm vp9", marks=pytest.mark.skipif(not HAS_VP9, reason="PyAV's FFmpeg has no libvpx-vp9")),
         "mkv h264 cut mid-gop", "avi mpeg4 cut mid-gop",
         pytest.param("webm vp9 cut mid-gop", marks=pytest.mark.skipif(not HAS_VP9, reason="no libvpx-vp9"))]


# --- exact frames --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_frames_are_those_of_a_full_sequential_decode(videos, name):
    """Sparse (seeks), dense (sequential), all frames, at native size (no scaling) and downscaled."""
    path = videos[name]
    for size in (SIDE, 24):
        reference = _reference(path, size)
        for count in (3, 7, 40, len(reference)):
            clip = V.read_video(path, V.FrameSampling(frames=count), size)
            assert clip.total_frames == len(reference)
            assert clip.indices == uniform_indices(len(reference), count)
            assert clip.frames.shape == (count, 3, size, size) and clip.frames.dtype == torch.uint8
            for i, frame in zip(clip.indices, clip.frames.numpy()):
                np.testing.assert_array_equal(frame, reference[i], err_msg=f"frame {i} of {count}")
    if name not in CUT:  # the frame numbers drawn in the frames are the indices (rotated back first)
        clip = V.read_video(path, V.FrameSampling(frames=16), SIDE)
        turns = 3 if "rotated" in name else 0
        assert [_counter(np.rot90(f, turns, axes=(1, 2))) for f in clip.frames.numpy()] == clip.indices


def test_the_generated_videos_have_what_they_test(videos):
    """B-frames, open GOPs, no declared frame count in mkv/webm, a start time, and cut streams whose packet
    count differs from the decoded frame count."""
    def reordered(packets):
        return any(a[0] > b[0] for a, b in zip(packets, packets[1:]))

    assert reordered(_packets(videos["mp4 h264 b-frames"])) and reordered(_packets(videos["avi mpeg4 b-frames"]))
    # open GOP: a keyframe after the first is followed, in decode order, by frames shown before it
    packets = _packets(videos["mp4 open gop"])
    leading = [packets[n + 1][0] < pts for n, (pts, key) in enumerate(packets[:-1]) if key and n > 0]
    assert any(leading)
    assert not any(packets[n + 1][0] < pts for n, (pts, key) in enumerate(_packets(videos["mp4 h264 b-frames"])[:-1])
                   if key and n > 0)
    for name in ["mkv h264", "mkv vfr"] + (["webm vp9"] if HAS_VP9 else []):
        with av.open(videos[name]) as container:
            assert container.streams.video[0].frames == 0
    with av.open(videos["mkv start 1.5 s"]) as container:
        stream = container.streams.video[0]
        assert stream.start_time * stream.time_base == Fraction(3, 2)
    for name in CUT:
        assert len(_packets(videos[name])) != len(_reference(videos[name], 8))
        assert not _packets(videos[name])[0][1]  # starts on a non-keyframe
    for name in ("avi mpeg4 gop 3", "ts h264 gop 3"):
        with av.open(videos[name]) as container:
            stream = container.streams.video[0]
            key = [pts for pts, key in _packets(videos[name]) if key][5]
            container.seek(key, backward=True, any_frame=False, stream=stream)
            assert next(container.demux(stream)).pts > key


@pytest.mark.parametrize("gop", [10, 400])
def test_seek_and_sequential_paths_agree(tmp_path, monkeypatch, gop):
    """Keyframes closer than the wanted frames' gaps: one decode session per wanted frame (seeks); farther:
    a single sequential session. Forcing either path gives the same frames."""
    path = _encode(tmp_path / f"gop{gop}.mkv", gop=gop, bframes=3, options={"x264-params": "scenecut=0"})
    sessions = []
    session = V._session

    def counted(*args, **kwargs):
        sessions.append(args[3])  # the keyframe number, None for the start
        return session(*args, **kwargs)

    monkeypatch.setattr(V, "_session", counted)
    sampling = V.FrameSampling(frames=8)  # gaps of 37-38 frames
    clip = V.read_video(path, sampling, 32)
    assert len(sessions) == (8 if gop == 10 else 1)
    for never_seek in (True, False):
        sessions.clear()
        monkeypatch.setattr(V, "_SEEK_MIN_SKIP", 10**9 if never_seek else 0)
        again = V.read_video(path, sampling, 32)
        assert torch.equal(again.frames, clip.frames)
        assert len(sessions) == (1 if never_seek or gop == 400 else 8)
    reference = _reference(path, 32)
    assert all(np.array_equal(f, reference[i]) for i, f in zip(clip.indices, clip.frames.numpy()))


@pytest.mark.parametrize("name", ["avi mpeg4 gop 3", "ts h264 gop 3"])
def test_a_seek_landing_past_its_keyframe_aims_earlier(videos, monkeypatch, name):
    """The demuxer lands on the keyframe after the one aimed at: the reader aims at the one before instead
    of missing frames, and never falls back to reopening and decoding from the start."""
    path = videos[name]
    opened = []
    video_stream = V._video_stream
    monkeypatch.setattr(V, "_video_stream", lambda *a: opened.append(1) or video_stream(*a))
    clip = V.read_video(path, V.FrameSampling(frames=12), SIDE)
    assert len(opened) == 1
    reference = _reference(path, SIDE)
    assert all(np.array_equal(f, reference[i]) for i, f in zip(clip.indices, clip.frames.numpy()))


def test_open_gop_frames_shown_before_a_keyframe(videos, monkeypatch):
    """Open GOP: the frames shown just before a keyframe are decoded after it, referencing the previous GOP.
    Read alone (a seek to the keyframe before them, not to the one just after), they are still exact."""
    path = videos["mp4 open gop"]
    reference = _reference(path, SIDE)
    keys = [i for i, (_, key) in enumerate(sorted(_packets(path))) if key][1:]  # presentation-order indices
    for key in keys:
        monkeypatch.setattr(V, "_sample", lambda times, sampling, fps: [key - 1])
        clip = V.read_video(path, V.FrameSampling(frames=1), SIDE)
        assert clip.indices == [key - 1]
        np.testing.assert_array_equal(clip.frames[0].numpy(), reference[key - 1])


def test_frames_before_the_first_keyframe_are_decoded_from_the_start(videos, monkeypatch):
    """mpeg4 cut mid-GOP outputs frames before its first keyframe that no seek reaches: the reader counts
    them from the first packet, in a reopened container."""
    path = videos["avi mpeg4 cut mid-gop"]
    reference = _reference(path, SIDE)
    sessions = []
    session = V._session
    monkeypatch.setattr(V, "_session", lambda *a, **k: sessions.append(a[3]) or session(*a, **k))
    clip = V.read_video(path, V.FrameSampling(frames=len(reference) // 3), SIDE)
    assert sessions[0] is None and clip.indices[0] < 5
    assert all(np.array_equal(f, reference[i]) for i, f in zip(clip.indices, clip.frames.numpy()))


@pytest.mark.skipif(not CAN_ROTATE, reason="writing a rotated video needs PyAV 16")
def test_rotation_is_applied_as_displayed(tmp_path):
    """A display matrix rotating 90 degrees counterclockwise: the frames come out rotated so; the encoded
    pixels are the same as without it."""
    plain = V.read_video(_encode(tmp_path / "plain.mp4"), V.FrameSampling(frames=5), 24).frames
    for degrees, turns in ((90, 1), (-90, 3), (180, 2)):
        rotated = V.read_video(_encode(tmp_path / f"r{degrees}.mp4", rotation=degrees), V.FrameSampling(frames=5), 24)
        assert torch.equal(rotated.frames, torch.rot90(plain, turns, dims=(2, 3)))


# --- sources, counts, sampling -------------------------------------------------------------------------------


def test_sources_bytes_path_and_file_objects(videos, tmp_path):
    path = videos["mkv h264"]
    expected = V.read_video(path, V.FrameSampling(frames=6), 16).frames
    data = open(path, "rb").read()
    with tarfile.open(tmp_path / "shard.tar", "w") as tar:
        tar.add(videos["mp4 h264 b-frames"], arcname="first.mp4")
        tar.add(path, arcname="sample.mkv")
    with tarfile.open(tmp_path / "shard.tar") as tar:
        member = tar.extractfile("sample.mkv")
        from_tar = V.read_video(member, V.FrameSampling(frames=6), 16).frames
    for source in (data, bytearray(data), memoryview(data), path, os.fspath(path), io.BytesIO(data)):
        assert torch.equal(V.read_video(source, V.FrameSampling(frames=6), 16).frames, expected)
    assert torch.equal(from_tar, expected)
    with pytest.raises(TypeError):
        V.read_video(12, V.FrameSampling(), 16)


def test_timestamps_fps_and_counts(videos):
    clip = V.read_video(videos["mkv h264"], V.FrameSampling(frames=10), 16)
    assert clip.total_frames == FRAMES and clip.fps == pytest.approx(30, rel=1e-3)
    assert clip.timestamps == pytest.approx([i / 30 for i in clip.indices], abs=1e-3)
    for name in ("mp4 vfr", "mkv vfr"):  # variable frame rate: the timestamps are the frames' own
        clip = V.read_video(videos[name], V.FrameSampling(frames=50), 16)
        assert clip.timestamps == pytest.approx([VFR_PTS[i] / 1000 for i in clip.indices], abs=1e-3)
        assert clip.fps == pytest.approx((FRAMES - 1) / (VFR_PTS[-1] / 1000), rel=1e-3)
    for name in ("mp4 start 1.5 s", "mkv start 1.5 s"):  # times count from the first frame, not from 0
        clip = V.read_video(videos[name], V.FrameSampling(frames=4, start=1.0, end=2.0), 16)
        inside = [i for i in range(FRAMES) if 1.0 <= i * 0.033 < 2.0]
        assert clip.indices == [inside[j] for j in uniform_indices(len(inside), 4)]
        assert clip.timestamps == pytest.approx([i * 0.033 for i in clip.indices], abs=1e-6)


def test_uniform_within_bounds(videos):
    clip = V.read_video(videos["mp4 vfr"], V.FrameSampling(frames=6, start=2.0, end=5.0), 16)
    inside = [i for i, t in enumerate(VFR_PTS / 1000) if 2.0 <= t < 5.0]
    assert clip.indices == [inside[j] for j in uniform_indices(len(inside), 6)]
    assert all(2.0 <= t < 5.0 for t in clip.timestamps)


def test_fps_sampling(videos):
    path = videos["mkv h264"]  # 10 s at 30 fps
    clip = V.read_video(path, V.FrameSampling(fps=2, max_frames=100), 16)
    assert clip.indices == [15 * k for k in range(20)]
    assert clip.timestamps == pytest.approx([k / 2 for k in range(20)], abs=1e-3)
    bounded = V.read_video(path, V.FrameSampling(fps=1, start=2.5, end=6.0, max_frames=100), 16)
    assert bounded.indices == [75, 105, 135, 165]
    capped = V.read_video(path, V.FrameSampling(fps=10, max_frames=8), 16)  # 100 steps > 8: uniform 8
    assert capped.indices == uniform_indices(FRAMES, 8)
    assert len(V.read_video(path, V.FrameSampling(fps=10, frames=5), 16).indices) == 5  # cap defaults to frames
    # variable frame rate: the frame nearest each step
    vfr = V.read_video(videos["mp4 vfr"], V.FrameSampling(fps=1, max_frames=100), 16)
    times = VFR_PTS / 1000
    assert vfr.indices == [int(np.argmin(np.abs(times - k))) for k in range(len(vfr.indices))]


def test_short_videos_repeat_frames(videos):
    clip = V.read_video(videos["mkv h264"], V.FrameSampling(frames=400), 16)
    assert len(clip.indices) == 400 and len(set(clip.indices)) == FRAMES
    repeats = [n for n in range(1, 400) if clip.indices[n] == clip.indices[n - 1]]
    assert repeats and all(torch.equal(clip.frames[n], clip.frames[n - 1]) for n in repeats)


def test_bad_sampling_is_rejected(videos):
    for bad in (dict(frames=0), dict(fps=0), dict(max_frames=0), dict(start=3, end=2)):
        with pytest.raises(ValueError):
            V.FrameSampling(**bad)
    with pytest.raises(V.VideoReadError, match="no frames in"):
        V.read_video(videos["mkv h264"], V.FrameSampling(start=20, end=30), 16)


# --- memory and cost -----------------------------------------------------------------------------------------


PEAK_GROWTH = """
import re, sys
import av
from storm_lightning.data import video as V

def status(key):
    with open("/proc/self/status") as f:
        return int(re.search(key + r":\\s+(\\d+)", f.read()).group(1)) * 1024

def keep_all(path):  # what media.decode_video did with an mkv: every frame decoded and kept
    with av.open(path) as container:
        return [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]

method, path = sys.argv[1:]
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak (VmHWM) to the current resident size
before = status("VmRSS")
kept = V.read_video(path, V.FrameSampling(frames=8), 32) if method == "ours" else keep_all(path)
print(status("VmHWM") - before)
"""


def _peak_growth(method: str, path) -> int:
    """Bytes the resident set peaks above its size before the read, in a fresh interpreter (a fork would
    reuse its parent's freed heap and hide part of the growth)."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", PEAK_GROWTH, method, str(path)], capture_output=True, text=True,
                          check=True, timeout=120)
    return int(proc.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux")
def test_memory_does_not_grow_with_length(tmp_path, monkeypatch):
    """Twice the frames in an mkv (no declared count): the same peak memory (growth under a tenth of the
    extra frames' size), one decoded frame converted per wanted frame. The same measure shows a reader
    that keeps every decoded frame (what media.decode_video did for mkv) growing by their size."""
    side, frames = 384, 100
    short = _encode(tmp_path / "short.mkv", frames=frames, side=side, gop=50)
    long = _encode(tmp_path / "long.mkv", frames=2 * frames, side=side, gop=50)
    ours = {path: _peak_growth("ours", path) for path in (short, long)}
    old = {path: _peak_growth("keep_all", path) for path in (short, long)}
    extra = frames * side * side * 3  # the extra frames at full size, in rgb
    print(f"peak growth MB: ours {[m / 2**20 for m in ours.values()]}, old {[m / 2**20 for m in old.values()]}")
    assert ours[long] - ours[short] < 0.1 * extra, ours
    assert old[long] - old[short] > 0.8 * extra, old

    converted = []
    rgb = V._rgb
    monkeypatch.setattr(V, "_rgb", lambda *a: converted.append(1) or rgb(*a))
    V.read_video(long, V.FrameSampling(frames=8), 32)
    assert len(converted) == 8


def test_scaler_quality_matches_torch_antialias(tmp_path):
    """FFmpeg's scaler (one pass, yuv -> rgb at the target size) against full-size rgb + torch's antialiased
    bilinear: close; a naive bilinear without antialias is not, on fine detail."""
    side = 300
    stripes = np.zeros((side, side, 3), np.uint8)
    stripes[::3] = 255  # one-pixel lines: antialiased, they average out; naive bilinear aliases them
    stripes[:, :, 2] = np.arange(side)[None, :] * 255 // side
    frame = av.VideoFrame.from_ndarray(stripes, format="rgb24").reformat(format="yuv444p")
    full = frame.to_ndarray(format="rgb24")
    for size in (24, 64):
        ours = V._rgb(frame, size, VideoReformatter(), V.ReadLimits()).astype(int)
        torch_aa = resize_frames(full[None], size)[0].numpy().astype(int)
        x = torch.from_numpy(full).permute(2, 0, 1)[None].float()
        naive = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear")[0].round().numpy()
        assert np.abs(ours - torch_aa).mean() < 2
        assert np.abs(naive - torch_aa).mean() > 20


def test_limits(videos, monkeypatch):
    path = videos["mkv h264"]
    decoded = []
    decode_packet = V._decode_packet
    monkeypatch.setattr(V, "_decode_packet", lambda p: decoded.append(1) or decode_packet(p))
    with pytest.raises(V.VideoTooLarge, match="64x64"):
        V.read_video(path, V.FrameSampling(), 16, V.ReadLimits(max_frame_pixels=SIDE * SIDE - 1))
    assert not decoded  # refused before decoding anything
    with pytest.raises(V.VideoTooLarge, match="frames"):
        V.read_video(path, V.FrameSampling(frames=20), 16, V.ReadLimits(max_frames=19))
    with pytest.raises(V.VideoTooSlow):
        V.read_video(path, V.FrameSampling(), 16, V.ReadLimits(max_seconds=1e-6))
    assert len(V.read_video(path, V.FrameSampling(frames=20), 16, V.ReadLimits(max_frames=20)).indices) == 20


def _no_video_sources(tmp_path):
    with av.open(str(tmp_path / "audio.wav"), "w") as container:
        stream = container.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
        frame.sample_rate = 8000
        for packet in (*stream.encode(frame), *stream.encode()):
            container.mux(packet)
    with av.open(str(tmp_path / "empty.mkv"), "w") as container:
        stream = container.add_stream("libx264", rate=30)
        stream.width = stream.height = SIDE
        stream.pix_fmt = "yuv420p"
    raw = _encode(tmp_path / "raw.h264", frames=10)
    return {"random bytes": os.urandom(5000), "text": b"hello, not a video\n" * 50,
            "audio only": str(tmp_path / "audio.wav"), "no frames": str(tmp_path / "empty.mkv"),
            "raw h264 (no timestamps)": raw, "truncated": open(_encode(tmp_path / "t.mp4"), "rb").read()[:2000]}


def test_unreadable_sources_raise_one_line_video_read_errors(tmp_path):
    for name, source in _no_video_sources(tmp_path).items():
        with pytest.raises(V.VideoReadError) as error:
            V.read_video(source, V.FrameSampling(frames=4), 16)
        message = str(error.value)
        assert "\n" not in message and message, name
        assert error.value.__context__ is None or error.value.__suppress_context__, name  # no PyAV traceback


# --- frame folders -------------------------------------------------------------------------------------------


def _jpeg(img: np.ndarray, quality: int = 95) -> bytes:
    out = io.BytesIO()
    Image.fromarray(img).save(out, format="JPEG", quality=quality)
    return out.getvalue()


def test_frame_folder_decodes_only_the_sampled_images(tmp_path):
    images = [_jpeg(_image(i)) for i in range(40)]
    wanted = uniform_indices(40, 5)
    sparse = [image if i in wanted else b"not decoded" for i, image in enumerate(images)]
    clip = V.read_frame_folder(sparse, V.FrameSampling(frames=5), SIDE, fps=2.0)
    assert clip.indices == wanted and clip.total_frames == 40 and clip.fps == 2.0
    assert clip.timestamps == [i / 2 for i in wanted]
    assert [_counter(f) for f in clip.frames.numpy()] == wanted
    paths = []
    for i in range(40):
        paths.append(tmp_path / f"{i:04d}.png")
        Image.fromarray(_image(i)).save(paths[-1])
    from_paths = V.read_frame_folder(paths, V.FrameSampling(fps=1, start=5, end=10), 32, fps=2.0)
    assert from_paths.indices == [10, 12, 14, 16, 18]
    expected = resize_frames(np.stack([_image(i) for i in from_paths.indices]), 32)
    assert (from_paths.frames.int() - expected.int()).abs().max() <= 1  # png: lossless, antialiased bilinear


def test_frame_folder_draft_decodes_large_jpegs_small(monkeypatch):
    """A 1024x768 JPEG for a 64 target decodes at 1/4 scale (256x192), with about the full decode's result."""
    y, x = np.mgrid[0:768, 0:1024]
    img = np.stack([x % 256, y % 256, (x // 4 + y // 4) % 256], -1).astype(np.uint8)
    data = _jpeg(img)
    sizes = []
    to_rgb = V.to_rgb
    monkeypatch.setattr(V, "to_rgb", lambda im: sizes.append(im.size) or to_rgb(im))
    clip = V.read_frame_folder([data], V.FrameSampling(frames=1), 64)
    assert sizes == [(256, 192)]
    full = resize_frames(np.array(Image.open(io.BytesIO(data)).convert("RGB"))[None], 64)
    assert (clip.frames.int() - full.int()).abs().float().mean() < 3


def test_frame_folder_errors():
    with pytest.raises(V.VideoReadError):
        V.read_frame_folder([b"garbage"], V.FrameSampling(frames=1), 16)
    with pytest.raises(V.VideoReadError):
        V.read_frame_folder([], V.FrameSampling(frames=1), 16)
    with pytest.raises(V.VideoTooLarge):
        V.read_frame_folder([_jpeg(_image(0))], V.FrameSampling(), 16, limits=V.ReadLimits(max_frame_pixels=100))
    with pytest.raises(V.VideoTooLarge):
        V.read_frame_folder([_jpeg(_image(0))] * 3, V.FrameSampling(frames=4), 16, limits=V.ReadLimits(max_frames=3))
