"""`--split-head`: the LM head sharded over the devices by vocabulary rows gives the single-process tokens
and logits (within fp32 rounding, like any split), for every allreduce, tied heads and balanced ratios;
it refuses the window and an all-private run; the vocabulary split covers every row once."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import hf_logits

from tpicore.dist.session import run_local
from tpicore.dist.split_head import check_split_head, vocab_ranges
from tpicore.errors import TpiError
from tpicore.runtime.device import Device, ResidentSource
from tpicore.runtime.generate import generate
from tpicore.weights.store import TensorStore

PROMPT = [1, 17, 42, 99, 5]
NEW = 8


@pytest.fixture(autouse=True)
def shard_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("TPI_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "tpi-cache"))


@pytest.mark.parametrize("n,algo,variant,ratios", [
    (2, "star", "wide", None), (3, "ring", "wide", "balanced"), (4, "tree", "tied", None), (3, "star", "bias", "3,2,1"),
])
def test_split_head_equals_single_process(hf_models, n, algo, variant, ratios):
    model_dir, ref = hf_models(variant)
    st = TensorStore.from_model_dir(model_dir)
    base = generate(Device(st, ResidentSource(st), 64).step, PROMPT, NEW, max_seq=64, keep_logits=True)
    gen, report = run_local(n, PROMPT, NEW, model=model_dir, ratios=ratios, allreduce=algo, keep_logits=True,
                            split_head=True)
    assert gen.tokens == base.tokens
    ours = np.stack(gen.logits)
    assert np.abs(ours - np.stack(base.logits)).max() <= 1e-4
    assert np.abs(ours - hf_logits(ref, PROMPT + gen.tokens[:-1])).max() <= 1e-4
    assert len(report["per_rank"]) == n


def test_vocab_ranges_cover_every_row_once():
    for v, n in [(16, 3), (32000, 2), (49152, 8), (5, 5)]:
        r = vocab_ranges(v, n)
        assert r[0][0] == 0 and r[-1][1] == v and all(a[1] == b[0] for a, b in zip(r, r[1:]))
        assert max(hi - lo for lo, hi in r) - min(hi - lo for lo, hi in r) <= 1


def test_split_head_refusals():
    with pytest.raises(TpiError, match="--window"):
        check_split_head(4, 2)
    with pytest.raises(TpiError, match="private"):
        check_split_head(None, 0)
