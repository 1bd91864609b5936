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


@dataclass(frozen=True)
class TensorInfo:
    name: str
    path: str  # file holding the tensor
    dtype: str  # safetensors tag: F32, F16, BF16, ...
    shape: tuple[int, ...]
    offset: int  # absolute byte offset of the data in the file
    nbytes: int

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
        except (KeyError, TypeError, ValueError):
            raise TpiError(f"{path}: tensor {name!r}: malformed header entry {meta!r}") from None
        if dtype not in DTYPES:
            raise TpiError(f"{path}: tensor {name!r}: unsupported dtype {dtype} (expected one of F32, F16, BF16)")
        nbytes = int(np.prod(shape, dtype=np.int64)) * DTYPES[dtype].itemsize
        if end - start != nbytes or start < 0:
            raise TpiError(f"{path}: tensor {name!r}: byte range {start}..{end} does not match shape {list(shape)} {dtype}")
        if base + end > size:
            raise TpiError(f"{path}: tensor {name!r}: truncated file (needs {base + end} bytes, has {size})")
        out[name] = TensorInfo(name, path, dtype, shape, base + start, nbytes)
    return out


def bf16_bits_to_f32(bits: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Widen raw bfloat16 bits (uint16) to float32: the bf16 bits are the high half of the f32."""
    if out is None:
        out = np.empty(bits.shape, dtype=np.float32)
    wide = out.view(np.uint32)
    np.left_shift(bits, 16, out=wide, dtype=np.uint32)
    return out


def to_f32(raw: np.ndarray, dtype: str, out: np.ndarray | None = None) -> np.ndarray:
    """Convert stored elements (any supported tag) to a float32 array (a new one unless `out` given)."""
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
        n = info.nbytes // info.itemsize
        return mm[info.offset: info.offset + info.nbytes].view(DTYPES[info.dtype])[:n].reshape(info.shape)

    def read(self, name: str) -> np.ndarray:
        """The stored elements read into a new array with plain read() calls (no memory map).

        For tensors converted anyway (f16, bf16), sequential reads get the kernel's readahead and
        ran ~1.3-2x faster cold than faulting the same bytes in through the map (benchmarks/bench_load.py)."""
        info = self.info(name)
        out = np.empty(info.shape, dtype=DTYPES[info.dtype])
        buf, done = memoryview(out.reshape(-1)).cast("B"), 0
        with open(info.path, "rb", buffering=0) as f:
            f.seek(info.offset)
            while done < info.nbytes:  # one read() returns at most ~2 GiB
                n = f.readinto(buf[done:])
                if not n:
                    raise TpiError(f"{info.path}: tensor {name!r}: file ended early")
                done += n
        return out

    def get(self, name: str, shape: tuple[int, ...] | None = None) -> np.ndarray:
        """A float32 copy of the tensor (owning its memory)."""
        info = self.info(name, shape)
        return to_f32(self.raw(name, shape), info.dtype)

    def get_rows(self, name: str, rows: np.ndarray) -> np.ndarray:
        """float32 rows of a 2-D tensor (embedding lookup without reading the whole table)."""
        info = self.info(name)
        return to_f32(self.raw(name)[np.asarray(rows)], info.dtype)

    def get_slice(self, name: str, axis: int, start: int, stop: int) -> np.ndarray:
        """float32 copy of tensor[start:stop] along `axis` (reads only that part for axis 0)."""
        info = self.info(name)
        raw = self.raw(name)
        index = [slice(None)] * raw.ndim
        index[axis] = slice(start, stop)
        return to_f32(raw[tuple(index)], info.dtype)

    def close(self) -> None:
        self._maps.clear()
