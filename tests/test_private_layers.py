"""`--private-layers K`: the first K layers run on the master alone. Output equals single process for K in
{0, 1, L}, N in {2, 3}, with ratios and the window; the split and the manifests follow the rule; and (the
point of it) with K >= 1 no worker ever receives the embedding rows of the prompt or of generated tokens."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from test_parallel import _recording_worker, frames_per_socket

from tpicore.dist.session import run_local
from tpicore.errors import TpiError
from tpicore.model.config import ModelConfig
from tpicore.model.split import Layout, block_order, split_layouts
from tpicore.model.tensors import held_tensors, layer_name, shard_slice
from tpicore.runtime.device import Device, ResidentSource
from tpicore.runtime.generate import generate
from tpicore.tools.shard import model_fingerprint, shard_checkpoint
from tpicore.weights.manifest import read_manifest
from tpicore.weights.store import TensorStore

PROMPT = [1, 17, 42, 99, 5]
NEW = 6
L = 3  # layers of the tiny models (conftest.TINY_BASE)


@pytest.fixture(autouse=True)
def shard_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("TPI_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "tpi-cache"))


def single(model_dir, prompt=PROMPT, new=NEW):
    st = TensorStore.from_model_dir(model_dir)
    return generate(Device(st, ResidentSource(st), 64).step, prompt, new, max_seq=64, keep_logits=True)


# (devices, private layers, ratios, allreduce, window, variant)
CASES = [
    (2, 0, None, "star", None, "wide"), (2, 1, "1,3", "star", None, "wide"), (2, L, None, "ring", None, "wide"),
    (3, 0, "3,2,1", "ring", None, "wide"), (3, 1, "3,2,1", "tree", None, "wide"), (3, L, "1,1,2", "star", None, "wide"),
    (3, 2, None, "star", 2, "wide"), (3, L, None, "star", 2, "wide"), (3, 1, None, "ring", None, "gqa1"),
    (2, 1, "2,1", "star", None, "bias"), (3, 1, None, "star", None, "tied"),
]


@pytest.mark.parametrize("n,k,ratios,algo,window,variant", CASES)
def test_private_layers_equal_single_process(hf_models, n, k, ratios, algo, window, variant):
    model_dir, _ = hf_models(variant)
    base = single(model_dir)
    gen, report = run_local(n, PROMPT, NEW, model=model_dir, ratios=ratios, allreduce=algo, window=window,
                            keep_logits=True, private_layers=k)
    assert gen.tokens == base.tokens
    ours, ref = np.stack(gen.logits), np.stack(base.logits)
    assert np.abs(ours - ref).max() <= 1e-5
    if k == L:  # the master runs the whole model with the same weights and math as one process
        assert np.array_equal(ours, ref)
    assert len(report["per_rank"]) == n


def test_layout_rule_and_tensor_table():
    cfg = ModelConfig(hidden_size=32, intermediate_size=40, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=8, vocab_size=16, max_position_embeddings=64,
                      rms_norm_eps=1e-5, rope_theta=1e4)
    lays = split_layouts(cfg, 3, [3, 2, 1], private_layers=2)
    assert [lay.private_layers for lay in lays] == [2, 2, 2]
    assert lays[0].at(1, cfg) == Layout(0, 3, (0, 4), (0, 2), (0, 40), 2) and lays[0].at(2, cfg) is lays[0]
    assert lays[1].at(0, cfg) is None and lays[1].at(2, cfg) is lays[1]
    assert list(lays[1].shared_layers(4)) == [2, 3] and list(lays[0].shared_layers(4)) == [2, 3]
    q = layer_name(0, "self_attn.q_proj.weight")
    assert shard_slice(q, lays[1], cfg) is None and shard_slice(q, lays[0], cfg).whole is False
    assert shard_slice(q, lays[0], cfg).shape((32, 32)) == (32, 32)  # all heads on rank 0
    worker = dict(held_tensors(cfg, lays[2]))
    assert not any(name.startswith(("model.layers.0.", "model.layers.1.")) for name in worker)
    assert any(name.startswith("model.layers.2.") for name in worker)
    master = dict(held_tensors(cfg, lays[0]))
    assert master[layer_name(0, "mlp.up_proj.weight")] == (40, 32)
    assert master[layer_name(2, "mlp.up_proj.weight")] == (lays[0].n_ffn, 32)
    assert block_order(4, False, first_layer=2) == [("attn", 2), ("ffn", 2), ("attn", 3), ("ffn", 3)]
    # K = 0 keeps the layout JSON (manifests, fingerprints) of today
    assert "private_layers" not in split_layouts(cfg, 2)[0].to_json()
    assert Layout.from_json(lays[1].to_json()) == lays[1]
    for bad in (-1, 5, 1.5, True):
        with pytest.raises(TpiError, match="--private-layers"):
            split_layouts(cfg, 2, private_layers=bad)


def test_shards_record_k_in_manifest_and_fingerprint(hf_models, tmp_path):
    model_dir, _ = hf_models("wide")
    dirs = shard_checkpoint(model_dir, str(tmp_path / "k1"), 3, private_layers=1, quiet=True)
    mans = [read_manifest(d) for d in dirs]
    assert all(m.layout.private_layers == 1 for m in mans)
    assert not any(name.startswith("model.layers.0.") for name in mans[1].tensors)
    assert mans[0].tensors[layer_name(0, "self_attn.q_proj.weight")].shape == (64, 64)
    assert len({m.fingerprint for m in mans}) == 1
    assert model_fingerprint(model_dir, 3) != mans[0].fingerprint  # K is part of the split's identity
    for d in dirs:
        TensorStore.from_shard_dir(d).check()
    # --shards written with K = 1: the flag may be left out, a different K is refused
    gen, _ = run_local(3, PROMPT, 3, shards=str(tmp_path / "k1"))
    assert gen.tokens == single(model_dir, new=3).tokens
    with pytest.raises(TpiError, match="--private-layers 1, not 2"):
        run_local(3, PROMPT, 3, shards=str(tmp_path / "k1"), private_layers=2)


def _record_workers(monkeypatch, tmp_path, ranks):
    from tpicore.dist import session as parallel

    logs = {r: str(tmp_path / f"rank{r}.bin") for r in ranks}
    real_start = parallel.LocalWorkers.start

    def start(self, target, args_per_rank):
        real_start(self, _recording_worker, {r: a + (logs[r],) for r, a in args_per_rank.items()})

    monkeypatch.setattr(parallel.LocalWorkers, "start", start)
    return logs


def _embedding_rows_seen(raw: bytes, table: np.ndarray, ids: list[int]) -> list[int]:
    """Token ids whose embedding row (as float32 bytes, or its first 8 values) occurs in `raw`."""
    return [i for i in set(ids) if table[i].astype("<f4").tobytes()[:32] in raw]


@pytest.mark.parametrize("k", [0, 1, L])
def test_workers_never_receive_embedding_rows(hf_models, tmp_path, monkeypatch, k):
    """Every frame each worker receives is recorded; with K >= 1 none holds an embedding row of the prompt or
    of a generated token (K = 0 is the control: the rows are there, so the check can see them)."""
    model_dir, _ = hf_models("wide")
    prompt = [101, 17, 42, 99, 77, 130, 64, 12]
    logs = _record_workers(monkeypatch, tmp_path, (1, 2))
    gen, _ = run_local(3, prompt, 5, model=model_dir, allreduce="ring", private_layers=k)
    table = TensorStore.from_model_dir(model_dir).load("model.embed_tokens.weight")
    ids = prompt + gen.tokens[:-1]
    for r, path in logs.items():
        frames, raw = frames_per_socket(path)
        seen = _embedding_rows_seen(raw, table, ids)
        n_tensor = sum(hdr.dtype == 1 for hdr, _ in frames)  # float32 frames: hidden states, allreduce parts
        if k == 0:
            assert sorted(seen) == sorted(set(ids)), (r, seen)
        else:
            assert seen == [], (r, seen)
        if k == L:  # nothing to run: no step was ever sent
            assert n_tensor == 0
        else:
            assert n_tensor > 0
    assert gen.tokens == single(model_dir, prompt, 5).tokens


def test_cli_private_layers(hf_models, tmp_path):
    model_dir, _ = hf_models("wide")
    env = {**os.environ, "TPI_CACHE_DIR": str(tmp_path / "cache")}
    base = [sys.executable, "-m", "tpicore", "generate", "--model", model_dir, "--prompt-ids", "1,2,3",
            "--max-new-tokens", "3", "--devices", "2", "--json"]
    out = subprocess.run(base + ["--private-layers", "2"], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["tokens"] == single(model_dir, [1, 2, 3], 3).tokens
    bad = subprocess.run(base + ["--private-layers", "4"], capture_output=True, text=True, timeout=120, env=env)
    assert bad.returncode == 2 and bad.stderr.startswith("error: --private-layers"), bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1
    shard = subprocess.run([sys.executable, "-m", "tpicore", "shard", "--model", model_dir, "--devices", "2",
                            "--private-layers", "1", "--out", str(tmp_path / "s"), "--quiet"],
                           capture_output=True, text=True, timeout=120, env=env)
    assert shard.returncode == 0, shard.stderr
    assert read_manifest(str(tmp_path / "s" / "rank-1")).layout.private_layers == 1


def test_privacy_search_attack_inverts_hidden_states_at_any_k(hf_models, tmp_path):
    """What the README claims: a worker with the weights recovers the tokens from x_K by search, for every K;
    and the experiment file is validated (K beyond the model's layers is refused, naming the key)."""
    from emulator.run import privacy

    model_dir, _ = hf_models("wide")
    store = TensorStore.from_model_dir(model_dir)
    weights = {name: np.array(store.load(name)) for name in store.ckpt.tensors}
    table = weights["model.embed_tokens.weight"]
    seq = np.array([[101, 17, 42, 99, 77, 12]])
    xs = privacy.hidden_states(store, weights, seq, (0, 1, L))
    order = np.tile(np.arange(store.cfg.vocab_size), (seq.shape[1], 1))  # every candidate, in id order
    for k in (0, 1, L):
        found = privacy.search(privacy.layer_weights(store, weights), store, table, k, xs[k], order, 131)
        assert found.tolist() == seq[0].tolist(), k
    bad = tmp_path / "privacy.yaml"
    doc = (privacy.DEFAULT_CONFIG.read_text().replace("private_layers: [0, 1, 2, 4, 6, 8]", "private_layers: [0, 9]"))
    bad.write_text(doc)
    with pytest.raises(TpiError, match="private_layers: expected values 0..8"):
        privacy.load_config(bad)
