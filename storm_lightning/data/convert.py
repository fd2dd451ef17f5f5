"""Annotation files + a media folder -> shards (``storm-shards convert``), and the shard checker
(``storm-shards check``).

Annotation formats (``--format``, by default recognised per record):

- conversations: LLaVA / ShareGPT / VILA / LLaMA-Factory (``conversations``: ``from``/``value`` turns) or
  ms-swift / LLaMA-Factory (``messages``: ``role``/``content`` turns); the medium in ``image`` or ``video``
  (a path) or ``images`` / ``videos`` (a list of one path); a ``video`` path may be a folder of extracted
  frames (ShareGPTVideo); optional ``start``/``end`` (seconds), ``options``/``answer``/``category``.
- the benchmarks' own formats (``storm_lightning.data.benchmarks``): Video-MME, MVBench, MLVU,
  LongVideoBench.

Every record becomes a shard record (``records.py``) checked by the same ``validate_record`` training
uses, and its medium must resolve inside ``--media-root`` (no ``..``, no absolute path, no symlink
out), exist and decode. A record that fails, or that we cannot represent (several media in one
record), is left out and listed with the reason in ``<out>/convert_report.json``; never written as a
text-only sample.

``--frames N --size S [--fps F]`` samples each video at conversion time (uniform, or one frame every
``1/F`` seconds up to N, within the record's ``start``/``end``) and stores a small clip of those
frames at ``S x S``; the record keeps the source video's ``frame_indices`` and ``timestamps``.

Records are cut into shards of ``samples_per_shard`` in file order and written in parallel, each under
a temporary name renamed once complete. ``<out>/convert_manifest.json`` records the annotation file's
hash and the options: re-running the same command resumes (finished shards are kept); running it
into the same folder with another file or other options is refused.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import multiprocessing
import os
import tarfile
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, Executor, Future, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass
from pathlib import Path

from storm_lightning.data.media import IMAGE_EXTS, VIDEO_EXTS, decode_image
from storm_lightning.data.records import BadRecord, validate_record
from storm_lightning.data.samples import FRAME_PREFIX
from storm_lightning.data.video import ReadLimits
from storm_lightning.errors import ConfigError, MissingPathError, UserError

MANIFEST, REPORT = "convert_manifest.json", "convert_report.json"
# Worker processes start from a fresh interpreter: a process forked after torch or the tokenizer has
# started its threads can deadlock (a hang seen here when convert ran after a model in the same process).
_CLEAN_START = multiprocessing.get_context("forkserver" if "forkserver" in multiprocessing.get_all_start_methods()
                                           else "spawn")


@dataclass(frozen=True)
class ConvertOptions:
    """What shapes the output (recorded in the manifest: a resume must use the same)."""

    format: str = "auto"
    prefix: str = "data"
    samples_per_shard: int = 1000
    frames: int | None = None  # sample and re-encode videos at conversion time
    size: int | None = None
    fps: float | None = None
    folder_fps: float = 1.0  # frame rate of frame-folder videos whose record gives none
    category: str | None = None  # the category of records that name none (MVBench: one file per task)

    def check(self) -> None:
        if self.samples_per_shard < 1:
            raise ConfigError(f"--samples-per-shard must be >= 1, got {self.samples_per_shard}")
        if (self.frames is None) != (self.size is None):
            raise ConfigError("--frames and --size go together (sample N frames of each video at S x S)")
        if self.frames is not None and (self.frames < 1 or self.size < 8):
            raise ConfigError(f"--frames must be >= 1 and --size >= 8, got {self.frames}, {self.size}")
        if self.fps is not None and (self.frames is None or not self.fps > 0):
            raise ConfigError("--fps needs --frames (its cap) and must be > 0")
        if not self.folder_fps > 0:
            raise ConfigError(f"--folder-fps must be > 0, got {self.folder_fps}")
        if not self.prefix or "/" in self.prefix or self.prefix.startswith("."):
            raise ConfigError(f"--prefix must be a plain file name prefix, got {self.prefix!r}")
        if self.format != "auto" and self.format not in formats():
            raise ConfigError(f"--format must be auto or one of {sorted(formats())}, got {self.format!r}")


# ---- reading annotation files -------------------------------------------------------------------------------

def read_annotations(path: str) -> Iterator[object]:
    """The records of a ``.json`` list, a ``.jsonl`` file (one record a line) or a ``.parquet`` file, in order.
    A line of a ``.jsonl`` that is not JSON is yielded as a ``BadRecord`` (reported, not fatal)."""
    p = Path(path)
    if not p.is_file():
        raise MissingPathError(f"--annotations: no such file '{path}'")
    if p.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise UserError("--annotations: reading .parquet needs pyarrow (pip install pyarrow)") from None
        import pyarrow as pa

        try:
            parquet = pq.ParquetFile(p)
        except (pa.ArrowException, OSError) as exn:
            raise UserError(f"--annotations: {path} is not a readable parquet file ({' '.join(str(exn).split())[:200]})"
                            ) from None
        for group in range(parquet.num_row_groups):  # a corrupt row group is one bad record of the report
            try:
                rows = parquet.read_row_group(group).to_pylist()
            except (pa.ArrowException, OSError) as exn:
                yield BadRecord("bad_parquet", f"row group {group}: {' '.join(str(exn).split())[:200]}")
                continue
            yield from rows
        return
    if p.suffix == ".jsonl":
        with open(p, "rb") as f:  # line by line as bytes: a line not in UTF-8 is that record's problem
            for n, raw in enumerate(f, 1):
                if raw.strip():
                    try:
                        yield json.loads(raw.decode("utf-8"))
                    except (ValueError, RecursionError) as exn:  # UnicodeDecodeError is a ValueError
                        yield BadRecord("bad_json", f"line {n}: {exn}")
        return
    try:
        records = json.loads(p.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exn:
        raise UserError(f"--annotations: {path} is not a JSON file ({exn}); a file of one record per line needs "
                        "the .jsonl extension") from None
    if isinstance(records, dict):  # some releases wrap the list: {"data": [...]} or {"annotations": [...]}
        lists = [v for v in records.values() if isinstance(v, list)]
        records = lists[0] if len(lists) == 1 else records
    if not isinstance(records, list):
        raise UserError(f"--annotations: {path} holds a JSON {type(records).__name__}, expected a list of records")
    yield from records


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ---- one record -> one shard sample ------------------------------------------------------------------------

@dataclass
class Medium:
    kind: str  # "image" | "video" (a file or a frame folder)
    path: str  # relative to the media root


@dataclass
class Normalised:
    """A record in our terms: the shard record (``records.py``), its medium, and its id."""

    meta: dict
    medium: Medium | None
    id: object = None


def conversation_record(record: dict) -> Normalised:
    """LLaVA / ShareGPT / VILA / ms-swift / LLaMA-Factory records (see the module docstring)."""
    if "conversations" in record:
        turns = record["conversations"]
    elif "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            raise BadRecord("bad_conversations", "messages is not a list of {role, content}")
        if not all(isinstance(m.get("content"), str) for m in messages):
            raise BadRecord("bad_conversations", "a message's content is not text")
        turns = [{"from": m.get("role"), "value": m["content"]} for m in messages]
    else:
        raise BadRecord("bad_conversations", "neither conversations nor messages")
    media = []
    for key, kind in (("image", "image"), ("video", "video"), ("images", "image"), ("videos", "video")):
        value = record.get(key)
        if value is None or value == []:
            continue
        for path in value if isinstance(value, list) else [value]:
            media.append(Medium(kind, path))
    if len(media) > 1:
        raise BadRecord("several_media", f"{len(media)} media in one record: one image or one video per sample")
    meta = {"conversations": turns}
    for extra in ("options", "answer", "category", "duration", "start", "end", "fps"):
        value = record.get(extra)
        if value is not None:  # a duration group of whole seconds (600) is kept as its text, as benchmarks' are
            whole = extra == "duration" and isinstance(value, int) and not isinstance(value, bool)
            meta[extra] = str(value) if whole else value
    return Normalised(meta, media[0] if media else None, record.get("id"))


def formats() -> dict:
    from storm_lightning.data.benchmarks import BENCHMARK_FORMATS

    return {"conversations": conversation_record, **BENCHMARK_FORMATS}


def normalise(record: object, fmt: str) -> Normalised:
    if isinstance(record, BadRecord):
        raise record
    if not isinstance(record, dict):
        raise BadRecord("not_an_object", f"a JSON {type(record).__name__}")
    if fmt == "auto":  # a benchmark's keys, or a conversation record (which says what it lacks)
        from storm_lightning.data.benchmarks import detect

        fmt = "conversations" if ("conversations" in record or "messages" in record) else (
            detect(record) or "conversations")
    return formats()[fmt](record)


def resolve_media(root: Path, relative) -> Path:
    """The medium of a record, refusing anything that resolves outside ``root``."""
    if not isinstance(relative, str) or not relative or "\0" in relative:
        raise BadRecord("bad_path", repr(relative)[:200])
    if os.path.isabs(relative):
        raise BadRecord("escapes_media_root", relative)
    path = (root / relative).resolve()  # follows symlinks and '..'
    if not path.is_relative_to(root):
        raise BadRecord("escapes_media_root", relative)
    if not path.exists():
        raise BadRecord("missing_media", relative)
    if not (path.is_file() or path.is_dir()):  # a FIFO, a device: reading it could block or never end
        raise BadRecord("unsupported_media", f"{relative}: not a regular file")
    return path


def folder_frames(root: Path, folder: Path, relative: str) -> list[Path]:
    """The frames of a frame-folder video, each checked like a record's path: a frame that is a link out
    of the media root (or to a device) would otherwise be copied into a shard."""
    from PIL import Image

    from storm_lightning.data.video import frame_files

    frames = []
    for name in frame_files(folder):
        frame = Path(name).resolve()
        if not frame.is_relative_to(root):
            raise BadRecord("escapes_media_root", f"{relative}/{Path(name).name}")
        if not frame.is_file():
            raise BadRecord("unsupported_media", f"{relative}/{Path(name).name}: not a regular file")
        try:  # every frame's header (convert decodes a few frames; training any of them)
            with Image.open(frame):
                pass
        except (OSError, ValueError, Image.DecompressionBombError) as exn:  # UnidentifiedImageError: an OSError
            raise BadRecord("corrupt_media", f"{relative}/{Path(name).name}: {' '.join(str(exn).split())[:200]}") from None
        frames.append(frame)
    return frames


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    tar.addfile(info, io.BytesIO(data))


def build_sample(item: Normalised, root: Path, opts: ConvertOptions) -> tuple[dict, dict[str, bytes], int]:
    """(json entry, media entries, bytes of the source medium), or BadRecord."""
    from storm_lightning.data.video import FrameSampling, VideoReadError, read_frame_folder, read_video

    meta, medium = dict(item.meta), item.medium
    if item.id is not None:
        meta["id"] = item.id
    if opts.category is not None:
        meta.setdefault("category", opts.category)
    record = validate_record(meta, has_media=medium is not None)  # the definition training uses
    if medium is None:
        return meta, {}, 0
    path = resolve_media(root, medium.path)
    is_folder = path.is_dir()
    ext = path.suffix.lower().lstrip(".")
    if medium.kind == "image" and (is_folder or ext not in IMAGE_EXTS):
        raise BadRecord("unsupported_media", f"{medium.path}: not an image ({', '.join(IMAGE_EXTS)})")
    if medium.kind == "video" and not is_folder and ext not in VIDEO_EXTS:
        raise BadRecord("unsupported_media", f"{medium.path}: not a video ({', '.join(VIDEO_EXTS)}) or frame folder")
    try:
        if medium.kind == "image":
            data = path.read_bytes()
            decode_image(data, 8)
            return meta, {ext: data}, len(data)
        folder_fps = float(meta.get("fps", opts.folder_fps))
        if is_folder:
            meta["fps"] = folder_fps
        frames = folder_frames(root, path, medium.path) if is_folder else None
        source_bytes = sum(f.stat().st_size for f in frames) if frames else path.stat().st_size

        def read(sampling: FrameSampling, size: int):  # the video file, or the checked frames
            if frames:
                return read_frame_folder(frames, sampling, size, fps=folder_fps)
            return read_video(path, sampling, size)

        if opts.frames is not None:  # a small clip of the frames training will use
            from storm_lightning.data.synth import encode_mp4

            sampling = FrameSampling(frames=opts.frames, fps=opts.fps, max_frames=opts.frames,
                                     start=record.start, end=record.end)
            clip = read(sampling, opts.size)
            meta.update(frame_indices=clip.indices, timestamps=[round(t, 4) for t in clip.timestamps])
            for bound in ("start", "end", "fps"):  # applied: the clip is what lies between them
                meta.pop(bound, None)
            fps = max(1, round(clip.fps))
            return meta, {"mp4": encode_mp4(list(clip.frames.permute(0, 2, 3, 1).numpy()), fps=fps)}, source_bytes
        read(FrameSampling(frames=1, start=record.start, end=record.end), 8)  # it opens and decodes
        if frames:
            width = max(6, len(str(len(frames) - 1)))
            return meta, {f"{FRAME_PREFIX}{i:0{width}d}.{f.suffix.lower().lstrip('.')}": f.read_bytes()
                          for i, f in enumerate(frames)}, source_bytes
        return meta, {ext: path.read_bytes()}, source_bytes
    except (VideoReadError, OSError, ValueError) as exn:  # Pillow, PyAV, the reader
        if isinstance(exn, BadRecord):
            raise
        raise BadRecord("corrupt_media", f"{medium.path}: {type(exn).__name__}: {' '.join(str(exn).split())[:300]}") from None


def write_shard(path: str, records: list[tuple[int, object]], root: str, opts: ConvertOptions) -> dict:
    """Write one shard (atomically); returns its report: the problems of the records left out, sizes."""
    problems, written, source_bytes = [], 0, 0
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
            for index, record in records:
                try:
                    item = normalise(record, opts.format)
                    meta, media, size = build_sample(item, Path(root), opts)
                    try:
                        encoded = json.dumps(meta, ensure_ascii=False).encode("utf-8")
                    except UnicodeEncodeError as exn:  # a lone surrogate ("\ud800") in a text
                        raise BadRecord("bad_text", str(exn)) from None
                except BadRecord as bad:
                    problems.append(_problem(index, record, bad.kind, bad.detail))
                    continue
                except Exception as exn:  # anything else about one record: reported, never the whole run
                    problems.append(_problem(index, record, "unexpected_error", f"{type(exn).__name__}: {exn}"))
                    continue
                key = f"{index:09d}"
                _add(tar, f"{key}.json", encoded)
                for ext, data in media.items():
                    _add(tar, f"{key}.{ext}", data)
                written, source_bytes = written + 1, source_bytes + size
        report = {"written": written, "problems": problems, "source_media_bytes": source_bytes}
        Path(f"{path}.report.json").write_text(json.dumps(report))
        os.replace(tmp, path)  # the shard exists only once complete, and after its report
    finally:
        Path(tmp).unlink(missing_ok=True)
    return report


def _problem(index: int, record: object, kind: str, detail: str) -> dict:
    rid = record.get("id") if isinstance(record, dict) else None
    return {"index": index, "id": rid if isinstance(rid, (str, int, float)) else None, "problem": kind,
            "detail": detail[:500]}


def _remove_temporaries(out: Path) -> None:
    from storm_lightning.checkpoint import _process_alive

    for tmp in out.glob("*.tar.tmp*"):
        pid = tmp.name.rpartition(".tmp")[2]
        if pid.isdigit() and not _process_alive(int(pid)):
            tmp.unlink(missing_ok=True)


def _manifest(annotations: str, media_root: Path, opts: ConvertOptions) -> dict:
    return {"annotations": os.path.abspath(annotations), "annotations_sha256": file_sha256(annotations),
            "media_root": str(media_root), "options": asdict(opts), "version": 2}


# what a resume must share with the conversion it continues (the annotation file may have moved)
_SAME = ("annotations_sha256", "media_root", "options", "version")


def _claim_output(out: Path, manifest: dict) -> None:
    """Refuse an output folder made from another file or with other options (its shards would mix)."""
    path = out / MANIFEST
    if path.is_file():
        try:
            before = json.loads(path.read_text())
        except ValueError:
            before = None
        diff = [k for k in _SAME if not isinstance(before, dict) or before.get(k) != manifest[k]]
        if not diff:
            return
        raise UserError(f"--out {out} holds a conversion of another annotation file, media root or with other options "
                        f"({', '.join(diff)} differ): use a new --out, or delete it first")
    if any(out.glob("*.tar")):
        raise UserError(f"--out {out} already holds shards that this command did not make (no {MANIFEST}): "
                        "use a new --out")
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(manifest, indent=1))


def convert(annotations: str, media_root: str, out_dir: str, workers: int = 1, progress: bool = True,
            **options) -> dict:
    """Convert; returns (and writes to ``out_dir/convert_report.json``) counts and every problem.
    ``options``: the fields of ``ConvertOptions``."""
    from tqdm import tqdm

    opts = ConvertOptions(**options)
    if opts.format == "mvbench" and opts.category is None:
        opts = ConvertOptions(**{**asdict(opts), "category": Path(annotations).stem})
    opts.check()
    if workers < 1:
        raise ConfigError(f"--workers must be >= 1, got {workers}")
    root = Path(media_root).resolve()
    if not root.is_dir():
        raise MissingPathError(f"--media-root: no such directory '{media_root}'")
    if not Path(annotations).is_file():
        raise MissingPathError(f"--annotations: no such file '{annotations}'")
    out = Path(out_dir)
    _claim_output(out, _manifest(annotations, root, opts))
    _remove_temporaries(out)
    # one pass over the records, chunk after chunk (linear in the number of records); at most a few
    # chunks in flight, so memory holds those, not the file's worth of futures
    chunks = _chunks(enumerate(read_annotations(annotations)), opts.samples_per_shard)
    reports: dict[int, dict] = {}
    resumed = 0
    with _pool(workers) as pool, tqdm(desc="shards", unit="shard", disable=not progress) as bar:
        running = {}
        for n, chunk in enumerate(chunks):
            path = out / f"{opts.prefix}-{n:06d}.tar"
            if path.exists() and Path(f"{path}.report.json").exists():
                reports[n] = json.loads(Path(f"{path}.report.json").read_text())
                reports[n]["records"] = len(chunk)
                resumed += 1
                bar.update()
                continue
            running[pool.submit(write_shard, str(path), chunk, str(root), opts)] = (n, len(chunk))
            while len(running) >= 2 * workers:
                _collect(running, reports, bar, wait(running, return_when=FIRST_COMPLETED).done)
        _collect(running, reports, bar, list(running))
    problems = [p for n in sorted(reports) for p in reports[n]["problems"]]
    records = sum(r["records"] for r in reports.values())
    written = sum(r["written"] for r in reports.values())
    report = {
        "records": records, "written": written, "shards": len(reports), "resumed_shards": resumed,
        "problems_by_kind": {k: sum(p["problem"] == k for p in problems) for k in sorted({p["problem"] for p in problems})},
        "problems": problems,
        "shard_pattern": f"{out}/{opts.prefix}-{{000000..{len(reports) - 1:06d}}}.tar" if reports else None,
        "source_media_bytes": sum(r["source_media_bytes"] for r in reports.values()),
        "shard_bytes": sum((out / f"{opts.prefix}-{n:06d}.tar").stat().st_size for n in reports),
    }
    (out / REPORT).write_text(json.dumps(report, indent=1))
    return report


class _InProcess(Executor):
    """One worker: run here, without starting a process."""

    def submit(self, fn, /, *args, **kwargs) -> Future:
        future = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as exn:  # noqa: BLE001  (handed to the caller, as a pool would)
            future.set_exception(exn)
        return future


def _pool(workers: int) -> Executor:
    if workers <= 1:
        return _InProcess()
    return ProcessPoolExecutor(max_workers=workers, mp_context=_CLEAN_START, initializer=_exit_with,
                               initargs=(os.getpid(),))


def _exit_with(parent: int) -> None:
    """A worker ends once the process that started it has gone, SIGKILL included (the workers are the
    forkserver's children: they ran on, writing shards into --out, after their command was killed)."""
    import threading
    import time

    def gone() -> bool:
        try:  # a killed process stays a zombie until its own parent reaps it: it has gone all the same
            return Path(f"/proc/{parent}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
        except FileNotFoundError:
            return True
        except OSError:  # no /proc (macOS): whether the pid exists
            try:
                os.kill(parent, 0)
                return False
            except ProcessLookupError:
                return True

    def watch() -> None:
        while not gone():
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def _chunks(items, size: int) -> Iterator[list]:
    while chunk := list(itertools.islice(items, size)):
        yield chunk


def _collect(running: dict, reports: dict, bar, done) -> None:
    for future in done:
        n, count = running.pop(future)
        reports[n] = {**future.result(), "records": count}
        bar.update()


# ---- check --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class CheckSettings:
    """What training would use to read the shards (``--config`` or the flags of ``storm-shards check``)."""

    tokenizer_path: str = "data_shards/tokenizer"
    image_size: int = 64
    max_length: int = 4096
    frames_per_clip: int = 32
    fps: float | None = None
    max_frames: int | None = None
    limits: ReadLimits = ReadLimits()
    system_prompt: str | None = None


def check_shard(path: str, settings: CheckSettings) -> dict:
    """Read every sample of a shard exactly as training does (``read_shard`` + ``SampleProcessor``); returns
    counts and the bad samples (``key`` None for unreadable tar data)."""
    from storm_lightning.data.datamodule import ShardSource
    from storm_lightning.data.samples import SampleProcessor
    from storm_lightning.data.shards import ShardError, read_shard

    processor = SampleProcessor(settings.tokenizer_path, settings.image_size, settings.max_length, None,
                                settings.limits, settings.system_prompt)
    source = ShardSource("check", path, frames_per_clip=settings.frames_per_clip, fps=settings.fps,
                         max_frames=settings.max_frames)
    samples, bad = 0, []
    try:
        for raw in read_shard(path):
            samples += 1
            try:
                processor(raw, source)
            except Exception as exn:  # what training would skip and count
                bad.append({"key": raw.key, "problem": f"{type(exn).__name__}: {' '.join(str(exn).split())[:300]}"})
    except ShardError as exn:
        bad.append({"key": None, "problem": str(exn)})
    except OSError as exn:
        bad.append({"key": None, "problem": f"unreadable: {exn}"})
    return {"shard": path, "samples": samples, "bad": bad}


def check(paths: list[str], settings: CheckSettings = CheckSettings(), workers: int = 1) -> list[dict]:
    from storm_lightning.tokenizer import load_tokenizer

    load_tokenizer(settings.tokenizer_path, key="--tokenizer")  # a missing tokenizer: one error, not one per shard
    with _pool(workers) as pool:
        return list(pool.map(check_shard, paths, itertools.repeat(settings)))
