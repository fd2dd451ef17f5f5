"""Shard files -> raw samples: the entries of each sample, grouped by key, read by our own code.

A shard is a tar (plain, or compressed: ``.tar.gz`` and the like) in WebDataset's layout: the members
``<key>.<ext>`` with the same key, one after the other, form a sample (``docs/data.md``). Nothing here
runs or unpickles anything: a path is opened as a file, never handed to webdataset (which runs names
beginning with ``pipe:`` as shell commands), and entries stay bytes.

Every raw sample knows where it starts (``offset``: the byte offset of its first member's header in
the plain tar, or in the decompressed stream) and where the next one starts, so a reader can stop and
resume at a sample in O(1) seeks instead of re-reading the shard. Entries over ``EAGER_BYTES`` (videos,
large images, frames of a long frame-folder video) are not read while scanning a plain tar: they are
``TarMember`` references, read or opened as a file slice when the sample is decoded, so a shuffle
buffer of raw samples holds references, not gigabytes of video.
"""

from __future__ import annotations

import io
import os
import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass

from storm_lightning.data.records import MAX_RECORD_BYTES

EAGER_BYTES = 1 << 20
# the entries of a sample of a compressed shard are read whole: more than this in all is a bad sample
MAX_STREAM_SAMPLE = 1 << 30
# WebDataset's key/extension split: the key is the path up to the first dot of the file name
_KEY_EXT = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")
_COMPRESSED = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ", b"\x28\xb5\x2f\xfd")  # gzip, bzip2, xz, zstd


class ShardError(ValueError):
    """Unreadable tar data: a cut file, a corrupt header. The samples before it were read."""


@dataclass(frozen=True)
class TarMember:
    """The data of one member of a plain tar, by reference."""

    path: str
    offset: int
    size: int

    def read(self) -> bytes:
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            data = f.read(self.size)
        if len(data) != self.size:
            raise ShardError(f"{self.path}: member at byte {self.offset} is cut short")
        return data

    def open(self) -> io.RawIOBase:
        """A seekable read-only file of just this member (PyAV reads a long video from it piecewise)."""
        return FileSlice(self.path, self.offset, self.size)


Entry = bytes | TarMember


def entry_bytes(entry: Entry) -> bytes:
    return entry if isinstance(entry, bytes) else entry.read()


@dataclass
class RawSample:
    key: str
    entries: dict[str, Entry]  # extension, lower case ("json", "mp4", "frame-000001.jpg") -> data
    shard: str
    offset: int  # where this sample starts in the shard
    end: int  # where the next one starts
    problem: str | None = None  # set when the tar itself makes the sample unusable (a name twice)


def is_compressed(path: str) -> bool:
    with open(path, "rb") as f:
        head = f.read(6)
    return any(head.startswith(magic) for magic in _COMPRESSED)


def read_shard(path: str, start: int = 0) -> Iterator[RawSample]:
    """The samples of a shard from byte ``start`` (a sample's ``offset``) on. Raises ShardError where the
    tar data becomes unreadable, after yielding every whole sample before that point; a sample whose
    members are cut off is not yielded."""
    compressed = is_compressed(path)
    with open(path, "rb") as f:
        try:
            if compressed:  # stream mode; offsets are in the decompressed stream, reached by reading
                tar = tarfile.open(fileobj=f, mode="r|*")
            else:
                f.seek(start)
                tar = tarfile.open(fileobj=f, mode="r:")  # reads headers, seeks over the data
        except (tarfile.TarError, OSError, EOFError) as exn:
            raise ShardError(f"{path}: not a readable tar from byte {start} ({type(exn).__name__}: {exn})") from None
        with tar:
            yield from _group(tar, path, start, compressed)
            if not compressed:
                check_tar_end(path, tar.offset)


