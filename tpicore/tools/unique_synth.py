"""Huge shapes on a small disk: per-device shard folders of a synthetic model with K distinct layers.

Owns `write_unique_shards`, behind `tpi synth ARCH --devices N --unique-layers K --out DIR`. It writes
the folders `tpi shard` would write (tpicore.shard's format: OUT/rank-r/shard.safetensors +
manifest.json, rank 0 also config.json and tokenizer.json) directly from random weights, storing only
K layers and mapping layer l onto stored layer l mod K in the manifest's `layer_map`. A 70B-shaped run
then reads the real number of bytes from disk per token (every logical layer is read, the window drops
the page cache behind it) while the folders take about K/L of the disk space. The outputs of such a
model are meaningless (the same layers repeat); its timing and memory are real.

Weights are exactly `tpi synth`'s (tpicore.synth: per-tensor seeded stream, 1/sqrt(in) scale, norms
near 1), so with K = L the folders hold the same bytes as `tpi synth` followed by `tpi shard`.

Streaming: each stored tensor is generated in row blocks of about synth.CHUNK_ELEMS elements, converted
to the stored dtype and handed to every rank's writer at once (shard.ShardWriter, which fsyncs and drops
its page cache as it goes). Memory stays at a few blocks whatever the model. Atomic: everything is
written to OUT.tmp-<pid> and renamed to OUT at the end; any error removes the temporary folder.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import shutil
import sys
import time
from typing import Any, Iterable

import numpy as np

from tpicore.errors import TpiError
from tpicore.model.config import ModelConfig
from tpicore.model.split import plan_layouts, shard_slice
from tpicore.tools import synth
from tpicore.tools.shard import ShardWriter, check_ratios
from tpicore.weights.manifest import FORMAT, MANIFEST_FILE, SHARD_FILE, manifest_text

NOTE = ("synthetic model with {k} distinct layers repeated over {l}: its outputs are meaningless; "
        "timing and memory are real")


def _fingerprint(doc: Any) -> str:
    return hashlib.sha256(json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _sliced(shape: tuple[int, ...], how) -> tuple[int, ...]:
    if how is True:
        return shape
    axis, start, stop = how
    return shape[:axis] + (stop - start,) + shape[axis + 1:]


def _publish(tmp: str, out: str) -> None:
    """Rename the finished folder to OUT (absent or empty: atomic; else, after _check_out allowed it,
    swap the old one out and delete it)."""
    if os.path.isdir(out) and os.listdir(out):
        old = f"{out}.old-{os.getpid()}"
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        if os.path.isdir(out):
            os.rmdir(out)
        os.replace(tmp, out)


def _check_out(out: str, force: bool) -> None:
    if os.path.islink(out) or (os.path.exists(out) and not os.path.isdir(out)):
        raise TpiError(f"{out}: exists and is not a folder")
    if os.path.isdir(out) and os.listdir(out):
        if not force:
            raise TpiError(f"{out}: already exists and is not empty (use --force to replace it)")
        strangers = [e for e in os.listdir(out) if not (e.startswith("rank-") and os.path.isdir(os.path.join(out, e)))]
        if strangers:
            raise TpiError(f"{out}: does not look like shard output (it holds {strangers[0]!r}); "
                           "refusing to replace it even with --force")


def write_unique_shards(config: dict, out_dir: str, world_size: int, unique_layers: int, dtype: str = "bf16",
                        seed: int = 0, ratios: Iterable[float] | None = None, *, ranks: Iterable[int] | None = None,
                        force: bool = False, quiet: bool = True) -> list[str]:
    """Write OUT/rank-0 .. rank-(N-1) for `config` split over `world_size` devices, storing `unique_layers`
    distinct layers (layer l -> stored layer l mod K). `dtype`: f32, f16 or bf16 (as `tpi synth --dtype`).
    `ranks` limits the output to some ranks (their files are what those devices would hold). Returns the
    folders written, in rank order.
    """

    if dtype not in synth.DTYPES:
        raise TpiError(f"--dtype: expected one of {', '.join(synth.DTYPES)}, got {dtype!r}")
    config = copy.deepcopy(config)
    if config.get("head_dim") is None and config.get("num_attention_heads"):
        config["head_dim"] = config.get("hidden_size", 0) // config["num_attention_heads"]
    synth.validate_config(config)
    st_dtype, torch_dtype, elem_bytes = synth.DTYPES[dtype]
    config["torch_dtype"] = torch_dtype
    config.pop("dtype", None)
    L = config["num_hidden_layers"]
    if not isinstance(unique_layers, int) or not 1 <= unique_layers <= L:
        raise TpiError(f"--unique-layers: expected 1..{L} (the model's layers), got {unique_layers!r}")
    K = unique_layers
    cfg = ModelConfig.from_dict(config, source="config")
    ratios = check_ratios(ratios, world_size)
    layouts = plan_layouts(cfg, world_size, ratios)
    wanted = sorted(set(range(world_size) if ranks is None else ranks))
    if not wanted or not all(0 <= r < world_size for r in wanted):
        raise TpiError(f"ranks: expected values in 0..{world_size - 1}, got {wanted}")
    layer_map = [layer % K for layer in range(L)]
    stored_config = dict(config, num_hidden_layers=K)
    tensors = synth.checkpoint_tensors(stored_config)  # stored layers 0..K-1 + embedding, norm, head
    generation = {k: config[k] for k in ("bos_token_id", "eos_token_id") if k in config}
    synthetic = {"unique_layers": K, "seed": seed, "dtype": dtype, "note": NOTE.format(k=K, l=L)}
    fingerprint = _fingerprint({"format": FORMAT, "config": config, "synthetic": synthetic,
                                "layouts": [lay.to_json() for lay in layouts], "layer_map": layer_map})

    # what each rank stores, in file order
    per_rank: dict[int, list[tuple[str, tuple[int, ...], Any]]] = {r: [] for r in wanted}
    for name, shape in tensors:
        for r in wanted:
            how = shard_slice(name, layouts[r], cfg)
            if how is not False:
                per_rank[r].append((name, _sliced(shape, how), how))
    total = sum(math.prod(s) for r in wanted for _, s, _ in per_rank[r]) * elem_bytes

    out = os.path.abspath(out_dir)
    _check_out(out, force)
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    free = shutil.disk_usage(parent).free
    if total + (64 << 20) > free:
        raise TpiError(f"{parent}: not enough free disk space: need {total / 2**30:.2f} GiB, have {free / 2**30:.2f} GiB")
    tmp = f"{out}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    t0 = time.monotonic()
    writers: dict[int, ShardWriter] = {}
    try:
        os.mkdir(tmp)
        for r in wanted:
            d = os.path.join(tmp, f"rank-{r}")
            os.mkdir(d)
            entries = [(name, st_dtype, shape, math.prod(shape) * elem_bytes) for name, shape, _ in per_rank[r]]
            meta = {"format": FORMAT, "rank": str(r), "world_size": str(world_size), "synthetic": json.dumps(synthetic)}
            writers[r] = ShardWriter(os.path.join(d, SHARD_FILE), entries, meta)
        _stream(tensors, layouts, cfg, writers, dtype, seed, total, quiet)
        for w in writers.values():
            w.finish()
        for r, w in writers.items():
            d = os.path.join(tmp, f"rank-{r}")
            man = {"format": FORMAT, "fingerprint": fingerprint, "rank": r, "world_size": world_size,
                   "ratios": ratios, "layout": layouts[r].to_json(), "config": config, "generation_config": generation,
                   "layer_map": layer_map, "files": [SHARD_FILE],
                   "tensors": {name: {"file": SHARD_FILE, "shape": list(shape), "dtype": st_dtype,
                                      "offset": w.offsets[i], "nbytes": math.prod(shape) * elem_bytes,
                                      "crc32": w.crcs[i]}
                               for i, (name, shape, _) in enumerate(per_rank[r])},
                   "synthetic": synthetic}
            _write(os.path.join(d, MANIFEST_FILE), manifest_text(man))
            if r == 0:  # the master reads the config and tokenizes
                _write(os.path.join(d, "config.json"), json.dumps(config, indent=2) + "\n")
                _write(os.path.join(d, "generation_config.json"), json.dumps(generation, indent=2) + "\n")
                _write(os.path.join(d, "tokenizer.json"),
                       synth.build_tokenizer_json(synth.tokenizer_style(config), config["vocab_size"]))
        for w in writers.values():
            w.close()
        _check_out(out, force)  # again: something may have appeared meanwhile
        _publish(tmp, out)
    except BaseException as e:
        for w in writers.values():
            w.close()
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):
            raise TpiError(f"{e.filename or out}: cannot write shards: {e.strerror or e}") from None
        raise
    if not quiet:
        print(f"synth: wrote {len(wanted)} device folders to {out} ({total / 1e9:.2f} GB) in "
              f"{time.monotonic() - t0:.1f} s; {NOTE.format(k=K, l=L)}", file=sys.stderr)
    return [os.path.join(out, f"rank-{r}") for r in wanted]


def _write(path: str, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _stream(tensors: list, layouts: list, cfg: ModelConfig, writers: dict, dtype: str, seed: int, total: int,
            quiet: bool) -> None:
    """Generate every stored tensor once, in row blocks, and give each rank its part of each block."""

    if dtype == "bf16":
        import ml_dtypes

        out_dtype = np.dtype(ml_dtypes.bfloat16)
    else:
        out_dtype = np.dtype({"f32": "<f4", "f16": "<f2"}[dtype])
    scratch = np.empty(synth.CHUNK_ELEMS, dtype=np.float32)  # reused: first touch costs as much as the work
    conv = np.empty(synth.CHUNK_ELEMS, dtype=out_dtype) if dtype != "f32" else None
    to_make = sum(math.prod(shape) for name, shape in tensors
                  if any(shard_slice(name, layouts[r], cfg) is not False for r in writers))
    done, last = 0, time.monotonic()
    for name, shape in tensors:
        rows = shape[0]
        row = math.prod(shape[1:]) if len(shape) > 1 else 1
        per = max(1, synth.CHUNK_ELEMS // row)
        rng = np.random.default_rng(synth._tensor_seed(seed, name))
        offset, std = synth._init_rule(name, shape)
        hows = {r: shard_slice(name, layouts[r], cfg) for r in writers}
        if all(how is False for how in hows.values()):  # e.g. the embedding when only workers are written
            continue
        for r0 in range(0, rows, per):  # synth's draw stream does not depend on the block size
            r1 = min(rows, r0 + per)
            n = (r1 - r0) * row
            vals = scratch[:n]
            synth._fill(rng, vals, offset, std)
            if conv is not None:
                np.copyto(conv[:n], vals, casting="unsafe")  # rounds to nearest even, as synth does
                vals = conv[:n]
            block = vals.reshape((r1 - r0,) + tuple(shape[1:]))
            for r, w in writers.items():
                how = hows[r]
                if how is False:
                    continue
                if how is True:
                    w.write(name, block)
                elif how[0] == 0:
                    lo, hi = max(how[1], r0), min(how[2], r1)
                    if lo < hi:
                        w.write(name, block[lo - r0: hi - r0])
                else:  # split along the input dim: columns start..stop of every row
                    w.write(name, block[:, how[1]: how[2]])
            done += n
        now = time.monotonic()
        if not quiet and now - last > 2.0:
            last = now
            print(f"synth: {100 * done / to_make:.0f}% of {total / 1e9:.1f} GB written", file=sys.stderr)
