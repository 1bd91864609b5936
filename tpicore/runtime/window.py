"""The sliding-window memory scheduler: a device keeps only `window` blocks of weights in memory.

Owns the loader thread, the window's memory (a few reused slabs), honest reading (the page cache is
dropped behind every read, so RSS tells the truth), the load/stall accounting, and the paper's steady
conditions (`check_steady`). The math and the block loop stay in tpicore.engine / tpicore.model: this
module only decides which weights are in memory when.

Data path (one loader thread next to the compute thread):

    shard file --preadv--> slab   f32 tensors straight into the slab; bf16/f16 through an 8 MiB staging
        |                         buffer, widened by tpicore.weights.to_f32 (the resident path's conversion)
        +-- posix_fadvise(DONTNEED) behind every read: the file's page cache does not grow
    slab --acquire(block)--> Device computes (+ allreduce) --release(block)--> slab free for a later block

Order: the cyclic block order of one forward step (engine.block_order): Attn_l, FFN_l for every layer,
then on the master the LM head's vocabulary chunks Post_0..Post_C-1, then the next step's Attn_0, ...
The loader runs ahead in that order with at most `window` blocks loaded or loading, and blocks when the
window is full; the compute side takes blocks in the same order, waiting (a stall) if one is not loaded
yet, and releases each after use. Pre holds no weights here: the embedding rows for the tokens at hand
are read on demand (`embed_rows`), so Pre takes no window slot.

Memory: the window's blocks live in at most `window` slabs of float32, allocated once and reused
(freshly allocated memory is slow to touch: machine.md). A block takes the smallest free slab it fits;
when none fits, the largest free one is replaced by a bigger one (SlabPool), so over the first step the
slabs settle. Window 2 settles on one Attn + one FFN block whatever the timing, the paper's
floor(w/2) Attn + ceil(w/2) FFN. Larger windows depend on timing: with the window full (a slow disk) an
Attn block sometimes has to take an FFN-sized slab, and w FFN-sized slabs is the worst case (the
planner replays that case); with loads ahead of compute the slabs stay smaller. Head chunks are sized
to fit the smaller layer block, so streaming the head adds no memory.

Retention (the paper's Prop. 6, for disks too slow to hide I/O): with retain_every = T, the FFN blocks of
layers 0, T, 2T, ... are read once and kept in memory of their own. They do not count against the window
(memory grows by ceil(L/T) FFN blocks) and are never read again.
"""

from __future__ import annotations

import math
import os
import threading
import time
from dataclasses import dataclass

import numpy as np

from tpicore.errors import TpiError
from tpicore.model.split import Block, block_order
from tpicore.runtime.device import Timers
from tpicore.weights.checkpoint import DTYPES, TensorInfo, to_f32
from tpicore.weights.store import TensorStore, head_row_ranges

READ_BYTES = 8 << 20  # one read call; the page cache behind it is dropped right after
# The page cache keeps file data in large folios (up to a few MiB, sized by readahead), and
# posix_fadvise(DONTNEED) leaves any folio that sticks out of the range. Dropping from this far behind
# each read (data already read) lets the folio straddling the previous read's end go too.
DROP_BEHIND = 8 << 20
ALIGN_ELEMS = 16  # tensors start on 64-byte boundaries inside a slab
PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


@dataclass(frozen=True)
class TensorRead:
    """One tensor (or a row range of one) of a block: where it is on disk and where it goes in the slab."""

    leaf: str
    info: TensorInfo
    offset: int  # absolute byte offset in the file
    nbytes: int
    shape: tuple[int, ...]
    at: int  # first float32 element in the slab


@dataclass(frozen=True)
class BlockPlan:
    block: Block
    reads: tuple[TensorRead, ...]
    elems: int  # float32 elements the block needs in a slab (with alignment)

    @property
    def nbytes(self) -> int:  # bytes read from disk
        return sum(r.nbytes for r in self.reads)


def block_name(block: Block) -> str:
    kind, i = block
    return kind if i < 0 else f"{kind}{i}"


