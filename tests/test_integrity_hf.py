"""Integrity of plain HF folders: the checksums `write_checksums` adds (every tensor's CRC32) are checked whenever the folder is read (a one-device run, `tpi shard`), the index's
total_size always, and a hub cache blob's SHA-256 against its name; a folder with nothing to check
against loads as before."""

from __future__ import annotations

import hashlib
import json
import os
import shutil

import pytest
from test_integrity import flip

from tpicore.errors import TpiError
from tpicore.tools import shard as S
from tpicore.tools.synth.checkpoint import write_checkpoint
from tpicore.tools.synth.presets import preset_config
from tpicore.weights import integrity as I
from tpicore.weights.checkpoint import read_safetensors_header
from tpicore.weights.store import TensorStore


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> str:
    m = str(write_checkpoint(preset_config("tiny"), tmp_path_factory.mktemp("hf") / "tiny", progress=False))
    I.write_checksums(m)
    return m


@pytest.fixture
def copy(model, tmp_path) -> str:
    d = str(tmp_path / "m")
    shutil.copytree(model, d)
    return d


def test_checksums_written_and_a_clean_folder_loads(model):
    doc = json.load(open(os.path.join(model, I.CHECKSUMS_FILE)))
    assert doc["format"] == I.CHECKSUMS_FORMAT and "model.norm.weight" in doc["tensors"]
    TensorStore.from_model_dir(model)


def test_flipped_weight_bytes_refused_naming_file_and_tensor(copy, tmp_path):
    path = os.path.join(copy, "model.safetensors")
    info = max(read_safetensors_header(path).values(), key=lambda i: i.nbytes)
    flip(path, info.offset + 16, 4)
    with pytest.raises(TpiError, match="CRC32 mismatch") as e:
        TensorStore.from_model_dir(copy)
    assert path in str(e.value) and repr(info.name) in str(e.value)
    with pytest.raises(TpiError, match="CRC32 mismatch"):  # the source of a shard run: refused before writing
        S.shard_checkpoint(copy, str(tmp_path / "out"), 2, quiet=True)
    assert not os.path.exists(tmp_path / "out")


def test_tensor_missing_from_the_checksums_refused(copy):
    path = os.path.join(copy, I.CHECKSUMS_FILE)
    doc = json.load(open(path))
    doc["tensors"].pop("model.norm.weight")
    json.dump(doc, open(path, "w"))
    with pytest.raises(TpiError, match="'model.norm.weight' is in the weights but not listed"):
        TensorStore.from_model_dir(copy)


def test_malformed_checksums_file_is_one_error(copy):
    open(os.path.join(copy, I.CHECKSUMS_FILE), "w").write('{"format": "x"}')
    with pytest.raises(TpiError, match="checksums.json: expected"):
        TensorStore.from_model_dir(copy)


def test_without_checksums_the_bytes_are_not_checked(copy):
    """Documented: a plain download with no checksums and no hub blob names loads once its headers parse."""
    os.unlink(os.path.join(copy, I.CHECKSUMS_FILE))
    path = os.path.join(copy, "model.safetensors")
    info = max(read_safetensors_header(path).values(), key=lambda i: i.nbytes)
    flip(path, info.offset + 16, 4)
    TensorStore.from_model_dir(copy)


def test_index_total_size_checked(tmp_path):
    m = str(write_checkpoint(preset_config("tiny"), tmp_path / "multi", num_shards=2, progress=False))
    index = os.path.join(m, "model.safetensors.index.json")
    doc = json.load(open(index))
    doc["metadata"]["total_size"] += 4
    json.dump(doc, open(index, "w"))
    with pytest.raises(TpiError, match="metadata.total_size") as e:
        TensorStore.from_model_dir(m)
    assert index in str(e.value)


def test_hub_blob_sha256_checked(model, tmp_path):
    """A hub cache snapshot (files are symlinks to blobs/<sha256>): the content must hash to the name."""
    blobs, snap = tmp_path / "hub" / "blobs", tmp_path / "hub" / "snapshots" / "rev"
    blobs.mkdir(parents=True)
    snap.mkdir(parents=True)
    for name in os.listdir(model):
        if name == I.CHECKSUMS_FILE:
            continue
        data = open(os.path.join(model, name), "rb").read()
        blob = blobs / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        os.symlink(blob, snap / name)
    assert I.verify_checkpoint(str(snap), TensorStore.from_model_dir(str(snap)).ckpt) > 0
    target = os.path.realpath(snap / "model.safetensors")
    info = max(read_safetensors_header(target).values(), key=lambda i: i.nbytes)
    flip(target, info.offset + 16, 4)
    with pytest.raises(TpiError, match="SHA-256 .* does not match its hub blob name"):
        TensorStore.from_model_dir(str(snap))
