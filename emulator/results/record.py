"""The results line as typed records: built here, written by one function, read back by one.

Layer: results (imports emulator.config and tpicore.runtime's report types). Owns the JSON form of a
results line, its builders, the one writer (`append_record`) and the one reader (`read_records`). Must not
run anything, plot, or import emulator.run / emulator.figures.

Two kinds of line share results/<experiment>.jsonl (one JSON object per line):

    RunRecord         one run of a run config (one prompt of one repetition) by emulator/run/launcher.py,
                      or a sweep point that could not run (emulator/run/experiments.py, "skipped": true)
    AllreduceRecord   one (clock, algo, tau) point of the Fig. 3 sweep, emulator/run/allreduce_sweep.py
                      ("runner": "allreduce"; its fields: AllreduceRecord's docstring)

    built    RunRecord.measured(...)       a run: the master's RunMeasurement + what the supervisor saw
             RunRecord.skipped_point(...)  a point that did not run
             AllreduceRecord.measured(...)
    written  append_record(path, record)   to_json() as one line, in one write(), then fsync
    read     read_records(path)             record_from_json() per line

A RunRecord line (JSON keys; in memory the per-device maps are one DeviceResult per device, and tokens /
ttft_s / token_latencies_s / token_latency_s are one TokenTimings):

    experiment          the run config's name (an experiment's name for every point of its sweep)
    point               {override key: value} of the sweep point (emulator/run/experiments.py); {} for a plain
                        run
    mode                options.mode: tpi | galaxy | pipeline | standalone | offload | standalone+ms (null
                        for a skipped point whose config did not resolve)
    run, prompt_len, repetition
    config              fully resolved: topology (document, devices, links), model (spec, folder, dims),
                        workload, options, clock, host (cores, memory, Python/NumPy versions, git commit);
                        `RunRecord.setting` is its typed view (RunSetting)
    tokens              generated token ids (greedy)
    ttft_s              time to first token (prefill + first sample); the master's clock: virtual
                        seconds with clock: virtual, real seconds with clock: wall
    token_latencies_s   each later token's latency; token_latency_s is their mean
    peak_rss_bytes      {device: peak RSS} -- the kernel's high-water mark (VmHWM) of the device
                        process since it started, so it covers the weights' load and every earlier run
    peak_mem_bytes      {device: bytes} the memory to compare with the paper: peak_rss_bytes, plus, for
                        resident weights of a unique-layer model, the repeated layers a real model
                        would hold (emulator/run/baselines.py resident_extra_bytes); equal otherwise
    mem_over_cap        [device]: peak_mem_bytes above the device's cap -- such a device runs out of
                        memory (measured ones are also in `oom`; extrapolated ones ran to the end, so
                        their times are what a device with enough memory would see)
    time_split          {device: {compute_s, comm_s, load_s, stall_s, loads, loaded_bytes, stalls}} this
                        run only, on the device's clock (compute excludes allreduce time inside blocks).
                        load_s: reading weights (window: on the loader thread, overlapping compute;
                        offload: blocking, so also counted in stall_s); stall_s: waiting for weights;
                        pipeline: comm_s is the time a stage waits for its input (other stages' compute
                        included) plus sending its output
    oom                 [] or [{device, rss_bytes, cap_bytes, by, charged_bytes}]: devices really stopped for
                        exceeding their cap, by the watchdog, the watchdog (peak) or the cgroup (OomStop;
                        charged_bytes absent on older lines)
    error               null, or why the run did not complete
    skipped             true on a point that could not run (absent otherwise)
    wall_s              real seconds the run took on this host
    links               the master's link-shaper counters (sent, received, late, max_late_ms; virtual clock:
                        forced, violations); {} when the run did not complete
    window              {device: the window scheduler's statistics (tpicore.runtime.window_stats)}: per-step
                        split (`steps`, this run's steps), per-block averages (`blocks`), the paper's steady
                        conditions checked on them (`steady`); devices without a window are left out
    trace               {device: [[name, category, start_s, duration_s], ...]} with options.trace (device
                        clock: compute, comm, load, stall events); devices without events are left out
    page_cache_bytes    {device: bytes of its weight files in the host's page cache} (not in RSS)
    time                when the run ended (UTC, ISO 8601)
    sweep, prediction   optional: the id of the invocation that wrote the line; the planner's stall
                        prediction {"stall_per_token_s": {device: seconds}} (drawn by stall_prediction)
    provenance          optional (absent on older lines): the commit, its dirty flag and the host's load
                        at the run's start and end (emulator/results/provenance.py Provenance); every line
                        kind carries it
    faults, recoveries  optional (absent without faults): the run config's faults struck in this run
                        ({device, at_token, kind, duration_s, run}: FaultStruck) and each recovery the
                        master made (tpicore.dist.failover.Recovery.to_json(): lost, world_before/after,
                        spares_used, detect_s, replan_s, load_s, rebuild_s, replayed_tokens, total_s, host
                        seconds; + token: the token whose latency includes it, 1 = the first); after a
                        loss, time_split covers the new group's devices from the recovery on

Lines are appended with one write() on an O_APPEND descriptor, so concurrent experiments writing the
same file never interleave within a line; a short write is cut back off the file.
"""

