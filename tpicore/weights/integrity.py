"""Integrity at load: a shard folder's bytes and structure checked against its manifest before any tensor
is used, on every load (master and workers alike), and the structural checks of any tensor index.

Layer: weights (imports tpicore.weights.checkpoint, manifest, reader and tpicore.errors). Owns:
  - `verify_tensors`: the file headers and the manifest list the same tensors (names, shapes, dtypes,
    offsets), and every tensor's bytes match its CRC32 (read with large preads into one reused buffer;
    zlib.crc32 runs at about 1-2 GB/s, so a 0.5 GB model adds about 0.3-0.5 s to a load);
  - `verify_master_files`: rank 0's config and tokenizer files against the CRC32s its manifest lists;
  - `check_weight_tensors`: integer dtypes refused as weights, and stored layers beyond the config's;
    (overlapping byte ranges are refused where headers are parsed, tpicore.weights.checkpoint).
Every error names the file and the tensor. Must not know about devices, layouts or the math.
"""

from __future__ import annotations

import os
import zlib
from typing import Iterable

import numpy as np

from tpicore.errors import TpiError
from tpicore.weights.checkpoint import Checkpoint, TensorInfo
from tpicore.weights.manifest import Manifest
from tpicore.weights.reader import read_exact

VERIFY_READ_BYTES = 1 << 20  # one pread of the check (as fast as larger ones; the reused buffer adds 1 MiB of RSS)
INTEGER_DTYPES = ("I64", "I32", "U8")  # storable in safetensors, never a weight
LAYER_PREFIX = "model.layers."


def verify_tensors(shard_dir: str, man: Manifest, ckpt: Checkpoint) -> int:
    """Check the folder's files against its manifest: the same tensors in both, headers agreeing, and every
    tensor's CRC32. Raises TpiError naming the file and tensor; returns the bytes checked."""
    listed = set(man.tensors)
    for name, info in ckpt.tensors.items():
        if name not in listed:
            raise TpiError(f"{info.path}: tensor {name!r} is in the file but not in the manifest "
                           "(the shard is corrupt; re-run tpi shard)")
    infos: list[tuple[TensorInfo, int]] = []
    for name, t in man.tensors.items():
        path = os.path.join(shard_dir, t.file)
        h = ckpt.tensors.get(name)
        if h is None or h.path != path:
            raise TpiError(f"{path}: tensor {name!r} is in the manifest but not in the file")
        if (h.shape, h.dtype, h.offset, h.nbytes) != (t.shape, t.dtype, t.offset, t.nbytes):
            raise TpiError(f"{path}: tensor {name!r}: file header ({list(h.shape)} {h.dtype} at {h.offset}) "
                           f"disagrees with the manifest ({list(t.shape)} {t.dtype} at {t.offset})")
        infos.append((h, t.crc32))
    return check_crcs(infos)


def check_crcs(infos: Iterable[tuple[TensorInfo, int]]) -> int:
    """CRC32 of every tensor's bytes against the expected value, in file order; returns the bytes read."""
    ordered = sorted(infos, key=lambda it: (it[0].path, it[0].offset))
    largest = max((info.nbytes for info, _ in ordered), default=0)
    buf = np.empty(min(VERIFY_READ_BYTES, largest), dtype=np.uint8)
    checked = 0
    fds: dict[str, int] = {}
    try:
        for info, want in ordered:
            fd = fds.get(info.path)
            if fd is None:
                fd = fds[info.path] = os.open(info.path, os.O_RDONLY)
            crc, pos, end = 0, info.offset, info.offset + info.nbytes
            while pos < end:
                mv = memoryview(buf)[: min(len(buf), end - pos)]
                read_exact(fd, mv, pos, info.path)
                crc = zlib.crc32(mv, crc)
                pos += len(mv)
            if crc != want:
                raise TpiError(f"{info.path}: tensor {info.name!r}: CRC32 mismatch (manifest {want:08x}, "
                               f"data {crc:08x}); the shard is corrupt, re-run tpi shard")
            checked += info.nbytes
    except OSError as e:
        raise TpiError(f"{e.filename or 'shard'}: cannot read ({e.strerror or e})") from None
    finally:
        for fd in fds.values():
            os.close(fd)
    return checked


def file_crc32(path: str) -> int:
    """CRC32 of a whole (small) file."""
    crc = 0
    try:
        with open(path, "rb") as f:
            while chunk := f.read(VERIFY_READ_BYTES):
                crc = zlib.crc32(chunk, crc)
    except OSError as e:
        raise TpiError(f"{path}: cannot read ({e.strerror or e})") from None
    return crc


def master_file_crcs(folder: str, names: Iterable[str]) -> dict[str, int]:
    """name -> CRC32 of each of `names` present in `folder` (rank 0's config and tokenizer files)."""
    return {n: file_crc32(os.path.join(folder, n)) for n in names if os.path.isfile(os.path.join(folder, n))}


def verify_master_files(shard_dir: str, man: Manifest) -> None:
    """Rank 0's config and tokenizer files against the CRC32s its manifest lists, naming the file."""
    for name, want in (man.master_files or {}).items():
        path = os.path.join(shard_dir, name)
        if not os.path.isfile(path):
            raise TpiError(f"{path}: listed in the manifest's 'master_files' but missing; re-run tpi shard")
        crc = file_crc32(path)
        if crc != want:
            raise TpiError(f"{path}: CRC32 mismatch (manifest {want:08x}, file {crc:08x}); the file is corrupt "
                           "or was edited, re-run tpi shard")


def stored_layer(name: str, path: str) -> int | None:
    """The layer index in 'model.layers.<i>.<leaf>' (None for other names); TpiError for a malformed one."""
    if not name.startswith(LAYER_PREFIX):
        return None
    idx = name[len(LAYER_PREFIX):].partition(".")[0]
    if not idx.isdigit() or not idx.isascii():
        raise TpiError(f"{path}: tensor {name!r}: malformed layer index {idx!r}")
    return int(idx)


def check_weight_tensors(ckpt: Checkpoint, stored_layers: set[int], config_source: str, n_layers: int) -> None:
    """Refuse a tensor of an integer dtype, or of a layer the config does not have (`stored_layers`: the
    layers this folder may hold), naming the file and the tensor."""
    for name, info in ckpt.tensors.items():
        if info.dtype in INTEGER_DTYPES:
            raise TpiError(f"{info.path}: tensor {name!r}: integer dtype {info.dtype} cannot hold weights "
                           "(expected F32, F16 or BF16)")
        layer = stored_layer(name, info.path)
        if layer is not None and layer not in stored_layers:
            raise TpiError(f"{info.path}: tensor {name!r}: layer {layer} is not among the {n_layers} layers of "
                           f"{config_source} (a config with fewer layers than the checkpoint?)")
