"""The emulation launcher end to end: results lines, tokens equal to a single process, the virtual clock
equal to the link model, wall vs virtual agreement, OOM, crash and Ctrl-C leave nothing running, bad
configs rejected naming the field."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from emulator.config.run_config import load_run_config
from emulator.run.launcher import Run, prompt_ids
from tpicore.errors import TpiError
from tpicore.runtime.device import Device, ResidentSource
from tpicore.runtime.generate import generate
from tpicore.weights.store import TensorStore

ROOT = Path(__file__).resolve().parents[1]
MiB = 2**20
FIELDS = {"experiment", "run", "prompt_len", "repetition", "config", "tokens", "ttft_s", "token_latencies_s",
          "token_latency_s", "peak_rss_bytes", "time_split", "oom", "error", "wall_s", "links", "time",
          "point", "mode", "peak_mem_bytes", "mem_over_cap", "window", "trace", "page_cache_bytes", "provenance"}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """Synthesized models and shards, shared by this module's tests."""
    return tmp_path_factory.mktemp("emu-cache")


def config(n=2, shape="star", latency_ms=1.0, bandwidth=None, clock="virtual", compute="measured",
           new_tokens=4, lengths=(5,), reps=1, model=None, algo="star", **devices):
    return {
        "name": "t",
        "topology": {"devices": {"count": n, "template": {"cores": 1, "mem_bytes": "8GiB", **devices}},
                     "links": {"shape": shape, "latency_ms": latency_ms, "bandwidth_mbps": bandwidth}},
        "model": model or {"synth": "tiny"},
        "workload": {"prompt_lengths": list(lengths), "new_tokens": new_tokens, "repetitions": reps},
        "options": {"clock": clock, "compute": compute, "allreduce": algo},
    }


def run(doc, tmp_path, cache, **kw):
    cfg = load_run_config(None, doc=doc)
    out = Run(cfg, results_dir=tmp_path / "results", cache_dir=cache, progress=False, **kw).run()
    return cfg, out