from __future__ import annotations

import json
import os
import statistics
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from emulator.config.collective_model import PAPER_TAU, hops
from emulator.config.topology import Link, Machine
from emulator.results.failover_record import FaultStruck, RecoveryResult
from emulator.results.privacy_record import PrivacyRecord
from emulator.results.provenance import Provenance, utc_now
from tpicore.errors import TpiError
from tpicore.runtime.report import RankReport, TimeSplit, TraceEvent
from tpicore.runtime.window_stats import WindowStats

Json = dict[str, Any]


class RecordError(TpiError):
    """A JSON object that is not a results line; the message says what is missing or wrong."""


class AppendError(TpiError, OSError):
    """A results line could not be appended (a full disk, no permission): one error line naming the file;
    still an OSError for callers that catch those."""


# ---------------------------------------------------------------------------------------------------
# What the master measured in one run (crosses the supervisor's event pipe as JSON)


@dataclass(frozen=True)
class TokenTimings:
    """The tokens the master generated (greedy) and their latencies, on its clock."""

    tokens: tuple[int, ...] = ()
    ttft_s: float | None = None
    token_latencies_s: tuple[float, ...] = ()
    token_latency_s: float | None = None  # the mean of token_latencies_s; None with a single token

    @classmethod
    def of(cls, tokens: Sequence[int], ttft_s: float | None, token_latencies_s: Sequence[float]) -> "TokenTimings":
        lat = tuple(token_latencies_s)
        return cls(tuple(tokens), ttft_s, lat, float(np.mean(lat)) if lat else None)


@dataclass(frozen=True)
class LinkCounters:
    """The master's link shaper (emulator/net/shaper.py stats): messages, late deliveries (wall clock), and
    on a virtual clock the link schedule's counters (forced orderings, violations; absent on a wall clock)."""

    sent: int
    received: int
    late: int
    max_late_ms: float
    forced: int | None = None
    violations: int | None = None

    def to_json(self) -> Json:
        return {k: v for k, v in vars(self).items() if v is not None}