def _members(tar: tarfile.TarFile, path: str) -> Iterator[tuple[tarfile.TarInfo, int]]:
    """(member, offset of the header that follows its data)."""
    while True:
        try:
            member = tar.next()
        except (tarfile.TarError, OSError, EOFError) as exn:
            raise ShardError(f"{path}: unreadable tar data ({type(exn).__name__}: {exn})") from None
        if member is None:
            return
        tar.members.clear()  # TarFile keeps every header it read: a million-member shard would hold them all
        yield member, member.offset_data + -(-member.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE


def _group(tar: tarfile.TarFile, path: str, start: int, compressed: bool) -> Iterator[RawSample]:
    current: RawSample | None = None
    for member, end in _members(tar, path):
        if compressed and member.offset < start:
            continue  # before the resume point: skipped without reading its data (tarfile skips it)
        match = _KEY_EXT.match(member.name)
        link = member.islnk() or member.issym()
        if not (member.isreg() or link) or match is None or re.match(r"(.*/)?__[^/]*__$", match.group(1)):
            continue  # directories, devices, files without an extension, WebDataset's __meta__ files
        key, ext = match.group(1), match.group(2).lower()
        if current is not None and key != current.key:
            yield current
            current = None
        if current is None:
            current = RawSample(key, {}, path, member.offset, end)
            stream_bytes = 0
        if ext in current.entries:
            current.problem = f"duplicate_entry: {key}.{ext} twice in a row"
        limit = MAX_RECORD_BYTES if ext == "json" else MAX_STREAM_SAMPLE - stream_bytes if compressed else None
        if link:  # tar stores a second copy of a hard-linked file (and any symlink) as a name, not data
            current.problem = f"link_entry: {member.name} is a link to {member.linkname!r}: store the file itself"
            current.entries[ext] = b""
        elif limit is not None and member.size > limit:  # never read: a 20 GB sparse json, a gzip bomb
            current.problem = (f"entry_too_large: {member.name} claims {member.size} bytes, over {limit}"
                               + (f" ({MAX_STREAM_SAMPLE} for a sample of a compressed shard)" if ext != "json" else ""))
            current.entries[ext] = b""
        else:
            current.entries[ext] = _entry(tar, member, path, compressed, ext)
            stream_bytes += member.size if compressed else 0
        current.end = end
    if current is not None:
        yield current


def _entry(tar: tarfile.TarFile, member: tarfile.TarInfo, path: str, compressed: bool, ext: str) -> Entry:
    if not compressed and member.size > EAGER_BYTES and ext != "json":
        return TarMember(path, member.offset_data, member.size)
    try:
        data = tar.extractfile(member).read()
    except (tarfile.TarError, OSError, EOFError) as exn:
        raise ShardError(f"{path}: unreadable member {member.name} ({type(exn).__name__}: {exn})") from None
    if len(data) != member.size:  # tarfile returns a short read of a cut file without a word
        raise ShardError(f"{path}: {member.name} has {len(data)} of {member.size} bytes: the shard is cut short")
    return data


def check_tar_end(path: str, end: int) -> None:
    """A whole plain tar ends in at least two zero blocks after its last member; a cut one does not, and
    tarfile stops at the cut as if the archive had ended. (A compressed one: the decompressor reports
    a cut stream itself.)"""
    with open(path, "rb") as f:
        f.seek(end)
        rest = f.read(2 * tarfile.BLOCKSIZE)
    if len(rest) < 2 * tarfile.BLOCKSIZE or rest.strip(b"\0"):
        raise ShardError(f"{path}: no end-of-archive after byte {end}: the shard is cut short, samples after it lost")


def read_samples_at(path: str, offsets: list[int]) -> dict[int, RawSample]:
    """The samples starting at each of ``offsets`` (from ``RawSample.offset``), in one pass for a
    compressed shard and one seek each for a plain one."""
    wanted, found = sorted(set(offsets)), {}
    if is_compressed(path):
        for raw in read_shard(path, wanted[0]):
            if raw.offset in wanted:
                found[raw.offset] = raw
            if len(found) == len(wanted):
                break
        return found
    for offset in wanted:
        found[offset] = next(read_shard(path, offset))
    return found


class FileSlice(io.RawIOBase):
    """Bytes ``[offset, offset + size)`` of a file as a seekable read-only file."""

    def __init__(self, path: str, offset: int, size: int) -> None:
        self._file = open(path, "rb")
        self._start, self._size, self._pos = offset, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self._pos, os.SEEK_END: self._size}[whence]
        self._pos = max(0, base + pos)
        return self._pos

    def readinto(self, buffer) -> int:
        n = max(0, min(len(buffer), self._size - self._pos))
        self._file.seek(self._start + self._pos)
        got = self._file.readinto(memoryview(buffer)[:n])
        self._pos += got
        return got

    def close(self) -> None:
        self._file.close()
        super().close()
