"""Real memory limits, the kernel side: per-device cgroups (v2 or v1) under a root the test creates inside its
own cgroup and removes after. Where this kernel lets us create one, the kernel really stops a device over its
cap and the launcher records the stop under both clocks; where it does not, the same tests run on a fake
cgroupfs directory and check what the code writes, reads and removes. Page cache of a device's own files is
dropped so its reads are charged to it."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest

from emulator.config.run_config import load_run_config
from emulator.host.cgroup import DeviceCgroup, cgroup_version, evict_page_cache
from emulator.host.limits import MemoryWatchdog
from emulator.run.launcher import Run
from tpicore.errors import TpiError
from tpicore.runtime.memory import cached_bytes

MiB = 2**20
OOM_BY = ("watchdog", "watchdog (peak)", "cgroup")


def _mounts() -> list[tuple[str, str, set[str]]]:
    out = []
    for line in Path("/proc/self/mounts").read_text().splitlines():
        parts = line.split()
        if len(parts) >= 4:
            out.append((parts[1], parts[2], set(parts[3].split(","))))
    return out


def _own_memory_cgroup() -> Path | None:
    """This process's cgroup directory that has the memory controller for its children (v1 memory
    hierarchy, or v2 with memory in cgroup.subtree_control); None when there is none."""
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        hid, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):  # v1
            for mnt, fstype, opts in _mounts():
                if fstype == "cgroup" and "memory" in opts:
                    return Path(mnt + path)
        if hid == "0" and controllers == "":  # v2
            for mnt, fstype, _ in _mounts():
                d = Path(mnt + path)
                if fstype == "cgroup2" and (d / "cgroup.subtree_control").exists() \
                        and "memory" in (d / "cgroup.subtree_control").read_text().split():
                    return d
    return None


def _fake_root(tmp_path: Path, version: int) -> Path:
    root = tmp_path / f"fake-cgroup-v{version}"
    root.mkdir()
    if version == 2:
        (root / "cgroup.controllers").write_text("cpu memory pids\n")
        (root / "cgroup.subtree_control").write_text("")
    else:
        (root / "memory.limit_in_bytes").write_text("9223372036854771712\n")
    return root


@pytest.fixture
def cgroup_root(tmp_path):
    """(root, real): a fresh root the test owns -- a real cgroup inside this process's own memory cgroup
    where the kernel allows it (removed after, and checked gone), else a fake cgroupfs directory."""
    parent = _own_memory_cgroup()
    root = parent / f"tpi-test-{os.getpid()}-{uuid.uuid4().hex[:8]}" if parent else None
    real = False
    if root is not None:
        try:
            root.mkdir()
            real = cgroup_version(root) in (1, 2) and (
                (root / "memory.limit_in_bytes").exists() or
                "memory" in (root / "cgroup.controllers").read_text().split())
        except (OSError, TpiError):
            real = False
        if not real and root.is_dir():
            root.rmdir()
    if not real:
        root = _fake_root(tmp_path, 2)
    yield root, real
    if real:
        leftovers = [p.name for p in root.iterdir() if p.is_dir()]
        root.rmdir()
        assert leftovers == [] and not root.exists()


# Allocates and touches 16 MiB at a time up to 640 MiB; prints "survived" if nothing stops it.
HOG = textwrap.dedent("""
    import sys, time
    sys.stdin.readline()
    chunks = []
    for _ in range(40):
        chunks.append(bytearray(16 << 20))
        for i in range(0, len(chunks[-1]), 4096):
            chunks[-1][i] = 1
        time.sleep(0.01)
    print("survived", flush=True)
