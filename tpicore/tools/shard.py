"""`tpi shard`: split a checkpoint into one folder per device, each holding only that device's slices.

Owns the shard folder format (a manifest plus one safetensors file per rank), its fingerprint, its
verification, and the on-the-fly shard cache behind `tpi generate --devices N`. What each rank holds
comes from tpicore.plan (`plan_layouts`, `shard_slice`); this module only moves bytes. Must not do
any math on the weights.

One folder per rank:
  OUT/rank-r/shard.safetensors  that rank's slices under their full HF names, dtype as stored (F32/F16/BF16)
  OUT/rank-r/manifest.json      format, fingerprint, rank, layout, source config, per-tensor offset + CRC32
  OUT/rank-0/config.json, tokenizer.json, ...  only the master tokenizes and holds embedding, norm, head

Data path: one pass over the source, every rank's file written at once, so each source byte is read once:

  source *.safetensors --pread--> read buffer (whole rows, <= CHUNK_BYTES)
        |  whole tensor or a row range (q/k/v, gate/up, norms): written straight from the read buffer
        |  a column range (o_proj, down_proj): gathered into a second reused buffer, then written
        v
  rank-0/shard.safetensors, rank-1/..., ...   (CRC32 updated as the bytes go out)

Memory: the source is read with pread into two reused buffers rather than through memory maps, so the
process holds about two chunks however big the model is (a memmap slice would leave every page it
touched resident). Because nothing is mapped, posix_fadvise(DONTNEED) can also drop the page cache of
what was read and, after fdatasync, of what was written (machine.md: fadvise ignores mapped pages).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import sys
import time
import zlib
from dataclasses import dataclass
from typing import Any, Iterable

import numpy as np

from tpicore.errors import TpiError
from tpicore.model.config import ModelConfig, read_json
from tpicore.model.split import (
    Layout,
    parse_ratios,
    plan_layouts,
    shard_slice,
    split_leaf,
)
from tpicore.weights.checkpoint import (
    DTYPES,
    Checkpoint,
    TensorInfo,
    read_safetensors_header,
)
from tpicore.weights.manifest import (
    FORMAT,
    MANIFEST_FILE,
    SHARD_FILE,
    manifest_text,
    read_manifest,
)
from tpicore.weights.store import TensorStore

# Copied into rank 0 only, when present: the master is the one process that reads configs and tokenizes.
MASTER_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                "chat_template.jinja", "special_tokens_map.json")
# Buffers some older checkpoints saved next to the weights; RoPE is recomputed from the config.
IGNORED_LEAVES = ("self_attn.rotary_emb.inv_freq",)

CHUNK_BYTES = 64 << 20  # most source bytes read at once (whole rows); peak RSS is about twice this
FLUSH_BYTES = 256 << 20  # bytes written to one file between fdatasync + dropping them from the page cache
SAMPLE_BYTES = 4096  # leading bytes of every source tensor that go into the fingerprint
PROGRESS_MIN_BYTES = 256 << 20  # report progress on stderr only for models at least this big
PROGRESS_EVERY_S = 2.0



class OutputExists(TpiError):
    """The output folder is already there and holds something (and --force was not given)."""


# ---------------------------------------------------------------------------------------------
# What goes where (decided before anything is written)


@dataclass(frozen=True)
class Piece:
    """The part of one source tensor that one rank stores: `how` is True (whole) or (axis, start, stop)."""

    rank: int
    how: tuple[int, int, int] | bool
    shape: tuple[int, ...]
    nbytes: int


@dataclass(frozen=True)
class Item:
    """One source tensor and the pieces of it the ranks hold, in rank order."""

    info: TensorInfo
    pieces: tuple[Piece, ...]

    @property
    def row_bytes(self) -> int:
        rows = self.info.shape[0] if self.info.shape else 1
        return self.info.nbytes // rows if rows else 0


@dataclass
class Job:
    model_dir: str
    config: dict[str, Any]  # config.json as found in the source
    generation: dict[str, Any] | None
    cfg: ModelConfig
    ckpt: Checkpoint
    ratios: list[float]
    layouts: list[Layout]
    layer_map: list[int]
    items: list[Item]  # in write order (the same order in every rank's file)
    fingerprint: str
    chunk_bytes: int  # size of the reused read buffer

    @property
    def world_size(self) -> int:
        return len(self.layouts)

    @property
    def output_bytes(self) -> int:
        """Tensor bytes all ranks' files hold together (headers and manifests aside)."""
        return sum(p.nbytes for it in self.items for p in it.pieces)

    def rank_items(self, rank: int) -> list[tuple[TensorInfo, Piece]]:
        return [(it.info, p) for it in self.items for p in it.pieces if p.rank == rank]


