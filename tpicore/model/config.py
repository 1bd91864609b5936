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
        if not (self.rms_norm_eps > 0):
            raise bad("rms_norm_eps", "expected > 0")
        if not (self.rope_theta > 0):
            raise bad("rope_theta", "expected > 0")
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

    def n_params(self) -> int:
        h, f, l, v = self.hidden_size, self.intermediate_size, self.num_hidden_layers, self.vocab_size
        q = self.num_attention_heads * self.head_dim
        kv = self.num_key_value_heads * self.head_dim
        per_layer = h * (q + 2 * kv) + q * h + 3 * h * f + 2 * h
        return l * per_layer + v * h * (1 if self.tie_word_embeddings else 2) + h

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
        scaling = RopeScaling(
            rope_type=rtype,
            factor=float(rope.get("factor", 1.0) or 1.0),
            low_freq_factor=float(rope.get("low_freq_factor", 1.0)),
            high_freq_factor=float(rope.get("high_freq_factor", 4.0)),
            original_max_position_embeddings=int(rope.get("original_max_position_embeddings", 8192)),
        )
        if rtype == "llama3" and not rope.get("high_freq_factor", 4.0) > rope.get("low_freq_factor", 1.0):
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
                rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
                rope_theta=float(theta),
                rope_scaling=scaling,
                attention_bias=bool(d.get("attention_bias", model_type == "qwen2")),
                mlp_bias=bool(d.get("mlp_bias", False)),
                tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
                bos_token_id=bos,
                eos_token_ids=eos_ids,
                model_type=model_type,
                source=source,
            )
        except TypeError as e:  # e.g. a string where a number belongs
            raise TpiError(f"{source}: {e}") from None

    @classmethod
    def from_dir(cls, model_dir: str) -> "ModelConfig":
        path = os.path.join(model_dir, "config.json")
        d = read_json(path)
        gen_path = os.path.join(model_dir, "generation_config.json")
        gen = read_json(gen_path) if os.path.exists(gen_path) else None
        return cls.from_dict(d, source=path, generation=gen)


def read_json(path: str) -> dict[str, Any]:
    """Read a JSON object, with one clear error line for a missing or malformed file."""
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
    except FileNotFoundError:
        raise TpiError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TpiError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise TpiError(f"{path}: expected a JSON object, got {type(d).__name__}")
    return d
