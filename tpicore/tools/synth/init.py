"""Random weights for synthetic checkpoints, generated block by block in the stored dtype.

Layer: tools (imports tpicore.errors only). Owns the values of every synthetic tensor and the stored
dtypes a synthetic model can have. Must not write files (checkpoint.py and unique.py do).

Each tensor has its own generator, seeded by (seed, crc32(name)), and one stream of float32 draws
that does not depend on block size, dtype, sharding or `--layers`: a bf16 checkpoint is the f32 one
rounded, and layer i is the same whatever the layer count (so `tpi synth` + `tpi shard` and
`tpi synth --devices` write the same bytes). Draws are uniform with the variance of the intended normal
(NumPy's float32 normals run at ~0.3 GB/s, uniforms at ~1.6 GB/s, and a layer's output is Gaussian
anyway by the central limit theorem). Scales:
    2-D weights (out, in), embeddings and lm_head   std 1/sqrt(in)   (~0.016 at D=4096, like trained Llamas)
    RMSNorm weights                                  1 + 0.1 * noise  (not all ones, so a missed norm shows)
    biases                                           0.1 * noise
With 1/sqrt(in), each projection keeps unit variance: attention scores have std ~1 (so attention is
not uniform and RoPE/mask bugs change outputs), every layer adds O(1) to the residual stream (which
grows like sqrt(layers), never exponentially: each block reads it through an RMSNorm), and logits
have std ~1 at any width.
"""

from __future__ import annotations

import math
import zlib
from typing import Iterator, NamedTuple

import ml_dtypes
import numpy as np

from tpicore.errors import TpiError

CHUNK_ELEMS = 2 << 20  # elements per generated block: 8 MiB of float32 scratch, whatever the width


class Dtype(NamedTuple):
    """A stored dtype of synthetic weights (`--dtype`)."""

    tag: str  # safetensors dtype
    torch: str  # torch_dtype in config.json
    itemsize: int  # bytes per element
    numpy: np.dtype  # what the float32 draws are rounded to (nearest even)


DTYPES: dict[str, Dtype] = {
    "f32": Dtype("F32", "float32", 4, np.dtype("<f4")),
    "f16": Dtype("F16", "float16", 2, np.dtype("<f2")),
    "bf16": Dtype("BF16", "bfloat16", 2, np.dtype(ml_dtypes.bfloat16)),
}


def stored_dtype(name: str) -> Dtype:
    if name not in DTYPES:
        raise TpiError(f"--dtype: expected one of {', '.join(DTYPES)}, got {name!r}")
    return DTYPES[name]


def init_rule(name: str, shape: tuple[int, ...]) -> tuple[float, float]:
    """(offset, std) of a tensor's values: see the module docstring for why these scales."""
    if len(shape) == 2:
        return 0.0, 1.0 / math.sqrt(shape[1])
    if name.endswith("norm.weight"):
        return 1.0, 0.1
    return 0.0, 0.1  # bias


def tensor_seed(seed: int, name: str) -> list[int]:
    return [seed, zlib.crc32(name.encode())]


def fill(rng: np.random.Generator, buf: np.ndarray, offset: float, std: float) -> None:
    """buf[:] = offset + std * (unit-variance uniform noise), float32, in place."""
    rng.random(out=buf, dtype=buf.dtype)
    buf -= 0.5
    buf *= std * math.sqrt(12.0)  # uniform on [-0.5, 0.5) has variance 1/12
    if offset:
        buf += offset


def generate_tensor(name: str, shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """The float32 values the writers store for one tensor (whole, in memory: for tests)."""
    out = np.empty(shape, dtype=np.float32)
    fill(np.random.default_rng(tensor_seed(seed, name)), out.reshape(-1), *init_rule(name, shape))
    return out


class BlockGenerator:
    """Tensors generated in blocks of whole rows (about CHUNK_ELEMS elements), rounded to `dtype`.

    Buffers are allocated once and reused: first touch of fresh memory costs as much as the work. Two
    output buffers alternate, so a writer thread may still be writing block k while block k + 1 is
    generated (the caller waits for write k - 1 before asking for block k + 1).
    """

    def __init__(self, dtype: Dtype, seed: int) -> None:
        self.dtype, self.seed = dtype, seed
        self._outputs = [np.empty(0, dtype=dtype.numpy) for _ in range(2)]
        self._scratch = np.empty(0, dtype=np.float32)
        self._k = 0

    def _buffers(self, n: int) -> tuple[np.ndarray, np.ndarray | None]:
        out = self._outputs[self._k % 2]
        if out.size < n:  # first use, or a row longer than CHUNK_ELEMS
            out = self._outputs[self._k % 2] = np.empty(max(n, CHUNK_ELEMS), dtype=self.dtype.numpy)
        self._k += 1
        if self.dtype.tag == "F32":
            return out[:n], None
        if self._scratch.size < n:
            self._scratch = np.empty(max(n, CHUNK_ELEMS), dtype=np.float32)
        return out[:n], self._scratch[:n]

    def blocks(self, name: str, shape: tuple[int, ...]) -> Iterator[tuple[int, int, np.ndarray]]:
        """(r0, r1, rows r0..r1 of the tensor in the stored dtype) for every block, in order."""
        rows = shape[0] if shape else 1
        row = math.prod(shape[1:])
        per = max(1, CHUNK_ELEMS // max(row, 1))
        rng = np.random.default_rng(tensor_seed(self.seed, name))
        offset, std = init_rule(name, shape)
        for r0 in range(0, rows, per):  # the stream of draws does not depend on the block size
            r1 = min(rows, r0 + per)
            out, scratch = self._buffers((r1 - r0) * row)
            if scratch is None:
                fill(rng, out, offset, std)
            else:
                fill(rng, scratch, offset, std)
                np.copyto(out, scratch, casting="unsafe")  # rounds to nearest even
            yield r0, r1, out.reshape((r1 - r0,) + tuple(shape[1:]))
