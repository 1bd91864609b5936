"""Writing folders: the one layer through which tpicore writes model files (shard folders, synthetic
checkpoints).

Layer: weights (imports tpicore.weights.manifest, tpicore.weights.reader and tpicore.errors). Owns:
  - the output folder: refusing one that holds something (unless forced) or that is not our kind of
    output (even when forced); staging the new folder next to it and publishing it atomically;
  - the one streaming safetensors writer: header computed from shapes, tensors appended in header
    order, CRC32 per tensor, page cache bounded while writing;
  - small files written durably (text, JSON, manifests, copies) and progress bars (tqdm).
Must not generate, slice or convert weights (the tools hand it bytes), and must not read tensor data.

Atomic publish:

    OUT.tmp-<pid>/   written here (every file fsynced as it is closed)
         |  fsync the folders, then rename(2) onto OUT: an absent or empty OUT is replaced atomically;
         |  a forced replacement of a full OUT moves it to OUT.old-<pid> first, then deletes it
         v
    OUT/             complete or absent, never half-written

A run that is killed leaves OUT.tmp-<pid> (and perhaps OUT.old-<pid>); the next run writing OUT removes
those whose process is gone.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np
from tqdm import tqdm

from tpicore.errors import TpiError
from tpicore.weights.manifest import (
    MANIFEST_FILE,
    Manifest,
    manifest_text,
    tensor_record,
)
from tpicore.weights.reader import drop_cache

FLUSH_BYTES = 256 << 20  # bytes written to one file between fdatasync + dropping them from the page cache
PROGRESS_MIN_BYTES = 256 << 20  # progress bars appear on their own only for writes at least this big


class OutputExists(TpiError):
    """The output folder is already there and holds something (and --force was not given)."""


# ---------------------------------------------------------------------------------------------
# The output folder: refuse, stage, publish


@dataclass(frozen=True)
class FolderKind:
    """What a tool writes, so that --force replaces only that kind of folder. Texts follow `{out}: `."""

    contents: str  # what the free-space message says is needed, e.g. "the shards"
    not_empty: str  # OUT holds something and --force was not given
    foreign: Callable[[str, list[str]], str | None]  # (OUT, its entries) -> why it is not ours, or None


_RANK_DIR = re.compile(r"rank-\d+")


def _not_rank_folders(out: str, entries: list[str]) -> str | None:
    strangers = [e for e in entries if not (_RANK_DIR.fullmatch(e) and os.path.isdir(os.path.join(out, e)))]
    if not strangers:
        return None
    return (f"does not look like `tpi shard` output (it holds {strangers[0]!r}); "
            "refusing to replace it even with --force")


def _not_checkpoint(out: str, entries: list[str]) -> str | None:
    if "config.json" in entries:
        return None
    return "not empty and holds no config.json; refusing to replace it even with --force"


# OUT/rank-0 .. rank-(N-1): `tpi shard`, `tpi synth --devices`
RANK_FOLDERS = FolderKind("the shards", "already exists and is not empty (use --force to replace it)",
                          _not_rank_folders)
# an HF checkpoint folder: `tpi synth`
CHECKPOINT = FolderKind("the checkpoint", "exists and is not empty (pass --force to replace it)", _not_checkpoint)


def check_target(out: str, force: bool, kind: FolderKind) -> None:
    """Refuse a non-empty OUT unless forced, and never force-replace a folder that is not `kind` output."""
    if os.path.islink(out):
        raise TpiError(f"{out}: is a symbolic link; give the folder itself as --out")
    if not os.path.lexists(out):
        return
    if not os.path.isdir(out):
        raise TpiError(f"{out}: exists and is not a folder")
    entries = sorted(os.listdir(out))
    if not entries:
        return
    if not force:
        raise OutputExists(f"{out}: {kind.not_empty}")
    reason = kind.foreign(out, entries)
    if reason:
        raise TpiError(f"{out}: {reason}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def sweep_leftovers(out: str) -> list[str]:
    """Remove OUT.tmp-<pid> / OUT.old-<pid> folders whose process is gone (a killed earlier run)."""
    parent, base = os.path.split(out)
    pattern = re.compile(re.escape(base) + r"\.(?:tmp|old)-(\d+)")
    removed = []
    for name in os.listdir(parent):
        m = pattern.fullmatch(name)
        if m and int(m.group(1)) != os.getpid() and not _alive(int(m.group(1))):
            shutil.rmtree(os.path.join(parent, name), ignore_errors=True)
            removed.append(name)
    return removed


def _fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _publish(tmp: str, out: str, force: bool, kind: FolderKind) -> None:
    """Move the finished temporary folder to OUT. rename(2) replaces an absent or empty OUT atomically;
    a forced replacement of a full OUT is two renames (old out of the way, new in), then a delete."""
    check_target(out, force, kind)  # again: something may have appeared while we were writing
    for dirpath, _, _ in os.walk(tmp):
        _fsync_path(dirpath)
    try:
        os.replace(tmp, out)
    except OSError:
        if not os.path.isdir(out) or not os.listdir(out):
            raise
        if not force:
            raise OutputExists(f"{out}: {kind.not_empty}") from None
        old = f"{out}.old-{os.getpid()}"
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    _fsync_path(os.path.dirname(out))


@contextmanager
def staged_folder(out: str, force: bool, kind: FolderKind, need_bytes: int = 0) -> Iterator[str]:
    """A fresh folder OUT.tmp-<pid> to write into; published as OUT when the block ends, removed if it
    raises. Refuses up front (before anything is written) an OUT that `check_target` refuses, and a disk
    with fewer than `need_bytes` free."""
    out = os.path.abspath(out)
    check_target(out, force, kind)
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    free = shutil.disk_usage(parent).free
    if free < need_bytes:  # refuse now rather than fail with ENOSPC after minutes of writing
        raise TpiError(f"{out}: {kind.contents} need {need_bytes / 1e9:.2f} GB, only {free / 1e9:.2f} GB free there")
    sweep_leftovers(out)
    tmp = f"{out}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)  # an earlier failed attempt of this process
    os.mkdir(tmp)
    try:
        os.chmod(tmp, 0o755)  # an ordinary folder, whatever the umask
        yield tmp
        _publish(tmp, out, force, kind)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ---------------------------------------------------------------------------------------------
# Small files, written durably


def write_text(path: str, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def write_json(path: str, data: Any) -> None:
    """`data` as indented JSON (the layout of HF's config.json files)."""
    write_text(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def write_manifest(folder: str, manifest: Manifest) -> None:
    """A shard folder's manifest.json (format: tpicore.weights.manifest)."""
    write_text(os.path.join(folder, MANIFEST_FILE), manifest_text(manifest.to_json()))


def copy_file(src: str, dst: str) -> None:
    shutil.copyfile(src, dst)
    _fsync_path(dst)


# ---------------------------------------------------------------------------------------------
# The streaming safetensors writer


@dataclass(frozen=True)
class Entry:
    """One tensor of a safetensors file, in file order."""

    name: str
    dtype: str  # safetensors tag: F32, F16, BF16
    shape: tuple[int, ...]
    nbytes: int


def safetensors_header(entries: list[Entry], metadata: dict[str, str]) -> bytes:
    """The length-prefixed JSON header for tensors stored back to back in `entries` order, padded with
    spaces to a multiple of 8 bytes (as the safetensors library writes it)."""
    header: dict[str, Any] = {"__metadata__": metadata}
    pos = 0
    for e in entries:
        header[e.name] = {"dtype": e.dtype, "shape": list(e.shape), "data_offsets": [pos, pos + e.nbytes]}
        pos += e.nbytes
    body = json.dumps(header, separators=(",", ":")).encode()
    body += b" " * (-len(body) % 8)
    return len(body).to_bytes(8, "little") + body


class SafetensorsWriter:
    """One safetensors file, written front to back in header order, with a CRC32 per tensor.

    The header is computed from `entries` up front, so tensors can be streamed in pieces (`write` appends
    the next bytes of the tensor the header expects next). With `drop_cache` every FLUSH_BYTES written are
    fdatasync'ed and dropped from the page cache, so writing a big file does not fill the machine's memory.
    `crc` False skips the CRC32s (files without a manifest: `crcs` then holds zeros).
    """

    def __init__(self, path: str, entries: list[Entry], metadata: dict[str, str], drop_cache: bool = True,
                 flush_bytes: int = FLUSH_BYTES, crc: bool = True) -> None:
        if sys.byteorder != "little":
            raise TpiError("safetensors are little-endian; this writer runs on little-endian hosts only")
        self.path, self.entries = path, entries
        self.drop_cache, self.flush_bytes, self.crc = drop_cache, flush_bytes, crc
        head = safetensors_header(entries, metadata)
        self.data_start = len(head)
        self.offsets, pos = [], self.data_start  # absolute byte offset of each tensor
        for e in entries:
            self.offsets.append(pos)
            pos += e.nbytes
        self.size = pos
        self.crcs: list[int] = []
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        self._crc = 0
        self._done = 0  # bytes of the current tensor written so far
        self._written = 0
        self._flushed = 0
        self._write(memoryview(head))
        self._skip_empty()

    def __enter__(self) -> "SafetensorsWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _write(self, mv: memoryview) -> None:
        self._written += len(mv)
        while len(mv):
            n = os.write(self.fd, mv)
            mv = mv[n:]

    def _skip_empty(self) -> None:
        while len(self.crcs) < len(self.entries) and self.entries[len(self.crcs)].nbytes == 0:
            self.crcs.append(0)

    def write(self, name: str, arr: np.ndarray) -> None:
        """Append the next bytes of tensor `name` (must be the tensor the header expects next)."""
        i = len(self.crcs)
        if i >= len(self.entries) or self.entries[i].name != name:
            expected = self.entries[i].name if i < len(self.entries) else "nothing"
            raise AssertionError(f"{self.path}: got bytes of {name!r}, expected {expected!r}")
        mv = memoryview(np.ascontiguousarray(arr).reshape(-1).view(np.uint8))
        nbytes = self.entries[i].nbytes
        if self._done + len(mv) > nbytes:
            raise AssertionError(f"{self.path}: {name!r} would exceed its {nbytes} bytes")
        if self.crc:
            self._crc = zlib.crc32(mv, self._crc)
        self._write(mv)
        self._done += len(mv)
        if self._done == nbytes:
            self.crcs.append(self._crc)
            self._crc = self._done = 0
            self._skip_empty()
        if self.drop_cache and self._written - self._flushed >= self.flush_bytes:
            self._flush()

    def _flush(self) -> None:
        """Push written pages to disk and drop them from the page cache, so the cache stays bounded."""
        os.fdatasync(self.fd)
        drop_cache(self.fd)
        self._flushed = self._written

    def finish(self) -> None:
        """Check every byte the header promised was written, then fsync (and drop the cache)."""
        if len(self.crcs) != len(self.entries):
            raise AssertionError(f"{self.path}: {len(self.entries) - len(self.crcs)} tensors not written")
        if self._written != self.size:
            raise AssertionError(f"{self.path}: wrote {self._written} bytes, header says {self.size}")
        os.fsync(self.fd)
        if self.drop_cache:
            drop_cache(self.fd)

    def manifest_tensors(self) -> dict[str, dict[str, Any]]:
        """The manifest's "tensors" entries of this file (after `finish`)."""
        file = os.path.basename(self.path)
        return {e.name: tensor_record(file, e.shape, e.dtype, off, e.nbytes, crc)
                for e, off, crc in zip(self.entries, self.offsets, self.crcs)}

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


# ---------------------------------------------------------------------------------------------
# Progress


def progress_bar(total_bytes: int, desc: str, show: bool | None = None) -> tqdm:
    """A bytes progress bar on stderr. `show` None: only for writes of at least PROGRESS_MIN_BYTES."""
    enabled = total_bytes >= PROGRESS_MIN_BYTES if show is None else show
    return tqdm(total=total_bytes, desc=desc, unit="B", unit_scale=True, disable=not enabled, file=sys.stderr,
                mininterval=0.5, dynamic_ncols=True)
