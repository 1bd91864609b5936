"""GGUF models: a `.gguf` file (or a split set `-00001-of-0000N.gguf`) seen as a Checkpoint of HF names.

Layer: weights (imports tpicore.model.config, tpicore.weights.{checkpoint,quant}, tpicore.tokenizer,
tpicore.errors and the `gguf` package's constants). Owns parsing GGUF headers (metadata and tensor
table), the llama.cpp <-> HF tensor-name table, marking llama.cpp's Q/K row permutation, and the config
a file describes. Must not compute, schedule, or know about devices; tensor bytes are read by
tpicore.weights.reader like any checkpoint's, the tokenizer in the metadata is built by tpicore.tokenizer.

What a GGUFCheckpoint describes is what a safetensors Checkpoint would for the same model in HF layout:
tensors by HF name, [out, in] shapes. Block-quantized tensors stay quantized on disk and when read (uint8
rows of whole blocks, `checkpoint.stored_layout`); `checkpoint.to_f32` widens them (`quant.dequantize`).
llama.cpp stores q_proj/k_proj rows permuted within each head (its RoPE rotates adjacent pairs, HF's
rotates halves): their TensorInfo carries `llama_cpp_heads`, and readers gather the rows back into HF
order (`checkpoint.rows_in_hf_order`), exact for every type since a row is whole blocks.

Bad input is one TpiError naming the file and the tensor or metadata field: not a GGUF file, truncated,
an unknown or unsupported tensor type, a tensor that is not part of a Llama model or beyond its layers,
a split set with a part missing, an architecture other than llama.
"""

from __future__ import annotations

import json
import os
import re
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
from gguf import GGUFValueType

from tpicore.errors import TpiError
from tpicore.model.config import ModelConfig
from tpicore.tokenizer import Tokenizer
from tpicore.weights.checkpoint import Checkpoint, TensorInfo
from tpicore.weights.quant import GGML_TYPES, ggml_tag, tensor_nbytes

SPLIT_NAME = re.compile(r"^(?P<stem>.*)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")
# llama.cpp's per-layer tensor names (blk.N.<leaf>) -> HF leaf names under model.layers.N.
LAYER_LEAVES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.bias": "self_attn.o_proj.bias",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
    "ffn_gate.bias": "mlp.gate_proj.bias",
    "ffn_up.bias": "mlp.up_proj.bias",
    "ffn_down.bias": "mlp.down_proj.bias",
}
GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
ROPE_FREQS = "rope_freqs.weight"  # llama3 RoPE scaling: read into the config, not a model tensor


def is_gguf_path(path: str) -> bool:
    """A model given as a GGUF file rather than an HF folder."""
    return str(path).endswith(".gguf") and not os.path.isdir(path)


def split_files(path: str) -> list[str]:
    """All parts of a split set named like `path` (`name-00002-of-00003.gguf` -> 3 paths), else [path]."""
    m = SPLIT_NAME.match(path)
    if not m:
        return [path]
    count = int(m["count"])
    if not 1 <= int(m["no"]) <= count:
        raise TpiError(f"{path}: split number {int(m['no'])} is outside 1..{count}")
    files = [f"{m['stem']}-{i:05d}-of-{count:05d}.gguf" for i in range(1, count + 1)]
    for f in files:
        if not os.path.isfile(f):
            raise TpiError(f"{f}: part of the split set {os.path.basename(path)} is missing")
    return files


def hf_name(name: str) -> str | None:
    """HF name of a llama.cpp tensor name (None if it is not a Llama model tensor)."""
    if name in GLOBAL_TENSORS:
        return GLOBAL_TENSORS[name]
    m = re.fullmatch(r"blk\.(\d+)\.(.+)", name)
    if m and m[2] in LAYER_LEAVES:
        return f"model.layers.{int(m[1])}.{LAYER_LEAVES[m[2]]}"
    return None


def gguf_name(name: str) -> str | None:
    """llama.cpp name of an HF tensor name (the inverse of `hf_name`; None if it has none)."""
    for g, h in GLOBAL_TENSORS.items():
        if h == name:
            return g
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", name)
    for g, h in LAYER_LEAVES.items():
        if m and m[2] == h:
            return f"blk.{int(m[1])}.{g}"
    return None


