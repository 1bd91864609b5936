"""`tpi synth`: write a synthetic HF-layout Llama checkpoint (random weights, real trained BPE tokenizer).

Layer: tools (imports tpicore.model, tpicore.weights.writer and this package). Owns the checkpoint
folder a synthetic model is written as. Tensor names and shapes come from the table in
tpicore.model.tensors, values from init.py, files are written through tpicore.weights.writer. Must not
touch the inference code: what it writes is an ordinary HF checkpoint that
`transformers.LlamaForCausalLM` and our loader both read.

Output folder (built next to OUT and renamed into place, so a failure leaves nothing half-written):
    config.json              LlamaForCausalLM, transformers-4 keys (torch_dtype, rope_theta, rope_scaling)
    generation_config.json   bos/eos ids
    model.safetensors        or model-0000i-of-0000n.safetensors + model.safetensors.index.json
    tokenizer.json           byte-level BPE trained on a built-in corpus, padded to vocab_size
    tokenizer_config.json    special tokens + chat template (llama-3 or llama-2 [INST] style)

Weights are never all in memory: the safetensors header is computed from shapes, then each tensor is
generated and written in blocks of about CHUNK_ELEMS elements. Generation runs at ~1.2 GB/s of float32
and the disk takes ~0.4 GB/s, so one background thread writes block k while block k+1 is generated
(write() releases the GIL).
"""

from __future__ import annotations

import math
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from tqdm import tqdm

from tpicore.errors import TpiError
from tpicore.model import tensors as table
from tpicore.model.config import ModelConfig
from tpicore.tools.synth.init import BlockGenerator, stored_dtype
from tpicore.tools.synth.presets import validate_config, with_head_dim
from tpicore.tools.synth.tokenizer import (
    build_tokenizer_json,
    tokenizer_config_dict,
    tokenizer_style,
    vocab_layout,
)
from tpicore.weights.integrity import write_checksums
from tpicore.weights.writer import (
    CHECKPOINT,
    Entry,
    SafetensorsWriter,
    progress_bar,
    staged_folder,
    write_json,
    write_text,
)

DEFAULT_MAX_SHARD_BYTES = 2 << 30
FREE_MARGIN_BYTES = 64 << 20  # config, tokenizer and headers on top of the weights

Tensors = list[tuple[str, tuple[int, ...]]]  # (HF name, shape) in file order


def model_config(config: dict, source: str = "config") -> ModelConfig:
    """The ModelConfig of a synthetic config dict (for shapes and the split)."""
    validate_config(config, source)
    return ModelConfig.from_dict(config, source=source)


def checkpoint_tensors(config: dict) -> Tensors:
    """(HF name, shape) of every tensor of `config`'s checkpoint, in file order (tpicore.model.tensors)."""
    return table.checkpoint_tensors(model_config(config))


def param_count(config: dict) -> int:
    return table.param_count(model_config(config))


def _write_safetensors(path: Path, tensors: Tensors, dtype: str, seed: int, progress: tqdm) -> None:
    """One safetensors file: header, then each tensor block by block (written by a background thread)."""
    dt = stored_dtype(dtype)
    entries = [Entry(name, dt.tag, shape, math.prod(shape) * dt.itemsize) for name, shape in tensors]
    gen = BlockGenerator(dt, seed)
    pending: Future | None = None
    with SafetensorsWriter(str(path), entries, {"format": "pt"}, drop_cache=False, crc=False) as out, \
            ThreadPoolExecutor(max_workers=1) as writer:
        for name, shape in tensors:
            for _, _, block in gen.blocks(name, shape):
                if pending is not None:
                    pending.result()  # re-raises a write error (e.g. disk full) here
                pending = writer.submit(out.write, name, block)
                progress.update(block.nbytes)
        if pending is not None:
            pending.result()
        out.finish()


