"""The window scheduler's statistics: what it measured, as typed records, and the book that fills them.

Layer: runtime (imports tpicore.runtime.window_model only). Owns `WindowStats` (one device's window
statistics, the `window` entry of a rank's report and of a results line), its parts (`StepStats`,
`BlockStats`, `Stall`) and `WindowBook`, which the window scheduler calls as blocks are loaded, waited
for and used. Must not read files, schedule loads or know about the wire: the JSON form is
`to_json`/`from_json`, with the field names the results files have always used.

    steps        one entry per forward step: stall, compute, comm, wall and load seconds, stall share
    blocks       per block kind (attn, ffn, post): averages per block over the steady steps (step 0,
                 cold, is left out once there are later steps): compute/comm/stall ms, load ms and MB
    steady       the paper's steady conditions (window_model.check_steady) on those averages
    first_stall, first_steady_stall   where the device first waited (any step; a step after the first)
"""

from __future__ import annotations

import copy
import threading
from dataclasses import asdict, dataclass, field
from typing import Any

from tpicore.runtime.window_model import SteadyCheck, check_steady


@dataclass
class StepStats:
    """One forward step of the window (seconds on the device's clock)."""

    step: int
    stall_s: float = 0.0
    compute_s: float = 0.0
    comm_s: float = 0.0
    wall_s: float = 0.0
    load_s: float = 0.0  # loader time booked to this step's blocks (overlaps compute)
    stall_share: float = 0.0  # stall_s / wall_s


@dataclass
class BlockStats:
    """Per-block averages of one block kind; load_ms / load_mb are None when no block of it was read."""

    n: int
    compute_ms: float
    comm_ms: float
    stall_ms: float
    load_ms: float | None
    load_mb: float | None


@dataclass(frozen=True)
class Stall:
    """Where the device waited for a block: step, block name (e.g. "ffn3"), seconds."""

    step: int
    block: str
    wait_s: float


@dataclass
class WindowStats:
    """One device's window statistics (see the module docstring)."""

    window: int
    retain_every: int
    layers: int
    steps: list[StepStats] = field(default_factory=list)
    slab_bytes: int = 0
    retained_bytes: int = 0
    blocks: dict[str, BlockStats] = field(default_factory=dict)
    steady: SteadyCheck | None = None
    first_stall: Stall | None = None
    first_steady_stall: Stall | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "WindowStats":
        stall = (lambda s: None if s is None else Stall(**s))
        return cls(window=d["window"], retain_every=d["retain_every"], layers=d["layers"],
                   steps=[StepStats(**s) for s in d.get("steps", [])], slab_bytes=d.get("slab_bytes", 0),
                   retained_bytes=d.get("retained_bytes", 0),
                   blocks={k: BlockStats(**v) for k, v in d.get("blocks", {}).items()}, steady=d.get("steady"),
                   first_stall=stall(d.get("first_stall")), first_steady_stall=stall(d.get("first_steady_stall")))

    def since(self, before: "WindowStats | None") -> "WindowStats":
        """A copy holding only the steps after `before` (an earlier snapshot): one run's share."""
        out = copy.deepcopy(self)
        out.steps = out.steps[len(before.steps) if before is not None else 0:]
        return out


def _kind_sums() -> dict[str, float]:
    return {"n": 0, "compute_s": 0.0, "comm_s": 0.0, "stall_s": 0.0, "loads": 0, "load_s": 0.0, "bytes": 0}


