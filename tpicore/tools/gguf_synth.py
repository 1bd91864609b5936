"""Write a GGUF model from one of our HF-layout checkpoints (for tests and experiments).

Layer: tools (imports tpicore.model, tpicore.weights, tpicore.errors and the `gguf` package). Owns turning
an HF folder (config.json, safetensors, tokenizer.json, tokenizer_config.json) into what llama.cpp's
convert_hf_to_gguf.py would write for it: `general.architecture = llama` metadata, the tokenizer in
metadata (byte-level BPE as `gpt2` with merges, SentencePiece-style BPE as `llama` with scores), tensors
under llama.cpp's names with q/k rows permuted for its RoPE, llama3 RoPE scaling as `rope_freqs.weight`,
no `output.weight` for a tied head, and the 2-D weights in one ggml type. Must not be imported by the
inference path: it only writes files.

Quantization: F32/F16/BF16 and Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 through `gguf.quants.quantize` (llama.cpp's
reference rounding); Q4_K, Q5_K and Q6_K, which the package cannot quantize, are built here as valid
blocks with a simple min/max fit (not llama.cpp's search, so not its exact bytes; any valid block tests
the reader). 1-D tensors (norms, biases, rope_freqs) stay F32, as llama.cpp keeps them.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np
from gguf import GGUFWriter, RopeScalingType, TokenType
from gguf.quants import quantize as gguf_quantize

from tpicore.errors import TpiError
from tpicore.model.config import ModelConfig
from tpicore.weights.checkpoint import Checkpoint
from tpicore.weights.gguf import gguf_name
from tpicore.weights.quant import GGML_TYPES, llama_cpp_row_order, tensor_nbytes

QK_K = 256
LLAMA3_SPLIT_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                      r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


# ---------------------------------------------------------------------------------------------
# K-quant blocks (layouts as gguf.quants' dequantizers and ggml-quants.c read them)


def _f16(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(float16 bytes [n, 2], the float32 value they hold [n, 1])."""
    h = x.astype(np.float16)
    return h.reshape(-1, 1).view(np.uint8), h.astype(np.float32).reshape(-1, 1)


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    return np.divide(num, den, out=np.zeros(np.broadcast_shapes(num.shape, den.shape), np.float32), where=den > 0)


def _scale_min_blocks(x: np.ndarray, levels: int) -> tuple[np.ndarray, ...]:
    """Q4_K/Q5_K fit: x [n, 256] -> (d bytes, dmin bytes, 12 scale bytes, q [n, 8, 32] in 0..levels)."""
    n = x.shape[0]
    sub = x.reshape(n, 8, 32)  # 8 sub-blocks of 32
    lo = np.minimum(sub.min(axis=-1), 0.0)  # [n, 8]
    scale = (sub.max(axis=-1) - lo) / levels  # [n, 8]
    d_bytes, d = _f16(scale.max(axis=-1) / 63)
    dmin_bytes, dmin = _f16(-lo.min(axis=-1) / 63)
    sc = np.clip(np.rint(_ratio(scale, d)), 0, 63).astype(np.uint8)  # [n, 8] 6-bit scales
    m = np.clip(np.rint(_ratio(-lo, dmin)), 0, 63).astype(np.uint8)  # [n, 8] 6-bit mins
    step = (d * sc)[..., None]  # [n, 8, 1]
    q = np.clip(np.rint(_ratio(sub + (dmin * m)[..., None], step)), 0, levels).astype(np.uint8)
    scales = np.concatenate([(sc[:, :4] & 63) | ((sc[:, 4:] >> 4) << 6),
                             (m[:, :4] & 63) | ((m[:, 4:] >> 4) << 6),
                             (sc[:, 4:] & 0xF) | ((m[:, 4:] & 0xF) << 4)], axis=1)  # [n, 12]
    return d_bytes, dmin_bytes, scales.astype(np.uint8), q


