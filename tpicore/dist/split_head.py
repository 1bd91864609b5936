"""`--split-head`: the LM head sharded across devices by vocabulary rows (opt-in; the default keeps it private).

Layer: dist. Owns the vocabulary split, handing each worker its rows of the head (and the final norm)
once at setup, and one decode step's head: every rank computes the logits of its vocabulary slice for
the last position from the hidden state it already holds after the last allreduce; the master gathers
the slices into [1, V]. Must not contain model math beyond calling tpicore.model, nor wire details.

What a worker then sees, beyond the default: the LM head rows and final-norm weight of its vocabulary
slice (model weights), and every step the logits of its slice at the last position, which show how
likely each token of its slice is next (and so, often, which token comes next). Token ids and text
still never leave the master.

    master                                       worker r
    setup: norm [D], head rows [lo_r:hi_r, D] --> (in chunks of about 1 MiB)
    step:  layers ... last allreduce: every rank holds x [T, D]
           own slice  <-- logits [hi_r - lo_r] -- norm(x[-1]) @ rows.T
"""

from __future__ import annotations

import numpy as np

from tpicore.comm.channel import Channel
from tpicore.comm.frame import Kind
from tpicore.errors import TpiError
from tpicore.model import llama as M
from tpicore.model.config import ModelConfig
from tpicore.model.split import apportion
from tpicore.runtime.device import Device

CHUNK_NBYTES = 1 << 20  # head rows travel in pieces of about this size (the channels' buffers stay small)


def vocab_ranges(vocab_size: int, world_size: int) -> list[tuple[int, int]]:
    """Each rank's vocabulary rows [lo, hi): equal shares, the first ranks one more."""
    counts = apportion(vocab_size, [1.0] * world_size)
    starts = np.concatenate([[0], np.cumsum(counts)])
    return [(int(starts[r]), int(starts[r + 1])) for r in range(world_size)]


def send_head(ch: Channel, norm: np.ndarray, rows: np.ndarray) -> None:
    """Master: the final norm [D] and a worker's head rows [n, D], once at setup."""
    ch.send_array(Kind.TENSOR, np.asarray(norm, dtype=np.float32))
    step = max(1, CHUNK_NBYTES // max(1, rows.shape[1] * 4))
    for lo in range(0, rows.shape[0], step):
        ch.send_array(Kind.TENSOR, np.ascontiguousarray(rows[lo:lo + step], dtype=np.float32))  # [<=step, D]


class HeadSlice:
    """One rank's part of the LM head: logits of vocabulary rows [lo, hi) at the last position."""

    def __init__(self, cfg: ModelConfig, norm: np.ndarray, rows: np.ndarray, lo: int) -> None:
        self.cfg, self.norm, self.rows, self.lo = cfg, norm, rows, lo

    @property
    def hi(self) -> int:
        return self.lo + self.rows.shape[0]

    @classmethod
    def receive(cls, ch: Channel, cfg: ModelConfig, rank: int, world_size: int) -> "HeadSlice":
        """Worker: this rank's rows and the final norm from the master (see send_head)."""
        lo, hi = vocab_ranges(cfg.vocab_size, world_size)[rank]
        D = cfg.hidden_size
        norm = ch.recv_into(np.empty(D, dtype=np.float32))
        rows = np.empty((hi - lo, D), dtype=np.float32)  # [V_r, D]
        step = max(1, CHUNK_NBYTES // (D * 4))
        for a in range(0, hi - lo, step):
            ch.recv_into(rows[a:a + step])
        return cls(cfg, norm, rows, lo)

    def logits(self, x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """x [T, D] -> logits of this slice at the last position [hi - lo] (into `out` when given)."""
        normed = M.rms_norm(x[-1:], self.norm, self.cfg.rms_norm_eps)  # [1, D]
        y = M.linear(normed, self.rows, out=None if out is None else out[None, :])  # [1, V_r]
        return y[0]


def timed(dev: Device, head: HeadSlice, x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """head.logits(x), its time booked as the device's compute."""
    t0 = dev.clock.now()
    dev.clock.begin_compute()
    y = head.logits(x, out)
    dev.clock.end_compute()
    dev.timers.compute_s += dev.clock.now() - t0
    return y


def gather_logits(dev: Device, head: HeadSlice, channels: list[Channel], x: np.ndarray) -> np.ndarray:
    """Master: its own slice, then each worker's, into logits [1, V]."""
    out = np.empty((1, head.cfg.vocab_size), dtype=np.float32)  # [1, V]
    timed(dev, head, x, out[0, head.lo:head.hi])
    t0 = dev.clock.now()
    ranges = vocab_ranges(head.cfg.vocab_size, len(channels) + 1)
    for r, ch in enumerate(channels, start=1):
        lo, hi = ranges[r]
        ch.recv_into(out[0, lo:hi])
    dev.timers.comm_s += dev.clock.now() - t0
    return out


def check_split_head(window: int | None, shared_layers: int) -> None:
    if window is not None:
        raise TpiError("--split-head: not with --window (the master streams its head; keep it resident)")
    if not shared_layers:
        raise TpiError("--split-head: every layer is private to the master (--private-layers = all); "
                       "the workers run no step")
