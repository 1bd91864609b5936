"""The six modes of emulator/baselines.py on the same model give the same greedy tokens; the offload
source (tpicore/offload.py) gives the resident path's logits bit for bit and charges its reads to the
clock; modes fix what they name; resident memory of unique-layer models is extrapolated."""

from __future__ import annotations

import numpy as np
import pytest

from emulator.config.run_config import MODES, ModelSpec, load_run_config
from emulator.net.clock import VirtualClock
from emulator.run.baselines import resident_extra_bytes
from emulator.run.launcher import Run
from emulator.run.model_cache import unique_shards
from tpicore.errors import TpiError
from tpicore.runtime.device import Device, ResidentSource
from tpicore.runtime.env import DeviceEnv, DiskModel
from tpicore.runtime.generate import generate
from tpicore.runtime.ondemand import OnDemandSource
from tpicore.weights.store import TensorStore

MiB = 2**20


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("baselines-cache")


def config(mode: str, n: int = 2, model: dict | None = None, **options) -> dict:
    return {
        "name": "b",
        "topology": {"devices": {"count": n, "template": {"cores": 1, "mem_bytes": "8GiB", "disk_read_mbps": "1GB/s"}},
                     "links": {"shape": "klonet", "latency_ms": 1, "bandwidth_mbps": 300}},
        "model": model or {"synth": "tiny"},
        "workload": {"prompt_lengths": [5], "new_tokens": 5, "repetitions": 1},
        "options": {"mode": mode, "window": 2, **options},
    }


def run(doc, tmp_path, cache):
    cfg = load_run_config(None, doc=doc)
    out = Run(cfg, results_dir=tmp_path, cache_dir=cache, progress=False).run()
    assert out.exit_code == 0, out.summary
    (rec,) = [r.to_json() for r in out.records]
    assert rec["error"] is None, rec["error"]
    return cfg, rec


@pytest.mark.parametrize("model", [{"synth": "tiny"}, {"synth": "tiny", "unique_layers": 2}], ids=["tiny", "unique"])
def test_every_mode_gives_the_tokens_of_tpi(tmp_path, cache, model):
    recs = {mode: run(config(mode, n=3, model=model), tmp_path, cache)[1] for mode in MODES}
    tokens = recs["tpi"]["tokens"]
    assert len(tokens) == 5
    for mode, rec in recs.items():
        assert rec["tokens"] == tokens, mode
        assert rec["mode"] == mode
        devices = list(rec["time_split"])
        assert devices == (["d0"] if mode in ("standalone", "offload", "standalone+ms") else ["d0", "d1", "d2"])
        assert all(s["compute_s"] > 0 for s in rec["time_split"].values()), mode
        assert set(rec["peak_mem_bytes"]) == set(devices) and all(v > 10 * MiB for v in rec["peak_mem_bytes"].values())
        assert rec["ttft_s"] > 0 and len(rec["token_latencies_s"]) == 4
    # who reads weights during a run, and who talks
    assert recs["offload"]["time_split"]["d0"]["stalls"] == recs["offload"]["time_split"]["d0"]["loads"] > 0
    assert recs["standalone+ms"]["time_split"]["d0"]["loads"] > 0 and "d0" in recs["standalone+ms"]["window"]
    assert recs["standalone"]["time_split"]["d0"]["loads"] == 0 and recs["standalone"]["time_split"]["d0"]["comm_s"] == 0
    assert all(s["comm_s"] > 0 for s in recs["pipeline"]["time_split"].values())  # waiting for the stage before
    assert recs["galaxy"]["config"]["options"]["allreduce"] == "ring"


def test_pipeline_trace_and_reports_between_runs(tmp_path, cache):
    doc = config("pipeline", n=3, trace=True)
    doc["workload"].update(prompt_lengths=[4, 6], repetitions=1)
    cfg = load_run_config(None, doc=doc)
    out = Run(cfg, results_dir=tmp_path, cache_dir=cache, progress=False).run()
    assert out.exit_code == 0
    first, second = [r.to_json() for r in out.records]
    for rec in (first, second):  # each run's share only: 5 steps (prefill + 4 decode)
        assert set(rec["trace"]) == {"d0", "d1", "d2"}
        for dev, events in rec["trace"].items():  # one layer per stage: attn + ffn per step, + the head on d0
            assert sum(1 for e in events if e[1] == "compute") == 5 * (3 if dev == "d0" else 2)
    assert first["trace"]["d1"][0][2] < second["trace"]["d1"][0][2]  # later events, not the same ones again


