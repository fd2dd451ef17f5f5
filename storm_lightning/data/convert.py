"""LLaVA-style annotations + a media folder -> WebDataset shards, and a checker for existing shards.

``storm-shards convert --annotations data.json[l] --media-root DIR --out DIR``

An annotation record is LLaVA's: ``{"id": ..., "image": "rel/path.jpg" | "video": "rel/path.mp4",
"conversations": [...]}`` plus optional ``options``/``answer``/``category``. Records are cut into
shards of ``samples_per_shard`` in file order; shards are written in parallel, each to a temporary name
renamed when complete, so an interrupted conversion resumes by skipping the shards that exist. Every
record is checked before it is written: its media must resolve inside ``--media-root`` (no ``..``, no
absolute paths, no symlinks out), exist, have a supported extension and decode. Records that fail are
left out and listed in ``<out>/convert_report.json``.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from storm_lightning.data.media import IMAGE_EXTS, VIDEO_EXTS, decode_image, decode_video


class BadRecord(Exception):
    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind, self.detail = kind, detail


def read_annotations(path: str) -> list[dict]:
    text = Path(path).read_text(encoding="utf-8")
    if path.endswith(".jsonl"):
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    records = json.loads(text)
    if not isinstance(records, list):
        raise ValueError(f"{path}: expected a JSON list of records (or use .jsonl)")
    return records


def resolve_media(root: Path, relative: str) -> Path:
    """The media file of a record, refusing anything that resolves outside ``root``."""
    if not isinstance(relative, str) or not relative:
        raise BadRecord("bad_path", repr(relative))
    if os.path.isabs(relative):
        raise BadRecord("escapes_media_root", relative)
    path = (root / relative).resolve()  # follows symlinks and '..'
    if not path.is_relative_to(root):
        raise BadRecord("escapes_media_root", relative)
    if not path.is_file():
        raise BadRecord("missing_media", relative)
    return path


def check_media(data: bytes, ext: str) -> None:
    """Decode enough of the media to know it is readable (small frames: this is a check)."""
    try:
        if ext in IMAGE_EXTS:
            decode_image(data, 8)
        else:
            decode_video(data, 1, 8)
    except Exception as exn:
        raise BadRecord("corrupt_media", f"{type(exn).__name__}: {exn}") from None


def build_sample(record: dict, root: Path) -> tuple[dict, dict[str, bytes]]:
    """(json entry, media entries) of a record, or BadRecord."""
    conversations = record.get("conversations")
    if not isinstance(conversations, list) or not conversations:
        raise BadRecord("bad_conversations", "missing or empty")
    meta = {"conversations": conversations}
    for extra in ("id", "options", "answer", "category"):
        if extra in record:
            meta[extra] = record[extra]
    media: dict[str, bytes] = {}
    relative = record.get("video", record.get("image"))
    if relative is not None:
        path = resolve_media(root, relative)
        ext = path.suffix.lower().lstrip(".")
        if ext not in IMAGE_EXTS + VIDEO_EXTS:
            raise BadRecord("unsupported_media", relative)
        data = path.read_bytes()
        check_media(data, ext)
        media[ext] = data
    return meta, media


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    tar.addfile(info, io.BytesIO(data))


def write_shard(path: str, records: list[tuple[int, dict]], root: str) -> list[dict]:
    """Write one shard (atomically); returns the problems of the records left out."""
    problems = []
    tmp = f"{path}.tmp{os.getpid()}"
    with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
        for index, record in records:
            try:
                meta, media = build_sample(record, Path(root))
            except BadRecord as bad:
                problems.append({"index": index, "id": record.get("id"), "problem": bad.kind, "detail": bad.detail})
                continue
            key = f"{index:09d}"
            _add(tar, f"{key}.json", json.dumps(meta, ensure_ascii=False).encode("utf-8"))
            for ext, data in media.items():
                _add(tar, f"{key}.{ext}", data)
    Path(f"{path}.report.json").write_text(json.dumps(problems))
    os.replace(tmp, path)  # the shard exists only once complete
    return problems


def convert(annotations: str, media_root: str, out_dir: str, prefix: str = "data", samples_per_shard: int = 1000,
            workers: int = 1, progress: bool = True) -> dict:
    """Convert; returns (and writes to ``out_dir/convert_report.json``) counts and every problem."""
    from tqdm import tqdm

    root = Path(media_root).resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"--media-root: no such directory '{media_root}'")
    records = read_annotations(annotations)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    chunks = [list(enumerate(records))[i: i + samples_per_shard] for i in range(0, len(records), samples_per_shard)]
    paths = [str(out / f"{prefix}-{i:06d}.tar") for i in range(len(chunks))]
    todo = [i for i, p in enumerate(paths) if not (Path(p).exists() and Path(f"{p}.report.json").exists())]
    with ProcessPoolExecutor(max_workers=max(1, workers)) as pool:
        futures = [pool.submit(write_shard, paths[i], chunks[i], str(root)) for i in todo]
        for future in tqdm(futures, desc="shards", unit="shard", disable=not progress):
            future.result()
    problems = [p for path in paths for p in json.loads(Path(f"{path}.report.json").read_text())]
    report = {
        "records": len(records), "written": len(records) - len(problems), "shards": len(paths),
        "resumed_shards": len(paths) - len(todo),
        "problems_by_kind": {k: sum(p["problem"] == k for p in problems) for k in sorted({p["problem"] for p in problems})},
        "problems": problems,
        "shard_pattern": f"{out}/{prefix}-{{000000..{len(paths) - 1:06d}}}.tar" if paths else None,
    }
    (out / "convert_report.json").write_text(json.dumps(report, indent=1))
    return report


def check_shard(path: str) -> dict:
    """Read every sample of a shard as training would; returns counts and the bad samples."""
    samples: dict[str, dict[str, bytes]] = {}
    bad = []
    try:
        with tarfile.open(path) as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, _, ext = member.name.partition(".")
                data = tar.extractfile(member).read()
                if len(data) != member.size:  # tarfile hands back short reads of a cut file silently
                    bad.append({"key": key, "problem": f"truncated: {member.name} has {len(data)} of {member.size} bytes"})
                    continue
                samples.setdefault(key, {})[ext.lower()] = data
            end = tar.offset
        with open(path, "rb") as f:  # a whole tar ends in two zero blocks; tarfile stops at a cut quietly
            f.seek(end)
            rest = f.read()
        if len(rest) < 1024 or rest.strip(b"\0"):
            bad.append({"key": None, "problem": f"truncated: no end-of-archive after byte {end}, samples after it lost"})
    except (tarfile.TarError, OSError) as exn:
        bad.append({"key": None, "problem": f"unreadable tar: {exn}"})
    for key, entries in samples.items():
        try:
            if "json" not in entries:
                raise BadRecord("no_json", "")
            meta = json.loads(entries["json"].decode("utf-8"))
            if not isinstance(meta.get("conversations"), list):
                raise BadRecord("bad_conversations", "")
            for ext, data in entries.items():
                if ext in IMAGE_EXTS + VIDEO_EXTS:
                    check_media(data, ext)
        except (BadRecord, ValueError) as exn:
            bad.append({"key": key, "problem": str(exn)})
    return {"shard": path, "samples": len(samples), "bad": bad}


def check(paths: list[str], workers: int = 1) -> list[dict]:
    with ProcessPoolExecutor(max_workers=max(1, workers)) as pool:
        return list(pool.map(check_shard, paths))
