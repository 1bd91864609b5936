"""`tpi synth`: write a synthetic HF-layout Llama checkpoint (random weights, real trained BPE tokenizer).

Owns: the architecture presets (true shapes of the paper's models plus tiny test models), the
synthetic tokenizer, and a streaming safetensors writer. Must not touch the inference code: what it
writes is an ordinary HF checkpoint that `transformers.LlamaForCausalLM` and our loader both read.

Output folder (built in `OUT.tmp-XXXX`, then renamed, so a failure leaves nothing half-written):
    config.json              LlamaForCausalLM, transformers-4 keys (torch_dtype, rope_theta, rope_scaling)
    generation_config.json   bos/eos ids
    model.safetensors        or model-0000i-of-0000n.safetensors + model.safetensors.index.json
    tokenizer.json           byte-level BPE trained on a built-in corpus, padded to vocab_size
    tokenizer_config.json    special tokens + chat template (llama-3 or llama-2 [INST] style)

Weights are never all in memory: the safetensors header is computed from shapes, then each tensor
is generated and written in blocks of `CHUNK_ELEMS` elements.

Random weights. Each tensor has its own generator, seeded by (seed, crc32(name)), and one stream
of float32 draws that does not depend on chunking, dtype, sharding or `--layers`: a bf16 checkpoint
is the f32 one rounded, and layer i is the same whatever the layer count. Draws are uniform with
the variance of the intended normal (NumPy's float32 normals run at ~0.3 GB/s, uniforms at ~1.6 GB/s,
and a layer's output is Gaussian anyway by the central limit theorem). Scales:
    2-D weights (out, in), embeddings and lm_head   std 1/sqrt(in)   (~0.016 at D=4096, like trained Llamas)
    RMSNorm weights                                  1 + 0.1 * noise  (not all ones, so a missed norm shows)
    biases                                           0.1 * noise
With 1/sqrt(in), each projection keeps unit variance: attention scores have std ~1 (so attention is
not uniform and RoPE/mask bugs change outputs), every layer adds O(1) to the residual stream (which
grows like sqrt(layers), never exponentially: each block reads it through an RMSNorm), and logits
have std ~1 at any width.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import random
import re
import shutil
import struct
import sys
import tempfile
import time
import zlib
from functools import lru_cache
from pathlib import Path
from typing import Any

from tpicore.errors import TpiError

GiB = 1 << 30
MiB = 1 << 20
DEFAULT_MAX_SHARD_BYTES = 2 * GiB
CHUNK_ELEMS = 2 * MiB  # elements per generated block: 8 MiB of float32 scratch, whatever the width
PROGRESS_MIN_BYTES = 256 * MiB  # show a progress bar for writes bigger than this

DTYPES = {  # --dtype -> (safetensors dtype, torch_dtype in config.json, bytes per element)
    "f32": ("F32", "float32", 4),
    "f16": ("F16", "float16", 2),
    "bf16": ("BF16", "bfloat16", 2),
}

# ---------------------------------------------------------------------------------------------
# Vocabulary layout (which id each special token gets; needed by the presets' bos/eos ids)
# ---------------------------------------------------------------------------------------------

LLAMA3_NAMED_SPECIALS = (
    "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>", "<|reserved_special_token_2|>", "<|start_header_id|>", "<|end_header_id|>",
    "<|eom_id|>", "<|eot_id|>", "<|python_tag|>",
)

_ASCII_BYTES = [9, 10] + list(range(32, 127))  # tab, newline, printable ASCII: the tiny alphabet


class _VocabLayout:
    """Where ids go: [lead specials][trained BPE][<|reserved_N|> fillers][tail specials] = vocab_size.

    llama2 style: <unk> 0, <s> 1, </s> 2 lead (as in Llama 2). llama3 style: the special tokens sit at
    the end as in Llama 3 (<|begin_of_text|> = 128000 when vocab_size is 128256): 256 of them when the
    vocabulary is large, only the 11 named ones in tiny test vocabularies.
    """

    def __init__(self, style: str, vocab_size: int) -> None:
        self.style = style
        self.lead: list[str] = []
        self.tail: list[str] = []
        if style == "llama2":
            self.lead = ["<unk>", "<s>", "</s>"]
            self.bos, self.eos, self.unk = "<s>", "</s>", "<unk>"
            self.eos_tokens = ["</s>"]
        else:
            self.tail = list(LLAMA3_NAMED_SPECIALS)
            if vocab_size >= 1024:
                self.tail += [f"<|reserved_special_token_{i}|>" for i in range(3, 3 + 256 - len(self.tail))]
            self.bos, self.eos, self.unk = "<|begin_of_text|>", "<|eot_id|>", None
            self.eos_tokens = ["<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"]
        self.room = vocab_size - len(self.lead) - len(self.tail)  # ids for trained tokens + fillers
        if self.room < len(_ASCII_BYTES):
            raise TpiError(f"vocab_size {vocab_size} is too small for a synthetic {style} tokenizer "
                           f"(minimum {len(_ASCII_BYTES) + len(self.lead) + len(self.tail)})")
        self.vocab_size = vocab_size
        ids = {tok: i for i, tok in enumerate(self.lead)}
        ids.update({tok: vocab_size - len(self.tail) + i for i, tok in enumerate(self.tail)})
        self.ids = ids
        self.bos_id = ids[self.bos]
        self.eos_ids = [ids[t] for t in self.eos_tokens]


@lru_cache(maxsize=None)
def _vocab_layout(style: str, vocab_size: int) -> _VocabLayout:
    return _VocabLayout(style, vocab_size)


# ---------------------------------------------------------------------------------------------
# Presets
# ---------------------------------------------------------------------------------------------

LLAMA3_ROPE_SCALING = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                       "original_max_position_embeddings": 8192, "rope_type": "llama3"}

# name -> shapes and settings. Paper models: /work/shared/paper_tables.yaml (TPI-LLM, arXiv 2410.00531).
_PRESET_SPECS: dict[str, dict[str, Any]] = {
    "llama-2-3b": dict(hidden=3200, layers=26, heads=32, kv_heads=32, ffn=8640, vocab=32000),
    "llama-2-7b": dict(hidden=4096, layers=32, heads=32, kv_heads=32, ffn=11008, vocab=32000),
    "llama-2-13b": dict(hidden=5120, layers=40, heads=40, kv_heads=40, ffn=13824, vocab=32000),
    "llama-2-70b": dict(hidden=8192, layers=80, heads=64, kv_heads=8, ffn=28672, vocab=32000),
    "llama-3.1-8b": dict(hidden=4096, layers=32, heads=32, kv_heads=8, ffn=14336, vocab=128256,
                         rope_theta=500000.0, max_pos=131072, rope_scaling=LLAMA3_ROPE_SCALING),
    "llama-3.1-70b": dict(hidden=8192, layers=80, heads=64, kv_heads=8, ffn=28672, vocab=128256,
                          rope_theta=500000.0, max_pos=131072, rope_scaling=LLAMA3_ROPE_SCALING),
    "yi-34b": dict(hidden=7168, layers=60, heads=56, kv_heads=8, ffn=20480, vocab=64000,
                   rope_theta=5000000.0),
    "tinyllama-1.1b": dict(hidden=2048, layers=22, heads=32, kv_heads=4, ffn=5632, vocab=32000, max_pos=2048),
    "small-100m": dict(hidden=768, layers=12, heads=12, kv_heads=4, ffn=2048, vocab=32000, max_pos=2048),
    # Tiny test models: odd sizes (vocab 131, FFN 80) so that shape mix-ups fail loudly.
    "tiny": dict(hidden=48, layers=3, heads=4, kv_heads=2, ffn=80, vocab=131, max_pos=256),
    "tiny-mha": dict(hidden=64, layers=2, heads=4, kv_heads=4, ffn=96, vocab=131, max_pos=256),
    # original_max_position_embeddings=64 puts this head size's RoPE frequencies in all three bands
    # of llama3 scaling (kept, interpolated, divided by factor).
    "tiny-llama3": dict(hidden=64, layers=2, heads=4, kv_heads=2, ffn=112, vocab=160, max_pos=512,
                        rope_theta=500000.0,
                        rope_scaling=dict(LLAMA3_ROPE_SCALING, original_max_position_embeddings=64)),
    "tiny-headdim": dict(hidden=48, layers=2, heads=4, kv_heads=2, ffn=80, vocab=131, max_pos=256, head_dim=16),
    "tiny-bias": dict(hidden=48, layers=2, heads=4, kv_heads=2, ffn=80, vocab=131, max_pos=256,
                      attention_bias=True, mlp_bias=True),
    "tiny-tied": dict(hidden=48, layers=2, heads=4, kv_heads=2, ffn=80, vocab=131, max_pos=256, tie=True),
}


def validate_config(config: dict, source: str = "config") -> None:
    """Check the fields the writer relies on; TpiError naming the field and the bad value."""
    for field in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "head_dim", "vocab_size"):
        value = config.get(field)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise TpiError(f"{source}: {field} must be a positive integer, got {value!r}")
    heads, kv = config["num_attention_heads"], config["num_key_value_heads"]
    if heads % kv:
        raise TpiError(f"{source}: num_attention_heads ({heads}) must be a multiple of "
                       f"num_key_value_heads ({kv})")


def tokenizer_style(config: dict) -> str:
    """"llama3" (<|begin_of_text|>, header tokens) or "llama2" (<s>, </s>, [INST]) for a config."""
    scaling = config.get("rope_scaling") or config.get("rope_parameters") or {}  # transformers 4 or 5
    if scaling.get("rope_type", scaling.get("type")) == "llama3" or config["vocab_size"] >= 100_000:
        return "llama3"
    return "llama2"


def llama_config(*, hidden: int, layers: int, heads: int, kv_heads: int, ffn: int, vocab: int,
                 rope_theta: float = 10000.0, max_pos: int = 4096, rope_scaling: dict | None = None,
                 head_dim: int | None = None, attention_bias: bool = False, mlp_bias: bool = False,
                 tie: bool = False, rms_norm_eps: float = 1e-5, source: str = "config") -> dict:
    """A transformers-4 style LlamaForCausalLM config.json dict, bos/eos ids matching our tokenizer.

    `source` names where the values came from in error messages.
    """
    if head_dim is None and isinstance(heads, int) and heads > 0:
        head_dim = hidden // heads
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": ffn,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "vocab_size": vocab,
        "max_position_embeddings": max_pos,
        "rms_norm_eps": rms_norm_eps,
        "rope_theta": float(rope_theta),
        "rope_scaling": copy.deepcopy(rope_scaling),
        "hidden_act": "silu",
        "attention_bias": attention_bias,
        "attention_dropout": 0.0,
        "mlp_bias": mlp_bias,
        "initializer_range": 0.02,
        "pretraining_tp": 1,
        "tie_word_embeddings": tie,
        "use_cache": True,
        "torch_dtype": "float32",
        "transformers_version": "4.46.0",
    }
    validate_config(config, source)
    try:
        layout = _vocab_layout(tokenizer_style(config), vocab)
    except TpiError as e:
        raise TpiError(f"{source}: {e}") from None
    config["bos_token_id"] = layout.bos_id
    config["eos_token_id"] = layout.eos_ids[0] if len(layout.eos_ids) == 1 else list(layout.eos_ids)
    return config


PRESETS: dict[str, dict] = {name: llama_config(**spec) for name, spec in _PRESET_SPECS.items()}


def preset_config(name: str) -> dict:
    """A fresh copy of a preset's HF config dict; TpiError naming the presets if unknown."""
    if name not in PRESETS:
        raise TpiError(f"unknown preset {name!r}: expected one of {', '.join(PRESETS)}")
    return copy.deepcopy(PRESETS[name])


