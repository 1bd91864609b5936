"""Where and when a result was measured: the host's description, the git commit, the UTC time.

Layer: results (imports nothing of the project). Recorded in every results line (config.host, time) by
emulator/results/record.py's builders and the run code. Must not read results or run anything.
"""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[2]


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


def utc_now() -> str:
    """Now, UTC, ISO 8601 to the second."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
