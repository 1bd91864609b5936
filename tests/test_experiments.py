"""Experiments (emulator/experiments.py, configs/experiments/*.yaml): every file parses and expands its
sweep, its smoke variant is small and runs end to end (and plots, with emulator/plot.py), and the sweep
rules hold (grid order, named axes, labels, skipped points, reuse of identical points, staged results)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from emulator.run.experiments import (
    EXPERIMENTS_DIR,
    ORDER,
    expand_sweep,
    experiment_files,
    load_experiment,
    point_config,
    run_experiment,
)
from tpicore.errors import TpiError

ROOT = Path(__file__).resolve().parents[1]
FILES = sorted(EXPERIMENTS_DIR.glob("*.yaml"))
NAMES = [f.stem for f in FILES]


def read_jsonl(path: Path) -> list[dict]:
    """The results lines as written (JSON objects), one per line."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("experiments-cache")


@pytest.fixture(scope="module")
def smoke_results(tmp_path_factory, cache):
    """Every experiment's smoke variant, run once for this module: {name: Outcome}."""
    results = tmp_path_factory.mktemp("smoke-results")
    lines: list[str] = []
    outs = {f.stem: run_experiment(f, results, cache, smoke=True, say=lines.append) for f in experiment_files()}
    print("\n".join(lines))
    return results, outs


# ---------------------------------------------------------------------------------------------------
# The shipped experiment files


def test_every_experiment_of_the_issue_is_there():
    assert set(ORDER) <= set(NAMES), set(ORDER) - set(NAMES)
    assert [f.stem for f in experiment_files()][:len(ORDER)] == list(ORDER)


@pytest.mark.parametrize("path", FILES, ids=NAMES)
def test_experiment_parses_and_expands(path):
    spec = load_experiment(path)
    assert spec.name == path.stem
    assert spec.description, "the description is the figure's caption: say how the experiment is scaled"
    if spec.runner:
        return
    assert spec.estimate_s and spec.points
    for i in range(len(spec.points)):  # every point's run config validates (load_experiment did too)
        cfg = point_config(spec, i)
        # faults (failover.yaml) need the wall clock: a lost device would hold the virtual link schedule back
        assert cfg.name == spec.name and cfg.options.clock == ("wall" if cfg.faults else "virtual")
        assert cfg.model.synth and cfg.workload.repetitions == 1


@pytest.mark.parametrize("path", FILES, ids=NAMES)
def test_smoke_variant_is_tiny(path):
    spec = load_experiment(path, smoke=True)
    if spec.runner:
        return
    assert 1 <= len(spec.points) <= 2
    for i in range(len(spec.points)):
        cfg = point_config(spec, i)
        assert cfg.model.synth.startswith("tiny") and cfg.world_size <= 3  # tiny-mha: rows of whole q8_0 blocks
        assert cfg.workload.new_tokens <= 2 and len(cfg.workload.runs) == 1 and cfg.workload.prompt_lengths == (3,)


def test_smoke_variants_run_end_to_end(smoke_results):
    results, outs = smoke_results
    for name, out in outs.items():
        assert not out.failed and not out.interrupted, name
        lines = read_jsonl(results / f"{name}.jsonl")
        assert lines and lines == [r.to_json() for r in out.records], name
        for rec in lines:
            assert rec["experiment"] == name and "point" in rec
            assert rec.get("error") is None, (name, rec.get("error"))
            if "latencies_s" in rec:  # the allreduce sweep's lines
                continue
            if rec.get("runner") == "privacy":  # emulator/run/privacy.py: recovery and latency per K
                assert rec["recovery"] and rec["ttft_s"] > 0
                continue
            assert rec["config"]["description"] and len(rec["tokens"]) == 2 and rec["ttft_s"] > 0
            assert rec["peak_mem_bytes"] and rec["time_split"]
    assert not (results / ".staging").exists()  # lines moved into place when each sweep was done
    timeline = read_jsonl(results / "fig1_timeline.jsonl")
    assert all(rec["trace"] for rec in timeline)


def test_smoke_results_plot(smoke_results, tmp_path):
    results, outs = smoke_results
    figures = tmp_path / "figures"
    cmd = [sys.executable, "-m", "emulator", "plot", "--results", str(results), "--out", str(figures)]
    for name in outs:
        cmd += ["--experiment", name]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    for name in outs:
        png = figures / f"{name}.png"
        assert png.is_file() and png.read_bytes()[:4] == b"\x89PNG", (name, proc.stderr)


# ---------------------------------------------------------------------------------------------------
# Sweep rules