def config_from_file(path: str | Path) -> dict:
    """Our config for the dims of an existing config.json (transformers 4 or 5 keys; a folder works too)."""
    p = Path(path)
    if p.is_dir():
        p = p / "config.json"
    try:
        src = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TpiError(f"{p}: cannot read config ({e})") from None
    if not isinstance(src, dict):
        raise TpiError(f"{p}: expected a JSON object")
    if src.get("model_type") != "llama":
        raise TpiError(f"{p}: model_type is {src.get('model_type')!r}, expected 'llama'")
    # transformers 5 puts RoPE settings under rope_parameters; transformers 4 uses rope_theta/rope_scaling.
    rope = dict(src.get("rope_parameters") or {})
    theta = rope.pop("rope_theta", src.get("rope_theta", 10000.0))
    scaling = src.get("rope_scaling")
    if rope and rope.get("rope_type", "default") != "default":
        scaling = rope
    try:
        hidden, heads = src["hidden_size"], src["num_attention_heads"]
        return llama_config(
            hidden=hidden, layers=src["num_hidden_layers"], heads=heads,
            kv_heads=src.get("num_key_value_heads") or heads, ffn=src["intermediate_size"],
            vocab=src["vocab_size"], rope_theta=theta, max_pos=src.get("max_position_embeddings", 4096),
            rope_scaling=scaling, head_dim=src.get("head_dim") or hidden // heads,
            attention_bias=bool(src.get("attention_bias", False)), mlp_bias=bool(src.get("mlp_bias", False)),
            tie=bool(src.get("tie_word_embeddings", False)), rms_norm_eps=src.get("rms_norm_eps", 1e-5),
            source=str(p))
    except KeyError as e:
        raise TpiError(f"{p}: missing field {e.args[0]!r}") from None
    except TypeError as e:
        raise TpiError(f"{p}: bad field type ({e})") from None


