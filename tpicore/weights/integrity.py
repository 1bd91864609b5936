"""Integrity at load: a shard folder's bytes and structure checked against its manifest before any tensor
is used, on every load (master and workers alike), and the structural checks of any tensor index.

Layer: weights (imports tpicore.weights.checkpoint, manifest, reader and tpicore.errors). Owns:
  - `verify_tensors`: the file headers and the manifest list the same tensors (names, shapes, dtypes,
    offsets), and every tensor's bytes match its CRC32 (read with large preads into one reused buffer;
    zlib.crc32 runs at about 1-2 GB/s, so a 0.5 GB model adds about 0.3-0.5 s to a load);
  - `verify_master_files`: rank 0's config and tokenizer files against the CRC32s its manifest lists;
  - `check_weight_tensors`: integer dtypes refused as weights, and stored layers beyond the config's;
    (overlapping byte ranges are refused where headers are parsed, tpicore.weights.checkpoint);
  - `verify_folder`: both checks above, once per run: the process that validates a folder (the shard
    cache's, tpicore.tools.shard) leaves a stamp in it (STAMP_FILE), and a load by that process or one
    of its descendants (the master, its local workers, the emulator's devices) trusts the stamp instead
    of reading the bytes again, as long as every file is unchanged since.
  - `verify_checkpoint`: a plain HF folder, whenever it is read (a one-device run, or as the source of
    `tpi shard` and the shard cache): its headers as always (tpicore.weights.checkpoint: truncation,
    overlaps, the index's weight_map), the index's metadata.total_size against the tensors' bytes, then
    content checks where the folder carries something to check against (none is required):
      CHECKSUMS_FILE (written by `write_checksums`, for any folder): every tensor's CRC32 (the files'
        tensors must be exactly those listed);
      a weights file that is a symlink into a Hugging Face hub cache (snapshots/<rev>/x -> blobs/<sha256>):
        its SHA-256 against the blob's name.
    Not checked: the bytes of a folder with neither (a plain download is trusted once its headers parse);
    config and tokenizer files (text a user may edit, validated when parsed). A shard folder made from
    the HF folder gets CRC32s of its own, checked at every load (above).
Every error names the file and the tensor. Must not know about devices, layouts or the math.

The stamp: {"by": "<boot id>:<pid>:<start time>", "files": {name: [size, mtime_ns, ctime_ns, ino, dev]}} of
the manifest, the shard files and rank 0's master files. "In this run" = `by` is this process or one of
its ancestors, still alive (a pid alone could be reused; its start time and the boot id make the key
unique). "Unchanged" = the same stat fields: any write, truncation, rename over or `touch -d` changes
ctime (which no user can set), and a stamp is written only when every file's ctime is at least
RACY_S older than the check began and no file changed while it ran (git's "racily clean" rule: a write in
the same clock tick as the check cannot hide). Not caught: bytes changed below the filesystem (a failing
disk, a raw block-device write) between the check and the load of the same run, which the check at the
next run finds. A process outside the lineage (a remote `tpi worker`, a later run) checks every byte.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
import zlib
from typing import Iterable

import numpy as np

from tpicore.errors import TpiError
from tpicore.weights.checkpoint import Checkpoint, TensorInfo
from tpicore.weights.manifest import MANIFEST_FILE, Manifest
from tpicore.weights.reader import read_exact

CHECKSUMS_FILE = "checksums.json"
CHECKSUMS_FORMAT = "tpicore-checksums/1"
STAMP_FILE = "verified.json"
STAMP_FORMAT = "tpicore-verified/1"
RACY_S = 2.0  # a file whose ctime is this close to the check is never stamped (same-tick writes)
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


# ---------------------------------------------------------------------------------------------------
# Once per run: the verified stamp


def folder_files(shard_dir: str, man: Manifest) -> list[str]:
    """Every file a load of the folder uses: the manifest, the shard files, rank 0's master files."""
    return sorted({MANIFEST_FILE, *man.files, *(man.master_files or {})})


def _file_state(path: str) -> list[int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]


