"""Tensor parallel over N local processes: equals single-process and HF; faults; privacy; CLI."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import hf_logits

from tpicore.comm import handshake
from tpicore.comm.channel import Channel
from tpicore.comm.frame import BOXED, HEADER_NBYTES, pack_header, unpack_header
from tpicore.dist.session import ParallelSession, run_local
from tpicore.errors import TpiError
from tpicore.runtime.device import Device, ResidentSource
from tpicore.runtime.generate import generate
from tpicore.runtime.session import GenerateOptions
from tpicore.weights.store import TensorStore

PROMPT = [1, 17, 42, 99, 5]
NEW = 8


@pytest.fixture(autouse=True)
def shard_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("TPI_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "tpi-cache"))


def single(model_dir):
    st = TensorStore.from_model_dir(model_dir)
    return generate(Device(st, ResidentSource(st), 64).step, PROMPT, NEW, max_seq=64, keep_logits=True)


CASES = [(n, algo, "wide", None) for n in (1, 2, 3, 4, 8) for algo in ("star", "ring", "tree")] + [
    (3, "star", "wide", "3,2,1"), (4, "ring", "wide", "1,2,3,4"), (4, "tree", "gqa1", "2,1,1,1"),
    (3, "star", "headdim", None), (2, "star", "bias", "1,3"), (4, "star", "gqa1", None), (3, "tree", "tied", None),
]


@pytest.mark.parametrize("n,algo,variant,ratios", CASES)
def test_sharded_equals_unsharded_and_hf(hf_models, n, algo, variant, ratios):
    model_dir, ref = hf_models(variant)
    base = single(model_dir)
    gen, report = run_local(n, PROMPT, NEW, model=model_dir, ratios=ratios, allreduce=algo, keep_logits=True)
    assert gen.tokens == base.tokens
    ours = np.stack(gen.logits)
    assert np.abs(ours - hf_logits(ref, PROMPT + gen.tokens[:-1])).max() <= 1e-4
    assert len(report["per_rank"]) == n and all(r["peak_rss_bytes"] > 0 for r in report["per_rank"])


def test_deterministic_per_algorithm(hf_models):
    model_dir, _ = hf_models("wide")
    a, _ = run_local(4, PROMPT, 4, model=model_dir, allreduce="ring", keep_logits=True)
    b, _ = run_local(4, PROMPT, 4, model=model_dir, allreduce="ring", keep_logits=True)
    assert np.array_equal(np.stack(a.logits), np.stack(b.logits))


def test_impossible_split_is_refused(hf_models):
    model_dir, _ = hf_models("mha")  # 4 heads
    with pytest.raises(TpiError, match="cannot split 4 attention heads.*at most 4 devices"):
        run_local(5, PROMPT, 2, model=model_dir)


def session_args(model_dir, n, timeout_s=3.0, **kw):
    return GenerateOptions(model=model_dir, devices=n, timeout_s=timeout_s, **kw)


def port_is_free(port: int) -> bool:
    s = socket.socket()
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))
        return True
    except OSError:
        return False
    finally:
        s.close()


@pytest.mark.parametrize("how", ["kill", "stall"])
def test_worker_fault_fails_fast_naming_rank(hf_models, how):
    """--no-failover: a lost worker ends the run (test_failover.py: the default recovers)."""
    model_dir, _ = hf_models("wide")
    s = ParallelSession(session_args(model_dir, 4, timeout_s=2.0, failover=False))
    t0 = None
    with pytest.raises(TpiError, match="rank 2") as info:
        with s:
            s.prepare(max_seq=32)
            port = s.group.channel(1).sock.getsockname()[1]
            s.step(np.array(PROMPT), 0)
            victim = s.workers.procs[1]  # rank 2
            os.kill(victim.pid, signal.SIGKILL if how == "kill" else signal.SIGSTOP)
            t0 = time.monotonic()
            for pos in range(len(PROMPT), len(PROMPT) + 10):
                s.step(np.array([3]), pos)
    elapsed = time.monotonic() - t0
    assert elapsed < 2.0 + 3.0, elapsed  # within the timeout (plus reaping)
    assert not s.workers.procs  # all reaped
    assert port_is_free(port)
    print(f"{how}: master failed after {elapsed:.2f} s: {info.value}")
    gen, _ = run_local(4, PROMPT, 3, model=model_dir)  # a second run works
    assert len(gen.tokens) == 3


def _recording_worker(rank, addr, shard_dir, secret, timeout_s, blas, model, log_path):
    """A local worker logging every frame it receives, per socket, in order (handshake included), as its
    own code sees them: channel frames after opening (on the wire they are sealed, see test_transport_*)."""
    log = open(log_path, "wb")
    real_recv_frame, real_header_in, real_body_in = handshake.recv_frame, Channel.header_in, Channel.body_in

    def write(sock, data):
        log.write(sock.fileno().to_bytes(4, "little") + len(data).to_bytes(8, "little") + data)
        log.flush()

    def header(hdr):
        return pack_header(hdr.kind, hdr.dtype, hdr.shape, src=hdr.src, tag=hdr.tag, nbytes=hdr.nbytes, flags=hdr.flags)

    def recv_frame(sock, **kw):
        hdr, payload = real_recv_frame(sock, **kw)
        write(sock, header(hdr) + payload.tobytes())
        return hdr, payload

    def header_in(self):
        hdr = real_header_in(self)
        write(self.sock, header(hdr))
        return hdr

    def body_in(self, hdr, dst):
        stamps = real_body_in(self, hdr, dst)
        write(self.sock, bytes(dst) if hdr.nbytes else b"")
        return stamps

    handshake.recv_frame, Channel.header_in, Channel.body_in = recv_frame, header_in, body_in
    from tpicore.dist import session as parallel

    parallel.local_worker_main(rank, addr, shard_dir, secret, timeout_s, blas)


def frames_per_socket(path):
    """Split a recorded log into each socket's byte stream, then into (header, payload) frames."""
    data = open(path, "rb").read()
    streams: dict[int, bytearray] = {}
    off = 0
    while off < len(data):
        fd = int.from_bytes(data[off: off + 4], "little")
        n = int.from_bytes(data[off + 4: off + 12], "little")
        streams.setdefault(fd, bytearray()).extend(data[off + 12: off + 12 + n])
        off += 12 + n
    frames = []
    for stream in streams.values():
        i = 0
        while i < len(stream):
            hdr = unpack_header(bytes(stream[i: i + HEADER_NBYTES]))
            frames.append((hdr, bytes(stream[i + HEADER_NBYTES: i + HEADER_NBYTES + hdr.nbytes])))
            i += HEADER_NBYTES + hdr.nbytes
    return frames, data


