"""`tpi shard`: per-rank folders hold exactly their slices (byte-equal to the source), valid manifests
and safetensors files, master-only tensors and tokenizer files on rank 0 only, CRC verification,
atomic output with refusal/--force, the on-the-fly cache, and peak RSS near one chunk."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from tpicore import cli
from tpicore.errors import TpiError
from tpicore.model import llama as M
from tpicore.model.config import ModelConfig
from tpicore.model.split import split_layouts
from tpicore.model.tensors import ATTN_LEAVES, FFN_LEAVES, MASTER_ONLY, shard_slice
from tpicore.tools import shard as S
from tpicore.weights.checkpoint import Checkpoint
from tpicore.weights.store import TensorStore

DUMMY_MASTER_FILES = {"tokenizer.json": '{"version": "1.0"}\n', "tokenizer_config.json": '{"bos_token": "<s>"}\n',
                      "chat_template.jinja": "{{ messages }}\n", "special_tokens_map.json": "{}\n"}


def take(arr: np.ndarray, how) -> np.ndarray:
    if how.whole:
        return arr
    return arr[(slice(None),) * how.axis + (slice(how.start, how.stop),)]


@pytest.fixture(scope="module")
def source(hf_models, tmp_path_factory) -> str:
    """The 'bias' tiny model (4 heads, 2 KV heads, biases everywhere) plus dummy tokenizer files."""
    src, _ = hf_models("bias")
    d = str(tmp_path_factory.mktemp("shard-src") / "model")
    shutil.copytree(src, d)
    for name, text in DUMMY_MASTER_FILES.items():
        with open(os.path.join(d, name), "w") as f:
            f.write(text)
    return d


@pytest.fixture(scope="module")
def sharded(source, tmp_path_factory) -> list[str]:
    """N=3, ratios 2,1,1, with tiny chunks and flushes so row-chunking and cache dropping are exercised."""
    out = str(tmp_path_factory.mktemp("shard-out") / "out")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(S, "CHUNK_BYTES", 1000)  # a 48-float row is 192 bytes: 5 rows per read
        mp.setattr(S, "FLUSH_BYTES", 4096)
        return S.shard_checkpoint(source, out, 3, [2, 1, 1], quiet=True)


def test_manifests_valid(source, sharded):
    cfg = ModelConfig.from_dir(source)
    layouts = split_layouts(cfg, 3, [2.0, 1.0, 1.0])
    with open(os.path.join(source, "config.json")) as f:
        config = json.load(f)
    with open(os.path.join(source, "generation_config.json")) as f:
        generation = json.load(f)
    mans = [S.read_manifest(d) for d in sharded]
    assert [os.path.basename(d) for d in sharded] == ["rank-0", "rank-1", "rank-2"]
    assert len({m.fingerprint for m in mans}) == 1
    for r, m in enumerate(mans):
        assert (m.format, m.rank, m.world_size, m.ratios) == ("tpicore-shard/1", r, 3, [2.0, 1.0, 1.0])
        assert m.layout.to_json() == layouts[r].to_json()
        assert m.config == config and m.generation_config == generation
        assert m.layer_map == list(range(cfg.num_hidden_layers))
        assert m.files == ["shard.safetensors"]
        assert os.path.basename(sharded[r]) == f"rank-{r}"
        # the engine's own shape check for this rank's layout passes
        store = TensorStore.from_shard_dir(sharded[r])
        store.check()
        assert store.layout == layouts[r] and store.fingerprint == m.fingerprint


def test_slices_byte_equal_to_source(source, sharded):
    from safetensors.numpy import load_file

    cfg = ModelConfig.from_dir(source)
    src = Checkpoint.from_dir(source)
    for d in sharded:
        man = S.read_manifest(d)
        lay = split_layouts(cfg, 3, [2.0, 1.0, 1.0])[man.rank]
        expected = {name for name in src.tensors if shard_slice(name, lay, cfg) is not None}
        assert set(man.tensors) == expected
        got = Checkpoint([os.path.join(d, "shard.safetensors")], d)
        reference = load_file(os.path.join(d, "shard.safetensors"))  # the safetensors library accepts the file
        assert set(reference) == expected
        for name, t in man.tensors.items():
            want = np.ascontiguousarray(take(src.raw(name), shard_slice(name, lay, cfg)))
            info = got.info(name)
            assert (list(info.shape), info.dtype, info.offset, info.nbytes) == (list(t.shape), t.dtype, t.offset,
                                                                                t.nbytes)
            assert info.offset % info.itemsize == 0, name  # aligned for zero-copy views
            assert got.raw(name).tobytes() == want.tobytes(), name
            assert reference[name].tobytes() == want.tobytes(), name


def test_master_only_on_rank0(sharded):
    names = [set(S.read_manifest(d).tensors) for d in sharded]
    for name in MASTER_ONLY:
        assert name in names[0]
        assert all(name not in n for n in names[1:])
    for n in names[1:]:
        assert all(name.startswith("model.layers.") for name in n)


def test_master_files_on_rank0_only(source, sharded):
    for name in ("config.json", "generation_config.json", *DUMMY_MASTER_FILES):
        with open(os.path.join(source, name), "rb") as a, open(os.path.join(sharded[0], name), "rb") as b:
            assert a.read() == b.read(), name
    for d in sharded[1:]:
        assert sorted(os.listdir(d)) == ["manifest.json", "shard.safetensors"]


def test_shard_partials_sum_to_unsharded(source, sharded):
    """The folders as the engine loads them: summed partial outputs equal the full layer's output."""
    cfg = ModelConfig.from_dir(source)
    full = TensorStore.from_model_dir(source)
    stores = [TensorStore.from_shard_dir(d) for d in sharded]
    x = np.random.default_rng(0).standard_normal((4, cfg.hidden_size)).astype(np.float32)
    for layer in range(cfg.num_hidden_layers):
        w_full = {leaf: full.load(name) for leaf, name in full.leaves(("attn", layer)).items()}
        w_full.update({leaf: full.load(name) for leaf, name in full.leaves(("ffn", layer)).items()})
        ref_a = M.attention(x, w_full, cfg, M.KVCache(cfg.num_key_value_heads, 4, cfg.head_dim), 0)
        ref_m = M.mlp(x, w_full)
        got_a = got_m = 0
        for s in stores:
            w = {leaf: s.load(name) for leaf, name in s.leaves(("attn", layer)).items()}
            w.update({leaf: s.load(name) for leaf, name in s.leaves(("ffn", layer)).items()})
            assert set(w) <= set(ATTN_LEAVES + FFN_LEAVES)
            got_a = got_a + M.attention(x, w, cfg, M.KVCache(s.layout.n_kv_heads, 4, cfg.head_dim), 0)
            got_m = got_m + M.mlp(x, w)
        np.testing.assert_allclose(got_a, ref_a, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(got_m, ref_m, rtol=1e-5, atol=1e-5)


def test_verify_passes_and_detects_a_flipped_byte(sharded, tmp_path):
    for d in sharded:
        assert S.verify_shard(d) > 0
    bad = str(tmp_path / "rank-1")
    shutil.copytree(sharded[1], bad)
    man = S.read_manifest(bad)
    name = "model.layers.1.mlp.down_proj.weight"
    t = man.tensors[name]
    path = os.path.join(bad, "shard.safetensors")
    with open(path, "r+b") as f:
        f.seek(t.offset + t.nbytes // 2)
        b = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([b[0] ^ 0x10]))
    with pytest.raises(TpiError) as e:
        S.verify_shard(bad)
    assert name in str(e.value) and path in str(e.value) and "CRC32" in str(e.value)


def test_read_manifest_errors_name_file_and_field(sharded, tmp_path):
    d = str(tmp_path / "rank-1")
    shutil.copytree(sharded[1], d)
    path = os.path.join(d, "manifest.json")
    with open(path) as f:
        good = json.load(f)

    def check(man: dict, expected: str) -> None:
        with open(path, "w") as f:
            json.dump(man, f)
        with pytest.raises(TpiError) as e:
            S.read_manifest(d)
        assert str(e.value) == f"{path}: {expected}"

    check({k: v for k, v in good.items() if k != "layout"}, "missing field 'layout'")
    check({**good, "rank": "1"}, 'field \'rank\': expected an integer, got "1"')
    check({**good, "rank": 3}, "field 'rank': expected 0..2, got 3")
    check({**good, "files": ["../x.safetensors"]}, "field 'files': expected plain file names in the shard folder, "
                                                   "got ['../x.safetensors']")
    assert S.read_manifest(sharded[1]).format == "tpicore-shard/1"
    with open(path, "w") as f:
        json.dump({**good, "format": "tpicore-shard/0"}, f)
    with pytest.raises(TpiError, match="field 'format': expected 'tpicore-shard/1'"):
        S.read_manifest(d)
    some = next(iter(good["tensors"]))
    check({**good, "tensors": {some: {**good["tensors"][some], "crc32": None}}},
          f"tensors[{some!r}]: field 'crc32': expected an integer, got None")


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    rc = cli.main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def test_cli_refusals_and_force(source, tmp_path, capsys):
    out = str(tmp_path / "out")
    base = ["shard", "--model", source, "--out", out, "--quiet"]
    # a split that cannot work: one line, exit 2, nothing left behind
    rc, _, err = run_cli(base + ["--devices", "5"], capsys)
    assert rc == 2 and err.count("\n") == 1 and err.startswith("error: --devices: 5 devices cannot split 4")
    assert os.listdir(tmp_path) == []
    rc, stdout, _ = run_cli(base + ["--devices", "2"], capsys)
    assert rc == 0 and stdout.split() == [f"{out}/rank-0", f"{out}/rank-1"]
    fp2 = S.read_manifest(f"{out}/rank-0").fingerprint
    # non-empty OUT is refused without --force...
    rc, _, err = run_cli(base + ["--devices", "3"], capsys)
    assert rc == 2 and "already exists and is not empty (use --force" in err and err.count("\n") == 1
    # ...and replaced with it (no rank-2 left over from a bigger split, no temp folders)
    rc, _, _ = run_cli(base + ["--devices", "4", "--force"], capsys)
    assert rc == 0 and sorted(os.listdir(out)) == ["rank-0", "rank-1", "rank-2", "rank-3"]
    rc, _, _ = run_cli(base + ["--devices", "3", "--force", "--ratios", "2,1,1", "--verify"], capsys)
    assert rc == 0 and sorted(os.listdir(out)) == ["rank-0", "rank-1", "rank-2"]
    assert os.listdir(tmp_path) == ["out"]
    assert S.read_manifest(f"{out}/rank-0").fingerprint != fp2
    # --force never deletes a folder that is not shard output
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    rc, _, err = run_cli(["shard", "--model", source, "--out", str(foreign), "--devices", "2", "--force"], capsys)
    assert rc == 2 and "refusing to replace it even with --force" in err
    assert (foreign / "notes.txt").read_text() == "keep me"
    # an empty OUT is fine
    empty = tmp_path / "empty"
    empty.mkdir()
    assert S.shard_checkpoint(source, str(empty), 1, quiet=True) == [f"{empty}/rank-0"]


def test_next_run_sweeps_what_a_killed_run_left(source, tmp_path):
    """A killed run leaves OUT.tmp-<pid> (and maybe OUT.old-<pid>); the next run writing OUT removes those
    of processes that are gone, and leaves a live process's folder alone."""
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    dead_pid = int(dead.stdout)
    out = tmp_path / "out"
    for name in (f"out.tmp-{dead_pid}", f"out.old-{dead_pid}", f"out.tmp-{os.getppid()}"):
        (tmp_path / name / "rank-0").mkdir(parents=True)
    S.shard_checkpoint(source, str(out), 2, quiet=True)
    assert sorted(os.listdir(tmp_path)) == ["out", f"out.tmp-{os.getppid()}"]


def test_failure_removes_temp_folder(source, tmp_path, monkeypatch):
    def boom(job, writers, progress):
        writers[0].write(job.items[0].info.name, np.zeros(1, np.float32))
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(S, "stream_tensors", boom)
    with pytest.raises(TpiError, match="cannot write shards: No space left on device"):
        S.shard_checkpoint(source, str(tmp_path / "out"), 2, quiet=True)
    assert os.listdir(tmp_path) == []


def test_refuses_up_front_without_disk_space(source, tmp_path, monkeypatch):
    monkeypatch.setattr(S.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(TpiError, match=r"the shards need 0\.00 GB, only 0\.00 GB free there"):
        S.shard_checkpoint(source, str(tmp_path / "out"), 2, quiet=True)
    assert os.listdir(tmp_path) == []


def test_bf16_multi_file_source_kept_bf16(hf_models, tmp_path):
    src_dir, _ = hf_models("gqa", "bfloat16", sharded=True)  # 9 source files + index
    src = Checkpoint.from_dir(src_dir)
    cfg = ModelConfig.from_dir(src_dir)
    dirs = S.shard_checkpoint(src_dir, str(tmp_path / "out"), 2, quiet=True)
    for d in dirs:
        man = S.read_manifest(d)
        lay = split_layouts(cfg, 2)[man.rank]
        got = Checkpoint([os.path.join(d, "shard.safetensors")], d)
        assert {t.dtype for t in man.tensors.values()} == {"BF16"}
        for name in man.tensors:
            want = np.ascontiguousarray(take(src.raw(name), shard_slice(name, lay, cfg)))
            assert got.raw(name).tobytes() == want.tobytes(), name
        S.verify_shard(d)


def test_tied_model_has_no_head(hf_models, tmp_path):
    src_dir, _ = hf_models("tied")
    dirs = S.shard_checkpoint(src_dir, str(tmp_path / "out"), 2, quiet=True)
    names = [set(S.read_manifest(d).tensors) for d in dirs]
    assert "lm_head.weight" not in names[0] | names[1]
    assert "model.embed_tokens.weight" in names[0] and "model.embed_tokens.weight" not in names[1]
    TensorStore.from_shard_dir(dirs[0]).check()


def test_fingerprint_identifies_model_and_split(hf_models, source, sharded, tmp_path):
    fp = S.read_manifest(sharded[0]).fingerprint
    assert S.model_fingerprint(source, 3, [2, 1, 1]) == fp  # computable from the model without sharding
    assert S.model_fingerprint(source, 3, [4, 2, 2]) == fp  # same layouts: interchangeable shards
    assert S.model_fingerprint(source, 3) != fp  # other layouts
    assert S.model_fingerprint(source, 2, [2, 1]) != fp
    # same architecture, other weights (a different fine-tune): different fingerprint
    other = str(tmp_path / "other")
    from conftest import build_hf_model

    build_hf_model(other, "bias", seed=1)
    for name in DUMMY_MASTER_FILES:
        shutil.copy(os.path.join(source, name), other)
    assert S.model_fingerprint(other, 3, [2, 1, 1]) != fp


def test_cached_shards_reused_and_refreshed(source, tmp_path, monkeypatch):
    model = str(tmp_path / "model")
    shutil.copytree(source, model)
    monkeypatch.setenv("TPI_CACHE_DIR", str(tmp_path / "cache"))
    first = S.cached_shards(model, 2, [1, 1], quiet=True)
    assert all(d.startswith(str(tmp_path / "cache" / "shards")) for d in first)
    assert [S.read_manifest(d).rank for d in first] == [0, 1]

    def no_sharding(*a, **k):
        raise AssertionError("should have reused the cache")

    with monkeypatch.context() as mp:
        mp.setattr(S, "shard_checkpoint", no_sharding)
        assert S.cached_shards(model, 2, None, quiet=True) == first
    # another split gets its own folder; an edited checkpoint replaces its stale folder
    three = S.cached_shards(model, 3, None, quiet=True)
    assert os.path.dirname(three[0]) != os.path.dirname(first[0])
    st = os.stat(os.path.join(model, "config.json"))
    os.utime(os.path.join(model, "config.json"), ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    again = S.cached_shards(model, 2, None, quiet=True)
    assert os.path.dirname(again[0]) != os.path.dirname(first[0])
    assert not os.path.exists(os.path.dirname(first[0]))
    assert os.path.exists(os.path.dirname(three[0]))
    cache = tmp_path / "cache" / "shards"
    assert sorted(e.name for e in cache.iterdir() if e.is_dir()) == sorted(
        os.path.basename(os.path.dirname(d[0])) for d in (three, again))


# ---------------------------------------------------------------------------------------------
# Peak memory: the shard tool holds about one chunk, never the model


def write_big_checkpoint(d: str, hidden: int = 512, ffn: int = 1536, layers: int = 20, vocab: int = 1000) -> tuple[int, int]:
    """An fp32 Llama checkpoint written tensor by tensor (this process never holds it either).
    Returns (total bytes, largest tensor bytes)."""
    os.makedirs(d)
    config = dict(model_type="llama", hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                  num_attention_heads=8, num_key_value_heads=4, vocab_size=vocab, max_position_embeddings=256,
                  rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False)
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(config, f)
    kv = hidden // 2
    shapes = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,),
              "lm_head.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({p + "input_layernorm.weight": (hidden,), p + "post_attention_layernorm.weight": (hidden,),
                       p + "self_attn.q_proj.weight": (hidden, hidden), p + "self_attn.k_proj.weight": (kv, hidden),
                       p + "self_attn.v_proj.weight": (kv, hidden), p + "self_attn.o_proj.weight": (hidden, hidden),
                       p + "mlp.gate_proj.weight": (ffn, hidden), p + "mlp.up_proj.weight": (ffn, hidden),
                       p + "mlp.down_proj.weight": (hidden, ffn)})
    header, pos = {}, 0
    for name, shape in shapes.items():
        n = int(np.prod(shape)) * 4
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [pos, pos + n]}
        pos += n
    body = json.dumps(header).encode()
    body += b" " * (-len(body) % 8)
    with open(os.path.join(d, "model.safetensors"), "wb") as f:
        f.write(struct.pack("<Q", len(body)) + body)
        for i, shape in enumerate(shapes.values()):
            f.write(np.full(shape, i * 1e-3, dtype=np.float32).tobytes())
    return pos, max(int(np.prod(s)) * 4 for s in shapes.values())


