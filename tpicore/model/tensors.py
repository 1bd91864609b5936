"""The one table of Llama tensors: each checkpoint tensor once, with its shape, split rule, block and
when it exists.

Layer: model (imports tpicore.model.config, tpicore.model.split and tpicore.errors only). This is the
only place a tensor shape is written. Everything that needs one derives it from `TENSORS`: the split
(`shard_slice`), block membership and shape checks (tpicore.weights.store), synthesis
(tpicore.tools.synth), the memory predictor (tpicore.tools.predictor) and parameter counts. Must not
read files or hold weights.

A shape is a tuple of dimension letters, each sized by the model config and a device's share of the
model (its `Layout`; the one-device layout gives the unsplit shape). HF layout is (out, in):

    D   hidden size                    never split
    V   vocabulary                     never split (its tensors live on the master only)
    q   query heads x head dim         split by whole query heads          (layout.heads)
    kv  KV heads x head dim            split by whole KV heads, GQA groups kept together (layout.kv_heads)
    f   FFN columns                    split by FFN columns                (layout.ffn)

The split rule follows from the letters: a split letter on axis 0 splits the output (q/k/v, gate/up
and their biases), on axis 1 the input (o_proj, down_proj, whose partial outputs the allreduce sums).
Layer tensors with D only (the norms; the o_proj/down_proj biases, added once after the sum) are
replicated on every rank; the pre/post tensors (embedding, final norm, LM head) live on rank 0 only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np

from tpicore.errors import TpiError
from tpicore.model.config import ModelConfig
from tpicore.model.split import Layout, split_layouts


@dataclass(frozen=True)
class Dim:
    """One dimension letter: the [start, stop) range a share covers, in elements of the unsplit dim."""

    letter: str
    split_by: str | None  # the Layout field it is split by; None = never split
    span: Callable[[ModelConfig, Layout], tuple[int, int]]


DIMS: dict[str, Dim] = {d.letter: d for d in (
    Dim("D", None, lambda cfg, lay: (0, cfg.hidden_size)),
    Dim("V", None, lambda cfg, lay: (0, cfg.vocab_size)),
    Dim("q", "heads", lambda cfg, lay: (lay.heads[0] * cfg.head_dim, lay.heads[1] * cfg.head_dim)),
    Dim("kv", "kv_heads", lambda cfg, lay: (lay.kv_heads[0] * cfg.head_dim, lay.kv_heads[1] * cfg.head_dim)),
    Dim("f", "ffn", lambda cfg, lay: lay.ffn),
)}


# When a tensor exists, from the config
def always(cfg: ModelConfig) -> bool:
    return True


def attention_bias(cfg: ModelConfig) -> bool:
    return cfg.attention_bias


def o_proj_bias(cfg: ModelConfig) -> bool:
    return cfg.o_proj_bias  # Qwen2: q/k/v biases only


def mlp_bias(cfg: ModelConfig) -> bool:
    return cfg.mlp_bias


def untied_head(cfg: ModelConfig) -> bool:
    return not cfg.tie_word_embeddings  # tied: the LM head reads the embedding


@dataclass(frozen=True)
class Tensor:
    """One checkpoint tensor. `name` is the leaf under `model.layers.{i}.` for layer blocks (attn, ffn),
    the full HF name for the master's pre/post blocks."""

    name: str
    dims: tuple[str, ...]
    block: str  # "pre" | "attn" | "ffn" | "post"
    exists: Callable[[ModelConfig], bool] = always

    @property
    def per_layer(self) -> bool:
        return self.block in ("attn", "ffn")

    @property
    def split_axis(self) -> int | None:
        """The axis tensor parallelism splits, or None (replicated, or master-only)."""
        return next((i for i, d in enumerate(self.dims) if DIMS[d].split_by), None)

    @property
    def split_rule(self) -> str:
        """How ranks hold it, in words: 'master', 'replicated', or '<layout field> on axis <i>'."""
        if not self.per_layer:
            return "master"
        axis = self.split_axis
        return "replicated" if axis is None else f"{DIMS[self.dims[axis]].split_by} on axis {axis}"

    def shape(self, cfg: ModelConfig, layout: Layout) -> tuple[int, ...]:
        """This tensor's shape on a device holding `layout` (the unsplit shape for the one-device layout)."""
        return tuple(hi - lo for lo, hi in (DIMS[d].span(cfg, layout) for d in self.dims))


# The table, in checkpoint file order (pre, one layer's attn then ffn, post).
#       name (leaf under model.layers.{i}. for attn/ffn)   dims        block   exists when
TENSORS: tuple[Tensor, ...] = (
    Tensor("model.embed_tokens.weight", ("V", "D"), "pre"),
    Tensor("input_layernorm.weight", ("D",), "attn"),
    Tensor("self_attn.q_proj.weight", ("q", "D"), "attn"),
    Tensor("self_attn.q_proj.bias", ("q",), "attn", attention_bias),
    Tensor("self_attn.k_proj.weight", ("kv", "D"), "attn"),
    Tensor("self_attn.k_proj.bias", ("kv",), "attn", attention_bias),
    Tensor("self_attn.v_proj.weight", ("kv", "D"), "attn"),
    Tensor("self_attn.v_proj.bias", ("kv",), "attn", attention_bias),
    Tensor("self_attn.o_proj.weight", ("D", "q"), "attn"),
    Tensor("self_attn.o_proj.bias", ("D",), "attn", o_proj_bias),
    Tensor("post_attention_layernorm.weight", ("D",), "ffn"),
    Tensor("mlp.gate_proj.weight", ("f", "D"), "ffn"),
    Tensor("mlp.gate_proj.bias", ("f",), "ffn", mlp_bias),
    Tensor("mlp.up_proj.weight", ("f", "D"), "ffn"),
    Tensor("mlp.up_proj.bias", ("f",), "ffn", mlp_bias),
    Tensor("mlp.down_proj.weight", ("D", "f"), "ffn"),
    Tensor("mlp.down_proj.bias", ("D",), "ffn", mlp_bias),
    Tensor("model.norm.weight", ("D",), "post"),
    Tensor("lm_head.weight", ("V", "D"), "post", untied_head),
)

