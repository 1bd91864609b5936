"""The shard folder's manifest: its fields, how it is written, and how it is read and checked.

Layer: weights (imports tpicore.model and tpicore.errors only). One folder per rank holds
`shard.safetensors` and `manifest.json` (format, fingerprint, rank, layout, source config, layer map,
per-tensor file/offset/CRC32). Written by tpicore.tools.shard and tpicore.tools.unique_synth, read by
tpicore.weights.store. Must not read tensor bytes.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

import numpy as np

from tpicore.errors import TpiError
from tpicore.model.config import read_json
from tpicore.model.split import Layout
from tpicore.weights.checkpoint import DTYPES

FORMAT = "tpicore-shard/1"

SHARD_FILE = "shard.safetensors"

MANIFEST_FILE = "manifest.json"

MANIFEST_FIELDS: dict[str, type] = {
    "format": str, "fingerprint": str, "rank": int, "world_size": int, "ratios": list, "layout": dict,
    "config": dict, "layer_map": list, "files": list, "tensors": dict,
}

TENSOR_FIELDS: dict[str, type] = {"file": str, "shape": list, "dtype": str, "offset": int, "nbytes": int, "crc32": int}


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


def _type_name(t: type) -> str:
    return {str: "a string", int: "an integer", list: "a list", dict: "an object"}[t]


def _is(value: Any, t: type) -> bool:
    return isinstance(value, t) and not (t is int and isinstance(value, bool))


def read_manifest(shard_dir: str) -> dict[str, Any]:
    """Load and validate `shard_dir/manifest.json`; errors name the file and the field."""
    path = os.path.join(shard_dir, MANIFEST_FILE)
    man = read_json(path)

    def bad(field: str, what: str) -> TpiError:
        return TpiError(f"{path}: field {field!r}: {what}")

    for key, t in MANIFEST_FIELDS.items():
        if key not in man:
            raise TpiError(f"{path}: missing field {key!r}")
        if not _is(man[key], t):
            raise bad(key, f"expected {_type_name(t)}, got {json.dumps(man[key])[:60]}")
    if man["format"] != FORMAT:
        raise bad("format", f"expected {FORMAT!r}, got {man['format']!r} (written by another version; re-run tpi shard)")
    if not re.fullmatch(r"[0-9a-f]{16,128}", man["fingerprint"]):
        raise bad("fingerprint", f"expected a hex digest, got {man['fingerprint']!r}")
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
                raise TpiError(f"{path}: {where}: missing field {key!r}")
            if not _is(t[key], typ):
                raise TpiError(f"{path}: {where}: field {key!r}: expected {_type_name(typ)}, got {t[key]!r}")
        if t["file"] not in files:
            raise TpiError(f"{path}: {where}: field 'file': {t['file']!r} is not listed in 'files'")
        if t["dtype"] not in DTYPES:
            raise TpiError(f"{path}: {where}: field 'dtype': unsupported {t['dtype']!r}")
        if not all(_is(s, int) and s >= 0 for s in t["shape"]):
            raise TpiError(f"{path}: {where}: field 'shape': expected non-negative integers, got {t['shape']}")
        if t["nbytes"] != int(np.prod(t["shape"], dtype=np.int64)) * DTYPES[t["dtype"]].itemsize:
            raise TpiError(f"{path}: {where}: field 'nbytes': {t['nbytes']} does not match shape {t['shape']} {t['dtype']}")
    return man
