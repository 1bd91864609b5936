"""Real memory limits, the watchdog side: a transient spike (200 MB allocated and freed between two samples)
is stopped through the kernel's peak counter (VmHWM) and recorded as "watchdog (peak)"; the OOM records
say who stopped a device; figures draw a real stop and an extrapolated OOM differently, each labelled.
(The cgroup side: tests/test_cgroup.py. The launcher end to end: tests/test_launcher.py.)"""

from __future__ import annotations

import subprocess
import sys
import textwrap

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from test_plot import MiB, line, rec

from emulator.figures import data, style
from emulator.host.limits import WATCHDOG, WATCHDOG_PEAK, MemoryWatchdog, read_rss
from emulator.results.record import OOM_BY, OomStop, RunRecord

# Waits for "go", then maps and touches 200 MB at once (MAP_POPULATE), frees it, says "freed", and idles:
# a spike its RSS shows only while it lasts.
SPIKE = textwrap.dedent("""
    import mmap, sys, time
    print("ready", flush=True)
    sys.stdin.readline()
    m = mmap.mmap(-1, 200 << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | mmap.MAP_POPULATE)
    m.close()
    print("freed", flush=True)
    time.sleep(60)
    print("survived", flush=True)
""")


def _spiker() -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", SPIKE], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    return proc


def _reap(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=30)
    for f in (proc.stdin, proc.stdout):
        f.close()


def test_a_spike_between_two_samples_is_caught_by_the_peak_counter():
    """No sample falls inside the spike (the next one is an hour away, so the one check() after it is the
    first to look): its RSS is back under the cap, its VmHWM is not -- stopped, by the watchdog (peak)."""
    proc = _spiker()
    try:
        rss0, _ = read_rss(proc.pid)
        cap = rss0 + 100 * MiB
        with MemoryWatchdog(proc.pid, cap, interval_s=3600, device="d5") as dog:
            proc.stdin.write("go\n")
            proc.stdin.flush()
            assert proc.stdout.readline().strip() == "freed"
            rss, hwm = read_rss(proc.pid)
            assert rss < cap < hwm  # the spike is over; only the kernel's peak remembers it
            event = dog.check()
            assert proc.wait(timeout=30) == -9
        assert event is not None and dog.events == [event] and dog.oom
        assert event.by == WATCHDOG_PEAK and event.device == "d5" and event.cap_bytes == cap
        assert event.rss_bytes == hwm > cap and "peak RSS" in str(event)
        assert dog.check() is None  # stopped once; a stopped device is not sampled again
    finally:
        _reap(proc)
    assert read_rss(proc.pid) is None and not dog._thread.is_alive()


def test_a_spike_is_stopped_by_the_running_watchdog():
    """The default 10 ms watchdog, nobody calling check(): the spike is stopped however short it was."""
    proc = _spiker()
    try:
        rss0, _ = read_rss(proc.pid)
        with MemoryWatchdog(proc.pid, rss0 + 100 * MiB, device="d1") as dog:
            proc.stdin.write("go\n")
            proc.stdin.flush()
            assert proc.wait(timeout=60) == -9
        out = proc.stdout.read()
    finally:
        _reap(proc)
    assert "survived" not in out
    assert len(dog.events) == 1 and dog.events[0].by in (WATCHDOG, WATCHDOG_PEAK)
    assert dog.events[0].rss_bytes > dog.events[0].cap_bytes


def test_oom_records_say_who_stopped_the_device_and_old_lines_still_read():
    assert OOM_BY == ("watchdog", "watchdog (peak)", "cgroup")
    old = line("x", {}, oom=True)  # an "oom" entry as committed lines carry it: no charged_bytes
    assert "charged_bytes" not in old["oom"][0]
    r = RunRecord.from_json(old)
    assert r.oom == (OomStop("d1", 100 * MiB, 100 * MiB, "watchdog"),) and r.oom[0].charged_bytes is None
    new = dict(old, oom=[{"device": "d0", "rss_bytes": 5, "cap_bytes": 4, "by": "cgroup", "charged_bytes": 3}])
    r = RunRecord.from_json(new)
    assert r.oom[0].by == "cgroup" and r.oom[0].charged_bytes == 3
    assert RunRecord.from_json(r.to_json()).oom == r.oom


def test_a_real_stop_and_an_extrapolated_oom_are_told_apart():
    stopped = rec("x", {"n": 1}, oom=True)
    extrapolated = rec("x", {"n": 2}, lat=2.0, mem_over_cap=["d0"])
    ran = rec("x", {"n": 3})
    assert [data.oom_kind(r) for r in (stopped, extrapolated, ran)] == [data.OOM_STOPPED, data.OOM_EXTRAPOLATED, ""]
    p_stop, p_extra, p_ran = data.aggregate([stopped, extrapolated, ran])
    assert (p_stop.status, p_extra.status, p_ran.status) == ("OOM", "OOM (extrap.)", "")
    assert p_stop.oom and p_extra.oom and not p_ran.oom
    # a point with one stopped run and one extrapolated run is a real stop
    (both,) = data.aggregate([rec("y", {}, oom=True), rec("y", {}, mem_over_cap=["d0"])])
    assert both.oom_kind == data.OOM_STOPPED


def _ax():
    fig = Figure()
    FigureCanvasAgg(fig)
    return fig.add_subplot()


def test_bars_hatch_and_key_each_oom_kind():
    ax = _ax()
    style.bars(ax, ["a", "b", "c"], [("ours", "C0", [1.0, 2.0, 3.0], ["OOM", "OOM (extrap.)", ""])], "s")
    drawn = [r for r in ax.patches if r.get_width() > 0]
    assert [r.get_hatch() for r in drawn] == ["///", "...", None]
    labels = ax.get_legend_handles_labels()[1]
    assert style.OOM_KEY[data.OOM_STOPPED] in labels and style.OOM_KEY[data.OOM_EXTRAPOLATED] in labels
    ax = _ax()  # no OOM: no OOM key
    style.bars(ax, ["a"], [("ours", "C0", [1.0], [""])], "s")
    assert ax.get_legend_handles_labels()[1] == ["ours"]


def test_lines_mark_each_oom_kind_with_its_own_marker_and_key():
    points = data.aggregate([rec("x", {"n": 2}, lat=1.0, mem_over_cap=["d0"]), rec("x", {"n": 4}, lat=2.0),
                             rec("x", {"n": 8}, lat=3.0), rec("x", {"n": 8}, oom=True)])
    ax = _ax()
    style.plot_lines(ax, {"ours": [(n, p.token_latency_s, p) for n, p in zip((2, 4, 8), points)]})
    texts = sorted(t.get_text() for t in ax.texts)
    assert texts == ["OOM", "OOM (extrap.)"]
    handles, labels = ax.get_legend_handles_labels()
    keys = {lab: h for h, lab in zip(handles, labels)}
    assert keys[style.OOM_KEY[data.OOM_STOPPED]].get_marker() == "X"
    assert keys[style.OOM_KEY[data.OOM_EXTRAPOLATED]].get_marker() == "o"
    assert keys[style.OOM_KEY[data.OOM_EXTRAPOLATED]].get_markerfacecolor() == "none"