# Derived views of the table
LAYER_TENSORS: dict[str, Tensor] = {t.name: t for t in TENSORS if t.per_layer}
MASTER_TENSORS: dict[str, Tensor] = {t.name: t for t in TENSORS if not t.per_layer}
MASTER_ONLY: tuple[str, ...] = tuple(MASTER_TENSORS)
ATTN_LEAVES: tuple[str, ...] = tuple(t.name for t in TENSORS if t.block == "attn")
FFN_LEAVES: tuple[str, ...] = tuple(t.name for t in TENSORS if t.block == "ffn")
EMBED, FINAL_NORM, LM_HEAD = MASTER_ONLY


def layer_name(layer: int, leaf: str) -> str:
    return f"model.layers.{layer}.{leaf}"


def split_leaf(name: str) -> tuple[int | None, str]:
    """'model.layers.12.mlp.up_proj.weight' -> (12, 'mlp.up_proj.weight'); non-layer names -> (None, name)."""
    if name.startswith("model.layers."):
        rest = name[len("model.layers."):]
        idx, _, leaf = rest.partition(".")
        return int(idx), leaf
    return None, name


def whole(cfg: ModelConfig) -> Layout:
    """The one-device layout: the share that holds everything (unsplit shapes)."""
    return split_layouts(cfg, 1)[0]


def held_tensors(cfg: ModelConfig, layout: Layout, layers: list[int] | None = None) -> list[tuple[str, tuple[int, ...]]]:
    """(HF name, shape on this device) of every tensor a device holding `layout` stores for `cfg`, in
    checkpoint file order: the embedding, layers `layers` (default all), the final norm and head; the
    pre/post tensors on rank 0 only."""
    layers = range(cfg.num_hidden_layers) if layers is None else layers
    master = layout.rank == 0
    out = [(t.name, t.shape(cfg, layout)) for t in TENSORS if t.block == "pre" and master and t.exists(cfg)]
    for i in layers:
        lay = layout.at(i, cfg)  # a private layer: whole on rank 0, absent on a worker
        if lay is not None:
            out += [(layer_name(i, t.name), t.shape(cfg, lay)) for t in LAYER_TENSORS.values() if t.exists(cfg)]
    out += [(t.name, t.shape(cfg, layout)) for t in TENSORS if t.block == "post" and master and t.exists(cfg)]
    return out


def checkpoint_tensors(cfg: ModelConfig) -> list[tuple[str, tuple[int, ...]]]:
    """(HF name, unsplit shape) of every tensor of a checkpoint of `cfg`, in file order."""
    return held_tensors(cfg, whole(cfg))


def param_count(cfg: ModelConfig) -> int:
    return sum(math.prod(shape) for _, shape in checkpoint_tensors(cfg))


def block_elems(cfg: ModelConfig, layout: Layout, block: str) -> int:
    """Elements one layer's `block` ('attn' or 'ffn') holds on a device with `layout`."""
    return sum(math.prod(t.shape(cfg, layout)) for t in LAYER_TENSORS.values() if t.block == block and t.exists(cfg))


# ---------------------------------------------------------------------------------------------
# The split applied to one tensor


@dataclass(frozen=True)
class Part:
    """What one rank holds of a tensor: all of it (`axis` None), or [start, stop) along `axis`."""

    axis: int | None = None
    start: int = 0
    stop: int = 0

    @property
    def whole(self) -> bool:
        return self.axis is None

    def shape(self, full: tuple[int, ...]) -> tuple[int, ...]:
        if self.axis is None:
            return full
        return full[:self.axis] + (self.stop - self.start,) + full[self.axis + 1:]

    def of(self, arr: np.ndarray) -> np.ndarray:
        """This part of the unsplit array `arr` (a view)."""
        if self.axis is None:
            return arr
        return arr[(slice(None),) * self.axis + (slice(self.start, self.stop),)]


    def of_rows(self, block: np.ndarray, r0: int, r1: int) -> np.ndarray | None:
        """This part of rows r0..r1 of the unsplit tensor, given those rows as `block` (a view; a column
        range is not contiguous), or None when the part has none of those rows."""
        if self.axis == 0:
            lo, hi = max(self.start, r0), min(self.stop, r1)
            return block[lo - r0: hi - r0] if lo < hi else None
        return self.of(block)


WHOLE = Part()


def shard_slice(name: str, layout: Layout, cfg: ModelConfig) -> Part | None:
    """What rank `layout.rank` holds of tensor `name`: a `Part` (whole, or a range along one axis), or
    None when it holds none of it (a master-only tensor on a worker; a private layer's tensor on a worker).
    A private layer's tensors are held whole by rank 0 (`Layout.at`)."""
    layer, leaf = split_leaf(name)
    if layer is None:
        return WHOLE if name in MASTER_TENSORS and layout.rank == 0 else None
    if leaf not in LAYER_TENSORS:
        raise TpiError(f"tensor {name!r}: not in the tensor-parallel plan (unsupported architecture?)")
    t = LAYER_TENSORS[leaf]
    lay = layout.at(layer, cfg)
    if lay is None:  # a private layer on a worker: nothing of it
        return None
    axis = t.split_axis
    if axis is None:
        return WHOLE
    return Part(axis, *DIMS[t.dims[axis]].span(cfg, lay))