def test_modes_fix_what_they_name():
    cfg = load_run_config(None, doc=config("galaxy", allreduce="star"))
    assert (cfg.options.allreduce, cfg.options.window, cfg.world_size) == ("ring", None, 2)
    cfg = load_run_config(None, doc=config("standalone+ms", n=4, window=None, ratios=[1, 2, 3, 4]))
    assert (cfg.options.window, cfg.world_size, cfg.ratios()) == (2, 1, None)
    assert [d.name for d in cfg.topology.devices] == ["d0"] and cfg.doc["topology"]["devices"]["count"] == 4
    for mode in ("standalone", "offload", "pipeline"):
        assert load_run_config(None, doc=config(mode, retain_every=2)).options.window is None
    cfg = load_run_config(None, doc=config("tpi", window=None))
    assert (cfg.options.window, cfg.options.allreduce) == (None, "star")
    with pytest.raises(TpiError, match="options.mode: expected one of tpi, galaxy"):
        load_run_config(None, doc=config("accelerate"))
    with pytest.raises(TpiError, match="model.unique_layers: 4 is more than the model's 3 layers"):
        load_run_config(None, doc=config("tpi", model={"synth": "tiny", "unique_layers": 4}))


# ---------------------------------------------------------------------------------------------------
# tpicore.offload.OnDemandSource


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_on_demand_logits_are_bit_identical_to_resident(hf_models, dtype):
    model_dir, _ = hf_models("gqa", dtype)
    store = TensorStore.from_model_dir(model_dir)
    prompt = [1, 5, 7, 9, 11]
    ref = generate(Device(store, ResidentSource(store), 16).step, prompt, 6, max_seq=16, keep_logits=True)
    src = OnDemandSource(store)
    dev = Device(store, src, 16)
    src.attach(dev.timers)  # idempotent where Device already attached it
    got = generate(dev.step, prompt, 6, max_seq=16, keep_logits=True)
    assert got.tokens == ref.tokens
    assert np.array_equal(np.stack(got.logits), np.stack(ref.logits))
    assert src._held == {}  # every block freed after use
    L = store.cfg.num_hidden_layers
    assert dev.timers.loads == 6 * (2 * L + 1)  # every step reads every block again (+ the head)
    dev.close()


def test_on_demand_charges_the_modelled_disk_to_a_virtual_clock(hf_models):
    model_dir, _ = hf_models("gqa")
    store = TensorStore.from_model_dir(model_dir)
    clock = VirtualClock(cpu_time=lambda: 0.0)  # compute costs nothing: the clock moves by loads only
    src = OnDemandSource(store, DeviceEnv(clock=clock, disk=DiskModel(8.0)))  # 1 MB/s
    dev = Device(store, src, 16, clock=clock)
    src.attach(dev.timers)
    dev.step(np.array([1, 2, 3]), 0)
    t = dev.timers
    assert t.loaded_bytes > 0
    assert clock.now() == pytest.approx(t.loaded_bytes / 1e6, rel=1e-12)
    assert t.load_s == pytest.approx(t.loaded_bytes / 1e6) and t.stall_s == pytest.approx(t.load_s)
    assert t.stalls == t.loads
    with pytest.raises(TpiError, match="disk_read_mbps: must be > 0"):
        OnDemandSource(store, DeviceEnv(disk=DiskModel(0)))


# ---------------------------------------------------------------------------------------------------
# Memory of unique-layer models


def test_resident_extra_bytes_counts_the_repeated_layers(cache):
    spec = {"synth": "tiny", "unique_layers": 1}
    dirs = unique_shards(ModelSpec(**spec), 2, None, cache)
    store = TensorStore.from_shard_dir(dirs[1])
    per_layer = sum(store.ckpt.info(n).nbytes for b in (("attn", 0), ("ffn", 0)) for n in store.leaves(b).values())
    L = store.cfg.num_hidden_layers
    cfg = load_run_config(None, doc=config("tpi", model=spec, window=None))
    assert resident_extra_bytes(cfg, dirs)[1] == (L - 1) * per_layer
    assert resident_extra_bytes(load_run_config(None, doc=config("tpi", model=spec)), dirs) == [0, 0]  # window
    assert resident_extra_bytes(load_run_config(None, doc=config("tpi", window=None)), dirs) == [0, 0]  # no repeats


def test_derived_layer_count_runs_like_a_written_one(tmp_path, cache):
    """Tables 2/6 link a truncated-layer folder to the full one (same tensors, new manifest)."""
    full = run(config("tpi", model={"synth": "tiny", "unique_layers": 1}), tmp_path, cache)[1]
    part = run(config("tpi", model={"synth": "tiny", "layers": 2, "unique_layers": 1}), tmp_path, cache)[1]
    fresh = run(config("tpi", model={"synth": "tiny", "layers": 2, "unique_layers": 1}), tmp_path,
                tmp_path / "fresh-cache")[1]
    assert part["tokens"] == fresh["tokens"]
    assert part["config"]["model"]["config"]["num_hidden_layers"] == 2 and full["tokens"]
