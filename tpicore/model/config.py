"""Model configuration: one frozen dataclass read from a Hugging Face `config.json`.

Owns parsing and validation of model dimensions (transformers 4 and 5 layouts). Everything else reads
dimensions from `ModelConfig`; nothing else parses config.json. Must not touch weights or files
other than config.json / generation_config.json.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np

from tpicore.errors import TpiError

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


@dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling. `rope_type` 'default' means none."""

    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class ModelConfig:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    max_position_embeddings: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: RopeScaling = RopeScaling()
    attention_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    model_type: str = "llama"
    source: str = field(default="config.json", compare=False)

    def __post_init__(self) -> None:
        def bad(name: str, what: str) -> TpiError:
            return TpiError(f"{self.source}: {name}: {what}, got {getattr(self, name)!r}")

        for name in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "head_dim", "vocab_size", "max_position_embeddings"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise bad(name, "expected a positive integer")
        if self.num_attention_heads % self.num_key_value_heads:
            raise bad("num_key_value_heads", f"must divide num_attention_heads ({self.num_attention_heads})")
        if self.head_dim % 2:
            raise bad("head_dim", "must be even for RoPE")
        if not (0 < self.rms_norm_eps < math.inf):
            raise bad("rms_norm_eps", "expected a finite number > 0")
        if not (0 < self.rope_theta < math.inf):
            raise bad("rope_theta", "expected a finite number > 0")
        if self.rope_scaling.rope_type not in SUPPORTED_ROPE_TYPES:
            raise TpiError(f"{self.source}: rope_scaling.rope_type: unsupported {self.rope_scaling.rope_type!r}"
                           f" (supported: {', '.join(SUPPORTED_ROPE_TYPES)})")
        if self.rope_scaling.factor <= 0:
            raise TpiError(f"{self.source}: rope_scaling.factor: expected > 0, got {self.rope_scaling.factor}")
        for t in self.eos_token_ids:
            if not 0 <= t < self.vocab_size:
                raise TpiError(f"{self.source}: eos_token_id: {t} is outside the vocabulary (0..{self.vocab_size - 1})")

    # ---- derived sizes ------------------------------------------------------------------------
    @property
    def o_proj_bias(self) -> bool:
        """Qwen2 has q/k/v biases but none on o_proj; LlamaConfig's attention_bias covers all four."""
        return self.attention_bias and self.model_type != "qwen2"

    @property
    def group_size(self) -> int:
        """Query heads per KV head (GQA); 1 for multi-head attention."""
        return self.num_attention_heads // self.num_key_value_heads

    @cached_property
    def rope_inv_freq(self) -> np.ndarray:
        """[Dh/2] inverse frequencies, with llama3/linear scaling applied (as HF computes them)."""
        dh = self.head_dim
        inv = 1.0 / (self.rope_theta ** (np.arange(0, dh, 2, dtype=np.int64).astype(np.float32) / dh))
        rs = self.rope_scaling
        if rs.rope_type == "linear":
            inv = inv / rs.factor
        elif rs.rope_type == "llama3":
            low_wavelen = rs.original_max_position_embeddings / rs.low_freq_factor
            high_wavelen = rs.original_max_position_embeddings / rs.high_freq_factor
            wavelen = 2 * math.pi / inv
            scaled = np.where(wavelen > low_wavelen, inv / rs.factor, inv)
            smooth = (rs.original_max_position_embeddings / wavelen - rs.low_freq_factor) / (
                rs.high_freq_factor - rs.low_freq_factor)
            smoothed = (1 - smooth) * scaled / rs.factor + smooth * scaled
            medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
            inv = np.where(medium, smoothed, scaled)
        return inv.astype(np.float32)

    # ---- parsing ------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config.json",
                  generation: dict[str, Any] | None = None) -> "ModelConfig":
        def req(name: str) -> Any:
            if name not in d:
                raise TpiError(f"{source}: missing required field {name!r}")
            return d[name]

        model_type = d.get("model_type", "llama")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise TpiError(f"{source}: model_type: unsupported {model_type!r} (supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
        if d.get("sliding_window") and d.get("use_sliding_window", model_type == "mistral"):
            window = d["sliding_window"]
            if window < d.get("max_position_embeddings", 0):
                raise TpiError(f"{source}: sliding_window: sliding-window attention ({window}) is not supported")
        for flag in ("hidden_act",):
            if d.get(flag, "silu") != "silu":
                raise TpiError(f"{source}: {flag}: only 'silu' is supported, got {d[flag]!r}")
        if d.get("pretraining_tp", 1) not in (1, None):
            raise TpiError(f"{source}: pretraining_tp: only 1 is supported, got {d['pretraining_tp']!r}")

        hidden = req("hidden_size")
        heads = req("num_attention_heads")
        if not isinstance(hidden, int) or not isinstance(heads, int) or heads <= 0:
            raise TpiError(f"{source}: hidden_size/num_attention_heads: expected positive integers")
        head_dim = d.get("head_dim") or hidden // heads
        if d.get("head_dim") is None and hidden % heads:
            raise TpiError(f"{source}: hidden_size: {hidden} is not divisible by num_attention_heads {heads}"
                           " and no head_dim is given")

        # transformers 5 keeps rope settings in `rope_parameters`; 4.x in rope_theta/rope_scaling
        for key in ("rope_parameters", "rope_scaling"):
            if d.get(key) is not None and not isinstance(d[key], dict):
                raise TpiError(f"{source}: {key}: expected an object or null, got {json.dumps(d[key])[:60]}")
        rope = dict(d.get("rope_parameters") or {})
        legacy = d.get("rope_scaling") or {}
        if rope and legacy:
            a, b = rope.get("rope_type", "default"), legacy.get("rope_type", legacy.get("type", "default"))
            if a != b:
                raise TpiError(f"{source}: rope_parameters.rope_type ({a!r}) and rope_scaling.rope_type ({b!r})"
                               " disagree; keep one of them")
        for k, v in legacy.items():
            rope.setdefault(k, v)
        theta = rope.get("rope_theta", d.get("rope_theta", 10000.0))
        rtype = rope.get("rope_type", rope.get("type", "default")) or "default"
        def real(name: str, value: Any, kind: type = float) -> Any:
            """A number from the file (bools, strings, lists refused), naming the field."""
            try:
                if isinstance(value, (bool, str)) or not isinstance(value, (int, float)):
                    raise TypeError
                return kind(value)
            except (TypeError, ValueError, OverflowError):
                raise TpiError(f"{source}: {name}: expected a number, got {value!r:.60}") from None

        scaling = RopeScaling(
            rope_type=rtype,
            factor=real("rope_scaling.factor", rope.get("factor", 1.0) or 1.0),
            low_freq_factor=real("rope_scaling.low_freq_factor", rope.get("low_freq_factor", 1.0)),
            high_freq_factor=real("rope_scaling.high_freq_factor", rope.get("high_freq_factor", 4.0)),
            original_max_position_embeddings=real("rope_scaling.original_max_position_embeddings",
                                                  rope.get("original_max_position_embeddings", 8192), int),
        )
        if rtype == "llama3" and not scaling.high_freq_factor > scaling.low_freq_factor:
            raise TpiError(f"{source}: rope_scaling: high_freq_factor must exceed low_freq_factor")

        gen = generation or {}
        eos = gen.get("eos_token_id", d.get("eos_token_id"))
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        bos = gen.get("bos_token_id", d.get("bos_token_id"))
        try:
            return cls(
                hidden_size=hidden,
                intermediate_size=req("intermediate_size"),
                num_hidden_layers=req("num_hidden_layers"),
                num_attention_heads=heads,
                num_key_value_heads=d.get("num_key_value_heads") or heads,
                head_dim=head_dim,
                vocab_size=req("vocab_size"),
                max_position_embeddings=d.get("max_position_embeddings", 2048),
                rms_norm_eps=real("rms_norm_eps", d.get("rms_norm_eps", 1e-6)),
                rope_theta=real("rope_theta", theta),
                rope_scaling=scaling,
                attention_bias=bool(d.get("attention_bias", model_type == "qwen2")),
                mlp_bias=bool(d.get("mlp_bias", False)),
                tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
                bos_token_id=bos,
                eos_token_ids=eos_ids,
                model_type=model_type,
                source=source,
            )
        except (TypeError, ValueError, OverflowError) as e:  # e.g. a string where a number belongs
            raise TpiError(f"{source}: {e}") from None

    @classmethod
    def from_dir(cls, model_dir: str) -> "ModelConfig":
        path = os.path.join(model_dir, "config.json")
        d = read_json(path)
        gen_path = os.path.join(model_dir, "generation_config.json")
        gen = read_json(gen_path) if os.path.exists(gen_path) else None
        return cls.from_dict(d, source=path, generation=gen)

    @classmethod
    def from_gguf(cls, meta: dict[str, Any], tensor_shapes: dict[str, tuple[int, ...]],
                  rope_freqs: np.ndarray | None, source: str) -> "ModelConfig":
        """The config of a GGUF file from its metadata (llama.cpp's key names), tensor shapes and rope_freqs.

        `meta` maps GGUF keys to plain values, `tensor_shapes` GGUF tensor names to [out, in] shapes.
        Only `general.architecture = llama` is read. llama.cpp writes Llama 3 RoPE scaling as per-frequency
        divisors (`rope_freqs.weight`), not as metadata: we recover llama3 parameters that give those
        divisors and check that they do. Errors name the file and the GGUF field.
        """
        return gguf_config(cls, meta, tensor_shapes, rope_freqs, source)


def read_json(path: str) -> dict[str, Any]:
    """Read a JSON object, with one clear error line for a missing or malformed file."""
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
    except FileNotFoundError:
        raise TpiError(f"{path}: file not found") from None
    except OSError as e:  # a folder where the file belongs, a file where a folder belongs, no permission
        raise TpiError(f"{path}: cannot read ({e.strerror or e})") from None
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise TpiError(f"{path}: not valid JSON ({str(e)[:120]})") from None
    if not isinstance(d, dict):
        raise TpiError(f"{path}: expected a JSON object, got {type(d).__name__}")
    return d


def llama3_from_factors(inv_freq: np.ndarray, factors: np.ndarray, original_ctx: int) -> RopeScaling:
    """llama3 RoPE parameters that divide `inv_freq` [Dh/2] by `factors` [Dh/2] (llama.cpp's rope_freqs).

    llama3 scaling leaves high frequencies alone (factor 1), divides low ones by `factor`, and blends in
    between with weight s = (ctx / wavelen - low) / (high - low), linear in 1/wavelen. Only ctx/low and
    ctx/high matter, so ctx comes from the file (or 8192) and low/high are fitted to the blended points;
    with fewer than two of those, any boundaries between the regions give the same frequencies. The
    caller checks the result against the factors.
    """
    factor = float(factors.max())
    if factor <= 1.0 + 1e-6:
        return RopeScaling()
    x = inv_freq.astype(np.float64) / (2 * math.pi)  # [Dh/2] 1 / wavelength
    ones, fulls = np.isclose(factors, 1.0, rtol=1e-6), np.isclose(factors, factor, rtol=1e-6)
    mid = ~ones & ~fulls
    s = (1.0 / factors[mid] - 1.0 / factor) / (1.0 - 1.0 / factor)  # blend weight of each mid point
    x_full = float(x[fulls].max()) if fulls.any() else float(x.min()) / 2
    x_one = float(x[ones].min()) if ones.any() else float(x.max()) * 2
    if mid.sum() >= 2:  # s = (x - u) / (v - u) with u = low / ctx, v = high / ctx
        a, b = np.polyfit(x[mid], s, 1)
        u, v = -b / a, (1 - b) / a
    elif mid.sum() == 1:
        x0, s0 = float(x[mid][0]), float(s[0])
        d = 0.5 * min((x0 - x_full) / s0, (x_one - x0) / (1 - s0))
        u, v = x0 - s0 * d, x0 + (1 - s0) * d
    else:
        u, v = x_full + (x_one - x_full) / 3, x_full + 2 * (x_one - x_full) / 3
    return RopeScaling(rope_type="llama3", factor=factor, low_freq_factor=float(u * original_ctx),
                       high_freq_factor=float(v * original_ctx), original_max_position_embeddings=original_ctx)


def gguf_config(cls: type[ModelConfig], meta: dict[str, Any], tensor_shapes: dict[str, tuple[int, ...]],
                rope_freqs: np.ndarray | None, source: str) -> ModelConfig:
    """ModelConfig.from_gguf's body (kept outside the class to keep the class short)."""
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise TpiError(f"{source}: general.architecture: unsupported {arch!r} (supported: llama)")

    def key(name: str, default: Any = None, required: bool = False) -> Any:
        full = f"llama.{name}"
        if full not in meta:
            if required:
                raise TpiError(f"{source}: missing metadata field {full!r}")
            return default
        if isinstance(meta[full], list):
            raise TpiError(f"{source}: {full}: per-layer values are not supported, got a list")
        return meta[full]

    def positive(name: str, value: Any) -> int:
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise TpiError(f"{source}: llama.{name}: expected a positive integer, got {value!r}")
        return value

    if key("expert_count", 0):
        raise TpiError(f"{source}: llama.expert_count: mixture-of-experts models are not supported")
    hidden = positive("embedding_length", key("embedding_length", required=True))
    heads = positive("attention.head_count", key("attention.head_count", required=True))
    head_dim = positive("attention.key_length",
                        key("attention.key_length", key("rope.dimension_count", hidden // heads)))
    for name in ("attention.value_length", "rope.dimension_count"):
        if key(name, head_dim) != head_dim:
            raise TpiError(f"{source}: llama.{name}: {key(name)} differs from the head size {head_dim}"
                           " (not supported)")
    emb = tensor_shapes.get("token_embd.weight")
    if emb is None or len(emb) != 2:
        raise TpiError(f"{source}: tensor 'token_embd.weight': missing or not 2-D")
    if key("vocab_size", emb[0]) != emb[0]:
        raise TpiError(f"{source}: llama.vocab_size: {key('vocab_size')} differs from the {emb[0]} rows of "
                       "token_embd.weight")
    ffn = tensor_shapes.get("blk.0.ffn_up.weight", (0,))[0]
    scaling_type = key("rope.scaling.type", "none")
    if scaling_type not in ("none", "linear"):
        raise TpiError(f"{source}: llama.rope.scaling.type: unsupported {scaling_type!r} (supported: none, "
                       "linear, and llama3 as rope_freqs.weight)")
    eos = [meta[k] for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id",
                             "tokenizer.ggml.eom_token_id") if k in meta]
    fields = dict(
        hidden_size=hidden,
        intermediate_size=positive("feed_forward_length", key("feed_forward_length", ffn, required=not ffn)),
        num_hidden_layers=positive("block_count", key("block_count", required=True)),
        num_attention_heads=heads,
        num_key_value_heads=positive("attention.head_count_kv", key("attention.head_count_kv", heads)),
        head_dim=head_dim,
        vocab_size=emb[0],
        max_position_embeddings=positive("context_length", key("context_length", 2048)),
        rms_norm_eps=float(key("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(key("rope.freq_base", 10000.0)),
        rope_scaling=RopeScaling(rope_type="linear", factor=float(key("rope.scaling.factor", 1.0)))
        if scaling_type == "linear" else RopeScaling(),
        attention_bias="blk.0.attn_q.bias" in tensor_shapes,
        mlp_bias="blk.0.ffn_up.bias" in tensor_shapes,
        tie_word_embeddings="output.weight" not in tensor_shapes,
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_ids=tuple(dict.fromkeys(eos)),
        model_type="llama",
        source=source,
    )
    cfg = cls(**fields)
    if rope_freqs is None:
        return cfg
    where = f"{source}: rope_freqs.weight"
    factors = np.asarray(rope_freqs, dtype=np.float64).reshape(-1)
    if scaling_type != "none":
        raise TpiError(f"{where}: given together with llama.rope.scaling.type {scaling_type!r}")
    if factors.shape != cfg.rope_inv_freq.shape or not np.all(factors > 0):
        raise TpiError(f"{where}: expected {cfg.rope_inv_freq.shape[0]} positive factors, got {factors.size}")
    scaling = llama3_from_factors(cfg.rope_inv_freq, factors, int(key("rope.scaling.original_context_length", 8192)))
    scaled = cls(**{**fields, "rope_scaling": scaling})
    if not np.allclose(scaled.rope_inv_freq, cfg.rope_inv_freq / factors, rtol=1e-5, atol=0):
        raise TpiError(f"{where}: the per-frequency factors are not llama3 RoPE scaling (no llama3 "
                       "parameters reproduce them)")
    return scaled
