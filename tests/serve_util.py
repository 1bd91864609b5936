"""Helpers of the serve tests: a tiny synthetic model, a live `tpi serve` subprocess, raw HTTP, metrics."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import openai

START_TIMEOUT_S = 120.0


def synth_tiny(out: Path) -> str:
    """`python -m tpicore synth tiny`: 3 layers, 4 heads, vocab 131, context 256, a real BPE tokenizer."""
    subprocess.run([sys.executable, "-m", "tpicore", "synth", "tiny", "--out", str(out), "--quiet"], check=True,
                   capture_output=True, timeout=120)
    return str(out)


def tpi_env(cache_dir: Path) -> dict[str, str]:
    return {**os.environ, "TPI_CACHE_DIR": str(cache_dir), "TOKENIZERS_PARALLELISM": "false"}


class LiveServer:
    """`tpi serve ... --port 0` in a subprocess; `url` once it printed its ready line."""

    def __init__(self, args: list[str], env: dict[str, str], log: Path, wait: bool = True) -> None:
        self.log_path = log
        self.log = open(log, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "tpicore", "serve", "--port", "0", *args],
                                     stdout=subprocess.PIPE, stderr=self.log, text=True, env=env)
        self.url = self.local_url = ""
        if wait:
            self.wait_ready()

    def wait_ready(self) -> None:
        """Until the ready line (the devices are up and loaded)."""
        log = self.log_path
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.proc.stdout], [], [], 0.5)
            if ready:
                line = self.proc.stdout.readline()
                if "listening on " in line:
                    self.url = line.rsplit("listening on ", 1)[1].strip()
                    break
                if not line and self.proc.poll() is not None:
                    break
        if not self.url:
            self.proc.kill()
            self.proc.wait(10)
            raise AssertionError(f"tpi serve did not start: {log.read_text()}")
        host, port = self.url.rsplit("//", 1)[1].rsplit(":", 1)
        self.local_url = f"http://127.0.0.1:{port}" if host in ("0.0.0.0", "[::]") else self.url

    def client(self, api_key: str = "none") -> openai.OpenAI:
        return openai.OpenAI(base_url=self.local_url + "/v1", api_key=api_key, max_retries=0, timeout=120)

    def get(self, path: str, headers: dict[str, str] | None = None) -> tuple[int, bytes, dict[str, str]]:
        return http("GET", self.local_url + path, None, headers)

    def post(self, path: str, body: bytes, headers: dict[str, str] | None = None) -> tuple[int, bytes, dict]:
        return http("POST", self.local_url + path, body, {"Content-Type": "application/json", **(headers or {})})

    def health(self) -> tuple[int, dict]:
        status, body, _ = self.get("/health")
        return status, json.loads(body)

    def pids(self) -> list[int]:
        return [r["pid"] for r in self.health()[1]["ranks"] if r["pid"] is not None]

    def metric(self, name: str, headers: dict[str, str] | None = None) -> float:
        """One sample of /metrics by its full name with labels, e.g. 'tpi_requests_total{endpoint="chat",...}'."""
        _, body, _ = self.get("/metrics", headers)
        for line in body.decode().splitlines():
            if line.startswith(name + " "):
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 60.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            raise AssertionError(f"tpi serve did not stop on {sig}: {self.log_path.read_text()}") from None
        finally:
            self.proc.stdout.close()
            self.log.close()
        return code


def http(method: str, url: str, body: bytes | None = None, headers: dict[str, str] | None = None,
         timeout_s: float = 120.0) -> tuple[int, bytes, dict[str, str]]:
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:
            return resp.status, resp.read(), dict(resp.headers)
    except urllib.error.HTTPError as e:
        return e.code, e.read(), dict(e.headers)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead too (its parent has not reaped it yet)
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_until(cond, timeout_s: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def generate_json(model: str, devices: int, prompt: str, max_new_tokens: int, env: dict[str, str],
                  chat: bool = True) -> dict:
    """`tpi generate --json` for the same prompt and placement (greedy)."""
    cmd = [sys.executable, "-m", "tpicore", "generate", "--model", model, "--devices", str(devices), "--prompt",
           prompt, "--max-new-tokens", str(max_new_tokens), "--json"] + (["--chat"] if chat else [])
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)
