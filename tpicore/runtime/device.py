"""One device's share of the forward pass: weight sources, KV caches, timing, and the block loop.

Owns the per-device runtime state (caches, counters) and the order in which blocks run:
Pre (embedding, master only), Attn_l and FFN_l for every layer, Post (final norm + LM head, master
only). Weights come from a `BlockSource` (all resident, or the sliding-window scheduler); the math
comes from tpicore.model; the collective is passed in. Must not open sockets or spawn processes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Protocol

import numpy as np

from tpicore.errors import TpiError
from tpicore.model import llama as M
from tpicore.model.split import Block
from tpicore.runtime.memory import memory_report
from tpicore.weights.store import TensorStore, head_row_ranges


class BlockSource(Protocol):
    def acquire(self, block: Block) -> dict[str, np.ndarray]: ...
    def release(self, block: Block) -> None: ...
    def close(self) -> None: ...


class ResidentSource:
    """Every block stays in memory after first use (no scheduler)."""

    def __init__(self, store: TensorStore) -> None:
        self.store = store
        self.cache: dict[Block, dict[str, np.ndarray]] = {}

    def acquire(self, block: Block) -> dict[str, np.ndarray]:
        w = self.cache.get(block)
        if w is None:
            w = self.cache[block] = {leaf: self.store.load(name) for leaf, name in self.store.leaves(block).items()}
        return w

    def release(self, block: Block) -> None:
        pass

    def close(self) -> None:
        self.cache.clear()


# ---------------------------------------------------------------------------------------------
# Time accounting


class Clock(Protocol):
    def now(self) -> float: ...
    def begin_compute(self) -> None: ...
    def end_compute(self) -> None: ...


class WallClock:
    """Real time; compute sections need no bookkeeping."""

    def now(self) -> float:
        return time.perf_counter()

    def begin_compute(self) -> None:
        pass

    def end_compute(self) -> None:
        pass


@dataclass
class Timers:
    """Per-device time split (seconds). compute excludes the allreduce time spent inside blocks."""

    compute_s: float = 0.0
    comm_s: float = 0.0
    load_s: float = 0.0
    stall_s: float = 0.0
    events: list = field(default_factory=list)  # (name, category, start_s, duration_s) when tracing
    trace: bool = False
    # booked by the window scheduler (tpicore.scheduler); zero without it
    loads: int = 0  # blocks read from disk
    loaded_bytes: int = 0  # bytes read from disk (stored dtype)
    stalls: int = 0  # acquires that found their block not loaded yet
    window: dict = field(default_factory=dict)  # per-block averages, per-step split, first stall, steady conditions

    def snapshot(self) -> dict[str, float]:
        """Flat numeric totals (callers subtract two snapshots); details are in `window`."""
        return {"compute_s": self.compute_s, "comm_s": self.comm_s, "load_s": self.load_s, "stall_s": self.stall_s,
                "loads": self.loads, "loaded_bytes": self.loaded_bytes, "stalls": self.stalls}


class Device:
    """One device's share of the model: runs the Attn/FFN blocks of every layer on its shard."""

    def __init__(self, store: TensorStore, source: BlockSource, max_seq: int,
                 allreduce: M.AllReduce = M.identity, clock: Clock | None = None,
                 layer_ids: range | None = None) -> None:
        self.store, self.source, self.cfg = store, source, store.cfg
        self.max_seq = max_seq
        self.clock = clock or WallClock()
        self.timers = Timers()
        if hasattr(source, "attach"):  # the window scheduler books loads, stalls and trace events here
            source.attach(self.timers)
        self._allreduce = allreduce
        # the layers this device runs: all of them (tensor parallel), or a pipeline stage's range
        self.layer_ids = layer_ids if layer_ids is not None else range(self.cfg.num_hidden_layers)
        self.caches = {layer: M.KVCache(store.layout.n_kv_heads, max_seq, self.cfg.head_dim)
                       for layer in self.layer_ids}

    def allreduce(self, x: np.ndarray) -> np.ndarray:
        """The collective, with its time booked as communication rather than compute."""
        clock, t = self.clock, self.timers
        clock.end_compute()
        t0 = clock.now()
        y = self._allreduce(x)
        dt = clock.now() - t0
        t.comm_s += dt
        if t.trace:
            t.events.append(("allreduce", "comm", t0, dt))
        clock.begin_compute()
        return y

    def _run(self, block: Block, fn: Callable[[dict[str, np.ndarray]], np.ndarray]) -> np.ndarray:
        clock, t = self.clock, self.timers
        w = self.source.acquire(block)
        comm_before = t.comm_s
        t0 = clock.now()
        clock.begin_compute()
        y = fn(w)
        clock.end_compute()
        dt = clock.now() - t0
        t.compute_s += dt - (t.comm_s - comm_before)
        if t.trace:
            t.events.append((f"{block[0]}{'' if block[1] < 0 else block[1]}", "compute", t0, dt))
        self.source.release(block)
        return y

    def layers(self, x: np.ndarray, pos: int) -> np.ndarray:
        """All decoder layers over hidden states x [T, D] at positions pos..pos+T-1."""
        if pos + x.shape[0] > self.max_seq:
            raise TpiError(f"context: {pos + x.shape[0]} positions exceed the maximum of {self.max_seq}")
        cfg = self.cfg
        for layer in self.layer_ids:
            kv = self.caches[layer]
            x = self._run(("attn", layer), lambda w: M.attn_block(x, w, cfg, kv, pos, self.allreduce))
            x = self._run(("ffn", layer), lambda w: M.ffn_block(x, w, cfg, self.allreduce))
        return x

    # master only -------------------------------------------------------------------------------
    def embed(self, ids: np.ndarray) -> np.ndarray:
        self.source.acquire(("pre", -1))
        t0 = self.clock.now()
        self.clock.begin_compute()
        rows = getattr(self.source, "embed_rows", None) or self.store.embed_rows  # the window reads past the page cache
        x = rows(ids)  # [T] -> [T, D]: only these rows of the table are read
        self.clock.end_compute()
        self.timers.compute_s += self.clock.now() - t0
        self.source.release(("pre", -1))
        return x

    def head(self, x: np.ndarray) -> np.ndarray:
        """Final norm once, then the LM head one vocabulary chunk at a time: [T, D] -> [T, V].

        A source with `streams_head` (the window scheduler) serves chunk c as block ("post", c), so the
        V x D table is never resident whole; otherwise block ("post", -1) holds it and the same row
        ranges are sliced from it. Both paths run the same norm and the same `linear` per chunk, so
        their logits are bit-identical.
        """
        ranges = head_row_ranges(self.store)
        out = np.empty((x.shape[0], self.cfg.vocab_size), dtype=np.float32)  # [T, V]
        normed: list[np.ndarray] = []

        def chunk(w: dict[str, np.ndarray], lo: int, hi: int, rows: np.ndarray) -> np.ndarray:
            if not normed:
                normed.append(M.rms_norm(x, w["norm"], self.cfg.rms_norm_eps))  # [T, D]
            out[:, lo:hi] = M.linear(normed[0], rows)  # [T, D] @ [hi-lo, D].T -> [T, hi-lo]
            return out

        if getattr(self.source, "streams_head", False):
            for c, (lo, hi) in enumerate(ranges):
                self._run(("post", c), lambda w: chunk(w, lo, hi, w["lm_head"]))
        else:
            self._run(("post", -1), lambda w: [chunk(w, lo, hi, w["lm_head"][lo:hi]) for lo, hi in ranges][-1])
        return out

    def step(self, ids: np.ndarray, pos: int, all_logits: bool = False) -> np.ndarray:
        """Single-device forward: ids [T] -> logits [T, V] (or [1, V] for the last position)."""
        x = self.layers(self.embed(ids), pos)
        return self.head(x if all_logits else x[-1:])

    def report(self) -> dict:
        """Peak RSS, page cache held by this device's weight files (reported apart), time split, and
        the window scheduler's per-block averages / steady-condition checks (empty without it)."""
        files = sorted({info.path for info in self.store.ckpt.tensors.values()})
        mem = memory_report(files)
        return {"peak_rss_bytes": mem["peak_rss_bytes"], "memory": mem, "timers": self.timers.snapshot(),
                "window": self.timers.window}

    def close(self) -> None:
        self.source.close()

