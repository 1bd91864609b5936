"""Reading weights past the page cache: the one pread loop, drop-behind, and widening to float32.

Layer: weights (imports tpicore.weights.{checkpoint,packed,quant}, the Block type of tpicore.model.split,
errors). Owns every positional read of a weight file: `read_exact` (the pread loop, used as is by tpi
shard), `drop_cache`, `read_raw` (TensorStore.load), `load_resident` (a resident ggml weight kept
quantized) and `BlockReader`, which the window scheduler, on-demand loading and embedding-row reads share. Must not know about block order, threads, clocks or devices.

    file --pread (<= READ_BYTES a call)--> destination     f32: straight into the destination
        |                                                   f16/bf16: through a reused staging buffer,
        |                                                   widened by checkpoint.to_f32 (bit-identical to
        |                                                   the resident path's conversion); ggml blocks
        |                                                   kept quantized (plan's `packed` reads): read
        |                                                   as stored into the buffer's bytes, handed out
        |                                                   as a QuantMatrix (no dequantization here)
        +-- posix_fadvise(DONTNEED) behind every read (BlockReader with drop_cache): the file's page
            cache does not grow, so the reader's RSS tells the truth about its memory
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

from tpicore.errors import TpiError
from tpicore.model.split import Block
from tpicore.weights.checkpoint import (
    DTYPES,
    TensorInfo,
    rows_in_hf_order,
    stored_layout,
    to_f32,
)
from tpicore.weights.packed import QuantMatrix, prepare
from tpicore.weights.quant import GGML_TYPES, is_block_quantized

READ_BYTES = 8 << 20  # one read call; the page cache behind it is dropped right after
# The page cache keeps file data in large folios (up to a few MiB, sized by readahead), and
# posix_fadvise(DONTNEED) leaves any folio that sticks out of the range. Dropping from this far behind
# each read (data already read) lets the folio straddling the previous read's end go too.
DROP_BEHIND = 8 << 20
ALIGN_ELEMS = 16  # tensors start on 64-byte boundaries inside a block buffer
PAGE = os.sysconf("SC_PAGE_SIZE")
WEIGHT_DTYPES = ("F32", "F16", "BF16")


class ReadStopped(Exception):
    """A read was cut short because its reader was told to stop (the window is closing)."""


def drop_cache(fd: int, offset: int = 0, length: int = 0) -> None:
    """Drop the page cache of bytes offset..offset+length of the file (length 0: to its end); a no-op
    where the platform has no posix_fadvise (macOS)."""
    if hasattr(os, "posix_fadvise"):
        os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)


def read_exact(fd: int, buf: memoryview, offset: int, path: str, drop_behind: bool = False, ahead: int = 0,
               stop: Callable[[], bool] | None = None) -> None:
    """Fill `buf` from byte `offset` of the file, READ_BYTES per pread (which may return fewer).

    drop_behind: after each read, drop the page cache from DROP_BEHIND bytes before it to `ahead`
    bytes past it (scattered reads, whose readahead is of no use, pass ahead > 0). `stop`: checked
    before every read; True raises ReadStopped.
    """
    done = 0
    while done < len(buf):
        if stop is not None and stop():
            raise ReadStopped
        want = min(READ_BYTES, len(buf) - done)
        got = os.preadv(fd, [buf[done: done + want]], offset + done)
        if got <= 0:
            raise TpiError(f"{path}: unexpected end of file at byte {offset + done}")
        if drop_behind:
            lo = max(0, offset + done - DROP_BEHIND) // PAGE * PAGE
            hi = -(-(offset + done + got + ahead) // PAGE) * PAGE
            drop_cache(fd, lo, hi - lo)
        done += got


@dataclass(frozen=True)
class TensorRead:
    """One tensor (or a row range of one) of a block: where it is on disk and where it goes in the buffer."""

    leaf: str
    info: TensorInfo
    offset: int  # absolute byte offset in the file
    nbytes: int
    shape: tuple[int, ...]
    at: int  # first float32 element in the buffer
    packed: bool = False  # ggml blocks kept as they are stored (a QuantMatrix over the buffer's bytes)


@dataclass(frozen=True)
class BlockPlan:
    """The reads of one block, laid out back to back in a float32 buffer."""

    block: Block
    reads: tuple[TensorRead, ...]
    elems: int  # float32 elements the block needs in a buffer (with alignment)

    @property
    def nbytes(self) -> int:  # bytes read from disk
        return sum(r.nbytes for r in self.reads)

    @property
    def widened_elems(self) -> int:
        """float32 elements the loader writes by widening f16/bf16 or dequantizing ggml blocks (0 when every
        read lands as stored: f32, or ggml blocks kept quantized)."""
        return sum(int(np.prod(r.shape, dtype=np.int64)) for r in self.reads if not r.packed and r.info.dtype != "F32")


def lay_out(block: Block, parts: list[tuple[str, TensorInfo, int, int, tuple[int, ...]]],
            keep_quantized: bool = False) -> BlockPlan:
    """A BlockPlan from (leaf, info, offset, nbytes, shape) parts, each aligned to ALIGN_ELEMS floats.
    keep_quantized: 2-D ggml-block tensors take their stored bytes in the buffer (read as they are, used
    as a QuantMatrix) instead of float32 elements."""
    reads, at = [], 0
    for leaf, info, offset, nbytes, shape in parts:
        packed = keep_quantized and is_block_quantized(info.dtype) and len(shape) == 2
        if is_block_quantized(info.dtype):
            prepare(info.dtype)  # its kernels compiled now, not inside the first block's compute
        reads.append(TensorRead(leaf, info, offset, nbytes, shape, at, packed))
        n = -(-nbytes // 4) if packed else int(np.prod(shape, dtype=np.int64))  # float32 slots taken
        at += -(-n // ALIGN_ELEMS) * ALIGN_ELEMS
    return BlockPlan(block, tuple(reads), at)


def read_raw(info: TensorInfo) -> np.ndarray:
    """A whole tensor's stored elements, read into a new array in its stored dtype (page cache kept).

    For tensors converted anyway (f16, bf16) sequential reads get the kernel's readahead and ran ~1.3-2x
    faster cold than faulting the same bytes in through a memory map (benchmarks/bench_load.py)."""
    dtype, shape = stored_layout(info)  # GGUF blocks: uint8 [..., row_bytes]
    out = np.empty(shape, dtype=dtype)
    fd = os.open(info.path, os.O_RDONLY)
    try:
        read_exact(fd, memoryview(out.reshape(-1)).cast("B"), info.offset, info.path)
    finally:
        os.close(fd)
    return rows_in_hf_order(info, out)


def load_resident(info: TensorInfo, dequantize_at_load: bool) -> QuantMatrix | None:
    """A 2-D block-quantized tensor kept quantized (a QuantMatrix multiplying with the fused kernels); None
    for anything the caller loads as float32 (other dtypes, 1-D tensors, or `dequantize_at_load`)."""
    if dequantize_at_load or not is_block_quantized(info.dtype) or len(info.shape) != 2:
        return None
    assert info.shape[1] % GGML_TYPES[info.dtype].block_elems == 0
    prepare(info.dtype)
    return QuantMatrix(read_raw(info), info.dtype, info.shape[1], fused=True)  # q/k rows in HF order


class BlockReader:
    """Positional reads of weight files into float32, with the files kept open until close().

    drop_cache: drop the page cache behind every read (honest cold reads; False leaves it, e.g. for
    warm re-reads or resident weights). stop: polled between reads of read_block, which then raises
    ReadStopped (the window's loader thread, when the window closes).
    """

    def __init__(self, drop_cache: bool = True, stop: Callable[[], bool] | None = None) -> None:
        self.drop_cache, self.stop = drop_cache, stop
        self._fds: dict[str, int] = {}
        self._stage = np.empty(0, dtype=np.uint16)  # raw f16/bf16 bits on their way into a block buffer
        self.dequant_cpu_s = 0.0  # this reader's thread CPU time spent dequantizing ggml blocks (a virtual
        # clock charges it: the window's loader timeline)
        self.widen_cpu_s = 0.0  # likewise, widening f16/bf16 blocks to float32

    def open(self, path: str) -> int:
        """The file's descriptor (opened on first use; open files early to read from another thread)."""
        fd = self._fds.get(path)
        if fd is None:
            fd = self._fds[path] = os.open(path, os.O_RDONLY)
        return fd

    def read(self, path: str, buf: memoryview, offset: int, ahead: int = 0, stoppable: bool = False) -> None:
        read_exact(self.open(path), buf, offset, path, self.drop_cache, ahead, self.stop if stoppable else None)

    def read_tensor(self, info: TensorInfo, offset: int, nbytes: int, shape: tuple[int, ...],
                    keep_quantized: bool = False) -> np.ndarray | QuantMatrix:
        """float32 array of `shape` from `nbytes` stored bytes at `offset`: read raw into a new array, then
        widened (f32 is returned as read). keep_quantized: a 2-D ggml-block tensor comes back as stored, a
        QuantMatrix (fused dequantize+GEMV), like the resident path's and the window's."""
        if is_block_quantized(info.dtype):  # GGUF blocks: whole rows of bytes, dequantized or kept
            rows = int(np.prod(shape[:-1], dtype=np.int64))  # 1 for a 1-D tensor
            raw = np.empty((rows, nbytes // rows), dtype=np.uint8)  # [rows, row_bytes]
            self.read(info.path, memoryview(raw.reshape(-1)), offset)
            prepare(info.dtype)
            if keep_quantized and len(shape) == 2:
                if info.llama_cpp_heads and shape == info.shape:  # GGUF q/k rows back into HF order
                    raw = rows_in_hf_order(info, raw)
                return QuantMatrix(raw, info.dtype, shape[1], fused=True)
            return self._hf_rows(info, to_f32(raw, info.dtype).reshape(shape))
        if info.dtype not in WEIGHT_DTYPES:
            raise TpiError(f"{info.path}: tensor {info.name!r}: dtype {info.dtype} cannot be a weight")
        raw = np.empty(nbytes // info.itemsize, dtype=DTYPES[info.dtype])
        self.read(info.path, memoryview(raw).cast("B"), offset)
        return self._hf_rows(info, (raw if info.dtype == "F32" else to_f32(raw, info.dtype)).reshape(shape))

    @staticmethod
    def _hf_rows(info: TensorInfo, tensor: np.ndarray) -> np.ndarray:
        """GGUF q/k rows back into HF order (whole tensors only; other tensors are returned as they are)."""
        if info.llama_cpp_heads and tensor.shape == info.shape:
            tensor[...] = rows_in_hf_order(info, tensor)
        return tensor

    def read_block(self, plan: BlockPlan, buf: np.ndarray) -> dict[str, np.ndarray]:
        """Every read of `plan` into float32 `buf` (>= plan.elems): leaf -> view of `buf`. f32 is read
        straight into `buf`; f16/bf16 through the staging buffer (READ_BYTES), widened chunk by chunk; ggml
        blocks either kept as stored (packed reads: a QuantMatrix over `buf`'s bytes) or dequantized."""
        weights = {}
        for r in plan.reads:
            n = int(np.prod(r.shape, dtype=np.int64))
            dst = buf[r.at: r.at + n]  # float32 view in the buffer
            if r.info.dtype == "F32":
                self.read(r.info.path, memoryview(dst).cast("B"), r.offset, stoppable=True)
            elif r.info.dtype in ("BF16", "F16"):
                if self._stage.size == 0:
                    self._stage = np.empty(READ_BYTES // 2, dtype=np.uint16)
                per = self._stage.size
                for i in range(0, n, per):
                    m = min(per, n - i)
                    stage = self._stage[:m]
                    self.read(r.info.path, memoryview(stage).cast("B"), r.offset + 2 * i, stoppable=True)
                    cpu0 = time.thread_time()
                    to_f32(stage.view(DTYPES[r.info.dtype]), r.info.dtype, out=dst[i: i + m])
                    self.widen_cpu_s += time.thread_time() - cpu0
            elif r.packed:  # the stored blocks as they are: [rows, row_bytes] in the buffer's bytes
                rows = r.shape[0]
                raw = dst[: -(-r.nbytes // 4)].view(np.uint8)[: r.nbytes].reshape(rows, r.nbytes // rows)
                self.read(r.info.path, memoryview(raw.reshape(-1)), r.offset, stoppable=True)
                if r.info.llama_cpp_heads and r.shape == r.info.shape:  # GGUF q/k rows back into HF order
                    raw[...] = rows_in_hf_order(r.info, raw)
                weights[r.leaf] = QuantMatrix(raw, r.info.dtype, r.shape[1], fused=True)
                continue
            elif is_block_quantized(r.info.dtype):
                self._read_quantized(r, dst)
            else:
                raise TpiError(f"{r.info.path}: tensor {r.info.name!r}: dtype {r.info.dtype} cannot be a weight")
            weights[r.leaf] = self._hf_rows(r.info, dst.reshape(r.shape))
        return weights

    def _read_quantized(self, r: TensorRead, dst: np.ndarray) -> None:
        """GGUF blocks into float32 `dst`: whole rows at a time through the staging buffer, dequantized
        row chunk by row chunk (quant.dequantize); only the quantized bytes are read."""
        if self._stage.size == 0:
            self._stage = np.empty(READ_BYTES // 2, dtype=np.uint16)
        out = dst.reshape(-1, r.shape[-1])  # [rows, cols] float32
        row_bytes = r.nbytes // out.shape[0]
        if row_bytes > self._stage.nbytes:  # one row larger than the staging buffer
            self._stage = np.empty(-(-row_bytes // 2), dtype=np.uint16)
        per = self._stage.nbytes // row_bytes  # rows per read
        stage = self._stage.view(np.uint8)
        for lo in range(0, out.shape[0], per):
            hi = min(out.shape[0], lo + per)
            raw = stage[: (hi - lo) * row_bytes].reshape(hi - lo, row_bytes)
            self.read(r.info.path, memoryview(raw.reshape(-1)), r.offset + lo * row_bytes, stoppable=True)
            cpu0 = time.thread_time()
            to_f32(raw, r.info.dtype, out=out[lo:hi])
            self.dequant_cpu_s += time.thread_time() - cpu0

    def read_rows(self, info: TensorInfo, ids: np.ndarray) -> np.ndarray:
        """Rows `ids` of a 2-D tensor (an embedding lookup; the table is never read whole): [T] -> [T, D]."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        V = info.shape[0]
        if ids.size and (ids.min() < 0 or ids.max() >= V):
            raise TpiError(f"token id {int(ids[(ids < 0) | (ids >= V)][0])} is outside the vocabulary (0..{V - 1})")
        dtype, shape = stored_layout(info)
        raw = np.empty((ids.size,) + shape[1:], dtype=dtype)  # [T, D] stored dtype (or [T, row_bytes] blocks)
        row = info.nbytes // V
        for i, tok in enumerate(ids):
            self.read(info.path, memoryview(raw[i]).cast("B"), info.offset + int(tok) * row, ahead=DROP_BEHIND)
        return to_f32(raw, info.dtype)  # [T, D] float32

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        self._stage = np.empty(0, dtype=np.uint16)
