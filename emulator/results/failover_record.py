"""The failover fields of a results line (issue 15): the faults struck in a run and the recoveries made.

Layer: results (a leaf of it: record.py reads and writes these inside a RunRecord). Must not run anything
or import emulator.run / emulator.figures.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

Json = dict[str, Any]


@dataclass(frozen=True)
class FaultStruck:
    """A fault of the run config (emulator/config/run_config.py Fault) that was struck in this run."""

    device: int
    at_token: int
    kind: str
    duration_s: float | None = None
    run: int = 0


@dataclass(frozen=True)
class RecoveryResult:
    """One recovery as the master's ElasticMaster recorded it (tpicore.dist.failover.Recovery.to_json(),
    host seconds), and the token whose latency includes it."""

    lost: Mapping[str, str]  # rank before the loss -> why
    world_before: int
    world_after: int
    spares_used: int
    detect_s: float
    replan_s: float
    load_s: float
    rebuild_s: float
    replayed_tokens: int
    total_s: float
    token: int

    def to_json(self) -> Json:
        return {**vars(self), "lost": dict(self.lost)}
