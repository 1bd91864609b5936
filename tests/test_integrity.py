"""Integrity at load: flipped bytes in every file kind (shard data, safetensors header, manifest, rank 0's
config and tokenizer files, the on-the-fly cache) and edited manifests are refused before use, naming the
file; integer-typed or overlapping tensors and configs with more/fewer layers than stored are refused
naming the file and tensor; a worker that fails at start-up ends the run with its own single line."""

from __future__ import annotations

import json
import os
import shutil
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tpicore import cli
from tpicore.errors import TpiError
from tpicore.tools import shard as S
from tpicore.tools.synth.checkpoint import write_checkpoint
from tpicore.tools.synth.presets import preset_config
from tpicore.weights.checkpoint import read_safetensors_header
from tpicore.weights.manifest import MANIFEST_FILE, SHARD_FILE, refingerprint
from tpicore.weights.store import TensorStore

RANK0_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json")


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> str:
    """The synthetic 'tiny' preset (3 layers, 4 heads, 2 KV heads) with its tokenizer files."""
    return str(write_checkpoint(preset_config("tiny"), tmp_path_factory.mktemp("integrity") / "tiny", progress=False))


@pytest.fixture(scope="module")
def shards(model, tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("integrity-shards") / "out")
    S.shard_checkpoint(model, out, 3, quiet=True)
    return out


@pytest.fixture
def copy(shards, tmp_path) -> str:
    """A fresh copy of the three rank folders, to corrupt."""
    d = str(tmp_path / "out")
    shutil.copytree(shards, d)
    return d


def flip(path: str, offset: int, n: int = 1) -> None:
    """Invert n bytes of a file from `offset` (negative: from the end)."""
    with open(path, "r+b") as f:
        f.seek(offset, os.SEEK_SET if offset >= 0 else os.SEEK_END)
        pos = f.tell()
        b = f.read(n)
        f.seek(pos)
        f.write(bytes(x ^ 0xFF for x in b))


def edit_manifest(rank_dir: str, change, refingerprint_too: bool = False) -> str:
    path = os.path.join(rank_dir, MANIFEST_FILE)
    with open(path) as f:
        man = json.load(f)
    change(man)
    if refingerprint_too:
        man["fingerprint"] = refingerprint(man)
    with open(path, "w") as f:
        json.dump(man, f)
    return path


def refused(rank_dir: str) -> str:
    with pytest.raises(TpiError) as e:
        TensorStore.from_shard_dir(rank_dir)
    return str(e.value)


def test_clean_folders_load_and_fingerprint_is_recomputed(shards):
    fps = set()
    for r in range(3):
        store = TensorStore.from_shard_dir(os.path.join(shards, f"rank-{r}"))
        store.check()
        fps.add(store.fingerprint)
    assert len(fps) == 1


