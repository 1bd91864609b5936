"""The sliding-window memory scheduler: a device keeps only `window` blocks of weights in memory.

Layer: runtime. Owns the loader thread, the window's memory (a few reused slabs) and the load/stall
accounting on the device's clock (a virtual clock gets the loader's own virtual timeline). Reading is
tpicore.weights.reader's (BlockReader: pread, drop-behind, widening), the statistics are
tpicore.runtime.window_stats's, the planning model (SlabPool, retention, the steady conditions, the
replay) tpicore.runtime.window_model's; the math and the block loop stay in tpicore.model /
tpicore.runtime.device. This module only decides which weights are in memory when.

Data path (one loader thread next to the compute thread):

    shard file --preadv--> slab   f32 tensors straight into the slab; bf16/f16 through an 8 MiB staging
        |                         buffer, widened by checkpoint.to_f32 (the resident path's conversion);
        |                         ggml blocks (GGUF, quantized shards) as stored: only the quantized bytes
        |                         are read (plan.nbytes) and kept (weights.packed, fused dequantize+GEMV
        |                         on the compute thread); with dequantize_at_load, dequantized row chunk
        |                         by row chunk into float32 here instead
        +-- posix_fadvise(DONTNEED) behind every read: the file's page cache does not grow
    slab --acquire(block)--> Device computes (+ allreduce) --release(block)--> slab free for a later block

Order: the cyclic block order of one forward step (tpicore.model.split.block_order): Attn_l, FFN_l for
every layer, then on the master the LM head's vocabulary chunks Post_0..Post_C-1, then the next step's
Attn_0, ...
The loader runs ahead in that order with at most `window` blocks loaded or loading, and blocks when the
window is full; the compute side takes blocks in the same order, waiting (a stall) if one is not loaded
yet, and releases each after use. Pre holds no weights here: the embedding rows for the tokens at hand
are read on demand (`embed_rows`), so Pre takes no window slot.

Memory: the window's blocks live in at most `window` slabs of float32, allocated once and reused
(fresh memory is slow to touch: the first write faults every page in). A block takes the smallest free slab it fits;
when none fits, the largest free one is replaced by a bigger one (SlabPool), so over the first step the
slabs settle. Window 2 settles on one Attn + one FFN block whatever the timing, the paper's
floor(w/2) Attn + ceil(w/2) FFN. Larger windows depend on timing: with the window full (a slow disk) an
Attn block sometimes has to take an FFN-sized slab, and w FFN-sized slabs is the worst case (the
planner replays that case); with loads ahead of compute the slabs stay smaller. Head chunks are sized
to fit the smaller layer block, so streaming the head adds no memory.

Retention (the paper's Prop. 6, for disks too slow to hide I/O): with retain_every = T, the FFN blocks of
layers 0, T, 2T, ... are read once and kept in memory of their own. They do not count against the window
(memory grows by ceil(L/T) FFN blocks) and are never read again.

Time: loads, stalls and trace events are booked into the Device's Timers (attach), on the device's
clock (env.clock). A modelled disk (env.disk) stretches each load to at least its modelled time. On a
virtual clock (the emulator) the loader keeps its own virtual timeline: load k starts when the loader
is free and its window slot was released (in virtual time) and takes the disk model's time (or the
measured read time, with no modelled rate) plus, with a modelled disk, the loader thread's own CPU time
for the block (copying out of the kernel, widening bf16/f16, dequantizing ggml blocks) priced by the
clock's compute model (Clock.cost_s: measured CPU / speed, or the roofline of the bytes read and written);
acquire then advances the device's clock to the block's virtual ready time, which is the stall. The
reads themselves still happen in real time. The embedding rows (read on the compute thread) are charged
through the disk model on the device's clock and booked as a load.
"""

from __future__ import annotations

import threading
import time

import numpy as np

from tpicore.errors import TpiError
from tpicore.model.cost import F32_BYTES, Work
from tpicore.model.split import Block, block_order
from tpicore.runtime.device import Timers, block_name
from tpicore.runtime.env import DeviceEnv
from tpicore.runtime.report import TraceEvent
from tpicore.runtime.window_model import SlabPool, retained_layers
from tpicore.runtime.window_stats import WindowBook
from tpicore.weights.reader import BlockPlan, BlockReader, ReadStopped, lay_out
from tpicore.weights.store import TensorStore, head_row_ranges

