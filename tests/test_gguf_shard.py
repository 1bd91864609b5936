"""GGUF models over N devices: quantized slices in shard folders, parity with the single-process GGUF run.

Rows split (q/k/v, gate/up) keep ggml blocks whole; a column split (o_proj, down_proj) cut on block
boundaries keeps them too, else that slice is stored dequantized (f32, exact). Either way the shards hold
exactly the weights the GGUF file holds, so N devices give the single-process run's greedy tokens and its
logits to float32 summation order (<= 1e-4).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tpicore.dist.session import run_local
from tpicore.model.config import ModelConfig
from tpicore.model.tensors import shard_slice
from tpicore.runtime.device import Device, ResidentSource
from tpicore.runtime.generate import generate
from tpicore.tokenizer import Tokenizer
from tpicore.tools.gguf_synth import write_gguf
from tpicore.tools.shard import prepare_job, shard_checkpoint, verify_shard
from tpicore.tools.synth import presets
from tpicore.tools.synth.checkpoint import write_checkpoint
from tpicore.weights.gguf import GGUFCheckpoint, gguf_tokenizer, hf_config_dict
from tpicore.weights.manifest import read_manifest
from tpicore.weights.store import TensorStore

# head_dim 64, ffn 512: with 3 devices at 3,2,1 the o_proj cuts (128-row heads) fall inside 256-element
# K-quant blocks but on 32-element blocks, and the FFN cuts (256, 170) inside some blocks of every type
BASE = dict(hidden=256, layers=2, heads=4, kv_heads=2, ffn=512, vocab=160, max_pos=256)
PROMPT = [1, 17, 42, 99, 5, 130, 64, 23, 8]
NEW = 10


@pytest.fixture(autouse=True)
def shard_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("TPI_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "tpi-cache"))


@pytest.fixture(scope="module")
def gguf(tmp_path_factory):
    hf: dict[str, Path] = {}
    files: dict[tuple, str] = {}

    def get(dtype: str, variant: str = "gqa") -> str:
        if variant not in hf:
            extra = dict(tie=True) if variant == "tied" else {}
            hf[variant] = write_checkpoint(presets.llama_config(**BASE, **extra),
                                           tmp_path_factory.mktemp(f"hf-{variant}") / "model")
        if (dtype, variant) not in files:
            out = tmp_path_factory.mktemp(f"gguf-{dtype}") / "model.gguf"
            files[(dtype, variant)] = str(write_gguf(hf[variant], out, dtype)[0])
        return files[(dtype, variant)]

    return get


def single(path: str, window: int | None = None):
    store = TensorStore.from_model_dir(path)
    dev = Device(store, ResidentSource(store), len(PROMPT) + NEW)
    try:
        return generate(dev.step, PROMPT, NEW, max_seq=len(PROMPT) + NEW, keep_logits=True)
    finally:
        dev.close()


@pytest.mark.parametrize("dtype,ratios,window,variant", [
    ("q8_0", "3,2,1", None, "gqa"), ("q4_k", "3,2,1", 2, "gqa"), ("q6_k", None, None, "tied"),
    ("q4_0", "1,2,1", 2, "gqa"), ("bf16", "3,2,1", None, "gqa"), ("q5_k", "2,1", None, "gqa"),
])
def test_devices_match_the_single_process_gguf_run(gguf, dtype, ratios, window, variant):
    path = gguf(dtype, variant)
    base = single(path)
    n = len(ratios.split(",")) if ratios else 3
    gen, _ = run_local(n, PROMPT, NEW, model=path, ratios=ratios, window=window, keep_logits=True)
    assert gen.tokens == base.tokens
    assert np.abs(np.stack(gen.logits) - np.stack(base.logits)).max() <= 1e-4


def test_shards_keep_blocks_whole_and_dequantize_only_cuts_inside_a_block(gguf, tmp_path, capsys):
    path = gguf("q4_k")
    dirs = shard_checkpoint(path, str(tmp_path / "sh"), 3, [3, 2, 1])
    assert "stored dequantized (f32, exact)" in capsys.readouterr().err
    src = GGUFCheckpoint(path)
    held = {}
    for d in dirs:
        verify_shard(d)  # file headers agree with the manifest, CRCs match
        man = read_manifest(d)
        store = TensorStore.from_shard_dir(d)
        store.check()
        for name, t in man.tensors.items():
            info = store.ckpt.info(name)
            assert (info.dtype, info.shape, info.nbytes) == (t.dtype, t.shape, t.nbytes)
            held.setdefault(name, []).append((man.layout, t.dtype, store.ckpt.get(name)))
    for name, pieces in held.items():
        full = src.get(name)  # the GGUF's weights, dequantized, in HF row order
        for layout, dt, w in pieces:
            part = shard_slice(name, layout, src.cfg)
            assert np.array_equal(w, part.of(full)), (name, layout.rank)
            assert dt == ("F32" if len(full.shape) == 1 else "Q4_K") or part.axis == 1 and dt == "F32", (name, dt)
    assert any(dt == "F32" for p in held.values() for _, dt, _ in p)  # some cut fell inside a block
    # 2 equal shares cut o_proj at 128 and the FFN at 256: on Q8_0's 32-element blocks, so nothing is widened
    job = prepare_job(gguf("q8_0"), 2)
    assert not [p for it in job.items for p in it.pieces if p.dequantized]
    job.ckpt.close()


def test_rank0_carries_config_and_tokenizer_of_the_gguf(gguf, tmp_path):
    path = gguf("q8_0")
    d0 = shard_checkpoint(path, str(tmp_path / "sh"), 2, quiet=True)[0]
    cfg = GGUFCheckpoint(path).cfg
    assert ModelConfig.from_dir(d0) == cfg == ModelConfig.from_dict(hf_config_dict(cfg))
    ours, theirs = Tokenizer.from_dir(d0), gguf_tokenizer(path)
    for text in ("Hello world", "héllo wörld 你好", "a  b\n\nc"):
        assert ours.encode(text) == theirs.encode(text)
    assert ours.chat_template == theirs.chat_template
    assert ours.special_tokens == theirs.special_tokens


def test_cli_shard_and_generate_devices_from_a_gguf(gguf, tmp_path):
    path = gguf("q4_k")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
           "TPI_CACHE_DIR": str(tmp_path / "cache")}

    def tpi(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "tpicore", *args], capture_output=True, text=True,
                              timeout=300, env=env)

    r = tpi("shard", "--model", path, "--devices", "2", "--out", str(tmp_path / "sh"))
    assert r.returncode == 0, r.stderr
    one = tpi("generate", "--model", path, "--prompt", "Hello world", "--max-new-tokens", "5", "--json")
    two = tpi("generate", "--shards", str(tmp_path / "sh"), "--devices", "2", "--prompt", "Hello world",
              "--max-new-tokens", "5", "--json")
    three = tpi("generate", "--model", path, "--devices", "3", "--ratios", "3,2,1", "--prompt", "Hello world",
                "--max-new-tokens", "5", "--json")
    for r in (one, two, three):
        assert r.returncode == 0, r.stderr
    assert json.loads(one.stdout)["tokens"] == json.loads(two.stdout)["tokens"] == json.loads(three.stdout)["tokens"]