def resolve_arch(arch: str) -> dict:
    """ARCH on the command line: a preset name, or a path to a config.json (or its folder)."""
    if arch in PRESETS:
        return preset_config(arch)
    if os.path.exists(arch):
        return config_from_file(arch)
    raise TpiError(f"unknown ARCH {arch!r}: expected a preset ({', '.join(PRESETS)}) "
                   f"or a path to a config.json")


# ---------------------------------------------------------------------------------------------
# Tensors
# ---------------------------------------------------------------------------------------------

def checkpoint_tensors(config: dict) -> list[tuple[str, tuple[int, ...]]]:
    """(HF name, shape) of every tensor, in file order. Linear weights are (out, in) as in HF."""
    D, F, V = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    H, Hkv, Dh = config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]
    attn_bias, mlp_bias = config.get("attention_bias", False), config.get("mlp_bias", False)
    out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (V, D))]
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out.append((p + "input_layernorm.weight", (D,)))
        for proj, (rows, cols) in (("q_proj", (H * Dh, D)), ("k_proj", (Hkv * Dh, D)),
                                   ("v_proj", (Hkv * Dh, D)), ("o_proj", (D, H * Dh))):
            out.append((f"{p}self_attn.{proj}.weight", (rows, cols)))
            if attn_bias:
                out.append((f"{p}self_attn.{proj}.bias", (rows,)))
        out.append((p + "post_attention_layernorm.weight", (D,)))
        for proj, (rows, cols) in (("gate_proj", (F, D)), ("up_proj", (F, D)), ("down_proj", (D, F))):
            out.append((f"{p}mlp.{proj}.weight", (rows, cols)))
            if mlp_bias:
                out.append((f"{p}mlp.{proj}.bias", (rows,)))
    out.append(("model.norm.weight", (D,)))
    if not config.get("tie_word_embeddings", False):
        out.append(("lm_head.weight", (V, D)))
    return out


