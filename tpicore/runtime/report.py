"""What a device reports: its time split, its trace events, and a rank's whole report to the master.

Layer: runtime (imports tpicore.runtime.window_stats and errors). Owns the typed records `TimeSplit`,
`TraceEvent` and `RankReport`, and their JSON form: a RankReport crosses the control channel as a
JSON object (never pickled) and its fields keep the names the results lines use per device
(peak_rss_bytes, page_cache_bytes, time_split, window, trace). Must not measure anything itself.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, NamedTuple

from tpicore.errors import TpiError
from tpicore.runtime.window_stats import WindowStats


@dataclass(frozen=True)
class TimeSplit:
    """A device's time split (seconds on its clock) and load counters; compute excludes the allreduce
    time spent inside blocks. load_s/loads/loaded_bytes/stall_s/stalls stay zero without a scheduler."""

    compute_s: float = 0.0
    comm_s: float = 0.0
    load_s: float = 0.0
    stall_s: float = 0.0
    loads: int = 0  # blocks read from disk
    loaded_bytes: int = 0  # bytes read from disk (stored dtype)
    stalls: int = 0  # acquires that found their block not loaded yet

    def __sub__(self, other: "TimeSplit") -> "TimeSplit":
        return TimeSplit(**{f.name: getattr(self, f.name) - getattr(other, f.name) for f in fields(self)})

    def to_json(self) -> dict[str, float]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "TimeSplit":
        return cls(**d)


class TraceEvent(NamedTuple):
    """One span of a device's trace; a JSON list [name, category, start_s, duration_s] on the wire."""

    name: str  # e.g. "attn3", "allreduce", "load ffn2", "wait post0"
    category: str  # compute | comm | load | stall
    start_s: float  # the device's clock
    duration_s: float


@dataclass
class RankReport:
    """What one rank tells the master: memory, time split, window statistics, trace events.

    memory: tpicore.runtime.memory.memory_report() (peak/current RSS and their parts, page cache of
    the rank's weight files, bytes); trace is empty unless tracing was asked for.
    """

    rank: int
    peak_rss_bytes: int
    page_cache_bytes: int
    memory: dict[str, int]
    time_split: TimeSplit
    window: WindowStats | None = None  # None without the window scheduler
    trace: list[TraceEvent] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"rank": self.rank, "peak_rss_bytes": self.peak_rss_bytes, "page_cache_bytes": self.page_cache_bytes,
                "memory": dict(self.memory), "time_split": self.time_split.to_json(),
                "window": self.window.to_json() if self.window is not None else None,
                "trace": [list(e) for e in self.trace]}

    @classmethod
    def from_json(cls, d: dict[str, Any], peer: str = "peer") -> "RankReport":
        try:
            return cls(rank=int(d["rank"]), peak_rss_bytes=int(d["peak_rss_bytes"]),
                       page_cache_bytes=int(d["page_cache_bytes"]), memory=dict(d["memory"]),
                       time_split=TimeSplit.from_json(d["time_split"]),
                       window=WindowStats.from_json(d["window"]) if d.get("window") is not None else None,
                       trace=[TraceEvent(*e) for e in d["trace"]])
        except (KeyError, TypeError, ValueError) as e:
            raise TpiError(f"{peer} sent a malformed report ({type(e).__name__}: {e})") from None

    def since(self, before: "RankReport") -> "RankReport":
        """This report less an earlier one of the same rank: one run's time split, steps and trace events
        (memory and peak RSS as they are now)."""
        return RankReport(self.rank, self.peak_rss_bytes, self.page_cache_bytes, dict(self.memory),
                          self.time_split - before.time_split,
                          self.window.since(before.window) if self.window is not None else None,
                          list(self.trace[len(before.trace):]))