def test_workers_never_see_token_ids_or_text(hf_models, tmp_path, monkeypatch):
    """Record every frame a worker receives; none carries token ids or text."""
    from tpicore.dist import session as parallel

    model_dir, _ = hf_models("wide")
    prompt = [101, 17, 42, 99, 77, 130, 64, 12]
    logs = {r: str(tmp_path / f"rank{r}.bin") for r in (1, 2)}
    real_start = parallel.LocalWorkers.start

    def start(self, target, args_per_rank):
        real_start(self, _recording_worker, {r: a + (logs[r],) for r, a in args_per_rank.items()})

    monkeypatch.setattr(parallel.LocalWorkers, "start", start)
    gen, _ = run_local(3, prompt, 6, model=model_dir, allreduce="ring")
    ids = prompt + gen.tokens
    for r, path in logs.items():
        frames, raw = frames_per_socket(path)
        assert len(frames) > 50
        n_float = 0
        for hdr, payload in frames:
            dt = {1: "<f4", 2: "<f2", 3: "<u2", 4: "<i4", 5: "<i8", 6: "u1"}[hdr.dtype]
            if dt in ("<i8", "<i4"):  # only positions may be integers: a contiguous range
                vals = np.frombuffer(payload, dt)
                assert np.array_equal(vals, np.arange(vals[0], vals[0] + len(vals))), vals
            elif dt == "u1" and payload and not hdr.flags & BOXED:  # control / handshake JSON: no ids, no text
                msg = json.loads(payload)
                assert not {"ids", "tokens", "text", "prompt"} & set(msg), msg
            else:
                n_float += dt == "<f4"
        assert n_float > 0
        for enc in ("<i8", "<i4"):  # no token-id sequence anywhere in the received bytes
            assert np.asarray(ids[:4], enc).tobytes() not in raw
    assert len(gen.tokens) == 6