""")


def test_the_kernel_stops_a_device_over_its_cap(cgroup_root):
    root, real = cgroup_root
    cap = 100 * MiB
    proc = subprocess.Popen([sys.executable, "-c", HOG], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        with DeviceCgroup(root, "d0", mem_bytes=cap) as cg:
            group = cg.group
            limit = "memory.max" if cg.v2 else "memory.limit_in_bytes"
            assert int((group / limit).read_text().split()[0]) == cap
            cg.add(proc.pid)
            if real:  # the kernel: killed synchronously at its cap, counted, its peak charge at most the cap
                proc.stdin.write("go\n")
                proc.stdin.flush()
                assert proc.wait(timeout=60) == -9 and "survived" not in proc.stdout.read()
                assert cg.oom_kills() == 1 and 0 < cg.peak_bytes() <= cap
            else:  # a fake cgroupfs: what we wrote, and what we read back from the kernel's files
                assert (group / "cgroup.procs").read_text() == f"{proc.pid}\n"
                assert not (group / ("memory.swap.max" if cg.v2 else "memory.memsw.limit_in_bytes")).exists()
                (group / ("memory.events" if cg.v2 else "memory.oom_control")).write_text("oom 1\noom_kill 1\n")
                (group / ("memory.peak" if cg.v2 else "memory.max_usage_in_bytes")).write_text(f"{cap}\n")
                assert cg.oom_kills() == 1 and cg.peak_bytes() == cap
                for f in ("memory.events", "memory.oom_control", "memory.peak", "memory.max_usage_in_bytes"):
                    (group / f).unlink(missing_ok=True)
        assert not group.exists()
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)
        proc.stdin.close()
        proc.stdout.close()


def test_fake_v1_root_caps_memory_and_swap_and_takes_no_cpu_flag(tmp_path):
    root = _fake_root(tmp_path, 1)
    assert cgroup_version(root) == 1
    with DeviceCgroup(root, "d1", mem_bytes=64 * MiB) as cg:
        assert not cg.v2 and (root / "d1" / "memory.limit_in_bytes").read_text() == f"{64 * MiB}\n"
        assert not (root / "d1" / "memory.memsw.limit_in_bytes").exists()  # optional: only where the kernel has it
        assert cg.peak_bytes() is None and cg.usage_bytes() is None and cg.oom_kills() == 0
    assert sorted(p.name for p in root.iterdir()) == ["memory.limit_in_bytes"]
    with pytest.raises(TpiError, match="a CPU limit needs cpu_root") as e:
        DeviceCgroup(root, "d2", mem_bytes=MiB, cpus=1).open()
    assert "--cgroup-cpu-root" not in str(e.value) and not (root / "d2").exists()
    with pytest.raises(TpiError, match="neither a cgroup v2 directory"):
        cgroup_version(tmp_path)


def test_evicting_a_devices_files_drops_their_page_cache(tmp_path):
    """So the device's own reads fault them in again, charged to its group."""
    shard = tmp_path / "rank1"
    shard.mkdir()
    f = shard / "weights.bin"
    f.write_bytes(os.urandom(4 * MiB))
    f.read_bytes()
    assert cached_bytes(str(f)) > 0
    assert evict_page_cache([shard]) == 4 * MiB
    assert cached_bytes(str(f)) == 0
    f.read_bytes()
    assert cached_bytes(str(f)) == 4 * MiB


def _doc(clock: str, root: Path, cap: str | None) -> dict:
    return {"name": "t", "topology": {"devices": {"count": 2, "template": {"cores": 1, "mem_bytes": "8GiB"}},
                                      "links": {"shape": "star", "latency_ms": 1.0, "bandwidth_mbps": None}},
            "model": {"synth": "small-100m", "layers": 1},
            "workload": {"prompt_lengths": [5], "new_tokens": 2, "repetitions": 1},
            "options": {"clock": clock, "compute": "measured", "cgroup_root": str(root),
                        **({"mem_cap": cap} if cap else {})}}


def test_a_cgroup_run_stops_and_records_the_device_over_its_cap_under_both_clocks(cgroup_root, tmp_path):
    """The master holds the LM head on top of what a worker holds: uncapped under the cgroup root, then a cap
    halfway between the two peaks stops the master, recorded with who stopped it, under the virtual and
    the wall clock (v1 has no cpu hierarchy: cores are the affinity), and no group is left behind."""
    root, real = cgroup_root
    cache = tmp_path / "cache"
    cfg = load_run_config(None, doc=_doc("virtual", root, None))
    free = Run(cfg, results_dir=tmp_path / "free", cache_dir=cache, progress=False).run()
    assert free.exit_code == 0 and free.records[0].error is None and free.records[0].oom == ()
    assert free.records[0].config["memory_limit"] == "cgroup"
    peaks = {n: d.peak_rss_bytes for n, d in free.records[0].devices.items()}
    cap = (peaks["d0"] + peaks["d1"]) // 2
    for clock in ("virtual", "wall"):
        cfg = load_run_config(None, doc=_doc(clock, root, f"{cap}B"))
        out = Run(cfg, results_dir=tmp_path / clock, cache_dir=cache, progress=False).run()
        assert out.exit_code == 0, out.summary  # an OOM is a result
        (rec,) = out.records
        assert [o.device for o in rec.oom] == ["d0"] and rec.ttft_s is None
        stop = rec.oom[0]
        assert stop.by in OOM_BY and stop.cap_bytes == cap and "d0 out of memory" in rec.error
        if real:
            assert stop.charged_bytes is not None and stop.charged_bytes > 0
        if stop.by != "cgroup":
            assert stop.rss_bytes > cap
        assert [p.name for p in root.iterdir() if p.is_dir()] == []
        print(f"\n  {clock}: d0 stopped by the {stop.by}: RSS {stop.rss_bytes / MiB:.1f} MiB, charged "
              f"{(stop.charged_bytes or 0) / MiB:.1f} MiB, cap {cap / MiB:.1f} MiB (real cgroup: {real})")


def test_the_watchdog_runs_beside_the_cgroup_with_the_same_cap(cgroup_root):
    """What a cgroup does not charge the device (pages inherited at fork) the watchdog still counts."""
    root, _ = cgroup_root
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        with DeviceCgroup(root, "d0", mem_bytes=1 << 30) as cg, \
                MemoryWatchdog(proc.pid, 4 * MiB, device="d0") as dog:  # below any interpreter's RSS
            cg.add(proc.pid)
            assert proc.wait(timeout=30) == -9
        assert dog.events and dog.events[0].by in OOM_BY[:2]
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)
