"""Compiled (numba) kernels for ggml blocks: exact dequantization, and fused dequantize+GEMV.

Layer: weights (imports numpy and numba only). Owns the inner loops that NumPy cannot run fast: each
kernel walks the stored blocks (uint8 [rows, row_bytes], the file's bytes) once. Must not read files,
know tensor names or touch clocks; tpicore.weights.quant (dequantize) and tpicore.weights.packed
(QuantMatrix.linear) choose when to call them.

Two kinds, per type (Q8_0, Q4_0, Q4_K, Q5_K, Q6_K: the types of the common Q8_0 / Q4_0 / Q4_K_M /
Q5_K_M files; the rest go through the gguf package):
  - dequant(tag, blocks [n, block_bytes], out [n, block_elems]): float32 weights, bit-equal to
    `gguf.quants.dequantize` (the same float32 operations in the same order, no fast-math, so no FMA
    contraction; tests/test_quant_kernels.py checks every type on random blocks). 3-7x faster than the
    NumPy kernels of tpicore.weights.quant, which stay as the readable reference.
  - gemv(tag, raw [rows, row_bytes], x [T, cols]) -> y [T, rows] = x @ W.T without materialising W:
    per (sub-)block the integer q times x is summed, then scaled by the block's float32 scale (the min
    term of Q4_K/Q5_K once per 32-column sub-block, through the sums of x); fast-math lets the adds be
    reordered and fused. The same weights, another summation order than a BLAS GEMV over the
    dequantized matrix: |dy| is a few float32 ulps of sum |w x| (the tests hold 1e-5 of it). For one token it reads 4.5-8.5 bits per weight instead of 32 and ran 2x faster than
    OpenBLAS's f32 GEMV over the dequantized weights (dev box, 3584 x 8192, one thread).

f16 scales are widened through F16_TO_F32, a 65536-entry table (exact: it is NumPy's own conversion).
The kernels below are plain Python until `dequant` or `gemv` is first called: then numba is imported and
they are compiled (cached on disk next to this file by numba's cache=True, so a machine pays the compile,
a few seconds per kernel, once; later processes load them in milliseconds). numba and LLVM take ~120 MiB
of RSS, so only processes that hold ggml weights pay it, and f32/bf16 runs keep their memory.
"""

from __future__ import annotations

import threading
from typing import Callable

import numpy as np

F16_TO_F32 = np.arange(65536, dtype=np.uint16).view(np.float16).astype(np.float32)  # f16 bits -> f32

EXACT = dict(nogil=True, cache=True, boundscheck=False)  # IEEE float32, no reordering: bit-equal to gguf
FAST = dict(nogil=True, cache=True, boundscheck=False, fastmath=True)  # reductions reordered / fused


def _f16(lo, hi, f16):
    """The f16 stored little-endian in bytes lo, hi, as float32."""
    return f16[np.uint16(lo) | (np.uint16(hi) << 8)]


def _k_scales(row, o, sc, mn, f16):
    """Q4_K/Q5_K: the block at byte o of `row` -> sc[i] = d * scale_i, mn[i] = dmin * min_i (float32), from
    d, dmin (f16 at o, o+2) and the 12 bytes of 6-bit scales/mins at o+4..o+15."""
    d, dmin = _f16(row[o], row[o + 1], f16), _f16(row[o + 2], row[o + 3], f16)
    for j in range(4):
        s_d, s_m, s_md = row[o + 4 + j], row[o + 8 + j], row[o + 12 + j]
        sc[j] = d * np.float32(s_d & 0x3F)
        mn[j] = dmin * np.float32(s_m & 0x3F)
        sc[4 + j] = d * np.float32((s_md & 0x0F) | ((s_d >> 2) & 0x30))
        mn[4 + j] = dmin * np.float32((s_md >> 4) | ((s_m >> 2) & 0x30))


# -- exact dequantization: [n, block_bytes] uint8 -> [n, block_elems] float32 ----------------------------

def dequant_q8_0(blocks, out, f16):
    """[n, 34]: d (f16), 32 int8; x = q * d."""
    q8 = blocks.view(np.int8)
    for b in range(blocks.shape[0]):
        d = _f16(blocks[b, 0], blocks[b, 1], f16)
        for j in range(32):
            out[b, j] = np.float32(q8[b, 2 + j]) * d


def dequant_q4_0(blocks, out, f16):
    """[n, 18]: d (f16), 16 bytes of nibbles (low: elements 0..15, high: 16..31); x = d * (q - 8)."""
    for b in range(blocks.shape[0]):
        d = _f16(blocks[b, 0], blocks[b, 1], f16)
        for j in range(16):
            q = blocks[b, 2 + j]
            out[b, j] = d * np.float32(np.int32(q & 0x0F) - 8)
            out[b, 16 + j] = d * np.float32(np.int32(q >> 4) - 8)