def read_jsonl(path: Path) -> list[dict]:
    """The results lines as written (JSON objects), one per line."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def single_process_tokens(model_dir, prompt, n):
    st = TensorStore.from_model_dir(model_dir)
    return generate(Device(st, ResidentSource(st), len(prompt) + n).step, prompt, n, max_seq=len(prompt) + n).tokens


# ---------------------------------------------------------------------------------------------------
# End to end


@pytest.mark.parametrize("n,clock,algo", [(2, "virtual", "star"), (4, "virtual", "tree"), (2, "wall", "star")])
def test_run_writes_results_and_matches_a_single_process(tmp_path, cache, n, clock, algo):
    cfg, out = run(config(n, "klonet", clock=clock, algo=algo, bandwidth=300, lengths=(3, 7), reps=2), tmp_path, cache)
    assert out.exit_code == 0
    lines = read_jsonl(tmp_path / "results" / "t.jsonl")
    assert lines == [r.to_json() for r in out.records] and len(lines) == 4  # 2 prompt lengths x 2 repetitions
    names = [f"d{i}" for i in range(n)]
    model_dir = lines[0]["config"]["model"]["folder"]
    prompts = prompt_ids(cfg, 131)
    for rec, prompt in zip(lines, prompts):
        assert set(rec) == FIELDS
        assert rec["error"] is None and rec["oom"] == []
        assert rec["tokens"] == single_process_tokens(model_dir, prompt, 4)
        assert rec["prompt_len"] == len(prompt)
        assert rec["ttft_s"] > 0 and len(rec["token_latencies_s"]) == 3
        assert rec["token_latency_s"] == pytest.approx(sum(rec["token_latencies_s"]) / 3)
        assert sorted(rec["peak_rss_bytes"]) == names and all(v > 10 * MiB for v in rec["peak_rss_bytes"].values())
        assert sorted(rec["time_split"]) == names
        assert all(s["comm_s"] > 0 and s["compute_s"] > 0 for s in rec["time_split"].values())
        c = rec["config"]
        assert len(c["topology"]["devices"]) == n and len(c["topology"]["links"]) == 4 * n
        assert c["model"]["config"]["hidden_size"] == 48 and c["options"]["clock"] == clock
        assert c["host"]["cpus"] >= 1 and c["mem_caps_bytes"]["d0"] == 8 * 2**30
    # klonet: 4 links each way; a token needs 2 L allreduces of >= 8 link latencies each (L = 3)
    assert all(r["token_latency_s"] >= 2 * 3 * 8e-3 for r in lines)
    print("\n" + out.summary)


def test_virtual_clock_equals_the_link_model_exactly(tmp_path, cache):
    """Compute free, ideal bandwidth: star shape (2 links of tau each way). A step = broadcast (2 tau) +
    first partial up (2 tau) + (2L - 1) more allreduces of one round trip (4 tau) = 8 L tau, for any N."""
    tau, L = 0.002, 3
    disk = {"disk_read_mbps": 1e7, "disk_latency_ms": 0}  # every read is charged: make reads (nearly) free
    for n in (2, 3):
        _, out = run(config(n, "star", latency_ms=tau * 1e3, compute="free", new_tokens=5, reps=2, **disk),
                     tmp_path, cache)
        assert out.exit_code == 0
        for rec in (r.to_json() for r in out.records):
            assert rec["ttft_s"] == pytest.approx(8 * L * tau, abs=1e-6)  # ~100 KB at 1.25 TB/s
            assert rec["token_latencies_s"] == pytest.approx([8 * L * tau] * 4, abs=1e-6)
            assert all(abs(s["compute_s"]) < 1e-12 for s in rec["time_split"].values())  # fp rounding only
    # and on klonet (4 links each way): twice that
    _, out = run(config(2, "klonet", latency_ms=tau * 1e3, compute="free", new_tokens=3, **disk), tmp_path, cache)
    assert out.records[0].to_json()["token_latencies_s"] == pytest.approx([16 * L * tau] * 2, abs=1e-6)


def test_wall_and_virtual_clocks_both_pay_the_link_model(tmp_path, cache):
    """N = 2, 10 ms star links: both clocks give the same tokens, and neither is faster than the link
    model (a step waits out 8 L tau of links however fast it computes). How closely the two clocks agree
    on this host is a measurement, not a unit test: benchmarks/bench_clock_agreement.py --tolerance 0.15."""
    tau, L = 0.010, 3
    floor_s = 8 * L * tau
    outs = {}
    for clock in ("virtual", "wall"):
        _, out = run(config(2, "star", latency_ms=tau * 1e3, clock=clock, new_tokens=5, lengths=(8,)), tmp_path, cache)
        assert out.exit_code == 0
        outs[clock] = out.records[0].to_json()
    v, w = outs["virtual"], outs["wall"]
    assert v["tokens"] == w["tokens"]
    for rec in (v, w):
        assert rec["ttft_s"] >= floor_s and all(t >= floor_s for t in rec["token_latencies_s"])


def test_cgroup_root_groups_are_created_and_removed(tmp_path, cache):
    root = tmp_path / "cg"
    root.mkdir()
    (root / "cgroup.controllers").write_text("cpu memory\n")  # a fake v2 root (not a cgroup fs)
    doc = config(2)
    doc["options"]["cgroup_root"] = str(root)
    _, out = run(doc, tmp_path, cache)
    assert out.exit_code == 0 and out.records[0].config["memory_limit"] == "cgroup"
    assert [p.name for p in root.iterdir() if p.is_dir()] == []


# ---------------------------------------------------------------------------------------------------
# Failures: OOM, crash, Ctrl-C -- through the real CLI, then look for anything left behind


def _ours(marker: str) -> list[int]:
    """Live processes whose command line holds `marker` (the supervisor and its forked devices)."""
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and int(d.name) != os.getpid():
            try:
                if marker in d.joinpath("cmdline").read_bytes().decode(errors="replace"):
                    pids.append(int(d.name))
            except OSError:
                pass
    return pids


def _schedules() -> set[str]:
    return {str(p) for p in Path("/dev/shm").glob("tpi-links-*")} if Path("/dev/shm").is_dir() else set()


def _leaked_schedules(before: set[str]) -> list[str]:
    """Schedule files created since `before` that no live process maps (i.e. left behind)."""
    mapped = set()
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                mapped |= {line.split()[-1] for line in d.joinpath("maps").read_text().splitlines()
                           if "tpi-links-" in line}
            except OSError:
                pass
    return sorted(p for p in _schedules() - before if p not in mapped)


def _cli(tmp_path, cache, doc, *args, **popen):
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(doc))
    cmd = [sys.executable, "-m", "emulator", "run", str(path), "--results", str(tmp_path / "results"),
           "--cache-dir", str(cache), *args]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def test_oom_is_recorded_and_nothing_is_left_running(tmp_path, cache):
    """The master holds the 32000 x 768 f32 LM head (94 MiB) on top of what a worker holds (one layer's
    share): a cap halfway between the two peaks of an uncapped run stops the master and only the master.
    (The cap is measured, not fixed: the interpreter + NumPy baseline differs between machines.)"""
    before = _schedules()
    doc = config(2, model={"synth": "small-100m", "layers": 1}, new_tokens=2)
    free = _cli(tmp_path / "free", cache, doc)
    _, err = free.communicate(timeout=120)
    assert free.returncode == 0, err
    (rec,) = read_jsonl(tmp_path / "free" / "results" / "t.jsonl")
    master, worker = rec["peak_rss_bytes"]["d0"], rec["peak_rss_bytes"]["d1"]
    assert master - worker > 60 * MiB  # the LM head (94 MiB) less what the master does not hold
    cap = (master + worker) // 2
    proc = _cli(tmp_path, cache, doc, "--mem-cap", f"{cap}B")
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err  # an OOM is a result, not a crash
    (rec,) = read_jsonl(tmp_path / "results" / "t.jsonl")
    assert [o["device"] for o in rec["oom"]] == ["d0"]
    assert rec["oom"][0]["cap_bytes"] == cap and rec["oom"][0]["rss_bytes"] > cap
    assert "d0 out of memory" in rec["error"] and rec["ttft_s"] is None
    assert "OOM: d0" in out
    assert _ours(str(tmp_path)) == []
    assert _leaked_schedules(before) == []


def _wait_ready(proc) -> None:
    """Read the supervisor's stderr until the devices are up."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if "devices ready" in line:
            return
        if not line and proc.poll() is not None:
            break
    raise AssertionError(f"devices never got ready (rc {proc.poll()})")


