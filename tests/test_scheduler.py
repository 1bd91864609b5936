"""The sliding-window scheduler: output identical to all-resident weights (1, 2 and 4 devices, windows
2-4, with retention), bounded peak RSS measured in a subprocess, honest stall accounting with a slow and
a fast disk, the trace, and clear errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from tpicore.errors import TpiError
from tpicore.runtime.device import Device, ResidentSource
from tpicore.runtime.env import DeviceEnv, DiskModel
from tpicore.runtime.generate import generate
from tpicore.runtime.window import WindowSource
from tpicore.runtime.window_model import retained_layers
from tpicore.weights.reader import READ_BYTES
from tpicore.weights.store import TensorStore, head_row_ranges

PROMPT = [1, 17, 42, 99, 5, 130, 64]
VOCAB = 1000  # several LM-head chunks on the tiny models (hidden 48): the streamed head is exercised


def run_device(model_dir: str, source_fn, n_new: int = 8, allreduce=None, prompt: list[int] = PROMPT):
    store = TensorStore.from_model_dir(model_dir)
    store.check()
    source = source_fn(store)
    dev = Device(store, source, 64, **({"allreduce": allreduce} if allreduce else {}))
    try:
        gen = generate(dev.step, prompt, n_new, max_seq=64, keep_logits=True)
    finally:
        dev.close()
    return gen, dev


def assert_same(a, b):
    assert a.tokens == b.tokens
    assert len(a.logits) == len(b.logits)
    for x, y in zip(a.logits, b.logits):
        assert np.array_equal(x, y)  # bit-identical, not merely close


# ---------------------------------------------------------------------------------------------
# Identity with the resident path


@pytest.mark.parametrize("variant,dtype,window,retain", [
    ("gqa", "float32", 2, 0), ("gqa", "float32", 3, 0), ("gqa", "float32", 4, 0),
    ("gqa", "bfloat16", 2, 0), ("gqa", "float16", 3, 2), ("gqa", "float32", 2, 1),
    ("tied", "bfloat16", 2, 2), ("bias", "float32", 4, 1),
])
def test_window_equals_resident_one_device(hf_models, variant, dtype, window, retain):
    model_dir, _ = hf_models(variant, dtype, vocab_size=VOCAB)
    ref, _ = run_device(model_dir, ResidentSource)
    got, dev = run_device(model_dir, lambda s: WindowSource(s, window=window, retain_every=retain))
    assert_same(ref, got)
    t = dev.timers
    assert len(head_row_ranges(dev.store)) > 1  # the head really was streamed in chunks
    L = dev.cfg.num_hidden_layers
    kept = len(retained_layers(L, retain))
    steps = len(got.tokens)  # prefill + decodes; the loader may have run ahead into one more step
    chunks = len(head_row_ranges(dev.store))
    assert t.loads >= steps * (2 * L - kept + chunks) + kept
    assert t.window.slab_bytes > 0 and (t.window.retained_bytes > 0) == (retain > 0)


def test_sharded_checkpoint_and_window_edge_cases(hf_models):
    """A multi-file checkpoint, a window as big as the whole step, and a prompt long enough for the
    GEMM form of `linear` (> 16 rows) behave the same."""
    model_dir, _ = hf_models("llama3", "bfloat16", True, vocab_size=VOCAB)
    long_prompt = [(7 * i + 3) % VOCAB for i in range(20)]
    for prompt in (PROMPT, long_prompt):
        ref, _ = run_device(model_dir, ResidentSource, n_new=4, prompt=prompt)
        for window in (2, 64):
            got, _ = run_device(model_dir, lambda s: WindowSource(s, window=window), n_new=4, prompt=prompt)
            assert_same(ref, got)


@pytest.mark.parametrize("n", [2, 4])
def test_window_equals_resident_parallel(hf_models, tmp_path, monkeypatch, n):
    from tpicore.dist.session import run_local

    monkeypatch.setenv("TPI_CACHE_DIR", str(tmp_path))
    model_dir, _ = hf_models("gqa", "bfloat16", vocab_size=VOCAB)
    ref, _ = run_local(n, PROMPT, 6, model=model_dir, keep_logits=True)
    for window, retain in ((2, 0), (3, 1), (4, 2)):
        got, report = run_local(n, PROMPT, 6, model=model_dir, window=window, retain_every=retain, keep_logits=True)
        assert_same(ref, got)
        assert all(r["loads"] > 0 for r in report["per_rank"]), report["per_rank"]


# ---------------------------------------------------------------------------------------------
# Memory: measured in a fresh process, so the peak belongs to one configuration only

MEASURE = textwrap.dedent("""
    import json, sys
    from tpicore.runtime.device import Device, ResidentSource
    from tpicore.runtime.generate import generate
    from tpicore.runtime.memory import memory_report
    from tpicore.runtime.window import WindowSource
    from tpicore.weights.store import TensorStore
    model_dir, window = sys.argv[1], int(sys.argv[2])
    store = TensorStore.from_model_dir(model_dir)
    source = WindowSource(store, window=window) if window else ResidentSource(store)
    dev = Device(store, source, 16)
    gen = generate(dev.step, [1, 5, 9], 2, max_seq=16)
    files = sorted({i.path for i in store.ckpt.tensors.values()})
    report = memory_report(files)
    dev.close()
    print(json.dumps({"tokens": gen.tokens, **report}))
