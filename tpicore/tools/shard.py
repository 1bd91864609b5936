"""`tpi shard`: split a checkpoint into one folder per device, each holding only that device's slices.

Layer: tools. Owns what goes into the shard folders (which source bytes each rank stores), their
fingerprint, their verification, and the on-the-fly shard cache behind `tpi generate --devices N`. What
each rank holds comes from tpicore.model (`split_layouts`, and `shard_slice` over the table of tensors);
the files are written through tpicore.weights.writer (safetensors writer, manifests, atomic publish).
This module only moves bytes. Must not do any math on the weights.

One folder per rank:
  OUT/rank-r/shard.safetensors  that rank's slices under their full HF names, dtype as stored (F32/F16/BF16)
  OUT/rank-r/manifest.json      format, fingerprint, rank, layout, source config, per-tensor offset + CRC32
  OUT/rank-0/config.json, tokenizer.json, ...  only the master tokenizes and holds embedding, norm, head

A GGUF source (a file or split set) is sharded the same way: its config and tokenizer go to rank 0 as
config.json / tokenizer.json / tokenizer_config.json, q/k rows are put back in HF order as they are read
(whole heads per chunk), and quantized tensors stay quantized: a row split keeps ggml blocks whole; a
column split (o_proj, down_proj) cut on block boundaries (32 or 256 elements) is a byte range of every
row; a cut inside a block stores that slice dequantized (f32, exact, never requantized; the byte cost is
printed). Quantized slices are U8 [rows, row_bytes] in the safetensors file (its __metadata__ names their
ggml types) and their ggml type and [rows, cols] in the manifest.

Data path: one pass over the source, every rank's file written at once, so each source byte is read once:

  source *.safetensors --pread--> read buffer (whole rows, <= CHUNK_BYTES)
        |  whole tensor or a row range (q/k/v, gate/up, norms): written straight from the read buffer
        |  a column range (o_proj, down_proj): gathered into a second reused buffer, then written
        v
  rank-0/shard.safetensors, rank-1/..., ...   (CRC32 updated as the bytes go out)

Memory: the source is read with pread into two reused buffers rather than through memory maps, so the
process holds about two chunks however big the model is (a memmap slice would leave every page it
touched resident). Because nothing is mapped, posix_fadvise(DONTNEED) can also drop the page cache of
what was read and, after fdatasync, of what was written (fadvise leaves pages that are mapped).
"""

from __future__ import annotations

import fcntl
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
from tqdm import tqdm

from tpicore.errors import TpiError
from tpicore.model.config import ModelConfig, read_json
from tpicore.model.split import Layout, check_ratios, split_layouts
from tpicore.model.tensors import WHOLE, Part, shard_slice, split_leaf, whole
from tpicore.weights.checkpoint import (
    GGML_TYPES_KEY,
    Checkpoint,
    TensorInfo,
    stored_layout,
    to_f32,
)
from tpicore.weights.gguf import (
    GGUFCheckpoint,
    gguf_tokenizer_files,
    hf_config_dict,
    is_gguf_path,
    split_files,
)
from tpicore.weights.integrity import master_file_crcs, verify_checkpoint, verify_folder
from tpicore.weights.manifest import (
    FORMAT,
    MANIFEST_FILE,
    SHARD_FILE,
    canonical_hash,
    check_fingerprint,
    new_manifest,
    read_manifest,
    shard_fingerprint,
)
from tpicore.weights.quant import (
    GGML_TYPES,
    column_bytes,
    covering_blocks,
    hf_row_order,
    is_block_quantized,
    stored_shape,
    tensor_nbytes,
)
from tpicore.weights.reader import drop_cache, read_exact
from tpicore.weights.store import TensorStore
from tpicore.weights.writer import (
    FLUSH_BYTES,
    RANK_FOLDERS,
    Entry,
    OutputExists,
    SafetensorsWriter,
    copy_file,
    progress_bar,
    staged_folder,
    write_manifest,
    write_text,
)