def param_count(config: dict) -> int:
    return sum(math.prod(shape) for _, shape in checkpoint_tensors(config))


def _init_rule(name: str, shape: tuple[int, ...]) -> tuple[float, float]:
    """(offset, std) of a tensor's values: see the module docstring for why these scales."""
    if len(shape) == 2:
        return 0.0, 1.0 / math.sqrt(shape[1])
    if name.endswith("norm.weight"):
        return 1.0, 0.1
    return 0.0, 0.1  # bias


def _tensor_seed(seed: int, name: str) -> list[int]:
    return [seed, zlib.crc32(name.encode())]


def generate_tensor(name: str, shape: tuple[int, ...], seed: int = 0) -> Any:
    """The float32 values `write_checkpoint` writes for one tensor (whole, in memory: for tests)."""
    import numpy as np

    out = np.empty(shape, dtype=np.float32)
    _fill(np.random.default_rng(_tensor_seed(seed, name)), out.reshape(-1), *_init_rule(name, shape))
    return out


def _fill(rng: Any, buf: Any, offset: float, std: float) -> None:
    """buf[:] = offset + std * (unit-variance uniform noise), float32, in place."""
    rng.random(out=buf, dtype=buf.dtype)
    buf -= 0.5
    buf *= std * math.sqrt(12.0)  # uniform on [-0.5, 0.5) has variance 1/12
    if offset:
        buf += offset