def _states(shard_dir: str, names: list[str]) -> dict[str, list[int] | None]:
    return {n: _file_state(os.path.join(shard_dir, n)) for n in names}


def _read_text(path: str) -> str | None:
    try:
        with open(path, encoding="ascii") as f:
            return f.read()
    except (OSError, UnicodeDecodeError):
        return None


def process_key(pid: int | str, boot_id: str) -> tuple[str, int] | None:
    """('<boot id>:<pid>:<start time>', parent pid) of a live process (Linux /proc), else None."""
    stat = _read_text(f"/proc/{pid}/stat")
    if stat is None:
        return None
    fields = stat.rpartition(")")[2].split()  # after the command name (which may hold spaces and parens)
    if len(fields) < 20 or not fields[1].isdigit():
        return None
    real_pid = os.getpid() if pid == "self" else pid
    return f"{boot_id}:{real_pid}:{fields[19]}", int(fields[1])


def lineage() -> list[str]:
    """The keys of this process and of each of its ancestors (empty where /proc is not there)."""
    boot_id = (_read_text("/proc/sys/kernel/random/boot_id") or "").strip()
    if not boot_id:
        return []
    keys: list[str] = []
    pid: int | str = "self"
    while len(keys) < 64:
        found = process_key(pid, boot_id)
        if found is None:
            break
        keys.append(found[0])
        if found[1] <= 1:
            break
        pid = found[1]
    return keys


def stamp_trusted(shard_dir: str, man: Manifest) -> bool:
    """True when the folder's stamp was written by this process or an ancestor and no file changed since."""
    text = _read_text(os.path.join(shard_dir, STAMP_FILE))
    if text is None:
        return False
    try:
        stamp = json.loads(text)
    except json.JSONDecodeError:
        return False
    if not isinstance(stamp, dict) or stamp.get("format") != STAMP_FORMAT:
        return False
    ours = lineage()
    if not ours or stamp.get("by") not in ours:
        return False
    names = folder_files(shard_dir, man)
    current = _states(shard_dir, names)
    return None not in current.values() and stamp.get("files") == current


def _write_stamp(shard_dir: str, before: dict[str, list[int] | None], started_ns: int) -> None:
    """Record a check that passed, unless a file changed while it ran or is too recent (see the docstring)."""
    ours = lineage()
    after = _states(shard_dir, list(before))
    if not ours or after != before or None in after.values():
        return
    if any(state[2] >= started_ns - int(RACY_S * 1e9) for state in after.values() if state is not None):
        return
    path = os.path.join(shard_dir, STAMP_FILE)
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "w", encoding="ascii") as f:
            json.dump({"format": STAMP_FORMAT, "by": ours[0], "files": after}, f)
        os.replace(tmp, path)
    except OSError:  # a read-only folder: no stamp, every load checks the bytes
        try:
            os.unlink(tmp)
        except OSError:
            pass


def verify_folder(shard_dir: str, man: Manifest, ckpt: Checkpoint, *, trust_stamp: bool = True,
                  write_stamp: bool = False) -> int:
    """verify_master_files and verify_tensors, skipped when `trust_stamp` and a stamp of this run vouches
    for every file (then returns 0); `write_stamp` leaves one after a check that passed. Returns the bytes
    checked; TpiError naming the file (and tensor) on any mismatch."""
    if trust_stamp and stamp_trusted(shard_dir, man):
        return 0
    started_ns = time.time_ns()
    before = _states(shard_dir, folder_files(shard_dir, man))
    verify_master_files(shard_dir, man)
    checked = verify_tensors(shard_dir, man, ckpt)
    if write_stamp:
        _write_stamp(shard_dir, before, started_ns)
    return checked


# ---------------------------------------------------------------------------------------------------
# Plain HF folders


def write_checksums(model_dir: str, ckpt: Checkpoint | None = None) -> None:
    """Write CHECKSUMS_FILE into an HF folder: every tensor's CRC32."""
    ckpt = ckpt or Checkpoint.from_dir(model_dir)
    tensors = {name: _crc_of(info) for name, info in sorted(ckpt.tensors.items())}
    path = os.path.join(model_dir, CHECKSUMS_FILE)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump({"format": CHECKSUMS_FORMAT, "tensors": tensors}, f, indent=1)
    os.replace(path + ".tmp", path)