class WindowBook:
    """Fills a WindowStats as the window runs. The compute thread calls begin_step / stalled / used /
    end_step; the loader thread calls loaded. Per-kind sums are kept per step until the step ends, then
    folded into the averages (step 0 apart: cold slabs, nothing preloaded before the prompt)."""

    def __init__(self, window: int, retain_every: int, layers: int) -> None:
        self.stats = WindowStats(window=window, retain_every=retain_every, layers=layers)
        self._lock = threading.Lock()  # the loader books into the per-step sums too
        self._step: StepStats | None = None
        self._start = 0.0
        self._load_by_step: dict[int, float] = {}
        self._kinds_by_step: dict[int, dict[str, dict[str, float]]] = {}  # step -> kind -> sums
        self._first: dict[str, dict[str, float]] = {}  # step 0's sums
        self._warm: dict[str, dict[str, float]] = {}  # sums over steps 1, 2, ...

    def _kind(self, step: int, kind: str) -> dict[str, float]:
        """Per-step, per-kind sums (caller holds the lock)."""
        return self._kinds_by_step.setdefault(step, {}).setdefault(kind, _kind_sums())

    def begin_step(self, step: int, now: float) -> None:
        self._step, self._start = StepStats(step), now

    def stalled(self, step: int, block: str, kind: str, wait_s: float, steady: bool) -> None:
        """The compute side waited `wait_s` for `block`; `steady`: in a step after the first."""
        self._step.stall_s += wait_s
        with self._lock:
            self._kind(step, kind)["stall_s"] += wait_s
        where = Stall(step, block, wait_s)
        s = self.stats
        s.first_stall = s.first_stall or where
        if steady:
            s.first_steady_stall = s.first_steady_stall or where

    def used(self, step: int, kind: str, compute_s: float, comm_s: float) -> None:
        """A block of `kind` was held for compute_s of compute and comm_s of allreduce."""
        self._step.compute_s += compute_s
        self._step.comm_s += comm_s
        with self._lock:
            k = self._kind(step, kind)
            k["n"] += 1
            k["compute_s"] += compute_s
            k["comm_s"] += comm_s

    def loaded(self, step: int, kind: str, load_s: float, nbytes: int) -> None:
        """The loader read a block of `kind` for `step` in load_s (loader thread)."""
        with self._lock:
            self._load_by_step[step] = self._load_by_step.get(step, 0.0) + load_s
            k = self._kind(step, kind)
            k["loads"] += 1
            k["load_s"] += load_s
            k["bytes"] += nbytes

    def end_step(self, step: int, now: float, slab_bytes: int, retained_bytes: int) -> None:
        """Close the step: its split, then the per-block averages and the steady conditions."""
        s, stats = self._step, self.stats
        with self._lock:
            s.load_s = self._load_by_step.pop(step, 0.0)
            done = self._kinds_by_step.pop(step, {})  # every block of this step was loaded before it ran
        s.wall_s = now - self._start
        s.stall_share = s.stall_s / s.wall_s if s.wall_s > 0 else 0.0
        stats.steps.append(s)
        stats.slab_bytes, stats.retained_bytes = slab_bytes, retained_bytes
        if step == 0:
            self._first = done
        else:
            for kind, v in done.items():
                acc = self._warm.setdefault(kind, dict.fromkeys(v, 0))
                for key, x in v.items():
                    acc[key] += x
        kinds = self._warm or self._first
        stats.blocks = {
            kind: BlockStats(n=v["n"], compute_ms=1e3 * v["compute_s"] / max(v["n"], 1),
                             comm_ms=1e3 * v["comm_s"] / max(v["n"], 1), stall_ms=1e3 * v["stall_s"] / max(v["n"], 1),
                             load_ms=1e3 * v["load_s"] / v["loads"] if v["loads"] else None,
                             load_mb=v["bytes"] / v["loads"] / 1e6 if v["loads"] else None)
            for kind, v in kinds.items()}
        a, f = kinds.get("attn"), kinds.get("ffn")
        if a and f and a["loads"] and f["loads"] and a["n"] and f["n"]:
            t_ar = (a["comm_s"] + f["comm_s"]) / (a["n"] + f["n"])
            stats.steady = check_steady(a["compute_s"] / a["n"], f["compute_s"] / f["n"], t_ar,
                                        a["load_s"] / a["loads"], f["load_s"] / f["loads"], stats.layers,
                                        stats.retain_every)
