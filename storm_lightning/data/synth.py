"""Synthetic shards with temporal questions: the data bundled in ``data_shards/``.

Everything is drawn with numpy from one seed, videos are encoded with PyAV (H.264 mp4, single thread)
and tars are written with fixed metadata, so the same seed gives byte-identical shards.

Sources (``{split}/{source}-{shard:06d}.tar``):

- ``text``: arithmetic and successor questions, no media.
- ``image``: one coloured shape in one quadrant; caption, colour, shape and position questions.
- ``video32`` / ``video128``: 32- / 128-frame clips (8 fps) with multiple-choice questions that need
  time: ``direction`` (which way a shape moves), ``order`` (the colour of the first of four shapes to
  appear), ``flash`` (colour of a one-frame full-screen flash), ``count`` (how many times a shape
  appears). Part of the training clips carry a caption instead of a question.

Multiple-choice samples store ``options``, ``answer`` (index) and ``category`` next to the conversation.
Options come in a fixed order per category: the four directions, counts 1-4, four shapes, the four
quadrants, or all eight colours (chance 25 % or 12.5 %).
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np

from storm_lightning.data.records import multiple_choice_prompt
from storm_lightning.tokenizer import OPTION_LETTERS, ROLES

COLORS = {
    "red": (230, 40, 40), "green": (40, 200, 60), "blue": (50, 90, 240), "yellow": (240, 220, 40),
    "magenta": (220, 50, 220), "cyan": (40, 220, 230), "white": (245, 245, 245), "orange": (250, 140, 20),
}
SHAPES = ("circle", "square", "triangle")
DIRECTIONS = ("left", "right", "up", "down")
QUADRANTS = ("top left", "top right", "bottom left", "bottom right")  # where image_frame puts the shape
BACKGROUND = (25, 25, 25)


def _draw(canvas: np.ndarray, shape: str, color: tuple, cy: float, cx: float, radius: float) -> None:
    size = canvas.shape[0]
    yy, xx = np.mgrid[0:size, 0:size]
    dy, dx = yy - cy, xx - cx
    if shape == "circle":
        mask = dy**2 + dx**2 <= radius**2
    elif shape == "square":
        mask = (np.abs(dy) <= radius * 0.85) & (np.abs(dx) <= radius * 0.85)
    else:  # triangle pointing up
        mask = (dy <= radius * 0.8) & (dy >= -radius) & (np.abs(dx) <= (dy + radius) * 0.6)
    canvas[mask] = color


def _blank(size: int) -> np.ndarray:
    frame = np.empty((size, size, 3), np.uint8)
    frame[:] = BACKGROUND
    return frame


def _pick(rng: np.random.Generator, items, k: int | None = None):
    items = list(items)
    if k is None:
        return items[rng.integers(len(items))]
    return [items[i] for i in rng.choice(len(items), size=k, replace=False)]


def _mc_sample(question: str, options: list[str], correct: str, category: str, tag: str) -> dict:
    """Options come in a fixed order per category, so the letter names the answer (a 2-layer LLM does
    not learn to look an answer up among shuffled options in a few thousand examples)."""
    answer = options.index(correct)
    return {
        "conversations": [
            {"from": "human", "value": f"{tag}\n{multiple_choice_prompt(question, options)}"},
            {"from": "gpt", "value": OPTION_LETTERS[answer]},
        ],
        "options": options, "answer": int(answer), "category": category,
    }


def _caption_sample(tag: str, prompt: str, caption: str) -> dict:
    return {"conversations": [{"from": "human", "value": f"{tag}\n{prompt}"}, {"from": "gpt", "value": caption}]}


# ---- videos ---------------------------------------------------------------------------------------------

def video_direction(rng, frames: int, size: int):
    color, shape, direction = _pick(rng, COLORS), _pick(rng, SHAPES), _pick(rng, DIRECTIONS)
    radius = size / 8
    lo, hi = radius + 1, size - radius - 1
    across = rng.uniform(lo, hi)
    path = np.linspace(lo, hi, frames)
    if direction in ("left", "up"):
        path = path[::-1]
    clip = []
    for t in range(frames):
        frame = _blank(size)
        cy, cx = (across, path[t]) if direction in ("left", "right") else (path[t], across)
        _draw(frame, shape, COLORS[color], cy, cx, radius)
        clip.append(frame)
    what = f"the {color} {shape}"
    return clip, dict(question=f"In which direction does {what} move?", options=list(DIRECTIONS),
                      correct=direction, category="direction", caption=f"{what} moves {direction}.")


def video_order(rng, frames: int, size: int):
    colors, shapes = _pick(rng, COLORS, 4), [_pick(rng, SHAPES) for _ in range(4)]  # 4 distinct colours
    names = [f"the {c} {s}" for c, s in zip(colors, shapes)]
    starts = np.sort(rng.choice(np.arange(0, int(frames * 0.8)), size=4, replace=False))
    cells = [(0.27, 0.27), (0.27, 0.73), (0.73, 0.27), (0.73, 0.73)]
    spots = [cells[i] for i in rng.permutation(4)]
    clip = []
    for t in range(frames):
        frame = _blank(size)
        for i in range(4):
            if t >= starts[i]:
                _draw(frame, shapes[i], COLORS[colors[i]], spots[i][0] * size, spots[i][1] * size, size / 9)
        clip.append(frame)
    return clip, dict(question="Which colour is the shape that appears first?", options=list(COLORS),
                      correct=colors[0], category="order",
                      caption=f"{names[0]} appears, then {names[1]}, then {names[2]}, then {names[3]}.")


def video_flash(rng, frames: int, size: int):
    colors = _pick(rng, COLORS, 4)
    flash_at = int(rng.integers(1, frames - 1))
    shape = _pick(rng, SHAPES)
    clip = []
    for t in range(frames):
        frame = _blank(size)
        if t == flash_at:
            frame[:] = COLORS[colors[0]]
        _draw(frame, shape, (128, 128, 128), size / 2, size / 2, size / 6)
        clip.append(frame)
    return clip, dict(question="What colour is the flash?", options=list(COLORS), correct=colors[0], category="flash",
                      caption=f"a grey {shape} stays still and the screen flashes {colors[0]} once.")


def video_count(rng, frames: int, size: int):
    color, shape = _pick(rng, COLORS), _pick(rng, SHAPES)
    times = int(rng.integers(1, 5))
    # `times` visible intervals separated by gaps, each at least frames/16 long
    segments = 2 * times + 1
    cuts = np.sort(rng.choice(np.arange(1, 16), size=segments - 1, replace=False))
    bounds = np.concatenate([[0], cuts, [16]]) * frames // 16
    visible = np.zeros(frames, bool)
    for i in range(times):
        visible[bounds[2 * i + 1]: bounds[2 * i + 2]] = True
    cy, cx = rng.uniform(size * 0.3, size * 0.7, size=2)
    clip = []
    for t in range(frames):
        frame = _blank(size)
        if visible[t]:
            _draw(frame, shape, COLORS[color], cy, cx, size / 7)
        clip.append(frame)
    what = f"the {color} {shape}"
    word = {1: "once", 2: "twice", 3: "three times", 4: "four times"}[times]
    return clip, dict(question=f"How many times does {what} appear?", options=["1", "2", "3", "4"],
                      correct=str(times), category="count", caption=f"{what} appears {word}.")


VIDEO_TASKS = (video_direction, video_order, video_flash, video_count)


def encode_mp4(clip: list[np.ndarray], fps: int = 8) -> bytes:
    import av

    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height = clip[0].shape[1], clip[0].shape[0]
        stream.pix_fmt = "yuv420p"
        # x264's macroblock-tree rate control is not bit-exact from run to run (about 1 clip in 50 came
        # out different, sometimes in decoded pixels); without it the same seed gives the same bytes
        stream.options = {"crf": "20", "preset": "veryfast", "threads": "1", "x264-params": "no-mbtree=1"}
        for frame in clip:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


def video_sample(rng, frames: int, size: int, caption_prob: float) -> tuple[dict, dict]:
    clip, task = VIDEO_TASKS[rng.integers(len(VIDEO_TASKS))](rng, frames, size)
    if rng.random() < caption_prob:
        meta = _caption_sample("<video>", "Describe what happens in the video.", task["caption"])
    else:
        meta = _mc_sample(task["question"], task["options"], task["correct"], task["category"], "<video>")
    return meta, {"mp4": encode_mp4(clip)}


# ---- images and text ------------------------------------------------------------------------------------

def image_frame(rng, size: int) -> tuple[np.ndarray, str, str, str]:
    """One coloured shape in one quadrant: (frame (size, size, 3) uint8, colour, shape, quadrant)."""
    color, shape = _pick(rng, COLORS), _pick(rng, SHAPES)
    vert, horiz = _pick(rng, ("top", "bottom")), _pick(rng, ("left", "right"))
    frame = _blank(size)
    # a quarter of the frame wide: at 64 px and 8-px patches a shape a sixth of the frame wide took the
    # tiny default more than 1000 image-only steps to tell apart (docs/results.md)
    cy = size * (0.3 if vert == "top" else 0.7) + rng.uniform(-2, 2)
    cx = size * (0.3 if horiz == "left" else 0.7) + rng.uniform(-2, 2)
    _draw(frame, shape, COLORS[color], cy, cx, size / 4)
    return frame, color, shape, f"{vert} {horiz}"


def image_sample(rng, size: int, caption_prob: float) -> tuple[dict, dict]:
    from PIL import Image

    frame, color, shape, quadrant = image_frame(rng, size)
    buf = io.BytesIO()
    Image.fromarray(frame).save(buf, format="PNG", optimize=True)
    roll = rng.random()
    question = (roll - caption_prob) / (1 - caption_prob)  # in [0, 1) when not a caption: a third each
    if roll < caption_prob:
        meta = _caption_sample("<image>", "Describe the image.", f"a {color} {shape} in the {quadrant}.")
    elif question < 1 / 3:
        meta = _mc_sample(f"What colour is the {shape}?", list(COLORS), color, "image_color", "<image>")
    elif question < 2 / 3:
        meta = _mc_sample("What shape is in the image?", list(SHAPES) + ["star"], shape, "image_shape", "<image>")
    else:  # direction in a clip needs position first, and nothing else here asks where (docs/results.md)
        meta = _mc_sample(f"Where is the {shape}?", list(QUADRANTS), quadrant, "image_position", "<image>")
    return meta, {"png": buf.getvalue()}


def text_sample(rng) -> tuple[dict, dict]:
    a, b = (int(x) for x in rng.integers(0, 50, size=2))
    if rng.random() < 0.5:
        q, ans = f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}."
    else:
        q, ans = f"What number comes after {a}?", f"{a + 1} comes after {a}."
    return {"conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": ans}]}, {}


# ---- shards ---------------------------------------------------------------------------------------------

def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    tar.addfile(info, io.BytesIO(data))


def write_shards(out: Path, prefix: str, samples, count: int, per_shard: int) -> list[str]:
    texts: list[str] = []
    for stale in out.glob(f"{prefix}-[0-9][0-9][0-9][0-9][0-9][0-9].tar"):  # a previous synth's: brace patterns
        stale.unlink()  # such as {000000..000003} would read them beside these
    for shard in range(-(-count // per_shard)):
        path = out / f"{prefix}-{shard:06d}.tar"
        tmp = path.with_name(f"{path.name}.tmp")  # a shard has its name only once whole
        with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
            for i in range(shard * per_shard, min(count, (shard + 1) * per_shard)):
                meta, media = next(samples)
                key = f"{prefix}-{i:07d}"
                _add(tar, f"{key}.json", json.dumps(meta, sort_keys=True).encode())
                for ext, data in media.items():
                    _add(tar, f"{key}.{ext}", data)
                # with the role names, which the chat template puts before every turn
                texts.extend(f"{ROLES[turn['from']]}\n{turn['value']}" for turn in meta["conversations"])
        tmp.replace(path)
    return texts


# counts per split: (text, image, video32, video128)
SIZES = {"train": (2000, 2000, 1600, 400), "eval": (200, 200, 200, 100)}


def synthesize(out_dir: str = "data_shards", seed: int = 0, image_size: int = 64, scale: float = 1.0,
               shards_per_source: int = 4, vocab_size: int = 1024) -> dict[str, int]:
    """Write train/ and eval/ shards and the tokenizer trained on them; returns sample counts."""
    from storm_lightning.tokenizer import train_tokenizer

    root = Path(out_dir)
    counts: dict[str, int] = {}
    texts: list[str] = []
    for split_index, (split, sizes) in enumerate(SIZES.items()):
        out = root / split
        out.mkdir(parents=True, exist_ok=True)
        caption_prob = 0.3 if split == "train" else 0.0
        makers = {
            "text": lambda rng: text_sample(rng),
            "image": lambda rng: image_sample(rng, image_size, caption_prob),
            "video32": lambda rng: video_sample(rng, 32, image_size, caption_prob),
            "video128": lambda rng: video_sample(rng, 128, image_size, caption_prob),
        }
        for source_index, ((name, make), size) in enumerate(zip(makers.items(), sizes)):
            count = max(1, int(size * scale))
            rng = np.random.default_rng([seed, split_index, source_index])
            stream = (make(rng) for _ in iter(int, 1))
            n_shards = shards_per_source if split == "train" else 1
            texts += write_shards(out, name, stream, count, -(-count // n_shards))
            counts[f"{split}/{name}"] = count
    train_tokenizer(texts, str(root / "tokenizer"), vocab_size=vocab_size)
    return counts
