"""A single-process generation session: one device holding the whole model.

Owns turning CLI arguments into a ready `Device` (weights source, caches) for world size 1.
The tensor-parallel counterpart is tpicore.parallel.ParallelSession, with the same interface:
`open(args)`, `cfg`, `tokenizer_dir`, `prepare(max_seq)`, `step(ids, pos, all_logits)`, `report()`,
`write_trace(path)`. Must not parse flags itself or print.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile

import numpy as np

from tpicore.runtime.device import BlockSource, Device, ResidentSource, Timers
from tpicore.runtime.window import WindowSource
from tpicore.weights.store import TensorStore


def make_source(store: TensorStore, window: int | None, retain_every: int = 0, no_window: bool = False,
                **kwargs) -> BlockSource:
    """All-resident weights, or the sliding-window scheduler when a window is asked for."""
    if window is None or no_window:
        return ResidentSource(store)

    return WindowSource(store, window=window, retain_every=retain_every, **kwargs)


def write_trace(path: str, per_rank: dict[int, Timers], t0: float) -> None:
    """Chrome/Perfetto trace JSON: one process per rank, compute/comm on the main thread, loads on the loader."""
    events = []
    for rank, timers in per_rank.items():
        events.append({"name": "process_name", "ph": "M", "pid": rank, "args": {"name": f"rank {rank}"}})
        for name, cat, start, dur in timers.events:
            tid = 1 if cat in ("load",) else 0
            events.append({"name": name, "cat": cat, "ph": "X", "pid": rank, "tid": tid,
                           "ts": (start - t0) * 1e6, "dur": dur * 1e6})
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump({"traceEvents": events, "displayTimeUnit": "ms"}, f)
    os.replace(tmp, path)


class LocalSession:
    def __init__(self, store: TensorStore, args: argparse.Namespace) -> None:
        self.store, self.args = store, args
        self.cfg = store.cfg
        self.tokenizer_dir = store.root
        self.device: Device | None = None

    @classmethod
    def open(cls, args: argparse.Namespace) -> "LocalSession":
        store = TensorStore.from_model_dir(args.model)
        store.check()
        return cls(store, args)

    def __enter__(self) -> "LocalSession":
        return self

    def __exit__(self, *exc) -> None:
        if self.device is not None:
            self.device.close()

    def prepare(self, max_seq: int) -> None:
        a = self.args
        source = make_source(self.store, getattr(a, "window", None), getattr(a, "retain_every", 0),
                             getattr(a, "no_window", False))
        self.device = Device(self.store, source, max_seq)
        self.device.timers.trace = bool(getattr(a, "trace", None))

    def step(self, ids: np.ndarray, pos: int, all_logits: bool = False) -> np.ndarray:
        return self.device.step(ids, pos, all_logits)

    def report(self) -> dict:
        rep = self.device.report()
        return {"devices": 1, "memory": rep["memory"], "timers": rep["timers"], "window": rep["window"]}

    def write_trace(self, path: str) -> None:
        events = self.device.timers.events
        write_trace(path, {0: self.device.timers}, events[0][2] if events else 0.0)