GGUF_MAGIC = b"GGUF"
VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
HEADER_READ_BYTES = 16 << 20  # first read of a header; a larger one is read again, 4x larger
# GGUF metadata value types (gguf.GGUFValueType) -> struct format of a scalar
SCALARS = {GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b", GGUFValueType.UINT16: "<H",
           GGUFValueType.INT16: "<h", GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i",
           GGUFValueType.FLOAT32: "<f", GGUFValueType.BOOL: "<?", GGUFValueType.UINT64: "<Q",
           GGUFValueType.INT64: "<q", GGUFValueType.FLOAT64: "<d"}


@dataclass(frozen=True)
class GGUFTensor:
    """One entry of a GGUF file's tensor table."""

    name: str  # llama.cpp name, e.g. blk.0.attn_q.weight
    dtype: str  # our tag for its ggml type (quant.GGML_TYPES)
    shape: tuple[int, ...]  # numpy order [out, in] (the file lists ggml's ne, innermost first)
    offset: int  # absolute byte offset of the data in the file
    nbytes: int


@dataclass(frozen=True)
class GGUFHeader:
    """A GGUF file's metadata (key -> plain Python value) and tensor table."""

    path: str
    meta: dict[str, Any]
    tensors: tuple[GGUFTensor, ...]


class _NeedMore(Exception):
    """The header runs past the bytes read so far."""


