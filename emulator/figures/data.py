"""What the figures read from results lines: the runs of each sweep point, aggregated, and their coordinates.

Layer: figures (imports emulator.results.record, and tpicore's model config and predictor for the paper's
memory formula). Everything here reads typed
records (emulator/results/record.py); a point's coordinates come from the resolved config (RunSetting),
its grouping and labels (panel, testbed, paper_model) from `point`. Must not draw or write anything.

    results/<experiment>.jsonl       one line per run (RunRecord; Fig. 3: AllreduceRecord)
      | per point, keep only the lines of the latest sweep that measured it (a rerun replaces)
      | aggregate the runs of one point: median TTFT / token latency over completed runs, the max peak
      |   memory over devices and runs, OOM when any run ran (or would have run) out of memory: "OOM" when a
      |   device was really stopped (watchdog / cgroup), "OOM (extrap.)" when a run completed and only its
      |   extrapolated memory is over the cap -- figures draw and label the two differently
      v
    Point, and per line: model_name, mode_of, window_of, devices_of, link_latency_ms, bandwidth_mbps, cores_of

The paper model of a line: its point's `paper_model` label, else the model that ran (synth preset or
checkpoint folder). Memory: peak_mem_bytes (peak RSS plus what a unique-layer model leaves out), max
over devices; OOM: `oom` (a real stop) or `mem_over_cap` (without a stop: extrapolated) non-empty.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import yaml

from emulator.results.provenance import REPO
from emulator.results.record import AllreduceRecord, ResultRecord, RunRecord
from tpicore.errors import TpiError
from tpicore.model.config import ModelConfig
from tpicore.model.split import split_layouts
from tpicore.tools.predictor import paper_peak_bytes

DEFAULT_RESULTS = REPO / "results"
DEFAULT_TABLES = REPO / "configs" / "paper_tables.yaml"


class NoData(Exception):
    """The records cannot make this figure; the message says what is missing."""


# ---------------------------------------------------------------------------------------------------
# Lines and sweeps


def point_key(rec: ResultRecord) -> str:
    point = vars(rec.point) if isinstance(rec, AllreduceRecord) else rec.point
    return json.dumps(point, sort_keys=True, default=str)


def latest_sweeps(records: Sequence[ResultRecord]) -> list[ResultRecord]:
    """Per point, only the lines of the last sweep (in file order) that measured it: a rerun of an
    experiment, or of some of its points, replaces the older lines instead of mixing with them. Lines
    without a `sweep` id are all kept."""
    last: dict[str, str] = {}
    for r in records:
        if r.sweep is not None:
            last[point_key(r)] = r.sweep
    return [r for r in records if r.sweep is None or last.get(point_key(r)) == r.sweep]


def point_value(point: Mapping[str, Any], *names: str) -> tuple[str, Any] | None:
    """The (key, value) of the first point key that is one of `names` or ends with '.' + one of them."""
    for k, v in point.items():
        for name in names:
            if k == name or k.endswith("." + name):
                return k, v
    return None


def model_name(rec: RunRecord) -> str:
    label = point_value(rec.point, "paper_model")
    return str(label[1]) if label else rec.setting.model.name


def mode_of(rec: RunRecord) -> str:
    return rec.setting.mode


def window_of(rec: RunRecord) -> int | None:
    """The sliding window in blocks, None = no scheduler (all weights resident)."""
    return rec.setting.window


def devices_of(rec: RunRecord) -> int:
    """Devices that ran (one-device modes: the topology's first device alone)."""
    return rec.setting.world_size


def link_latency_ms(rec: RunRecord) -> float | None:
    lat = [link.latency_ms for link in rec.setting.links.values()]
    return float(min(lat)) if lat else None


def bandwidth_mbps(rec: RunRecord) -> float | None:
    """The slowest link's rate; None when some link is unlimited (or there are none)."""
    bw = [link.bandwidth_mbps for link in rec.setting.links.values()]
    return float(min(bw)) if bw and None not in bw else None


def cores_of(rec: RunRecord) -> float:
    """Cores per device, or the device speed when that is what the point varies (virtual clock)."""
    first = rec.setting.devices[0]
    return float(first.speed) if point_value(rec.point, "speed") else float(first.cores)


def description(records: Iterable[ResultRecord]) -> str:
    for r in records:
        if r.description:
            return " ".join(r.description.split())
    return ""


def time_unit(records: Iterable[RunRecord], per: str = "s") -> str:
    """An axis unit for times: `per` ("s", "s/token"), marked virtual when every run used the virtual
    clock (the time N devices of the modelled speed would take, not this host's)."""
    return f"{per}, virtual clock" if {r.setting.clock for r in records} == {"virtual"} else per


def peak_bytes(rec: RunRecord) -> int | None:
    """The memory to set beside the paper's, max over devices: peak_mem_bytes (peak RSS plus, for a
    unique-layer model with resident weights, the repeated layers a real model would hold); a device
    stopped for exceeding its cap counts with the RSS it was stopped at."""
    peaks = [d.peak_mem_bytes for d in rec.devices.values() if d.peak_mem_bytes]
    peaks += [o.rss_bytes for o in rec.oom]
    return max(peaks) if peaks else None


OOM_STOPPED = "OOM"  # a device was really stopped at its cap (watchdog, watchdog (peak) or cgroup)
OOM_EXTRAPOLATED = "OOM (extrap.)"  # the run completed; measured RSS + computed repeated layers > cap


def out_of_memory(rec: RunRecord) -> bool:
    """A device was stopped for exceeding its cap (`oom`), or its extrapolated memory is above the cap
    (`mem_over_cap`: it ran to the end, so its times stand, but a real device would have run out)."""
    return bool(rec.oom or rec.mem_over_cap)


def oom_kind(rec: RunRecord) -> str:
    """OOM_STOPPED when a device of the run was really stopped, OOM_EXTRAPOLATED when none was but the
    memory of one (measured RSS + the repeated layers a unique-layer model leaves out) is over its cap,
    "" otherwise."""
    if rec.oom:
        return OOM_STOPPED
    return OOM_EXTRAPOLATED if rec.mem_over_cap else ""


# ---------------------------------------------------------------------------------------------------
# Points


def _median(xs: Iterable[float | None]) -> float | None:
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    return statistics.median(xs) if xs else None


@dataclass
class Point:
    """The runs of one sweep point, aggregated."""

    point: dict
    records: list[RunRecord] = field(default_factory=list)

    @property
    def rec(self) -> RunRecord:
        return self.records[-1]

    @property
    def ok(self) -> list[RunRecord]:
        return [r for r in self.records if not r.error and not r.oom]

    @property
    def ttft_s(self) -> float | None:
        return _median(r.ttft_s for r in self.ok)

    @property
    def token_latency_s(self) -> float | None:
        return _median(r.token_latency_s for r in self.ok)

    @property
    def peak_bytes(self) -> int | None:
        peaks = [p for p in (peak_bytes(r) for r in self.records) if p]
        return max(peaks) if peaks else None

    @property
    def oom(self) -> bool:
        return any(out_of_memory(r) for r in self.records)

    @property
    def oom_kind(self) -> str:
        """OOM_STOPPED when any run was really stopped, else OOM_EXTRAPOLATED when any run's memory only
        extrapolates over the cap, else ""."""
        kinds = {oom_kind(r) for r in self.records}
        return OOM_STOPPED if OOM_STOPPED in kinds else (OOM_EXTRAPOLATED if OOM_EXTRAPOLATED in kinds else "")

    @property
    def failed(self) -> bool:
        """No run of the point completed (OOM, an error, or skipped: a point that cannot run)."""
        return not self.ok

    @property
    def status(self) -> str:
        """What a figure marks on the point: "" (ran), "OOM" (a device was stopped), "OOM (extrap.)" (ran;
        its extrapolated memory is over the cap), "skipped" or "error"."""
        if self.oom:
            return self.oom_kind
        if self.failed:
            return "skipped" if all(r.skipped for r in self.records) else "error"
        return ""


def aggregate(records: Iterable[RunRecord]) -> list[Point]:
    groups: dict[str, Point] = {}
    for r in records:
        groups.setdefault(point_key(r), Point(dict(r.point))).records.append(r)
    return list(groups.values())


# ---------------------------------------------------------------------------------------------------
# The paper: its tables, its memory formula


def load_tables(path: Path | None = None) -> dict:
    path = path or DEFAULT_TABLES
    try:
        return yaml.safe_load(path.read_text()) or {}
    except OSError as e:
        print(f"note: {path}: cannot read the paper's tables ({e.strerror}); plotting ours only", file=sys.stderr)
        return {}


def paper_formula_bytes(dims: Mapping[str, Any], n: int, window: int = 2) -> int | None:
    """The paper's peak-memory formula (parameters x 4 bytes, tpicore.tools.predictor), the max over N
    devices with equal shares, for a model of `dims` (HF config keys, as recorded in config.model.config);
    None when the dims are incomplete or N devices cannot split the model."""
    dims = {k: v for k, v in dims.items() if v is not None and k != "torch_dtype"}
    try:
        cfg = ModelConfig.from_dict(dims, source="results: config.model.config")
        return max(paper_peak_bytes(cfg, lay, window) for lay in split_layouts(cfg, n))
    except TpiError:  # dims missing, or a split that cannot exist (more devices than heads)
        return None
