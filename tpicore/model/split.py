"""The tensor-parallel split: each device's share of the model (its `Layout`), and the block order.

Layer: model (imports tpicore.model.config and tpicore.errors only). Owns the layout computation (how
many query heads, KV heads and FFN columns each rank gets, from ratios) and the cyclic order of blocks a
device runs. How each tensor is cut by a layout is in tpicore.model.tensors (the one table of tensors and
`shard_slice`). Must not read or write files.

The split, as math (Megatron style). For a layer with input x [T, D]:
  attention: Q/K/V weights are split along their output dim by whole heads (`heads` / `kv_heads`);
  o_proj along its input dim (by `heads`). Rank r computes o_r = Attn(x; heads_r) @ W_o[:, heads_r].T
  and sum_r o_r equals the unsplit output.
  MLP: gate/up split along their output dim by `ffn` columns, down along its input dim by `ffn`:
  sum_r down_r(silu(gate_r) * up_r).
  Norm weights and the o_proj/down_proj biases are replicated (biases are added once, after the sum).
  Embedding, final norm and LM head live on the master (rank 0) only.
Private layers (`--private-layers K`): layers 0..K-1 are not split; rank 0 holds all their heads and FFN
columns and runs them alone, the other ranks hold nothing of them and are sent nothing for them, so what
a worker sees is the hidden state after layer K, never the embedding. `Layout.at(layer)` is the one rule:
a rank's share of one layer (the whole-model share on rank 0 for a private layer, None on a worker).
GQA: a rank holds whole KV groups (its query heads and their KV heads), or, when there are more ranks
than KV heads, a part of one group's query heads plus a copy of that group's KV head. Either way the
local query heads map onto local KV heads in equal consecutive groups, which model.attention relies on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable

import numpy as np

from tpicore.errors import TpiError
from tpicore.model.config import ModelConfig


@dataclass(frozen=True)
class Layout:
    """What rank `rank` of `world_size` holds, in units of the unsplit model (half-open ranges)."""

    rank: int
    world_size: int
    heads: tuple[int, int]  # query heads
    kv_heads: tuple[int, int]
    ffn: tuple[int, int]  # FFN columns
    private_layers: int = 0  # layers 0..K-1 run on rank 0 alone (rank 0 holds them whole, workers not at all)

    def private(self, layer: int) -> bool:
        """True when `layer` runs on the master alone (not tensor parallel)."""
        return layer < self.private_layers

    def at(self, layer: int, cfg: ModelConfig) -> "Layout | None":
        """This rank's share of one layer: itself for a shared layer; for a private layer the whole layer
        on rank 0 (all heads and FFN columns) and None (nothing) on a worker."""
        if not self.private(layer):
            return self
        if self.rank != 0:
            return None
        H, Hkv, F = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.intermediate_size
        return Layout(0, self.world_size, (0, H), (0, Hkv), (0, F), self.private_layers)

    def shared_layers(self, n_layers: int) -> range:
        """The layers this rank runs with the others (tensor parallel): K..n_layers-1."""
        return range(min(self.private_layers, n_layers), n_layers)

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
        """The manifest's "layout" (and a fingerprint input); `private_layers` only when > 0, so that
        folders written without private layers keep their bytes and fingerprints."""
        doc = {"rank": self.rank, "world_size": self.world_size, "heads": list(self.heads),
               "kv_heads": list(self.kv_heads), "ffn": list(self.ffn)}
        if self.private_layers:
            doc["private_layers"] = self.private_layers
        return doc

    @classmethod
    def from_json(cls, d: dict) -> "Layout":
        return cls(int(d["rank"]), int(d["world_size"]), tuple(d["heads"]), tuple(d["kv_heads"]), tuple(d["ffn"]),
                   int(d.get("private_layers", 0)))


def apportion(total: int, weights: list[float], minimum: int = 1) -> list[int]:
    """Split `total` units into len(weights) counts proportional to weights, each >= minimum
    (largest-remainder rounding; equal remainders go to the larger weight, then to the lower rank, so a
    larger weight never gets fewer units even when float rounding ties their ideal shares)."""
    n = len(weights)
    spare = total - minimum * n
    assert spare >= 0
    w = np.asarray(weights, dtype=np.float64)
    ideal = spare * w / w.sum()
    counts = np.floor(ideal).astype(int)
    order = sorted(range(n), key=lambda i: (-(ideal[i] - counts[i]), -w[i], i))
    for i in order[: spare - counts.sum()]:
        counts[i] += 1
    return [int(c) + minimum for c in counts]


def check_ratios(ratios: Iterable[float] | str | None, world_size: int) -> list[float]:
    """Ratios as a list of positive floats, one per device: None -> equal, text -> parsed ('3,2,2,1')."""
    if ratios is None:
        return [1.0] * max(world_size, 0)
    if isinstance(ratios, str):
        return parse_ratios(ratios, world_size)
    out = [float(r) for r in ratios]
    if len(out) != world_size:
        raise TpiError(f"--ratios: got {len(out)} values for {world_size} devices")
    if any(not r > 0 for r in out):
        raise TpiError(f"--ratios: every ratio must be > 0, got {out}")
    if not math.isfinite(sum(out)):  # inf, or shares so large that their total overflows
        raise TpiError(f"--ratios: expected finite shares (their total too), got {out}")
    return out


def parse_ratios(text: str | None, world_size: int) -> list[float]:
    """--ratios '3,2,2,1' -> [3.0, 2.0, 2.0, 1.0]; empty, None or 'equal' -> equal shares."""
    if not text or text.strip() == "equal":
        return [1.0] * world_size
    try:
        ratios = [float(r) for r in text.split(",")]
    except ValueError:
        raise TpiError(f"--ratios: expected comma-separated positive numbers, got {text!r}") from None
    return check_ratios(ratios, world_size)


def check_private_layers(k: int, cfg: ModelConfig) -> int:
    """--private-layers K: an integer 0..num_hidden_layers (K = all layers: the workers hold nothing)."""
    L = cfg.num_hidden_layers
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= L:
        raise TpiError(f"--private-layers: expected an integer 0..{L} (the model has {L} layers), got {k!r}")
    return k


def split_layouts(cfg: ModelConfig, world_size: int, ratios: list[float] | None = None,
                  private_layers: int = 0) -> list[Layout]:
    """Each rank's share of heads and FFN columns, proportional to `ratios` (default: equal); layers
    0..private_layers-1 stay whole on rank 0 (`Layout.at`)."""
    check_private_layers(private_layers, cfg)
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
    return [Layout(r, n, heads[r], kv[r], (int(ffn_starts[r]), int(ffn_starts[r + 1])), private_layers)
            for r in range(n)]


def step_bytes(cfg: ModelConfig, layout: Layout, itemsize: int = 4) -> int:
    """Weight bytes one decode step reads on this rank (`itemsize` bytes per weight; f32 by default):
    its share of every layer it runs, and on rank 0 also the final norm and the LM head (one
    embedding row is negligible). A rank's decode time is close to proportional to it."""
    D, Dh, L = cfg.hidden_size, cfg.head_dim, cfg.num_hidden_layers

    def layer(share: Layout) -> int:  # q and o by query heads, k and v by KV heads, gate/up/down by FFN columns
        return D * Dh * 2 * (share.n_heads + share.n_kv_heads) + 3 * D * share.n_ffn + 2 * D

    k = min(layout.private_layers, L)
    total = (L - k) * layer(layout)
    if layout.rank == 0:
        total += k * layer(layout.at(0, cfg) if k else layout) + cfg.vocab_size * D + D
    return total * itemsize


