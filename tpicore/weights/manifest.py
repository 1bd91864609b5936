"""The shard folder's manifest: its typed record, how it is written, and how it is read and checked.

Layer: weights (imports tpicore.model, tpicore.schema and tpicore.errors). One folder per rank holds
`shard.safetensors` and `manifest.json` (format, fingerprint, source digest, rank, layout, source config,
layer map, per-tensor file/offset/CRC32). The fingerprint is never trusted as written: `check_fingerprint`
recomputes it from the manifest's own config, ratios, layer map and source digest (`shard_fingerprint`,
the one definition, also used by the writers), so an edited config or split cannot pass as the original. `Manifest` is the one record of it: built by `new_manifest` (tpicore.tools.shard,
tpicore.tools.synth.unique), written by tpicore.weights.writer, read by `read_manifest` (tpicore.weights.store,
the shard cache, the predictor). Validation goes through tpicore.schema (pydantic); its checks keep their
wording ("<file>: field 'rank': expected 0..2, got 3"). Must not read tensor bytes.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from typing import Any

import numpy as np
from pydantic import model_validator

from tpicore.errors import TpiError
from tpicore.model.config import ModelConfig, read_json
from tpicore.model.split import Layout, split_layouts
from tpicore.schema import Invalid, Record, load
from tpicore.weights.checkpoint import DTYPES
from tpicore.weights.quant import is_block_quantized, tensor_nbytes

FORMAT = "tpicore-shard/1"

SHARD_FILE = "shard.safetensors"

MANIFEST_FILE = "manifest.json"

# JSON types of the required fields, checked first (in these words) so that every later check may rely on them
MANIFEST_FIELDS: dict[str, type] = {
    "format": str, "fingerprint": str, "source": str, "rank": int, "world_size": int, "ratios": list, "layout": dict,
    "config": dict, "layer_map": list, "files": list, "tensors": dict,
}

TENSOR_FIELDS: dict[str, type] = {"file": str, "shape": list, "dtype": str, "offset": int, "nbytes": int, "crc32": int}


class TensorEntry(Record):
    """Where one tensor is in the shard folder, and the CRC32 of its bytes."""

    file: str
    shape: tuple[int, ...]
    dtype: str  # safetensors tag as stored, or the ggml tag of a quantized slice (file: U8 blocks)
    offset: int  # absolute byte offset in `file`
    nbytes: int
    crc32: int

    def to_json(self) -> dict[str, Any]:
        return {"file": self.file, "shape": list(self.shape), "dtype": self.dtype, "offset": self.offset,
                "nbytes": self.nbytes, "crc32": self.crc32}


class Synthetic(Record):
    """How a synthetic shard folder was made (`tpi synth --devices`)."""

    unique_layers: int
    seed: int
    dtype: str
    note: str  # shown to the user: the outputs of such a model are meaningless
    derived_from: str | None = None  # another layer count's folder whose shard files were linked


class Manifest(Record):
    """One rank's manifest.json."""

    format: str
    fingerprint: str  # model + split, the same in every rank's folder (compared in the handshake)
    source: str  # digest of the source weights (shard_fingerprint's input; the same in every rank's folder)
    rank: int
    world_size: int
    ratios: list[float]
    layout: Layout
    config: dict[str, Any]  # the source config.json, as found
    generation_config: dict[str, Any] | None = None
    layer_map: list[int]  # logical layer -> stored layer
    files: list[str]
    tensors: dict[str, TensorEntry]
    synthetic: Synthetic | None = None
    master_files: dict[str, int] | None = None  # rank 0's config/tokenizer files -> CRC32 (checked at load)

    @model_validator(mode="before")
    @classmethod
    def _check(cls, doc: Any) -> Any:
        if isinstance(doc, dict):
            check_manifest(doc)
        return doc

    def to_json(self) -> dict[str, Any]:
        """The JSON document, fields in the order they are written (`synthetic` only when set)."""
        doc = {"format": self.format, "fingerprint": self.fingerprint, "source": self.source, "rank": self.rank,
               "world_size": self.world_size, "ratios": self.ratios, "layout": self.layout.to_json(),
               "config": self.config, "generation_config": self.generation_config, "layer_map": self.layer_map,
               "files": self.files, "tensors": {name: t.to_json() for name, t in self.tensors.items()}}
        if self.synthetic is not None:
            doc["synthetic"] = self.synthetic.model_dump(exclude_none=True)
        if self.master_files is not None:
            doc["master_files"] = self.master_files
        return doc


def _type_name(t: type) -> str:
    return {str: "a string", int: "an integer", list: "a list", dict: "an object"}[t]


def _is(value: Any, t: type) -> bool:
    return isinstance(value, t) and not (t is int and isinstance(value, bool))