def check_ratios(ratios: Iterable[float] | None, world_size: int) -> list[float]:
    """Ratios as a list of positive floats, one per device (default: equal)."""
    if ratios is None:
        return [1.0] * max(world_size, 0)
    if isinstance(ratios, str):
        return parse_ratios(ratios, world_size)
    out = [float(r) for r in ratios]
    if len(out) != world_size:
        raise TpiError(f"--ratios: got {len(out)} values for {world_size} devices")
    if any(not r > 0 for r in out):
        raise TpiError(f"--ratios: every ratio must be > 0, got {out}")
    return out


def sliced_shape(shape: tuple[int, ...], how: tuple[int, int, int] | bool) -> tuple[int, ...]:
    if how is True:
        return shape
    axis, start, stop = how
    return shape[:axis] + (stop - start,) + shape[axis + 1:]


def plan_items(ckpt: Checkpoint, cfg: ModelConfig, layouts: list[Layout]) -> list[Item]:
    """Every source tensor some rank holds, with its pieces. The order puts wider dtypes first so that
    every tensor in the output files stays aligned to its element size (the header is padded to 8)."""
    items = []
    for info in sorted(ckpt.tensors.values(), key=lambda t: (-t.itemsize, t.path, t.offset)):
        if split_leaf(info.name)[1] in IGNORED_LEAVES:
            continue
        pieces = []
        for lay in layouts:
            how = shard_slice(info.name, lay, cfg)
            if how is False:
                continue
            if how is not True and how[0] >= max(len(info.shape), 1):
                raise TpiError(f"{info.path}: tensor {info.name!r} has shape {list(info.shape)}, "
                               f"which the plan cannot split along axis {how[0]}")
            shape = sliced_shape(info.shape, how)
            pieces.append(Piece(lay.rank, how, shape, int(np.prod(shape, dtype=np.int64)) * info.itemsize))
        if pieces:
            items.append(Item(info, tuple(pieces)))
    return items


def _read_exact(fd: int, buf: memoryview, offset: int, path: str) -> None:
    """Fill `buf` from byte `offset` of the file (pread may return fewer bytes than asked)."""
    got = 0
    while got < len(buf):
        n = os.preadv(fd, [buf[got:]], offset + got)
        if n == 0:
            raise TpiError(f"{path}: unexpected end of file at byte {offset + got}")
        got += n


def _drop_cache(fd: int, offset: int = 0, length: int = 0) -> None:
    if hasattr(os, "posix_fadvise"):
        os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)