EMBED = "model.embed_tokens.weight"


def plan_block(store: TensorStore, block: Block, keep_quantized: bool = True) -> BlockPlan:
    """The reads that make up one block, laid out back to back in a float32 slab (a head chunk: its rows);
    keep_quantized: ggml blocks take their stored bytes (multiplied by the fused kernels, weights.packed)."""
    kind, c = block
    parts = []
    for leaf, name in store.leaves(block).items():
        info = store.ckpt.info(name)
        offset, nbytes, shape = info.offset, info.nbytes, info.shape
        if kind == "post" and c >= 0 and leaf == "lm_head":  # a vocabulary chunk: rows lo..hi
            lo, hi = head_row_ranges(store)[c]
            row = info.nbytes // info.shape[0]
            offset, nbytes, shape = info.offset + lo * row, (hi - lo) * row, (hi - lo,) + info.shape[1:]
        parts.append((leaf, info, offset, nbytes, shape))
    return lay_out(block, parts, keep_quantized)


class Slabs:
    """The window's memory: at most `limit` float32 slabs, allocated when first needed and reused; which
    slab a block takes is SlabPool's decision (the planner replays the same pool). Not thread-safe: the
    window calls it under its lock."""

    def __init__(self, limit: int) -> None:
        self.pool = SlabPool(limit)
        self.arrays: list[np.ndarray] = []
        self.in_use = 0  # slabs holding a loaded or loading block

    def take(self, elems: int) -> int:
        """A free slab of at least `elems` float32 (the window has checked there is room)."""
        i, fresh = self.pool.take(elems)
        if fresh:
            if i == len(self.arrays):
                self.arrays.append(np.empty(0, dtype=np.float32))
            self.arrays[i] = np.empty(0, dtype=np.float32)  # let the old memory go before taking the new
            self.arrays[i] = np.empty(elems, dtype=np.float32)
        self.in_use += 1
        return i

    def give_back(self, i: int) -> None:
        self.pool.give_back(i)
        self.in_use -= 1

    @property
    def nbytes(self) -> int:
        return sum(x.nbytes for x in self.arrays)


class LoaderTimeline:
    """The loader's own timeline on a virtual clock: load n of a window block starts when the loader is
    free and the slot it needs was released, in the device's virtual time (the window's lock held)."""

    def __init__(self, start: float, window: int) -> None:
        self.at, self.window = start, window  # when the loader is free
        self.released = 0  # window blocks released so far
        self._release_at: dict[int, float] = {}  # n-th window block released -> clock time

    def release(self, now: float) -> None:
        self._release_at[self.released] = now
        self.released += 1

    def start(self, n: int, windowed: bool) -> float:
        """When load number n (counting window blocks only) may start; `windowed`: it takes a slot."""
        freed = self._release_at.pop(n - self.window, 0.0) if windowed and n >= self.window else 0.0
        return max(self.at, freed)