def check_manifest(man: dict[str, Any]) -> None:
    """Today's checks of a manifest document, in today's words; Invalid names the field."""

    def bad(field: str, what: str) -> Invalid:
        return Invalid(f"field {field!r}: {what}")

    for key, t in MANIFEST_FIELDS.items():
        if key not in man:
            if key == "source" and man.get("format") == FORMAT:
                raise Invalid("missing field 'source' (written by an older tpi shard; re-run tpi shard)")
            raise Invalid(f"missing field {key!r}")
        if not _is(man[key], t):
            raise bad(key, f"expected {_type_name(t)}, got {json.dumps(man[key])[:60]}")
    if man["format"] != FORMAT:
        raise bad("format", f"expected {FORMAT!r}, got {man['format']!r} (written by another version; re-run tpi shard)")
    for key in ("fingerprint", "source"):
        if not re.fullmatch(r"[0-9a-f]{16,128}", man[key]):
            raise bad(key, f"expected a hex digest, got {man[key]!r}")
    n, rank = man["world_size"], man["rank"]
    if n < 1:
        raise bad("world_size", f"expected >= 1, got {n}")
    if not 0 <= rank < n:
        raise bad("rank", f"expected 0..{n - 1}, got {rank}")
    if len(man["ratios"]) != n or not all((_is(r, int) or _is(r, float)) and r > 0 for r in man["ratios"]):
        raise bad("ratios", f"expected {n} positive numbers, got {man['ratios']}")
    try:
        layout = Layout.from_json(man["layout"])
    except (KeyError, TypeError, ValueError) as e:
        raise bad("layout", f"malformed ({e!r})") from None
    if (layout.rank, layout.world_size) != (rank, n):
        raise bad("layout", f"is for rank {layout.rank} of {layout.world_size}, the manifest for rank {rank} of {n}")
    gen = man.get("generation_config")
    if gen is not None and not isinstance(gen, dict):
        raise bad("generation_config", "expected an object or null")
    if not all(_is(i, int) and i >= 0 for i in man["layer_map"]):
        raise bad("layer_map", "expected a list of non-negative integers")
    n_layers = man["config"].get("num_hidden_layers")
    if _is(n_layers, int) and len(man["layer_map"]) != n_layers:
        raise bad("layer_map", f"has {len(man['layer_map'])} entries for {n_layers} layers")
    extra = man.get("master_files")
    if extra is not None and not (isinstance(extra, dict) and all(
            isinstance(k, str) and os.path.basename(k) == k and k not in ("", ".", "..") and _is(v, int)
            and 0 <= v < 2**32 for k, v in extra.items())):
        raise bad("master_files", "expected an object of plain file names -> CRC32 (0..2^32-1)")
    files = man["files"]
    if not files or not all(isinstance(f, str) and f and os.path.basename(f) == f and f not in (".", "..")
                            for f in files):
        raise bad("files", f"expected plain file names in the shard folder, got {files}")
    for name, t in man["tensors"].items():
        where = f"tensors[{name!r}]"
        if not isinstance(t, dict):
            raise bad(where, "expected an object")
        for key, typ in TENSOR_FIELDS.items():
            if key not in t:
                raise Invalid(f"{where}: missing field {key!r}")
            if not _is(t[key], typ):
                raise Invalid(f"{where}: field {key!r}: expected {_type_name(typ)}, got {t[key]!r}")
        if t["file"] not in files:
            raise Invalid(f"{where}: field 'file': {t['file']!r} is not listed in 'files'")
        if t["dtype"] not in DTYPES and not is_block_quantized(t["dtype"]):
            raise Invalid(f"{where}: field 'dtype': unsupported {t['dtype']!r}")
        if not all(_is(s, int) and s >= 0 for s in t["shape"]):
            raise Invalid(f"{where}: field 'shape': expected non-negative integers, got {t['shape']}")
        if t["nbytes"] != entry_nbytes(t["dtype"], t["shape"]):
            raise Invalid(f"{where}: field 'nbytes': {t['nbytes']} does not match shape {t['shape']} {t['dtype']}")


def entry_nbytes(dtype: str, shape: list[int]) -> int:
    """Stored bytes of a manifest tensor: elements x itemsize, or whole ggml blocks (quantized slices)."""
    if is_block_quantized(dtype):
        return tensor_nbytes(dtype, tuple(shape)) if shape else -1
    return int(np.prod(shape, dtype=np.int64)) * DTYPES[dtype].itemsize


def read_manifest(shard_dir: str) -> Manifest:
    """Load and validate `shard_dir/manifest.json`; errors name the file and the field."""
    path = os.path.join(shard_dir, MANIFEST_FILE)
    return load(Manifest, read_json(path), path)


