"""The tensor-parallel split plan: which slice of every weight each device holds.

Owns the declarative plan (weight leaf name -> what it is split by) and the layout computation
(how many heads / FFN columns each rank gets, from ratios). One function, `shard_slice`, applies it.
Must not read or write files.

The split, as math (Megatron style). For a layer with input x [T, D]:
  attention: Q/K/V weights are split along their output dim by whole heads (`split_out` by `heads` /
  `kv_heads`); o_proj along its input dim (`split_in` by `heads`). Rank r computes
  o_r = Attn(x; heads_r) @ W_o[:, heads_r].T and sum_r o_r equals the unsplit output.
  MLP: gate/up split_out by `ffn` columns, down split_in by `ffn`: sum_r down_r(silu(gate_r) * up_r).
  Norm weights and the o_proj/down_proj biases are replicated (biases are added once, after the sum).
  Embedding, final norm and LM head live on the master (rank 0) only.
GQA: a rank holds whole KV groups (its query heads and their KV heads), or, when there are more ranks
than KV heads, a part of one group's query heads plus a copy of that group's KV head. Either way the
local query heads map onto local KV heads in equal consecutive groups, which model.attention relies on.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tpicore.errors import TpiError
from tpicore.model.config import ModelConfig

# leaf name (under model.layers.{i}.) -> (split by, axis) ; None = replicated on every rank
SPLIT_PLAN: dict[str, tuple[str, int] | None] = {
    "input_layernorm.weight": None,
    "self_attn.q_proj.weight": ("heads", 0),  # split_out by query heads
    "self_attn.q_proj.bias": ("heads", 0),
    "self_attn.k_proj.weight": ("kv_heads", 0),  # split_out by KV heads
    "self_attn.k_proj.bias": ("kv_heads", 0),
    "self_attn.v_proj.weight": ("kv_heads", 0),
    "self_attn.v_proj.bias": ("kv_heads", 0),
    "self_attn.o_proj.weight": ("heads", 1),  # split_in by query heads
    "self_attn.o_proj.bias": None,
    "post_attention_layernorm.weight": None,
    "mlp.gate_proj.weight": ("ffn", 0),  # split_out by FFN columns
    "mlp.gate_proj.bias": ("ffn", 0),
    "mlp.up_proj.weight": ("ffn", 0),
    "mlp.up_proj.bias": ("ffn", 0),
    "mlp.down_proj.weight": ("ffn", 1),  # split_in by FFN columns
    "mlp.down_proj.bias": None,
}
MASTER_ONLY = ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight")
ATTN_LEAVES = tuple(k for k in SPLIT_PLAN if k.startswith(("input_layernorm", "self_attn")))
FFN_LEAVES = tuple(k for k in SPLIT_PLAN if k.startswith(("post_attention_layernorm", "mlp")))


@dataclass(frozen=True)
class Layout:
    """What rank `rank` of `world_size` holds, in units of the unsplit model (half-open ranges)."""

    rank: int
    world_size: int
    heads: tuple[int, int]  # query heads
    kv_heads: tuple[int, int]
    ffn: tuple[int, int]  # FFN columns

    @property
    def n_heads(self) -> int:
        return self.heads[1] - self.heads[0]

    @property
    def n_kv_heads(self) -> int:
        return self.kv_heads[1] - self.kv_heads[0]

    @property
    def n_ffn(self) -> int:
        return self.ffn[1] - self.ffn[0]

    def to_json(self) -> dict:
        return {"rank": self.rank, "world_size": self.world_size, "heads": list(self.heads),
                "kv_heads": list(self.kv_heads), "ffn": list(self.ffn)}

    @classmethod
    def from_json(cls, d: dict) -> "Layout":
        return cls(int(d["rank"]), int(d["world_size"]), tuple(d["heads"]), tuple(d["kv_heads"]), tuple(d["ffn"]))


def apportion(total: int, weights: list[float], minimum: int = 1) -> list[int]:
    """Split `total` units into len(weights) counts proportional to weights, each >= minimum
    (largest-remainder rounding; ties go to lower ranks, so the result is deterministic)."""
    n = len(weights)
    spare = total - minimum * n
    assert spare >= 0
    w = np.asarray(weights, dtype=np.float64)
    ideal = spare * w / w.sum()
    counts = np.floor(ideal).astype(int)
    order = sorted(range(n), key=lambda i: (-(ideal[i] - counts[i]), i))
    for i in order[: spare - counts.sum()]:
        counts[i] += 1
    return [int(c) + minimum for c in counts]


def parse_ratios(text: str | None, world_size: int) -> list[float]:
    if not text:
        return [1.0] * world_size
    try:
        ratios = [float(r) for r in text.split(",")]
    except ValueError:
        raise TpiError(f"--ratios: expected comma-separated positive numbers, got {text!r}") from None
    if len(ratios) != world_size:
        raise TpiError(f"--ratios: got {len(ratios)} values for {world_size} devices")
    if any(not r > 0 for r in ratios):
        raise TpiError(f"--ratios: every ratio must be > 0, got {text!r}")
    return ratios


def plan_layouts(cfg: ModelConfig, world_size: int, ratios: list[float] | None = None) -> list[Layout]:
    """Each rank's share of heads and FFN columns, proportional to `ratios` (default: equal)."""
    n = world_size
    ratios = ratios or [1.0] * n
    H, Hkv, F = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.intermediate_size
    if n < 1:
        raise TpiError(f"--devices: expected >= 1, got {n}")
    if n > H:
        raise TpiError(f"--devices: {n} devices cannot split {H} attention heads (each device needs at least one"
                       f" whole head); use at most {H} devices")
    if n > F:
        raise TpiError(f"--devices: {n} devices cannot split an FFN of {F} columns; use at most {F} devices")
    g = cfg.group_size
    heads: list[tuple[int, int]] = []
    kv: list[tuple[int, int]] = []
    if n <= Hkv:  # whole GQA groups per rank
        start = 0
        for c in apportion(Hkv, ratios):
            kv.append((start, start + c))
            heads.append((start * g, (start + c) * g))
            start += c
    else:  # more ranks than KV heads: each group's query heads are split among consecutive ranks
        per_group = apportion(n, [1.0] * Hkv)  # ranks sharing each KV head (differ by at most one)
        if max(per_group) > g:
            raise TpiError(f"--devices: {n} devices cannot split {Hkv} KV groups of {g} query heads evenly enough;"
                           f" use at most {H} devices")
        rank = 0
        for group, m in enumerate(per_group):
            start = group * g
            for c in apportion(g, ratios[rank: rank + m]):
                heads.append((start, start + c))
                kv.append((group, group + 1))
                start += c
                rank += 1
    ffn_counts = apportion(F, ratios)
    ffn_starts = np.concatenate([[0], np.cumsum(ffn_counts)])
    return [Layout(r, n, heads[r], kv[r], (int(ffn_starts[r]), int(ffn_starts[r + 1]))) for r in range(n)]