class _Cursor:
    """Sequential little-endian reads from the first bytes of a file."""

    def __init__(self, buf: bytes, path: str) -> None:
        self.buf, self.path, self.pos = buf, path, 0

    def unpack(self, fmt: str) -> Any:
        try:
            (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        except struct.error:
            raise _NeedMore from None
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        n = self.unpack("<Q")
        if self.pos + n > len(self.buf):
            raise _NeedMore
        raw = self.buf[self.pos: self.pos + n]
        self.pos += n
        return raw.decode("utf-8", errors="replace")

    def value(self, vtype: int, key: str) -> Any:
        if vtype == GGUFValueType.STRING:
            return self.string()
        if vtype == GGUFValueType.ARRAY:
            item, n = self.unpack("<I"), self.unpack("<Q")
            if item == GGUFValueType.STRING:
                return [self.string() for _ in range(n)]
            fmt = SCALARS.get(item)
            if fmt is None:
                raise TpiError(f"{self.path}: metadata {key!r}: unsupported array item type {item}")
            nbytes = n * struct.calcsize(fmt)
            if self.pos + nbytes > len(self.buf):
                raise _NeedMore
            values = np.frombuffer(self.buf, dtype=np.dtype(fmt), count=n, offset=self.pos).tolist()
            self.pos += nbytes
            return values
        fmt = SCALARS.get(vtype)
        if fmt is None:
            raise TpiError(f"{self.path}: metadata {key!r}: unknown value type {vtype}")
        return self.unpack(fmt)


def read_header(path: str) -> GGUFHeader:
    """Parse one GGUF file's header: metadata and tensor table, checked against the file's size.

    Our own parser of the format the `gguf` package reads: its GGUFReader builds a numpy view per array
    element and took 24.7 s on a Llama 3 sized vocabulary header (128256 tokens, 280k merges) on the dev
    box, this 0.56 s. tests/test_gguf.py checks that both read the same from every file the tests write.
    """
    try:
        size = os.path.getsize(path)
    except OSError:
        raise TpiError(f"{path}: file not found") from None
    want = min(size, HEADER_READ_BYTES)
    while True:
        try:
            with open(path, "rb") as f:
                buf = f.read(want)
        except OSError as e:
            raise TpiError(f"{path}: cannot read ({e})") from None
        if buf[:4] != GGUF_MAGIC:
            raise TpiError(f"{path}: not a GGUF file (no GGUF magic)")
        try:
            return _parse_header(_Cursor(buf, path), size)
        except _NeedMore:
            if want >= size:
                raise TpiError(f"{path}: truncated GGUF header ({size} bytes)") from None
            want = min(size, 4 * want)


def _parse_header(cur: _Cursor, size: int) -> GGUFHeader:
    path = cur.path
    cur.pos = 4
    version = cur.unpack("<I")
    if version not in VERSIONS:
        raise TpiError(f"{path}: GGUF version {version} is not supported (supported: 2, 3; little-endian)")
    n_tensors, n_kv = cur.unpack("<Q"), cur.unpack("<Q")
    meta: dict[str, Any] = {}
    for _ in range(n_kv):
        key = cur.string()
        if key in meta:
            raise TpiError(f"{path}: metadata {key!r} appears twice")
        meta[key] = cur.value(cur.unpack("<I"), key)
    table = []
    for _ in range(n_tensors):
        name = cur.string()
        dims = tuple(cur.unpack("<Q") for _ in range(cur.unpack("<I")))
        table.append((name, tuple(reversed(dims)), cur.unpack("<I"), cur.unpack("<Q")))  # ne -> [out, in]
    alignment = meta.get("general.alignment", DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise TpiError(f"{path}: general.alignment: expected a power of two, got {alignment!r}")
    data_start = -(-cur.pos // alignment) * alignment
    tensors = []
    for name, shape, ggml, offset in table:
        try:
            tag = ggml_tag(ggml)
        except TpiError as e:
            raise TpiError(f"{path}: tensor {name!r}: {e}") from None
        if shape and shape[-1] % GGML_TYPES[tag].block_elems:
            raise TpiError(f"{path}: tensor {name!r}: row length {shape[-1]} is not a whole number of {tag} "
                           f"blocks ({GGML_TYPES[tag].block_elems} elements)")
        nbytes = tensor_nbytes(tag, shape or (1,))
        if data_start + offset + nbytes > size:
            raise TpiError(f"{path}: tensor {name!r}: truncated file (needs {data_start + offset + nbytes} bytes, "
                           f"has {size})")
        tensors.append(GGUFTensor(name, tag, shape, data_start + offset, nbytes))
    return GGUFHeader(path, meta, tuple(tensors))


def read_split_set(path: str) -> list[GGUFHeader]:
    """Headers of a GGUF file, or of every part of its split set, checked to belong together."""
    files = split_files(path)
    headers = [read_header(f) for f in files]
    if len(files) == 1:
        return headers
    for i, h in enumerate(headers):
        got = (h.meta.get("split.no"), h.meta.get("split.count"))
        if got != (i, len(files)):
            raise TpiError(f"{h.path}: split.no/split.count: expected part {i} of {len(files)} (from the file "
                           f"name), got {got[0]} of {got[1]}")
    total = sum(len(h.tensors) for h in headers)
    want = headers[0].meta.get("split.tensors.count", total)
    if want != total:
        raise TpiError(f"{path}: split.tensors.count: {want} tensors announced, the {len(files)} parts hold {total}")
    return headers


class GGUFCheckpoint(Checkpoint):
    """A GGUF model (one file or a split set) as a Checkpoint: HF names and [out, in] shapes; q/k rows are
    marked with their llama.cpp head count so every reader puts them back in HF order."""

    def __init__(self, path: str) -> None:
        headers = read_split_set(path)
        self.label = path
        self.meta = headers[0].meta  # the first part holds the model's metadata
        self._maps: dict[str, np.memmap] = {}
        self.gguf_names: dict[str, str] = {}  # HF name -> llama.cpp name (for messages)
        found: dict[str, tuple[str, GGUFTensor]] = {}  # llama.cpp name -> (file, entry)
        rope_freqs = None
        for h in headers:
            for t in h.tensors:
                if t.name in found:
                    raise TpiError(f"{h.path}: tensor {t.name!r} also appears in {found[t.name][0]}")
                found[t.name] = (h.path, t)
                if t.name == ROPE_FREQS:
                    if t.dtype != "F32":
                        raise TpiError(f"{h.path}: tensor {t.name!r}: expected F32, got {t.dtype}")
                    rope_freqs = np.fromfile(h.path, dtype="<f4", count=t.nbytes // 4, offset=t.offset)
                elif hf_name(t.name) is None:
                    raise TpiError(f"{h.path}: tensor {t.name!r}: not a tensor of a Llama model")
        self.cfg = ModelConfig.from_gguf(self.meta, {g: t.shape for g, (_, t) in found.items()}, rope_freqs, path)
        self.tensors: dict[str, TensorInfo] = {}
        for g, (f, t) in found.items():
            name = hf_name(g)
            if name is None:
                continue
            m = re.match(r"blk\.(\d+)\.", g)
            if m and int(m[1]) >= self.cfg.num_hidden_layers:
                raise TpiError(f"{f}: tensor {g!r}: layer {int(m[1])} is beyond llama.block_count = "
                               f"{self.cfg.num_hidden_layers}")
            # llama.cpp permuted the rows of q (all heads) and k (KV heads), biases included
            heads = (self.cfg.num_attention_heads if ".attn_q." in g else
                     self.cfg.num_key_value_heads if ".attn_k." in g else 0)
            if heads and t.shape[0] % (2 * heads):
                raise TpiError(f"{f}: tensor {g!r}: {t.shape[0]} rows do not split into {heads} heads of even size")
            self.tensors[name] = TensorInfo(name, f, t.dtype, t.shape, t.offset, t.nbytes, llama_cpp_heads=heads)
            self.gguf_names[name] = g

    def info(self, name: str, shape: tuple[int, ...] | None = None) -> TensorInfo:
        """As Checkpoint.info, with errors naming the llama.cpp tensor name beside the HF one."""
        info = self.tensors.get(name)
        g = gguf_name(name)
        both = f"{g!r} ({name})" if g else repr(name)
        if info is None:
            raise TpiError(f"{self.label}: missing tensor {both}")
        if shape is not None and info.shape != tuple(shape):
            raise TpiError(f"{info.path}: tensor {both} has shape {list(info.shape)}, expected {list(shape)} "
                           "([out, in])")
        return info



def hf_config_dict(cfg: ModelConfig) -> dict[str, Any]:
    """The HF config.json a GGUF's config corresponds to (shard manifests carry it; from_dict reads it back
    into an equal ModelConfig)."""
    rs = cfg.rope_scaling
    doc: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"], "model_type": cfg.model_type, "hidden_act": "silu",
        "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers, "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads, "head_dim": cfg.head_dim, "vocab_size": cfg.vocab_size,
        "max_position_embeddings": cfg.max_position_embeddings, "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta, "attention_bias": cfg.attention_bias, "mlp_bias": cfg.mlp_bias,
        "tie_word_embeddings": cfg.tie_word_embeddings, "bos_token_id": cfg.bos_token_id,
        "eos_token_id": list(cfg.eos_token_ids) if len(cfg.eos_token_ids) != 1 else cfg.eos_token_ids[0],
    }
    if rs.rope_type != "default":
        doc["rope_scaling"] = {"rope_type": rs.rope_type, "factor": rs.factor, "low_freq_factor": rs.low_freq_factor,
                               "high_freq_factor": rs.high_freq_factor,
                               "original_max_position_embeddings": rs.original_max_position_embeddings}
    return doc


def gguf_tokenizer_files(path: str) -> dict[str, str]:
    """tokenizer.json and tokenizer_config.json (file name -> text) equivalent to a GGUF's tokenizer
    metadata, for rank 0 of its shards; {} when the file has no tokenizer."""
    meta = read_header(split_files(path)[0]).meta
    if "tokenizer.ggml.tokens" not in meta:
        return {}
    tok = Tokenizer.from_gguf_metadata(meta, path)
    config = dict(tok.special_tokens, add_bos_token=tok.add_bos_token)
    if tok.chat_template is not None:
        config["chat_template"] = tok.chat_template
    return {"tokenizer.json": tok.backend.to_str(), "tokenizer_config.json": json.dumps(config, ensure_ascii=False)}


def gguf_tokenizer(path: str) -> Tokenizer:
    """The tokenizer in a GGUF file's metadata (the first part of a split set holds it)."""
    return Tokenizer.from_gguf_metadata(read_header(split_files(path)[0]).meta, path)