# ---------------------------------------------------------------------------------------------
# Streaming safetensors writer
# ---------------------------------------------------------------------------------------------

def _safetensors_header(tensors: list[tuple[str, tuple[int, ...]]], st_dtype: str, elem_bytes: int) -> bytes:
    """JSON header with data_offsets in file order, space-padded to a multiple of 8 bytes."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in tensors:
        nbytes = math.prod(shape) * elem_bytes
        header[name] = {"dtype": st_dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    return raw + b" " * (-len(raw) % 8)


class _Progress:
    """A one-line `\\r` progress bar on stderr: MiB written / total and the rate."""

    def __init__(self, total_bytes: int, enabled: bool) -> None:
        self.total_bytes, self.enabled = total_bytes, enabled
        self.done_bytes = 0
        self.t0 = self.last = time.monotonic()

    def add(self, nbytes: int) -> None:
        self.done_bytes += nbytes
        now = time.monotonic()
        if self.enabled and (now - self.last >= 0.5 or self.done_bytes >= self.total_bytes):
            self.last = now
            rate = self.done_bytes / max(now - self.t0, 1e-9) / MiB
            pct = 100.0 * self.done_bytes / max(self.total_bytes, 1)
            sys.stderr.write(f"\rwriting weights {self.done_bytes / MiB:9.0f} / {self.total_bytes / MiB:.0f} MiB "
                             f"({pct:5.1f}%)  {rate:6.0f} MiB/s")
            sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")
            sys.stderr.flush()


def _write_safetensors(path: Path, tensors: list[tuple[str, tuple[int, ...]]], dtype: str, seed: int,
                       progress: _Progress) -> None:
    """Header, then each tensor in blocks of CHUNK_ELEMS elements, then fsync.

    Generation runs at ~1.2 GB/s of float32 and the disk takes ~0.4 GB/s, so a single background
    thread writes block k while block k+1 is generated (write() releases the GIL). Two output
    buffers alternate; waiting for write k-1 before submitting k guarantees the one being filled is free.
    """
    from concurrent.futures import Future, ThreadPoolExecutor

    import numpy as np

    st_dtype, _, elem_bytes = DTYPES[dtype]
    if dtype == "bf16":
        import ml_dtypes
        out_dtype = np.dtype(ml_dtypes.bfloat16)
    else:
        out_dtype = np.dtype({"f32": "<f4", "f16": "<f2"}[dtype])
    header = _safetensors_header(tensors, st_dtype, elem_bytes)
    block_elems = min(CHUNK_ELEMS, max(math.prod(s) for _, s in tensors))
    # Allocated once and reused: first touch of fresh memory costs as much as the work itself.
    outputs = [np.empty(block_elems, dtype=out_dtype) for _ in range(2)]
    scratch = None if dtype == "f32" else np.empty(block_elems, dtype=np.float32)
    pending: Future | None = None
    with open(path, "wb") as f, ThreadPoolExecutor(max_workers=1) as writer:
        f.write(struct.pack("<Q", len(header)))
        f.write(header)
        k = 0
        for name, shape in tensors:
            rng = np.random.default_rng(_tensor_seed(seed, name))
            offset, std = _init_rule(name, shape)
            n = math.prod(shape)
            for start in range(0, n, block_elems):  # the stream of draws does not depend on the block size
                count = min(block_elems, n - start)
                out = outputs[k % 2][:count]
                if scratch is None:
                    _fill(rng, out, offset, std)
                else:
                    _fill(rng, scratch[:count], offset, std)
                    np.copyto(out, scratch[:count], casting="unsafe")  # rounds to nearest even
                if pending is not None:
                    pending.result()  # re-raises a write error (e.g. disk full) here
                pending = writer.submit(f.write, out.view(np.uint8))
                progress.add(count * elem_bytes)
                k += 1
        if pending is not None:
            pending.result()
        f.flush()
        os.fsync(f.fileno())


def _plan_shards(tensors: list[tuple[str, tuple[int, ...]]], elem_bytes: int, max_shard_bytes: int,
                 num_shards: int | None) -> list[list[tuple[str, tuple[int, ...]]]]:
    """Split tensors, in order, into shards: greedily under max_shard_bytes, or into ~num_shards equal parts."""
    sizes = [math.prod(shape) * elem_bytes for _, shape in tensors]
    total = sum(sizes)
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    if num_shards is not None:
        start, current = 0, 0
        for item, size in zip(tensors, sizes):
            want = min(num_shards - 1, start * num_shards // max(total, 1))
            if want > current and shards[-1]:
                shards.append([])
                current = want
            shards[-1].append(item)
            start += size
        return shards
    used = 0
    for item, size in zip(tensors, sizes):
        if shards[-1] and used + size > max_shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append(item)
        used += size
    return shards


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def write_checkpoint(config: dict, out_dir: str | Path, dtype: str = "f32", seed: int = 0, *,
                     max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, num_shards: int | None = None,
                     force: bool = False, progress: bool | None = None) -> Path:
    """Write a complete HF-layout checkpoint for `config` into `out_dir`; return its path.

    `num_shards` forces a split into about that many files (for tests); otherwise files are cut at
    `max_shard_bytes`. `progress=None` shows a bar when the weights exceed 256 MiB. An existing
    non-empty `out_dir` is refused unless `force` (and even then only if it holds a config.json).
    """
    if dtype not in DTYPES:
        raise TpiError(f"dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    if max_shard_bytes < 1:
        raise TpiError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    if num_shards is not None and num_shards < 1:
        raise TpiError(f"num_shards must be positive, got {num_shards}")
    if sys.byteorder != "little":
        raise TpiError("safetensors are little-endian; this writer runs on little-endian hosts only")
    config = copy.deepcopy(config)
    if config.get("head_dim") is None and config.get("num_attention_heads"):  # optional in HF configs
        config["head_dim"] = config.get("hidden_size", 0) // config["num_attention_heads"]
    validate_config(config)
    config.pop("dtype", None)  # transformers-5 name of torch_dtype: keep one, ours
    config.setdefault("max_position_embeddings", 4096)
    config.setdefault("transformers_version", "4.46.0")
    st_dtype, torch_dtype, elem_bytes = DTYPES[dtype]
    style = tokenizer_style(config)
    layout = _vocab_layout(style, config["vocab_size"])
    config["torch_dtype"] = torch_dtype
    config["bos_token_id"] = layout.bos_id
    config["eos_token_id"] = layout.eos_ids[0] if len(layout.eos_ids) == 1 else list(layout.eos_ids)

    out = Path(out_dir)
    _check_out_dir(out, force)
    tensors = checkpoint_tensors(config)
    weight_bytes = sum(math.prod(s) for _, s in tensors) * elem_bytes
    out.parent.mkdir(parents=True, exist_ok=True)
    free_bytes = shutil.disk_usage(out.parent).free
    if weight_bytes + 64 * MiB > free_bytes:
        raise TpiError(f"{out.parent}: not enough free disk space: need {weight_bytes / GiB:.2f} GiB, "
                       f"have {free_bytes / GiB:.2f} GiB")

    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".tmp-", dir=out.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; the result is an ordinary folder
        _write_json(tmp / "config.json", config)
        _write_json(tmp / "generation_config.json", {
            "bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"],
            "transformers_version": config["transformers_version"]})
        (tmp / "tokenizer.json").write_text(build_tokenizer_json(style, config["vocab_size"]), encoding="utf-8")
        _write_json(tmp / "tokenizer_config.json", tokenizer_config_dict(config))

        shards = _plan_shards(tensors, elem_bytes, max_shard_bytes, num_shards)
        bar = _Progress(weight_bytes, weight_bytes > PROGRESS_MIN_BYTES if progress is None else progress)
        if len(shards) == 1:
            _write_safetensors(tmp / "model.safetensors", tensors, dtype, seed, bar)
        else:
            weight_map = {}
            for i, shard in enumerate(shards):
                fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                _write_safetensors(tmp / fname, shard, dtype, seed, bar)
                weight_map.update({name: fname for name, _ in shard})
            _write_json(tmp / "model.safetensors.index.json",
                        {"metadata": {"total_size": weight_bytes}, "weight_map": weight_map})
        bar.close()
        _install_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _check_out_dir(out: Path, force: bool) -> None:
    if not out.exists():
        return
    if not out.is_dir():
        raise TpiError(f"{out}: exists and is not a directory")
    if not any(out.iterdir()):
        return
    if not force:
        raise TpiError(f"{out}: exists and is not empty (pass --force to replace it)")
    if not (out / "config.json").exists():
        raise TpiError(f"{out}: not empty and holds no config.json; refusing to replace it even with --force")


def _install_dir(tmp: Path, out: Path) -> None:
    """Move the finished folder to `out`; an old `out` is swapped aside first and then deleted."""
    if out.exists() and any(out.iterdir()):
        old = Path(tempfile.mkdtemp(prefix=out.name + ".old-", dir=out.parent))
        os.replace(out, old)  # rename over the empty placeholder
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)  # rename(2) replaces an empty directory


# ---------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------

# Llama-3-Instruct's template.
LLAMA3_CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

# Llama-2-chat's template ([INST] ... [/INST], optional <<SYS>> block in the first user turn).
LLAMA2_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + content.strip() + ' ' + eos_token }}{% endif %}"
    "{% endfor %}"
)


def tokenizer_config_dict(config: dict) -> dict:
    """tokenizer_config.json for our synthetic tokenizer of `config`: special tokens and chat template."""
    style = tokenizer_style(config)
    layout = _vocab_layout(style, config["vocab_size"])
    tc: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": layout.bos,
                          "eos_token": layout.eos}
    if style == "llama2":
        # As in Llama 2's files (Llama 3's rely on the post-processor alone); both agree with tokenizer.json.
        tc.update(unk_token=layout.unk, add_bos_token=True, add_eos_token=False)
    tc.update(clean_up_tokenization_spaces=False, model_max_length=config["max_position_embeddings"],
              chat_template=LLAMA3_CHAT_TEMPLATE if style == "llama3" else LLAMA2_CHAT_TEMPLATE)
    return tc


def _byte_level_chars() -> dict[int, str]:
    """GPT-2's byte -> printable character map, as used by the ByteLevel pre-tokenizer."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars



