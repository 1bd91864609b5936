"""Experiments: one YAML per figure or table in configs/experiments/, each a base run config and a sweep.

    python -m emulator run configs/experiments/table1.yaml [--smoke]   one experiment, every point
    python -m emulator reproduce [--only table1,fig5] [--smoke]        all of them (`make reproduce`;
                                        [--allow-dirty]               `make reproduce EXPERIMENT=table1`)

An experiment file:

    name: table1                       # results/<name>.jsonl (default: the file's stem)
    description: >-                    # how the experiment is scaled to this host: the figure's caption
      ...
    paper: table1                      # optional: the paper's table/figure (a key of configs/paper_tables.yaml)
    estimate_s: 600                    # expected wall time of the full sweep on the project's machine
    base:                              # a run config (emulator/run_config.py); every point starts from it
      topology: klonet
      model: {synth: llama-2-7b, unique_layers: 2}
      workload: {...}
      options: {...}
    set:                               # optional: overrides on the base, as --set (e.g. into a preset
      devices.template.disk_read_mbps: 2GB/s    # topology's device template)
    sweep:                             # a list of points, or a grid (+ points), see below
      grid:                            # the cartesian product of its axes, the first outermost
        options.mode: [tpi, galaxy]    #   a config key (dotted, as --set): one value per point
        model: [{synth: tiny}, ...]    #   a section: each value replaces the whole section
        size:                          #   any other name: a named axis, each value a set of overrides
          - {model: {synth: llama-2-7b, unique_layers: 2}, workload.new_tokens: 3}
          - {model: {synth: llama-2-70b, unique_layers: 1}, workload.new_tokens: 2}
      points:                          # explicit points (innermost, after the grid's axes)
        - {options.mode: standalone}
        - {options.mode: tpi, devices.count: 4}
    # or a list mixing points and sub-sweeps ({grid, points}), concatenated in order:
    # sweep: [{grid: {...}}, {grid: {...}, points: [...]}, {options.mode: tpi}]
    smoke:                             # the tiny variant (`--smoke`, the tests): seconds, not minutes
      base: {model: {synth: tiny}, devices.count: 2}   # overrides on base (after SMOKE_DEFAULTS)
      sweep: [{options.mode: tpi}]     # replaces the sweep (one or two points)
    runner: allreduce                  # not a model run: the whole file goes to emulator/run/allreduce_sweep.py

A point is a set of `--set` overrides on the base, plus optional labels (LABEL_KEYS: `panel`,
`testbed`, `paper_model`) that only name it for the plots. Every results line carries
`"experiment": name` and `"point": {key: value}` (named axes contribute their overrides) so plots can
group by them. Points whose resolved run config equals an earlier point's are not run again: the
earlier lines are written once more under the new point (e.g. Fig. 5's base point in each panel).
A point that cannot run (a pipeline with more devices than layers, more devices than heads, a model
preparation error) becomes a line with `"error"` and `"skipped": true`; the sweep goes on.

Results are written to <results>/.staging/<name>.jsonl and moved over <results>/<name>.jsonl when the
sweep is done, so an interrupted run never clobbers committed results. `--smoke` writes to
.cache/smoke-results/ unless --results is given, for the same reason.

Provenance (emulator/results/provenance.py): `reproduce` into the committed results/ refuses a tree with
changes outside results/ unless allow_dirty (`--allow-dirty`, `make reproduce ALLOW_DIRTY=1`), and holds
.cache/reproduce.lock while it runs, so two reproduce commands never run experiments at the same time; the
experiments themselves run one after another. Every line carries `provenance` (commit, dirty flag, host
load at start and end): the launcher stamps run lines, this module skipped points' and the runners' lines
(one load window per runner invocation). Windowed tpi points get the planner's stall prediction before they
run (emulator/results/planned.py: from the config alone), recorded as the line's `prediction`.

Layer: run. The files are tpicore.schema models (errors name the file and the field); figures are drawn
by the caller (`draw`, from emulator/cli.py), never imported here.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Callable, Mapping, Sequence, Union

import yaml
from pydantic import Discriminator, Tag, field_validator, model_validator

from emulator.config.run_config import (
    ROOT,
    SECTIONS,
    RunConfig,
    load_run_config,
    resolved_doc,
)
from emulator.results.planned import planned_stall
from emulator.results.provenance import (
    ProvenanceProbe,
    code_state,
    exclusive_lock,
    require_clean,
)
from emulator.results.record import ResultRecord, RunRecord, append_record, read_records
from emulator.run import allreduce_sweep, privacy
from emulator.run.launcher import EXIT_CRASH, EXIT_INTERRUPTED, EXIT_TERMINATED, Run
from tpicore.errors import TpiError
from tpicore.schema import Invalid, Number, Record, SchemaError, check, load, read_yaml
from tpicore.tools.synth.presets import PRESETS

EXPERIMENTS_DIR = ROOT / "configs" / "experiments"
SMOKE_RESULTS = ROOT / ".cache" / "smoke-results"
COMMITTED_RESULTS = ROOT / "results"
LOCK_PATH = ROOT / ".cache" / "reproduce.lock"
KEYS = ("name", "description", "paper", "estimate_s", "base", "set", "sweep", "smoke", "runner")
CONFIG_ROOTS = set(SECTIONS) | {"devices", "links"}
# point keys that only label a point for the plots (emulator/figures/), never applied to the config
LABEL_KEYS = ("panel", "testbed", "paper_model")
# Every smoke variant: a short prompt, two tokens, one repetition (a YAML's smoke.base may add to these)
SMOKE_DEFAULTS = {"workload.prompt_lengths": [3], "workload.new_tokens": 2, "workload.repetitions": 1,
                  "options.timeout_s": 30}
# `reproduce` runs the experiments in this order (then any others, by name): cheap ones first, and
# those sharing model folders next to each other (the unique-layer cache keeps the most recent ones)
ORDER = ("fig3_allreduce", "fig1_timeline", "fig1_memory", "window_sweep", "stall_prediction", "link_latency_sweep",
         "fig6_baselines", "table3_laptops", "table1", "table2_6_memory", "fig5_scaling", "device_scaling")


# ---------------------------------------------------------------------------------------------------
# The experiment file


def _is_config_key(key: str) -> bool:
    return key.split(".")[0] in CONFIG_ROOTS


def _point(value: Any) -> dict:
    """A point: {override key (or label): value}."""
    if not isinstance(value, Mapping):
        raise Invalid(f"expected a mapping of override key -> value, got {value!r}")
    for k in value:
        if not isinstance(k, str) or not (_is_config_key(k) or k in LABEL_KEYS):
            raise Invalid(f"not a run config key (sections: {', '.join(sorted(CONFIG_ROOTS))}) "
                          f"nor a label ({', '.join(LABEL_KEYS)})", field=str(k))
    return dict(value)


def _non_empty(what: str) -> Callable[[Any], list]:
    def fn(value: Any) -> list:
        if not isinstance(value, list) or not value:
            raise Invalid(f"expected a non-empty list of {what}, got {value!r}")
        return value

    return fn


Point = Annotated[dict, check(_point)]


class Grid(Record):
    """{grid: {axis: [values]}, points: [point]}: the cartesian product of the axes (the first outermost),
    then the points (innermost). An axis named by a config key takes values; any other name is a named
    axis whose values are points."""

    grid: dict[str, Annotated[list, check(_non_empty("values"))]] = {}
    points: Annotated[list[Point], check(_non_empty("points"))] | None = None

    @field_validator("grid", mode="before")
    @classmethod
    def _grid(cls, value: Any) -> Any:
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            raise Invalid(f"expected a mapping of axis -> list of values, got {value!r}")
        return value

    @model_validator(mode="after")
    def _named_axes(self) -> "Grid":
        for axis, values in self.grid.items():
            if not _is_config_key(axis):
                for i, v in enumerate(values):
                    try:
                        _point(v)
                    except Invalid as e:
                        raise Invalid(e.message, field=".".join(p for p in (f"grid.{axis}[{i}]", e.field) if p)) \
                            from None
        return self

    def expand(self) -> list[dict]:
        axes = [[{axis: v} for v in values] if _is_config_key(axis) else [dict(v) for v in values]
                for axis, values in self.grid.items()]
        if self.points is not None:
            axes.append(self.points)
        out = []
        for combo in itertools.product(*axes):
            merged: dict = {}
            for part in combo:
                merged.update(part)
            out.append(merged)
        return out or [{}]


def _item_form(value: Any) -> str:
    """In a list of points: a mapping of only grid/points is a sub-sweep."""
    sub = isinstance(value, Mapping) and value and set(value) <= {"grid", "points"}
    return "(sub-sweep)" if sub else "(point)"


def _sweep_form(value: Any) -> str:
    return "(none)" if value is None else "(list)" if isinstance(value, list) else "(grid)"


SweepItem = Annotated[Union[Annotated[Grid, Tag("(sub-sweep)")], Annotated[Point, Tag("(point)")]],
                      Discriminator(_item_form)]
Sweep = Annotated[Union[Annotated[None, Tag("(none)")], Annotated[list[SweepItem], Tag("(list)")],
                        Annotated[Grid, Tag("(grid)")]], Discriminator(_sweep_form)]


def expand_sweep(sweep: Any, where: str) -> list[dict]:
    """A sweep (list of points and sub-sweeps, or {grid, points}) -> the list of points, each
    {override key: value}; errors name `where` and the field path below it."""
    try:
        parsed = load(Sweep, sweep)
    except SchemaError as e:
        at = where + (e.path if e.path.startswith("[") or not e.path else f".{e.path}")
        raise TpiError(f"{at}: {e.message}") from None
    if parsed is None:
        return [{}]
    if isinstance(parsed, Grid):
        return parsed.expand()
    out = []
    for item in parsed:
        out += item.expand() if isinstance(item, Grid) else [item]
    return out or [{}]


def _base(value: Any) -> dict:
    if not isinstance(value, Mapping):
        raise Invalid("expected a run config mapping (topology, model, workload, options)")
    if "name" in value:
        raise Invalid("the experiment's name is its top-level `name` (or the file's stem)", field="name")
    return dict(value)


class Smoke(Record):
    """smoke: the tiny variant: overrides on base (after SMOKE_DEFAULTS) and a sweep that replaces it."""

    base: Annotated[dict, check(lambda v: _point(v or {}))] = {}
    sweep: Any = None


class ExperimentFile(Record):
    """An experiment file as written (a runner's file is its runner's, see load_experiment)."""

    name: str | None = None
    description: Any = None
    paper: str | None = None
    estimate_s: Number(ge=0, note=" (seconds)") | None = None
    base: Annotated[dict, check(_base)]
    set: Point | None = None
    sweep: Any = None
    smoke: Smoke | None = None
    runner: None = None


@dataclass(frozen=True)
class Spec:
    """One experiment file, validated; `points` already expanded (smoke variant if asked)."""

    name: str
    source: str
    description: str
    paper: str | None
    estimate_s: float | None
    base: dict
    points: tuple[dict, ...]
    smoke: bool
    runner: str | None = None
    doc: dict = field(default_factory=dict, repr=False)

    @property
    def base_dir(self) -> Path:
        return Path(self.source).parent


def load_experiment(path: str | Path, smoke: bool = False) -> Spec:
    """Read and validate an experiment file; every point's run config is validated too."""
    path = Path(path)
    doc = read_yaml(path, "experiment file")
    if not isinstance(doc, Mapping):
        raise TpiError(f"{path}: expected a mapping at the top level")
    runner = doc.get("runner")
    if runner == "privacy":  # emulator/run/privacy.py validates its own keys
        pf = privacy.load_config(path, smoke)
        return Spec(name=pf.name, source=str(path), description=pf.description, paper=None,
                    estimate_s=doc.get("estimate_s"),
                    base={}, points=(), smoke=smoke, runner=runner, doc=dict(doc))
    if runner is not None:  # the runner validates its own keys
        if runner != "allreduce":
            raise TpiError(f"{path}: runner: expected allreduce (emulator/run/allreduce_sweep.py), got {runner!r}")
        sweep = allreduce_sweep.load_sweep(path)
        return Spec(name=sweep.name, source=str(path), description=sweep.description, paper="fig3",
                    estimate_s=doc.get("estimate_s"), base={}, points=(), smoke=smoke, runner=runner, doc=dict(doc))
    f = load(ExperimentFile, doc, str(path))
    name = f.name or path.stem
    base = {**f.base, "name": name}
    if f.set:
        base = resolved_doc(base, list(f.set.items()))
    points = expand_sweep(f.sweep, f"{path}: sweep")
    if smoke:
        if f.smoke is None:
            raise TpiError(f"{path}: smoke: missing (a tiny variant: base overrides and a one- or two-point sweep)")
        base = resolved_doc(base, list({**SMOKE_DEFAULTS, **f.smoke.base}.items()))
        if "sweep" in f.smoke.model_fields_set:
            points = expand_sweep(f.smoke.sweep, f"{path}: smoke.sweep")
    spec = Spec(name=name, source=str(path), description=str(f.description or "").strip(), paper=f.paper,
                estimate_s=f.estimate_s, base=base, points=tuple(points), smoke=smoke, doc=dict(doc))
    for i in range(len(spec.points)):
        point_config(spec, i)  # every point must at least parse and validate
    return spec


