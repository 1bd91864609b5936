"""Huge shapes on a small disk: per-device shard folders of a synthetic model with K distinct layers.

Layer: tools (imports tpicore.model, tpicore.weights, tpicore.tools.shard and this package). Owns
`write_unique_shards`, behind `tpi synth ARCH --devices N --unique-layers K --out DIR`. It writes the
folders `tpi shard` would write (OUT/rank-r/shard.safetensors + manifest.json, rank 0 also config.json
and tokenizer.json) directly from random weights, storing only K layers and mapping layer l onto stored
layer l mod K in the manifest's `layer_map`. A 70B-shaped run then reads the real number of bytes from
disk per token (every logical layer is read, the window drops the page cache behind it) while the
folders take about K/L of the disk space. The outputs of such a model are meaningless (the same layers
repeat); its timing and memory are real. Must not touch the inference code.

Weights are exactly `tpi synth`'s (init.py), so with K = L the folders hold the same bytes as `tpi synth`
followed by `tpi shard`. Each stored tensor is generated once, in row blocks, and every rank's writer
gets its part of each block (tpicore.weights.writer, which fsyncs and drops its page cache as it goes):
memory stays at a few blocks whatever the model. Atomic like every folder tpicore writes.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Iterable

from tqdm import tqdm

from tpicore.errors import TpiError
from tpicore.model.config import ModelConfig
from tpicore.model.split import check_ratios, split_layouts
from tpicore.model.tensors import checkpoint_tensors, shard_slice
from tpicore.tools.gguf_synth import quantize
from tpicore.tools.shard import (
    MASTER_FILES,
    Piece,
    make_piece,
    manifest_tensors,
    piece_rows,
)
from tpicore.tools.synth.checkpoint import model_config
from tpicore.tools.synth.init import DTYPES, BlockGenerator, stored_dtype
from tpicore.tools.synth.presets import with_head_dim
from tpicore.tools.synth.tokenizer import build_tokenizer_json, tokenizer_style
from tpicore.weights.checkpoint import DTYPES as STORED
from tpicore.weights.checkpoint import GGML_TYPES_KEY, TensorInfo
from tpicore.weights.integrity import master_file_crcs
from tpicore.weights.manifest import (
    FORMAT,
    SHARD_FILE,
    canonical_hash,
    new_manifest,
    shard_fingerprint,
)
from tpicore.weights.quant import BLOCK_TAGS, is_block_quantized, tensor_nbytes
from tpicore.weights.writer import (
    RANK_FOLDERS,
    Entry,
    SafetensorsWriter,
    progress_bar,
    staged_folder,
    write_json,
    write_manifest,
    write_text,
)

NOTE = ("synthetic model with {k} distinct layers repeated over {l}: its outputs are meaningless; "
        "timing and memory are real")
FREE_MARGIN_BYTES = 64 << 20  # manifests, config, tokenizer and headers on top of the weights


def write_unique_shards(config: dict, out_dir: str, world_size: int, unique_layers: int, dtype: str = "bf16",
                        seed: int = 0, ratios: Iterable[float] | None = None, *, ranks: Iterable[int] | None = None,
                        force: bool = False, quiet: bool = True) -> list[str]:
    """Write OUT/rank-0 .. rank-(N-1) for `config` split over `world_size` devices, storing `unique_layers`
    distinct layers (layer l -> stored layer l mod K). `dtype`: f32, f16 or bf16 (as `tpi synth --dtype`),
    or a ggml type (q8_0, q4_k, ...: 2-D weights quantized row block by row block as they are generated,
    1-D tensors f32, as in a GGUF; slices as `tpi shard` cuts a GGUF of them). `ranks` limits the output
    to some ranks (their files are what those devices would hold). Returns the folders written, in rank
    order.
    """
    quant = dtype.upper() if dtype.upper() in BLOCK_TAGS else None
    dt = DTYPES["f32"] if quant else stored_dtype(dtype)
    config = with_head_dim(config)
    config["torch_dtype"] = dt.torch
    config.pop("dtype", None)
    cfg = model_config(config)
    L = cfg.num_hidden_layers
    if not isinstance(unique_layers, int) or not 1 <= unique_layers <= L:
        raise TpiError(f"--unique-layers: expected 1..{L} (the model's layers), got {unique_layers!r}")
    K = unique_layers
    ratios = check_ratios(ratios, world_size)
    layouts = split_layouts(cfg, world_size, ratios)
    wanted = sorted(set(range(world_size) if ranks is None else ranks))
    if not wanted or not all(0 <= r < world_size for r in wanted):
        raise TpiError(f"ranks: expected values in 0..{world_size - 1}, got {wanted}")
    layer_map = [layer % K for layer in range(L)]
    stored = ModelConfig.from_dict(dict(config, num_hidden_layers=K), source="config")
    tensors = checkpoint_tensors(stored)  # stored layers 0..K-1 + embedding, norm, head
    generation = {k: config[k] for k in ("bos_token_id", "eos_token_id") if k in config}
    synthetic = {"unique_layers": K, "seed": seed, "dtype": dtype, "note": NOTE.format(k=K, l=L)}
    source = canonical_hash({"format": FORMAT, "synthetic": synthetic})
    fingerprint = shard_fingerprint(config, layouts, layer_map, source)

    # what each rank stores, in file order
    infos = {name: stored_info(name, shape, quant if quant and len(shape) == 2 else dt.tag) for name, shape in tensors}
    pieces: dict[int, list[tuple[TensorInfo, Piece]]] = {r: [] for r in wanted}
    for name, _ in tensors:
        for r in wanted:
            part = shard_slice(name, layouts[r], cfg)
            if part is not None:
                pieces[r].append((infos[name], make_piece(infos[name], part, r)))
    entries = {r: [Entry(info.name, *p.file_entry, p.nbytes) for info, p in pieces[r]] for r in wanted}
    total = sum(e.nbytes for r in wanted for e in entries[r])

    out = os.path.abspath(out_dir)
    t0 = time.monotonic()
    try:
        with staged_folder(out, force, RANK_FOLDERS, total + FREE_MARGIN_BYTES) as tmp:
            writers: dict[int, SafetensorsWriter] = {}
            try:
                for r in wanted:
                    os.mkdir(os.path.join(tmp, f"rank-{r}"))
                    meta = {"format": FORMAT, "rank": str(r), "world_size": str(world_size),
                            "synthetic": json.dumps(synthetic)}
                    ggml = {info.name: p.dtype for info, p in pieces[r] if is_block_quantized(p.dtype)}
                    if ggml:  # U8 tensors that hold ggml blocks
                        meta[GGML_TYPES_KEY] = json.dumps(ggml, separators=(",", ":"))
                    writers[r] = SafetensorsWriter(os.path.join(tmp, f"rank-{r}", SHARD_FILE), entries[r], meta)
                with progress_bar(total, "synth", None if not quiet else False) as bar:
                    _stream(tensors, infos, pieces, writers, BlockGenerator(dt, seed), bar)
                for w in writers.values():
                    w.finish()
            finally:
                for w in writers.values():
                    w.close()
            for r, w in writers.items():
                d = os.path.join(tmp, f"rank-{r}")
                if r == 0:  # the master reads the config and tokenizes
                    write_json(os.path.join(d, "config.json"), config)
                    write_json(os.path.join(d, "generation_config.json"), generation)
                    write_text(os.path.join(d, "tokenizer.json"),
                               build_tokenizer_json(tokenizer_style(config), config["vocab_size"]))
                master_files = master_file_crcs(d, MASTER_FILES) if r == 0 else None  # checked at every load
                write_manifest(d, new_manifest(fingerprint=fingerprint, source=source, rank=r, world_size=world_size, ratios=ratios,
                                               layout=layouts[r], config=config, generation=generation,
                                               layer_map=layer_map, tensors=manifest_tensors(w, pieces[r]),
                                               synthetic=synthetic, master_files=master_files))
    except OSError as e:
        raise TpiError(f"{e.filename or out}: cannot write shards: {e.strerror or e}") from None
    if not quiet:
        print(f"synth: wrote {len(wanted)} device folders to {out} ({total / 1e9:.2f} GB) in "
              f"{time.monotonic() - t0:.1f} s; {NOTE.format(k=K, l=L)}", file=sys.stderr)
    return [os.path.join(out, f"rank-{r}") for r in wanted]


def stored_info(name: str, shape: tuple[int, ...], tag: str) -> TensorInfo:
    """A synthetic tensor as the shard writer sees a source tensor (no file: only its type and size)."""
    nbytes = tensor_nbytes(tag, shape) if is_block_quantized(tag) else math.prod(shape) * STORED[tag].itemsize
    return TensorInfo(name, "", tag, shape, 0, nbytes)


def _stream(tensors: list[tuple[str, tuple[int, ...]]], infos: dict[str, TensorInfo],
            pieces: dict[int, list[tuple[TensorInfo, Piece]]], writers: dict[int, SafetensorsWriter],
            gen: BlockGenerator, progress: tqdm) -> None:
    """Generate every stored tensor once, in row blocks (quantized as generated for a ggml type), and give
    each rank its part of each block."""
    by_rank = {r: {info.name: p for info, p in pieces[r]} for r in writers}
    for name, shape in tensors:
        info = infos[name]
        held = {r: by_rank[r][name] for r in writers if name in by_rank[r]}
        if not held:  # e.g. the embedding when only workers are written
            continue
        for r0, r1, block in gen.blocks(name, shape):  # rows r0..r1 of the tensor
            stored = quantize(block, info.dtype) if is_block_quantized(info.dtype) else block
            for r, piece in held.items():
                rows = piece_rows(stored, info, piece, r0, r1)
                if rows is not None:
                    writers[r].write(name, rows)  # a column range is made contiguous by the writer
            progress.update(stored.nbytes)