class WindowSource:
    """A BlockSource that keeps at most `window` blocks in memory, preloaded by one loader thread.

    acquire/release must follow block_order (the Device does); the arrays acquire returns are views of
    a reused slab and are valid only until the block's release. env: the device's clock and disk model
    (default: wall clock, the host's disk). drop_cache=False leaves the page cache alone (warm re-reads).
    """

    streams_head = True  # Device.head asks for ("post", c) chunks instead of the whole head

    def __init__(self, store: TensorStore, window: int = 2, retain_every: int = 0, env: DeviceEnv | None = None,
                 drop_cache: bool = True, dequantize_at_load: bool = False) -> None:
        if not isinstance(window, int) or window < 2:
            raise TpiError(f"--window: expected an integer >= 2, got {window!r}")
        if retain_every < 0:
            raise TpiError(f"--retain-every: expected >= 0 (0 = off), got {retain_every}")
        env = env or DeviceEnv()
        self.store, self.window, self.clock, self.disk = store, window, env.clock, env.disk
        n_layers = store.cfg.num_hidden_layers
        master = store.layout.rank == 0  # runs the LM head (and embeds)
        chunks = len(head_row_ranges(store)) if master else None
        first = store.layout.shared_layers(n_layers).start if not master else 0  # a worker skips private layers
        self.order: list[Block] = [b for b in block_order(n_layers, master, chunks, first) if b[0] != "pre"]
        self.plans = {b: plan_block(store, b, not dequantize_at_load) for b in self.order}
        self.retain = {("ffn", layer) for layer in retained_layers(n_layers, retain_every)}
        self.book = WindowBook(window, retain_every, n_layers)
        self.timers = Timers(window=self.book.stats)
        self.reader = BlockReader(drop_cache, stop=lambda: self._stop)
        for plan in self.plans.values():  # opened here: the loader thread and the compute thread share them
            for r in plan.reads:
                self.reader.open(r.info.path)
        if master and EMBED in store.ckpt:  # embedding rows are read from the compute thread
            self.reader.open(store.ckpt.info(EMBED).path)

        self._cond = threading.Condition()
        self._ready: dict[int, tuple[dict[str, np.ndarray], int, float]] = {}  # seq -> (weights, slab, ready at)
        self._retained: dict[Block, tuple[dict[str, np.ndarray], float]] = {}  # block -> (weights, ready at)
        self._slabs = Slabs(window)
        self._stop = self._closed = False
        self._error: BaseException | None = None
        self._seq = 0  # compute side: index of the next block to acquire (over the cyclic order)
        self._held_at, self._comm_at = 0.0, 0.0  # when the block in use was acquired; comm_s then
        self._timeline = LoaderTimeline(self.clock.now(), window) if self.clock.virtual else None
        self._thread = threading.Thread(target=self._load_loop, name="tpi-window-loader", daemon=True)
        self._thread.start()

    def attach(self, timers: Timers) -> None:
        """Book loads, stalls and trace events into the Device's timers (call once, before the first step)."""
        with self._cond:
            if timers is self.timers:
                return
            timers.loads += self.timers.loads
            timers.loaded_bytes += self.timers.loaded_bytes
            timers.load_s += self.timers.load_s
            timers.events.extend(self.timers.events)
            timers.window = self.book.stats
            self.timers = timers

    # -- compute side --------------------------------------------------------------------------
    def acquire(self, block: Block) -> dict[str, np.ndarray]:
        if block[0] == "pre":
            return {}
        j, P = self._seq, len(self.order)
        expected = self.order[j % P]
        if block != expected:
            raise TpiError(f"window: asked for block {block_name(block)} but {block_name(expected)} is next "
                           "(blocks must be used in block_order)")
        now = self.clock.now()
        if j % P == 0:
            self.book.begin_step(j // P, now)
        with self._cond:
            waited = False
            while self._error is None and j not in self._ready and block not in self._retained:
                waited = True
                self._cond.wait()
            if self._error is not None:
                raise TpiError(f"window loader failed: {self._error}") from self._error
            w, ready_at = self._retained[block] if block in self._retained else self._ready[j][::2]
        if self.clock.virtual:  # the stall is the wait on the device's clock, not the host's
            waited = ready_at > now
            if waited:
                self.clock.advance_to(ready_at)
        got = self.clock.now()
        t = self.timers
        if waited:
            stall = got - now
            t.stall_s += stall
            t.stalls += 1
            self.book.stalled(j // P, block_name(block), block[0], stall, steady=j >= P)
            if t.trace:
                t.events.append(TraceEvent(f"wait {block_name(block)}", "stall", now, stall))
        self._held_at, self._comm_at = got, t.comm_s
        return w

    def release(self, block: Block) -> None:
        if block[0] == "pre":
            return
        j, P = self._seq, len(self.order)
        now = self.clock.now()
        comm = self.timers.comm_s - self._comm_at
        self.book.used(j // P, block[0], now - self._held_at - comm, comm)
        with self._cond:
            entry = self._ready.pop(j, None)
            if entry is not None:
                self._slabs.give_back(entry[1])
                if self._timeline is not None:
                    self._timeline.release(now)
                self._cond.notify_all()
            slab_bytes = self._slabs.nbytes
            retained_bytes = sum(a.nbytes for w, _ in self._retained.values() for a in w.values())
        self._seq = j + 1
        if (j + 1) % P == 0:
            self.book.end_step(j // P, now, slab_bytes, retained_bytes)

    def embed_rows(self, ids: np.ndarray) -> np.ndarray:
        """Embedding rows for the tokens at hand, read past the page cache: [T] -> [T, D]; the read is
        charged through the disk model on the device's clock and booked as a load."""
        t0, w0 = self.clock.now(), time.perf_counter()
        rows = self.store.embed_rows(ids, self.reader)  # [T] -> [T, D]
        table = self.store.ckpt.info(EMBED)
        nbytes = len(ids) * (table.nbytes // table.shape[0])
        measured = time.perf_counter() - w0
        if self.clock.virtual:
            self.clock.advance(self.disk.charge_s(nbytes, measured))
        elif self.disk.modelled:  # a slow modelled disk on a wall clock: really wait the rest
            self.clock.advance(max(0.0, self.disk.floor_s(nbytes) - measured))
        with self._cond:
            self.timers.load_s += self.clock.now() - t0
            self.timers.loaded_bytes += nbytes
        return rows

    def close(self) -> None:
        with self._cond:
            if self._closed:
                return
            self._closed = self._stop = True
            self._cond.notify_all()
        self._thread.join()
        self.reader.close()
        self._ready.clear()
        self._retained.clear()
        self._slabs = Slabs(self.window)

    # -- loader side ---------------------------------------------------------------------------
    def _load_loop(self) -> None:
        P, k = len(self.order), 0
        n = 0  # window blocks loaded so far (retained ones take no slot)
        try:
            while True:
                block = self.order[k % P]
                plan = self.plans[block]
                keep = block in self.retain
                with self._cond:
                    if keep and block in self._retained:  # read once, kept for good
                        k += 1
                        continue
                    while not keep and not self._stop and self._slabs.in_use >= self.window:
                        self._cond.wait()
                    if self._stop:
                        return
                    slab = -1 if keep else self._slabs.take(plan.elems)
                buf = np.empty(plan.elems, dtype=np.float32) if keep else self._slabs.arrays[slab]
                t0, cpu0 = time.perf_counter(), self.reader.dequant_cpu_s + self.reader.widen_cpu_s
                weights = self.reader.read_block(plan, buf)
                if self._timeline is not None:  # charged on the loader's virtual timeline, no real waiting
                    with self._cond:
                        start = self._timeline.start(n, not keep)
                    dt = self.disk.charge_s(plan.nbytes, time.perf_counter() - t0)
                    if self.disk.read_mbps is not None:  # a modelled disk, then the loader thread's own CPU
                        # widening or dequantizing: stored bytes read, float32 written, an op per element
                        cpu_s = self.reader.dequant_cpu_s + self.reader.widen_cpu_s - cpu0
                        work = Work(plan.elems, plan.nbytes + F32_BYTES * plan.elems) if plan.nbytes < F32_BYTES * plan.elems else Work()
                        dt += self.clock.cost_s(cpu_s, work)
                    self._timeline.at = start + dt
                else:
                    self._throttle(t0 + self.disk.floor_s(plan.nbytes))
                    start, dt = t0, time.perf_counter() - t0
                n += 0 if keep else 1
                self._loaded(k, block, plan, weights, slab, start, dt)
                k += 1
        except ReadStopped:
            return
        except BaseException as e:  # surfaced to the compute side by acquire
            with self._cond:
                self._error = e if not isinstance(e, OSError) else TpiError(f"{e.filename or 'read'}: {e.strerror or e}")
                self._cond.notify_all()

    def _loaded(self, k: int, block: Block, plan: BlockPlan, weights: dict[str, np.ndarray], slab: int,
                start: float, dt: float) -> None:
        """Hand block `k` of the sequence to the compute side and book its load (loader thread)."""
        t = self.timers
        with self._cond:
            if slab < 0:
                self._retained[block] = (weights, start + dt)
            else:
                self._ready[k] = (weights, slab, start + dt)
            t.loads += 1
            t.loaded_bytes += plan.nbytes
            t.load_s += dt
            self.book.loaded(k // len(self.order), block[0], dt, plan.nbytes)  # before the block can be used
            if t.trace:
                t.events.append(TraceEvent(f"load {block_name(block)}", "load", start, dt))
            self._cond.notify_all()

    def _throttle(self, deadline: float) -> None:
        """Slow disks on a wall clock: wait until the modelled end of the load (close() cuts it short)."""
        while not self._stop:
            left = deadline - time.perf_counter()
            if left <= 0:
                return
            with self._cond:
                self._cond.wait(left)  # close() wakes us