def point_config(spec: Spec, index: int) -> RunConfig:
    """The run config of one point: the base with the point's overrides, named after the experiment."""
    point = spec.points[index]
    overrides = [(k, v) for k, v in point.items() if k not in LABEL_KEYS]
    return load_run_config(None, [*overrides, ("name", spec.name)], doc=spec.base,
                           source=f"{spec.source} (point {index + 1}: {label(point)})", base_dir=spec.base_dir)


def label(point: Mapping[str, Any]) -> str:
    """A short text for a point: key=value; a mapping by its name (a model by its preset)."""
    parts = []
    for k, v in point.items():
        if isinstance(v, Mapping):
            v = v.get("synth") or v.get("path") or v.get("name") or "{...}"
        parts.append(f"{k.split('.')[-1]}={v}")
    return " ".join(parts) or "base"


def infeasible(cfg: RunConfig) -> str | None:
    """Why a point cannot run on this model, known from its shape alone (before preparing anything)."""
    if cfg.model.synth is None:
        return None
    c = PRESETS[cfg.model.synth]
    layers, n = cfg.model.layers or c["num_hidden_layers"], cfg.world_size
    if cfg.options.mode == "pipeline" and n > layers:
        return f"pipeline: {n} stages cannot split {layers} layers"
    if cfg.options.tensor_parallel and n > c["num_attention_heads"]:
        fits = [p for p, d in PRESETS.items() if d["num_attention_heads"] >= n and d["intermediate_size"] >= n]
        hint = f" (a model that fits: {', '.join(fits)})" if fits else ""
        return (f"{cfg.options.mode}: {n} devices cannot split {c['num_attention_heads']} attention heads of "
                f"{cfg.model.synth}: at most {c['num_attention_heads']} devices{hint}")
    return None


