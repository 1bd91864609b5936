"""Figures from results lines (emulator/figures/) and the Fig. 3 allreduce sweep (emulator/run/allreduce_sweep.py).

Every figure is drawn from synthetic lines shaped like the launcher's (emulator/results/record.py: written
by its one writer, read back by its one reader) plus the sweep fields (`point`, `options.mode`, `trace`,
`prediction`); missing or unusable results must say why and exit non-zero only when nothing could be drawn."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from emulator.cli import main as emulator_main
from emulator.config.collective_model import PAPER_TAU, hops
from emulator.figures import data, plot, stalls, style
from emulator.results.record import (
    AllreducePoint,
    AllreduceRecord,
    RunRecord,
    append_record,
    record_from_json,
)
from emulator.run import allreduce_sweep, experiments
from tpicore.runtime.window_model import simulate_window
from tpicore.tools.synth.presets import preset_config

MiB = 2**20
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TINY = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 8, "num_key_value_heads": 4,
        "intermediate_size": 128, "vocab_size": 256, "head_dim": None, "torch_dtype": "float32"}


def line(experiment: str, point: dict, *, model: str = "llama-2-7b", n: int = 8, window: int | None = None,
         mode: str | None = None, ttft: float = 1.0, lat: float = 0.5, peak: int = 100 * MiB, oom: bool = False,
         latency_ms: float = 1.0, bw: float | None = 300.0, cores: int = 8, speed: float = 1.0,
         allreduce: str = "star", stall_s: float = 0.0, **extra) -> dict:
    """One results line as the launcher writes it (JSON; the fields the plots read, with plausible values)."""
    devices = [{"name": f"d{i}", "cores": cores, "mem_bytes": 8 << 30, "disk_read_mbps": None, "speed": speed}
               for i in range(n)]
    options = {"clock": "virtual", "compute": "measured", "allreduce": allreduce, "window": window,
               "mode": mode or "tpi", "retain_every": 0}
    rec = {
        "experiment": experiment, "point": point, "mode": mode or "tpi", "run": 0, "prompt_len": 4, "repetition": 0,
        "config": {"name": experiment, "description": "scaled down for the test: 2 layers, hidden 64",
                   "topology": {"name": "klonet", "doc": {"links": {"shape": "klonet"}}, "devices": devices,
                                "links": {"d0>gw:d0": {"latency_ms": latency_ms, "bandwidth_mbps": bw,
                                                       "jitter_ms": 0.0, "loss": 0.0}}},
                   "model": {"path": None, "synth": model, "layers": None, "unique_layers": None, "dtype": "f32",
                             "seed": 0, "config": TINY},
                   "options": options, "clock": {"kind": "virtual"}, "devices_run": [d["name"] for d in devices]},
        "tokens": [1, 2, 3, 4], "ttft_s": None if oom else ttft, "token_latencies_s": [] if oom else [lat] * 3,
        "token_latency_s": None if oom else lat, "peak_rss_bytes": {d["name"]: peak // (2 + i) for i, d in
                                                                    enumerate(devices)},
        "peak_mem_bytes": {d["name"]: peak // (1 + i) for i, d in enumerate(devices)}, "mem_over_cap": [],
        "time_split": {d["name"]: {"compute_s": 0.2, "comm_s": 0.6, "load_s": 0.1, "stall_s": stall_s, "loads": 4,
                                   "loaded_bytes": 4096, "stalls": 1 if stall_s else 0} for d in devices},
        "oom": [{"device": "d1", "rss_bytes": peak, "cap_bytes": peak, "by": "watchdog"}] if oom else [],
        "error": "d1 ran out of memory" if oom else None, "wall_s": 1.0, "links": {}, "window": {}, "trace": {},
        "page_cache_bytes": {}, "time": "2024-10-01T00:00:00Z",
    }
    rec.update(extra)
    return rec


def rec(*args, **kw) -> RunRecord:
    """line(...) read back as the figures read it."""
    return record_from_json(line(*args, **kw))


def trace(n: int, pipeline: bool = False) -> dict:
    out = {}
    for r in range(n):
        if pipeline:  # stage r computes after stage r-1
            out[f"d{r}"] = [["stage", "compute", 0.01 * r, 0.01], ["send", "comm", 0.01 * r + 0.01, 0.002]]
        else:
            out[f"d{r}"] = [["attn", "compute", 0.0, 0.004], ["allreduce", "comm", 0.004, 0.008],
                            ["load ffn", "load", 0.0, 0.006], ["wait", "stall", 0.006, 0.001],
                            ["ffn", "compute", 0.012, 0.005], ["allreduce", "comm", 0.017, 0.008]]
    return out


def window_stats(tau_ms: float, stall_ms: float, n: int = 8) -> dict:
    """`window` of a results line: per-step stalls and the paper's conditions on measured block times."""
    measured = {"t_attn": 0.002, "t_ffn": 0.003, "t_ar": 0.004, "tau_attn": tau_ms / 2e3, "tau_ffn": tau_ms / 1e3}
    tight, loose = tau_ms < 6, tau_ms < 12
    steady = {"tight": tight, "loose": loose, "tight_attn": tight, "tight_ffn": tight, "budget": loose,
              "first_violation_layer": None if loose else 1, "failed": [], "retain_every": 0, "measured": measured}

    def step(i: int, stall_s: float) -> dict:
        return {"step": i, "stall_s": stall_s, "compute_s": 0.01, "comm_s": 0.01, "wall_s": 0.03, "load_s": 0.01,
                "stall_share": stall_s / 0.03}

    steps = [step(0, 0.1)] + [step(i, stall_ms / 1e3) for i in (1, 2, 3)]  # the first step prefills: left out
    stats = {"window": 2, "retain_every": 0, "layers": TINY["num_hidden_layers"], "steps": steps, "slab_bytes": 0,
             "retained_bytes": 0, "blocks": {}, "steady": steady, "first_stall": None, "first_steady_stall": None}
    return {"window": {f"d{r}": stats for r in range(n)}}


