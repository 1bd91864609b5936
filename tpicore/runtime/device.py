"""One device's share of the forward pass: weight sources, KV caches, timing, and the block loop.

Layer: runtime. Owns the per-device runtime state (caches, counters), the `BlockSource` protocol every
weight source implements, and the order in which blocks run: Pre (embedding, master only), Attn_l and
FFN_l for every layer, Post (final norm + LM head, master only). Weights come from a BlockSource (all
resident here; the sliding window in tpicore.runtime.window; on-demand reads in
tpicore.runtime.ondemand); the math comes from tpicore.model; the collective and the clock are passed
in. Must not open sockets or spawn processes.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Callable, Protocol

import numpy as np

from tpicore.errors import TpiError
from tpicore.model import llama as M
from tpicore.model.cost import NO_WORK, Work, block_work
from tpicore.model.split import Block
from tpicore.runtime.env import Clock, DeviceEnv, WallClock, reduction_work
from tpicore.runtime.memory import memory_report
from tpicore.runtime.report import RankReport, TimeSplit, TraceEvent
from tpicore.runtime.window_stats import WindowStats
from tpicore.weights.reader import BlockReader, load_resident
from tpicore.weights.store import TensorStore, head_row_ranges


def block_name(block: Block) -> str:
    """ "attn3", "ffn0", "post2"; "pre" and "post" (the whole head) without an index."""
    kind, i = block
    return kind if i < 0 else f"{kind}{i}"


# ---------------------------------------------------------------------------------------------
# Time accounting


@dataclass
class Timers:
    """Per-device time split (seconds) and counters; compute excludes the allreduce time spent inside
    blocks. The load counters and `window` are booked by the weight source (zero / None without one
    that reads from disk)."""

    compute_s: float = 0.0
    comm_s: float = 0.0
    load_s: float = 0.0
    stall_s: float = 0.0
    events: list[TraceEvent] = field(default_factory=list)  # when tracing
    trace: bool = False
    loads: int = 0  # blocks read from disk
    loaded_bytes: int = 0  # bytes read from disk (stored dtype)
    stalls: int = 0  # acquires that found their block not loaded yet
    window: WindowStats | None = None  # the window scheduler's statistics (live)

    def snapshot(self) -> TimeSplit:
        """The totals so far (subtract two snapshots for one span); details are in `window`."""
        return TimeSplit(self.compute_s, self.comm_s, self.load_s, self.stall_s, self.loads, self.loaded_bytes,
                         self.stalls)


# ---------------------------------------------------------------------------------------------
# Weight sources


class BlockSource(Protocol):
    """Where a Device gets each block's weights. acquire/release bracket one use of a block, in the
    Device's block order; the arrays are valid until the release."""

    streams_head: bool  # True: the LM head comes as ("post", c) vocabulary chunks, else as ("post", -1)

    def attach(self, timers: Timers) -> None:
        """Book loads, stalls and trace events into the Device's timers (called once, by Device)."""
    def acquire(self, block: Block) -> dict[str, np.ndarray]: ...
    def release(self, block: Block) -> None: ...
    def embed_rows(self, ids: np.ndarray) -> np.ndarray:
        """Embedding rows of the tokens at hand: [T] -> [T, D] (master only)."""
    def close(self) -> None: ...