@dataclass(frozen=True)
class RunMeasurement:
    """What the master measured in one run; `ranks`: each rank's share of it (RankReport.since of the
    reports before and after the run; after a recovery in it: the new group's reports), empty when the
    run did not complete. rank_devices: the topology device of each rank when they differ (a loss
    renumbers the survivors), else None."""

    run: int
    prompt_len: int
    repetition: int
    timings: TokenTimings = TokenTimings()
    wall_s: float | None = None
    links: LinkCounters | None = None
    ranks: tuple[RankReport, ...] = ()
    rank_devices: tuple[int, ...] | None = None
    faults: tuple[Json, ...] = ()  # FaultStruck fields
    recoveries: tuple[Json, ...] = ()  # RecoveryResult fields

    def to_json(self) -> Json:
        t = self.timings
        d = {"run": self.run, "prompt_len": self.prompt_len, "repetition": self.repetition,
             "tokens": list(t.tokens), "ttft_s": t.ttft_s, "token_latencies_s": list(t.token_latencies_s),
             "wall_s": self.wall_s, "links": self.links.to_json() if self.links else None,
             "ranks": [r.to_json() for r in self.ranks]}
        if self.rank_devices is not None:
            d["rank_devices"] = list(self.rank_devices)
        if self.faults or self.recoveries:
            d.update(faults=list(self.faults), recoveries=list(self.recoveries))
        return d

    @classmethod
    def from_json(cls, d: Json) -> "RunMeasurement":
        devs = d.get("rank_devices")
        return cls(d["run"], d["prompt_len"], d["repetition"],
                   TokenTimings.of(d["tokens"], d["ttft_s"], d["token_latencies_s"]), d["wall_s"],
                   LinkCounters(**d["links"]) if d["links"] else None,
                   tuple(RankReport.from_json(r, "the master") for r in d["ranks"]),
                   tuple(devs) if devs is not None else None, tuple(d.get("faults", ())),
                   tuple(d.get("recoveries", ())))


# ---------------------------------------------------------------------------------------------------
# The typed view of a line's config


@dataclass(frozen=True)
class ModelSetting:
    """config.model: which model ran and, once it was prepared, its dimensions."""

    name: str  # the synth preset, else the checkpoint folder's name
    synth: str | None
    unique_layers: int | None
    dtype: str | None
    dims: Mapping[str, Any]  # HF config keys (config.model.config); {} on a skipped line (never prepared)

    @property
    def layers(self) -> int | None:
        """num_hidden_layers; None before the model was prepared."""
        return self.dims["num_hidden_layers"] if self.dims else None


@dataclass(frozen=True)
class RunSetting:
    """The facts of a resolved `config` (RunConfig.to_json plus the launcher's additions) that the summary
    and the figures read. Lines of skipped points carry only the parts known before preparing the model,
    so mem_caps_bytes / warnings are empty there."""

    topology: str  # its name
    shape: str | None  # the topology document's links.shape; None when its links are listed
    devices: tuple[Machine, ...]  # rank order; one-device modes: the first device alone
    links: Mapping[str, Link]
    model: ModelSetting
    mode: str
    clock: str  # virtual | wall
    compute: str
    allreduce: str
    window: int | None  # blocks; None = no scheduler (all weights resident)
    retain_every: int
    mem_caps_bytes: Mapping[str, int]
    warnings: tuple[str, ...]

    @classmethod
    def from_config(cls, doc: Json) -> "RunSetting":
        topo, model, opt = doc["topology"], doc["model"], doc["options"]
        links_doc = topo["doc"]["links"]
        path = model["path"]
        return cls(
            topology=topo["name"], shape=links_doc.get("shape") if isinstance(links_doc, dict) else None,
            devices=tuple(Machine(**d) for d in topo["devices"]),
            links={lid: Link(**link) for lid, link in topo["links"].items()},
            model=ModelSetting(name=model["synth"] or os.path.basename(str(path).rstrip("/")), synth=model["synth"],
                               unique_layers=model["unique_layers"], dtype=model["dtype"],
                               dims=model.get("config", {})),
            mode=opt["mode"], clock=opt["clock"], compute=opt["compute"], allreduce=opt["allreduce"],
            window=opt["window"], retain_every=opt["retain_every"], mem_caps_bytes=doc.get("mem_caps_bytes", {}),
            warnings=tuple(doc.get("warnings", ())))

    @property
    def world_size(self) -> int:
        return len(self.devices)


# ---------------------------------------------------------------------------------------------------
# A run's line


OOM_BY = ("watchdog", "watchdog (peak)", "cgroup")  # OomStop.by: who stopped the device