def test_cli_generate_devices_json(hf_models):
    model_dir, _ = hf_models("wide")
    env = {**os.environ}
    out = subprocess.run([sys.executable, "-m", "tpicore", "generate", "--model", model_dir, "--prompt-ids",
                          "1,2,3", "--max-new-tokens", "4", "--devices", "3", "--allreduce", "tree", "--json"],
                         capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    rep = json.loads(out.stdout)
    assert len(rep["tokens"]) == 4 and len(rep["per_rank"]) == 3
    assert all("compute_s" in t and "comm_s" in t for t in rep["per_token"])
    st = TensorStore.from_model_dir(model_dir)
    ref = generate(Device(st, ResidentSource(st), 16).step, [1, 2, 3], 4, max_seq=16)
    assert rep["tokens"] == ref.tokens


def test_cli_listen_and_remote_workers(hf_models, tmp_path):
    """`tpi shard` + `tpi generate --listen` + `tpi worker` processes, authenticated with a secret file."""
    model_dir, _ = hf_models("wide")
    shards = tmp_path / "shards"
    subprocess.run([sys.executable, "-m", "tpicore", "shard", "--model", model_dir, "--devices", "3",
                    "--out", str(shards)], check=True, capture_output=True, timeout=120)
    secret = tmp_path / "secret"
    secret.write_bytes(os.urandom(32).hex().encode())
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    master = subprocess.Popen([sys.executable, "-m", "tpicore", "generate", "--shards", str(shards), "--devices", "3",
                               "--listen", f"127.0.0.1:{port}", "--secret-file", str(secret), "--prompt-ids",
                               "1,2,3", "--max-new-tokens", "4", "--json", "--timeout-s", "30"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    workers = [subprocess.Popen([sys.executable, "-m", "tpicore", "worker", "--rank", str(r), "--master",
                                 f"127.0.0.1:{port}", "--shards", str(shards), "--secret-file", str(secret)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in (1, 2)]
    # a stranger with the wrong secret is refused and cannot join
    bad = tmp_path / "bad"
    bad.write_bytes(b"x" * 32)
    out, err = master.communicate(timeout=120)
    assert master.returncode == 0, err
    for w in workers:
        w.wait(timeout=30)
        assert w.returncode == 0, w.stderr.read()
    st = TensorStore.from_model_dir(model_dir)
    ref = generate(Device(st, ResidentSource(st), 16).step, [1, 2, 3], 4, max_seq=16)
    assert json.loads(out)["tokens"] == ref.tokens


def test_worker_with_wrong_secret_is_refused(hf_models, tmp_path):
    model_dir, _ = hf_models("wide")
    shards = tmp_path / "shards"
    subprocess.run([sys.executable, "-m", "tpicore", "shard", "--model", model_dir, "--devices", "2",
                    "--out", str(shards)], check=True, capture_output=True, timeout=120)
    good, bad = tmp_path / "good", tmp_path / "bad"
    good.write_bytes(b"a" * 32)
    bad.write_bytes(b"b" * 32)
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    master = subprocess.Popen([sys.executable, "-m", "tpicore", "generate", "--shards", str(shards), "--devices", "2",
                               "--listen", f"127.0.0.1:{port}", "--secret-file", str(good), "--prompt-ids", "1,2",
                               "--max-new-tokens", "2", "--timeout-s", "6"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    time.sleep(1.0)
    w = subprocess.run([sys.executable, "-m", "tpicore", "worker", "--rank", "1", "--master", f"127.0.0.1:{port}",
                        "--shards", str(shards), "--secret-file", str(bad), "--timeout-s", "5"],
                       capture_output=True, text=True, timeout=60)
    assert w.returncode == 2 and "error:" in w.stderr, w.stderr
    assert "secret" in w.stderr.lower() or "auth" in w.stderr.lower(), w.stderr
    _, err = master.communicate(timeout=60)
    assert master.returncode == 2 and "rank 1" in err and "Traceback" not in err
