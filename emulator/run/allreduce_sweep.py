"""Fig. 3 of the paper: the latency of one 4-byte allreduce against the per-link latency tau, for the
star, tree and ring algorithms, over the emulated Klonet testbed (8 devices, 4 links between any two).

    configs/experiments/fig3_allreduce.yaml   (runner: allreduce; see SweepFile for the keys)
      | per clock (virtual: every tau; wall: the few taus under `wall:`), fork one process per device
      | (tpicore.comm.local.run_local_processes: TCP loopback), one shared LinkSchedule, a LinkShaper per tau:
      |   for tau, for algo, for rep:  every rank starts at the same time t0
      |                                  virtual: t0 = its own 10 s slot of virtual time, so trials never
      |                                           share a link reservation and nothing sleeps
      |                                  wall:    t0 agreed through an unshaped broadcast, then real waits
      |                                allreduce(ones(1, float32), algo); end = the rank's clock
      |   latency of a trial = max over ranks (end - t0): done when the last rank has the sum
      v
    results/fig3_allreduce.jsonl: one line per (clock, algo, tau); emulator/figures/ draws Fig. 3 from it

The paper's model counts link traversals on the critical path, tau each: star 2 hops x 4 links = 8 tau,
tree of depth 2 = 16 tau, ring 2 (N-1) = 14 hops = 56 tau. `model_s` in a line is the same count for the
run's N and topology (hops(algo, N) x links per route x tau); at N = 8 on klonet it is the paper's.
Virtual mode measures exactly that plus the serialisation of 60-byte frames (4 B payload + 56 B header)
at the link rate; wall mode adds what this host costs (8 processes on 2 cores wake one after another).

Results line (the common fields of emulator/results/record.py where they apply):
    experiment, runner ("allreduce"), sweep (one id per invocation), time, error, wall_s
    point        {algo, tau_ms, clock, devices}
    config       name, source, description, topology (name, preset, devices, links as run), payload_bytes,
                 repetitions, clock, host
    latencies_s  one per trial; latency_median_s, latency_p99_s, latency_min_s
    model_s      hops x links_per_route x tau; hops, links_per_route; paper_model_s (8/16/56 tau, N = 8 only)

Layer: run. The hop model is emulator/config/collective_model.py's; figures are drawn by the caller.
"""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Callable, Mapping, Sequence

import numpy as np
from pydantic import model_validator

from emulator.config.collective_model import ALGOS
from emulator.config.run_config import CLOCKS, ROOT, resolve_topology_ref
from emulator.config.topology import Topology, load_topology
from emulator.net.clock import SPIN_S, VirtualClock, WallClock
from emulator.net.shaper import LinkSchedule, LinkShaper
from emulator.results.provenance import host_info, utc_now
from emulator.results.record import AllreducePoint, AllreduceRecord, append_record
from tpicore.comm.channel import DEFAULT_TIMEOUT_S
from tpicore.comm.collectives import allreduce, broadcast
from tpicore.comm.group import Group
from tpicore.comm.local import run_local_processes
from tpicore.errors import TpiError
from tpicore.schema import (
    Choice,
    Int,
    Invalid,
    Number,
    OptInt,
    Record,
    check,
    load,
    read_yaml,
)
from tpicore.units import parse_mbps

DEFAULT_CONFIG = ROOT / "configs" / "experiments" / "fig3_allreduce.yaml"
DEFAULT_RESULTS = ROOT / "results"
SLOT_S = 10.0  # virtual seconds between trials: far more than one allreduce at tau = 10 ms (0.56 s)
Draw = Callable[[Sequence[str], Path], int]  # (experiment names, results folder) -> exit code (0: drawn)


def _taus(value: Any) -> tuple[float, ...]:
    if not isinstance(value, (list, tuple)):
        raise Invalid(f"expected a list of milliseconds, got {value!r}")
    for t in value:
        if not (isinstance(t, (int, float)) and not isinstance(t, bool) and t >= 0):
            raise Invalid(f"expected numbers of milliseconds >= 0, got {t!r}")
    return tuple(float(t) for t in value)


