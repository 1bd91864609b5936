"""Where and when a result was measured: the host, the code (git commit + dirty flag), the host's load.

Layer: results (imports tpicore.errors only). Recorded in every results line: config.host (host_info,
at the start of a run) and the line's `provenance` (Provenance: the commit, whether the tree had changes
outside results/, and os.getloadavg() sampled at the start and at the end of the run: no sampler thread, so
nothing runs beside the devices; the 5- and 15-minute averages at the end cover a run's whole span).
Must not read results or run experiments.

    code_state()            CodeState(commit, dirty): HEAD read from .git; dirty from `git status --porcelain`
                            over everything but results/ (the outputs), None when git cannot tell
    ProvenanceProbe()       taken when a run starts; .stamp() -> the Provenance of what ran since the last
                            stamp (the load window restarts at each stamp: one window per results line)
    require_clean(allow)    the short commit, or TpiError for a dirty tree (`make reproduce` without ALLOW_DIRTY)
    exclusive_lock(path)    an flock held while this process runs experiments into the committed results
"""

from __future__ import annotations

import fcntl
import os
import platform
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tpicore.errors import TpiError

REPO = Path(__file__).resolve().parents[2]
OUTPUTS = "results"  # what a run writes (tracked results/*.jsonl): changes there do not make the code dirty
GIT_TIMEOUT_S = 20.0


def host_info() -> dict[str, Any]:
    """What the numbers were measured on."""
    info: dict[str, Any] = {
        "hostname": platform.node(), "platform": platform.platform(), "python": platform.python_version(),
        "numpy": np.__version__, "cpus": os.cpu_count(), "cpus_usable": len(os.sched_getaffinity(0)),
        "loadavg": list(os.getloadavg()),
    }
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                info["mem_total_bytes"] = int(line.split()[1]) * 1024
    except OSError:
        pass
    info["git_commit"] = git_commit()
    return info


def git_commit(root: Path = REPO) -> str | None:
    """The checked-out commit, read from .git without running git (None outside a checkout)."""
    try:
        head = (root / ".git" / "HEAD").read_text().strip()
        if head.startswith("ref: "):
            ref = root / ".git" / head[5:]
            if ref.exists():
                return ref.read_text().strip()
            for line in (root / ".git" / "packed-refs").read_text().splitlines():
                if line.endswith(" " + head[5:]):
                    return line.split()[0]
            return None
        return head
    except OSError:
        return None


def dirty_paths(root: Path = REPO) -> list[str] | None:
    """Paths with uncommitted changes (modified, staged, untracked but not ignored), results/ left out;
    None when git is missing or this is not a checkout."""
    try:
        out = subprocess.run(["git", "status", "--porcelain", "--", ".", f":(exclude){OUTPUTS}"], cwd=root,
                             capture_output=True, text=True, timeout=GIT_TIMEOUT_S)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return [line[3:] for line in out.stdout.splitlines() if line.strip()]


@dataclass(frozen=True)
class CodeState:
    """The code a run used: the commit, and whether the tree differed from it (None: unknown)."""

    commit: str | None
    dirty: bool | None


def code_state(root: Path = REPO) -> CodeState:
    paths = dirty_paths(root)
    return CodeState(git_commit(root), None if paths is None else bool(paths))


def require_clean(allow_dirty: bool) -> str:
    """The commit results will carry; TpiError when the tree has changes outside results/ (or git cannot
    tell) and `allow_dirty` is not set."""
    code = code_state()
    head = (code.commit or "no commit")[:12]
    if code.dirty is False or allow_dirty:
        return head + (" (dirty: allowed)" if code.dirty else "" if code.dirty is False else " (dirty: unknown)")
    paths = dirty_paths() or []
    why = (f"{len(paths)} changed path(s) outside results/ (e.g. {', '.join(paths[:3])})" if paths
           else "git cannot tell whether the tree is clean")
    raise TpiError(f"reproduce: {why}: results must come from one commit; commit first, or pass --allow-dirty "
                   "(make reproduce ALLOW_DIRTY=1) to record them as dirty")


def exclusive_lock(path: Path, what: str) -> int:
    """An exclusive lock held until this process exits: a second one refuses instead of running beside this one (returns the descriptor, to keep it open)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise TpiError(f"{what}: another {what} is running (pid {holder}, lock {path}); experiments run one "
                       "at a time") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    return fd


LoadAvg = tuple[float, float, float]  # os.getloadavg(): 1, 5, 15 minutes


def load_now() -> LoadAvg:
    one, five, fifteen = os.getloadavg()
    return (round(one, 2), round(five, 2), round(fifteen, 2))


@dataclass(frozen=True)
class Provenance:
    """A results line's provenance (JSON key "provenance"; absent on lines written before it existed):

        git_commit, git_dirty   the code (dirty: changes outside results/ when the run started; null: unknown)
        load_start, load_end    os.getloadavg() (1, 5, 15 min) when the run started and when its line was built
        cpus_usable             cores this process could run on
        started                 when the run started (UTC); the line's `time` is when it ended
    """

    git_commit: str | None
    git_dirty: bool | None
    load_start: LoadAvg
    load_end: LoadAvg
    cpus_usable: int
    started: str

    @property
    def load_max(self) -> float:
        """The highest of the sampled averages: a bound on how busy the host was."""
        return max(self.load_start + self.load_end)

    def to_json(self) -> dict[str, Any]:
        return {"git_commit": self.git_commit, "git_dirty": self.git_dirty, "load_start": list(self.load_start),
                "load_end": list(self.load_end), "cpus_usable": self.cpus_usable, "started": self.started,
                "load_sampling": "os.getloadavg at start and end"}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "Provenance":
        return cls(d["git_commit"], d["git_dirty"], tuple(d["load_start"]), tuple(d["load_end"]),
                   int(d["cpus_usable"]), d["started"])


class ProvenanceProbe:
    """Taken when a run starts; `stamp()` when its line is built (each stamp starts the next window)."""

    def __init__(self, code: CodeState | None = None) -> None:
        self.code = code or code_state()
        self.load, self.started = load_now(), utc_now()

    def stamp(self) -> Provenance:
        end = load_now()
        p = Provenance(self.code.commit, self.code.dirty, self.load, end, len(os.sched_getaffinity(0)),
                       self.started)
        self.load, self.started = end, utc_now()
        return p


def utc_now() -> str:
    """Now, UTC, ISO 8601 to the second."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
