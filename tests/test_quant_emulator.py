"""The emulator with quantized weights: model.dtype takes every ggml type, model.path a GGUF, and the
window's loader charges dequantization on its virtual timeline."""

from __future__ import annotations

import numpy as np
import pytest

from emulator.config.run_config import load_run_config
from emulator.net.clock import VirtualClock
from emulator.run.model_cache import model_config_json, resolve_model, unique_bytes
from tpicore.errors import TpiError
from tpicore.runtime.device import Device
from tpicore.runtime.env import DeviceEnv, DiskModel
from tpicore.runtime.generate import generate
from tpicore.runtime.window import WindowSource
from tpicore.tools.synth import presets
from tpicore.tools.synth.gguf import write_synthetic_gguf
from tpicore.weights.store import TensorStore

CONFIG = presets.llama_config(hidden=256, layers=2, heads=4, kv_heads=2, ffn=512, vocab=160, max_pos=256)


def doc(model: dict) -> dict:
    return {"name": "t", "topology": {"devices": {"count": 2, "template": {"cores": 1, "mem_bytes": "8GiB"}},
                                      "links": {"shape": "star", "latency_ms": 1, "bandwidth_mbps": 100}},
            "model": model, "workload": {"prompt_lengths": [4], "new_tokens": 2, "repetitions": 1},
            "options": {"clock": "virtual"}}


@pytest.mark.parametrize("dtype", ["q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q4_k", "q5_k", "q6_k", "bf16"])
def test_model_dtype_takes_every_supported_type(dtype):
    cfg = load_run_config(None, [("model", {"synth": "llama-2-13b", "unique_layers": 1, "dtype": dtype})],
                          doc=doc({"synth": "tiny"}))
    assert cfg.model.dtype == dtype
    f32 = unique_bytes(load_run_config(None, doc=doc({"synth": "llama-2-13b", "unique_layers": 1})).model)
    assert unique_bytes(cfg.model) < f32


def test_unknown_dtype_and_bad_path_are_one_error(tmp_path):
    with pytest.raises(TpiError, match="dtype"):
        load_run_config(None, doc=doc({"synth": "tiny", "dtype": "q3_k"}))
    cfg = load_run_config(None, doc=doc({"path": str(tmp_path / "missing.gguf")}))
    with pytest.raises(TpiError, match="GGUF file not found"):
        resolve_model(cfg.model, tmp_path)


def test_model_path_takes_a_gguf(tmp_path):
    path = str(write_synthetic_gguf(dict(CONFIG), tmp_path / "m.gguf", "q4_k")[0])
    cfg = load_run_config(None, doc=doc({"path": path}))
    assert resolve_model(cfg.model, tmp_path / "cache") == path
    assert model_config_json(path)["hidden_size"] == 256


def test_window_charges_dequantization_on_the_loader_timeline(tmp_path):
    """--dequantize-at-load: the loader dequantizes into float32 slabs, and that CPU is charged on its timeline."""
    path = str(write_synthetic_gguf(dict(CONFIG), tmp_path / "m.gguf", "q4_k")[0])
    store = TensorStore.from_model_dir(path)
    disk = DiskModel(read_mbps=8000.0)
    clock = VirtualClock(2.0)
    src = WindowSource(store, 2, env=DeviceEnv(clock=clock, disk=disk), dequantize_at_load=True)
    dev = Device(store, src, 12, clock=clock)
    try:
        generate(dev.step, [1, 2, 3], 3, max_seq=12)
        t = dev.timers
        assert src.reader.dequant_cpu_s > 0
        charged = t.load_s - disk.floor_s(t.loaded_bytes)  # on top of the modelled disk: dequantization CPU / speed
        # (the loader may have dequantized a block ahead that is not booked yet)
        assert 0.5 * src.reader.dequant_cpu_s / 2.0 < charged <= src.reader.dequant_cpu_s / 2.0 + 1e-9
    finally:
        dev.close()


def test_kept_quantized_window_reads_blocks_and_dequantizes_on_the_compute_thread(tmp_path):
    """The default: slabs hold the stored blocks (a fraction of float32), the loader only reads, and the fused
    kernels' time is compute on the device's clock."""
    path = str(write_synthetic_gguf(dict(CONFIG), tmp_path / "m.gguf", "q4_k")[0])
    store = TensorStore.from_model_dir(path)
    disk = DiskModel(read_mbps=8000.0)
    clock = VirtualClock(2.0)
    src = WindowSource(store, 2, env=DeviceEnv(clock=clock, disk=disk))
    dev = Device(store, src, 12, clock=clock)
    try:
        generate(dev.step, [1, 2, 3], 3, max_seq=12)
        assert src.reader.dequant_cpu_s == 0 and dev.timers.compute_s > 0
        f32_elems = max(sum(int(np.prod(r.shape)) for r in plan.reads) for plan in src.plans.values())
        assert 0 < dev.timers.window.slab_bytes < 4 * f32_elems  # two slabs of blocks fit in one block's float32
    finally:
        dev.close()