@dataclass(frozen=True)
class OomStop:
    """A device really stopped for exceeding its memory cap, and by whom (`OOM_BY`, emulator/host):
    "watchdog"          its RSS (VmRSS) was over the cap at a 10 ms sample; rss_bytes: that RSS
    "watchdog (peak)"   its peak RSS (VmHWM) was: a spike between two samples; rss_bytes: that peak
    "cgroup"            the kernel OOM-killed it in its cgroup (options.cgroup_root); rss_bytes: its peak RSS
    charged_bytes       under a cgroup, the peak the kernel charged to the device's group (its anonymous
                        memory and the page cache of its own reads); None without one (and on older lines)
    (A run whose memory is only extrapolated over the cap completed: it is in mem_over_cap, never here.)"""

    device: str
    rss_bytes: int
    cap_bytes: int
    by: str
    charged_bytes: int | None = None


@dataclass(frozen=True)
class DeviceResult:
    """One device's part of a run's line."""

    peak_rss_bytes: int
    peak_mem_bytes: int  # peak RSS + the repeated layers a unique-layer model leaves out (resident weights)
    time_split: TimeSplit | None = None  # None when the run did not complete
    window: WindowStats | None = None
    trace: tuple[TraceEvent, ...] = ()
    page_cache_bytes: int | None = None


_PER_DEVICE = ("peak_rss_bytes", "peak_mem_bytes", "time_split", "window", "trace", "page_cache_bytes")


