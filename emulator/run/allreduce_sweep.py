"""Fig. 3 of the paper: the latency of one 4-byte allreduce against the per-link latency tau, for the
star, tree and ring algorithms, over the emulated Klonet testbed (8 devices, 4 links between any two).

    configs/experiments/fig3_allreduce.yaml   (runner: allreduce; see load_sweep for the keys)
      | per clock (virtual: every tau; wall: the few taus under `wall:`), fork one process per device
      | (tpicore.comm.run_local_processes: TCP loopback), one shared LinkSchedule, a LinkShaper per tau:
      |   for tau, for algo, for rep:  every rank starts at the same time t0
      |                                  virtual: t0 = its own 10 s slot of virtual time, so trials never
      |                                           share a link reservation and nothing sleeps
      |                                  wall:    t0 agreed through an unshaped broadcast, then real waits
      |                                allreduce(ones(1, float32), algo); end = the rank's clock
      |   latency of a trial = max over ranks (end - t0): done when the last rank has the sum
      v
    results/fig3_allreduce.jsonl: one line per (clock, algo, tau); emulator/plot.py draws Fig. 3 from it

The paper's model counts link traversals on the critical path, tau each: star 2 hops x 4 links = 8 tau,
tree of depth 2 = 16 tau, ring 2 (N-1) = 14 hops = 56 tau. `model_s` in a line is the same count for the
run's N and topology (hops(algo, N) x links per route x tau); at N = 8 on klonet it is the paper's.
Virtual mode measures exactly that plus the serialisation of 60-byte frames (4 B payload + 56 B header)
at the link rate; wall mode adds what this host costs (8 processes on 2 cores wake one after another).

Results line (the common fields of emulator/report.py where they apply):
    experiment, runner ("allreduce"), sweep (one id per invocation), time, error, wall_s
    point        {algo, tau_ms, clock, devices}
    config       name, source, description, topology (name, preset, devices, links as run), payload_bytes,
                 repetitions, clock, host
    latencies_s  one per trial; latency_median_s, latency_p99_s, latency_min_s
    model_s      hops x links_per_route x tau; hops, links_per_route; paper_model_s (8/16/56 tau, N = 8 only)
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from emulator.results.report import append_jsonl, host_info, utc_now
from emulator.config.run_config import ROOT, resolve_topology_ref
from tpicore.errors import TpiError

DEFAULT_CONFIG = ROOT / "configs" / "experiments" / "fig3_allreduce.yaml"
DEFAULT_RESULTS = ROOT / "results"
ALGOS = ("star", "tree", "ring")
PAPER_TAU = {"star": 8, "tree": 16, "ring": 56}  # the paper's Fig. 3 model, 8 devices on Klonet
SLOT_S = 10.0  # virtual seconds between trials: far more than one allreduce at tau = 10 ms (0.56 s)
SWEEP_KEYS = {"name", "runner", "description", "topology", "devices", "bandwidth_mbps", "payload_bytes", "algos",
              "tau_ms", "repetitions", "clock", "wall", "timeout_s",
              "paper", "estimate_s"}  # read by emulator/experiments.py, not here


@dataclass(frozen=True)
class Sweep:
    """One Fig. 3 sweep, validated. `wall_tau_ms` are re-measured in wall mode (real sleeps)."""

    name: str = "fig3_allreduce"
    source: str = "<defaults>"
    description: str = ""
    topology: str = "klonet"
    devices: int | None = None  # None: the topology's own count
    bandwidth_mbps: float | str | None = "topology"  # "topology": keep the preset's
    payload_bytes: int = 4
    algos: tuple[str, ...] = ALGOS
    tau_ms: tuple[float, ...] = tuple(float(t) for t in range(11))
    repetitions: int = 3
    clock: str = "virtual"
    wall_tau_ms: tuple[float, ...] = ()
    wall_repetitions: int = 5
    timeout_s: float = 30.0

    def __post_init__(self) -> None:
        for a in self.algos:
            if a not in ALGOS:
                raise TpiError(f"{self.source}: algos: expected some of {', '.join(ALGOS)}, got {a!r}")
        for key in ("tau_ms", "wall_tau_ms"):
            for t in getattr(self, key):
                if not (isinstance(t, (int, float)) and not isinstance(t, bool) and t >= 0):
                    raise TpiError(f"{self.source}: {key}: expected numbers of milliseconds >= 0, got {t!r}")
        if self.clock not in ("virtual", "wall"):
            raise TpiError(f"{self.source}: clock: expected virtual or wall, got {self.clock!r}")
        for key in ("repetitions", "wall_repetitions", "payload_bytes"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise TpiError(f"{self.source}: {key}: must be an integer >= 1, got {v!r}")
        if self.payload_bytes % 4:
            raise TpiError(f"{self.source}: payload_bytes: must be a multiple of 4 (float32), got {self.payload_bytes}")
        if self.devices is not None and (isinstance(self.devices, bool) or not isinstance(self.devices, int)
                                         or self.devices < 1):
            raise TpiError(f"{self.source}: devices: must be an integer >= 1, got {self.devices!r}")

    def smoke(self) -> "Sweep":
        """2 devices, 2 taus, one trial, virtual only: seconds, for tests and CI."""
        return Sweep(name=self.name, source=self.source + " (smoke)", description=self.description,
                     topology=self.topology, devices=2, bandwidth_mbps=self.bandwidth_mbps,
                     payload_bytes=self.payload_bytes, algos=self.algos, tau_ms=(0.0, 2.0), repetitions=1,
                     clock="virtual", timeout_s=self.timeout_s)


def load_sweep(path: str | Path | None) -> Sweep:
    """The sweep of an experiment config (configs/experiments/fig3_allreduce.yaml):

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
    """
    import yaml

    if path is None:
        return Sweep()
    path = Path(path)
    try:
        doc = yaml.safe_load(path.read_text()) or {}
    except OSError as e:
        raise TpiError(f"{path}: cannot read ({e.strerror})") from None
    except yaml.YAMLError as e:
        raise TpiError(f"{path}: not valid YAML ({e})") from None
    if not isinstance(doc, dict):
        raise TpiError(f"{path}: expected a mapping at the top level")
    for k in doc:
        if k not in SWEEP_KEYS:
            raise TpiError(f"{path}: {k}: unknown key (allowed: {', '.join(sorted(SWEEP_KEYS))})")
    if doc.get("runner", "allreduce") != "allreduce":
        raise TpiError(f"{path}: runner: this file is for runner {doc['runner']!r}, not allreduce")
    wall = doc.get("wall") or {}
    if not isinstance(wall, dict) or set(wall) - {"tau_ms", "repetitions"}:
        raise TpiError(f"{path}: wall: expected a mapping with tau_ms and repetitions, got {wall!r}")
    topo = doc.get("topology", "klonet")
    if not isinstance(topo, str):
        raise TpiError(f"{path}: topology: expected a preset name or a path, got {topo!r}")
    kw: dict[str, Any] = dict(
        name=str(doc.get("name", path.stem)), source=str(path), description=str(doc.get("description") or "").strip(),
        topology=str(resolve_topology_ref(topo, path.parent)), devices=doc.get("devices"),
        bandwidth_mbps=doc.get("bandwidth_mbps", "topology"), payload_bytes=doc.get("payload_bytes", 4),
        algos=tuple(doc.get("algos", ALGOS)), tau_ms=tuple(doc.get("tau_ms", Sweep.tau_ms)),
        repetitions=doc.get("repetitions", 3), clock=doc.get("clock", "virtual"),
        wall_tau_ms=tuple(wall.get("tau_ms", ())), wall_repetitions=wall.get("repetitions", 5),
        timeout_s=float(doc.get("timeout_s", 30.0)))
    return Sweep(**kw)


# ---------------------------------------------------------------------------------------------------
# Hop counts (the critical path of each algorithm in tpicore.comm.collectives)


def tree_depth(n: int) -> int:
    from tpicore.comm.collectives import tree_parent

    depth = 0
    for r in range(1, n):
        d, c = 0, r
        while c:
            c, d = tree_parent(c), d + 1
        depth = max(depth, d)
    return depth


def hops(algo: str, n: int) -> int:
    """Device-to-device messages on the critical path of one allreduce over n devices."""
    if n <= 1:
        return 0
    return {"star": 2, "tree": 2 * tree_depth(n), "ring": 2 * (n - 1)}[algo]


# ---------------------------------------------------------------------------------------------------
# Measuring


def _topologies(sweep: Sweep, taus: list[float]) -> dict[float, Any]:
    from emulator.config.topology import load_topology

    out = {}
    for tau in taus:
        over: dict[str, Any] = {"links.latency_ms": float(tau)}
        if sweep.devices is not None:
            over["devices.count"] = sweep.devices
        if sweep.bandwidth_mbps != "topology":
            over["links.bandwidth_mbps"] = sweep.bandwidth_mbps
        out[tau] = load_topology(sweep.topology, over)
    return out


def _sync_start(group, lead_s: float) -> float:
    """A wall-clock start time every rank agrees on, sent unshaped from rank 0 (perf_counter is shared by
    all processes on the host). The wire carries no float64: sent as its int64 bit pattern."""
    import numpy as np

    from tpicore.comm.collectives import broadcast

    t = np.array([time.perf_counter() + lead_s]).view(np.int64) if group.rank == 0 else None
    return float(broadcast(group, t).view(np.float64)[0])


def measure(sweep: Sweep, clock: str, topos: dict[float, Any], reps: int) -> dict[tuple[str, float], list[float]]:
    """{(algo, tau): [latency of each trial, seconds]} over forked device processes; `topos`: the
    emulated network at each tau (same devices and link ids, only the latency differs)."""
    import numpy as np

    from emulator.net.clock import SPIN_S, VirtualClock, WallClock
    from emulator.net.shaper import LinkSchedule, LinkShaper
    from tpicore.comm.collectives import allreduce
    from tpicore.comm.transport import run_local_processes

    n = len(next(iter(topos.values())))
    trials = [(algo, tau) for tau in topos for algo in sweep.algos]
    schedule = LinkSchedule.create(len(next(iter(topos.values())).links))
    spin = SPIN_S if n <= len(os.sched_getaffinity(0)) else 0.0  # spinners starve each other on few cores
    expected = float(n)

    def device(group):
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


def _percentile(xs: list[float], q: float) -> float:
    import numpy as np

    return float(np.percentile(np.asarray(xs), q))


@dataclass
class SweepResult:
    records: list[dict] = field(default_factory=list)
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
                             "devices": [asdict(d) for d in topo.devices],
                             "links": {lid: asdict(link) for lid, link in sorted(topo.links.items())}},
                "payload_bytes": sweep.payload_bytes, "repetitions": reps, "clock": clock, "host": host,
            }
            for algo in sweep.algos:
                lat = measured.get((algo, tau))
                h = hops(algo, n)
                rec = {
                    "experiment": sweep.name, "runner": "allreduce", "sweep": sweep_id,
                    "point": {"algo": algo, "tau_ms": float(tau), "clock": clock, "devices": n},
                    "config": config, "latencies_s": lat,
                    "latency_median_s": statistics.median(lat) if lat else None,
                    "latency_p99_s": _percentile(lat, 99) if lat else None,
                    "latency_min_s": min(lat) if lat else None,
                    "model_s": h * per_route * tau / 1e3, "hops": h, "links_per_route": per_route,
                    "paper_model_s": PAPER_TAU[algo] * tau / 1e3 if n == 8 and per_route == 4 else None,
                    "error": error, "wall_s": wall_s, "time": utc_now(),
                }
                append_jsonl(out_path, rec)
                res.records.append(rec)
    return res


def summary(records: list[dict]) -> str:
    """Measured median vs the hop model, per point."""
    lines = [f"{'clock':>7} {'algo':>5} {'tau ms':>7} {'measured ms':>12} {'p99 ms':>8} {'model ms':>9} "
             f"{'paper ms':>9}"]
    for r in records:
        p = r["point"]

        def ms(x: float | None) -> str:
            return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x * 1e3:.3f}"

        lines.append(f"{p['clock']:>7} {p['algo']:>5} {p['tau_ms']:>7g} {ms(r['latency_median_s']):>12} "
                     f"{ms(r['latency_p99_s']):>8} {ms(r['model_s']):>9} {ms(r['paper_model_s']):>9}")
    return "\n".join(lines)


def run_config(path: str | Path | None = None, results_dir: str | Path | None = None, smoke: bool = False,
               quiet: bool = False, plot: bool = True, figures_dir: str | Path | None = None) -> int:
    """The entry `reproduce` calls for a config with `runner: allreduce`. Exit code: 0 done, 1 a
    measurement failed (recorded with its error), 2 bad config."""
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
    if plot:
        from emulator.figures import plot as plotting

        results = Path(results_dir) if results_dir is not None else DEFAULT_RESULTS
        plotting.plot_experiments([sweep.name], results, Path(figures_dir) if figures_dir else results / "figures",
                                  quiet=quiet)
    return 1 if res.errors else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m emulator.allreduce_sweep",
                                description="Fig. 3: allreduce latency vs per-link latency, star/tree/ring")
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="sweep config (default: %(default)s)")
    p.add_argument("--results", metavar="DIR", help="results folder (default: results/ in the checkout)")
    p.add_argument("--figures", metavar="DIR", help="figures folder (default: <results>/figures)")
    p.add_argument("--smoke", action="store_true", help="2 devices, 2 tau values, virtual clock: a few seconds")
    p.add_argument("--no-plot", action="store_true", help="do not draw the figure after measuring")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    return run_config(args.config, args.results, smoke=args.smoke, quiet=args.quiet, plot=not args.no_plot,
                      figures_dir=args.figures)


if __name__ == "__main__":
    sys.exit(main())