def _canonical_hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def compute_fingerprint(config: dict[str, Any], ckpt: Checkpoint, layouts: list[Layout], layer_map: list[int]) -> str:
    """sha256 identifying model + split, shared by all ranks and compared in the transport handshake.

    Covers the canonical config, every source tensor's name/shape/dtype plus a CRC32 of its first
    SAMPLE_BYTES (so two fine-tunes of one architecture differ, for one small read per tensor), the
    layouts of all ranks (which encode world size and the effect of the ratios: ratios giving the same
    layouts give compatible shards) and the layer map.
    """
    tensors = []
    fds: dict[str, int] = {}
    try:
        for info in sorted(ckpt.tensors.values(), key=lambda t: t.name):
            fd = fds.get(info.path)
            if fd is None:
                fd = fds[info.path] = os.open(info.path, os.O_RDONLY)
            head = memoryview(bytearray(min(info.nbytes, SAMPLE_BYTES)))
            _read_exact(fd, head, info.offset, info.path)
            tensors.append([info.name, list(info.shape), info.dtype, zlib.crc32(head)])
    finally:
        for fd in fds.values():
            os.close(fd)
    doc = {"format": FORMAT, "config": config, "tensors": tensors, "layouts": [lay.to_json() for lay in layouts],
           "layer_map": layer_map}
    return _canonical_hash(doc)


def plan_job(model_dir: str, world_size: int, ratios: Iterable[float] | None = None) -> Job:
    """Read and validate everything (config, tensor headers and shapes, the split) before writing."""
    ratios = check_ratios(ratios, world_size)
    cfg = ModelConfig.from_dir(model_dir)
    config = read_json(os.path.join(model_dir, "config.json"))
    gen_path = os.path.join(model_dir, "generation_config.json")
    generation = read_json(gen_path) if os.path.exists(gen_path) else None
    layouts = plan_layouts(cfg, world_size, ratios)
    ckpt = Checkpoint.from_dir(model_dir)
    TensorStore(ckpt, cfg, plan_layouts(cfg, 1)[0], root=model_dir).check()  # names the bad tensor and file
    items = plan_items(ckpt, cfg, layouts)
    layer_map = list(range(cfg.num_hidden_layers))
    chunk = 0
    for it in items:
        rows_per_chunk = max(1, CHUNK_BYTES // max(it.row_bytes, 1))
        chunk = max(chunk, min(it.info.nbytes, rows_per_chunk * it.row_bytes))
    return Job(model_dir, config, generation, cfg, ckpt, ratios, layouts, layer_map, items,
               compute_fingerprint(config, ckpt, layouts, layer_map), chunk)


def model_fingerprint(model_dir: str, world_size: int, ratios: Iterable[float] | None = None) -> str:
    """The fingerprint that shards of this model and split carry (reads headers and a few KiB only)."""
    return plan_job(model_dir, world_size, ratios).fingerprint


# ---------------------------------------------------------------------------------------------
# Writing


def _safetensors_header(entries: list[tuple[str, str, tuple[int, ...], int]], metadata: dict[str, str]) -> bytes:
    """The length-prefixed JSON header for tensors stored back to back in `entries` order, padded with
    spaces to a multiple of 8 bytes (as the safetensors library writes it)."""
    header: dict[str, Any] = {"__metadata__": metadata}
    pos = 0
    for name, dtype, shape, nbytes in entries:
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [pos, pos + nbytes]}
        pos += nbytes
    body = json.dumps(header, separators=(",", ":")).encode()
    body += b" " * (-len(body) % 8)
    return len(body).to_bytes(8, "little") + body