def dequant_q4_k(blocks, out, f16):
    """[n, 144]: d, dmin (f16), 12 bytes of 6-bit scales/mins, 128 bytes of nibbles (byte g*32+l: element
    g*64+l low, g*64+32+l high); x = (d * sc) * q - dmin * m."""
    sc, mn = np.empty(8, np.float32), np.empty(8, np.float32)
    for b in range(blocks.shape[0]):
        _k_scales(blocks[b], 0, sc, mn, f16)
        for g in range(4):
            s0, m0, s1, m1 = sc[2 * g], mn[2 * g], sc[2 * g + 1], mn[2 * g + 1]
            for j in range(32):
                q = blocks[b, 16 + 32 * g + j]
                out[b, 64 * g + j] = s0 * np.float32(q & 0x0F) - m0
                out[b, 64 * g + 32 + j] = s1 * np.float32(q >> 4) - m1


def dequant_q5_k(blocks, out, f16):
    """[n, 176]: as Q4_K plus 32 bytes of high bits before the nibbles (bit g of byte l: element g*32+l)."""
    sc, mn = np.empty(8, np.float32), np.empty(8, np.float32)
    for b in range(blocks.shape[0]):
        _k_scales(blocks[b], 0, sc, mn, f16)
        for g in range(8):
            s, m, shift = sc[g], mn[g], 4 * (g & 1)
            for j in range(32):
                q = ((blocks[b, 48 + 32 * (g >> 1) + j] >> shift) & 0x0F) | (((blocks[b, 16 + j] >> g) & 1) << 4)
                out[b, 32 * g + j] = s * np.float32(q) - m


def dequant_q6_k(blocks, out, f16):
    """[n, 210]: 128 bytes of low nibbles, 64 of 2-bit highs, 16 int8 scales, d (f16); element
    h*128 + k*32 + l (k = 2s + i//32 for nibble s of ql byte h*64 + i) = (d * scale[e//16]) * (q - 32)."""
    sc = np.empty(16, np.float32)
    s8 = blocks.view(np.int8)
    for b in range(blocks.shape[0]):
        d = _f16(blocks[b, 208], blocks[b, 209], f16)
        for i in range(16):
            sc[i] = d * np.float32(s8[b, 192 + i])
        for h in range(2):
            for k in range(4):
                shift_l, shift_h = 4 * (k >> 1), 2 * k
                for j in range(32):
                    low = (blocks[b, 64 * h + 32 * (k & 1) + j] >> shift_l) & 0x0F
                    q = np.int32(low | (((blocks[b, 128 + 32 * h + j] >> shift_h) & 0x03) << 4)) - 32
                    e = 128 * h + 32 * k + j
                    out[b, e] = sc[e >> 4] * np.float32(q)


# -- fused GEMV, one token: raw [rows, row_bytes], x [cols], xsum [cols/32] -> y [rows] ---------------------
# Each weight's integer q times x is summed over its (sub-)block, then scaled: d * sum(q x) (the min term of
# Q4_K/Q5_K once per sub-block, through xsum). The one-byte types run 4 rows at a time (4 independent sums
# share each load of x: 4x faster than one row at a time); the K types are bound by unpacking bits.

