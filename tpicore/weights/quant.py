"""GGUF/ggml tensor types: block sizes, byte counts, and dequantization to float32.

Layer: weights (imports tpicore.errors, tpicore.weights.kernels and the `gguf` package only). Owns the table of the ggml types we
read (F32, F16, BF16 and the block-quantized Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K) and the one
function that turns stored blocks into float32. Must not read files, know tensor names or do math beyond
dequantization.

A block-quantized 2-D tensor [rows, cols] is stored as rows of whole blocks: `cols / block_elems` blocks of
`block_bytes` each per row, so a row range is a contiguous byte range and a row is never split across
blocks. Dequantization is `gguf.quants.dequantize` (the format's maintained NumPy reference, the same code
transformers' GGUF loader uses), or for the common types our kernels, bit-equal to it and faster: the
compiled ones of tpicore.weights.kernels by default, the NumPy ones below as the readable reference
(`reference=True`); either way our float32 weights are exactly transformers'. Also here: llama.cpp's q/k row order (a row gather).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from gguf import GGMLQuantizationType
from gguf.constants import GGML_QUANT_SIZES
from gguf.quants import dequantize as gguf_dequantize

from tpicore.errors import TpiError
from tpicore.weights import kernels


@dataclass(frozen=True)
class QuantType:
    """One ggml tensor type: `block_elems` elements are stored in `block_bytes` bytes."""

    name: str  # our dtype tag (TensorInfo.dtype): the ggml name, e.g. "Q4_K"
    ggml: GGMLQuantizationType
    block_elems: int
    block_bytes: int

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.block_bytes / self.block_elems

    def row_nbytes(self, cols: int) -> int:
        """Bytes of one stored row of `cols` elements (cols must be a whole number of blocks)."""
        return cols // self.block_elems * self.block_bytes


def _table() -> dict[str, QuantType]:
    names = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K")
    out = {}
    for name in names:
        g = GGMLQuantizationType[name]
        elems, nbytes = GGML_QUANT_SIZES[g]
        out[name] = QuantType(name, g, elems, nbytes)
    return out


# Every type we accept, by tag. F32/F16/BF16 share their tags with safetensors (checkpoint.DTYPES).
GGML_TYPES: dict[str, QuantType] = _table()
FLOAT_TAGS = ("F32", "F16", "BF16")
# The block-quantized ones: stored as uint8 rows of blocks, widened only through `dequantize`.
BLOCK_TAGS = tuple(t for t in GGML_TYPES if t not in FLOAT_TAGS)


def is_block_quantized(dtype: str) -> bool:
    return dtype in BLOCK_TAGS


def ggml_tag(ggml: int) -> str:
    """Our tag for a ggml type id, or a TpiError-ready description when we do not read it."""
    for t in GGML_TYPES.values():
        if int(t.ggml) == int(ggml):
            return t.name
    try:
        name = GGMLQuantizationType(int(ggml)).name
    except ValueError:
        name = f"unknown type id {int(ggml)}"
    raise TpiError(f"ggml type {name} is not supported (supported: {', '.join(GGML_TYPES)})")


def tensor_nbytes(dtype: str, shape: tuple[int, ...]) -> int:
    """Stored bytes of a tensor of `shape` (the last dimension holds the blocks)."""
    t = GGML_TYPES[dtype]
    rows = int(np.prod(shape[:-1], dtype=np.int64)) if len(shape) > 1 else 1
    return rows * t.row_nbytes(shape[-1])


def stored_shape(dtype: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """Shape of the uint8 array holding a block-quantized tensor: [..., cols] -> [..., row_bytes]."""
    return tuple(shape[:-1]) + (GGML_TYPES[dtype].row_nbytes(shape[-1]),)


def logical_shape(dtype: str, stored: tuple[int, ...]) -> tuple[int, ...] | None:
    """Inverse of `stored_shape`: [..., row_bytes] -> [..., cols], or None when a row is not whole blocks."""
    t = GGML_TYPES[dtype]
    if not stored or stored[-1] % t.block_bytes:
        return None
    return tuple(stored[:-1]) + (stored[-1] // t.block_bytes * t.block_elems,)


def column_bytes(dtype: str, start: int, stop: int) -> tuple[int, int] | None:
    """Byte range within a stored row of columns [start, stop), or None when a cut falls inside a block."""
    t = GGML_TYPES[dtype]
    if start % t.block_elems or stop % t.block_elems:
        return None
    return start // t.block_elems * t.block_bytes, stop // t.block_elems * t.block_bytes


def covering_blocks(dtype: str, start: int, stop: int) -> tuple[int, int]:
    """First and one-past-last block of a row that hold columns [start, stop)."""
    n = GGML_TYPES[dtype].block_elems
    return start // n, -(-stop // n)


def dequantize(raw: np.ndarray, dtype: str, out: np.ndarray | None = None, reference: bool = False) -> np.ndarray:
    """Stored blocks -> float32: raw uint8 [..., row_bytes] -> [..., cols] (into `out` if given).

    Q8_0, Q4_0, Q4_K, Q5_K and Q6_K use the compiled kernels (tpicore.weights.kernels.dequant), or with
    `reference` our NumPy kernels below (Q8_0, Q4_0, Q4_K, Q6_K); the rest `gguf.quants.dequantize`. All do
    the same float32 operations in the same order, so they are bit-equal to gguf's (tests/test_gguf.py and
    tests/test_quant_kernels.py check on random blocks), and write straight into `out` without gguf's
    16-row regrouping and copies. On a 3584 x 8192 tensor (dev box, one thread, best of 3, ms):
    Q8_0 gguf 167 / NumPy 48-63 / compiled 18, Q4_K 227 / 114-127 / 16, Q6_K 159 / 151 / 35-42.
    """
    t = GGML_TYPES[dtype]
    raw = np.ascontiguousarray(raw).view(np.uint8)
    if raw.shape[-1] % t.block_bytes:
        raise TpiError(f"{dtype}: a row of {raw.shape[-1]} bytes is not a whole number of "
                       f"{t.block_bytes}-byte blocks")
    shape = raw.shape[:-1] + (raw.shape[-1] // t.block_bytes * t.block_elems,)
    compiled = not reference and dtype in kernels.DEQUANT_TAGS
    kernel = KERNELS.get(dtype) if reference else None
    if kernel is None and not compiled:
        values = gguf_dequantize(raw, t.ggml)  # [..., row_bytes] -> [..., cols] float32
        if out is None:
            return values
        out[...] = values
        return out
    if out is None or not out.flags.c_contiguous:
        dst = np.empty(shape, dtype=np.float32)
    else:
        dst = out
    blocks = raw.reshape(-1, t.block_bytes)  # [n_blocks, block_bytes]
    if compiled:
        kernels.dequant(dtype, blocks, dst.reshape(blocks.shape[0], t.block_elems))  # -> [n_blocks, block_elems]
    else:
        kernel(blocks, dst.reshape(blocks.shape[0], t.block_elems))  # -> [n_blocks, block_elems]
    if out is not None and dst is not out:
        out[...] = dst
    return dst


def _f16_scale(blocks: np.ndarray, at: int) -> np.ndarray:
    """[n, 1] float32 of the f16 stored at byte `at` of each block."""
    return blocks[:, at: at + 2].copy().view(np.float16).astype(np.float32)


def _q8_0(blocks: np.ndarray, out: np.ndarray) -> None:
    """[n, 34] -> [n, 32]: d (f16), 32 int8; x = q * d."""
    np.copyto(out, blocks[:, 2:].view(np.int8), casting="unsafe")
    out *= _f16_scale(blocks, 0)


def _q4_0(blocks: np.ndarray, out: np.ndarray) -> None:
    """[n, 18] -> [n, 32]: d (f16), 16 bytes of nibbles (low: elements 0..15, high: 16..31); x = d * (q - 8)."""
    qs = blocks[:, 2:]  # [n, 16]
    halves = out.reshape(-1, 2, 16)
    np.copyto(halves[:, 0], (qs & 0x0F).view(np.int8) - np.int8(8), casting="unsafe")
    np.copyto(halves[:, 1], (qs >> 4).view(np.int8) - np.int8(8), casting="unsafe")
    out *= _f16_scale(blocks, 0)


def _q4_k(blocks: np.ndarray, out: np.ndarray) -> None:
    """[n, 144] -> [n, 256]: d, dmin (f16), 12 bytes of 6-bit scales/mins for 8 sub-blocks of 32, 128 bytes of
    nibbles (byte g*32+l: sub-block 2g low, 2g+1 high); x = (d * sc) * q - dmin * m. The nibbles are
    unpacked as uint8 and widened in one pass (1.5x faster than multiplying uint8 by float32 directly)."""
    n = blocks.shape[0]
    sc, mn = _k_scale_min(blocks[:, 4:16])  # [n, 8] each
    scale = _f16_scale(blocks, 0) * sc  # [n, 8]
    minus = _f16_scale(blocks, 2) * mn  # [n, 8]
    qs = blocks[:, 16:].reshape(n, 4, 1, 32)
    q = np.empty((n, 4, 2, 32), dtype=np.uint8)  # [n, group, low/high, 32] = sub-block order
    np.bitwise_and(qs, 0x0F, out=q[:, :, 0:1])
    np.right_shift(qs, 4, out=q[:, :, 1:2])
    sub = out.reshape(n, 8, 32)
    np.copyto(sub, q.reshape(n, 8, 32), casting="unsafe")
    sub *= scale[:, :, None]
    sub -= minus[:, :, None]


def _k_scale_min(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K's 12 bytes -> 8 scales and 8 mins (float32 [n, 8]), as gguf's Q4_K.get_scale_min."""
    s = packed.reshape(-1, 3, 4)
    d, m, md = s[:, 0], s[:, 1], s[:, 2]
    sc = np.concatenate([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], axis=-1)
    mn = np.concatenate([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], axis=-1)
    return sc.astype(np.float32), mn.astype(np.float32)


