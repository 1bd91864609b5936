"""Disk offload without prefetch: the `offload` baseline (the paper's Accelerate comparison point).

Layer: runtime. Owns `OnDemandSource`, a BlockSource that reads each block from disk when the device
asks for it and frees it right after use. No loader thread, no window, no overlap: every load is a
blocking read on the compute thread, which is what Accelerate's disk offload does (a hook before each
module loads its weights, then runs it). Compare tpicore.runtime.window.WindowSource, which reads
ahead on a thread. Reading is tpicore.weights.reader's BlockReader; must not start threads.

    acquire(block): shard file --pread--> fresh buffer per tensor (f32 as read; f16/bf16 raw, then
                    widened by checkpoint.to_f32, the resident path's conversion: bit-identical; ggml
                    blocks kept as stored, a QuantMatrix like the resident path's, unless
                    dequantize_at_load)
                    + posix_fadvise(DONTNEED) behind every read: the page cache does not grow
    device computes
    release(block): the buffers are dropped (freed)

Time: the device waits for every load. On a virtual clock (the emulator) the clock advances by the
disk model's time for the bytes (or the measured read time when no rate is modelled); on a wall clock
the read takes what it takes, stretched to the modelled time when a disk is modelled.
Each load is booked as load time and, since nothing else runs meanwhile, as stall time too.
Embedding rows are read the same way (only the rows of the tokens at hand); the LM head is one block
("post", -1), as in the resident path, so the logits are bit-identical to ResidentSource's.
"""

from __future__ import annotations

import time

import numpy as np

from tpicore.model.split import Block
from tpicore.runtime.device import Timers, block_name
from tpicore.runtime.env import DeviceEnv
from tpicore.runtime.report import TraceEvent
from tpicore.weights.reader import BlockReader
from tpicore.weights.store import TensorStore


class OnDemandSource:
    """Blocking reads on acquire, freed on release (see the module docstring).

    env: the device's clock and disk model (default: wall clock, the host's disk). drop_cache: drop
    the page cache behind every read (honest cold reads); False re-reads warm data, which only saves
    real time when a disk is modelled on a virtual clock. dequantize_at_load: ggml blocks widened to
    float32 as they are read (else kept quantized and multiplied by the fused kernels).
    """

    streams_head = False  # Device.head asks for ("post", -1): the whole head, like the resident path

    def __init__(self, store: TensorStore, env: DeviceEnv | None = None, drop_cache: bool = True,
                 dequantize_at_load: bool = False) -> None:
        env = env or DeviceEnv()
        self.keep_quantized = not dequantize_at_load
        self.store, self.clock, self.disk = store, env.clock, env.disk
        self.reader = BlockReader(drop_cache)
        self.timers = Timers()
        self._held: dict[Block, dict[str, np.ndarray]] = {}

    def attach(self, timers: Timers) -> None:
        """Book loads into the Device's timers (Device calls this when it is built)."""
        if timers is self.timers:
            return
        mine = self.timers  # loads booked before the Device existed (none, in practice)
        timers.load_s += mine.load_s
        timers.stall_s += mine.stall_s
        timers.loads += mine.loads
        timers.loaded_bytes += mine.loaded_bytes
        timers.stalls += mine.stalls
        self.timers = timers

    def acquire(self, block: Block) -> dict[str, np.ndarray]:
        leaves = self.store.leaves(block)
        if not leaves:  # Pre: the embedding rows are read by embed_rows
            return {}
        t0, w0 = self.clock.now(), time.perf_counter()
        weights, nbytes = {}, 0
        for leaf, name in leaves.items():
            info = self.store.ckpt.info(name)
            weights[leaf] = self.reader.read_tensor(info, info.offset, info.nbytes, info.shape, self.keep_quantized)
            nbytes += info.nbytes
        self._book(nbytes, t0, w0, block)
        self._held[block] = weights
        return weights

    def release(self, block: Block) -> None:
        self._held.pop(block, None)  # the last reference: the buffers are freed

    def embed_rows(self, ids: np.ndarray) -> np.ndarray:
        """Embedding rows for the tokens at hand, read past the page cache: [T] -> [T, D]."""
        t0, w0 = self.clock.now(), time.perf_counter()
        rows = self.store.embed_rows(ids, self.reader)  # [T] -> [T, D]
        table = self.store.ckpt.info("model.embed_tokens.weight")
        self._book(rows.shape[0] * (table.nbytes // table.shape[0]), t0, w0, None)
        return rows

    def close(self) -> None:
        self._held.clear()
        self.reader.close()

    def _book(self, nbytes: int, t0: float, w0: float, block: Block | None) -> None:
        """Charge one load to the device: it waited for all of it."""
        if self.clock.virtual:
            self.clock.advance(self.disk.charge_s(nbytes, time.perf_counter() - w0))
        elif self.disk.modelled:  # a slow modelled disk on a wall clock: really wait the rest
            left = w0 + self.disk.floor_s(nbytes) - time.perf_counter()
            if left > 0:
                time.sleep(left)
        dt = self.clock.now() - t0
        t = self.timers
        t.load_s += dt
        t.stall_s += dt
        t.loads += block is not None
        t.stalls += block is not None
        t.loaded_bytes += nbytes
        if t.trace and block is not None:
            t.events.append(TraceEvent(f"load {block_name(block)}", "load", t0, dt))