def _nibbles(q: np.ndarray) -> np.ndarray:
    """Q4_K/Q5_K low nibbles: q [n, 8, 32] -> [n, 128]; byte g*32+l holds sub-blocks 2g (low), 2g+1 (high)."""
    pairs = (q & 0xF).reshape(q.shape[0], 4, 2, 32)
    return (pairs[:, :, 0] | (pairs[:, :, 1] << 4)).reshape(q.shape[0], 128)


def quantize_q4_k(x: np.ndarray) -> np.ndarray:
    """x [n, 256] float32 -> [n, 144] Q4_K blocks: d, dmin (f16), 12 scale bytes, 128 bytes of nibbles."""
    d, dmin, scales, q = _scale_min_blocks(x, 15)
    return np.concatenate([d, dmin, scales, _nibbles(q)], axis=1)


def quantize_q5_k(x: np.ndarray) -> np.ndarray:
    """x [n, 256] float32 -> [n, 176] Q5_K blocks: as Q4_K plus 32 bytes of 5th bits (bit i: sub-block i)."""
    d, dmin, scales, q = _scale_min_blocks(x, 31)
    bits = ((q >> 4) & 1).astype(np.uint8)  # [n, 8, 32]
    qh = np.zeros((q.shape[0], 32), dtype=np.uint8)
    for i in range(8):
        qh |= bits[:, i] << i
    return np.concatenate([d, dmin, scales, qh, _nibbles(q)], axis=1)


def quantize_q6_k(x: np.ndarray) -> np.ndarray:
    """x [n, 256] float32 -> [n, 210] Q6_K blocks: 128 bytes low nibbles, 64 bytes high 2-bit pairs,
    16 int8 scales, d (f16); 16 sub-blocks of 16, values d * scale * (q - 32) with q in 0..63."""
    n = x.shape[0]
    sub = x.reshape(n, 16, 16)
    scale = np.abs(sub).max(axis=-1) / 31  # [n, 16]
    d_bytes, d = _f16(scale.max(axis=-1) / 127)
    sc = np.clip(np.rint(_ratio(scale, d)), -128, 127).astype(np.int8)  # [n, 16]
    step = (d * sc)[..., None]  # [n, 16, 1]
    q = (np.clip(np.rint(_ratio(sub, step)), -32, 31) + 32).astype(np.uint8).reshape(n, QK_K)
    low = (q & 0xF).reshape(n, 2, 2, 64)  # [half, which nibble, 64]
    ql = (low[:, :, 0] | (low[:, :, 1] << 4)).reshape(n, 128)
    high = ((q >> 4) & 3).reshape(n, 2, 4, 32)  # [half, 2-bit slot, 32]
    qh = (high[:, :, 0] | (high[:, :, 1] << 2) | (high[:, :, 2] << 4) | (high[:, :, 3] << 6)).reshape(n, 64)
    return np.concatenate([ql, qh, sc.view(np.uint8), d_bytes], axis=1)


K_QUANTIZERS = {"Q4_K": quantize_q4_k, "Q5_K": quantize_q5_k, "Q6_K": quantize_q6_k}


def quantize(x: np.ndarray, tag: str) -> np.ndarray:
    """float32 [rows, cols] -> the array GGUFWriter stores for `tag` (uint8 [rows, row_bytes] for blocks)."""
    t = GGML_TYPES[tag]
    if x.shape[-1] % t.block_elems:
        raise TpiError(f"{tag}: rows of {x.shape[-1]} elements are not a whole number of {t.block_elems}-element "
                       "blocks")
    x = np.ascontiguousarray(x, dtype=np.float32)
    if tag in K_QUANTIZERS:
        blocks = K_QUANTIZERS[tag](x.reshape(-1, t.block_elems))  # [n_blocks, block_bytes]
        return blocks.reshape(x.shape[:-1] + (t.row_nbytes(x.shape[-1]),))
    return gguf_quantize(x, t.ggml)


# ---------------------------------------------------------------------------------------------
# Tokenizer metadata