# ---------------------------------------------------------------------------------------------------
# Running


@dataclass
class SweepOutcome:
    """What one experiment left: its results lines, how many points crashed, whether it was interrupted."""

    name: str
    records: list[ResultRecord] = field(default_factory=list)
    results_path: str = ""
    wall_s: float = 0.0
    failed: int = 0  # points that crashed (not skipped, not OOM)
    interrupted: bool = False


def skipped_record(spec: Spec, point: dict, cfg: RunConfig | None, error: str,
                   probe: ProvenanceProbe | None = None) -> RunRecord:
    """A results line for a point that did not run (same keys as a run's line, values empty)."""
    config = cfg.to_json() if cfg else {"name": spec.name, "source": spec.source}
    config["description"] = spec.description
    return RunRecord.skipped_point(experiment=spec.name, point=point, mode=cfg.options.mode if cfg else None,
                                   config=config, error=error, provenance=(probe or ProvenanceProbe()).stamp())


def _write_all(path: Path, records: Sequence[ResultRecord]) -> None:
    """Replace `path` with these records (the staged file once predictions and provenance are on them)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    for r in records:
        append_record(tmp, r)
    if records:
        os.replace(tmp, path)


def _with_prediction(records: Sequence[RunRecord], prediction: dict[str, float] | None) -> list[RunRecord]:
    if prediction is None:
        return list(records)
    return [dataclasses.replace(r, prediction=prediction) for r in records]


def point_line(spec: Spec, i: int, n: int, point: dict, records: list[RunRecord], wall_s: float) -> str:
    """The progress line of one point: TTFT, token latency, peak memory, or why it did not run."""
    head = f"[{spec.name} {i + 1}/{n}] {label(point)}:"
    if not records:
        return f"{head} no runs recorded ({wall_s:.0f} s)"
    r = records[-1]
    if r.skipped:
        return f"{head} skipped: {r.error}"
    bits = []
    ok = [x for x in records if not x.error]
    if ok:
        ttft = sum(x.ttft_s for x in ok) / len(ok)
        lats = [x.token_latency_s for x in ok if x.token_latency_s is not None]
        bits.append(f"TTFT {ttft:.3g} s")
        if lats:
            bits.append(f"{sum(lats) / len(lats):.3g} s/token")
    if r.prediction:
        bits.append(f"planner's stall {max(r.prediction.values()):.3g} s/token")
    mem = max((d.peak_mem_bytes for x in records for d in x.devices.values()), default=0)
    bits.append(f"peak {mem / 2**30:.2f} GiB/device")

    def devices(names: set[str]) -> str:
        return ", ".join(sorted(names)) if len(names) <= 4 else f"{len(names)} devices"

    over = {d for x in records for d in x.mem_over_cap}
    if any(x.oom for x in records):
        bits.append("OOM: " + devices({o.device for x in records for o in x.oom}))
    elif over:
        bits.append("over cap: " + devices(over))
    errors = [x.error for x in records if x.error and not x.oom]
    if errors:
        bits.append(f"error: {errors[-1]}")
    return f"{head} {', '.join(bits)} (wall {wall_s:.1f} s)"


def run_experiment(path: str | Path, results_dir: str | Path | None = None, cache_dir: str | Path | None = None,
                   smoke: bool = False, overrides: Sequence[tuple[str, Any]] = (), verbose: bool = False,
                   say: Callable[[str], None] | None = None) -> SweepOutcome:
    """Run every point of one experiment; results to <results>/<name>.jsonl when the sweep is done."""
    say = say or (lambda text: print(text, flush=True))
    spec = load_experiment(path, smoke)
    results = Path(results_dir) if results_dir else (SMOKE_RESULTS if smoke else ROOT / "results")
    staging = results / ".staging"
    staging.mkdir(parents=True, exist_ok=True)
    out = SweepOutcome(spec.name, results_path=str(results / f"{spec.name}.jsonl"))
    staged = staging / f"{spec.name}.jsonl"
    staged.unlink(missing_ok=True)
    t0 = time.monotonic()
    if spec.runner:  # allreduce (Fig. 3) or privacy: the runner writes the lines
        return _run_allreduce(spec, staging, staged, out, smoke, verbose, say, t0)
    if overrides:  # command-line --set: on the base, before every point
        spec = dataclasses.replace(spec, base=resolved_doc(spec.base, list(overrides)))
    n = len(spec.points)
    est = f", estimated {spec.estimate_s / 60:.0f} min" if spec.estimate_s and not smoke else ""
    say(f"{spec.name}: {n} point{'s' * (n != 1)}{' (smoke)' if smoke else ''}{est}")
    done: dict[str, tuple[int, list[RunRecord]]] = {}  # resolved config -> (point index, its lines)
    for i, point in enumerate(spec.points):
        p0 = time.monotonic()
        cfg = None
        probe = ProvenanceProbe()
        try:
            cfg = point_config(spec, i)
            resolved = cfg.to_json()
            resolved["topology"].pop("doc")  # as parsed: "300mbps" and 300 are the same link
            resolved.pop("source")  # names the point
            key = json.dumps(resolved, sort_keys=True, default=str)
            if key in done:
                first, recs = done[key]
                recs = [dataclasses.replace(r, point=point) for r in recs]
                for r in recs:
                    append_record(staged, r)
                out.records += recs
                say(f"[{spec.name} {i + 1}/{n}] {label(point)}: same run as point {first + 1}")
                continue
            why = infeasible(cfg)
            if why:
                raise TpiError(why)
            prediction = planned_stall(cfg.to_json())  # a priori: from the config, before anything runs
            res = Run(cfg, results_dir=staging, cache_dir=cache_dir, progress=verbose, point=point,
                      description=spec.description).run()
            recs = _with_prediction(res.records, prediction)
            if res.exit_code in (EXIT_INTERRUPTED, EXIT_TERMINATED):
                out.interrupted = True
                say(f"{spec.name}: interrupted at point {i + 1}/{n}; results so far in {staged}")
                break
            if res.exit_code == EXIT_CRASH:
                out.failed += 1
            else:
                done[key] = (i, recs)
        except TpiError as e:
            rec = skipped_record(spec, point, cfg, str(e), probe)
            append_record(staged, rec)
            recs = [rec]
        out.records += recs
        say(point_line(spec, i, n, point, recs, time.monotonic() - p0))
    out.wall_s = time.monotonic() - t0
    if not out.interrupted:
        if staged.exists():
            _write_all(staged, out.records)  # the same lines, now with the planner's predictions
            os.replace(staged, out.results_path)
        _tidy(staging)
        say(f"{spec.name}: done in {out.wall_s / 60:.1f} min -> {out.results_path}")
    return out


def _tidy(staging: Path) -> None:
    """The staging folder goes once empty (an interrupted sweep leaves its lines there)."""
    try:
        staging.rmdir()
    except OSError:
        pass


def _run_allreduce(spec: Spec, staging: Path, staged: Path, out: SweepOutcome, smoke: bool, verbose: bool,
                   say: Callable[[str], None], t0: float) -> SweepOutcome:
    """Fig. 3 (emulator/run/allreduce_sweep.py) or privacy (emulator/run/privacy.py): the runner's lines land
    in the same place."""
    module = privacy if spec.runner == "privacy" else allreduce_sweep
    say(f"{spec.name}: {spec.runner} runner ({module.__name__}){' (smoke)' if smoke else ''}")
    probe = ProvenanceProbe()
    code = module.run_config(spec.source, staging, smoke=smoke, quiet=not verbose)
    out.wall_s = time.monotonic() - t0
    if staged.exists():
        stamp = probe.stamp()  # one load window for the whole runner invocation
        out.records = [r if r.provenance else dataclasses.replace(r, provenance=stamp) for r in read_records(staged)]
        _write_all(staged, out.records)
        os.replace(staged, out.results_path)
    _tidy(staging)
    out.failed = int(code != 0)
    say(f"{spec.name}: done in {out.wall_s / 60:.1f} min ({len(out.records)} lines) -> {out.results_path}")
    return out


def experiment_files(only: Sequence[str] | None = None) -> list[Path]:
    """configs/experiments/*.yaml in reproduce order; `only`: names (file stems) to keep."""
    files = {p.stem: p for p in EXPERIMENTS_DIR.glob("*.yaml")}
    if only:
        unknown = [o for o in only if o not in files]
        if unknown:
            raise TpiError(f"--only: unknown experiment(s) {', '.join(unknown)} (known: {', '.join(sorted(files))})")
    names = [n for n in ORDER if n in files] + sorted(n for n in files if n not in ORDER)
    return [files[n] for n in names if not only or n in only]


Draw = Callable[[Sequence[str], Path], int]  # (experiment names, results folder) -> exit code (0: drawn)


def estimate_s(spec: Spec) -> tuple[float, str] | None:
    """(seconds, where from): the experiment's estimate_s, else the wall time its committed lines record."""
    if spec.estimate_s:
        return spec.estimate_s, "estimate_s"
    path = COMMITTED_RESULTS / f"{spec.name}.jsonl"
    if not path.exists():
        return None
    walls = [r.wall_s for r in read_records(path, on_bad=lambda why: None) if r.wall_s]
    return (sum(walls), "committed lines' wall_s") if walls else None


def estimate_line(specs: Sequence[Spec]) -> str:
    """The expected duration, total and per experiment: each YAML's estimate_s (measured on the project's
    2-core machine), else the wall time the committed lines of that experiment record."""
    known = [(s, e) for s in specs if (e := estimate_s(s))]
    parts = ", ".join(f"{s.name} {e[0] / 60:.1f}" + ("*" if e[1] != "estimate_s" else "") for s, e in known)
    missing = [s.name for s in specs if s.name not in {k.name for k, _ in known}]
    return (f"estimated {sum(e[0] for _, e in known) / 60:.0f} min ({parts} min; *: from the committed lines' "
            "wall_s)" + (f"; no estimate for {', '.join(missing)}" if missing else ""))


def reproduce(only: Sequence[str] | None = None, smoke: bool = False, results_dir: str | Path | None = None,
              cache_dir: str | Path | None = None, verbose: bool = False, draw: Draw | None = None,
              allow_dirty: bool = False) -> int:
    """Every experiment (or `only` some), one after another, then their figures with `draw` (if given);
    prints the estimate, a line per point and the durations. Into the committed results/ (not smoke):
    refuses a dirty tree unless `allow_dirty`; always refuses to run beside another reproduce."""
    files = experiment_files(only)
    results = Path(results_dir) if results_dir else (SMOKE_RESULTS if smoke else COMMITTED_RESULTS)
    specs = [load_experiment(f, smoke) for f in files]  # all parse before anything runs
    committed = not smoke and results.resolve() == COMMITTED_RESULTS.resolve()
    commit = require_clean(allow_dirty) if committed else (code_state().commit or "no commit")[:12]
    lock = exclusive_lock(LOCK_PATH, "reproduce")
    try:
        print(f"reproduce: {len(specs)} experiments{' (smoke)' if smoke else ''} at {commit} -> {results}"
              + ("" if smoke else f"; {estimate_line(specs)}"), flush=True)
        t0 = time.monotonic()
        durations, failed = [], 0
        for f in files:
            o = run_experiment(f, results, cache_dir, smoke=smoke, verbose=verbose)
            durations.append((o.name, o.wall_s))
            failed += o.failed
            if o.interrupted:
                print("reproduce: interrupted", flush=True)
                return 130
        total = time.monotonic() - t0
    finally:
        os.close(lock)
    print("\nreproduce: durations", flush=True)
    for (name, wall), spec in zip(durations, specs):
        est = f"  (estimate {spec.estimate_s / 60:.0f} min)" if spec.estimate_s and not smoke else ""
        print(f"  {name:<20} {wall / 60:6.1f} min{est}", flush=True)
    print(f"  {'total':<20} {total / 60:6.1f} min", flush=True)
    code = 1 if failed else 0
    if draw is not None:
        code = max(code, draw([s.name for s in specs], results))
    return code


def is_experiment_file(path: str | Path) -> bool:
    """An experiment (base + sweep, or a runner) rather than a plain run config."""
    try:
        doc = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError):
        return False
    return isinstance(doc, Mapping) and ("base" in doc or "sweep" in doc or "runner" in doc)