@dataclass(frozen=True)
class RunRecord:
    """One results line of a run (see the module docstring for its JSON form)."""

    experiment: str
    point: Mapping[str, Any]
    mode: str | None
    run: int
    prompt_len: int | None
    repetition: int
    config: Json  # the resolved run config as recorded (provenance); read through `setting`
    timings: TokenTimings
    devices: Mapping[str, DeviceResult]  # rank order
    mem_over_cap: tuple[str, ...]
    oom: tuple[OomStop, ...]
    error: str | None
    wall_s: float | None
    links: LinkCounters | None
    time: str
    skipped: bool = False
    sweep: str | None = None
    prediction: Mapping[str, float] | None = None  # the planner's stall per token, {device: seconds}
    provenance: Provenance | None = None  # commit, dirty flag, host load (None on lines written before it)
    faults: tuple[FaultStruck, ...] = ()  # struck in this run (issue 15); () on lines without faults
    recoveries: tuple[RecoveryResult, ...] = ()

    # -- builders ----------------------------------------------------------------------------------
    @classmethod
    def measured(cls, *, experiment: str, point: Mapping[str, Any], mode: str, config: Json,
                 measurement: RunMeasurement, peak_rss_bytes: Mapping[str, int], extra_bytes: Mapping[str, int],
                 caps: Mapping[str, int], oom: Sequence[OomStop] = (), error: str | None = None,
                 provenance: Provenance | None = None) -> "RunRecord":
        """A run's line: the master's measurement, with the peaks, caps and stops the supervisor saw
        (per device name, in rank order; extra_bytes: what peak_mem_bytes adds to the peak RSS)."""
        ranks = measurement.ranks
        of_device = {d: i for i, d in enumerate(measurement.rank_devices or range(len(ranks)))}  # device -> rank
        devices = {}
        for i, name in enumerate(peak_rss_bytes):
            share = ranks[of_device[i]] if of_device.get(i, len(ranks)) < len(ranks) else None
            devices[name] = DeviceResult(
                peak_rss_bytes=peak_rss_bytes[name], peak_mem_bytes=peak_rss_bytes[name] + extra_bytes[name],
                time_split=share.time_split if share else None, window=share.window if share else None,
                trace=tuple(share.trace) if share else (),
                page_cache_bytes=(share.page_cache_bytes or None) if share else None)
        return cls(experiment=experiment, point=dict(point), mode=mode, run=measurement.run,
                   prompt_len=measurement.prompt_len, repetition=measurement.repetition, config=config,
                   timings=measurement.timings, devices=devices,
                   mem_over_cap=tuple(n for n, d in devices.items() if d.peak_mem_bytes > caps[n]), oom=tuple(oom),
                   error=error, wall_s=measurement.wall_s, links=measurement.links, time=utc_now(),
                   provenance=provenance, faults=tuple(FaultStruck(**f) for f in measurement.faults),
                   recoveries=tuple(RecoveryResult(**r) for r in measurement.recoveries))

    @classmethod
    def skipped_point(cls, *, experiment: str, point: Mapping[str, Any], mode: str | None, config: Json,
                      error: str, provenance: Provenance | None = None) -> "RunRecord":
        """The line of a sweep point that could not run: same keys as a run's line, values empty."""
        return cls(experiment=experiment, point=dict(point), mode=mode, run=0, prompt_len=None, repetition=0,
                   config=config, timings=TokenTimings(), devices={}, mem_over_cap=(), oom=(), error=error,
                   wall_s=None, links=None, time=utc_now(), skipped=True, provenance=provenance)

    # -- reading -----------------------------------------------------------------------------------
    @cached_property
    def setting(self) -> RunSetting | None:
        """The typed view of `config`; None on a skipped point whose config did not resolve."""
        return RunSetting.from_config(self.config) if "topology" in self.config else None

    @property
    def description(self) -> str:
        """The experiment's description (a figure's caption); "" for a plain run."""
        return self.config.get("description", "")

    @property
    def ttft_s(self) -> float | None:
        return self.timings.ttft_s

    @property
    def token_latency_s(self) -> float | None:
        return self.timings.token_latency_s

    # -- JSON --------------------------------------------------------------------------------------
    def to_json(self) -> Json:
        devs, t = self.devices.items(), self.timings
        d: Json = {"experiment": self.experiment}
        if self.sweep is not None:
            d["sweep"] = self.sweep
        d.update({
            "point": dict(self.point), "mode": self.mode, "run": self.run, "prompt_len": self.prompt_len,
            "repetition": self.repetition, "config": self.config, "tokens": list(t.tokens), "ttft_s": t.ttft_s,
            "token_latencies_s": list(t.token_latencies_s), "token_latency_s": t.token_latency_s,
            "peak_rss_bytes": {n: x.peak_rss_bytes for n, x in devs},
            "peak_mem_bytes": {n: x.peak_mem_bytes for n, x in devs}, "mem_over_cap": list(self.mem_over_cap),
            "time_split": {n: x.time_split.to_json() for n, x in devs if x.time_split is not None},
            "oom": [vars(o) for o in self.oom], "error": self.error})
        if self.skipped:
            d["skipped"] = True
        d.update({
            "wall_s": self.wall_s, "links": self.links.to_json() if self.links else {},
            "window": {n: x.window.to_json() for n, x in devs if x.window is not None},
            "trace": {n: [list(e) for e in x.trace] for n, x in devs if x.trace},
            "page_cache_bytes": {n: x.page_cache_bytes for n, x in devs if x.page_cache_bytes},
            "time": self.time})
        if self.prediction is not None:
            d["prediction"] = {"stall_per_token_s": dict(self.prediction)}
        if self.provenance is not None:
            d["provenance"] = self.provenance.to_json()
        if self.faults or self.recoveries:
            d["faults"] = [vars(f) for f in self.faults]
            d["recoveries"] = [r.to_json() for r in self.recoveries]
        return d

    @classmethod
    def from_json(cls, d: Json) -> "RunRecord":
        maps = {k: d[k] for k in _PER_DEVICE}
        names = list(maps["peak_rss_bytes"])
        for k, m in maps.items():
            if set(m) - set(names):
                raise RecordError(f"{k}: devices {sorted(set(m) - set(names))} have no peak_rss_bytes")
        devices = {n: DeviceResult(
            peak_rss_bytes=maps["peak_rss_bytes"][n], peak_mem_bytes=maps["peak_mem_bytes"][n],
            time_split=TimeSplit.from_json(maps["time_split"][n]) if n in maps["time_split"] else None,
            window=WindowStats.from_json(maps["window"][n]) if n in maps["window"] else None,
            trace=tuple(TraceEvent(*e) for e in maps["trace"].get(n, ())),
            page_cache_bytes=maps["page_cache_bytes"].get(n)) for n in names}
        pred = d.get("prediction")
        rec = cls(experiment=d["experiment"], point=d["point"], mode=d["mode"], run=d["run"],
                  prompt_len=d["prompt_len"], repetition=d["repetition"], config=d["config"],
                  timings=TokenTimings(tuple(d["tokens"]), d["ttft_s"], tuple(d["token_latencies_s"]),
                                       d["token_latency_s"]),
                  devices=devices, mem_over_cap=tuple(d["mem_over_cap"]), oom=tuple(OomStop(**o) for o in d["oom"]),
                  error=d["error"], wall_s=d["wall_s"], links=LinkCounters(**d["links"]) if d["links"] else None,
                  time=d["time"], skipped=d.get("skipped", False), sweep=d.get("sweep"),
                  prediction=pred["stall_per_token_s"] if pred is not None else None,
                  provenance=_provenance(d), faults=tuple(FaultStruck(**f) for f in d.get("faults", ())),
                  recoveries=tuple(RecoveryResult(**r) for r in d.get("recoveries", ())))
        _ = rec.setting  # parse the config now: a malformed one is this line's error, not a figure's
        return rec


