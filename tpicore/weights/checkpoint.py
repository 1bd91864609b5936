"""Checkpoint reading: safetensors headers, memory maps, fp32 upcast.

Owns the on-disk tensor index (single-file or sharded HF checkpoints and our shard folders) and the
conversion of stored dtypes (f32, f16, bf16) to float32. Reads lazily: nothing is copied into RAM
until a tensor is asked for. Must not know about layers, devices or the math.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from typing import Iterable

import numpy as np

from tpicore.errors import TpiError
from tpicore.weights.quant import (
    BLOCK_TAGS,
    GGML_TYPES,
    dequantize,
    hf_row_order,
    is_block_quantized,
    logical_shape,
)

# safetensors dtype tag -> (numpy storage dtype, bytes per element)
DTYPES: dict[str, np.dtype] = {
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),  # raw bits; widened to f32 by shifting into the high half
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "U8": np.dtype("u1"),
}
MAX_HEADER_BYTES = 100 * 1024 * 1024
GGML_TYPES_KEY = "tpicore.ggml_types"  # safetensors __metadata__ key: which U8 tensors are ggml blocks


@dataclass(frozen=True)
class TensorInfo:
    name: str
    path: str  # file holding the tensor
    dtype: str  # safetensors tag: F32, F16, BF16, ...
    shape: tuple[int, ...]
    offset: int  # absolute byte offset of the data in the file
    nbytes: int
    # GGUF q/k projections: rows stored in llama.cpp's RoPE-pair order for this many heads (0: HF order)
    llama_cpp_heads: int = 0

    @property
    def itemsize(self) -> int:
        return DTYPES[self.dtype].itemsize


def read_safetensors_header(path: str) -> dict[str, TensorInfo]:
    """Parse and validate one safetensors file's header. Errors name the file and the tensor."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise TpiError(f"{path}: truncated safetensors file ({size} bytes, no header)")
            (hlen,) = struct.unpack("<Q", head)
            if hlen > MAX_HEADER_BYTES or 8 + hlen > size:
                raise TpiError(f"{path}: corrupt safetensors header (length {hlen}, file {size} bytes)")
            raw = f.read(hlen)
    except FileNotFoundError:
        raise TpiError(f"{path}: file not found") from None
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TpiError(f"{path}: corrupt safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise TpiError(f"{path}: corrupt safetensors header (not a JSON object)")
    base = 8 + hlen
    out: dict[str, TensorInfo] = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (start, end) = meta["dtype"], tuple(int(s) for s in meta["shape"]), meta["data_offsets"]
            if not all(type(v) is int for v in (start, end, *meta["shape"])) or min(shape, default=0) < 0:
                raise ValueError
        except (KeyError, TypeError, ValueError):
            raise TpiError(f"{path}: tensor {name!r}: malformed header entry {str(meta)[:200]}") from None
        if dtype not in DTYPES:
            raise TpiError(f"{path}: tensor {name!r}: unsupported dtype {dtype} (expected one of F32, F16, BF16)")
        nbytes = int(np.prod(shape, dtype=np.int64)) * DTYPES[dtype].itemsize
        if end - start != nbytes or start < 0:
            raise TpiError(f"{path}: tensor {name!r}: byte range {start}..{end} does not match shape {list(shape)} {dtype}")
        if base + end > size:
            raise TpiError(f"{path}: tensor {name!r}: truncated file (needs {base + end} bytes, has {size})")
        out[name] = TensorInfo(name, path, dtype, shape, base + start, nbytes)
    check_disjoint(path, out.values())
    return ggml_retyped(out, header.get("__metadata__"), path)


def check_disjoint(path: str, infos: Iterable[TensorInfo]) -> None:
    """Refuse two tensors whose byte ranges overlap (writing one would change the other's weights)."""
    prev: TensorInfo | None = None
    for info in sorted((i for i in infos if i.nbytes), key=lambda i: (i.offset, i.name)):
        if prev is not None and info.offset < prev.offset + prev.nbytes:
            raise TpiError(f"{path}: tensor {info.name!r}: byte range overlaps tensor {prev.name!r} "
                           f"({info.offset} < {prev.offset + prev.nbytes}); the file is corrupt")
        if prev is None or info.offset + info.nbytes > prev.offset + prev.nbytes:
            prev = info


def ggml_retyped(infos: dict[str, TensorInfo], metadata: object, path: str) -> dict[str, TensorInfo]:
    """Our shard files store block-quantized slices as U8 [rows, row_bytes]; their `__metadata__` names the
    ggml type of each (GGML_TYPES_KEY: JSON {tensor: tag}). Those entries become the quantized tensor they
    hold ([rows, cols], the ggml tag), so every reader sees the same TensorInfo as for the GGUF file."""
    if not isinstance(metadata, dict) or GGML_TYPES_KEY not in metadata:
        return infos
    try:
        types = json.loads(metadata[GGML_TYPES_KEY])
    except (TypeError, json.JSONDecodeError):
        types = None
    if not isinstance(types, dict):
        raise TpiError(f"{path}: __metadata__ {GGML_TYPES_KEY!r}: expected a JSON object of tensor -> ggml type")
    for name, tag in types.items():
        info = infos.get(name)
        if info is None or info.dtype != "U8" or tag not in BLOCK_TAGS:
            raise TpiError(f"{path}: tensor {name!r}: __metadata__ says ggml type {tag!r}, but the file holds "
                           f"{info.dtype if info else 'no such tensor'} (expected U8 blocks of a quantized type)")
        shape = logical_shape(tag, info.shape)
        if shape is None:
            raise TpiError(f"{path}: tensor {name!r}: {list(info.shape)} U8 is not whole {tag} blocks per row")
        infos[name] = TensorInfo(name, path, tag, shape, info.offset, info.nbytes)
    return infos


def bf16_bits_to_f32(bits: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Widen raw bfloat16 bits (uint16) to float32: the bf16 bits are the high half of the f32."""
    if out is None:
        out = np.empty(bits.shape, dtype=np.float32)
    wide = out.view(np.uint32)
    np.left_shift(bits, 16, out=wide, dtype=np.uint32)
    return out


def stored_layout(info: TensorInfo) -> tuple[np.dtype, tuple[int, ...]]:
    """numpy dtype and shape of the stored array: the tensor's own, or uint8 [..., row_bytes] of ggml blocks."""
    if is_block_quantized(info.dtype):
        return np.dtype(np.uint8), info.shape[:-1] + (GGML_TYPES[info.dtype].row_nbytes(info.shape[-1]),)
    return DTYPES[info.dtype], info.shape


def rows_in_hf_order(info: TensorInfo, stored: np.ndarray) -> np.ndarray:
    """The stored rows in HF order: a gathered copy for GGUF q/k projections, else `stored` itself."""
    return stored[hf_row_order(info.shape[0], info.llama_cpp_heads)] if info.llama_cpp_heads else stored


def to_f32(raw: np.ndarray, dtype: str, out: np.ndarray | None = None) -> np.ndarray:
    """Convert stored elements (any supported tag) to a float32 array (a new one unless `out` given)."""
    if is_block_quantized(dtype):  # GGUF blocks: uint8 [..., row_bytes] -> [..., cols]
        return dequantize(raw, dtype, out)
    if dtype == "BF16":
        return bf16_bits_to_f32(raw, out)
    if out is None:
        return np.array(raw, dtype=np.float32)  # copies even for F32 memmaps: the result owns its memory
    out[...] = raw
    return out


class Checkpoint:
    """A set of safetensors files seen as one name -> tensor index, memory-mapped on demand."""

    def __init__(self, files: Iterable[str], label: str) -> None:
        self.label = label
        self.tensors: dict[str, TensorInfo] = {}
        for path in files:
            for name, info in read_safetensors_header(path).items():
                if name in self.tensors:
                    raise TpiError(f"{path}: tensor {name!r} also appears in {self.tensors[name].path}")
                self.tensors[name] = info
        self._maps: dict[str, np.memmap] = {}

    @classmethod
    def from_dir(cls, model_dir: str) -> "Checkpoint":
        index = os.path.join(model_dir, "model.safetensors.index.json")
        single = os.path.join(model_dir, "model.safetensors")
        if os.path.exists(index):
            try:
                with open(index, encoding="utf-8") as f:
                    weight_map = json.load(f)["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as e:
                raise TpiError(f"{index}: expected a JSON object with a 'weight_map' ({e})") from None
            files = sorted({os.path.join(model_dir, v) for v in weight_map.values()})
            ckpt = cls(files, model_dir)
            for name, fname in weight_map.items():
                info = ckpt.tensors.get(name)
                if info is None or os.path.basename(info.path) != fname:
                    raise TpiError(f"{index}: tensor {name!r} is listed in {fname} but not found there")
            return ckpt
        if os.path.exists(single):
            return cls([single], model_dir)
        raise TpiError(f"{model_dir}: no model.safetensors or model.safetensors.index.json found")

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def info(self, name: str, shape: tuple[int, ...] | None = None) -> TensorInfo:
        info = self.tensors.get(name)
        if info is None:
            raise TpiError(f"{self.label}: missing tensor {name!r}")
        if shape is not None and info.shape != tuple(shape):
            raise TpiError(f"{info.path}: tensor {name!r} has shape {list(info.shape)}, expected {list(shape)}")
        return info

    def raw(self, name: str, shape: tuple[int, ...] | None = None) -> np.ndarray:
        """The stored elements as a read-only memory map (no copy)."""
        info = self.info(name, shape)
        mm = self._maps.get(info.path)
        if mm is None:
            mm = self._maps[info.path] = np.memmap(info.path, dtype=np.uint8, mode="r")
        dtype, shape = stored_layout(info)
        return rows_in_hf_order(info, mm[info.offset: info.offset + info.nbytes].view(dtype).reshape(shape))

    def get(self, name: str, shape: tuple[int, ...] | None = None) -> np.ndarray:
        """A float32 copy of the tensor (owning its memory)."""
        info = self.info(name, shape)
        return to_f32(self.raw(name, shape), info.dtype)

    def close(self) -> None:
        self._maps.clear()