def plan_block(store: TensorStore, block: Block) -> BlockPlan:
    """The reads that make up one block, laid out back to back in a float32 slab."""
    kind, c = block
    reads, at = [], 0
    for leaf, name in store.leaves(block).items():
        info = store.ckpt.info(name)
        offset, nbytes, shape = info.offset, info.nbytes, info.shape
        if kind == "post" and c >= 0 and leaf == "lm_head":  # a vocabulary chunk: rows lo..hi
            lo, hi = head_row_ranges(store)[c]
            row = info.nbytes // info.shape[0]
            offset, nbytes, shape = info.offset + lo * row, (hi - lo) * row, (hi - lo,) + info.shape[1:]
        reads.append(TensorRead(leaf, info, offset, nbytes, shape, at))
        n = int(np.prod(shape, dtype=np.int64))
        at += -(-n // ALIGN_ELEMS) * ALIGN_ELEMS
    return BlockPlan(block, tuple(reads), at)


def retained_layers(n_layers: int, retain_every: int) -> set[int]:
    """Layers whose FFN block retention keeps: 0, T, 2T, ... (ceil(L/T) of them; none when T = 0)."""
    return set(range(0, n_layers, retain_every)) if retain_every > 0 else set()


class SlabPool:
    """Which slab each loaded block goes to, by size only (the planner replays it to predict memory).

    At most `limit` slabs. A block takes the smallest free slab it fits; when none fits, a new slab while
    fewer than `limit` exist, else the largest free slab is replaced by one of the block's size.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.sizes: list[int] = []  # float32 elements of each slab
        self.free: list[int] = []

    def take(self, elems: int) -> tuple[int, bool]:
        """(slab index, whether it must be (re)allocated at `elems`). Needs a free slab or room for one."""
        fits = [i for i in self.free if self.sizes[i] >= elems]
        if fits:
            i = min(fits, key=lambda i: self.sizes[i])
            self.free.remove(i)
            return i, False
        if len(self.sizes) < self.limit:
            self.sizes.append(elems)
            return len(self.sizes) - 1, True
        i = max(self.free, key=lambda i: self.sizes[i])
        self.free.remove(i)
        self.sizes[i] = elems
        return i, True

    def give_back(self, i: int) -> None:
        self.free.append(i)

    @property
    def total(self) -> int:
        return sum(self.sizes)


class _Stopped(Exception):
    pass


class WindowSource:
    """A BlockSource that keeps at most `window` blocks in memory, preloaded by one loader thread.

    acquire/release must follow engine.block_order (the Device does); the arrays acquire returns are
    views of a reused slab and are valid only until the block's release. `layer_ids` and `head` narrow
    the order for a pipeline stage (default: every layer, and the head on rank 0).
    Slow disks: `read_delay_s` (seconds added to every block load; a test hook), `read_gbps` (a cap on
    the read rate, GB/s) and `disk_read_mbps` (the emulated device's disk, megabits/s like every *_mbps
    in this project) stretch each load to at least its modelled time; `drop_cache=False` leaves the page
    cache alone (warm-cache runs).
    Clocks: times are the device's `clock.now()` (default: time.perf_counter, which engine.WallClock
    and the emulator's WallClock also use). On a virtual clock (`clock.virtual`, the emulator) the loader
    keeps its own virtual timeline: load k starts when the loader is free and its window slot was
    released (in virtual time) and takes the modelled time (or the measured read time, with no disk
    model); acquire then advances the device's clock to the block's virtual ready time, which is the
    stall. The reads themselves still happen in real time.
    """

    streams_head = True  # Device.head asks for ("post", c) chunks instead of the whole head

    def __init__(self, store: TensorStore, window: int = 2, retain_every: int = 0, read_delay_s: float = 0.0,
                 read_gbps: float | None = None, drop_cache: bool = True, timers: Timers | None = None,
                 layer_ids: range | None = None, head: bool | None = None, clock=None,
                 disk_read_mbps: float | None = None) -> None:
        if not isinstance(window, int) or window < 2:
            raise TpiError(f"--window: expected an integer >= 2, got {window!r}")
        if retain_every < 0:
            raise TpiError(f"--retain-every: expected >= 0 (0 = off), got {retain_every}")
        if read_delay_s < 0 or (read_gbps is not None and not read_gbps > 0):
            raise TpiError(f"slow-disk hook: read_delay_s must be >= 0 and read_gbps > 0, got {read_delay_s}, {read_gbps}")
        if disk_read_mbps is not None and not disk_read_mbps > 0:
            raise TpiError(f"disk_read_mbps: must be > 0 (or None for the host's disk), got {disk_read_mbps!r}")
        self.store, self.window, self.retain_every = store, window, retain_every
        self.read_delay_s, self.drop_cache = read_delay_s, drop_cache
        rates = [r for r in (read_gbps and read_gbps * 1e9, disk_read_mbps and disk_read_mbps * 1e6 / 8) if r]
        self.read_bps = min(rates) if rates else None  # modelled disk, bytes/s
        self.clock = clock
        self._now = clock.now if clock is not None else time.perf_counter
        self._virtual = bool(getattr(clock, "virtual", False))
        n_layers = store.cfg.num_hidden_layers
        master = store.layout.rank == 0 if head is None else head  # who runs the LM head (and embeds)
        layer_ids = range(n_layers) if layer_ids is None else layer_ids  # a pipeline stage runs a range
        chunks = len(head_row_ranges(store)) if master else None
        self.order: list[Block] = [b for b in block_order(n_layers, master, chunks)
                                   if b[0] == "post" or (b[0] != "pre" and b[1] in layer_ids)]
        self.plans = {b: plan_block(store, b) for b in self.order}
        self.retain = {("ffn", layer) for layer in retained_layers(n_layers, retain_every)}
        self.timers = timers or Timers()
        self.timers.window.update(window=window, retain_every=retain_every, layers=n_layers)

        self._fds: dict[str, int] = {}
        for plan in self.plans.values():
            for r in plan.reads:
                self._fd(r.info.path)
        if master and "model.embed_tokens.weight" in store.ckpt:  # read from the compute thread: open it here
            self._fd(store.ckpt.info("model.embed_tokens.weight").path)
        stage_elems = READ_BYTES // 2
        self._stage = np.empty(stage_elems, dtype=np.uint16)  # raw f16/bf16 bits on their way into a slab

        self._cond = threading.Condition()
        self._ready: dict[int, tuple[dict[str, np.ndarray], int, float]] = {}  # seq -> (weights, slab, ready at)
        self._retained: dict[Block, tuple[dict[str, np.ndarray], float]] = {}
        self._pool = SlabPool(window)
        self._slabs: list[np.ndarray] = []
        self._in_use = 0  # slabs holding a loaded or loading block
        self._stop = False
        self._error: BaseException | None = None
        self._seq = 0  # compute side: index of the next block to acquire (over the cyclic order)
        self._released = 0  # window blocks released so far
        self._release_at: dict[int, float] = {}  # n-th window block released -> clock time (virtual clocks)
        self._loader_at = self._now() if self._virtual else 0.0  # the loader's own virtual timeline
        self._held_at = 0.0
        self._comm_at = 0.0
        self._step: dict | None = None
        self._load_by_step: dict[int, float] = {}
        self._kinds_by_step: dict[int, dict[str, dict[str, float]]] = {}  # step -> kind -> sums
        self._first: dict[str, dict[str, float]] = {}  # step 0's sums
        self._warm: dict[str, dict[str, float]] = {}  # sums over steps 1, 2, ...
        self._steps: list[dict] = []
        self._closed = False
        self._thread = threading.Thread(target=self._load_loop, name="tpi-window-loader", daemon=True)
        self._thread.start()

    # -- wiring --------------------------------------------------------------------------------
    def attach(self, timers: Timers) -> None:
        """Book loads, stalls and trace events into the Device's timers (call once, before the first step)."""
        with self._cond:
            if timers is self.timers:
                return
            timers.loads += self.timers.loads
            timers.loaded_bytes += self.timers.loaded_bytes
            timers.load_s += self.timers.load_s
            timers.events.extend(self.timers.events)
            timers.window.update(self.timers.window)
            self.timers = timers

    # -- compute side --------------------------------------------------------------------------
    def acquire(self, block: Block) -> dict[str, np.ndarray]:
        if block[0] == "pre":
            return {}
        j, P = self._seq, len(self.order)
        expected = self.order[j % P]
        if block != expected:
            raise TpiError(f"window: asked for block {block_name(block)} but {block_name(expected)} is next "
                           "(blocks must be used in engine.block_order)")
        t = self.timers
        now = self._now()
        if j % P == 0:
            self._step = {"step": j // P, "start": now, "stall_s": 0.0, "compute_s": 0.0, "comm_s": 0.0}
        with self._cond:
            waited = False
            while self._error is None and j not in self._ready and block not in self._retained:
                waited = True
                self._cond.wait()
            if self._error is not None:
                raise TpiError(f"window loader failed: {self._error}") from self._error
            w, ready_at = self._retained[block] if block in self._retained else self._ready[j][::2]
        if self._virtual:  # the stall is the wait on the device's clock, not the host's
            waited = ready_at > now
            if waited:
                self.clock.advance_to(ready_at)
        got = self._now()
        if waited:
            stall = got - now
            t.stall_s += stall
            t.stalls += 1
            self._step["stall_s"] += stall
            with self._cond:
                self._kind(j // P, block[0])["stall_s"] += stall
            where = {"step": j // P, "block": block_name(block), "wait_s": stall}
            t.window.setdefault("first_stall", where)
            if j >= P:
                t.window.setdefault("first_steady_stall", where)
            if t.trace:
                t.events.append((f"wait {block_name(block)}", "stall", now, stall))
        self._held_at, self._comm_at = got, t.comm_s
        return w

    def release(self, block: Block) -> None:
        if block[0] == "pre":
            return
        j, P = self._seq, len(self.order)
        t = self.timers
        now = self._now()
        comm = t.comm_s - self._comm_at
        self._step["compute_s"] += now - self._held_at - comm
        self._step["comm_s"] += comm
        with self._cond:
            k = self._kind(j // P, block[0])
            k["n"] += 1
            k["compute_s"] += now - self._held_at - comm
            k["comm_s"] += comm
            entry = self._ready.pop(j, None)
            if entry is not None:
                self._pool.give_back(entry[1])
                self._in_use -= 1
                if self._virtual:
                    self._release_at[self._released] = now
                self._released += 1
                self._cond.notify_all()
        self._seq = j + 1
        if (j + 1) % P == 0:
            self._end_step(j // P, now)

    def embed_rows(self, ids: np.ndarray) -> np.ndarray:
        """Embedding rows for the tokens at hand, read past the page cache: [T] -> [T, D].

        Same conversion as TensorStore.embed_rows (to_f32 of the stored rows), so the values are identical.
        """
        info = self.store.ckpt.info("model.embed_tokens.weight")
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        V = info.shape[0]
        if ids.size and (ids.min() < 0 or ids.max() >= V):
            raise TpiError(f"token id {int(ids[(ids < 0) | (ids >= V)][0])} is outside the vocabulary (0..{V - 1})")
        raw = np.empty((ids.size,) + info.shape[1:], dtype=DTYPES[info.dtype])  # [T, D] stored dtype
        fd = self._fd(info.path)
        row = info.nbytes // V
        for i, tok in enumerate(ids):
            self._read(fd, info.path, memoryview(raw[i]).cast("B"), info.offset + int(tok) * row, stoppable=False,
                       ahead=DROP_BEHIND)
        return to_f32(raw, info.dtype)

    def close(self) -> None:
        with self._cond:
            if self._closed:
                return
            self._closed = self._stop = True
            self._cond.notify_all()
        self._thread.join()
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        self._ready.clear()
        self._retained.clear()
        self._slabs.clear()

    # -- bookkeeping ---------------------------------------------------------------------------
    def _kind(self, step: int, kind: str) -> dict[str, float]:
        """Per-step, per-kind sums (caller holds the lock: the loader books into them too)."""
        kinds = self._kinds_by_step.setdefault(step, {})
        if kind not in kinds:
            kinds[kind] = {"n": 0, "compute_s": 0.0, "comm_s": 0.0, "stall_s": 0.0, "loads": 0, "load_s": 0.0,
                           "bytes": 0}
        return kinds[kind]

    def _end_step(self, step: int, now: float) -> None:
        s = self._step
        with self._cond:
            load_s = self._load_by_step.pop(step, 0.0)
        wall = now - s.pop("start")
        s.update(wall_s=wall, load_s=load_s, stall_share=s["stall_s"] / wall if wall > 0 else 0.0)
        self._steps.append(s)
        t = self.timers
        t.window["steps"] = self._steps
        t.window["slab_bytes"] = sum(x.nbytes for x in self._slabs)
        t.window["retained_bytes"] = sum(a.nbytes for w, _ in self._retained.values() for a in w.values())
        # The paper's conditions on per-block averages; the first step (cold slabs, nothing preloaded
        # before the prompt) is left out once there are later steps.
        with self._cond:
            done = self._kinds_by_step.pop(step, {})  # every block of this step was loaded before it ran
        if step == 0:
            self._first = done
        else:
            for kind, v in done.items():
                acc = self._warm.setdefault(kind, dict.fromkeys(v, 0))
                for key, x in v.items():
                    acc[key] += x
        kinds = self._warm or self._first
        t.window["blocks"] = {
            kind: {"n": v["n"], "compute_ms": 1e3 * v["compute_s"] / max(v["n"], 1),
                   "comm_ms": 1e3 * v["comm_s"] / max(v["n"], 1), "stall_ms": 1e3 * v["stall_s"] / max(v["n"], 1),
                   "load_ms": 1e3 * v["load_s"] / v["loads"] if v["loads"] else None,
                   "load_mb": v["bytes"] / v["loads"] / 1e6 if v["loads"] else None}
            for kind, v in kinds.items()}
        a, f = kinds.get("attn"), kinds.get("ffn")
        if a and f and a["loads"] and f["loads"] and a["n"] and f["n"]:
            t_ar = (a["comm_s"] + f["comm_s"]) / (a["n"] + f["n"])
            t.window["steady"] = check_steady(a["compute_s"] / a["n"], f["compute_s"] / f["n"], t_ar,
                                              a["load_s"] / a["loads"], f["load_s"] / f["loads"],
                                              self.store.cfg.num_hidden_layers, self.retain_every)

    # -- loader side ---------------------------------------------------------------------------
    def _fd(self, path: str) -> int:
        fd = self._fds.get(path)
        if fd is None:
            fd = self._fds[path] = os.open(path, os.O_RDONLY)
        return fd

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
                    while not keep and not self._stop and self._in_use >= self.window:
                        self._cond.wait()
                    if self._stop:
                        return
                    slab = -1 if keep else self._take_slab(plan.elems)
                    if not keep:
                        self._in_use += 1
                buf = np.empty(plan.elems, dtype=np.float32) if keep else self._slabs[slab]
                t0 = time.perf_counter()
                weights = self._read_block(plan, buf)
                modelled = self.read_delay_s + (plan.nbytes / self.read_bps if self.read_bps else 0.0)
                if self._virtual:  # charged on the loader's virtual timeline, no real waiting
                    with self._cond:
                        freed = self._release_at.pop(n - self.window, 0.0) if not keep and n >= self.window else 0.0
                    start = max(self._loader_at, freed)
                    dt = modelled if self.read_bps else modelled + time.perf_counter() - t0
                    self._loader_at = start + dt
                else:
                    self._throttle(t0 + modelled)
                    start, dt = t0, time.perf_counter() - t0
                n += 0 if keep else 1
                t = self.timers
                with self._cond:
                    if keep:
                        self._retained[block] = (weights, start + dt)
                    else:
                        self._ready[k] = (weights, slab, start + dt)
                    t.loads += 1
                    t.loaded_bytes += plan.nbytes
                    t.load_s += dt
                    step = k // P
                    self._load_by_step[step] = self._load_by_step.get(step, 0.0) + dt
                    kind = self._kind(step, block[0])
                    kind["loads"] += 1
                    kind["load_s"] += dt
                    kind["bytes"] += plan.nbytes
                    if t.trace:
                        t.events.append((f"load {block_name(block)}", "load", start, dt))
                    self._cond.notify_all()
                k += 1
        except _Stopped:
            return
        except BaseException as e:  # surfaced to the compute side by acquire
            with self._cond:
                self._error = e if not isinstance(e, OSError) else TpiError(f"{e.filename or 'read'}: {e.strerror or e}")
                self._cond.notify_all()

    def _take_slab(self, elems: int) -> int:
        """A free slab of at least `elems` float32 (caller holds the lock and has checked the window)."""
        i, fresh = self._pool.take(elems)
        if fresh:
            if i == len(self._slabs):
                self._slabs.append(np.empty(0, dtype=np.float32))
            self._slabs[i] = np.empty(0, dtype=np.float32)  # let the old memory go before taking the new
            self._slabs[i] = np.empty(elems, dtype=np.float32)
        return i

    def _read_block(self, plan: BlockPlan, buf: np.ndarray) -> dict[str, np.ndarray]:
        weights = {}
        for r in plan.reads:
            n = int(np.prod(r.shape, dtype=np.int64))
            dst = buf[r.at: r.at + n]  # float32 view in the slab
            fd = self._fd(r.info.path)
            if r.info.dtype == "F32":
                self._read(fd, r.info.path, memoryview(dst).cast("B"), r.offset)
            elif r.info.dtype in ("BF16", "F16"):
                per = self._stage.size
                for i in range(0, n, per):
                    m = min(per, n - i)
                    stage = self._stage[:m]
                    self._read(fd, r.info.path, memoryview(stage).cast("B"), r.offset + 2 * i)
                    to_f32(stage.view(DTYPES[r.info.dtype]), r.info.dtype, out=dst[i: i + m])
            else:
                raise TpiError(f"{r.info.path}: tensor {r.info.name!r}: dtype {r.info.dtype} cannot be a weight")
            weights[r.leaf] = dst.reshape(r.shape)
        return weights

    def _read(self, fd: int, path: str, mv: memoryview, offset: int, stoppable: bool = True, ahead: int = 0) -> None:
        """Fill `mv` from byte `offset`, dropping the page cache behind each read (and `ahead` bytes past it:
        for scattered reads, whose readahead is of no use)."""
        done = 0
        while done < len(mv):
            if stoppable and self._stop:
                raise _Stopped
            want = min(READ_BYTES, len(mv) - done)
            got = os.preadv(fd, [mv[done: done + want]], offset + done)
            if got <= 0:
                raise TpiError(f"{path}: unexpected end of file at byte {offset + done}")
            if self.drop_cache:
                lo = max(0, offset + done - DROP_BEHIND) // PAGE * PAGE
                hi = -(-(offset + done + got + ahead) // PAGE) * PAGE
                os.posix_fadvise(fd, lo, hi - lo, os.POSIX_FADV_DONTNEED)
            done += got

    def _throttle(self, deadline: float) -> None:
        """Slow disks on a wall clock: wait until the modelled end of the load (close() cuts it short)."""
        while not self._stop:
            left = deadline - time.perf_counter()
            if left <= 0:
                return
            with self._cond:
                self._cond.wait(left)  # close() wakes us


# ---------------------------------------------------------------------------------------------
# The paper's steady conditions


def check_steady(t_attn: float, t_ffn: float, t_ar: float, tau_attn: float, tau_ffn: float, L: int,
                 retain_every: int = 0) -> dict:
    """Whether loading can hide behind compute + allreduce (TPI-LLM, sliding-window section).

    t_attn, t_ffn: compute time of one Attn / FFN block; t_ar: one allreduce; tau_attn, tau_ffn: load time
    of one block (seconds). Tight (I/O fully hidden): every block's compute + allreduce covers
    the next block's load: t_attn + t_ar >= tau_ffn and t_ffn + t_ar >= tau_attn. Loose (one step's
    budget covers its loads, and for every l in 1..L one of the prefix inequalities holds):
        A_l: l t_attn + (l-1) t_ffn + (2l-1) t_ar >= l tau_ffn + (l-1) tau_attn
        B_l: (l-1) t_attn + l t_ffn + (2l-1) t_ar >= (l-1) tau_ffn + l tau_attn
    With retention (keep one FFN block of every T, Prop. 6) the retained FFN blocks cost no load: among
    the first l layers ceil(l/T) of them, so l tau_ffn becomes (l - ceil(l/T)) tau_ffn in the step budget
    L (t_attn + t_ffn + 2 t_ar) >= (L - ceil(L/T)) tau_ffn + L tau_attn and in A_l (B_l: l-1 likewise).
    The paper states only the budget form and "the (l-1) variant"; applying the substitution to both
    prefix inequalities is our reading. Returns which held and the first layer l where neither did.
    """
    T = retain_every

    def kept(l: int) -> int:  # retained FFN blocks among the first l layers
        return math.ceil(l / T) if T > 0 and l > 0 else 0

    tight_attn = t_attn + t_ar >= tau_ffn  # the FFN load hides behind the Attn block before it
    tight_ffn = t_ffn + t_ar >= tau_attn  # the next Attn load hides behind the FFN block
    budget = L * (t_attn + t_ffn + 2 * t_ar) >= (L - kept(L)) * tau_ffn + L * tau_attn
    first_bad = None
    for l in range(1, L + 1):
        a = l * t_attn + (l - 1) * t_ffn + (2 * l - 1) * t_ar >= (l - kept(l)) * tau_ffn + (l - 1) * tau_attn
        b = (l - 1) * t_attn + l * t_ffn + (2 * l - 1) * t_ar >= (l - 1 - kept(l - 1)) * tau_ffn + l * tau_attn
        if not (a or b):
            first_bad = l
            break
    failed = []
    if not tight_attn:
        failed.append(f"t_attn + t_ar ({1e3 * (t_attn + t_ar):.3g} ms) < tau_ffn ({1e3 * tau_ffn:.3g} ms)")
    if not tight_ffn:
        failed.append(f"t_ffn + t_ar ({1e3 * (t_ffn + t_ar):.3g} ms) < tau_attn ({1e3 * tau_attn:.3g} ms)")
    if not budget:
        failed.append("per-step budget: L (t_attn + t_ffn + 2 t_ar) < the step's loads")
    if first_bad is not None:
        failed.append(f"prefix inequalities A_l and B_l both fail at layer l = {first_bad}")
    return {"tight": tight_attn and tight_ffn, "loose": budget and first_bad is None,
            "tight_attn": tight_attn, "tight_ffn": tight_ffn, "budget": budget, "first_violation_layer": first_bad,
            "failed": failed, "retain_every": T,
            "measured": {"t_attn": t_attn, "t_ffn": t_ffn, "t_ar": t_ar, "tau_attn": tau_attn, "tau_ffn": tau_ffn}}


def simulate_window(hold: list[float], load: list[float], window: int, retained: list[bool] | None = None,
                    steps: int = 3) -> list[float]:
    """Stall per step of this scheduler, replayed on given per-block times (the planner's prediction).

    hold[i]: time block i of the cyclic order is in use (compute + its allreduce); load[i]: its read time;
    retained[i]: kept after its first read (no window slot, no later reads). The loader reads blocks in
    order, one at a time, and may start block k only when at most window - 1 window blocks are still
    loaded or loading; the device takes blocks in order and waits for each one's read.
    """
    P = len(hold)
    retained = retained or [False] * P
    release: list[float] = []
    windowed: list[int] = []  # sequence numbers of the blocks that took a window slot
    loader = now = 0.0
    stalls = [0.0] * steps
    for k in range(P * steps):
        i, kept_already = k % P, retained[k % P] and k >= P
        if kept_already:
            ready = 0.0
        else:
            start = loader
            if not retained[i]:
                if len(windowed) >= window:
                    start = max(start, release[windowed[-window]])
                windowed.append(k)
            loader = ready = start + load[i]
        begin = max(now, ready)
        stalls[k // P] += begin - now
        now = begin + hold[i]
        release.append(now)
    return stalls