def peak_rss_script(body: str) -> str:
    """A Python program that prints its peak RSS (KiB) before and after `body` as JSON.

    It reads VmHWM from /proc rather than ru_maxrss: the kernel carries ru_maxrss across fork + exec,
    so a child of this pytest process (torch loaded, hundreds of MB) would start with the parent's peak
    and the increase would read as 0. VmHWM belongs to the exec'd image alone.
    """
    return textwrap.dedent("""
        import json, resource

        def hwm_kib():
            with open("/proc/self/status") as f:
                return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))

        from tpicore.tools.shard import shard_checkpoint
        before, ru_before = hwm_kib(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    """) + textwrap.dedent(body) + textwrap.dedent("""
        after, ru_after = hwm_kib(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(json.dumps({"before_kib": before, "after_kib": after, "ru_before_kib": ru_before, "ru_after_kib": ru_after}))
    """)


def test_peak_rss_stays_near_one_chunk(tmp_path):
    model, out = str(tmp_path / "big"), str(tmp_path / "out")
    total, largest = write_big_checkpoint(model)
    script = peak_rss_script(f"shard_checkpoint({model!r}, {out!r}, 3, quiet=True)")
    try:
        res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                             cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        assert res.returncode == 0, res.stderr
        rss = json.loads(res.stdout.splitlines()[-1])
        delta = (rss["after_kib"] - rss["before_kib"]) * 1024
        limit = largest + 60e6
        print(f"\nshard peak RSS: model {total / 1e6:.0f} MB, largest tensor {largest / 1e6:.1f} MB; "
              f"interpreter+imports {rss['before_kib'] / 1024:.1f} MiB, peak {rss['after_kib'] / 1024:.1f} MiB, "
              f"increase {delta / 1e6:.1f} MB (limit {limit / 1e6:.1f} MB); "
              f"ru_maxrss {rss['ru_before_kib'] / 1024:.1f} -> {rss['ru_after_kib'] / 1024:.1f} MiB (inherits the parent's peak)")
        assert total > 4 * limit  # the model could not fit under the limit: the test can tell
        assert delta < limit
    finally:
        shutil.rmtree(model, ignore_errors=True)
        shutil.rmtree(out, ignore_errors=True)