def _algos(value: Any) -> tuple[str, ...]:
    if not isinstance(value, (list, tuple)):
        raise Invalid(f"expected a list of {', '.join(ALGOS)}, got {value!r}")
    for a in value:
        if a not in ALGOS:
            raise Invalid(f"expected some of {', '.join(ALGOS)}, got {a!r}")
    return tuple(value)


def _payload(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1 or value % 4:
        raise Invalid(f"must be a whole number of float32s (a multiple of 4 bytes, >= 4), got {value!r}")
    return value


def _bandwidth(value: Any) -> float | str | None:
    return value if value == "topology" else parse_mbps(value, "")


Taus = Annotated[tuple[float, ...], check(_taus)]
Bandwidth = Annotated[float | str | None, check(_bandwidth)]


class Sweep(Record):
    """One Fig. 3 sweep, validated. `wall_tau_ms` are re-measured in wall mode (real sleeps)."""

    name: str = "fig3_allreduce"
    source: str = "<defaults>"
    description: str = ""
    topology: str = "klonet"  # a preset name or a topology file
    devices: OptInt(1) = None  # None: the topology's own count
    bandwidth_mbps: Bandwidth = "topology"  # "topology": keep the preset's; else megabits/s (None: unlimited)
    payload_bytes: Annotated[int, check(_payload)] = 4
    algos: Annotated[tuple[str, ...], check(_algos)] = ALGOS
    tau_ms: Taus = tuple(float(t) for t in range(11))
    repetitions: Int(1) = 3
    clock: Choice(*CLOCKS) = "virtual"
    wall_tau_ms: Taus = ()
    wall_repetitions: Int(1) = 5
    timeout_s: Number(gt=0) = DEFAULT_TIMEOUT_S

    def smoke(self) -> "Sweep":
        """2 devices, 2 taus, one trial, virtual only: seconds, for tests and CI."""
        return self.replace(source=self.source + " (smoke)", devices=2, tau_ms=(0.0, 2.0), repetitions=1,
                            clock="virtual", wall_tau_ms=(), wall_repetitions=5)


class WallPoints(Record):
    tau_ms: Taus = ()
    repetitions: Int(1) = 5


class SweepFile(Record):
    """An experiment file with `runner: allreduce` (configs/experiments/fig3_allreduce.yaml):

        name: fig3_allreduce
        runner: allreduce              # what `reproduce` dispatches on: run by this module, not the launcher
        description: ...               # scaling notes, shown in the figure's caption
        topology: klonet               # a preset of configs/topologies/ or a path relative to this file
        devices: 8                     # optional: override the topology's device count
        bandwidth_mbps: 300            # optional: override every link's rate
        payload_bytes: 4
        algos: [star, tree, ring]
        tau_ms: [0, 1, ..., 10]        # per-link latency
        repetitions: 3                 # trials per point (virtual mode is exact: they agree)
        clock: virtual
        wall: {tau_ms: [1, 5], repetitions: 5}   # optional: a few points again in wall mode
        paper, estimate_s              # read by emulator/run/experiments.py
    """

    name: str | None = None
    runner: Choice("allreduce") = "allreduce"
    description: Any = None
    topology: Annotated[str, check(lambda v: v if isinstance(v, str) else _not_a_ref(v))] = "klonet"
    devices: OptInt(1) = None
    bandwidth_mbps: Bandwidth = "topology"
    payload_bytes: Any = 4
    algos: Any = ALGOS
    tau_ms: Any = Sweep.model_fields["tau_ms"].default
    repetitions: Any = 3
    clock: Any = "virtual"
    wall: WallPoints = WallPoints()
    timeout_s: Any = DEFAULT_TIMEOUT_S
    paper: Any = None
    estimate_s: Any = None

    @model_validator(mode="before")
    @classmethod
    def _wall_null(cls, doc: Any) -> Any:
        return {**doc, "wall": doc.get("wall") or {}} if isinstance(doc, Mapping) else doc


def _not_a_ref(value: Any) -> str:
    raise Invalid(f"expected a preset name or a path, got {value!r}")


def load_sweep(path: str | Path | None) -> Sweep:
    """The sweep of an experiment file with `runner: allreduce` (see SweepFile); the defaults without one."""
    if path is None:
        return Sweep()
    path = Path(path)
    doc = read_yaml(path, "sweep config") or {}
    if not isinstance(doc, Mapping):
        raise TpiError(f"{path}: expected a mapping at the top level")
    f = load(SweepFile, doc, str(path))
    fields = {k: getattr(f, k) for k in ("devices", "bandwidth_mbps", "payload_bytes", "algos", "tau_ms",
                                         "repetitions", "clock", "timeout_s")}
    return load(Sweep, dict(fields, name=f.name or path.stem, source=str(path),
                            description=str(f.description or "").strip(),
                            topology=str(resolve_topology_ref(f.topology, path.parent)),
                            wall_tau_ms=f.wall.tau_ms, wall_repetitions=f.wall.repetitions), str(path))


# ---------------------------------------------------------------------------------------------------
# Measuring


def _topologies(sweep: Sweep, taus: list[float]) -> dict[float, Topology]:
    out = {}
    for tau in taus:
        over: dict[str, Any] = {"links.latency_ms": float(tau)}
        if sweep.devices is not None:
            over["devices.count"] = sweep.devices
        if sweep.bandwidth_mbps != "topology":
            over["links.bandwidth_mbps"] = sweep.bandwidth_mbps
        out[tau] = load_topology(sweep.topology, over)
    return out


def _sync_start(group: Group, lead_s: float) -> float:
    """A wall-clock start time every rank agrees on, sent unshaped from rank 0 (perf_counter is shared by
    all processes on the host). The wire carries no float64: sent as its int64 bit pattern."""
    t = np.array([time.perf_counter() + lead_s]).view(np.int64) if group.rank == 0 else None
    return float(broadcast(group, t).view(np.float64)[0])


def measure(sweep: Sweep, clock: str, topos: dict[float, Topology], reps: int) -> dict[tuple[str, float], list[float]]:
    """{(algo, tau): [latency of each trial, seconds]} over forked device processes; `topos`: the
    emulated network at each tau (same devices and link ids, only the latency differs)."""
    import numpy as np


    n = len(next(iter(topos.values())))
    trials = [(algo, tau) for tau in topos for algo in sweep.algos]
    schedule = LinkSchedule.create(len(next(iter(topos.values())).links))
    spin = SPIN_S if n <= len(os.sched_getaffinity(0)) else 0.0  # spinners starve each other on few cores
    expected = float(n)

    def device(group: Group) -> dict[tuple[str, float], list[float]]:
        vclock = VirtualClock(cpu_time=lambda: 0.0)  # no compute here: links only
        wclock = WallClock(spin_s=spin)
        took: dict[tuple[str, float], list[float]] = {}
        for i, (algo, tau) in enumerate(trials):
            runs = []
            for rep in range(reps + (clock == "wall")):  # wall: the first trial warms code paths, dropped
                x = np.ones(sweep.payload_bytes // 4, np.float32)
                if clock == "virtual":
                    t0 = (i * reps + rep + 1) * SLOT_S
                    vclock.advance_to(t0)
                    group.link_hook = LinkShaper(topos[tau], schedule, group.rank, vclock)
                    allreduce(group, x, algo)
                    runs.append(vclock.now() - t0)
                else:
                    group.link_hook = None
                    # a barrier first: a rank done early (the root) must not announce the next start
                    # while others still wait out the last trial's deliveries
                    allreduce(group, np.zeros(1, np.float32), "star")
                    t0 = _sync_start(group, 0.02)
                    group.link_hook = LinkShaper(topos[tau], schedule, group.rank, wclock)
                    wclock.wait_until(t0)
                    allreduce(group, x, algo)
                    runs.append(time.perf_counter() - t0)
                if x[0] != expected:
                    raise TpiError(f"allreduce {algo}: rank {group.rank} got {x[0]}, expected {expected}")
            took[algo, tau] = runs[1:] if clock == "wall" else runs
        group.link_hook = None
        return took

    try:
        out = run_local_processes(n, device, mesh=True, timeout_s=sweep.timeout_s)
    finally:
        schedule.close()
    return {key: [max(rank[key][i] for rank in out) for i in range(len(out[0][key]))] for key in trials}


@dataclass
class SweepResult:
    records: list[AllreduceRecord] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def run_sweep(sweep: Sweep, results_dir: str | Path | None = None, quiet: bool = False) -> SweepResult:
    """Measure every point of the sweep and append one line per (clock, algo, tau) to
    <results_dir>/<name>.jsonl."""
    results = Path(results_dir) if results_dir is not None else DEFAULT_RESULTS
    out_path = results / f"{sweep.name}.jsonl"
    sweep_id = f"{utc_now()}-{os.getpid()}"
    host = host_info()
    plan = [(sweep.clock, list(sweep.tau_ms), sweep.repetitions)]
    if sweep.wall_tau_ms and sweep.clock != "wall":
        plan.append(("wall", list(sweep.wall_tau_ms), sweep.wall_repetitions))
    res = SweepResult()
    for clock, taus, reps in plan:
        if not taus:
            continue
        topos = _topologies(sweep, taus)
        if not quiet:
            print(f"{sweep.name}: {len(sweep.algos)} algorithms x {len(taus)} tau x {reps} trials on "
                  f"{len(next(iter(topos.values())))} devices, {clock} clock", file=sys.stderr)
        t0 = time.perf_counter()
        error = None
        try:
            measured = measure(sweep, clock, topos, reps)
        except TpiError as e:
            error, measured = str(e), {}
            res.errors.append(f"{clock}: {e}")
        wall_s = time.perf_counter() - t0
        for tau in taus:
            topo = topos[tau]
            n, per_route = len(topo), len(topo.route(1, 0)) if len(topo) > 1 else 0
            config = {
                "name": sweep.name, "source": sweep.source, "description": sweep.description, "runner": "allreduce",
                "topology": {"name": topo.name, "preset": sweep.topology,
                             "devices": [d.model_dump() for d in topo.devices],
                             "links": {lid: link.model_dump() for lid, link in sorted(topo.links.items())}},
                "payload_bytes": sweep.payload_bytes, "repetitions": reps, "clock": clock, "host": host,
            }
            for algo in sweep.algos:
                rec = AllreduceRecord.measured(
                    experiment=sweep.name, sweep=sweep_id, point=AllreducePoint(algo, float(tau), clock, n),
                    config=config, latencies_s=measured.get((algo, tau)), links_per_route=per_route, error=error,
                    wall_s=wall_s)
                append_record(out_path, rec)
                res.records.append(rec)
    return res


def summary(records: list[AllreduceRecord]) -> str:
    """Measured median vs the hop model, per point."""
    lines = [f"{'clock':>7} {'algo':>5} {'tau ms':>7} {'measured ms':>12} {'p99 ms':>8} {'model ms':>9} "
             f"{'paper ms':>9}"]
    for r in records:
        p = r.point

        def ms(x: float | None) -> str:
            return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x * 1e3:.3f}"

        lines.append(f"{p.clock:>7} {p.algo:>5} {p.tau_ms:>7g} {ms(r.latency_median_s):>12} "
                     f"{ms(r.latency_p99_s):>8} {ms(r.model_s):>9} {ms(r.paper_model_s):>9}")
    return "\n".join(lines)


def run_config(path: str | Path | None = None, results_dir: str | Path | None = None, smoke: bool = False,
               quiet: bool = False, draw: Draw | None = None) -> int:
    """The entry `reproduce` calls for a config with `runner: allreduce`; `draw` draws its figure after.
    Exit code: 0 done, 1 a measurement failed (recorded with its error), 2 bad config."""
    try:
        sweep = load_sweep(path if path is not None else DEFAULT_CONFIG)
        if smoke:
            sweep = sweep.smoke()
        res = run_sweep(sweep, results_dir, quiet=quiet)
    except TpiError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not quiet:
        print(summary(res.records))
    for e in res.errors:
        print(f"error: {e}", file=sys.stderr)
    if draw is not None:
        draw([sweep.name], Path(results_dir) if results_dir is not None else DEFAULT_RESULTS)
    return 1 if res.errors else 0