def test_ctrl_c_stops_everything(tmp_path, cache):
    before = _schedules()
    proc = _cli(tmp_path, cache, config(3, latency_ms=20, clock="wall", new_tokens=50))
    _wait_ready(proc)
    assert len(_ours(str(tmp_path))) == 4  # supervisor + 3 devices
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err
    assert "interrupted" in err
    assert _ours(str(tmp_path)) == []
    assert _leaked_schedules(before) == []
    assert not (tmp_path / "results" / "t.jsonl").exists()  # the interrupted run is not recorded


def test_device_crash_is_recorded_and_nothing_is_left_running(tmp_path, cache):
    proc = _cli(tmp_path, cache, config(3, latency_ms=20, clock="wall", new_tokens=50))
    _wait_ready(proc)
    children = [p for p in _ours(str(tmp_path)) if p != proc.pid]
    os.kill(max(children), signal.SIGKILL)  # the last device forked: d2
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 1, err
    (rec,) = read_jsonl(tmp_path / "results" / "t.jsonl")
    assert rec["oom"] == [] and "d2 exited with code -9" in rec["error"]
    assert "run 1:" in out
    assert _ours(str(tmp_path)) == []


# ---------------------------------------------------------------------------------------------------
# Bad configs


@pytest.mark.parametrize("key,value,message", [
    ("links.latency_ms", -5, "topology: links.latency_ms: must be >= 0, got -5.0"),
    ("links.bandwidth_mbps", 0, "topology: links.bandwidth_mbps: must be > 0"),
    ("links.per_device", {"d9": {"latency_ms": 1}}, "links.per_device.d9: unknown device 'd9'"),
    ("devices.count", 0, "devices.count: must be an integer >= 1, got 0"),
    ("workload.new_tokens", 0, "workload.new_tokens: must be an integer >= 1, got 0"),
    ("workload.prompt_lengths", [4, -1], "workload.prompt_lengths[1]: must be an integer >= 1, got -1"),
    ("workload.tokens", 3, "workload.tokens: unknown key"),
    ("options.clock", "sundial", "options.clock: expected one of virtual, wall, got 'sundial'"),
    ("options.window", 1, "options.window: must be an integer >= 2, got 1"),
    ("options.compute", "free", None),  # fine with the virtual clock
    ("options.mem_cap", "lots", "options.mem_cap: cannot parse 'lots'"),
    ("options.ratios", [1, 2, 3], "options.ratios: 3 values for 2 devices"),
    ("model.synth", "gpt-5", "model.synth: unknown preset 'gpt-5'"),
    ("stuff.x", 1, "unknown section 'stuff'"),
])
def test_bad_values_are_rejected_naming_the_field(key, value, message):
    doc = config(2)
    if message is None:
        load_run_config(None, [(key, value)], doc=doc)
        return
    with pytest.raises(TpiError) as e:
        load_run_config(None, [(key, value)], doc=doc)
    assert message in str(e.value)


def test_unknown_device_in_an_explicit_link_list():
    doc = config(2)
    doc["topology"] = {"devices": [{"name": "a", "cores": 1, "mem_bytes": "1GiB"},
                                   {"name": "b", "cores": 1, "mem_bytes": "1GiB"}],
                       "links": [{"src": "a", "dst": "c", "latency_ms": 1}]}
    with pytest.raises(TpiError, match=r"links\[0\]\.dst: unknown device 'c'"):
        load_run_config(None, doc=doc)


def test_cli_bad_config_names_file_and_field_and_writes_nothing(tmp_path, cache):
    doc = config(2)
    doc["topology"]["links"]["latency_ms"] = "-3ms"
    proc = _cli(tmp_path, cache, doc)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 2 and out == ""
    assert err.strip() == f"error: {tmp_path / 'exp.yaml'}: topology: links.latency_ms: must be >= 0, got -3.0"
    assert not (tmp_path / "results").exists()


def test_shipped_configs_load():
    cfg = load_run_config(ROOT / "configs" / "emulate.yaml", [("devices.count", 4), ("links.latency_ms", "5ms")])
    assert cfg.world_size == 4 and cfg.topology.links["d0>gw:d0"].latency_ms == 5.0
    assert cfg.model.synth and cfg.options.window is None
