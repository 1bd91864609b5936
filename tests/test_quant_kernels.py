"""The compiled ggml kernels (tpicore.weights.kernels): exact dequantizers bit-equal to the gguf package's,
the NumPy reference kernels likewise, and the fused dequantize+GEMV close to a GEMV over the dequantized
weights."""

from __future__ import annotations

import gguf
import numpy as np
import pytest

from tpicore.tools.gguf_synth import quantize
from tpicore.weights import kernels
from tpicore.weights.packed import FUSED_TOKENS, QuantMatrix
from tpicore.weights.quant import GGML_TYPES, KERNELS, dequantize


def blocks(tag: str, rows: int = 13, cols: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Quantized data (rows of varied scale) and random bytes (NaN/inf scales included) of type `tag`."""
    rng = np.random.default_rng(7)
    t = GGML_TYPES[tag]
    valid = quantize((rng.standard_normal((rows, cols)) * 10.0 ** rng.uniform(-3, 2, (rows, 1))).astype(np.float32), tag)
    noise = rng.integers(0, 256, size=(rows, 4 * t.block_bytes), dtype=np.uint8)
    return valid, noise


@pytest.mark.parametrize("tag", kernels.DEQUANT_TAGS)
def test_compiled_dequantizers_are_bit_equal_to_ggufs(tag):
    t = GGML_TYPES[tag]
    with np.errstate(invalid="ignore", over="ignore"):
        for raw in blocks(tag):
            ref = gguf.quants.dequantize(raw, t.ggml)
            out = np.empty_like(ref)
            b = raw.reshape(-1, t.block_bytes)
            kernels.dequant(tag, b, out.reshape(b.shape[0], t.block_elems))
            assert np.array_equal(out, ref, equal_nan=True)


@pytest.mark.parametrize("tag", sorted(KERNELS))
def test_numpy_reference_dequantizers_are_bit_equal_to_ggufs(tag):
    with np.errstate(invalid="ignore", over="ignore"):
        for raw in blocks(tag):
            ref = gguf.quants.dequantize(raw, GGML_TYPES[tag].ggml)
            assert np.array_equal(dequantize(raw, tag, reference=True), ref, equal_nan=True)


@pytest.mark.parametrize("tag", kernels.GEMV_TAGS)
@pytest.mark.parametrize("T", [1, 2, 3])
def test_fused_gemv_is_a_gemv_over_the_dequantized_weights(tag, T):
    """Same weights, another summation order: within 1e-5 of sum |w x| per output, whatever the row count
    (4-row kernels with a ragged end) or token count."""
    raw = blocks(tag, rows=4 * 9 + 3)[0]
    W = dequantize(raw, tag)  # [rows, cols]
    x = np.random.default_rng(T).standard_normal((T, W.shape[1])).astype(np.float32)
    ref = x.astype(np.float64) @ W.T.astype(np.float64)  # [T, rows]
    bound = 1e-5 * (np.abs(x).astype(np.float64) @ np.abs(W).T.astype(np.float64))
    ours = kernels.gemv(tag, raw, x)
    assert ours.shape == ref.shape and ours.dtype == np.float32
    assert np.all(np.abs(ours - ref) <= bound)
    m = QuantMatrix(raw, tag, W.shape[1], fused=True)
    assert np.array_equal(m.linear(x), ours) == (T <= FUSED_TOKENS)  # longer prompts: chunks + BLAS GEMM
    assert np.all(np.abs(m.linear(x) - ref) <= bound)
    assert np.array_equal(m[5:20].linear(x[:1]), ours[:1, 5:20])  # a row range multiplies alike