def test_grid_named_axes_points_and_sub_sweeps():
    sweep = {"grid": {"model": [{"synth": "tiny"}, {"synth": "tiny-mha"}],
                      "size": [{"devices.count": 2, "workload.new_tokens": 1}, {"devices.count": 3}]},
             "points": [{"options.mode": "tpi"}, {"options.mode": "galaxy", "panel": "x"}]}
    points = expand_sweep(sweep, "t")
    assert len(points) == 8
    assert points[0] == {"model": {"synth": "tiny"}, "devices.count": 2, "workload.new_tokens": 1, "options.mode": "tpi"}
    assert points[-1] == {"model": {"synth": "tiny-mha"}, "devices.count": 3, "options.mode": "galaxy", "panel": "x"}
    both = expand_sweep([{"grid": {"options.window": [2, 4]}}, {"options.mode": "pipeline"}], "t")
    assert both == [{"options.window": 2}, {"options.window": 4}, {"options.mode": "pipeline"}]
    assert expand_sweep(None, "t") == [{}]
    with pytest.raises(TpiError, match=r"t\[0\]\.optons\.mode: not a run config key"):
        expand_sweep([{"optons.mode": "tpi"}], "t")
    with pytest.raises(TpiError, match=r"t\.grid\.devices\.count: expected a non-empty list"):
        expand_sweep({"grid": {"devices.count": 2}}, "t")


def _experiment(tmp_path: Path, sweep, **extra) -> Path:
    doc = {"name": "exp", "description": "test experiment", "estimate_s": 1,
           "base": {"topology": {"devices": {"count": 2, "template": {"cores": 1, "mem_bytes": "8GiB"}},
                                 "links": {"shape": "star", "latency_ms": 1}},
                    "model": {"synth": "tiny"}, "workload": {"prompt_lengths": [3], "new_tokens": 2,
                                                             "repetitions": 1},
                    "options": {"window": 2}},
           "sweep": sweep, **extra}
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def test_points_are_labelled_skipped_and_reused(tmp_path, cache):
    path = _experiment(tmp_path, [
        {"options.mode": "tpi", "panel": "a"},
        {"options.mode": "pipeline", "devices.count": 4},  # 4 stages, 3 layers: cannot run
        {"options.mode": "tpi", "panel": "b", "links.latency_ms": "1ms"},  # the same run as the first
    ], set={"devices.template.disk_read_mbps": "1GB/s"})
    results = tmp_path / "results"
    (results).mkdir()
    (results / "exp.jsonl").write_text('{"old": 1}\n')
    said: list[str] = []
    out = run_experiment(path, results, cache, say=said.append)
    first, skipped, again = read_jsonl(results / "exp.jsonl")  # replaced, not appended to
    assert first["point"] == {"options.mode": "tpi", "panel": "a"} and first["error"] is None
    assert first["config"]["topology"]["devices"][0]["disk_read_mbps"] == 8000.0  # `set:` reached the template
    assert skipped["skipped"] and "pipeline: 4 stages cannot split 3 layers" in skipped["error"]
    assert skipped["point"] == {"options.mode": "pipeline", "devices.count": 4}
    assert again["point"]["panel"] == "b" and again["tokens"] == first["tokens"] and again["time"] == first["time"]
    assert "same run as point 1" in said[3] and "skipped" in said[2] and out.failed == 0


def test_cli_runs_an_experiment_and_reproduce_selects(tmp_path, cache):
    path = _experiment(tmp_path, [{"options.mode": "standalone"}],
                       smoke={"sweep": [{"options.mode": "offload"}]})
    results = tmp_path / "r"
    base = [sys.executable, "-m", "emulator"]
    proc = subprocess.run(base + ["run", str(path), "--smoke", "--results", str(results), "--cache-dir", str(cache)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "[exp 1/1] mode=offload: TTFT" in proc.stdout
    (rec,) = read_jsonl(results / "exp.jsonl")
    assert rec["mode"] == "offload" and rec["point"] == {"options.mode": "offload"}
    proc = subprocess.run(base + ["reproduce", "--only", "fig1_memory,nope", "--smoke"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "--only: unknown experiment(s) nope" in proc.stderr
    proc = subprocess.run(base + ["run", str(ROOT / "configs" / "emulate.yaml"), "--smoke"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "is a run config, not an experiment file" in proc.stderr


def test_bad_experiment_files_name_the_field(tmp_path):
    path = _experiment(tmp_path, [{"options.mode": "teleport"}])
    with pytest.raises(TpiError, match=r"exp\.yaml \(point 1: mode=teleport\): options\.mode: expected one of"):
        load_experiment(path)
    path = _experiment(tmp_path, [{"options.mode": "tpi"}], extra_key=1)
    with pytest.raises(TpiError, match="extra_key: unknown key"):
        load_experiment(path)
    path = _experiment(tmp_path, [{"options.mode": "tpi"}])
    with pytest.raises(TpiError, match="smoke: missing"):
        load_experiment(path, smoke=True)


def test_sweep_points_do_not_leak_overrides_into_each_other():
    """A point setting `model.layers` must not edit the model section other points share (table2_6 ran
    its no-scheduler points with 4 layers before this was fixed)."""
    spec = load_experiment(EXPERIMENTS_DIR / "table2_6_memory.yaml")
    for i, point in enumerate(spec.points):
        cfg = point_config(spec, i)
        if point.get("options.window") is None:
            assert cfg.model.layers is None, (i, point)
        else:
            assert cfg.model.layers == 4, (i, point)