def _cut_files(tensors: Tensors, elem_bytes: int, max_shard_bytes: int, num_shards: int | None) -> list[Tensors]:
    """Split tensors, in order, into files: greedily under max_shard_bytes, or into ~num_shards equal parts."""
    sizes = [math.prod(shape) * elem_bytes for _, shape in tensors]
    total = sum(sizes)
    files: list[Tensors] = [[]]
    if num_shards is not None:
        start, current = 0, 0
        for item, size in zip(tensors, sizes):
            want = min(num_shards - 1, start * num_shards // max(total, 1))
            if want > current and files[-1]:
                files.append([])
                current = want
            files[-1].append(item)
            start += size
        return files
    used = 0
    for item, size in zip(tensors, sizes):
        if files[-1] and used + size > max_shard_bytes:
            files.append([])
            used = 0
        files[-1].append(item)
        used += size
    return files


def synthetic_config(config: dict, torch_dtype: str) -> dict:
    """The config.json a synthetic model is written with: head_dim, defaults, bos/eos of our tokenizer."""
    config = with_head_dim(config)
    validate_config(config)
    config.pop("dtype", None)  # transformers-5 name of torch_dtype: keep one, ours
    config.setdefault("max_position_embeddings", 4096)
    config.setdefault("transformers_version", "4.46.0")
    vocab = vocab_layout(tokenizer_style(config), config["vocab_size"])
    config["torch_dtype"] = torch_dtype
    config["bos_token_id"] = vocab.bos_id
    config["eos_token_id"] = vocab.eos_ids[0] if len(vocab.eos_ids) == 1 else list(vocab.eos_ids)
    return config


def write_checkpoint(config: dict, out_dir: str | Path, dtype: str = "f32", seed: int = 0, *,
                     max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, num_shards: int | None = None,
                     force: bool = False, progress: bool | None = None) -> Path:
    """Write a complete HF-layout checkpoint for `config` into `out_dir`; return its path.

    `num_shards` forces a split into about that many files (for tests); otherwise files are cut at
    `max_shard_bytes`. `progress=None` shows a bar when the weights reach 256 MiB. An existing
    non-empty `out_dir` is refused unless `force` (and even then only if it holds a config.json).
    """
    dt = stored_dtype(dtype)
    if max_shard_bytes < 1:
        raise TpiError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    if num_shards is not None and num_shards < 1:
        raise TpiError(f"num_shards must be positive, got {num_shards}")
    config = synthetic_config(config, dt.torch)
    style = tokenizer_style(config)

    tensors = checkpoint_tensors(config)
    weight_bytes = sum(math.prod(s) for _, s in tensors) * dt.itemsize
    with staged_folder(str(out_dir), force, CHECKPOINT, weight_bytes + FREE_MARGIN_BYTES) as folder:
        tmp = Path(folder)
        write_json(str(tmp / "config.json"), config)
        write_json(str(tmp / "generation_config.json"), {
            "bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"],
            "transformers_version": config["transformers_version"]})
        write_text(str(tmp / "tokenizer.json"), build_tokenizer_json(style, config["vocab_size"]))
        write_json(str(tmp / "tokenizer_config.json"), tokenizer_config_dict(config))

        files = _cut_files(tensors, dt.itemsize, max_shard_bytes, num_shards)
        with progress_bar(weight_bytes, "synth", progress) as bar:
            if len(files) == 1:
                _write_safetensors(tmp / "model.safetensors", tensors, dtype, seed, bar)
            else:
                weight_map = {}
                for i, part in enumerate(files):
                    fname = f"model-{i + 1:05d}-of-{len(files):05d}.safetensors"
                    _write_safetensors(tmp / fname, part, dtype, seed, bar)
                    weight_map.update({name: fname for name, _ in part})
                write_json(str(tmp / "model.safetensors.index.json"),
                           {"metadata": {"total_size": weight_bytes}, "weight_map": weight_map})
        write_checksums(folder)  # every tensor's CRC32: checked whenever the folder is loaded
    return Path(out_dir)