# Copied into rank 0 only, when present: the master is the one process that reads configs and tokenizes.
MASTER_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                "chat_template.jinja", "special_tokens_map.json")
# Buffers some older checkpoints saved next to the weights; RoPE is recomputed from the config.
IGNORED_LEAVES = ("self_attn.rotary_emb.inv_freq",)

CHUNK_BYTES = 64 << 20  # most source bytes read at once (whole rows); peak RSS is about twice this
SAMPLE_BYTES = 4096  # leading bytes of every source tensor that go into the fingerprint

# ---------------------------------------------------------------------------------------------
# What goes where (decided before anything is written)


@dataclass(frozen=True)
class Piece:
    """The part of one source tensor that one rank stores.

    `part` is the range in elements of the tensor, `cut` the same range in stored units (for a column range
    of ggml blocks: bytes of a row). `dtype` is what the rank stores: the source's tag (quantized slices stay
    quantized, as U8 blocks in the file), or F32 where a column cut falls inside a ggml block: then `blocks`
    is the covering block range of each row, dequantized and cut (exact; never requantized).
    """

    rank: int
    part: Part
    shape: tuple[int, ...]
    nbytes: int
    dtype: str = "F32"
    cut: Part = WHOLE
    blocks: tuple[int, int] | None = None

    @property
    def dequantized(self) -> bool:
        return self.blocks is not None

    @property
    def file_entry(self) -> tuple[str, tuple[int, ...]]:
        """(safetensors dtype, shape) in the file: ggml blocks are U8 [rows, row_bytes]."""
        if is_block_quantized(self.dtype):
            return "U8", stored_shape(self.dtype, self.shape)
        return self.dtype, self.shape

    @property
    def align(self) -> int:
        """The largest of 4, 2, 1 that divides its byte size (f32 pieces first keeps them aligned)."""
        return 4 if self.nbytes % 4 == 0 else 2 if self.nbytes % 2 == 0 else 1


