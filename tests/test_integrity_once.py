"""Integrity once per run: the shard cache's check stamps each rank folder, and the loads of the same run
(this process, its local workers: any descendant) trust the stamp instead of reading the bytes again,
while a changed file, a stamp of another process or a later run are checked in full; and a fingerprint
mismatch is one line for the user (the refused rank's), not a warning beside it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
from test_integrity import flip

from tpicore.errors import TpiError
from tpicore.tools import shard as S
from tpicore.tools.synth.checkpoint import write_checkpoint
from tpicore.tools.synth.presets import preset_config
from tpicore.weights import integrity as I
from tpicore.weights.manifest import SHARD_FILE
from tpicore.weights.store import TensorStore

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> str:
    return str(write_checkpoint(preset_config("tiny"), tmp_path_factory.mktemp("once") / "tiny", progress=False))


@pytest.fixture
def counted(monkeypatch) -> list[int]:
    """Bytes read by the CRC check, per call (a list that the test can reset)."""
    calls: list[int] = []
    real = I.check_crcs

    def counting(infos):
        n = real(infos)
        calls.append(n)
        return n

    monkeypatch.setattr(I, "check_crcs", counting)
    monkeypatch.setattr(I, "RACY_S", 0.0)  # the test's files are seconds old
    return calls


def test_cache_is_checked_once_per_run(model, tmp_path, monkeypatch, counted):
    m = str(tmp_path / "model")
    shutil.copytree(model, m)
    monkeypatch.setenv("TPI_CACHE_DIR", str(tmp_path / "cache"))
    dirs = S.cached_shards(m, 3, quiet=True)  # written now: nothing checked, nothing stamped
    assert not any(os.path.exists(os.path.join(d, I.STAMP_FILE)) for d in dirs)
    counted.clear()
    assert S.cached_shards(m, 3, quiet=True) == dirs  # reused: every byte checked, each folder stamped
    total = sum(os.path.getsize(os.path.join(d, SHARD_FILE)) for d in dirs)
    assert 0.9 * total < sum(counted) <= total
    assert all(os.path.exists(os.path.join(d, I.STAMP_FILE)) for d in dirs)

    counted.clear()
    for d in dirs:  # the master's own load in the same run: trusted
        TensorStore.from_shard_dir(d)
    assert counted == []

    code = ("import sys; from tpicore.weights import integrity as I; from tpicore.weights.store import TensorStore\n"
            "def no(infos): sys.exit(3)\n"
            "I.check_crcs = no\n"
            f"TensorStore.from_shard_dir({dirs[2]!r})\n")
    child = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert child.returncode == 0, child.stderr  # a local worker (a descendant) trusts the stamp too

    stamp = os.path.join(dirs[1], I.STAMP_FILE)
    doc = json.load(open(stamp))
    json.dump({**doc, "by": "another-boot:1:1"}, open(stamp, "w"))  # not this run's: checked in full
    TensorStore.from_shard_dir(dirs[1])
    assert counted and counted[-1] > 0

    counted.clear()
    assert S.cached_shards(m, 3, quiet=True) == dirs  # restamped by this process
    path = os.path.join(dirs[2], SHARD_FILE)
    flip(path, -64, 4)  # changed after the stamp: its stat differs, so the load reads it and names the tensor
    with pytest.raises(TpiError, match=r"tensor '.*': CRC32 mismatch") as e:
        TensorStore.from_shard_dir(dirs[2])
    assert path in str(e.value)


def test_no_stamp_for_files_changed_in_the_same_clock_tick(model, tmp_path, monkeypatch):
    """The racy rule: files whose ctime is within RACY_S of the check are checked but never stamped."""
    out = str(tmp_path / "s")
    S.shard_checkpoint(model, out, 2, quiet=True)
    monkeypatch.setattr(I, "RACY_S", 3600.0)
    S.verify_shard(os.path.join(out, "rank-1"), stamp=True)
    assert not os.path.exists(os.path.join(out, "rank-1", I.STAMP_FILE))
    monkeypatch.setattr(I, "RACY_S", 0.0)
    S.verify_shard(os.path.join(out, "rank-1"), stamp=True)
    assert os.path.exists(os.path.join(out, "rank-1", I.STAMP_FILE))


def test_lineage_names_this_process_and_its_parent():
    keys = I.lineage()
    assert len(keys) >= 2 and keys[0].split(":")[1] == str(os.getpid()) and keys[1].split(":")[1] == str(os.getppid())


def test_fingerprint_mismatch_is_one_line(model, tmp_path):
    """Two ranks of different models: the user sees the refused rank's error line, and nothing else."""
    other = str(write_checkpoint(preset_config("tiny"), tmp_path / "other", seed=1, progress=False))
    S.shard_checkpoint(model, str(tmp_path / "a"), 2, quiet=True)
    S.shard_checkpoint(other, str(tmp_path / "b"), 2, quiet=True)
    mix = tmp_path / "mix"
    mix.mkdir()
    shutil.copytree(tmp_path / "a" / "rank-0", mix / "rank-0")
    shutil.copytree(tmp_path / "b" / "rank-1", mix / "rank-1")
    proc = subprocess.run([sys.executable, "-m", "tpicore", "generate", "--shards", str(mix), "--devices", "2",
                           "--prompt-ids", "1,2", "--max-new-tokens", "2", "--timeout-s", "60"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: rank 1: ") and "model fingerprint mismatch" in lines[0]
