"""Quantized weights kept quantized in memory: a ggml-block matrix that multiplies without widening.

Layer: weights (imports tpicore.weights.{kernels,quant}). Owns `QuantMatrix`, what the resident path and
the window hold for a block-quantized (GGUF) weight unless `--dequantize-at-load`: the stored bytes (uint8
[rows, row_bytes], 4-7x smaller than float32), and `linear(x)` = x @ W.T. tpicore.model.llama.linear
calls it for any weight that is not an ndarray. Must not read files (tpicore.weights.reader builds
these) or know tensor names.

Two ways to multiply, the same float32 weights either way:
  fused (`fused=True`, what the sources build; up to FUSED_TOKENS tokens, types in kernels.GEMV_TAGS): the
      compiled dequantize+GEMV (tpicore.weights.kernels), which reads each stored block once and never
      writes the float32 matrix. Only the summation order differs from a BLAS GEMV over the dequantized
      weights (within 1e-5 relative, tests/test_quant_kernels.py). For one token it is as fast as
      OpenBLAS's float32 GEMV or 2x faster (Q8_0) while reading 4-7x fewer bytes.
  chunked (the default, and for longer prompts): one cache-sized chunk of rows at a time is dequantized
      (quant.dequantize, bit-equal to the gguf package) into a reused float32 buffer of about
      CHUNK_BYTES, then multiplied by BLAS while it is in cache. Each output is the same BLAS dot
      product over the same float32 weights as the dequantize-then-GEMV path; chunks are whole
      multiples of CHUNK_ALIGN rows, so OpenBLAS's GEMV kernel groups rows alike in both
      (tests/test_quant_resident.py checks bit-equal outputs; BLAS does not promise it, and max
      |dlogits| <= 1e-4 is the bound the tests hold either way).
"""

from __future__ import annotations

import numpy as np

from tpicore.weights import kernels
from tpicore.weights.quant import GGML_TYPES, dequantize

CHUNK_BYTES = 1 << 20  # float32 bytes of one dequantized row chunk (~L2-sized)
CHUNK_ALIGN = 16  # rows per chunk are a multiple of this
FUSED_TOKENS = 2  # the fused kernels read the blocks once per token: past this, dequantized chunks + GEMM


class QuantMatrix:
    """A block-quantized [rows, cols] weight held as its stored bytes; `linear` dequantizes as it goes.
    fused: few-token products by the compiled fused kernel (what the sources build), else always chunked."""

    def __init__(self, raw: np.ndarray, dtype: str, cols: int, fused: bool = False) -> None:
        self.raw, self.dtype = raw, dtype  # uint8 [rows, row_bytes]
        self.fused = fused and dtype in kernels.GEMV_TAGS  # few-token products by the fused kernel
        self.shape = (raw.shape[0], cols)
        self.nbytes = raw.nbytes
        rows = max(CHUNK_ALIGN, CHUNK_BYTES // (4 * cols) // CHUNK_ALIGN * CHUNK_ALIGN)
        self.chunk_rows = rows

    def __getitem__(self, rows: slice) -> "QuantMatrix":
        """Rows lo:hi (a vocabulary chunk of the LM head): a view of their blocks."""
        return QuantMatrix(self.raw[rows], self.dtype, self.shape[1], self.fused)

    def dequantized(self) -> np.ndarray:
        return dequantize(self.raw, self.dtype)  # [rows, row_bytes] -> [rows, cols] float32

    def linear(self, x: np.ndarray) -> np.ndarray:
        """x @ W.T: [T, cols] -> [T, rows]: the fused kernel for a few tokens, else chunk by chunk of rows
        (the forms of model.llama.linear)."""
        if self.fused and x.shape[0] <= FUSED_TOKENS:
            return kernels.gemv(self.dtype, self.raw, x)  # [T, cols] -> [T, rows]
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


_prepared: set[str] = set()


def prepare(dtype: str) -> None:
    """Compile (or load from numba's disk cache) the kernels a `dtype` weight will use, now: the sources call
    this when they plan or load such a weight, outside the compute sections a virtual clock charges, so a
    first multiplication does not bill the compile to a block. Runs both of QuantMatrix's paths once."""
    if dtype in _prepared or dtype not in kernels.DEQUANT_TAGS + kernels.GEMV_TAGS:
        return
    t = GGML_TYPES[dtype]
    m = QuantMatrix(np.zeros((CHUNK_ALIGN, t.block_bytes), dtype=np.uint8), dtype, t.block_elems, fused=True)
    for tokens in (1, FUSED_TOKENS + 1):  # fused, then dequantized chunks
        m.linear(np.zeros((tokens, t.block_elems), dtype=np.float32))
    _prepared.add(dtype)