# ---------------------------------------------------------------------------------------------------
# A Fig. 3 line


@dataclass(frozen=True)
class AllreducePoint:
    algo: str  # star | tree | ring
    tau_ms: float  # per-link latency
    clock: str  # virtual | wall
    devices: int


@dataclass(frozen=True)
class AllreduceRecord:
    """One (clock, algo, tau) point of the Fig. 3 sweep (emulator/run/allreduce_sweep.py):

        experiment, runner ("allreduce"), sweep (one id per invocation), time, error, wall_s
        point        {algo, tau_ms, clock, devices}
        config       name, source, description, runner, topology (name, preset, devices, links as run),
                     payload_bytes, repetitions, clock, host
        latencies_s  one per trial (null when the measurement failed); latency_median_s, latency_p99_s,
                     latency_min_s
        model_s      hops x links_per_route x tau; hops, links_per_route; paper_model_s (8/16/56 tau,
                     8 devices with 4 links per route only)
    """

    experiment: str
    sweep: str
    point: AllreducePoint
    config: Json
    latencies_s: tuple[float, ...] | None
    latency_median_s: float | None
    latency_p99_s: float | None
    latency_min_s: float | None
    model_s: float
    hops: int
    links_per_route: int
    paper_model_s: float | None
    error: str | None
    wall_s: float
    time: str
    provenance: Provenance | None = None  # None on lines written before it existed

    @classmethod
    def measured(cls, *, experiment: str, sweep: str, point: AllreducePoint, config: Json,
                 latencies_s: Sequence[float] | None, links_per_route: int, error: str | None,
                 wall_s: float) -> "AllreduceRecord":
        """A point's line: the trials' statistics and the hop model for its N and route length."""
        lat = tuple(latencies_s) if latencies_s is not None else None
        h, tau = hops(point.algo, point.devices), point.tau_ms
        paper = point.devices == 8 and links_per_route == 4
        return cls(experiment=experiment, sweep=sweep, point=point, config=config, latencies_s=lat,
                   latency_median_s=statistics.median(lat) if lat else None,
                   latency_p99_s=float(np.percentile(np.asarray(lat), 99)) if lat else None,
                   latency_min_s=min(lat) if lat else None, model_s=h * links_per_route * tau / 1e3, hops=h,
                   links_per_route=links_per_route, paper_model_s=PAPER_TAU[point.algo] * tau / 1e3 if paper else None,
                   error=error, wall_s=wall_s, time=utc_now())

    @property
    def description(self) -> str:
        return self.config["description"]

    def to_json(self) -> Json:
        return {"experiment": self.experiment, "runner": "allreduce", "sweep": self.sweep, "point": vars(self.point),
                "config": self.config, "latencies_s": list(self.latencies_s) if self.latencies_s is not None else None,
                "latency_median_s": self.latency_median_s, "latency_p99_s": self.latency_p99_s,
                "latency_min_s": self.latency_min_s, "model_s": self.model_s, "hops": self.hops,
                "links_per_route": self.links_per_route, "paper_model_s": self.paper_model_s, "error": self.error,
                "wall_s": self.wall_s, "time": self.time,
                **({"provenance": self.provenance.to_json()} if self.provenance else {})}

    @classmethod
    def from_json(cls, d: Json) -> "AllreduceRecord":
        lat = d["latencies_s"]
        return cls(experiment=d["experiment"], sweep=d["sweep"], point=AllreducePoint(**d["point"]),
                   config=d["config"], latencies_s=tuple(lat) if lat is not None else None,
                   latency_median_s=d["latency_median_s"], latency_p99_s=d["latency_p99_s"],
                   latency_min_s=d["latency_min_s"], model_s=d["model_s"], hops=d["hops"],
                   links_per_route=d["links_per_route"], paper_model_s=d["paper_model_s"], error=d["error"],
                   wall_s=d["wall_s"], time=d["time"], provenance=_provenance(d))


