"""`tpi serve` under load and faults: queue full -> 429, a client that leaves cancels within one token,
API keys off loopback -> 401, a killed worker -> 503 naming the rank, and no process left behind."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading

import openai
import pytest
from serve_util import LiveServer, pid_alive, synth_tiny, tpi_env, wait_until

MSGS = [{"role": "user", "content": "Write a long story about edge devices"}]
LONG = 200  # tokens (most of the context of 256 after the 45-token prompt): seconds on the tiny model, still running when we act


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    base = tmp_path_factory.mktemp("serve-faults")
    return synth_tiny(base / "tiny"), tpi_env(base / "cache"), base


def stop_cleanly(srv: LiveServer, pids: list[int], sig: int = signal.SIGTERM) -> None:
    assert srv.stop(sig) == 0, srv.log_path.read_text()
    assert not [p for p in pids if pid_alive(p)], "processes left behind"


def test_queue_full_gets_429_and_disconnect_cancels(tiny):
    model, env, base = tiny
    srv = LiveServer(["--model", model, "--devices", "2", "--queue", "1"], env, base / "queue.log")
    pids = srv.pids()
    try:
        client = srv.client()
        # A streams and holds the devices; B waits in the queue; C finds the queue full
        a = client.chat.completions.create(model="tiny", messages=MSGS, max_tokens=LONG, temperature=0, stream=True)
        seen = [next(iter(a)) for _ in range(3)]
        assert seen[0].choices[0].delta.role == "assistant"
        b_result: list = []
        b = threading.Thread(target=lambda: b_result.append(client.chat.completions.create(
            model="tiny", messages=MSGS, max_tokens=4, temperature=0)))
        b.start()
        wait_until(lambda: srv.health()[1]["waiting"] == 1, what="B queued")
        with pytest.raises(openai.RateLimitError) as info:
            client.chat.completions.create(model="tiny", messages=MSGS, max_tokens=4)
        assert int(info.value.response.headers["retry-after"]) >= 1
        assert "queue full" in info.value.message
        # A's client leaves: its generation stops within one token and B runs
        a.close()
        b.join(60)
        assert b_result and b_result[0].usage.completion_tokens == 4
        made = srv.metric("tpi_completion_tokens_total")
        assert made - 4 < LONG, made  # A was cut short
        assert srv.metric("tpi_tokens_after_cancel_total") <= 1  # at most the step in flight
        assert srv.metric('tpi_requests_total{endpoint="chat",status="cancelled"}') == 1
        assert srv.metric('tpi_requests_total{endpoint="chat",status="429"}') == 1
        # a non-streamed request whose client leaves is cancelled too
        body = json.dumps({"messages": MSGS, "max_tokens": LONG}).encode()
        port = int(srv.local_url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n" % len(body) + body)
            wait_until(lambda: srv.health()[1]["busy"], what="the request running")
        wait_until(lambda: srv.metric('tpi_requests_total{endpoint="chat",status="cancelled"}') == 2,
                   what="the timed-out request cancelled")
        wait_until(lambda: not srv.health()[1]["busy"], what="devices idle again")
        assert srv.metric("tpi_completion_tokens_total") - made < LONG
    finally:
        stop_cleanly(srv, pids)


def test_api_key_required_off_loopback(tiny, tmp_path):
    model, env, base = tiny
    out = subprocess.run([sys.executable, "-m", "tpicore", "serve", "--model", model, "--host", "0.0.0.0"],
                         capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1] == ("error: --host 0.0.0.0 is not a loopback address: clients off "
                                                    "this machine must authenticate; give --api-key-file")
    key = "k3y-" + os.urandom(12).hex()
    (tmp_path / "key").write_text(key + "\n")
    srv = LiveServer(["--model", model, "--devices", "2", "--host", "0.0.0.0", "--api-key-file",
                      str(tmp_path / "key")], env, base / "auth.log")
    pids = srv.pids()  # /health stays open (liveness probes)
    try:
        assert srv.url.startswith("http://0.0.0.0:")
        for bad in ("none", key + "x"):
            with pytest.raises(openai.AuthenticationError) as info:
                srv.client(bad).chat.completions.create(model="tiny", messages=MSGS, max_tokens=2)
            assert "API key" in info.value.message
        status, body, headers = srv.post("/v1/completions", b'{"prompt": "hi", "max_tokens": 2}')
        assert status == 401 and headers["www-authenticate"] == "Bearer" and b"missing API key" in body
        assert srv.get("/metrics")[0] == 401 and srv.get("/v1/models")[0] == 401
        r = srv.client(key).chat.completions.create(model="tiny", messages=MSGS, max_tokens=2, temperature=0)
        assert r.usage.completion_tokens == 2
        assert srv.metric('tpi_requests_total{endpoint="chat",status="401"}', {"Authorization": f"Bearer {key}"}) == 2
    finally:
        stop_cleanly(srv, pids, signal.SIGINT)  # Ctrl-C stops it as cleanly as SIGTERM


def test_worker_killed_gives_503_and_health_names_the_rank(tiny):
    """--no-failover: the lost device ends the group (the default recovers: test_failover.py)."""
    model, env, base = tiny
    srv = LiveServer(["--model", model, "--devices", "3", "--timeout-s", "5", "--no-failover"], env, base / "kill.log")
    status, health = srv.health()
    assert status == 200 and health["status"] == "ok"
    pids = srv.pids()
    victim = {r["rank"]: r["pid"] for r in health["ranks"]}[2]
    try:
        client = srv.client()
        result: list = []

        def long_request() -> None:
            try:
                client.chat.completions.create(model="tiny", messages=MSGS, max_tokens=LONG, temperature=0)
            except openai.APIStatusError as e:
                result.append(e)

        t = threading.Thread(target=long_request)
        t.start()
        wait_until(lambda: srv.health()[1]["busy"], what="generation running")
        os.kill(victim, signal.SIGKILL)
        t.join(60)
        assert result and result[0].status_code == 503, result
        assert "lost rank 2" in result[0].message
        status, health = srv.health()
        assert status == 503 and health["status"] == "down" and health["lost_ranks"] == [2]
        assert "rank 2" in health["error"]
        wait_until(lambda: not [p for p in pids[1:] if pid_alive(p)], what="every worker reaped")
        # later requests fail fast with the same 503, and the server itself keeps answering
        got, raw, _ = srv.post("/v1/chat/completions", json.dumps({"messages": MSGS, "max_tokens": 2}).encode())
        assert got == 503 and "lost rank 2" in json.loads(raw)["error"]["message"]
        assert srv.metric("tpi_devices_up") == 0
    finally:
        stop_cleanly(srv, pids)


def test_remote_workers_join_and_one_is_lost(tiny, tmp_path):
    """`tpi serve --listen` + `tpi worker` processes with a secret file; a worker that dies is named."""
    model, env, base = tiny
    shards = tmp_path / "shards"
    subprocess.run([sys.executable, "-m", "tpicore", "shard", "--model", model, "--devices", "3", "--out",
                    str(shards)], check=True, capture_output=True, timeout=120, env=env)
    secret = tmp_path / "secret"
    secret.write_bytes(os.urandom(32).hex().encode())
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    srv = LiveServer(["--shards", str(shards), "--devices", "3", "--listen", f"127.0.0.1:{port}", "--secret-file",
                      str(secret), "--timeout-s", "30", "--no-failover"], env, base / "remote.log", wait=False)
    workers = {r: subprocess.Popen([sys.executable, "-m", "tpicore", "worker", "--rank", str(r), "--master",
                                    f"127.0.0.1:{port}", "--shards", str(shards), "--secret-file", str(secret)],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
               for r in (1, 2)}
    try:
        srv.wait_ready()
        assert [r["pid"] for r in srv.health()[1]["ranks"]][1:] == [None, None]  # remote: no pid here
        r = srv.client().chat.completions.create(model="tiny", messages=MSGS, max_tokens=4, temperature=0)
        assert r.usage.completion_tokens == 4
        workers[1].kill()
        workers[1].wait(10)
        got, raw, _ = srv.post("/v1/chat/completions", json.dumps({"messages": MSGS, "max_tokens": 4}).encode())
        assert got == 503 and "lost rank 1" in json.loads(raw)["error"]["message"], raw
        assert srv.health()[1]["lost_ranks"] == [1]
        workers[2].wait(60)  # the master closed the group: the other worker leaves too
    finally:
        code = srv.stop()
        for w in workers.values():
            if w.poll() is None:
                w.kill()
                w.wait(10)
    assert code == 0, srv.log_path.read_text()
