"""Architecture presets and config.json dicts for synthetic checkpoints.

Layer: tools (imports tpicore.schema, tpicore.errors and this package's tokenizer). Owns the presets
(the true shapes of the paper's models plus tiny test models with odd sizes), the transformers-4 style
LlamaForCausalLM config.json a synthetic checkpoint carries, reading the dims of an existing config.json,
and the validation of the fields the writers rely on. Must not write files or generate weights.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

from pydantic import model_validator

from tpicore.errors import TpiError
from tpicore.schema import Int, Invalid, Record, load
from tpicore.tools.synth.tokenizer import tokenizer_style, vocab_layout

LLAMA3_ROPE_SCALING = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                       "original_max_position_embeddings": 8192, "rope_type": "llama3"}

# name -> shapes and settings. Paper models: the TPI-LLM paper's (arXiv 2410.00531).
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


class SynthDims(Record):
    """The fields of a config dict the synthetic writers rely on (the rest is passed through as is)."""

    hidden_size: Int(1)
    intermediate_size: Int(1)
    num_hidden_layers: Int(1)
    num_attention_heads: Int(1)
    num_key_value_heads: Int(1)
    head_dim: Int(1)
    vocab_size: Int(1)

    @model_validator(mode="after")
    def _gqa(self) -> "SynthDims":
        heads, kv = self.num_attention_heads, self.num_key_value_heads
        if heads % kv:
            raise Invalid(f"num_attention_heads ({heads}) must be a multiple of num_key_value_heads ({kv})")
        return self


def with_head_dim(config: dict) -> dict:
    """A deep copy of `config` with head_dim filled in where HF leaves it out (hidden_size // heads)."""
    config = copy.deepcopy(config)
    if config.get("head_dim") is None and config.get("num_attention_heads"):
        config["head_dim"] = config.get("hidden_size", 0) // config["num_attention_heads"]
    return config


def validate_config(config: dict, source: str = "config") -> SynthDims:
    """Check the fields the writers rely on; TpiError '<source>: <field>: ...' naming the bad value."""
    return load(SynthDims, {name: config.get(name) for name in SynthDims.model_fields}, source)


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
        layout = vocab_layout(tokenizer_style(config), vocab)
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