def _token_types_and_scores(tok: dict, tokens: list[str], spm: bool) -> tuple[list[int], list[float]]:
    added = {a["id"]: a for a in tok.get("added_tokens", [])}
    merged_at: dict[str, int] = {}
    for rank, merge in enumerate(tok["model"].get("merges", [])):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        merged_at.setdefault(left + right, rank)
    unk = tok["model"].get("unk_token")
    types, scores = [], []
    for i, text in enumerate(tokens):
        if i in added:
            types.append(int(TokenType.UNKNOWN if spm and text == unk else
                             TokenType.CONTROL if added[i].get("special") else TokenType.USER_DEFINED))
        elif text.startswith("[PAD"):
            types.append(int(TokenType.UNUSED))
        elif spm and len(text) == 6 and text.startswith("<0x") and text.endswith(">"):
            types.append(int(TokenType.BYTE))
        else:
            types.append(int(TokenType.NORMAL))
        scores.append(-float(merged_at[text] + 1) if text in merged_at else 0.0)  # earlier merge, higher score
    return types, scores


def tokenizer_metadata(tok: dict, tok_config: dict, chat_template: str | None, vocab_size: int) -> dict[str, Any]:
    """GGUF tokenizer.* metadata for a `tokenizers` BPE (tokenizer.json as a dict) and its config."""
    model = tok["model"]
    if model.get("type") != "BPE":
        raise TpiError(f"tokenizer.json: model type {model.get('type')!r}: only BPE tokenizers are written to GGUF")
    pre = tok.get("pre_tokenizer") or {}
    spm = pre.get("type") == "Metaspace" or any(n.get("type") == "Prepend" for n in
                                                (tok.get("normalizer") or {}).get("normalizers", []))
    ids = dict(model["vocab"])
    ids.update({a["content"]: a["id"] for a in tok.get("added_tokens", [])})
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    for text, i in ids.items():
        if i >= vocab_size:
            raise TpiError(f"tokenizer.json: token {text!r} has id {i}, beyond vocab_size {vocab_size}")
        tokens[i] = text
    types, scores = _token_types_and_scores(tok, tokens, spm)
    meta: dict[str, Any] = {"tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": types}
    if spm:
        meta["tokenizer.ggml.model"] = "llama"
        meta["tokenizer.ggml.scores"] = scores
        meta["tokenizer.ggml.add_space_prefix"] = pre.get("prepend_scheme", "always") != "never"
    else:
        splits = [p for p in pre.get("pretokenizers", []) if p.get("type") == "Split"]
        if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
            meta["tokenizer.ggml.pre"] = "gpt-2"
        elif splits and splits[0]["pattern"].get("Regex") == LLAMA3_SPLIT_REGEX:
            meta["tokenizer.ggml.pre"] = "llama-bpe"
        else:
            raise TpiError("tokenizer.json: pre-tokenizer is neither GPT-2's nor Llama 3's byte-level split")
        meta["tokenizer.ggml.model"] = "gpt2"
        meta["tokenizer.ggml.merges"] = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    single = [p for p in ((tok.get("post_processor") or {}).get("single") or [])]
    meta["tokenizer.ggml.add_bos_token"] = bool(single) and "SpecialToken" in single[0]
    meta["tokenizer.ggml.add_eos_token"] = len(single) > 1 and "SpecialToken" in single[-1]
    for field, key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"), ("unk_token", "unknown_token_id"),
                       ("pad_token", "padding_token_id")):
        text = tok_config.get(field)
        text = text.get("content") if isinstance(text, dict) else text
        if text is not None and text in ids:
            meta[f"tokenizer.ggml.{key}"] = ids[text]
    for text, key in (("<|eot_id|>", "eot_token_id"), ("<|eom_id|>", "eom_token_id")):
        if text in ids:
            meta[f"tokenizer.ggml.{key}"] = ids[text]
    if chat_template:
        meta["tokenizer.chat_template"] = chat_template
    return meta


