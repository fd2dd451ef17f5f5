"""A raw shard sample -> a model-ready ``Sample``: validate the record, decode its medium, tokenize.

The medium of a sample is at most one of: an image entry (``jpg``, ``png``, ...), a video file entry
(``mp4``, ``mkv``, ``webm``, ...) or a frame-folder video (entries ``frame-000000.jpg``,
``frame-000001.jpg``, ... in name order, ``docs/data.md``). Videos are read by
``storm_lightning.data.video`` (seeking, bounded memory); the record's ``start``/``end`` bound the clip,
and a clip that ``storm-shards convert --frames`` already sampled carries the source video's
``frame_indices``/``timestamps``, which replace the clip's own.

Any problem raises (``BadRecord``, ``VideoReadError``, ...): the stream skips and counts the sample.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from storm_lightning.data.media import IMAGE_EXTS, VIDEO_EXTS, decode_image
from storm_lightning.data.records import BadRecord, parse_record, validate_record
from storm_lightning.data.shards import RawSample, TarMember, entry_bytes
from storm_lightning.data.video import FrameSampling, ReadLimits, read_frame_folder, read_video
from storm_lightning.tokenizer import (
    IGNORE_INDEX,
    IMAGE_TOKEN,
    VIDEO_TOKEN,
    encode_conversation,
    load_tokenizer,
    max_chars_for,
    media_token_ids,
)

FRAME_PREFIX = "frame-"  # frame-folder entries: <key>.frame-000000.jpg


@dataclass
class Sample:
    """One sample, ready to batch. ``input_ids``/``labels``: (L,), labels -100 except assistant tokens.
    ``pixel_values``: (T, 3, S, S) uint8 (T = 1 for an image) or None. ``frame_indices``/``timestamps``:
    each frame's index in the source video and its time in seconds. ``clip_frames``: frames of the
    source clip (1 for an image, 0 for text). ``skipped``: bad samples of each source met since the
    previous good one (the stream's count, carried to the batch)."""

    key: str
    source: str
    input_ids: Tensor
    labels: Tensor
    pixel_values: Tensor | None = None
    frame_indices: list[int] = field(default_factory=list)
    timestamps: list[float] = field(default_factory=list)
    clip_frames: int = 0
    options: list[str] | None = None
    answer: int | None = None
    category: str | None = None
    duration: str | None = None
    skipped: dict[str, int] = field(default_factory=dict)

    @property
    def frames(self) -> int:
        return 0 if self.pixel_values is None else len(self.pixel_values)


def frame_entries(entries: dict) -> list[str]:
    """A frame-folder sample's entries in frame order: ``frame-<number>.<ext>`` by the number, whether
    zero-padded or not; a number given twice (``frame-3.jpg`` and ``frame-3.png``) is a bad sample."""
    numbered = {}
    for name in entries:
        match = re.fullmatch(rf"{FRAME_PREFIX}(\d+)\.(\w+)", name)
        if match is None:
            continue
        number = int(match.group(1))
        if number in numbered:
            raise BadRecord("duplicate_frame", f"{numbered[number]} and {name}")
        numbered[number] = name
    return [numbered[n] for n in sorted(numbered)]


class _LazyFrames(Sequence):
    """A frame folder's entries, read only when the reader asks for that frame."""

    def __init__(self, entries: list) -> None:
        self.entries = entries

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, i):
        return entry_bytes(self.entries[i])


# image, video and audio formats, read or not (any part of an entry's extension: "jpeg.gz"): a sample
# without a medium storm reads that holds one is not a text sample, and is skipped and counted. Other
# entries (webdataset's .text, .cls, .npy, .msgpack, ... side files) are the sample's own business.
MEDIA_FORMATS = {*IMAGE_EXTS, *VIDEO_EXTS, "gif", "bmp", "tif", "tiff", "heic", "heif", "avif", "jp2", "jpe", "jfif",
                 "jxl", "ico", "apng", "pgm", "ppm", "pbm", "pnm", "tga", "exr", "dng", "mpg", "mpeg", "m4v", "m2v",
                 "mjpeg", "mjpg", "qt", "flv", "f4v", "wmv", "asf", "3gp", "3g2", "ogv", "ogg", "ts", "mts", "m2ts",
                 "vob", "y4m", "h264", "h265", "hevc", "divx", "rm", "rmvb", "mxf", "dv", "wav", "mp3", "flac",
                 "m4a", "aac", "opus"}