class ShardWriter:
    """One rank's shard.safetensors, written front to back in header order, with a CRC32 per tensor."""

    def __init__(self, path: str, entries: list[tuple[str, str, tuple[int, ...], int]], metadata: dict[str, str]) -> None:
        self.path, self.entries = path, entries
        head = _safetensors_header(entries, metadata)
        self.data_start = len(head)
        self.offsets, pos = [], self.data_start
        for *_, nbytes in entries:
            self.offsets.append(pos)
            pos += nbytes
        self.size = pos
        self.crcs: list[int] = []
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        self._crc = 0
        self._done = 0  # bytes of the current tensor written so far
        self._written = len(head)
        self._flushed = 0
        self._write(memoryview(head))
        self._skip_empty()

    def _write(self, mv: memoryview) -> None:
        while len(mv):
            n = os.write(self.fd, mv)
            mv = mv[n:]

    def _skip_empty(self) -> None:
        while len(self.crcs) < len(self.entries) and self.entries[len(self.crcs)][3] == 0:
            self.crcs.append(0)

    def write(self, name: str, arr: np.ndarray) -> None:
        """Append the next bytes of tensor `name` (must be the tensor the header expects next)."""
        i = len(self.crcs)
        if i >= len(self.entries) or self.entries[i][0] != name:
            expected = self.entries[i][0] if i < len(self.entries) else "nothing"
            raise AssertionError(f"{self.path}: got bytes of {name!r}, expected {expected!r}")
        mv = memoryview(np.ascontiguousarray(arr).reshape(-1).view(np.uint8))
        nbytes = self.entries[i][3]
        if self._done + len(mv) > nbytes:
            raise AssertionError(f"{self.path}: {name!r} would exceed its {nbytes} bytes")
        self._crc = zlib.crc32(mv, self._crc)
        self._write(mv)
        self._done += len(mv)
        self._written += len(mv)
        if self._done == nbytes:
            self.crcs.append(self._crc)
            self._crc = self._done = 0
            self._skip_empty()
        if self._written - self._flushed >= FLUSH_BYTES:
            self._flush()

    def _flush(self) -> None:
        """Push written pages to disk and drop them from the page cache, so the cache stays bounded."""
        os.fdatasync(self.fd)
        _drop_cache(self.fd)
        self._flushed = self._written

    def finish(self) -> None:
        if len(self.crcs) != len(self.entries):
            raise AssertionError(f"{self.path}: {len(self.entries) - len(self.crcs)} tensors not written")
        if self._written != self.size:
            raise AssertionError(f"{self.path}: wrote {self._written} bytes, header says {self.size}")
        os.fsync(self.fd)
        _drop_cache(self.fd)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class Progress:
    """Occasional 'bytes read' lines on stderr for models big enough to take a while."""

    def __init__(self, total: int, quiet: bool) -> None:
        self.total, self.done = total, 0
        self.enabled = not quiet and total >= PROGRESS_MIN_BYTES
        self.t0 = self.last = time.monotonic()

    def add(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if self.enabled and now - self.last >= PROGRESS_EVERY_S:
            self.last = now
            rate = self.done / max(now - self.t0, 1e-9)
            print(f"shard: {self.done / 1e9:.2f}/{self.total / 1e9:.2f} GB read "
                  f"({100 * self.done / self.total:.0f}%), {rate / 1e9:.2f} GB/s", file=sys.stderr, flush=True)


def _part(chunk: np.ndarray, how: tuple[int, int, int] | bool, r0: int, r1: int, gather: np.ndarray) -> np.ndarray | None:
    """A rank's part of rows r0..r1 of a tensor (`chunk`), or None if it holds none of those rows."""
    if how is True:
        return chunk
    axis, start, stop = how
    if axis == 0:
        lo, hi = max(start, r0), min(stop, r1)
        return chunk[lo - r0: hi - r0] if lo < hi else None
    # axis 1 (o_proj, down_proj: split by input dim): columns start..stop of every row, made contiguous
    # in the reused gather buffer. chunk [rows, in] -> [rows, stop - start]
    assert chunk.ndim == 2 and axis == 1, "the plan splits only 2-D weights along axis 1"
    rows = chunk.shape[0]
    out = gather[: rows * (stop - start) * chunk.itemsize].view(chunk.dtype).reshape(rows, stop - start)
    np.copyto(out, chunk[:, start:stop])
    return out


def stream_tensors(job: Job, writers: list[ShardWriter], progress: Progress) -> None:
    """Read every needed source tensor once, in chunks of whole rows, and hand each rank its part."""
    buf = np.empty(job.chunk_bytes, dtype=np.uint8)  # untouched until read into: costs no RSS up front
    needs_gather = any(p.how is not True and p.how[0] == 1 for it in job.items for p in it.pieces)
    gather = np.empty(job.chunk_bytes if needs_gather else 0, dtype=np.uint8)
    fds: dict[str, int] = {}
    try:
        for it in job.items:
            info = it.info
            fd = fds.get(info.path)
            if fd is None:
                fd = fds[info.path] = os.open(info.path, os.O_RDONLY)
            rows = info.shape[0] if info.shape else 1
            rows_per_chunk = max(1, CHUNK_BYTES // max(it.row_bytes, 1))
            for r0 in range(0, rows, rows_per_chunk):
                r1 = min(rows, r0 + rows_per_chunk)
                n = (r1 - r0) * it.row_bytes
                _read_exact(fd, memoryview(buf)[:n], info.offset + r0 * it.row_bytes, info.path)
                chunk = buf[:n].view(DTYPES[info.dtype]).reshape((r1 - r0,) + tuple(info.shape[1:]))
                for piece in it.pieces:
                    part = _part(chunk, piece.how, r0, r1, gather)
                    if part is not None:
                        writers[piece.rank].write(info.name, part)
                progress.add(n)
            _drop_cache(fd, info.offset, info.nbytes)  # read once; keep the page cache for others
    finally:
        for fd in fds.values():
            os.close(fd)


def _fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)




def _write_text(path: str, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def write_ranks(job: Job, root: str, quiet: bool) -> int:
    """Write rank-0..rank-(N-1) under `root` (a fresh temporary folder). Returns bytes written."""
    n = job.world_size
    dirs = [os.path.join(root, f"rank-{r}") for r in range(n)]
    per_rank = [job.rank_items(r) for r in range(n)]
    writers: list[ShardWriter] = []
    try:
        for r, d in enumerate(dirs):
            os.mkdir(d)
            entries = [(info.name, info.dtype, p.shape, p.nbytes) for info, p in per_rank[r]]
            meta = {"format": FORMAT, "rank": str(r), "world_size": str(n)}
            writers.append(ShardWriter(os.path.join(d, SHARD_FILE), entries, meta))
        stream_tensors(job, writers, Progress(sum(it.info.nbytes for it in job.items), quiet))
        for w in writers:
            w.finish()
    finally:
        for w in writers:
            w.close()

    for r, d in enumerate(dirs):
        w = writers[r]
        tensors = {info.name: {"file": SHARD_FILE, "shape": list(p.shape), "dtype": info.dtype,
                               "offset": w.offsets[i], "nbytes": p.nbytes, "crc32": w.crcs[i]}
                   for i, (info, p) in enumerate(per_rank[r])}
        manifest = {"format": FORMAT, "fingerprint": job.fingerprint, "rank": r, "world_size": n,
                    "ratios": job.ratios, "layout": job.layouts[r].to_json(), "config": job.config,
                    "generation_config": job.generation, "layer_map": job.layer_map,
                    "files": [SHARD_FILE], "tensors": tensors}
        _write_text(os.path.join(d, MANIFEST_FILE), manifest_text(manifest))
    for name in MASTER_FILES:
        src = os.path.join(job.model_dir, name)
        if os.path.isfile(src):
            shutil.copyfile(src, os.path.join(dirs[0], name))
            _fsync_path(os.path.join(dirs[0], name))
    for d in dirs + [root]:
        _fsync_path(d)
    return sum(w.size for w in writers)


# ---------------------------------------------------------------------------------------------
# The output folder: refuse, replace, publish


RANK_DIR = re.compile(r"rank-\d+")


def _check_out(out: str, force: bool) -> None:
    """Refuse a non-empty OUT unless forced, and never force-replace a folder that is not shard output."""
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
        raise OutputExists(f"{out}: already exists and is not empty (use --force to replace it)")
    strangers = [e for e in entries if not (RANK_DIR.fullmatch(e) and os.path.isdir(os.path.join(out, e)))]
    if strangers:
        raise TpiError(f"{out}: does not look like `tpi shard` output (it holds {strangers[0]!r}); "
                       "refusing to replace it even with --force")


def _publish(tmp: str, out: str, force: bool) -> None:
    """Move the finished temporary folder to OUT. rename(2) replaces an absent or empty OUT atomically;
    a forced replacement of a full OUT is two renames (old out of the way, new in), then a delete."""
    _check_out(out, force)  # again: something may have appeared while we were writing
    try:
        os.replace(tmp, out)
    except OSError:
        if not os.path.isdir(out) or not os.listdir(out):
            raise
        if not force:
            raise OutputExists(f"{out}: already exists and is not empty (use --force to replace it)") from None
        old = f"{out}.old-{os.getpid()}"
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    _fsync_path(os.path.dirname(out))


def shard_checkpoint(model_dir: str, out_dir: str, world_size: int, ratios: Iterable[float] | None = None,
                     force: bool = False, quiet: bool = False) -> list[str]:
    """Split the HF checkpoint in `model_dir` for `world_size` devices into OUT/rank-0 .. rank-(N-1).

    Written into OUT.tmp-<pid> and renamed into place at the end, so OUT is either absent or complete;
    the temporary folder is removed on any error. Returns the rank folders in rank order.
    """
    t0 = time.monotonic()
    job = plan_job(model_dir, world_size, ratios)
    out = os.path.abspath(out_dir)
    _check_out(out, force)
    tmp = f"{out}.tmp-{os.getpid()}"
    try:
        os.makedirs(os.path.dirname(out), exist_ok=True)
        free = shutil.disk_usage(os.path.dirname(out)).free
        if free < job.output_bytes:  # refuse now rather than fail with ENOSPC after minutes of writing
            raise TpiError(f"{out}: the shards need {job.output_bytes / 1e9:.2f} GB, "
                           f"only {free / 1e9:.2f} GB free there")
        shutil.rmtree(tmp, ignore_errors=True)  # left by a crashed run that had our pid
        os.mkdir(tmp)
        nbytes = write_ranks(job, tmp, quiet)
        _publish(tmp, out, force)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):
            raise TpiError(f"{e.filename or out}: cannot write shards: {e.strerror or e}") from None
        raise
    finally:
        job.ckpt.close()
    if not quiet:
        print(f"shard: wrote {world_size} folders to {out} ({nbytes / 1e6:.1f} MB) in {time.monotonic() - t0:.1f} s",
              file=sys.stderr)
    return [os.path.join(out, f"rank-{r}") for r in range(world_size)]


# ---------------------------------------------------------------------------------------------
# Reading and checking shard folders








def verify_shard(shard_dir: str) -> int:
    """Check a shard folder against its manifest: safetensors headers agree, and every tensor's CRC32
    matches. Raises TpiError naming the tensor and file on a mismatch; returns the bytes checked."""
    man = read_manifest(shard_dir)
    headers = {f: read_safetensors_header(os.path.join(shard_dir, f)) for f in man["files"]}
    buf = np.empty(0, dtype=np.uint8)
    checked = 0
    fds: dict[str, int] = {}
    try:
        for name, t in man["tensors"].items():
            path = os.path.join(shard_dir, t["file"])
            h = headers[t["file"]].get(name)
            if h is None:
                raise TpiError(f"{path}: tensor {name!r} is in the manifest but not in the file")
            if (list(h.shape), h.dtype, h.offset, h.nbytes) != (t["shape"], t["dtype"], t["offset"], t["nbytes"]):
                raise TpiError(f"{path}: tensor {name!r}: file header ({list(h.shape)} {h.dtype} at {h.offset}) "
                               f"disagrees with the manifest ({t['shape']} {t['dtype']} at {t['offset']})")
            fd = fds.get(path)
            if fd is None:
                fd = fds[path] = os.open(path, os.O_RDONLY)
            crc, pos, end = 0, t["offset"], t["offset"] + t["nbytes"]
            while pos < end:
                n = min(CHUNK_BYTES, end - pos)
                if len(buf) < n:
                    buf = np.empty(min(CHUNK_BYTES, t["nbytes"]), dtype=np.uint8)
                mv = memoryview(buf)[:n]
                _read_exact(fd, mv, pos, path)
                crc = zlib.crc32(mv, crc)
                pos += n
            if crc != t["crc32"]:
                raise TpiError(f"{path}: tensor {name!r}: CRC32 mismatch (manifest {t['crc32']:08x}, data {crc:08x});"
                               " the shard is corrupt, re-run tpi shard")
            checked += t["nbytes"]
    finally:
        for fd in fds.values():
            os.close(fd)
    return checked


# ---------------------------------------------------------------------------------------------
# The on-the-fly cache (`tpi generate --model DIR --devices N`)


def default_cache_root() -> str:
    """$TPI_CACHE_DIR/shards, else $XDG_CACHE_HOME/tpicore/shards, else ~/.cache/tpicore/shards."""
    base = os.environ.get("TPI_CACHE_DIR")
    if not base:
        base = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "tpicore")
    return os.path.join(base, "shards")