_WORDS = """
the of and to in is was for on that with as by at from his her they this which we you it be are have had
not but all were when there can an one their been has more if will would who so no out up about into them
than its only other some time could these two may first then do any like my now over such our man me even
most made after also did many before must through back years where much your way well down should because
each just those people how too little state good very make world still own see men work long get here
between both life being under never day same another know while last might us great old year off come
since against go came right used take three small large house water light city river mountain garden
window table paper letter story music number word question answer school family friend morning evening
night summer winter spring autumn road bridge train ship engine machine model token layer device network
memory disk speed time second minute hour computer program system data file value matrix vector weight
tensor parallel inference edge laptop phone cluster server message reply signal channel bandwidth latency
green blue red yellow white black bright dark quiet loud warm cold happy careful simple clever strange
open close read write send receive build carry follow find keep leave begin start finish stop travel
walk run think learn teach speak listen watch wait hope try help show tell ask call move play sing
""".split()
_CHAT_LINES = [
    "Hello! How can I help you today?",
    "What is the capital of France? The capital of France is Paris.",
    "Please write a short story about a robot who learns to paint.",
    "Sure, here is a list: 1. apples, 2. bread, 3. milk.",
    "def add(a, b):\n    return a + b",
    "The answer is 42; see section 3.1 (page 7) for details.",
    "I don't know, but I'll try my best to find out.",
    "Thanks a lot - that's exactly what I needed!",
]