@dataclass
class SampleProcessor:
    """Raw shard samples -> ``Sample``. ``frames_per_clip``, when set, replaces every source's (evaluation
    on more frames). ``limits``: what one video read may cost. ``system_prompt``: see ``encode_conversation``."""

    tokenizer_path: str
    image_size: int
    max_length: int
    frames_per_clip: int | None = None
    limits: ReadLimits = field(default_factory=ReadLimits)
    system_prompt: str | None = None
    _tokenizer: object = field(default=None, init=False, repr=False)
    _max_chars: int = field(default=0, init=False, repr=False)

    @property
    def tokenizer(self):
        if self._tokenizer is None:  # loaded lazily, once per worker process
            self._tokenizer = load_tokenizer(self.tokenizer_path)
            self._max_chars = max_chars_for(self._tokenizer, self.max_length)
        return self._tokenizer

    def __call__(self, raw: RawSample, source) -> Sample:
        """``source``: the ``ShardSource`` the sample came from (its name and video sampling)."""
        if raw.problem:
            raise BadRecord(*raw.problem.split(": ", 1))
        if "json" not in raw.entries:
            raise BadRecord("no_json", f"entries {sorted(raw.entries)}")
        tokenizer = self.tokenizer
        meta = parse_record(entry_bytes(raw.entries["json"]))
        images = [e for e in raw.entries if e in IMAGE_EXTS]
        videos = [e for e in raw.entries if e in VIDEO_EXTS]
        frames = frame_entries(raw.entries)
        kinds = bool(images) + bool(videos) + bool(frames)
        if kinds > 1 or len(images) > 1 or len(videos) > 1:
            raise BadRecord("several_media", f"entries {sorted(raw.entries)}: one medium per sample")
        unread = sorted(e for e in raw.entries if set(e.lower().split(".")) & MEDIA_FORMATS)
        if not kinds and unread:  # a .gif, a .jpeg.gz: a question about a picture the model would never see
            raise BadRecord("unsupported_media", f"entries {unread}: media are {', '.join(IMAGE_EXTS + VIDEO_EXTS)} "
                                                 "or a frame folder")
        record = validate_record(meta, has_media=kinds == 1, max_chars=self._max_chars)

        pixel_values, indices, timestamps, clip_frames, placeholder = None, [], [], 0, VIDEO_TOKEN
        if images:
            pixel_values = decode_image(entry_bytes(raw.entries[images[0]]), self.image_size,
                                        self.limits.max_frame_pixels)
            indices, timestamps, clip_frames, placeholder = [0], [0.0], 1, IMAGE_TOKEN
        elif videos or frames:
            sampling = FrameSampling(frames=self.frames_per_clip or source.frames_per_clip,
                                     fps=None if self.frames_per_clip else source.fps,
                                     max_frames=source.max_frames, start=record.start, end=record.end)
            if videos:
                clip = self._read_video(raw.entries[videos[0]], sampling)
            else:
                fps = meta.get("fps", 1.0)  # checked by validate_record
                clip = read_frame_folder(_LazyFrames([raw.entries[e] for e in frames]), sampling, self.image_size,
                                         fps=float(fps), limits=self.limits)
            pixel_values, indices, timestamps, clip_frames = clip.frames, clip.indices, clip.timestamps, clip.total_frames
            indices, timestamps = _source_positions(meta, indices, timestamps)

        conversations = record.conversations
        if pixel_values is not None:
            conversations = [dict(t) for t in conversations]
            first_user = next(t for t in conversations if t["from"] in ("human", "user"))
            if record.placeholders == 0:  # LLaVA convention: the medium goes first
                first_user["value"] = f"{placeholder}\n{first_user['value']}"
            else:  # either placeholder word works for either medium
                for turn in conversations:
                    turn["value"] = turn["value"].replace(IMAGE_TOKEN, placeholder).replace(VIDEO_TOKEN, placeholder)
        ids, labels = encode_conversation(tokenizer, conversations, self.max_length, self.system_prompt)
        if pixel_values is not None and not set(media_token_ids(tokenizer)) & set(ids):
            raise BadRecord("truncated", f"media placeholder cut off by max_length={self.max_length}")
        if all(label == IGNORE_INDEX for label in labels):
            raise BadRecord("truncated", f"no assistant token left within max_length={self.max_length}")
        return Sample(key=raw.key, source=source.name, input_ids=torch.tensor(ids), labels=torch.tensor(labels),
                      pixel_values=pixel_values, frame_indices=indices, timestamps=timestamps,
                      clip_frames=clip_frames, options=record.options, answer=record.answer,
                      category=record.category, duration=record.duration)

    def _read_video(self, entry, sampling: FrameSampling):
        if isinstance(entry, TarMember):  # a large video stays on disk: PyAV reads the parts it needs
            with entry.open() as file:
                return read_video(file, sampling, self.image_size, self.limits)
        return read_video(entry, sampling, self.image_size, self.limits)


def _source_positions(meta: dict, indices: list[int], timestamps: list[float]) -> tuple[list[int], list[float]]:
    """A clip that convert already sampled from a longer video: its frame ``i`` is the source video's
    ``meta["frame_indices"][i]``, at ``meta["timestamps"][i]`` seconds."""
    mapped = []
    for key, own in (("frame_indices", indices), ("timestamps", timestamps)):
        table = meta.get(key)
        if table is None:
            mapped.append(own)
            continue
        valid = (lambda v: isinstance(v, int) and 0 <= v < 2**40) if key == "frame_indices" else (
            lambda v: isinstance(v, (int, float)) and math.isfinite(v) and v >= 0)
        if (not isinstance(table, list) or not all(valid(v) and not isinstance(v, bool) for v in table)
                or max(indices) >= len(table)):
            raise BadRecord("bad_frame_table", f"{key}: not {'indices' if key == 'frame_indices' else 'seconds'} "
                                               f"covering the clip's {max(indices) + 1} frames")
        mapped.append([table[i] for i in indices])
    return [int(i) for i in mapped[0]], [float(t) for t in mapped[1]]
