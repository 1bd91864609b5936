"""Resident GGUF weights kept quantized: the chunked dequantize+GEMV against dequantize-at-load and the window."""

from __future__ import annotations

import numpy as np
import pytest

from tpicore.model.llama import linear
from tpicore.runtime.device import Device, ResidentSource
from tpicore.runtime.generate import generate
from tpicore.runtime.session import make_source
from tpicore.tools.gguf_synth import quantize
from tpicore.tools.synth import presets
from tpicore.tools.synth.gguf import write_synthetic_gguf
from tpicore.weights.packed import CHUNK_ALIGN, QuantMatrix
from tpicore.weights.quant import dequantize
from tpicore.weights.store import TensorStore

CONFIG = presets.llama_config(hidden=256, layers=2, heads=4, kv_heads=2, ffn=512, vocab=1000, max_pos=256)
PROMPT = [1, 17, 42, 99, 5, 130, 64, 23, 8]
NEW = 8


@pytest.mark.parametrize("tag", ["Q8_0", "Q4_K", "Q6_K", "Q5_1"])
@pytest.mark.parametrize("T", [1, 3, 40])
def test_chunked_gemv_equals_dequantize_then_gemv(tag, T):
    rng = np.random.default_rng(0)
    rows = 3 * CHUNK_ALIGN * 37 + 5  # several chunks and a ragged end
    W = rng.standard_normal((rows, 1024)).astype(np.float32) * 0.05
    x = rng.standard_normal((T, 1024)).astype(np.float32)
    m = QuantMatrix(quantize(W, tag), tag, 1024)
    m.chunk_rows = 2 * CHUNK_ALIGN  # force many chunks
    ref = linear(x, dequantize(m.raw, tag))
    ours = linear(x, m)
    assert np.abs(ours - ref).max() <= 1e-5
    assert np.array_equal(linear(x, m[7:300]), linear(x, dequantize(m.raw[7:300], tag))) or T > 16


def run(path: str, source: str):
    store = TensorStore.from_model_dir(path)
    src = {"fused": lambda: ResidentSource(store), "at_load": lambda: ResidentSource(store, True),
           "window": lambda: make_source(store, 2),
           "window_at_load": lambda: make_source(store, 2, dequantize_at_load=True)}[source]()
    dev = Device(store, src, len(PROMPT) + NEW)
    try:
        gen = generate(dev.step, PROMPT, NEW, max_seq=len(PROMPT) + NEW, keep_logits=True)
        held = sum(w.nbytes for block in src.cache.values() for w in block.values()) if "window" not in source else 0
        return gen, held
    finally:
        dev.close()


@pytest.mark.parametrize("dtype", ["q8_0", "q4_k"])
def test_resident_kept_quantized_matches_dequantize_at_load(tmp_path, dtype):
    path = str(write_synthetic_gguf(dict(CONFIG), tmp_path / "m.gguf", dtype)[0])
    fused, fused_bytes = run(path, "fused")
    at_load, f32_bytes = run(path, "at_load")
    window, _ = run(path, "window")  # kept quantized in the slabs: the resident path's fused kernels
    window_at_load, _ = run(path, "window_at_load")  # dequantized by the loader into float32 slabs
    assert fused.tokens == at_load.tokens == window.tokens == window_at_load.tokens
    assert np.abs(np.stack(fused.logits) - np.stack(at_load.logits)).max() <= 1e-4
    assert np.array_equal(np.stack(at_load.logits), np.stack(window_at_load.logits))
    assert np.array_equal(np.stack(fused.logits), np.stack(window.logits))
    assert fused_bytes < f32_bytes / 3  # 8.5 or 4.5 bits per weight instead of 32
