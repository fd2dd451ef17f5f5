"""Bad data never kills a run: every case from docs/reliability.md, with its outcome."""

import io
import json

import numpy as np
import pytest
from PIL import Image

from storm_lightning.data import ShardSource
from storm_lightning.data.samples import SampleProcessor
from storm_lightning.data.stream import ShardStream
from storm_lightning.data.synth import encode_mp4
from tests.conftest import TOKENIZER
from tests.test_data import conv, png, write_tar


def image_bytes(size=(20, 20), mode="RGB", fmt="PNG"):
    buf = io.BytesIO()
    if mode == "I;16":
        Image.fromarray((np.arange(size[0] * size[1]).reshape(size[::-1]) * 50).astype(np.uint16)).save(buf, fmt)
    else:
        Image.new(mode, size).save(buf, format=fmt)
    return buf.getvalue()


def mp4(frames: int) -> bytes:
    return encode_mp4([np.full((16, 16, 3), 10 * i, np.uint8) for i in range(frames)])


VIDEO_Q = conv("<video>\nWhat moves?", "the circle.")
CASES = {  # name: (entries, kept?)
    "zero-byte image": ({"json": conv(), "png": b""}, False),
    "zero-byte video": ({"json": VIDEO_Q, "mp4": b""}, False),
    "random-bytes image": ({"json": conv(), "jpg": np.random.default_rng(0).bytes(3000)}, False),
    "random-bytes video": ({"json": VIDEO_Q, "mp4": np.random.default_rng(1).bytes(3000)}, False),
    "video shorter than frames_per_clip (3 < 8)": ({"json": VIDEO_Q, "mp4": mp4(3)}, True),
    "1-frame video": ({"json": VIDEO_Q, "mp4": mp4(1)}, True),
    "video bytes named .jpg": ({"json": conv(), "jpg": mp4(4)}, False),
    "image bytes named .png but JPEG inside": ({"json": conv(), "png": image_bytes(fmt="JPEG")}, True),
    "missing json": ({"png": png()}, False),
    "malformed json": ({"json": b'{"conversations": [', "png": png()}, False),
    "json without conversations": ({"json": b'{"caption": "x"}'}, False),
    "conversation without assistant turn": ({"json": json.dumps(
        {"conversations": [{"from": "human", "value": "hi"}]}).encode()}, False),
    "unknown role": ({"json": json.dumps(
        {"conversations": [{"from": "robot", "value": "hi"}, {"from": "gpt", "value": "yo"}]}).encode()}, False),
    "non-UTF-8 json": ({"json": "{\"conversations\": [{\"from\": \"human\", \"value\": \"caf\xe9\"}]}".encode(
        "latin-1")}, False),
    "over-long prompt (answer cut off by max_length)": ({"json": conv("word " * 3000, "yes.")}, False),
    "placeholder without media": ({"json": conv()}, False),
    "two placeholders, one image": ({"json": conv("<image> and <image>"), "png": png()}, False),
    "grayscale image": ({"json": conv(), "png": image_bytes(mode="L")}, True),
    "RGBA image": ({"json": conv(), "png": image_bytes(mode="RGBA")}, True),
    "16-bit image": ({"json": conv(), "png": image_bytes(mode="I;16")}, True),
    "1x1 image": ({"json": conv(), "png": image_bytes(size=(1, 1))}, True),
    "3000x7 image": ({"json": conv(), "png": image_bytes(size=(3000, 7))}, True),
    "text-only sample": ({"json": conv("What is 1 plus 1?", "2.")}, True),
}


def stream_of(shard: str, **kwargs) -> ShardStream:
    return ShardStream([ShardSource("s", shard, frames_per_clip=8)], [[shard]], SampleProcessor(TOKENIZER, 16, 512),
                       infinite=False, **kwargs)


@pytest.mark.parametrize("case", list(CASES))
def test_fault_case(tmp_path, case):
    entries, kept = CASES[case]
    # the bad sample sits between two good ones: the stream goes on after it
    shard = write_tar(tmp_path / "f-000000.tar", {"a_good": {"json": conv(), "png": png()}, "b_case": entries,
                                                  "c_good": {"json": conv(), "png": png()}})
    stream = stream_of(shard)
    keys = [s.key for s in stream]
    assert keys == (["a_good", "b_case", "c_good"] if kept else ["a_good", "c_good"])
    assert stream.bad["s"] == (0 if kept else 1)


def test_a_source_over_its_skip_rate_stops_the_run_naming_the_shard(tmp_path):
    samples = {f"s{i:02d}": ({"json": conv(), "png": png()} if i % 2 else {"json": conv(), "png": b"junk"})
               for i in range(30)}
    shard = write_tar(tmp_path / "half-bad-000000.tar", samples)
    stream = stream_of(shard, max_skip_rate=0.2, skip_rate_after=10)
    with pytest.raises(RuntimeError, match=r"source 's': 6 of 11 samples skipped \(55%\), over "
                                           r"data.max_skip_rate=0.2.*half-bad-000000.tar"):
        list(stream)
    assert len(list(stream_of(shard, max_skip_rate=0.6, skip_rate_after=10))) == 15  # under the threshold: goes on