ResultRecord = RunRecord | AllreduceRecord | PrivacyRecord


def _provenance(d: Json) -> Provenance | None:
    """A line's provenance; None on lines written before it existed."""
    p = d.get("provenance")
    return Provenance.from_json(p) if p is not None else None


# ---------------------------------------------------------------------------------------------------
# The one writer and the one reader


def record_from_json(d: Any) -> ResultRecord:
    """A parsed line -> its record: an allreduce sweep's when "runner" says so, a run's otherwise."""
    if not isinstance(d, dict):
        raise RecordError(f"expected a JSON object, got {type(d).__name__}")
    try:
        if d.get("runner") == "privacy":  # emulator/run/privacy.py
            return PrivacyRecord.from_json(d)
        return AllreduceRecord.from_json(d) if d.get("runner") == "allreduce" else RunRecord.from_json(d)
    except KeyError as e:
        raise RecordError(f"missing key {e}") from None
    except (TypeError, ValueError) as e:
        raise RecordError(f"{type(e).__name__}: {e}") from None


def append_record(path: str | Path, record: ResultRecord) -> None:
    """Append one record as one line: a single write() on an O_APPEND descriptor, then fsync. A line that
    cannot be serialised touches nothing; a short write (a full disk) is cut back off before raising."""
    path = Path(path)
    line = (json.dumps(record.to_json(), separators=(",", ":"), allow_nan=False) + "\n").encode()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    except OSError as e:
        raise AppendError(f"{path}: cannot append a results line ({e.strerror or e})") from None
    try:
        try:
            written = os.write(fd, line)
        except OSError as e:  # nothing was written (ENOSPC before the first byte)
            raise AppendError(f"{path}: cannot append a results line ({e.strerror or e})") from None
        if written != len(line):
            end = os.lseek(fd, 0, os.SEEK_CUR)
            if os.fstat(fd).st_size == end:  # nobody appended after us: no half line left behind
                os.ftruncate(fd, end - written)
            raise AppendError(f"{path}: wrote {written} of {len(line)} bytes of a results line (disk full?); "
                              "the partial line was removed")
        os.fsync(fd)
    finally:
        os.close(fd)


def read_records(path: str | Path, on_bad: Callable[[str], None] | None = None) -> list[ResultRecord]:
    """Every line of a results file as a record. A line that is not JSON (a run killed mid-write by an
    older writer) or not a results line raises TpiError naming file and line, or, with `on_bad`, is
    reported to it and skipped."""
    out: list[ResultRecord] = []
    for i, text in enumerate(Path(path).read_text().splitlines(), 1):
        if not text.strip():
            continue
        try:
            out.append(record_from_json(json.loads(text)))
        except json.JSONDecodeError:
            why = f"{path}:{i}: not a JSON line"
        except TpiError as e:
            why = f"{path}:{i}: not a results line ({e})"
        else:
            continue
        if on_bad is None:
            raise TpiError(why)
        on_bad(why)
    return out
