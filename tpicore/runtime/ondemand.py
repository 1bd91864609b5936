"""Disk offload without prefetch: the `offload` baseline (the paper's Accelerate comparison point).

Owns `OnDemandSource`, a BlockSource that reads each block from disk when the device asks for it and
frees it right after use. No loader thread, no window, no overlap: every load is a blocking read on
the compute thread, which is what Accelerate's disk offload does (a hook before each module loads
its weights, then runs it). Compare tpicore.scheduler.WindowSource, which reads ahead on a thread.

    acquire(block): shard file --pread--> fresh float32 buffer (f32 straight in; f16/bf16 raw, then
                    widened by tpicore.weights.to_f32, the resident path's conversion: bit-identical)
                    + posix_fadvise(DONTNEED) behind every read: the page cache does not grow
    device computes
    release(block): the buffer is dropped (freed)

Time: the device waits for every load. On a virtual clock (the emulator) the clock advances by the
modelled read time, bytes / disk_read_mbps (or the measured read time when no disk is modelled); on a
wall clock the read takes what it takes, stretched to the modelled time when a disk is modelled.
Each load is booked as load time and, since nothing else runs meanwhile, as stall time too.
Embedding rows are read the same way (only the rows of the tokens at hand); the LM head is one block
("post", -1), as in the resident path, so the logits are bit-identical to ResidentSource's.
"""

from __future__ import annotations

import os
import time

import numpy as np

from tpicore.errors import TpiError
from tpicore.model.split import Block
from tpicore.runtime.device import Timers
from tpicore.weights.checkpoint import DTYPES, to_f32
from tpicore.weights.store import TensorStore

READ_BYTES = 8 << 20  # one pread call; the page cache behind it is dropped right after
PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


class OnDemandSource:
    """Blocking reads on acquire, freed on release (see the module docstring).

    clock: the device's clock (`clock.virtual` True: loads advance it by the modelled time).
    disk_read_mbps: the emulated disk, megabits/s like every *_mbps in this project (None: the host's).
    drop_cache: drop the page cache behind every read (honest cold reads); False re-reads warm data,
    which only saves real time when a disk is modelled on a virtual clock.
    """

    streams_head = False  # Device.head asks for ("post", -1): the whole head, like the resident path

    def __init__(self, store: TensorStore, clock=None, disk_read_mbps: float | None = None,
                 drop_cache: bool = True, timers: Timers | None = None) -> None:
        if disk_read_mbps is not None and not disk_read_mbps > 0:
            raise TpiError(f"disk_read_mbps: must be > 0 (or None for the host's disk), got {disk_read_mbps!r}")
        self.store, self.clock, self.drop_cache = store, clock, drop_cache
        self.read_bps = disk_read_mbps * 1e6 / 8 if disk_read_mbps is not None else None  # bytes/s
        self._virtual = bool(getattr(clock, "virtual", False))
        self.timers = timers or Timers()
        self._fds: dict[str, int] = {}
        self._held: dict[Block, dict[str, np.ndarray]] = {}

    def attach(self, timers: Timers) -> None:
        """Book loads into the Device's timers (engine.Device calls this when it is built)."""
        if timers is self.timers:
            return
        for key in ("load_s", "stall_s", "loads", "loaded_bytes", "stalls"):
            setattr(timers, key, getattr(timers, key) + getattr(self.timers, key))
        self.timers = timers

    # -- BlockSource ---------------------------------------------------------------------------
    def acquire(self, block: Block) -> dict[str, np.ndarray]:
        leaves = self.store.leaves(block)
        if not leaves:  # Pre: the embedding rows are read by embed_rows
            return {}
        t0, w0 = self._now(), time.perf_counter()
        weights, nbytes = {}, 0
        for leaf, name in leaves.items():
            info = self.store.ckpt.info(name)
            weights[leaf] = self._read_tensor(info, info.offset, info.nbytes, info.shape)
            nbytes += info.nbytes
        self._book(nbytes, t0, w0, block)
        self._held[block] = weights
        return weights

    def release(self, block: Block) -> None:
        self._held.pop(block, None)  # the last reference: the buffers are freed

    def embed_rows(self, ids: np.ndarray) -> np.ndarray:
        """Embedding rows for the tokens at hand, read past the page cache: [T] -> [T, D]."""
        info = self.store.ckpt.info("model.embed_tokens.weight")
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        V = info.shape[0]
        if ids.size and (ids.min() < 0 or ids.max() >= V):
            raise TpiError(f"token id {int(ids[(ids < 0) | (ids >= V)][0])} is outside the vocabulary (0..{V - 1})")
        row = info.nbytes // V
        t0, w0 = self._now(), time.perf_counter()
        rows = [self._read_tensor(info, info.offset + int(tok) * row, row, info.shape[1:]) for tok in ids]
        self._book(row * ids.size, t0, w0, None)
        return np.stack(rows) if rows else np.empty((0,) + info.shape[1:], dtype=np.float32)  # [T, D]

    def close(self) -> None:
        self._held.clear()
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    # -- reading -------------------------------------------------------------------------------
    def _now(self) -> float:
        return self.clock.now() if self.clock is not None else time.perf_counter()

    def _fd(self, path: str) -> int:
        fd = self._fds.get(path)
        if fd is None:
            fd = self._fds[path] = os.open(path, os.O_RDONLY)
        return fd

    def _read_tensor(self, info, offset: int, nbytes: int, shape: tuple[int, ...]) -> np.ndarray:
        """float32 array of `shape` from `nbytes` stored bytes at `offset` of the tensor's file."""
        if info.dtype not in ("F32", "F16", "BF16"):
            raise TpiError(f"{info.path}: tensor {info.name!r}: dtype {info.dtype} cannot be a weight")
        raw = np.empty(nbytes // info.itemsize, dtype=DTYPES[info.dtype])
        self._pread(self._fd(info.path), info.path, memoryview(raw).cast("B"), offset)
        out = raw if info.dtype == "F32" else to_f32(raw, info.dtype)
        return out.reshape(shape)

    def _pread(self, fd: int, path: str, mv: memoryview, offset: int) -> None:
        done = 0
        while done < len(mv):
            want = min(READ_BYTES, len(mv) - done)
            got = os.preadv(fd, [mv[done: done + want]], offset + done)
            if got <= 0:
                raise TpiError(f"{path}: unexpected end of file at byte {offset + done}")
            if self.drop_cache:  # whole pages around what was read (a partial page stays cached otherwise)
                lo = (offset + done) // PAGE * PAGE
                hi = -(-(offset + done + got) // PAGE) * PAGE
                os.posix_fadvise(fd, lo, hi - lo, os.POSIX_FADV_DONTNEED)
            done += got

    def _book(self, nbytes: int, t0: float, w0: float, block: Block | None) -> None:
        """Charge one load to the device: it waited for all of it."""
        modelled = nbytes / self.read_bps if self.read_bps else None
        if self._virtual:
            self.clock.advance(modelled if modelled is not None else time.perf_counter() - w0)
        elif modelled is not None:  # a slow modelled disk on a wall clock: really wait the rest
            left = w0 + modelled - time.perf_counter()
            if left > 0:
                time.sleep(left)
        dt = self._now() - t0
        t = self.timers
        t.load_s += dt
        t.stall_s += dt
        t.loads += block is not None
        t.stalls += block is not None
        t.loaded_bytes += nbytes
        if t.trace and block is not None:
            kind, i = block
            t.events.append((f"load {kind}{'' if i < 0 else i}", "load", t0, dt))