def tensor_record(file: str, shape: tuple[int, ...], dtype: str, offset: int, nbytes: int, crc32: int) -> dict[str, Any]:
    """One entry of the manifest's "tensors": where a tensor is in the folder, and its CRC32."""
    return {"file": file, "shape": list(shape), "dtype": dtype, "offset": offset, "nbytes": nbytes, "crc32": crc32}


def canonical_hash(obj: Any) -> str:
    """sha256 of `obj` as canonical JSON (sorted keys, no spaces)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def shard_fingerprint(config: dict[str, Any], layouts: list[Layout], layer_map: list[int], source: str) -> str:
    """The fingerprint of a set of shard folders: sha256 of the canonical config, every rank's layout (world
    size and the effect of the ratios: ratios giving the same layouts give interchangeable shards), the layer
    map and the source digest (which weights). Every input is in each rank's manifest, so each rank
    recomputes it at load (`check_fingerprint`) instead of trusting the stored value."""
    return canonical_hash({"format": FORMAT, "config": config, "layouts": [lay.to_json() for lay in layouts],
                           "layer_map": layer_map, "source": source})


def _split(config: dict[str, Any], world_size: int, ratios: list[float], private_layers: int,
           source: str) -> list[Layout]:
    cfg = ModelConfig.from_dict(config, source=f"{source}: config")
    try:
        return split_layouts(cfg, world_size, ratios, private_layers)
    except TpiError as e:
        raise TpiError(f"{source}: field 'ratios': {e}") from None


def refingerprint(doc: dict[str, Any], source: str = MANIFEST_FILE) -> str:
    """The fingerprint a manifest document (a parsed manifest.json) must carry, recomputed from its config,
    world size, ratios, layout's private layers, layer map and source digest (for tools that rewrite a
    manifest's config or layer map)."""
    layouts = _split(doc["config"], doc["world_size"], doc["ratios"], Layout.from_json(doc["layout"]).private_layers,
                     source)
    return shard_fingerprint(doc["config"], layouts, doc["layer_map"], doc["source"])


def check_fingerprint(man: Manifest, path: str) -> str:
    """Recompute `man`'s fingerprint from its own fields; TpiError naming `path` unless the layout is the one
    its config and ratios give and the stored fingerprint equals the recomputed one. Returns it."""
    layouts = _split(man.config, man.world_size, man.ratios, man.layout.private_layers, path)
    if layouts[man.rank] != man.layout:
        raise TpiError(f"{path}: field 'layout': {man.layout.to_json()} is not what its config and ratios give "
                       f"({layouts[man.rank].to_json()}); the manifest was edited or is corrupt, re-run tpi shard")
    fp = shard_fingerprint(man.config, layouts, man.layer_map, man.source)
    if fp != man.fingerprint:
        raise TpiError(f"{path}: field 'fingerprint': does not match the manifest's contents (config, ratios, "
                       f"layer_map, source); the manifest was edited or is corrupt, re-run tpi shard")
    return fp


def new_manifest(*, fingerprint: str, source: str, rank: int, world_size: int, ratios: list[float], layout: Layout,
                 config: dict[str, Any], generation: dict[str, Any] | None, layer_map: list[int],
                 tensors: dict[str, dict[str, Any]], synthetic: dict[str, Any] | None = None,
                 master_files: dict[str, int] | None = None) -> Manifest:
    """A validated manifest for one rank's folder (`synthetic` only for synthetic shards)."""
    doc = {"format": FORMAT, "fingerprint": fingerprint, "source": source, "rank": rank, "world_size": world_size,
           "ratios": ratios, "layout": layout.to_json(), "config": config, "generation_config": generation,
           "layer_map": layer_map, "files": [SHARD_FILE], "tensors": tensors}
    if synthetic is not None:
        doc["synthetic"] = synthetic
    if master_files:
        doc["master_files"] = master_files
    label = f"rank {rank}: {MANIFEST_FILE}"
    man = load(Manifest, doc, label)
    check_fingerprint(man, label)  # a writer's fingerprint must be the one every load recomputes
    return man


def manifest_text(man: dict[str, Any]) -> str:
    """The manifest as JSON with one line per top-level field and one line per tensor, for reading by eye."""
    def one(v: Any) -> str:
        return json.dumps(v, separators=(", ", ": "))

    fields = []
    for key, value in man.items():
        if key == "tensors":
            rows = ",\n".join(f"  {json.dumps(name)}: {one(t)}" for name, t in value.items())
            fields.append(f' "tensors": {{\n{rows}\n }}')
        else:
            fields.append(f" {json.dumps(key)}: {one(value)}")
    return "{\n" + ",\n".join(fields) + "\n}\n"
