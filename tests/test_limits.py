"""Resource limits: the memory watchdog kills a device over its cap; cores and BLAS env in a child;
cgroup groups created, written and removed under a fake root."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from emulator.host.cgroup import DeviceCgroup
from emulator.host.limits import (
    BLAS_ENV_VARS,
    MemoryWatchdog,
    blas_env,
    read_rss,
)
from tpicore.errors import TpiError

MiB = 2**20

# Allocates and touches 16 MiB at a time, up to 600 MiB, slowly enough for the watchdog to see it grow.
HOG = textwrap.dedent("""
    import sys, time
    chunks = []
    print("ready", flush=True)
    for _ in range(40):
        chunks.append(bytearray(16 << 20))  # zero-filled by calloc+touch: counts in RSS
        for i in range(0, len(chunks[-1]), 4096):
            chunks[-1][i] = 1
        time.sleep(0.01)
    print("survived", flush=True)
""")


def test_watchdog_kills_a_device_over_its_cap():
    proc = subprocess.Popen([sys.executable, "-c", HOG], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        cap = 120 * MiB
        with MemoryWatchdog(proc.pid, cap, interval_s=0.005, device="d3") as dog:
            rc = proc.wait(timeout=30)
        out = proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert rc == -9 and "survived" not in out
    assert len(dog.events) == 1 and dog.oom
    ev = dog.events[0]
    print(f"\n  {ev}  (peak VmHWM {dog.peak_rss_bytes / MiB:.1f} MiB)")
    assert ev.device == "d3" and ev.pid == proc.pid and ev.cap_bytes == cap
    assert cap < ev.rss_bytes < cap + 64 * MiB  # caught within a few 16 MiB steps
    assert dog.peak_rss_bytes >= ev.rss_bytes
    assert read_rss(proc.pid) is None  # nothing left running
    assert not dog._thread.is_alive()


def test_watchdog_leaves_a_device_under_its_cap_alone():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(0.3)"])
    with MemoryWatchdog(proc.pid, 1 << 30, interval_s=0.01) as dog:
        assert proc.wait(timeout=10) == 0
    assert dog.events == [] and 0 < dog.peak_rss_bytes < 1 << 30


CORES_CHILD = textwrap.dedent("""
    import json, os, sys
    from emulator.host.limits import apply_cores
    pinned = apply_cores(int(sys.argv[1]), first=int(sys.argv[2]))
    assert "numpy" not in sys.modules
    env = {k: os.environ[k] for k in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    print(json.dumps({"pinned": pinned, "affinity": sorted(os.sched_getaffinity(0)), "env": env}))
""")


@pytest.mark.parametrize("cores, first", [(1, 0), (1, 1), (8, 3)])
def test_apply_cores_pins_and_caps_blas(cores, first):
    available = sorted(os.sched_getaffinity(0))
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", CORES_CHILD, str(cores), str(first)], capture_output=True,
                         text=True, check=True, cwd=repo)
    res = json.loads(out.stdout)
    assert len(res["affinity"]) == min(cores, len(available)) and res["pinned"] == res["affinity"]
    if cores == 1:  # round-robin from `first`: devices spread over the host's cores
        assert res["affinity"] == [available[first % len(available)]]
    assert res["env"] == {k: str(cores) for k in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    assert set(blas_env(2)) == set(BLAS_ENV_VARS)
    with pytest.raises(TpiError, match="cores: must be >= 1"):
        blas_env(0)


def fake_v2_root(tmp_path):
    root = tmp_path / "tpi"
    root.mkdir()
    (root / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
    (root / "cgroup.subtree_control").write_text("")
    (root / "cgroup.procs").write_text("")
    return root


def test_cgroup_v2_fake_root(tmp_path):
    root = fake_v2_root(tmp_path)
    with DeviceCgroup(root, "d3", mem_bytes=512 * MiB, cpus=2) as cg:
        group = root / "d3"
        assert cg.v2 and not cg.real and group.is_dir()
        assert (group / "memory.max").read_text() == f"{512 * MiB}\n"
        assert (group / "cpu.max").read_text() == "200000 100000\n"
        cg.add(12345)
        assert (group / "cgroup.procs").read_text() == "12345\n"
        assert (root / "cgroup.subtree_control").read_text() == "+memory +cpu"
        (group / "memory.events").write_text("low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\n")
        assert cg.oom_kills() == 1
        (group / "memory.events").unlink()
    assert not (root / "d3").exists()  # group removed
    assert sorted(p.name for p in root.iterdir()) == ["cgroup.controllers", "cgroup.procs", "cgroup.subtree_control"]


def test_cgroup_v1_fake_root_and_cleanup_on_error(tmp_path):
    mem = tmp_path / "memory" / "tpi"
    cpu = tmp_path / "cpu" / "tpi"
    mem.mkdir(parents=True)
    cpu.mkdir(parents=True)
    (mem / "memory.limit_in_bytes").write_text("9223372036854771712\n")
    (cpu / "cpu.cfs_quota_us").write_text("-1\n")
    with DeviceCgroup(mem, "d1", mem_bytes=256 * MiB, cpus=0.5, cpu_root=cpu) as cg:
        assert not cg.v2
        assert (mem / "d1" / "memory.limit_in_bytes").read_text() == f"{256 * MiB}\n"
        assert (cpu / "d1" / "cpu.cfs_quota_us").read_text() == "50000\n"
        assert (cpu / "d1" / "cpu.cfs_period_us").read_text() == "100000\n"
        cg.add(4242)
        assert (mem / "d1" / "cgroup.procs").read_text() == "4242\n"
    assert not (mem / "d1").exists() and not (cpu / "d1").exists()

    # CPU limit without a cpu hierarchy: refused, and the memory group already made is removed again
    with pytest.raises(TpiError, match="a CPU limit needs cpu_root"):  # names no flag that does not exist
        with DeviceCgroup(mem, "d2", mem_bytes=MiB, cpus=1):
            pass
    assert not (mem / "d2").exists()


def test_cgroup_refuses_roots_that_are_not_cgroups(tmp_path):
    with pytest.raises(TpiError, match="neither a cgroup v2 directory"):
        DeviceCgroup(tmp_path, "d0", mem_bytes=MiB)
    with pytest.raises(TpiError, match="is not a directory"):
        DeviceCgroup(tmp_path / "nope", "d0")
    root = fake_v2_root(tmp_path)
    (root / "cgroup.controllers").write_text("pids\n")
    with pytest.raises(TpiError, match="does not offer the memory controller"):
        DeviceCgroup(root, "d0", mem_bytes=MiB).open()
    assert not (root / "d0").exists()