def gemv_q8_0(raw, x, xsum, y, f16):
    q8, rows = raw.view(np.int8), raw.shape[0]
    for r4 in range(0, rows, 4):  # the last group repeats its last row: every row is summed alike
        r, r1, r2, r3 = r4, min(r4 + 1, rows - 1), min(r4 + 2, rows - 1), min(r4 + 3, rows - 1)
        a0, a1, a2, a3 = np.float32(0.0), np.float32(0.0), np.float32(0.0), np.float32(0.0)
        for b in range(x.shape[0] // 32):
            o = 34 * b
            s0, s1, s2, s3 = np.float32(0.0), np.float32(0.0), np.float32(0.0), np.float32(0.0)
            for j in range(32):
                xj = x[32 * b + j]
                s0 += np.float32(q8[r, o + 2 + j]) * xj
                s1 += np.float32(q8[r1, o + 2 + j]) * xj
                s2 += np.float32(q8[r2, o + 2 + j]) * xj
                s3 += np.float32(q8[r3, o + 2 + j]) * xj
            a0 += _f16(raw[r, o], raw[r, o + 1], f16) * s0
            a1 += _f16(raw[r1, o], raw[r1, o + 1], f16) * s1
            a2 += _f16(raw[r2, o], raw[r2, o + 1], f16) * s2
            a3 += _f16(raw[r3, o], raw[r3, o + 1], f16) * s3
        y[r3], y[r2], y[r1], y[r] = a3, a2, a1, a0


def gemv_q4_0(raw, x, xsum, y, f16):
    rows = raw.shape[0]
    for r4 in range(0, rows, 4):  # the last group repeats its last row: every row is summed alike
        r, r1, r2, r3 = r4, min(r4 + 1, rows - 1), min(r4 + 2, rows - 1), min(r4 + 3, rows - 1)
        a0, a1, a2, a3 = np.float32(0.0), np.float32(0.0), np.float32(0.0), np.float32(0.0)
        for b in range(x.shape[0] // 32):
            o = 18 * b
            s0, s1, s2, s3 = np.float32(0.0), np.float32(0.0), np.float32(0.0), np.float32(0.0)
            for j in range(16):
                xl, xh = x[32 * b + j], x[32 * b + 16 + j]
                q0, q1, q2, q3 = raw[r, o + 2 + j], raw[r1, o + 2 + j], raw[r2, o + 2 + j], raw[r3, o + 2 + j]
                s0 += np.float32(np.int32(q0 & 0x0F) - 8) * xl + np.float32(np.int32(q0 >> 4) - 8) * xh
                s1 += np.float32(np.int32(q1 & 0x0F) - 8) * xl + np.float32(np.int32(q1 >> 4) - 8) * xh
                s2 += np.float32(np.int32(q2 & 0x0F) - 8) * xl + np.float32(np.int32(q2 >> 4) - 8) * xh
                s3 += np.float32(np.int32(q3 & 0x0F) - 8) * xl + np.float32(np.int32(q3 >> 4) - 8) * xh
            a0 += _f16(raw[r, o], raw[r, o + 1], f16) * s0
            a1 += _f16(raw[r1, o], raw[r1, o + 1], f16) * s1
            a2 += _f16(raw[r2, o], raw[r2, o + 1], f16) * s2
            a3 += _f16(raw[r3, o], raw[r3, o + 1], f16) * s3
        y[r3], y[r2], y[r1], y[r] = a3, a2, a1, a0


def gemv_q4_k(raw, x, xsum, y, f16):
    sc, mn = np.empty(8, np.float32), np.empty(8, np.float32)
    for r in range(raw.shape[0]):
        a, m = np.float32(0.0), np.float32(0.0)
        for b in range(x.shape[0] // 256):
            o, c = 144 * b, 256 * b
            _k_scales(raw[r], o, sc, mn, f16)
            q = raw[r, o + 16: o + 144]
            l0, h0, l1, h1 = np.float32(0.0), np.float32(0.0), np.float32(0.0), np.float32(0.0)
            l2, h2, l3, h3 = np.float32(0.0), np.float32(0.0), np.float32(0.0), np.float32(0.0)
            for j in range(32):  # 8 independent sums, one per sub-block (byte g*32+j: elements g*64+j, +32)
                q0, q1, q2, q3 = q[j], q[32 + j], q[64 + j], q[96 + j]
                l0 += np.float32(q0 & 0x0F) * x[c + j]
                h0 += np.float32(q0 >> 4) * x[c + 32 + j]
                l1 += np.float32(q1 & 0x0F) * x[c + 64 + j]
                h1 += np.float32(q1 >> 4) * x[c + 96 + j]
                l2 += np.float32(q2 & 0x0F) * x[c + 128 + j]
                h2 += np.float32(q2 >> 4) * x[c + 160 + j]
                l3 += np.float32(q3 & 0x0F) * x[c + 192 + j]
                h3 += np.float32(q3 >> 4) * x[c + 224 + j]
            a += ((sc[0] * l0 + sc[1] * h0) + (sc[2] * l1 + sc[3] * h1)) \
                + ((sc[4] * l2 + sc[5] * h2) + (sc[6] * l3 + sc[7] * h3))
            xs = xsum[8 * b: 8 * b + 8]
            m += ((mn[0] * xs[0] + mn[1] * xs[1]) + (mn[2] * xs[2] + mn[3] * xs[3])) \
                + ((mn[4] * xs[4] + mn[5] * xs[5]) + (mn[6] * xs[6] + mn[7] * xs[7]))
        y[r] = a - m


def gemv_q5_k(raw, x, xsum, y, f16):
    sc, mn = np.empty(8, np.float32), np.empty(8, np.float32)
    for r in range(raw.shape[0]):
        a = np.float32(0.0)
        for b in range(x.shape[0] // 256):
            o = 176 * b
            _k_scales(raw[r], o, sc, mn, f16)
            for g in range(4):
                c = 256 * b + 64 * g
                lo, hi = np.float32(0.0), np.float32(0.0)
                for j in range(32):
                    q, h = raw[r, o + 48 + 32 * g + j], raw[r, o + 16 + j] >> (2 * g)
                    lo += np.float32((q & 0x0F) | ((h & 1) << 4)) * x[c + j]
                    hi += np.float32((q >> 4) | ((h & 2) << 3)) * x[c + 32 + j]
                a += sc[2 * g] * lo + sc[2 * g + 1] * hi \
                    - mn[2 * g] * xsum[8 * b + 2 * g] - mn[2 * g + 1] * xsum[8 * b + 2 * g + 1]
        y[r] = a


def gemv_q6_k(raw, x, xsum, y, f16):
    s8 = raw.view(np.int8)
    for r in range(raw.shape[0]):
        a = np.float32(0.0)
        for b in range(x.shape[0] // 256):
            o = 210 * b
            d = _f16(raw[r, o + 208], raw[r, o + 209], f16)
            for h in range(2):
                for k in range(4):
                    shift_l, shift_h, c = 4 * (k >> 1), 2 * k, 256 * b + 128 * h + 32 * k
                    lo_at, hi_at = o + 64 * h + 32 * (k & 1), o + 128 + 32 * h
                    s0, s1 = np.float32(0.0), np.float32(0.0)  # elements 0..15 and 16..31: one scale each
                    for j in range(16):
                        q0 = np.int32(((raw[r, lo_at + j] >> shift_l) & 0x0F) | (((raw[r, hi_at + j] >> shift_h) & 0x03) << 4))
                        q1 = np.int32(((raw[r, lo_at + 16 + j] >> shift_l) & 0x0F)
                                      | (((raw[r, hi_at + 16 + j] >> shift_h) & 0x03) << 4))
                        s0 += np.float32(q0 - 32) * x[c + j]
                        s1 += np.float32(q1 - 32) * x[c + 16 + j]
                    a += (d * np.float32(s8[r, o + 192 + 8 * h + 2 * k])) * s0 \
                        + (d * np.float32(s8[r, o + 193 + 8 * h + 2 * k])) * s1
        y[r] = a


_HELPERS = ("_f16", "_k_scales")  # called by the kernels: compiled first, under the same names
_DEQUANT_PY = {"Q8_0": dequant_q8_0, "Q4_0": dequant_q4_0, "Q4_K": dequant_q4_k, "Q5_K": dequant_q5_k,
               "Q6_K": dequant_q6_k}
_GEMV_PY = {"Q8_0": gemv_q8_0, "Q4_0": gemv_q4_0, "Q4_K": gemv_q4_k, "Q5_K": gemv_q5_k, "Q6_K": gemv_q6_k}
DEQUANT_TAGS = tuple(_DEQUANT_PY)  # types with an exact compiled dequantizer
GEMV_TAGS = tuple(_GEMV_PY)  # types with a fused GEMV
MIN_TYPES = ("Q4_K", "Q5_K")  # GEMV kernels that read xsum (the others take an empty one)
_compiled: dict[str, dict[str, Callable]] = {}  # "dequant" / "gemv" -> tag -> numba dispatcher
_compiling = threading.Lock()  # a window's loader and compute threads may both be first


def _kernels() -> dict[str, dict[str, Callable]]:
    """The compiled kernels, built on first use (see the module docstring)."""
    if _compiled:
        return _compiled
    with _compiling:
        if not _compiled:
            import numba  # third-party, imported here on purpose: ~120 MiB of RSS, for processes with ggml weights

            g = globals()
            for name in _HELPERS:  # the kernels find their helpers as module globals at compile time
                g[name] = numba.njit(**EXACT)(g[name])
            gemv = {t: numba.njit(**FAST)(f) for t, f in _GEMV_PY.items()}
            _compiled["dequant"] = {t: numba.njit(**EXACT)(f) for t, f in _DEQUANT_PY.items()}
            _compiled["gemv"] = gemv
    return _compiled


def dequant(tag: str, blocks: np.ndarray, out: np.ndarray) -> None:
    """Exact dequantization of `tag` blocks: uint8 [n, block_bytes] -> float32 `out` [n, block_elems]."""
    _kernels()["dequant"][tag](blocks, out, F16_TO_F32)


def gemv(tag: str, raw: np.ndarray, x: np.ndarray) -> np.ndarray:
    """x @ W.T for W stored as `tag` blocks: raw uint8 [rows, row_bytes], x [T, cols] -> [T, rows] float32,
    one token at a time (each token reads the blocks again: for more than a few tokens, dequantizing
    row chunks for a BLAS GEMM is faster; tpicore.weights.packed decides)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    T, cols = x.shape
    y = np.empty((T, raw.shape[0]), dtype=np.float32)  # [T, rows]
    kernel = _kernels()["gemv"][tag]
    for t in range(T):
        xsum = x[t].reshape(cols // 32, 32).sum(axis=-1, dtype=np.float32) if tag in MIN_TYPES else x[t, :0]
        kernel(raw, x[t], xsum, y[t], F16_TO_F32)  # [cols] -> [rows]
    return y