def read_tokenizer_metadata(model_dir: Path, vocab_size: int) -> dict[str, Any]:
    tok = json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8"))
    cfg_path = model_dir / "tokenizer_config.json"
    tok_config = json.loads(cfg_path.read_text(encoding="utf-8")) if cfg_path.exists() else {}
    jinja = model_dir / "chat_template.jinja"
    template = jinja.read_text(encoding="utf-8") if jinja.exists() else tok_config.get("chat_template")
    return tokenizer_metadata(tok, tok_config, template if isinstance(template, str) else None, vocab_size)


# ---------------------------------------------------------------------------------------------
# The file


def llama3_rope_factors(cfg: ModelConfig) -> np.ndarray:
    """[Dh/2] llama.cpp's rope_freqs: llama3's divisor of each RoPE frequency (convert_hf_to_gguf.py's loop,
    with the original context from rope_scaling)."""
    rs = cfg.rope_scaling
    inv = 1.0 / (cfg.rope_theta ** (np.arange(0, cfg.head_dim, 2, dtype=np.int64).astype(np.float32) / cfg.head_dim))
    low_wavelen = rs.original_max_position_embeddings / rs.low_freq_factor
    high_wavelen = rs.original_max_position_embeddings / rs.high_freq_factor
    factors = []
    for freq in inv:
        wavelen = 2 * math.pi / float(freq)
        if wavelen < high_wavelen:
            factors.append(1.0)
        elif wavelen > low_wavelen:
            factors.append(rs.factor)
        else:
            smooth = (rs.original_max_position_embeddings / wavelen - rs.low_freq_factor) / (
                rs.high_freq_factor - rs.low_freq_factor)
            factors.append(1 / ((1 - smooth) / rs.factor + smooth))
    return np.array(factors, dtype=np.float32)