@dataclass(frozen=True)
class Item:
    """One source tensor and the pieces of it the ranks hold, in rank order."""

    info: TensorInfo
    pieces: tuple[Piece, ...]

    @property
    def row_bytes(self) -> int:
        rows = self.info.shape[0] if self.info.shape else 1
        return self.info.nbytes // rows if rows else 0

    @property
    def rows_per_chunk(self) -> int:
        """Source rows read at once: CHUNK_BYTES of them; fewer where a row is widened to f32 before it is
        cut; whole heads of a GGUF q/k projection, whose llama.cpp row order is undone head by head."""
        rows = max(1, CHUNK_BYTES // max(self.row_bytes, 1))
        if any(p.dequantized for p in self.pieces):
            rows = max(1, min(rows, CHUNK_BYTES // (4 * self.info.shape[-1])))
        if self.info.llama_cpp_heads:
            per_head = self.info.shape[0] // self.info.llama_cpp_heads
            rows = max(1, rows // per_head) * per_head
        return rows


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
    source: str  # digest of the source weights (in every manifest: the fingerprint is recomputed from it)

    @property
    def world_size(self) -> int:
        return len(self.layouts)

    @property
    def output_bytes(self) -> int:
        """Tensor bytes all ranks' files hold together (headers and manifests aside)."""
        return sum(p.nbytes for it in self.items for p in it.pieces)

    def rank_items(self, rank: int) -> list[tuple[TensorInfo, Piece]]:
        return [(it.info, p) for it in self.items for p in it.pieces if p.rank == rank]


def make_piece(info: TensorInfo, part: Part, rank: int) -> Piece:
    """What rank `rank` stores of `info` for `part`: its bytes, dtype and the range in stored units."""
    shape = part.shape(info.shape)
    if not is_block_quantized(info.dtype):
        return Piece(rank, part, shape, int(np.prod(shape, dtype=np.int64)) * info.itemsize, info.dtype, part)
    if part.whole or part.axis < len(info.shape) - 1:  # whole rows of blocks
        return Piece(rank, part, shape, tensor_nbytes(info.dtype, shape), info.dtype, part)
    if len(info.shape) < 2:
        raise TpiError(f"{info.path}: tensor {info.name!r}: a 1-D {info.dtype} tensor cannot be split")
    cut = column_bytes(info.dtype, part.start, part.stop)  # a column range on block boundaries: bytes of rows
    if cut is not None:
        return Piece(rank, part, shape, tensor_nbytes(info.dtype, shape), info.dtype, Part(1, *cut))
    b0, b1 = covering_blocks(info.dtype, part.start, part.stop)
    nb = GGML_TYPES[info.dtype].block_bytes
    return Piece(rank, part, shape, int(np.prod(shape, dtype=np.int64)) * 4, "F32", Part(1, b0 * nb, b1 * nb),
                 (b0, b1))


def assign_pieces(ckpt: Checkpoint, cfg: ModelConfig, layouts: list[Layout]) -> list[Item]:
    """Every source tensor some rank holds, with its pieces. The order puts pieces whose sizes are multiples
    of 4 first (f32, then f16/bf16, then odd-sized ggml slices) so that every tensor in the output files
    stays aligned to its element size (the header is padded to 8)."""
    items = []
    for info in ckpt.tensors.values():
        if split_leaf(info.name)[1] in IGNORED_LEAVES:
            continue
        pieces = []
        for lay in layouts:
            part = shard_slice(info.name, lay, cfg)
            if part is None:
                continue
            if not part.whole and part.axis >= max(len(info.shape), 1):
                raise TpiError(f"{info.path}: tensor {info.name!r} has shape {list(info.shape)}, "
                               f"which the split cannot cut along axis {part.axis}")
            pieces.append(make_piece(info, part, lay.rank))
        if pieces:
            items.append(Item(info, tuple(pieces)))
    return sorted(items, key=lambda it: (-min(p.align for p in it.pieces), it.info.path, it.info.offset))


def source_digest(ckpt: Checkpoint) -> str:
    """sha256 identifying the source weights: every source tensor's name/shape/dtype plus a CRC32 of its
    first SAMPLE_BYTES (so two fine-tunes of one architecture differ, for one small read per tensor)."""
    tensors = []
    fds: dict[str, int] = {}
    try:
        for info in sorted(ckpt.tensors.values(), key=lambda t: t.name):
            fd = fds.get(info.path)
            if fd is None:
                fd = fds[info.path] = os.open(info.path, os.O_RDONLY)
            head = memoryview(bytearray(min(info.nbytes, SAMPLE_BYTES)))
            read_exact(fd, head, info.offset, info.path)
            tensors.append([info.name, list(info.shape), info.dtype, zlib.crc32(head)])
    finally:
        for fd in fds.values():
            os.close(fd)
    return canonical_hash({"format": FORMAT, "tensors": tensors})


def compute_fingerprint(config: dict[str, Any], ckpt: Checkpoint, layouts: list[Layout], layer_map: list[int]) -> str:
    """sha256 identifying model + split, shared by all ranks and compared in the transport handshake:
    `shard_fingerprint` of the config, the layouts of all ranks, the layer map and the source digest (each
    rank recomputes it from its manifest at load)."""
    return shard_fingerprint(config, layouts, layer_map, source_digest(ckpt))


def prepare_job(model_dir: str, world_size: int, ratios: Iterable[float] | None = None,
                private_layers: int = 0) -> Job:
    """Read and validate everything (config, tensor headers and shapes, the split) before writing."""
    ratios = check_ratios(ratios, world_size)
    if is_gguf_path(model_dir):  # config and tensors from the GGUF file(s)
        ckpt: Checkpoint = GGUFCheckpoint(model_dir)
        cfg = ckpt.cfg
        config, generation = hf_config_dict(cfg), None
    else:
        cfg = ModelConfig.from_dir(model_dir)
        config = read_json(os.path.join(model_dir, "config.json"))
        gen_path = os.path.join(model_dir, "generation_config.json")
        generation = read_json(gen_path) if os.path.exists(gen_path) else None
        ckpt = Checkpoint.from_dir(model_dir)
    layouts = split_layouts(cfg, world_size, ratios, private_layers)  # private layers: whole on rank 0 only
    TensorStore(ckpt, cfg, whole(cfg), root=model_dir).check()  # names the bad tensor and file
    items = assign_pieces(ckpt, cfg, layouts)
    layer_map = list(range(cfg.num_hidden_layers))
    chunk = max([min(it.info.nbytes, it.rows_per_chunk * it.row_bytes) for it in items], default=0)
    source = source_digest(ckpt)
    return Job(model_dir, config, generation, cfg, ckpt, ratios, layouts, layer_map, items,
               shard_fingerprint(config, layouts, layer_map, source), chunk, source)


def model_fingerprint(model_dir: str, world_size: int, ratios: Iterable[float] | None = None) -> str:
    """The fingerprint that shards of this model and split carry (reads headers and a few KiB only)."""
    return prepare_job(model_dir, world_size, ratios).fingerprint


# ---------------------------------------------------------------------------------------------
# Writing


def piece_rows(chunk: np.ndarray, info: TensorInfo, piece: Piece, r0: int, r1: int,
               gather: np.ndarray | None = None) -> np.ndarray | None:
    """A rank's part of rows r0..r1 of a tensor (`chunk`, as stored), or None if it holds none of those rows."""
    part = piece.cut
    rows = part.of_rows(chunk, r0, r1)
    if rows is None or part.axis != 1:
        return rows
    if piece.blocks is not None:  # a cut inside a ggml block: the covering blocks, dequantized, then cut
        lo = piece.part.start - piece.blocks[0] * GGML_TYPES[info.dtype].block_elems
        wide = to_f32(rows, info.dtype)  # [rows, covering blocks' bytes] -> [rows, their elements] f32
        return wide[:, lo: lo + piece.part.stop - piece.part.start]  # -> [rows, stop - start]
    # axis 1 (o_proj, down_proj: split by input dim): columns start..stop of every row, made contiguous
    # in the reused gather buffer. chunk [rows, in] -> [rows, stop - start]
    assert chunk.ndim == 2, "the split cuts only 2-D weights along axis 1"
    if gather is None:  # the writer makes the column range contiguous
        return rows
    out = gather[: rows.size * chunk.itemsize].view(chunk.dtype).reshape(rows.shape)
    np.copyto(out, rows)
    return out


def stream_tensors(job: Job, writers: list[SafetensorsWriter], progress: tqdm) -> None:
    """Read every needed source tensor once, in chunks of whole rows, and hand each rank its part."""
    buf = np.empty(job.chunk_bytes, dtype=np.uint8)  # untouched until read into: costs no RSS up front
    needs_gather = any(p.part.axis == 1 for it in job.items for p in it.pieces)
    gather = np.empty(job.chunk_bytes if needs_gather else 0, dtype=np.uint8)
    needs_order = any(it.info.llama_cpp_heads for it in job.items)
    order = np.empty(job.chunk_bytes if needs_order else 0, dtype=np.uint8)  # GGUF q/k rows put in HF order
    fds: dict[str, int] = {}
    try:
        for it in job.items:
            info = it.info
            fd = fds.get(info.path)
            if fd is None:
                fd = fds[info.path] = os.open(info.path, os.O_RDONLY)
            rows = info.shape[0] if info.shape else 1
            dtype, shape = stored_layout(info)  # ggml blocks: uint8 [rows, row_bytes]
            step = it.rows_per_chunk
            for r0 in range(0, rows, step):
                r1 = min(rows, r0 + step)
                n = (r1 - r0) * it.row_bytes
                read_exact(fd, memoryview(buf)[:n], info.offset + r0 * it.row_bytes, info.path)
                chunk = buf[:n].view(dtype).reshape((r1 - r0,) + tuple(shape[1:]))
                if info.llama_cpp_heads:  # whole heads: llama.cpp's row order -> HF's, head by head
                    heads = (r1 - r0) * info.llama_cpp_heads // rows
                    chunk = np.take(chunk, hf_row_order(r1 - r0, heads), axis=0,
                                    out=order[:n].view(dtype).reshape(chunk.shape))
                for piece in it.pieces:
                    part = piece_rows(chunk, info, piece, r0, r1, gather)
                    if part is not None:
                        writers[piece.rank].write(info.name, part)
                progress.update(n)
            drop_cache(fd, info.offset, info.nbytes)  # read once; keep the page cache for others
    finally:
        for fd in fds.values():
            os.close(fd)


def write_ranks(job: Job, root: str, quiet: bool) -> int:
    """Write rank-0..rank-(N-1) under `root` (a fresh temporary folder). Returns bytes written."""
    n = job.world_size
    dirs = [os.path.join(root, f"rank-{r}") for r in range(n)]
    per_rank = [job.rank_items(r) for r in range(n)]
    writers: list[SafetensorsWriter] = []
    try:
        for r, d in enumerate(dirs):
            os.mkdir(d)
            entries = [Entry(info.name, *p.file_entry, p.nbytes) for info, p in per_rank[r]]
            meta = {"format": FORMAT, "rank": str(r), "world_size": str(n)}
            ggml = {info.name: p.dtype for info, p in per_rank[r] if is_block_quantized(p.dtype)}
            if ggml:  # U8 tensors that hold ggml blocks (weights.checkpoint reads them back as such)
                meta[GGML_TYPES_KEY] = json.dumps(ggml, separators=(",", ":"))
            writers.append(SafetensorsWriter(os.path.join(d, SHARD_FILE), entries, meta, flush_bytes=FLUSH_BYTES))
        with progress_bar(sum(it.info.nbytes for it in job.items), "shard", None if not quiet else False) as bar:
            stream_tensors(job, writers, bar)
        for w in writers:
            w.finish()
    finally:
        for w in writers:
            w.close()

    for name in MASTER_FILES:
        src = os.path.join(job.model_dir, name)
        if os.path.isfile(src):
            copy_file(src, os.path.join(dirs[0], name))
    if is_gguf_path(job.model_dir):  # the GGUF's config and tokenizer, as the files of an HF folder
        texts = {"config.json": json.dumps(job.config, indent=1) + "\n", **gguf_tokenizer_files(job.model_dir)}
        for name, text in texts.items():
            write_text(os.path.join(dirs[0], name), text)
    for r, d in enumerate(dirs):  # last: rank 0's lists the CRC32s of the files above (checked at every load)
        write_manifest(d, new_manifest(fingerprint=job.fingerprint, source=job.source, rank=r, world_size=n, ratios=job.ratios,
                                       layout=job.layouts[r], config=job.config, generation=job.generation,
                                       layer_map=job.layer_map, tensors=manifest_tensors(writers[r], per_rank[r]),
                                       master_files=master_file_crcs(d, MASTER_FILES) if r == 0 else None))
    return sum(w.size for w in writers)


def manifest_tensors(writer: SafetensorsWriter, pieces: list[tuple[TensorInfo, Piece]]) -> dict[str, dict[str, Any]]:
    """The manifest's tensors of one rank: as written, with ggml slices named by type and [rows, cols]."""
    tensors = writer.manifest_tensors()
    for info, p in pieces:
        tensors[info.name].update(dtype=p.dtype, shape=list(p.shape))
    return tensors


def shard_checkpoint(model_dir: str, out_dir: str, world_size: int, ratios: Iterable[float] | None = None,
                     force: bool = False, quiet: bool = False, private_layers: int = 0) -> list[str]:
    """Split the HF checkpoint in `model_dir` for `world_size` devices into OUT/rank-0 .. rank-(N-1).

    Written into a temporary folder next to OUT and renamed into place at the end (weights.writer), so
    OUT is either absent or complete; the temporary folder is removed on any error. Returns the rank
    folders in rank order.
    """
    t0 = time.monotonic()
    job = prepare_job(model_dir, world_size, ratios, private_layers)
    out = os.path.abspath(out_dir)
    try:
        if not is_gguf_path(model_dir):  # the source's content, where it carries checksums (before any write)
            verify_checkpoint(model_dir, job.ckpt)
        with staged_folder(out, force, RANK_FOLDERS, job.output_bytes) as tmp:
            nbytes = write_ranks(job, tmp, quiet)
    except OSError as e:
        raise TpiError(f"{e.filename or out}: cannot write shards: {e.strerror or e}") from None
    finally:
        job.ckpt.close()
    if not quiet:
        print(f"shard: wrote {world_size} folders to {out} ({nbytes / 1e6:.1f} MB) in {time.monotonic() - t0:.1f} s",
              file=sys.stderr)
        if any(p.dequantized for it in job.items for p in it.pieces):
            print(dequantized_note(job), file=sys.stderr)
    return [os.path.join(out, f"rank-{r}") for r in range(world_size)]


def dequantized_note(job: Job) -> str:
    """One line on the quantized slices stored as f32 (a split cut inside a ggml block) and their cost."""
    cut = [(it.info, p) for it in job.items for p in it.pieces if p.dequantized]
    f32 = sum(p.nbytes for _, p in cut)
    quant = sum(tensor_nbytes(info.dtype, stored) for info, p in cut
                for stored in [p.part.shape(info.shape)[:-1] + ((p.blocks[1] - p.blocks[0])
                                                                 * GGML_TYPES[info.dtype].block_elems,)])
    return (f"shard: {len(cut)} slices of quantized tensors are cut inside a ggml block and stored "
            f"dequantized (f32, exact): {f32 / 1e6:.1f} MB instead of about {quant / 1e6:.1f} MB quantized")


# ---------------------------------------------------------------------------------------------
# Reading and checking shard folders


def verify_shard(shard_dir: str, stamp: bool = False) -> int:
    """Check a shard folder against its manifest: fingerprint recomputed, safetensors headers agreeing, only
    float tensors of the config's layers, every tensor's CRC32 (always read: a stamp is never trusted here),
    every shape the split gives (the checks of every load, tpicore.weights.store). `stamp`: leave the
    verified stamp that later loads of this run trust (tpicore.weights.integrity). Raises TpiError naming
    the file (and tensor); returns the bytes checked."""
    store = TensorStore.from_shard_dir(shard_dir, verify=False)  # fingerprint, float dtypes, the config's layers
    verify_folder(shard_dir, read_manifest(shard_dir), store.ckpt, trust_stamp=False, write_stamp=stamp)
    store.check()
    return sum(info.nbytes for info in store.ckpt.tensors.values())


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
    if is_gguf_path(model_dir):  # a GGUF file or split set
        return [[os.path.basename(f), os.stat(f).st_size, os.stat(f).st_mtime_ns] for f in split_files(model_dir)]
    state = []
    for name in sorted(os.listdir(model_dir)):
        if name.endswith(".safetensors") or name == "model.safetensors.index.json" or name in MASTER_FILES:
            st = os.stat(os.path.join(model_dir, name))
            state.append([name, st.st_size, st.st_mtime_ns])
    return state


def _complete(out: str, world_size: int) -> bool:
    """Every rank's manifest is there and valid, for this world size, with one fingerprint that each
    manifest's contents give (cheap: manifests only; the data is checked by `_intact`)."""
    try:
        mans = [read_manifest(os.path.join(out, f"rank-{r}")) for r in range(world_size)]
        fps = {check_fingerprint(m, os.path.join(out, f"rank-{r}", MANIFEST_FILE)) for r, m in enumerate(mans)}
    except TpiError:
        return False
    return (all(m.world_size == world_size for m in mans) and len(fps) == 1
            and not os.path.exists(os.path.join(out, f"rank-{world_size}")))


def _intact(out: str, world_size: int, ranks: Iterable[int] | None = None) -> str | None:
    """None when every rank folder under `out` (or those of `ranks`) passes verify_shard, else the first error
    (one line). Each folder that passes is stamped, so the loads of this run (the master's own, its local
    workers') do not read its bytes a second time."""
    for r in (range(world_size) if ranks is None else ranks):
        try:
            verify_shard(os.path.join(out, f"rank-{r}"), stamp=True)
        except TpiError as e:
            return str(e)
    return None


def cached_shards(model_dir: str, world_size: int, ratios: Iterable[float] | None = None,
                  cache_root: str | None = None, quiet: bool = False, private_layers: int = 0,
                  ranks: Iterable[int] | None = None) -> list[str]:
    """Rank folders for `model_dir` split for `world_size` devices, sharded on first use and reused after.

    The cache folder is `<split>-<state>`: split = hash(real model path, N, ratios), state = hash(file
    names, sizes, mtimes). A changed checkpoint gets a new state; older states of the same split are
    deleted once the new one is in place. `ranks`: the folders the caller will use (a device after a
    regroup: its own); only those are verified when the cache is reused (default: all).
    """
    ranks = None if ranks is None else list(ranks)
    ratios = check_ratios(ratios, world_size)
    gguf = is_gguf_path(model_dir)  # kept by name: a split set's parts are found from it
    model = os.path.abspath(model_dir) if gguf else os.path.realpath(model_dir)
    if not (os.path.isfile(model) if gguf else os.path.isdir(model)):
        raise TpiError(f"{model_dir}: model {'file' if gguf else 'folder'} not found")
    root = os.path.abspath(cache_root or default_cache_root())
    key = {"format": FORMAT, "model": model, "world_size": world_size, "ratios": ratios}
    if private_layers:  # only when set, so existing cache folders keep their names
        key["private_layers"] = private_layers
    split = canonical_hash(key)[:16]
    state = canonical_hash(_source_state(model))[:16]
    out = os.path.join(root, f"{split}-{state}")
    folders = [os.path.join(out, f"rank-{r}") for r in range(world_size)]
    if _complete(out, world_size) and _intact(out, world_size, ranks) is None:
        return folders
    os.makedirs(root, exist_ok=True)
    # one process shards while others wait for it (two `tpi generate` runs started together)
    with open(os.path.join(root, f"{split}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        problem = None
        if os.path.isdir(out):  # published whole (atomic rename): anything amiss is corruption
            problem = (_intact(out, world_size, ranks) if _complete(out, world_size)
                       else f"{out}: a manifest is missing, corrupt or edited")
            if problem is None:
                return folders
        if problem is not None:  # a corrupted cache is never used: one note, then it is deleted and rebuilt
            print(f"shard: deleting corrupt cached shards and sharding again: {problem}", file=sys.stderr)
            shutil.rmtree(out, ignore_errors=True)
        elif not quiet:
            print(f"shard: first use of {model} on {world_size} devices; writing shards to {out}", file=sys.stderr)
        try:
            shard_checkpoint(model, out, world_size, ratios, force=os.path.isdir(out), quiet=quiet,
                             private_layers=private_layers)
        except OutputExists:  # another process finished the same shards first (no flock on this filesystem?)
            if not _complete(out, world_size):
                raise
        stale = re.compile(re.escape(split) + r"-[0-9a-f]{16}")
        for name in os.listdir(root):
            if stale.fullmatch(name) and name != os.path.basename(out):
                shutil.rmtree(os.path.join(root, name), ignore_errors=True)
    return folders