def _crc_of(info: TensorInfo) -> int:
    crc = 0
    try:
        with open(info.path, "rb") as f:
            f.seek(info.offset)
            left = info.nbytes
            while left:
                chunk = f.read(min(VERIFY_READ_BYTES, left))
                if not chunk:
                    raise TpiError(f"{info.path}: tensor {info.name!r}: truncated file")
                crc, left = zlib.crc32(chunk, crc), left - len(chunk)
    except OSError as e:
        raise TpiError(f"{info.path}: cannot read ({e.strerror or e})") from None
    return crc


def verify_checkpoint(model_dir: str, ckpt: Checkpoint) -> int:
    """The checks of a plain HF folder (see the module docstring); returns the bytes whose content was
    checked (0: nothing to check against). TpiError naming the file (and tensor) on any mismatch."""
    _check_total_size(model_dir, ckpt)
    checked = _check_hub_blobs(ckpt)
    path = os.path.join(model_dir, CHECKSUMS_FILE)
    if not os.path.exists(path):
        return checked
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TpiError(f"{path}: cannot read the checksums ({e}); delete it or rewrite it") from None
    ok = isinstance(doc, dict) and doc.get("format") == CHECKSUMS_FORMAT and isinstance(doc.get("tensors"), dict) \
        and all(type(v) is int and 0 <= v < 2**32 for v in doc["tensors"].values())
    if not ok:
        raise TpiError(f"{path}: expected {{'format': {CHECKSUMS_FORMAT!r}, 'tensors': {{name: crc32}}}}")
    tensors = doc["tensors"]
    if set(tensors) != set(ckpt.tensors):
        odd = sorted(set(tensors) ^ set(ckpt.tensors))[0]
        where = "listed there but not in the weights files" if odd in tensors else "in the weights but not listed"
        raise TpiError(f"{path}: tensor {odd!r} is {where}; the folder was changed after its checksums were written")
    return checked + check_crcs((ckpt.tensors[n], crc) for n, crc in tensors.items())


def _check_total_size(model_dir: str, ckpt: Checkpoint) -> None:
    """The index's metadata.total_size (where given) against the bytes of the tensors it maps."""
    index = os.path.join(model_dir, "model.safetensors.index.json")
    if not os.path.isfile(index):
        return
    try:
        with open(index, encoding="utf-8") as f:
            total = json.load(f).get("metadata", {}).get("total_size")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return  # Checkpoint.from_dir already refused an unreadable index
    have = sum(info.nbytes for info in ckpt.tensors.values())
    if isinstance(total, int) and not isinstance(total, bool) and total != have:
        raise TpiError(f"{index}: metadata.total_size is {total} bytes, the tensors in its files hold {have}; "
                       "a weights file is missing, truncated or from another checkpoint")


_BLOB = re.compile(r"[0-9a-f]{64}")


def _check_hub_blobs(ckpt: Checkpoint) -> int:
    """SHA-256 of each weights file that is a symlink to a hub cache blob (named by its SHA-256)."""
    checked = 0
    for path in sorted({info.path for info in ckpt.tensors.values()}):
        target = os.path.realpath(path)
        name = os.path.basename(target)
        if not (os.path.islink(path) and _BLOB.fullmatch(name) and os.path.basename(os.path.dirname(target)) == "blobs"):
            continue
        try:
            with open(target, "rb") as f:
                digest = hashlib.file_digest(f, "sha256").hexdigest()
        except OSError as e:
            raise TpiError(f"{path}: cannot read ({e.strerror or e})") from None
        if digest != name:
            raise TpiError(f"{path}: SHA-256 {digest[:16]}... does not match its hub blob name {name[:16]}...; "
                           "the download is corrupt, delete the blob and download again")
        checked += os.path.getsize(target)
    return checked