def split_leaf(name: str) -> tuple[int | None, str]:
    """'model.layers.12.mlp.up_proj.weight' -> (12, 'mlp.up_proj.weight'); non-layer names -> (None, name)."""
    if name.startswith("model.layers."):
        rest = name[len("model.layers."):]
        idx, _, leaf = rest.partition(".")
        return int(idx), leaf
    return None, name


def shard_slice(name: str, layout: Layout, cfg: ModelConfig) -> tuple[int, int, int] | None | bool:
    """How rank `layout.rank` holds tensor `name`: (axis, start, stop) for a slice, True for the whole
    tensor, False for not at all."""
    layer, leaf = split_leaf(name)
    if layer is None:
        return layout.rank == 0 if name in MASTER_ONLY else False
    if leaf not in SPLIT_PLAN:
        raise TpiError(f"tensor {name!r}: not in the tensor-parallel plan (unsupported architecture?)")
    rule = SPLIT_PLAN[leaf]
    if rule is None:
        return True
    by, axis = rule
    if by == "ffn":
        return axis, layout.ffn[0], layout.ffn[1]
    lo, hi = layout.heads if by == "heads" else layout.kv_heads
    return axis, lo * cfg.head_dim, hi * cfg.head_dim


# ---------------------------------------------------------------------------------------------
# Blocks: the units a device runs, loads and times

Block = tuple[str, int]  # ("pre" | "attn" | "ffn" | "post", layer index; -1 for pre/post; chunk c for ("post", c))


def block_order(n_layers: int, master: bool, head_chunks: int | None = None) -> list[Block]:
    """The cyclic order in which one token's forward pass visits blocks on a device.

    With `head_chunks`, Post is that many blocks ("post", 0..C-1), one per vocabulary chunk of the LM
    head (the window scheduler streams the head); without, one block ("post", -1) holding it whole.
    """
    order: list[Block] = [("pre", -1)] if master else []
    for layer in range(n_layers):
        order += [("attn", layer), ("ffn", layer)]
    if not master:
        return order
    return order + ([("post", c) for c in range(head_chunks)] if head_chunks is not None else [("post", -1)])