def balanced_ratios(cfg: ModelConfig, world_size: int, private_layers: int = 0, steps: int = 400) -> list[float]:
    """`--ratios balanced`: ratios [r0, 1, ..., 1] whose `split_layouts` make every rank read about the
    same bytes per step (`step_bytes`), the master's LM head (and private layers) included, so the master
    gets correspondingly fewer heads and FFN columns. r0 is searched on a grid of `steps` values in
    (0, 1] (ties: the smallest); when the head alone exceeds an equal share the master keeps the minimum
    (one head, one column). Expressed as ratios, so manifests recompute the same layouts.

    Equal totals are not equal latency: each block ends in an allreduce, so a decode step costs the sum
    over blocks of the slowest rank, plus the head; equal shares minimise that (the default)."""
    if world_size <= 1:
        return [1.0] * max(world_size, 0)
    best: tuple[int, list[float]] | None = None
    for i in range(1, steps + 1):
        ratios = [round(i / steps, 6)] + [1.0] * (world_size - 1)
        cost = max(step_bytes(cfg, lay) for lay in split_layouts(cfg, world_size, ratios, private_layers))
        if best is None or cost < best[0]:
            best = (cost, ratios)
    return best[1]  # type: ignore[index]


# ---------------------------------------------------------------------------------------------
# Blocks: the units a device runs, loads and times

Block = tuple[str, int]  # ("pre" | "attn" | "ffn" | "post", layer index; -1 for pre/post; chunk c for ("post", c))


def block_order(n_layers: int, master: bool, head_chunks: int | None = None, first_layer: int = 0) -> list[Block]:
    """The cyclic order in which one token's forward pass visits blocks on a device.

    With `head_chunks`, Post is that many blocks ("post", 0..C-1), one per vocabulary chunk of the LM
    head (the window scheduler streams the head); without, one block ("post", -1) holding it whole.
    `first_layer`: a worker with private layers runs layers first_layer.. only (Layout.shared_layers).
    """
    order: list[Block] = [("pre", -1)] if master else []
    for layer in range(first_layer, n_layers):
        order += [("attn", layer), ("ffn", layer)]
    if not master:
        return order
    return order + ([("post", c) for c in range(head_chunks)] if head_chunks is not None else [("post", -1)])