def _source_state(model_dir: str) -> list[list[Any]]:
    """Name, size and mtime of every file sharding reads, so an edited checkpoint gets new shards."""
    state = []
    for name in sorted(os.listdir(model_dir)):
        if name.endswith(".safetensors") or name == "model.safetensors.index.json" or name in MASTER_FILES:
            st = os.stat(os.path.join(model_dir, name))
            state.append([name, st.st_size, st.st_mtime_ns])
    return state


def _complete(out: str, world_size: int) -> bool:
    try:
        mans = [read_manifest(os.path.join(out, f"rank-{r}")) for r in range(world_size)]
    except TpiError:
        return False
    return (all(m["world_size"] == world_size for m in mans)
            and len({m["fingerprint"] for m in mans}) == 1
            and not os.path.exists(os.path.join(out, f"rank-{world_size}")))


def cached_shards(model_dir: str, world_size: int, ratios: Iterable[float] | None = None,
                  cache_root: str | None = None, quiet: bool = False) -> list[str]:
    """Rank folders for `model_dir` split for `world_size` devices, sharded on first use and reused after.

    The cache folder is `<split>-<state>`: split = hash(real model path, N, ratios), state = hash(file
    names, sizes, mtimes). A changed checkpoint gets a new state; older states of the same split are
    deleted once the new one is in place.
    """
    ratios = check_ratios(ratios, world_size)
    model = os.path.realpath(model_dir)
    if not os.path.isdir(model):
        raise TpiError(f"{model_dir}: model folder not found")
    root = os.path.abspath(cache_root or default_cache_root())
    split = _canonical_hash({"format": FORMAT, "model": model, "world_size": world_size, "ratios": ratios})[:16]
    state = _canonical_hash(_source_state(model))[:16]
    out = os.path.join(root, f"{split}-{state}")
    folders = [os.path.join(out, f"rank-{r}") for r in range(world_size)]
    if _complete(out, world_size):
        return folders
    os.makedirs(root, exist_ok=True)
    # one process shards while others wait for it (two `tpi generate` runs started together)
    with open(os.path.join(root, f"{split}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _complete(out, world_size):
            return folders
        if not quiet:
            print(f"shard: first use of {model} on {world_size} devices; writing shards to {out}", file=sys.stderr)
        try:
            shard_checkpoint(model, out, world_size, ratios, force=os.path.isdir(out), quiet=quiet)
        except OutputExists:  # another process finished the same shards first (no flock on this filesystem?)
            if not _complete(out, world_size):
                raise
        stale = re.compile(re.escape(split) + r"-[0-9a-f]{16}")
        for name in os.listdir(root):
            if stale.fullmatch(name) and name != os.path.basename(out):
                shutil.rmtree(os.path.join(root, name), ignore_errors=True)
    return folders


# ---------------------------------------------------------------------------------------------
# CLI