def _add_metadata(w: GGUFWriter, cfg: ModelConfig, tokenizer: dict[str, Any], name: str, tag: str) -> None:
    w.add_name(name)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    if cfg.rope_scaling.rope_type == "linear":
        w.add_rope_scaling_type(RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(cfg.rope_scaling.factor)
    w.add_file_type({"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9, "Q4_K": 15,
                     "Q5_K": 17, "Q6_K": 18, "BF16": 32}[tag])
    w.add_quantization_version(2)
    strings = {"tokenizer.ggml.model": w.add_tokenizer_model, "tokenizer.ggml.pre": w.add_tokenizer_pre,
               "tokenizer.chat_template": w.add_chat_template}
    arrays = {"tokenizer.ggml.tokens": w.add_token_list, "tokenizer.ggml.token_type": w.add_token_types,
              "tokenizer.ggml.scores": w.add_token_scores, "tokenizer.ggml.merges": w.add_token_merges}
    for key, value in tokenizer.items():
        if key in strings:
            strings[key](value)
        elif key in arrays:
            arrays[key](value)
        elif isinstance(value, bool):
            w.add_bool(key, value)
        else:
            w.add_uint32(key, value)


def gguf_tensor_plan(cfg: ModelConfig, shapes: dict[str, tuple[int, ...]], tag: str, overrides: dict[str, str],
                  label: str) -> list[tuple[str, str, str]]:
    """(llama.cpp name, HF name or "" for rope_freqs, ggml tag) of every tensor, in file order."""
    out = [("rope_freqs.weight", "", "F32")] if cfg.rope_scaling.rope_type == "llama3" else []
    for name, shape in shapes.items():
        g = gguf_name(name)
        if g is None:
            raise TpiError(f"{label}: tensor {name!r} has no GGUF name")
        t = overrides.get(g, tag) if len(shape) == 2 else "F32"  # 1-D tensors stay F32, as llama.cpp's
        if shape[-1] % GGML_TYPES[t].block_elems:
            raise TpiError(f"{name} ({g}): rows of {shape[-1]} elements are not a whole number of {t} blocks "
                           f"({GGML_TYPES[t].block_elems} elements)")
        out.append((g, name, t))
    return out


def ggml_tag_of(dtype: str, overrides: dict[str, str] | None = None) -> tuple[str, dict[str, str]]:
    """`--dtype` name and per-tensor overrides -> ggml tags, checked."""
    tag = dtype.upper()
    over = {k: v.upper() for k, v in (overrides or {}).items()}
    for t in [tag, *over.values()]:
        if t not in GGML_TYPES:
            raise TpiError(f"dtype {t.lower()!r}: expected one of {', '.join(x.lower() for x in GGML_TYPES)}")
    return tag, over


def llama_cpp_rows(cfg: ModelConfig, name: str, stored: np.ndarray) -> np.ndarray:
    """q/k rows in llama.cpp's order (convert_hf_to_gguf.py's permute, for its adjacent-pair RoPE): a row
    gather, exact for any type (a row is whole blocks); other tensors as they are."""
    heads = (cfg.num_attention_heads if ".q_proj." in name else
             cfg.num_key_value_heads if ".k_proj." in name else 0)
    return stored[llama_cpp_row_order(stored.shape[0], heads)] if heads else stored


def write_gguf_file(out: Path, cfg: ModelConfig, tokenizer: dict[str, Any], label: str, tag: str,
                    plan: list[tuple[str, str, str]], shapes: dict[str, tuple[int, ...]],
                    produce: Callable[[str, tuple[int, ...], str], np.ndarray], split_max_tensors: int = 0) -> list[Path]:
    """Write a GGUF (or split set) of `plan`'s tensors: `produce(HF name, shape, tag)` gives a tensor's stored
    array in llama.cpp's row order, one tensor at a time (memory: one stored tensor). Renamed into place
    only once complete; returns the files."""
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".tmp-", dir=out.parent))
    try:
        w = GGUFWriter(tmp / out.name, "llama", split_max_tensors=split_max_tensors)
        _add_metadata(w, cfg, tokenizer, label, tag)
        for g, name, t in plan:
            shape = shapes[name] if name else (cfg.head_dim // 2,)
            stored = {"F32": np.float32, "F16": np.float16}.get(t)
            w.add_tensor_info(g, shape, np.dtype(stored or np.float32), tensor_nbytes(t, shape),
                              raw_dtype=None if stored else GGML_TYPES[t].ggml)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for g, name, t in plan:
            w.write_tensor_data(produce(name, shapes[name], t) if name else llama3_rope_factors(cfg))
        w.close()
        written = sorted(tmp.iterdir())
        for f in written:
            os.replace(f, out.parent / f.name)
        return [out.parent / f.name for f in written]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_gguf(model_dir: str | Path, out: str | Path, dtype: str = "q8_0", types: dict[str, str] | None = None,
               split_max_tensors: int = 0) -> list[Path]:
    """Write the HF checkpoint in `model_dir` as GGUF `out` (a split set if split_max_tensors > 0).

    `dtype`: ggml type of every 2-D weight (f32, f16, bf16, q8_0, q4_0, q4_1, q5_0, q5_1, q4_k, q5_k, q6_k);
    `types`: per-tensor overrides by llama.cpp name (e.g. {"output.weight": "q6_k"}, as a Q4_K_M file has).
    The header is written from shapes first, then one tensor at a time (memory: one tensor). Returns the
    files written, renamed into place only once complete.
    """
    model_dir, out = Path(model_dir), Path(out)
    tag, overrides = ggml_tag_of(dtype, types)
    cfg = ModelConfig.from_dir(str(model_dir))
    ckpt = Checkpoint.from_dir(str(model_dir))
    shapes = {name: info.shape for name, info in ckpt.tensors.items()}
    plan = gguf_tensor_plan(cfg, shapes, tag, overrides, ckpt.label)

    def produce(name: str, shape: tuple[int, ...], t: str) -> np.ndarray:
        return quantize(llama_cpp_rows(cfg, name, ckpt.get(name)), t)

    return write_gguf_file(out, cfg, read_tokenizer_metadata(model_dir, cfg.vocab_size), model_dir.name, tag, plan,
                           shapes, produce, split_max_tensors)