@pytest.mark.parametrize("rank", [0, 1, 2])
def test_flipped_data_bytes_refused_naming_file_and_tensor(copy, rank):
    d = os.path.join(copy, f"rank-{rank}")
    path = os.path.join(d, SHARD_FILE)
    info = max(read_safetensors_header(path).values(), key=lambda i: i.nbytes)
    flip(path, info.offset + info.nbytes // 2, 4)
    msg = refused(d)
    assert path in msg and info.name in msg and "CRC32" in msg


@pytest.mark.parametrize("where", ["length", "json_start", "json_middle", "json_end", "padding"])
def test_flipped_header_bytes_refused(copy, where):
    d = os.path.join(copy, "rank-1")
    path = os.path.join(d, SHARD_FILE)
    with open(path, "rb") as f:
        (hlen,) = struct.unpack("<Q", f.read(8))
    offset = {"length": 3, "json_start": 8, "json_middle": 8 + hlen // 2, "json_end": 8 + hlen - 2,
              "padding": 8 + hlen - 1}[where]
    flip(path, offset)
    assert path in refused(d)


def test_header_rewritten_to_other_bytes_refused(copy):
    """A header still valid but describing other bytes: two same-sized tensors' ranges swapped."""
    d = os.path.join(copy, "rank-2")
    path = os.path.join(d, SHARD_FILE)
    a, b = "model.layers.0.input_layernorm.weight", "model.layers.0.post_attention_layernorm.weight"

    def swap(h):
        h[a]["data_offsets"], h[b]["data_offsets"] = h[b]["data_offsets"], h[a]["data_offsets"]

    rewrite_header(path, swap)
    msg = refused(d)
    assert path in msg and (a in msg or b in msg)


def test_flipped_manifest_bytes_refused(copy):
    for r, offset in ((0, 0), (1, 40), (2, -3)):
        d = os.path.join(copy, f"rank-{r}")
        flip(os.path.join(d, MANIFEST_FILE), offset)
        assert os.path.join(d, MANIFEST_FILE) in refused(d)


@pytest.mark.parametrize("change", [
    lambda m: m["config"].update(rope_theta=20000.0),
    lambda m: m["config"].update(rms_norm_eps=1e-3),
    lambda m: m["config"].update(num_hidden_layers=2) or m["layer_map"].pop(),
    lambda m: m.update(ratios=[2.0, 1.0, 1.0]),
    lambda m: m.update(layer_map=[0, 0, 2]),
    lambda m: m.update(source="0" * 64),
    lambda m: m.update(fingerprint="0" * 64),
    lambda m: m["layout"].update(ffn=[0, 27]),
], ids=["rope_theta", "rms_norm_eps", "layers", "ratios", "layer_map", "source", "fingerprint", "layout"])
def test_edited_manifest_refused_naming_it(copy, change):
    d = os.path.join(copy, "rank-1")
    path = edit_manifest(d, change)
    msg = refused(d)
    assert path in msg or os.path.join(d, SHARD_FILE) in msg, msg


def test_edited_tensor_records_refused(copy):
    d = os.path.join(copy, "rank-1")
    name = "model.layers.0.mlp.up_proj.weight"

    def crc(m):
        m["tensors"][name]["crc32"] ^= 1

    edit_manifest(d, crc)
    msg = refused(d)
    assert name in msg and "CRC32" in msg
    edit_manifest(d, lambda m: m["tensors"].pop(name))
    msg = refused(d)
    assert name in msg and "not in the manifest" in msg


@pytest.mark.parametrize("name", RANK0_FILES)
def test_rank0_config_and_tokenizer_files_checked(copy, name):
    d = os.path.join(copy, "rank-0")
    path = os.path.join(d, name)
    flip(path, os.path.getsize(path) // 2)
    msg = refused(d)
    assert path in msg and "CRC32" in msg
    os.remove(path)
    assert path in refused(d)


def test_every_rank_refuses_when_edited_consistently(copy):
    """rope_theta edited in one rank with a matching fingerprint: that rank loads, the group refuses it."""
    d = os.path.join(copy, "rank-1")
    edit_manifest(d, lambda m: m["config"].update(rope_theta=20000.0), refingerprint_too=True)
    fps = {TensorStore.from_shard_dir(os.path.join(copy, f"rank-{r}")).fingerprint for r in range(3)}
    assert len(fps) == 2  # the handshake compares these: rank 1 is refused by the master


@pytest.mark.parametrize("allreduce", ["star", "ring", "tree"])
def test_corrupt_worker_ends_the_run_with_its_own_line(copy, capsys, allreduce):
    path = os.path.join(copy, "rank-2", SHARD_FILE)
    info = max(read_safetensors_header(path).values(), key=lambda i: i.nbytes)
    flip(path, info.offset + 8, 4)
    rc = cli.main(["generate", "--shards", copy, "--devices", "3", "--prompt-ids", "1,2,3", "--max-new-tokens", "2",
                   "--allreduce", allreduce, "--timeout-s", "120"])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert rc == 2 and len(lines) == 1, err
    assert lines[0].startswith("error: rank 2: ") and path in lines[0] and "CRC32" in lines[0]
    assert "timed out" not in err


@pytest.mark.parametrize("allreduce", ["star", "tree"])
def test_edited_config_in_one_rank_refused_by_the_group(copy, capsys, allreduce):
    edit_manifest(os.path.join(copy, "rank-1"), lambda m: m["config"].update(rope_theta=20000.0),
                  refingerprint_too=True)
    rc = cli.main(["generate", "--shards", copy, "--devices", "3", "--prompt-ids", "1,2,3", "--max-new-tokens", "2",
                   "--allreduce", allreduce, "--timeout-s", "120"])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert rc == 2 and len(lines) == 1, err
    assert lines[0].startswith("error: rank 1: ") and "fingerprint mismatch" in lines[0]


def test_corrupt_cache_deleted_and_rebuilt(model, tmp_path, monkeypatch, capsys):
    m = str(tmp_path / "model")
    shutil.copytree(model, m)
    monkeypatch.setenv("TPI_CACHE_DIR", str(tmp_path / "cache"))
    dirs = S.cached_shards(m, 2, quiet=True)
    good = open(os.path.join(dirs[1], SHARD_FILE), "rb").read()
    for corrupt in (lambda: flip(os.path.join(dirs[1], SHARD_FILE), -50, 4),
                    lambda: flip(os.path.join(dirs[0], "tokenizer.json"), 100),
                    lambda: open(os.path.join(dirs[0], MANIFEST_FILE), "w").write("{")):
        corrupt()
        capsys.readouterr()
        assert S.cached_shards(m, 2, quiet=True) == dirs
        notes = [line for line in capsys.readouterr().err.splitlines() if line]
        assert len(notes) == 1 and "corrupt" in notes[0], notes
        assert open(os.path.join(dirs[1], SHARD_FILE), "rb").read() == good
        for d in dirs:
            S.verify_shard(d)
    assert S.cached_shards(m, 2, quiet=True) == dirs
    assert capsys.readouterr().err == ""


# ---------------------------------------------------------------------------------------------
# Structure: integer dtypes, overlapping byte ranges, layers against the config


def rewrite_header(path: str, change) -> None:
    """Rewrite a safetensors header (same data bytes), via change(header dict)."""
    with open(path, "rb") as f:
        (hlen,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(hlen))
        data = f.read()
    change(header)
    body = json.dumps(header).encode()
    body += b" " * (-len(body) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(body)) + body + data)


def test_integer_dtype_tensor_refused(model, tmp_path):
    m = str(tmp_path / "m")
    shutil.copytree(model, m)
    name = "model.layers.1.mlp.up_proj.weight"
    rewrite_header(os.path.join(m, "model.safetensors"), lambda h: h[name].update(dtype="I32"))
    with pytest.raises(TpiError) as e:
        TensorStore.from_model_dir(m)
    assert name in str(e.value) and "model.safetensors" in str(e.value) and "I32" in str(e.value)


def test_overlapping_byte_ranges_refused(model, tmp_path):
    m = str(tmp_path / "m")
    shutil.copytree(model, m)
    a, b = "model.layers.0.mlp.up_proj.weight", "model.layers.0.mlp.gate_proj.weight"

    def overlap(h):
        h[b]["data_offsets"] = list(h[a]["data_offsets"])

    rewrite_header(os.path.join(m, "model.safetensors"), overlap)
    with pytest.raises(TpiError) as e:
        TensorStore.from_model_dir(m)
    assert "overlaps" in str(e.value) and a in str(e.value) and b in str(e.value)


def test_config_with_fewer_layers_than_stored_refused(model, tmp_path):
    m = str(tmp_path / "m")
    shutil.copytree(model, m)
    cfg = json.load(open(os.path.join(m, "config.json")))
    json.dump(dict(cfg, num_hidden_layers=2), open(os.path.join(m, "config.json"), "w"))
    with pytest.raises(TpiError) as e:
        TensorStore.from_model_dir(m)
    assert "model.layers.2." in str(e.value) and "config.json" in str(e.value)
    json.dump(dict(cfg, num_hidden_layers=4), open(os.path.join(m, "config.json"), "w"))
    store = TensorStore.from_model_dir(m)
    with pytest.raises(TpiError, match="model.layers.3."):
        store.check()
    json.dump(dict(cfg, num_hidden_layers=2), open(os.path.join(m, "config.json"), "w"))
    with pytest.raises(TpiError, match="model.layers.2."):  # tpi shard refuses before writing
        S.shard_checkpoint(m, str(tmp_path / "o"), 2, quiet=True)
    assert not os.path.exists(tmp_path / "o")


def test_model_pointing_at_a_file_refused(model):
    with pytest.raises(TpiError, match="a file, not a model folder"):
        TensorStore.from_model_dir(os.path.join(model, "config.json"))


# ---------------------------------------------------------------------------------------------
# Property: a manifest with random damage is refused with one TpiError (never another exception), or loads
# as an equivalent folder (the same fingerprint)


def mutate(doc, path: list, value):
    node = doc
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value


def leaf_paths(doc, prefix=()):
    if isinstance(doc, dict):
        for k, v in doc.items():
            yield from leaf_paths(v, prefix + (k,))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            yield from leaf_paths(v, prefix + (i,))
    yield prefix


JUNK = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True),
                 st.text(max_size=8), st.lists(st.integers(-3, 3), max_size=3), st.dictionaries(st.text(max_size=3),
                                                                                                 st.integers(), max_size=2))


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_damaged_manifest_never_a_traceback(shards, tmp_path_factory, data):
    src = os.path.join(shards, "rank-1")
    with open(os.path.join(src, MANIFEST_FILE)) as f:
        good = json.load(f)
    paths = [p for p in leaf_paths(good) if p]
    doc = json.loads(json.dumps(good))
    for _ in range(data.draw(st.integers(1, 3))):
        p = data.draw(st.sampled_from(paths))
        try:
            mutate(doc, list(p), data.draw(JUNK))
        except (KeyError, IndexError, TypeError):
            pass
    d = str(tmp_path_factory.mktemp("prop") / "rank-1")
    shutil.copytree(src, d)
    with open(os.path.join(d, MANIFEST_FILE), "w") as f:
        json.dump(doc, f)
    try:
        store = TensorStore.from_shard_dir(d)
    except TpiError as e:
        assert "\n" not in str(e)
        return
    assert store.fingerprint == good["fingerprint"]