""")


def measure(model_dir: str, window: int) -> dict:
    out = subprocess.run([sys.executable, "-c", MEASURE, model_dir, str(window)], capture_output=True, text=True,
                         timeout=120, env={**os.environ, "OPENBLAS_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def drop_page_cache(model_dir: str) -> None:
    for name in os.listdir(model_dir):
        if name.endswith(".safetensors"):
            fd = os.open(os.path.join(model_dir, name), os.O_RDONLY)
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)


@pytest.fixture(scope="module")
def mid_model(tmp_path_factory):
    """8 layers of hidden 1024 (bf16 on disk, ~0.2 GB; 0.4 GB as float32 in memory)."""
    from tpicore.tools.synth.checkpoint import write_checkpoint
    from tpicore.tools.synth.presets import llama_config

    cfg = llama_config(hidden=1024, layers=8, heads=8, kv_heads=8, ffn=2816, vocab=512, max_pos=64)
    out = tmp_path_factory.mktemp("mid") / "m"
    write_checkpoint(cfg, out, dtype="bf16", seed=0, progress=False)
    yield str(out)
    for name in os.listdir(out):
        os.remove(os.path.join(out, name))


def test_window_peak_rss_is_bounded(mid_model):
    drop_page_cache(mid_model)
    win = measure(mid_model, 2)
    res = measure(mid_model, 0)
    assert win["tokens"] == res["tokens"]
    weights = sum(os.path.getsize(os.path.join(mid_model, f)) for f in os.listdir(mid_model)
                  if f.endswith(".safetensors")) * 2  # bf16 -> float32
    # resident holds every layer as float32; window 2 holds one Attn + one FFN block (~50 MB of ~400)
    assert res["peak_rss_bytes"] > 0.8 * weights
    assert win["peak_rss_bytes"] < 0.4 * res["peak_rss_bytes"], (win, res)
    # reads go to anonymous memory and the page cache is dropped behind them: RSS tells the truth. What
    # stays cached is the read in flight plus the kernel's readahead, whatever the model's size
    assert win["page_cache_bytes"] < 3 * READ_BYTES, win


# ---------------------------------------------------------------------------------------------
# Stall accounting


def slow_allreduce(seconds: float):
    """An allreduce that takes `seconds` (a network's latency): time the loader can hide behind."""
    import time

    def ar(x):
        time.sleep(seconds)
        return x

    return ar


def test_slow_disk_stalls_are_reported(hf_models):
    model_dir, _ = hf_models("gqa", "float32", vocab_size=VOCAB)
    gen, dev = run_device(model_dir, lambda s: WindowSource(s, window=2, env=DeviceEnv(disk=DiskModel(extra_s=0.01))), n_new=3,
                          allreduce=slow_allreduce(0.002))
    t, w = dev.timers, dev.timers.window
    blocks_per_step = 2 * dev.cfg.num_hidden_layers + len(head_row_ranges(dev.store))
    assert t.stalls >= 2 * blocks_per_step  # every block of the steady steps waits
    assert t.stall_s > 0.5 * 0.008 * 2 * blocks_per_step
    assert w.first_steady_stall.step == 1
    assert w.steady["tight"] is False and w.steady["failed"]
    assert w.steady["measured"]["tau_ffn"] >= 0.01
    assert all(s.stall_share > 0.3 for s in w.steps[1:])


def test_fast_disk_stalls_are_near_zero(hf_models):
    """Loads that fit behind compute + allreduce leave only thread hand-offs (and the head chunks, which
    have no allreduce to hide behind) as waiting time: a small share of each step."""
    model_dir, _ = hf_models("gqa", "float32", vocab_size=VOCAB)
    gen, dev = run_device(model_dir, lambda s: WindowSource(s, window=2), n_new=4, allreduce=slow_allreduce(0.005))
    w = dev.timers.window
    steady = w.steps[1:]
    assert len(steady) == 3
    assert sum(s.stall_s for s in steady) < 0.1 * sum(s.wall_s for s in steady), steady
    assert w.steady["tight"] and w.steady["loose"], w.steady


def test_trace_shows_loads_beside_compute(hf_models, tmp_path):
    from tpicore.runtime.session import write_trace

    model_dir, _ = hf_models("gqa", "float32", vocab_size=VOCAB)
    store = TensorStore.from_model_dir(model_dir)
    source = WindowSource(store, window=3)
    dev = Device(store, source, 64, allreduce=slow_allreduce(0.001))
    dev.timers.trace = True
    source.attach(dev.timers)
    generate(dev.step, PROMPT, 3, max_seq=64)
    dev.close()
    path = tmp_path / "trace.json"
    write_trace(str(path), {0: dev.timers.events}, dev.timers.events[0][2])
    events = json.loads(path.read_text())["traceEvents"]
    loads = [e for e in events if e.get("cat") == "load"]
    busy = [e for e in events if e.get("cat") in ("compute", "comm")]
    assert loads and busy
    assert {e["tid"] for e in loads} == {1} and {e["tid"] for e in busy} == {0}
    overlapped = sum(1 for a in loads for b in busy
                     if a["ts"] < b["ts"] + b["dur"] and b["ts"] < a["ts"] + a["dur"])
    assert overlapped > 0  # loading ran while the device computed or communicated


# ---------------------------------------------------------------------------------------------
# Errors


def test_bad_window_and_order_are_refused(hf_models):
    model_dir, _ = hf_models("gqa", "float32", vocab_size=VOCAB)
    store = TensorStore.from_model_dir(model_dir)
    with pytest.raises(TpiError, match="--window: expected an integer >= 2, got 1"):
        WindowSource(store, window=1)
    with pytest.raises(TpiError, match="--retain-every"):
        WindowSource(store, window=2, retain_every=-1)
    src = WindowSource(store, window=2)
    try:
        with pytest.raises(TpiError, match="asked for block ffn0 but attn0 is next"):
            src.acquire(("ffn", 0))
    finally:
        src.close()
        src.close()  # idempotent


def test_loader_error_reaches_the_compute_side(hf_models, tmp_path):
    import shutil

    src_dir, _ = hf_models("gqa", "float32", vocab_size=VOCAB)
    model_dir = tmp_path / "m"
    shutil.copytree(src_dir, model_dir)
    store = TensorStore.from_model_dir(str(model_dir))
    path = store.ckpt.info("model.layers.0.self_attn.q_proj.weight").path
    with open(path, "r+b") as f:  # cut the file after the headers were read
        f.truncate(store.ckpt.info("model.layers.0.self_attn.q_proj.weight").offset + 8)
    src = WindowSource(store, window=2)
    dev = Device(store, src, 16)
    with pytest.raises(TpiError, match="unexpected end of file"):
        dev.step(np.array([1, 2]), 0)
    dev.close()


class StubVirtualClock:
    """A virtual clock on which compute costs nothing: the device's time is then all waiting for loads."""

    virtual = True
    speed = 1.0  # CPU seconds count one for one (the loader's dequantizing, none here)

    def __init__(self) -> None:
        self.t = 0.0

    def now(self) -> float:
        return self.t

    def begin_compute(self, work=None) -> None:
        pass

    def end_compute(self) -> None:
        pass

    def cost_s(self, cpu_s: float, work) -> float:
        return 0.0  # compute (the loader's widening too) costs nothing

    def advance_to(self, t: float) -> None:
        self.t = max(self.t, t)

    def advance(self, dt: float) -> None:
        self.t += dt


def test_virtual_clock_charges_modelled_loads(hf_models):
    """On a virtual clock with a modelled disk, a device that computes for free spends exactly the
    modelled read time of every block it used, as stalls on its own clock (the host's speed is irrelevant)."""
    model_dir, _ = hf_models("gqa", "bfloat16", vocab_size=VOCAB)
    clock = StubVirtualClock()
    mbps = 80.0  # 10 MB/s
    store = TensorStore.from_model_dir(model_dir)
    src = WindowSource(store, window=2, env=DeviceEnv(clock=clock, disk=DiskModel(mbps)))
    dev = Device(store, src, 64, clock=clock)
    src.attach(dev.timers)
    generate(dev.step, PROMPT, 3, max_seq=64)
    dev.close()
    used = sum(store.block_nbytes(b) for b in src.order) * 3  # three steps of every block
    assert clock.now() == pytest.approx(used / (mbps * 1e6 / 8), rel=1e-9)
    table = store.ckpt.info("model.embed_tokens.weight")  # the embedding rows are read (and charged) too:
    rows_s = (len(PROMPT) + 2) * (table.nbytes // table.shape[0]) / (mbps * 1e6 / 8)  # waited for, not a stall
    assert dev.timers.stall_s + rows_s == pytest.approx(clock.now(), rel=1e-9)
    with pytest.raises(TpiError, match="disk_read_mbps"):
        WindowSource(store, window=2, env=DeviceEnv(disk=DiskModel(read_mbps=0)))


def test_synth_unique_layers_cli_says_outputs_are_meaningless(tmp_path):
    import json
    import subprocess
    import sys

    from tpicore.cli import main

    out = tmp_path / "u"
    assert main(["synth", "tiny", "--layers", "3", "--devices", "2", "--unique-layers", "1", "--out", str(out),
                 "--quiet"]) == 0
    man = json.loads((out / "rank-1" / "manifest.json").read_text())
    assert man["layer_map"] == [0, 0, 0] and man["world_size"] == 2
    r = subprocess.run([sys.executable, "-m", "tpicore", "generate", "--shards", str(out), "--devices", "2",
                        "--window", "2", "--prompt-ids", "1,2", "--max-new-tokens", "2", "--json"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "meaningless" in r.stderr and len(json.loads(r.stdout)["tokens"]) == 2