@lru_cache(maxsize=1)
def corpus_lines() -> tuple[str, ...]:
    """A few hundred KB of English-ish ASCII text, the same on every run (no downloads)."""
    rng = random.Random(1234)
    lines = list(_CHAT_LINES) * 20
    for _ in range(4000):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(3, 16))]
        if rng.random() < 0.3:
            words.insert(rng.randrange(len(words)), str(rng.randint(0, 99999)))
        text = " ".join(words)
        text = text[0].upper() + text[1:] + rng.choice(".....?!,;:")
        if rng.random() < 0.15:
            text = f"\"{text}\" she said."
        lines.append(text)
    return tuple(lines)


@lru_cache(maxsize=None)
def build_tokenizer_json(style: str, vocab_size: int) -> str:
    """tokenizer.json text of a trained BPE with exactly `vocab_size` ids (cached per process).

    Byte-level BPE (like Llama 3) trained on `corpus_lines()`. Vocabularies too small for the 256-byte
    alphabet (the tiny test models) get a BPE over the byte-level characters of printable ASCII,
    tab and newline only: ASCII text round-trips, other characters become <unk> (llama2 style) or
    are dropped (llama3 style, which has no <unk>). A tiny corpus yields a few thousand merges at
    most; the rest of the vocabulary is `<|reserved_N|>` filler in the BPE vocab, which never
    appears when encoding but decodes to visible text (so random-weight output is not empty).
    """
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
        trainers,
    )

    layout = _vocab_layout(style, vocab_size)
    full_bytes = layout.room >= 256 + 32
    byte_chars = _byte_level_chars()
    alphabet = pre_tokenizers.ByteLevel.alphabet() if full_bytes else [byte_chars[b] for b in _ASCII_BYTES]
    tok = Tokenizer(models.BPE(unk_token=layout.unk))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=len(layout.lead) + layout.room, special_tokens=layout.lead,
                                  initial_alphabet=alphabet, show_progress=False)
    tok.train_from_iterator(corpus_lines(), trainer)

    data = json.loads(tok.to_str())
    vocab = data["model"]["vocab"]
    n_filler = len(layout.lead) + layout.room - len(vocab)
    for i in range(n_filler):
        vocab[f"<|reserved_{i}|>"] = len(vocab)
    tok = Tokenizer.from_str(json.dumps(data))
    if layout.tail:
        tok.add_special_tokens(layout.tail)  # ids continue after the fillers: the tail of the vocab
    bos_id = layout.bos_id
    tok.post_processor = processors.TemplateProcessing(
        single=f"{layout.bos}:0 $A:0", pair=f"{layout.bos}:0 $A:0 {layout.bos}:1 $B:1",
        special_tokens=[(layout.bos, bos_id)])
    got = tok.get_vocab_size(with_added_tokens=True)
    if got != vocab_size or any(tok.token_to_id(t) != i for t, i in layout.ids.items()):
        raise AssertionError(f"synthetic tokenizer layout is off: {got} ids for vocab_size {vocab_size}")
    return tok.to_str()


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------

_SIZE_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "kib": 1 << 10, "m": 10**6, "mb": 10**6,
               "mib": MiB, "g": 10**9, "gb": 10**9, "gib": GiB}


def parse_size_bytes(text: str) -> int:
    """'2GiB', '500MB', '1048576' -> bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _SIZE_UNITS:
        raise argparse.ArgumentTypeError(f"bad size {text!r}: expected e.g. 2GiB, 500MB or a byte count")
    return int(float(m.group(1)) * _SIZE_UNITS[m.group(2).lower()])