_Q6_SHIFTS = np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)


def _q6_k(blocks: np.ndarray, out: np.ndarray) -> None:
    """[n, 210] -> [n, 256]: 128 bytes of low nibbles, 64 of 2-bit highs, 16 int8 scales, d (f16);
    x = (d * scale) * (q - 32) over 16 sub-blocks of 16."""
    n = blocks.shape[0]
    ql = blocks[:, :128].reshape(n, 2, 1, 64)
    q = np.empty((n, 2, 2, 64), dtype=np.uint8)  # [half, nibble, 64] = element order
    np.bitwise_and(ql[:, :, 0], 0x0F, out=q[:, :, 0])
    np.right_shift(ql[:, :, 0], 4, out=q[:, :, 1])
    high = (blocks[:, 128:192].reshape(n, 2, 1, 32) >> _Q6_SHIFTS) & 0x03  # [n, 2, 4, 32]
    q.reshape(n, 2, 4, 32)[...] |= high << 4
    values = out.reshape(n, 16, 16)
    np.copyto(values, q.reshape(n, 16, 16).view(np.int8) - np.int8(32), casting="unsafe")
    values *= (_f16_scale(blocks, 208) * blocks[:, 192:208].view(np.int8).astype(np.float32))[:, :, None]


KERNELS = {"Q8_0": _q8_0, "Q4_0": _q4_0, "Q4_K": _q4_k, "Q6_K": _q6_k}


def llama_cpp_row_order(rows: int, n_heads: int) -> np.ndarray:
    """[rows] gather index: llama.cpp's row order of a q/k projection from HF's (gguf = hf[index]).

    convert_hf_to_gguf.py's permute: within each head, rows (2, Dh/2) are transposed to (Dh/2, 2), so
    llama.cpp's adjacent-pair RoPE sees HF's rotate-half pairs next to each other. Rows hold whole
    blocks, so the permutation moves stored bytes exactly, whatever the type.
    """
    idx = np.arange(rows).reshape(n_heads, 2, rows // n_heads // 2)  # [H, 2, Dh/2]
    return idx.swapaxes(1, 2).reshape(rows)  # [H, Dh/2, 2] -> [rows]


def hf_row_order(rows: int, n_heads: int) -> np.ndarray:
    """[rows] gather index undoing `llama_cpp_row_order` (hf = gguf[index])."""
    return np.argsort(llama_cpp_row_order(rows, n_heads))
