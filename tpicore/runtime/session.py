"""A single-process generation session: one device holding the whole model, and the options of a run.

Layer: runtime. Owns `GenerateOptions` (what `tpi generate` asks for, built once by the CLI), turning
them into a ready `Device` for world size 1 (`LocalSession`), choosing a weight source
(`make_source`), and writing a Chrome/Perfetto trace. The tensor-parallel counterpart is
tpicore.dist.session.ParallelSession, with the same interface: `open(opts)`, `cfg`, `store`,
`tokenizer_dir`, `prepare(max_seq)`, `step(ids, pos, all_logits)`, `report()`, `write_trace(path)`.
Must not parse flags itself or print.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass

import numpy as np

from tpicore.comm.channel import DEFAULT_TIMEOUT_S
from tpicore.runtime.device import BlockSource, Device, ResidentSource
from tpicore.runtime.env import DeviceEnv
from tpicore.runtime.report import TraceEvent
from tpicore.runtime.window import WindowSource
from tpicore.weights.store import TensorStore


@dataclass(frozen=True)
class GenerateOptions:
    """How to run one generation: where the weights are, how many devices, the memory scheduler."""

    model: str | None = None  # HF checkpoint folder
    shards: str | None = None  # the output folder of `tpi shard` (instead of model)
    devices: int = 1
    ratios: str | None = None  # per-device share, e.g. "3,2,2,1" (None: equal)
    allreduce: str = "star"
    listen: str | None = None  # HOST:PORT to wait for remote workers at (None: spawn local workers)
    secret_file: str | None = None
    timeout_s: float = DEFAULT_TIMEOUT_S
    window: int | None = None  # sliding window of resident blocks; None: every block resident
    retain_every: int = 0
    trace: bool = False  # record trace events
    private_layers: int | None = None  # layers 0..K-1 on the master alone; None: 0, or as --shards were written
    dequantize_at_load: bool = False  # ggml weights as float32 when loaded (else kept quantized, fused dequantize+GEMV)
    split_head: bool = False  # --split-head: the LM head sharded over the devices by vocabulary rows
    failover: bool = True  # a lost device: re-split over the survivors and go on (--no-failover: fail the run)
    spares: int = 0  # local standby worker processes (--spares; remote spares join with `tpi worker --spare`)

    @property
    def local(self) -> bool:
        """One process, no shard folders, no remote workers: LocalSession's case."""
        return self.devices == 1 and not self.shards and not self.listen


def make_source(store: TensorStore, window: int | None, retain_every: int = 0, env: DeviceEnv | None = None,
                drop_cache: bool = True, dequantize_at_load: bool = False) -> BlockSource:
    """All-resident weights, or the sliding-window scheduler when a window is asked for."""
    if window is None:
        return ResidentSource(store, dequantize_at_load, env)
    return WindowSource(store, window=window, retain_every=retain_every, env=env, drop_cache=drop_cache,
                        dequantize_at_load=dequantize_at_load)


def write_trace(path: str, per_rank: dict[int, list[TraceEvent]], t0: float) -> None:
    """Chrome/Perfetto trace JSON: one process per rank, compute/comm on the main thread, loads on the loader."""
    events = []
    for rank, trace in per_rank.items():
        events.append({"name": "process_name", "ph": "M", "pid": rank, "args": {"name": f"rank {rank}"}})
        for name, cat, start, dur in trace:
            tid = 1 if cat in ("load",) else 0
            events.append({"name": name, "cat": cat, "ph": "X", "pid": rank, "tid": tid,
                           "ts": (start - t0) * 1e6, "dur": dur * 1e6})
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump({"traceEvents": events, "displayTimeUnit": "ms"}, f)
    os.replace(tmp, path)


class LocalSession:
    def __init__(self, store: TensorStore, opts: GenerateOptions) -> None:
        self.store, self.opts = store, opts
        self.cfg = store.cfg
        self.tokenizer_dir = store.root
        self.device: Device | None = None

    @classmethod
    def open(cls, opts: GenerateOptions) -> "LocalSession":
        store = TensorStore.from_model_dir(opts.model)
        store.check()
        return cls(store, opts)

    def __enter__(self) -> "LocalSession":
        return self

    def __exit__(self, *exc) -> None:
        if self.device is not None:
            self.device.close()

    def prepare(self, max_seq: int) -> None:
        source = make_source(self.store, self.opts.window, self.opts.retain_every,
                             dequantize_at_load=self.opts.dequantize_at_load)
        self.device = Device(self.store, source, max_seq)
        self.device.timers.trace = self.opts.trace

    def step(self, ids: np.ndarray, pos: int, all_logits: bool = False) -> np.ndarray:
        return self.device.step(ids, pos, all_logits)

    def report(self) -> dict:
        """The `tpi generate --json` fields of one device: memory, time split, window statistics."""
        rep = self.device.report(0)
        return {"devices": 1, "memory": rep.memory, "timers": rep.time_split.to_json(),
                "window": rep.window.to_json() if rep.window is not None else {}}

    def write_trace(self, path: str) -> None:
        events = self.device.timers.events
        write_trace(path, {0: events}, events[0].start_s if events else 0.0)
