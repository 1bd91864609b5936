"""The tensor-parallel split: layouts partition heads and FFN columns for every world size and ratio, refusals say
why and what works, and (the key property) the ranks' partial attention / MLP outputs sum to the
unsplit output for every world size, including uneven splits and more ranks than KV heads."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tpicore.errors import TpiError
from tpicore.model import llama as M
from tpicore.model.config import ModelConfig
from tpicore.model.split import Layout, apportion, parse_ratios, split_layouts
from tpicore.model.tensors import (
    ATTN_LEAVES,
    FFN_LEAVES,
    LAYER_TENSORS,
    MASTER_ONLY,
    WHOLE,
    layer_name,
    shard_slice,
    whole,
)
from tpicore.weights.checkpoint import Checkpoint


def make_cfg(H: int, Hkv: int, F: int, Dh: int = 8) -> ModelConfig:
    return ModelConfig(hidden_size=H * Dh, intermediate_size=F, num_hidden_layers=1, num_attention_heads=H,
                       num_key_value_heads=Hkv, head_dim=Dh, vocab_size=16, max_position_embeddings=64,
                       rms_norm_eps=1e-5, rope_theta=1e4)


def check_layouts(cfg: ModelConfig, layouts: list[Layout], ratios: list[float]) -> None:
    """Every invariant the engine relies on, for one plan."""
    H, Hkv, F, g = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.intermediate_size, cfg.group_size
    n = len(ratios)
    assert [(lay.rank, lay.world_size) for lay in layouts] == [(r, n) for r in range(n)]
    # heads and FFN columns: consecutive ranges in rank order that cover [0, H) and [0, F) exactly
    for field, total in (("heads", H), ("ffn", F)):
        ranges = [getattr(lay, field) for lay in layouts]
        assert ranges[0][0] == 0 and ranges[-1][1] == total, (field, ranges)
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:])), (field, ranges)
        assert all(hi - lo >= 1 for lo, hi in ranges), (field, ranges)
    for lay in layouts:
        # the KV range holds exactly the groups of the rank's query heads...
        groups = {h // g for h in range(*lay.heads)}
        assert groups == set(range(*lay.kv_heads)), lay
        assert 0 <= lay.kv_heads[0] < lay.kv_heads[1] <= Hkv, lay
        # ...and local heads map onto local KV heads in equal consecutive groups (what model.attention does)
        assert lay.n_heads % lay.n_kv_heads == 0, lay
        local_g = lay.n_heads // lay.n_kv_heads
        for i in range(lay.n_heads):
            assert (lay.heads[0] + i) // g - lay.kv_heads[0] == i // local_g, (lay, i)
    # ratios: a bigger ratio never gets fewer FFN columns, and shares stay near proportional
    w = np.asarray(ratios) / sum(ratios)
    cols = [lay.n_ffn for lay in layouts]
    for i, j in itertools.permutations(range(n), 2):
        if ratios[i] > ratios[j]:
            assert cols[i] >= cols[j], (ratios, cols)
        if ratios[i] == ratios[j]:
            assert abs(cols[i] - cols[j]) <= 1, (ratios, cols)
    assert np.all(np.abs(np.asarray(cols) - F * w) <= n + 1), (ratios, cols)
    if n <= Hkv:  # whole GQA groups are apportioned by ratio too
        kv = [lay.n_kv_heads for lay in layouts]
        for i, j in itertools.permutations(range(n), 2):
            if ratios[i] > ratios[j]:
                assert kv[i] >= kv[j], (ratios, kv)
    else:  # ranks sharing one KV head split its query heads by ratio
        for i, j in itertools.permutations(range(n), 2):
            if layouts[i].kv_heads == layouts[j].kv_heads and ratios[i] > ratios[j]:
                assert layouts[i].n_heads >= layouts[j].n_heads, (ratios, layouts)


def test_apportion_gives_a_larger_weight_at_least_as_much_even_when_rounding_ties():
    """Hypothesis found 5 KV heads over ratios (0.1, 0.1 + 1 ulp): both ideal shares round to 1.5, and the
    tie went to the lower rank, so the larger ratio got fewer heads."""
    assert apportion(5, [0.1, 0.10000000000000002]) == [2, 3]
    assert apportion(5, [1.0, 1.0]) == [3, 2]  # equal weights: the lower rank, as before


def ratio_sets(n: int) -> list[list[float]]:
    return [[1.0] * n, [float(n - i) for i in range(n)], [float(x) for x in ([3, 2, 2, 1] * 2)[:n]],
            [10.0] + [1.0] * (n - 1), [1.0] * (n - 1) + [7.5]]


HEAD_SHAPES = [(1, 1), (2, 1), (2, 2), (3, 1), (4, 1), (4, 2), (4, 4), (5, 5), (6, 1), (6, 2), (6, 3), (8, 2),
               (8, 8), (12, 4), (32, 8), (64, 8)]


@pytest.mark.parametrize("H,Hkv", HEAD_SHAPES)
def test_layouts_cover_and_group(H, Hkv):
    checked = 0
    for F, n in itertools.product((1, 3, 7, 80, 91, 11008), (1, 2, 3, 4, 8)):
        cfg = make_cfg(H, Hkv, F)
        for ratios in ratio_sets(n):
            if n > H or n > F:
                with pytest.raises(TpiError):
                    split_layouts(cfg, n, ratios)
                continue
            check_layouts(cfg, split_layouts(cfg, n, ratios), ratios)
            checked += 1
    assert checked > 0


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_layouts_property(data):
    Hkv = data.draw(st.integers(1, 8), label="Hkv")
    H = Hkv * data.draw(st.integers(1, 8), label="group")
    F = data.draw(st.integers(1, 300), label="F")
    n = data.draw(st.integers(1, min(H, F, 12)), label="N")
    ratios = data.draw(st.lists(st.floats(0.1, 10.0), min_size=n, max_size=n), label="ratios")
    cfg = make_cfg(H, Hkv, F)
    check_layouts(cfg, split_layouts(cfg, n, ratios), ratios)


@pytest.mark.parametrize("H,Hkv,F,n", [(4, 2, 80, 1), (4, 2, 80, 3), (8, 2, 91, 8), (6, 6, 30, 4), (8, 1, 17, 5)])
def test_table_shapes_are_what_shard_slice_cuts(H, Hkv, F, n):
    """Every layer tensor: the shape the table gives a rank is the part shard_slice cuts for it, split
    tensors' parts cover the unsplit axis in order (KV parts may repeat: ranks sharing a group), and
    the one-device layout gives the unsplit shapes."""
    cfg = make_cfg(H, Hkv, F)
    layouts = split_layouts(cfg, n)
    assert whole(cfg) == split_layouts(cfg, 1)[0]
    for t in LAYER_TENSORS.values():
        full = t.shape(cfg, whole(cfg))
        parts = [shard_slice(layer_name(0, t.name), lay, cfg) for lay in layouts]
        assert [p.shape(full) for p in parts] == [t.shape(cfg, lay) for lay in layouts], t.name
        if t.split_axis is None:
            assert all(p.whole for p in parts), t.name
            continue
        spans = sorted({(p.start, p.stop) for p in parts})
        assert spans[0][0] == 0 and spans[-1][1] == full[t.split_axis], t.name
        assert all(a[1] == b[0] for a, b in zip(spans, spans[1:])), t.name
    for name in MASTER_ONLY:
        assert [shard_slice(name, lay, cfg) for lay in layouts] == [WHOLE] + [None] * (n - 1)


def test_more_ranks_than_kv_heads_share_a_group():
    # Hkv=2, N=3: one group's query heads are split across two ranks, each holding a copy of its KV head
    lays = split_layouts(make_cfg(8, 2, 91), 3)
    assert [lay.kv_heads for lay in lays] == [(0, 1), (0, 1), (1, 2)]
    assert [lay.heads for lay in lays] == [(0, 2), (2, 4), (4, 8)]
    lays = split_layouts(make_cfg(8, 2, 91), 8)
    assert [lay.heads for lay in lays] == [(h, h + 1) for h in range(8)]
    assert [lay.kv_heads[0] for lay in lays] == [0, 0, 0, 0, 1, 1, 1, 1]


def test_refusals_say_why_and_what_works():
    cfg = make_cfg(4, 2, 80)
    with pytest.raises(TpiError) as e:
        split_layouts(cfg, 5)
    msg = str(e.value)
    assert "5 devices" in msg and "4 attention heads" in msg and "at most 4" in msg
    assert "\n" not in msg
    with pytest.raises(TpiError, match="at most 3 devices"):
        split_layouts(make_cfg(4, 4, 3), 4)
    with pytest.raises(TpiError, match="expected >= 1"):
        split_layouts(cfg, 0)


@pytest.mark.parametrize("text,n,match", [("3,2", 3, "2 values for 3 devices"), ("1,x", 2, "comma-separated"),
                                          ("1,0", 2, "must be > 0"), ("1,-2", 2, "must be > 0")])
def test_parse_ratios_refusals(text, n, match):
    with pytest.raises(TpiError, match=match):
        parse_ratios(text, n)


def test_parse_ratios():
    assert parse_ratios("3,2,2,1", 4) == [3.0, 2.0, 2.0, 1.0]
    assert parse_ratios(None, 3) == [1.0, 1.0, 1.0]


# ---------------------------------------------------------------------------------------------
# Sharded equals unsharded


def take(arr: np.ndarray, how) -> np.ndarray:
    """Apply a `shard_slice` result (a Part) to a full tensor."""
    if how.whole:
        return arr
    return arr[(slice(None),) * how.axis + (slice(how.start, how.stop),)]


def layer_weights(ckpt: Checkpoint, layer: int) -> dict[str, np.ndarray]:
    names = {leaf: f"model.layers.{layer}.{leaf}" for leaf in ATTN_LEAVES + FFN_LEAVES}
    return {leaf: ckpt.get(name) for leaf, name in names.items() if name in ckpt}


def rank_weights(full: dict[str, np.ndarray], layer: int, lay: Layout, cfg: ModelConfig) -> dict[str, np.ndarray]:
    out = {}
    for leaf, arr in full.items():
        how = shard_slice(f"model.layers.{layer}.{leaf}", lay, cfg)
        assert how is not None, leaf  # every layer tensor lives on every rank, whole or in part
        out[leaf] = np.ascontiguousarray(take(arr, how))
    return out


SUM_CASES = [(v, n) for v, heads in (("mha", 4), ("gqa", 4), ("gqa1", 6), ("headdim", 6), ("bias", 4), ("wide", 8))
             for n in (1, 2, 3, 4, 8) if n <= heads]


@pytest.mark.parametrize("variant,n", SUM_CASES)
def test_partial_outputs_sum_to_unsharded(hf_models, variant, n):
    model_dir, _ = hf_models(variant)
    cfg = ModelConfig.from_dir(model_dir)
    ckpt = Checkpoint.from_dir(model_dir)
    rng = np.random.default_rng(n)
    D, Dh, T, S = cfg.hidden_size, cfg.head_dim, 5, 8
    ratios = [float(n - r) for r in range(n)]  # uneven on purpose: 8,7,...,1
    layouts = split_layouts(cfg, n, ratios)
    for layer in range(cfg.num_hidden_layers):
        full = layer_weights(ckpt, layer)
        per_rank = [rank_weights(full, layer, lay, cfg) for lay in layouts]
        ref_kv = M.KVCache(cfg.num_key_value_heads, S, Dh)
        kvs = [M.KVCache(lay.n_kv_heads, S, Dh) for lay in layouts]
        # prefill T tokens, then one cached decode step: the per-rank caches must stay in step too
        for pos, x in ((0, rng.standard_normal((T, D)).astype(np.float32)),
                       (T, rng.standard_normal((1, D)).astype(np.float32))):
            ref = M.attention(x, full, cfg, ref_kv, pos)
            got = sum(M.attention(x, w, cfg, kv, pos) for w, kv in zip(per_rank, kvs))
            np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5, err_msg=f"attention layer {layer} pos {pos}")
            ref = M.mlp(x, full)
            got = sum(M.mlp(x, w) for w in per_rank)
            np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5, err_msg=f"mlp layer {layer} pos {pos}")
