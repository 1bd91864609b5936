"""Quantized weights kept quantized in memory: a ggml-block matrix whose GEMV dequantizes row chunks.

Layer: weights (imports tpicore.weights.{checkpoint,quant,reader} and tpicore.errors). Owns `QuantMatrix`,
what the resident path holds for a block-quantized (GGUF) weight unless `--dequantize-at-load`: the
stored bytes (uint8 [rows, row_bytes], 4-7x smaller than float32), and `linear(x)` = x @ W.T computed
one cache-sized chunk of rows at a time: the chunk is dequantized (quant.dequantize, bit-equal to the
gguf package) into a reused float32 buffer of about CHUNK_BYTES, then multiplied while it is in cache.
tpicore.model.llama.linear calls it for any weight that is not an ndarray. Must not read files or know
tensor names.

Numerics: each output is the same BLAS dot product over the same float32 weights as the dequantize-then-
GEMV path. Chunks are whole multiples of CHUNK_ALIGN rows, so OpenBLAS's GEMV kernel groups rows alike in
both (tests/test_quant_resident.py checks bit-equal logits on the test models; BLAS does not promise it,
and max |dlogits| <= 1e-4 is the bound the tests hold either way).
"""

from __future__ import annotations

import numpy as np

from tpicore.weights.checkpoint import TensorInfo
from tpicore.weights.quant import GGML_TYPES, dequantize, is_block_quantized
from tpicore.weights.reader import read_raw

CHUNK_BYTES = 1 << 20  # float32 bytes of one dequantized row chunk (~L2-sized)
CHUNK_ALIGN = 16  # rows per chunk are a multiple of this


class QuantMatrix:
    """A block-quantized [rows, cols] weight held as its stored bytes; `linear` dequantizes as it goes."""

    def __init__(self, raw: np.ndarray, dtype: str, cols: int) -> None:
        self.raw, self.dtype = raw, dtype  # uint8 [rows, row_bytes]
        self.shape = (raw.shape[0], cols)
        self.nbytes = raw.nbytes
        rows = max(CHUNK_ALIGN, CHUNK_BYTES // (4 * cols) // CHUNK_ALIGN * CHUNK_ALIGN)
        self.chunk_rows = rows

    def __getitem__(self, rows: slice) -> "QuantMatrix":
        """Rows lo:hi (a vocabulary chunk of the LM head): a view of their blocks."""
        return QuantMatrix(self.raw[rows], self.dtype, self.shape[1])

    def dequantized(self) -> np.ndarray:
        return dequantize(self.raw, self.dtype)  # [rows, row_bytes] -> [rows, cols] float32

    def linear(self, x: np.ndarray) -> np.ndarray:
        """x @ W.T: [T, cols] -> [T, rows], chunk by chunk of rows (the forms of model.llama.linear)."""
        rows, R = self.shape[0], self.chunk_rows
        out = np.empty((x.shape[0], rows), dtype=np.float32)  # [T, rows]
        buf = np.empty((min(R, rows), self.shape[1]), dtype=np.float32)  # one dequantized chunk
        for lo in range(0, rows, R):
            hi = min(rows, lo + R)
            w = dequantize(self.raw[lo:hi], self.dtype, out=buf[: hi - lo])  # [hi-lo, cols] float32
            if x.shape[0] == 1:
                out[0, lo:hi] = w @ x[0]  # GEMV: [hi-lo, cols] @ [cols] -> [hi-lo]
            elif x.shape[0] <= 16:
                out[:, lo:hi] = (w @ x.T).T  # [hi-lo, T] -> [T, hi-lo]
            else:
                out[:, lo:hi] = x @ w.T  # [T, cols] @ [cols, hi-lo] -> [T, hi-lo]
        return out


def load_resident(info: TensorInfo, dequantize_at_load: bool) -> QuantMatrix | None:
    """A 2-D block-quantized tensor kept quantized (a QuantMatrix); None for anything the caller loads as
    float32 (other dtypes, 1-D tensors, or `dequantize_at_load`)."""
    if dequantize_at_load or not is_block_quantized(info.dtype) or len(info.shape) != 2:
        return None
    assert info.shape[1] % GGML_TYPES[info.dtype].block_elems == 0
    return QuantMatrix(read_raw(info), info.dtype, info.shape[1])  # q/k rows put in HF order by read_raw