class ResidentSource:
    """Every block stays in memory after first use (no scheduler); the page cache is left alone.

    env: the device's clock and disk. The first touch of each block (its stored bytes, whether read or
    faulted in through a memory map) and of each embedding row is charged through the disk model and
    booked as load time and bytes (not as `loads`, which count window / on-demand reads); later uses read
    nothing."""

    streams_head = False

    def __init__(self, store: TensorStore, dequantize_at_load: bool = False, env: DeviceEnv | None = None) -> None:
        self.store = store
        self.cache: dict[Block, dict[str, np.ndarray]] = {}
        self.reader = BlockReader(drop_cache=False)
        self.dequantize_at_load = dequantize_at_load  # ggml weights: float32 at load, else kept quantized
        self.env = env or DeviceEnv()
        self.timers = Timers()
        self._rows_seen: set[int] = set()  # embedding rows read once (then in the page cache)

    def attach(self, timers: Timers) -> None:
        self.timers = timers  # first touches only: nothing is loaded from disk after the first use

    def acquire(self, block: Block) -> dict[str, np.ndarray]:
        w = self.cache.get(block)
        if w is None:
            t0, w0 = self.env.clock.now(), time.perf_counter()
            w = self.cache[block] = {leaf: self._load(name) for leaf, name in self.store.leaves(block).items()}
            if w:
                self._first_touch(self.store.block_nbytes(block), t0, w0)
        return w

    def _first_touch(self, nbytes: int, t0: float, w0: float) -> None:
        """Charge a first read of `nbytes` begun at clock time t0 (perf_counter w0) and book it as a load."""
        clock, disk, t = self.env.clock, self.env.disk, self.timers
        measured = time.perf_counter() - w0
        if clock.virtual:
            clock.advance(disk.charge_s(nbytes, measured))
        elif disk.modelled:  # a slow modelled disk on a wall clock: really wait the rest
            clock.advance(max(0.0, disk.floor_s(nbytes) - measured))
        t.load_s += clock.now() - t0
        t.loaded_bytes += nbytes  # not counted in `loads` (window / on-demand block reads)

    def _load(self, name: str) -> np.ndarray:
        """A weight: ggml blocks stay quantized (weights.packed.QuantMatrix), the rest float32."""
        packed = load_resident(self.store.ckpt.info(name), self.dequantize_at_load)
        return self.store.load(name) if packed is None else packed  # type: ignore[return-value]

    def release(self, block: Block) -> None:
        pass

    def embed_rows(self, ids: np.ndarray) -> np.ndarray:
        t0, w0 = self.env.clock.now(), time.perf_counter()
        rows = self.store.embed_rows(ids, self.reader)  # [T] -> [T, D]
        new = {int(i) for i in ids} - self._rows_seen
        if new:
            self._rows_seen |= new
            table = self.store.ckpt.info("model.embed_tokens.weight")
            self._first_touch(len(new) * (table.nbytes // table.shape[0]), t0, w0)
        return rows

    def close(self) -> None:
        self.cache.clear()
        self.reader.close()


class Device:
    """One device's share of the model: runs the Attn/FFN blocks of every layer on its shard."""

    def __init__(self, store: TensorStore, source: BlockSource, max_seq: int,
                 allreduce: M.AllReduce = M.identity, clock: Clock | None = None,
                 layer_ids: range | None = None) -> None:
        self.store, self.source, self.cfg = store, source, store.cfg
        self.max_seq = max_seq
        self.clock = clock or WallClock()
        self.timers = Timers()
        source.attach(self.timers)
        self._allreduce = allreduce
        # the layers this device runs: all of them on the master (tensor parallel), a worker's shared
        # layers (K.. with K private layers, which it holds nothing of), or a pipeline stage's range
        layout = store.layout
        if layer_ids is None:
            layer_ids = range(self.cfg.num_hidden_layers) if layout.rank == 0 else \
                layout.shared_layers(self.cfg.num_hidden_layers)
        self.layer_ids = layer_ids
        rope = M.Rope()  # one step's RoPE tables, shared by every layer
        self.caches = {layer: M.KVCache(layout.at(layer, self.cfg).n_kv_heads, max_seq, self.cfg.head_dim, rope)
                       for layer in self.layer_ids}
        self.scratch = M.DecodeScratch(self.cfg.hidden_size)  # one-token steps' buffers (model.llama's lean path)
        self._head_ranges: list[tuple[int, int]] | None = None  # head_row_ranges, fixed by the store
        self._head_slices: tuple[np.ndarray, list[np.ndarray]] | None = None  # (resident table, its chunks)

    def allreduce(self, x: np.ndarray) -> np.ndarray:
        """The collective, with its time booked as communication rather than compute. The CPU it takes
        (the adds, the transport's copies) is charged on the clock after it (Clock.cost_s)."""
        clock, t = self.clock, self.timers
        clock.end_compute()
        t0, cpu0 = clock.now(), time.thread_time() if clock.virtual else 0.0
        y = self._allreduce(x)
        if clock.virtual:  # a wall clock's cost_s is 0: the adds took their real time already
            clock.advance(clock.cost_s(time.thread_time() - cpu0, reduction_work(self._allreduce, x.size)))
        dt = clock.now() - t0
        t.comm_s += dt
        if t.trace:
            t.events.append(TraceEvent("allreduce", "comm", t0, dt))
        clock.begin_compute()
        return y

    def work(self, block: Block, tokens: int, context: int, rows: int | None = None) -> Work:
        """What `block` costs for `tokens` tokens with `context` cached positions after them (tpicore.model.cost).
        NO_WORK on a wall clock, which charges no model (and the hot path skips the arithmetic)."""
        if not self.clock.virtual:
            return NO_WORK
        kind, layer = block
        layout = self.store.layout.at(layer, self.cfg) if kind in ("attn", "ffn") else self.store.layout
        return block_work(self.cfg, layout, kind, tokens, context, rows) if layout is not None else NO_WORK

    def _run(self, block: Block, fn: Callable[[dict[str, np.ndarray]], np.ndarray], work: Work = NO_WORK) -> np.ndarray:
        clock, t = self.clock, self.timers
        w = self.source.acquire(block)
        comm_before = t.comm_s
        t0 = clock.now()
        clock.begin_compute(work)
        y = fn(w)
        clock.end_compute()
        dt = clock.now() - t0
        t.compute_s += dt - (t.comm_s - comm_before)
        if t.trace:
            t.events.append(TraceEvent(block_name(block), "compute", t0, dt))
        self.source.release(block)
        return y

    def layers(self, x: np.ndarray, pos: int, layer_ids: range | None = None) -> np.ndarray:
        """Decoder layers over hidden states x [T, D] at positions pos..pos+T-1: this device's layers, or
        `layer_ids` of them. A private layer (Layout.private) runs here alone, with the identity allreduce."""
        if pos + x.shape[0] > self.max_seq:
            raise TpiError(f"context: {pos + x.shape[0]} positions exceed the maximum of {self.max_seq}")
        cfg, layout, x_in = self.cfg, self.store.layout, x
        scratch = self.scratch if x.shape[0] == 1 else None  # one token: the lean path, into scratch buffers
        for layer in self.layer_ids if layer_ids is None else layer_ids:
            kv = self.caches[layer]
            ar = M.identity if layout.private(layer) or self._allreduce is M.identity else self.allreduce
            T = x.shape[0]
            x = self._run(("attn", layer), lambda w: M.attn_block(x, w, cfg, kv, pos, ar, scratch),
                          self.work(("attn", layer), T, pos + T))
            x = self._run(("ffn", layer), lambda w: M.ffn_block(x, w, cfg, ar, scratch),
                          self.work(("ffn", layer), T, pos + T))
        return x.copy() if scratch is not None and x is not x_in else x  # scratch is reused by the next step

    # master only -------------------------------------------------------------------------------
    def embed(self, ids: np.ndarray) -> np.ndarray:
        self.source.acquire(("pre", -1))
        t0, load0 = self.clock.now(), self.timers.load_s
        self.clock.begin_compute(self.work(("pre", -1), len(ids), 0))
        x = self.source.embed_rows(ids)  # [T] -> [T, D]: only these rows of the table are read
        self.clock.end_compute()
        self.timers.compute_s += self.clock.now() - t0 - (self.timers.load_s - load0)  # the rows' read is a load
        self.source.release(("pre", -1))
        return x

    def head(self, x: np.ndarray) -> np.ndarray:
        """Final norm once, then the LM head one vocabulary chunk at a time: [T, D] -> [T, V].

        A source with `streams_head` (the window scheduler) serves chunk c as block ("post", c), so the
        V x D table is never resident whole; otherwise block ("post", -1) holds it and the same row
        ranges are sliced from it. Both paths run the same norm and the same `linear` per chunk, so
        their logits are bit-identical.
        """
        if self._head_ranges is None:
            self._head_ranges = head_row_ranges(self.store)
        ranges = self._head_ranges
        out = np.empty((x.shape[0], self.cfg.vocab_size), dtype=np.float32)  # [T, V]
        normed: list[np.ndarray] = []

        def chunk(w: dict[str, np.ndarray], lo: int, hi: int, rows: np.ndarray) -> np.ndarray:
            if not normed:
                normed.append(M.rms_norm(x, w["norm"], self.cfg.rms_norm_eps))  # [T, D]
            M.linear(normed[0], rows, out=out[:, lo:hi])  # [T, D] @ [hi-lo, D].T -> [T, hi-lo], in place
            return out

        T = x.shape[0]
        if self.source.streams_head:
            for c, (lo, hi) in enumerate(ranges):
                self._run(("post", c), lambda w: chunk(w, lo, hi, w["lm_head"]), self.work(("post", c), T, 0, hi - lo))
        else:
            self._run(("post", -1), lambda w: [chunk(w, lo, hi, rows) for (lo, hi), rows in
                                               zip(ranges, self._head_rows(w["lm_head"], ranges))][-1],
                      self.work(("post", -1), T, 0))
        return out

    def _head_rows(self, table: np.ndarray, ranges: list[tuple[int, int]]) -> list[np.ndarray]:
        """The resident head's chunk views [hi-lo, D], sliced once per table (not once per step)."""
        cached = self._head_slices
        if cached is None or cached[0] is not table:
            cached = self._head_slices = (table, [table[lo:hi] for lo, hi in ranges])
        return cached[1]

    def step(self, ids: np.ndarray, pos: int, all_logits: bool = False) -> np.ndarray:
        """Single-device forward: ids [T] -> logits [T, V] (or [1, V] for the last position)."""
        x = self.layers(self.embed(ids), pos)
        return self.head(x if all_logits else x[-1:])

    def report(self, rank: int) -> RankReport:
        """A snapshot of this device as rank `rank`: peak RSS, page cache held by its weight files
        (reported apart), time split, the window's statistics (None without it), trace events."""
        files = sorted({info.path for info in self.store.ckpt.tensors.values()})
        mem = memory_report(files)
        t = self.timers
        return RankReport(rank, mem["peak_rss_bytes"], mem["page_cache_bytes"], mem, t.snapshot(),
                          copy.deepcopy(t.window), list(t.events))

    def close(self) -> None:
        self.source.close()