def synthetic() -> dict[str, list[dict]]:
    """Lines for every figure, covering OOM points, several models and the sweep keys the harness sets."""
    models = ["llama-2-3b", "llama-2-7b", "llama-2-70b"]
    out: dict[str, list[dict]] = {}
    out["fig1_timeline"] = [
        line("fig1_timeline", {"options.mode": "tpi"}, mode="tpi", n=4, trace=trace(4)),
        line("fig1_timeline", {"options.mode": "pipeline"}, mode="pipeline", n=4, trace=trace(4, True)),
    ]
    out["fig1_memory"] = [line("fig1_memory", {"topology.devices.count": n, "options.window": w}, n=n, window=w,
                               peak=(400 // n + (0 if w is None else -40 // n + 20)) * MiB)
                          for n in (2, 4, 8) for w in (None, 2)]
    out["table1"] = [line("table1", {"model": {"synth": m, "unique_layers": 2}, "options.window": w}, model=m,
                          window=w, ttft=1.0 + i, lat=0.5 + i, peak=(200 if w is None else 50) * MiB * (i + 1),
                          oom=(m == "llama-2-70b" and w is None))
                     for i, m in enumerate(models) for w in (None, 2)]
    out["table1"].append(line("table1", {"model": {"synth": "yi-34b"}, "options.window": 2}, model="yi-34b",
                              window=2, ttft_s=None, token_latency_s=None, error="more devices than heads",
                              skipped=True))  # a point that cannot run: marked, not dropped
    out["table2_6_memory"] = [line("table2_6_memory", {"paper_model": m, "topology.devices.count": n,
                                                       "options.window": w}, model=m, n=n, window=w,
                                   peak=(300 // n + 30 if w is None else 30 + 5 * w) * MiB)
                              for m in models[:2] for n in (2, 4, 6, 8) for w in (None, 2, 4)]
    out["fig5_scaling"] = (
        [line("fig5_scaling", {"topology.devices.count": n}, n=n, lat=4.0 / n) for n in (2, 4, 8)]
        + [line("fig5_scaling", {"topology.devices.template.speed": s}, speed=s, lat=1.0 / s) for s in (0.5, 1, 2)]
        + [line("fig5_scaling", {"links.bandwidth_mbps": b}, bw=b, lat=0.5 + 10 / b) for b in (100, 300, 1000)])
    out["fig6_baselines"] = [line("fig6_baselines", {"paper_model": m, "options.mode": mode}, model=m, mode=mode,
                                  ttft=1.0 + k, lat=0.2 + k, oom=(mode == "standalone" and m == "llama-2-70b"))
                             for m in models for k, mode in enumerate(("tpi", "pipeline", "galaxy", "standalone"))]
    out["table3_laptops"] = (
        [line("table3_laptops", {"paper_model": m, "options.mode": mode, "topology.devices.count": 1}, model=m,
              mode=mode, n=1, ttft=5.0 + k, lat=3.0 + k, oom=(mode == "offload" and m == "llama-2-70b"))
         for m in models for k, mode in enumerate(("standalone", "offload", "standalone+ms"))]
        + [line("table3_laptops", {"paper_model": m, "options.mode": "tpi", "testbed": f"laptops{n}"}, model=m,
                mode="tpi", n=n, ttft=1.0 + 4 / n, lat=0.5 + 4 / n) for m in models for n in (3, 4)])
    out["window_sweep"] = [line("window_sweep", {"options.window": w, "paper_model": m}, model=m, window=w,
                                lat=1.0 / w, peak=(20 + 10 * w) * MiB) for m in models[:2] for w in (2, 3, 4, 6)]
    out["link_latency_sweep"] = [line("link_latency_sweep", {"links.latency_ms": t, "options.allreduce": a},
                                      latency_ms=t, allreduce=a, lat=0.01 + t * 1e-3 * (1 + 2 * 2 * h) * 4)
                                 for a, h in (("star", 2), ("tree", 4), ("ring", 14)) for t in (0, 1, 2, 5)]
    out["quantized"] = []
    for m in ("llama-2-70b", "llama-3.1-70b"):
        for k, dtype in enumerate(("f32", "bf16", "q8_0", "q4_k")):
            rec = line("quantized", {"model.synth": m, "model.dtype": dtype}, model=m, ttft=20.0 - 2 * k,
                       lat=18.0 - 3 * k, peak=500 * MiB)
            rec["config"]["model"]["dtype"] = dtype
            out["quantized"].append(rec)
    out["device_scaling"] = [line("device_scaling", {"topology.devices.count": n, "options.window": 2}, n=n,
                                  window=2, lat=0.1 + 0.8 / n, peak=(30 + 100 // n) * MiB) for n in (2, 4, 8, 16, 32)]
    out["stall_prediction"] = (  # one model with the planner's prediction, one replayed from block times
        [line("stall_prediction", {"paper_model": "llama-2-3b", "disk_read_mbps": d}, window=2,
              stall_s=0.04 * 100 / d, model="llama-2-3b",
              prediction={"stall_per_token_s": {"d0": 0.009 * 100 / d, "d1": 0.0}})
         for d in (100, 400)]
        + [dict(line("stall_prediction", {"paper_model": "llama-2-7b", "disk_read_mbps": d}, window=2),
                **window_stats(tau_ms=100 / d * 10, stall_ms=100 / d * 9)) for d in (100, 400)])
    out["failover"] = [  # a worker lost after token 2: the recovery's split and the token that waited for it
        line("failover", {"devices.count": n, "options.slices": s}, n=n, ttft=0.5, lat=0.2,
             token_latencies_s=[0.2, 3.0, 0.2], faults=[{"device": 2, "at_token": 2, "kind": "crash",
                                                         "duration_s": None, "run": 0}],
             recoveries=[{"lost": {"2": "disconnected"}, "world_before": n, "world_after": n - 1, "spares_used": 0,
                          "detect_s": 0.01, "replan_s": 0.01, "load_s": 2.0 + n / 4, "rebuild_s": 0.4,
                          "replayed_tokens": 5, "total_s": 2.42 + n / 4, "token": 3}])
        for n in (3, 5) for s in ("local", "master")]
    return out


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("results")
    for name, recs in synthetic().items():
        for r in recs:
            append_record(d / f"{name}.jsonl", record_from_json(r))
    for algo in ("star", "tree", "ring"):  # fig3 lines as allreduce_sweep writes them, without running it
        for tau in (0.0, 1.0, 2.0):
            for clock in ("virtual", "wall"):
                model = hops(algo, 8) * 4 * tau / 1e3
                lat = model + (1e-5 if clock == "virtual" else 1.5e-3)
                append_record(d / "fig3_allreduce.jsonl", AllreduceRecord.measured(
                    experiment="fig3_allreduce", sweep="s1", point=AllreducePoint(algo, tau, clock, 8),
                    config={"description": "8 devices on Klonet (test)"}, latencies_s=[lat, lat * 1.1],
                    links_per_route=4, error=None, wall_s=1.0))
    for k in (0, 1, 2, 4):  # privacy lines as emulator/run/privacy.py writes them, without running it
        append_record(d / "privacy.jsonl", record_from_json({
            "experiment": "privacy", "runner": "privacy", "sweep": "s1", "point": {"private_layers": k},
            "config": {"description": "synthetic proxy (test)", "model": {"vocab": 256}, "latency": {"devices": 3}},
            "recovery": {"nearest": 1.0 / (1 + 9 * k), "linear": 1.0 / (1 + 3 * k), "mlp": 1.0 / (1 + 2 * k)},
            "ttft_s": 0.02 + 0.01 * k, "token_latency_s": 0.005 + 0.001 * k, "error": None, "wall_s": 1.0,
            "time": "2026-11-28T00:00:00Z"}))
    return d


def test_synthetic_lines_cover_every_figure():
    assert set(synthetic()) | {"fig3_allreduce", "privacy"} == set(plot.FIGURES)


def test_lines_survive_the_writer_and_the_reader(results):
    """Every synthetic line, written by append_record and read back, is the record that was written."""
    for name, lines in synthetic().items():
        written = [record_from_json(x) for x in lines]
        back = [record_from_json(json.loads(t)) for t in (results / f"{name}.jsonl").read_text().splitlines()]
        assert back == written, name


def test_a_line_is_written_whole_or_not_at_all(tmp_path, monkeypatch):
    """A line that cannot be serialised touches nothing; a short write (a full disk) is cut back off."""
    path = tmp_path / "x.jsonl"
    append_record(path, rec("x", {"n": 1}))
    before = path.read_bytes()
    with pytest.raises(ValueError):  # NaN is not JSON
        append_record(path, rec("x", {"n": 2}, ttft=float("nan")))
    assert path.read_bytes() == before
    real_write = os.write
    monkeypatch.setattr(os, "write", lambda fd, b: real_write(fd, b[: len(b) // 2]))
    with pytest.raises(OSError, match="wrote"):
        append_record(path, rec("x", {"n": 3}))
    monkeypatch.undo()
    assert path.read_bytes() == before


@pytest.mark.parametrize("name", sorted(plot.FIGURES))
def test_each_figure_writes_a_png(name, results, tmp_path, capsys):
    rc = plot.main(["--experiment", name, "--results", str(results), "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 0, err
    png = tmp_path / f"{name}.png"
    data_ = png.read_bytes()
    assert data_[:8] == PNG_MAGIC and len(data_) > 20_000  # a drawn figure, not an empty canvas
    assert [p.name for p in tmp_path.iterdir()] == [png.name]  # the temp file was renamed, none left behind


def test_all_with_nothing_to_plot_says_why_and_fails(tmp_path, capsys):
    assert plot.main(["--all", "--results", str(tmp_path), "--out", str(tmp_path / "fig")]) == 1
    err = capsys.readouterr().err
    for name in plot.FIGURES:
        assert f"{name}: skipped: no results ({tmp_path / (name + '.jsonl')} does not exist" in err
    assert "error: no figure could be drawn" in err
    assert not (tmp_path / "fig").exists()


def test_unusable_lines_are_skipped_with_the_reason_and_others_still_plot(tmp_path, capsys):
    (tmp_path / "fig3_allreduce.jsonl").write_text(json.dumps({"experiment": "fig3_allreduce", "point": {}}) + "\n")
    (tmp_path / "window_sweep.jsonl").write_text("")
    for r in synthetic()["device_scaling"]:
        append_record(tmp_path / "device_scaling.jsonl", record_from_json(r))
    assert plot.main(["--all", "--results", str(tmp_path), "--out", str(tmp_path / "fig"), "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "fig3_allreduce: skipped: " in err and "no lines with point.algo and point.tau_ms" in err
    assert "window_sweep: skipped: " in err and "holds no lines" in err
    assert [p.name for p in (tmp_path / "fig").iterdir()] == ["device_scaling.png"]


def test_a_rerun_of_a_point_replaces_its_older_lines():
    old = [rec("x", {"n": n}, lat=9.0, sweep="a") for n in (2, 4)]
    new = [rec("x", {"n": 4}, lat=1.0, sweep="b")]
    kept = data.latest_sweeps(old + new + [rec("x", {"n": 8})])
    assert [(r.point, r.token_latency_s) for r in kept] == [({"n": 2}, 9.0), ({"n": 4}, 1.0), ({"n": 8}, 0.5)]


def test_points_aggregate_runs_and_mark_oom():
    ok = rec("x", {"w": 2}, lat=1.0)
    slow = rec("x", {"w": 2}, lat=3.0, peak=300 * MiB)
    dead = rec("x", {"w": 2}, oom=True, peak=500 * MiB)
    (p,) = data.aggregate([ok, slow, dead])
    assert p.token_latency_s == 2.0 and p.peak_bytes == 500 * MiB and p.oom and not p.failed
    (q,) = data.aggregate([dead])
    assert q.failed and q.token_latency_s is None


def test_point_status_marks_oom_skipped_and_errors():
    assert data.aggregate([rec("x", {})])[0].status == ""
    assert data.aggregate([rec("x", {}, oom=True)])[0].status == "OOM"
    assert data.aggregate([rec("x", {}, error="no", skipped=True)])[0].status == "skipped"
    assert data.aggregate([rec("x", {}, error="crashed")])[0].status == "error"
    assert style.series_label({"model": {"synth": "llama-2-70b", "unique_layers": 1}, "options.window": 2},
                              set()) == "llama-2-70b (1 unique layers), window=2"


def test_memory_over_the_cap_is_oom_but_its_times_stand():
    """mem_over_cap: a unique-layer model's extrapolated memory is above the cap; the run completed."""
    over = rec("x", {"w": None}, lat=2.0, peak=900 * MiB, mem_over_cap=["d0"])
    (p,) = data.aggregate([over])
    assert p.oom and not p.failed and p.token_latency_s == 2.0 and p.peak_bytes == 900 * MiB  # peak_mem_bytes


def test_stall_is_replayed_from_measured_block_times_when_not_predicted():
    r = record_from_json(dict(line("x", {}, window=2), **window_stats(tau_ms=20, stall_ms=15)))
    pred, how = stalls.predicted_stall(r)
    layers = TINY["num_hidden_layers"]
    expected = simulate_window([0.006, 0.007] * layers, [0.010, 0.020] * layers, 2)[-1]
    assert how.startswith("replay") and pred == pytest.approx(expected) and pred > 0
    assert stalls.measured_stall(r) == pytest.approx(0.015)  # decode steps only
    assert stalls.steady_verdict(r) == "neither"
    r = rec("x", {}, window=2, prediction={"stall_per_token_s": {"d0": 0.5}})
    assert stalls.predicted_stall(r) == (0.5, "planner")


def test_paper_formula_is_the_predictors_for_equal_shares():
    """The paper's formula (tpicore.tools.predictor) for Llama 2-7B on 8 equal shares, written out by hand."""
    dims = {k: v for k, v in preset_config("llama-2-7b").items() if k in TINY}
    via_planner = data.paper_formula_bytes(dims, 8, 2)
    h, v, s = 4096, 32000, 11008
    assert via_planner == int(4 * (2 * h * v + h))  # the master's 2hv + h dominates at w = 2
    w4 = data.paper_formula_bytes(dims, 8, 4)
    assert w4 == int(4 * (2 * h * v + h + 2 * h * h / 8 * 2 + h + 3 * h * s / 8 + h))


def test_fig3_config_is_an_allreduce_runner_over_8_klonet_devices():
    doc = yaml.safe_load(allreduce_sweep.DEFAULT_CONFIG.read_text())
    assert doc["runner"] == "allreduce" and doc["name"] == "fig3_allreduce" and doc["description"]
    sweep = allreduce_sweep.load_sweep(allreduce_sweep.DEFAULT_CONFIG)
    assert sweep.devices == 8 and sweep.tau_ms == tuple(range(11)) and sweep.algos == ("star", "tree", "ring")
    assert [hops(a, 8) * 4 for a in sweep.algos] == [8, 16, 56] == [PAPER_TAU[a] for a in sweep.algos]


def test_fig3_config_is_accepted_by_the_experiment_harness():
    spec = experiments.load_experiment(allreduce_sweep.DEFAULT_CONFIG, False)
    assert spec.runner == "allreduce" and spec.name == "fig3_allreduce" and spec.description


def test_allreduce_sweep_smoke_records_and_figure(tmp_path):
    def draw(names, results):  # what the CLI passes: figures are not the sweep's business
        return plot.plot_experiments(names, results, results / "figures")

    rc = allreduce_sweep.run_config(allreduce_sweep.DEFAULT_CONFIG, tmp_path, smoke=True, quiet=True, draw=draw)
    assert rc == 0
    recs = [json.loads(x) for x in (tmp_path / "fig3_allreduce.jsonl").read_text().splitlines()]
    assert sorted((r["point"]["algo"], r["point"]["tau_ms"]) for r in recs) == sorted(
        (a, t) for a in ("star", "tree", "ring") for t in (0.0, 2.0))
    for r in recs:
        assert r["experiment"] == "fig3_allreduce" and r["error"] is None and r["point"]["devices"] == 2
        # 2 devices: every algorithm is 2 hops x 4 links; the virtual clock adds only 60-byte serialisation
        assert r["model_s"] == pytest.approx(8 * r["point"]["tau_ms"] / 1e3)
        assert r["model_s"] <= r["latency_median_s"] <= r["model_s"] + 1e-4
        assert r["config"]["description"] and len(r["config"]["topology"]["devices"]) == 2
    assert (tmp_path / "figures" / "fig3_allreduce.png").read_bytes()[:8] == PNG_MAGIC


def test_plot_is_a_subcommand_of_the_emulator_cli(results, tmp_path):
    assert emulator_main(["plot", "--experiment", "table1", "--results", str(results), "--out", str(tmp_path)]) == 0
    assert (tmp_path / "table1.png").stat().st_size > 0


def test_committed_results_are_read_by_the_one_reader():
    """Every line under results/ is a record, and writing it back keeps every number (null = absent)."""
    def leaves(v, path=""):
        if isinstance(v, dict):
            for k, x in v.items():
                yield from leaves(x, f"{path}.{k}")
        elif isinstance(v, list):
            for i, x in enumerate(v):
                yield from leaves(x, f"{path}[{i}]")
        elif v is not None:
            yield path, v

    files = sorted((Path(__file__).resolve().parents[1] / "results").glob("*.jsonl"))
    assert files
    for f in files:
        for text in f.read_text().splitlines():
            d = json.loads(text)
            back = record_from_json(d).to_json()
            assert dict(leaves(back)) == dict(leaves(d)), f.name
