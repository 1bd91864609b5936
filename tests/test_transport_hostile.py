"""Hostile peers on the master's listener and on the workers' mesh ports: the real group still forms.

Every stalling peer below is held open for the whole rendezvous. Handshakes served one at a time would
spend the whole handshake deadline (here the group's timeout) on each of them, so the group forming at
all, with several of them queued ahead of the real workers, is the check that handshakes run
concurrently and are bounded; the time it took is printed, not asserted.
"""

from __future__ import annotations

import logging
import socket
import threading
import time

import numpy as np
import pytest

from tpicore.comm import group as group_mod
from tpicore.comm.admission import RefusalLog
from tpicore.comm.channel import recv_frame, send_frame
from tpicore.comm.collectives import allreduce
from tpicore.comm.endpoint import open_listener
from tpicore.comm.frame import (
    PROTOCOL_VERSION,
    DType,
    Kind,
    json_payload,
    pack_header,
    parse_json,
)
from tpicore.comm.group import Group
from tpicore.errors import TpiError

SECRET = b"hostile-test-secret-0123456789ab"
TIMEOUT_S = 6.0  # also each handshake's deadline: four stalls served in turn would need 24 s
STALLS = 4


class Hostiles:
    """Connections a hostile client opens and holds until `close()`."""

    def __init__(self) -> None:
        self.socks: list[socket.socket] = []
        self.stop = threading.Event()
        self.threads: list[threading.Thread] = []

    def connect(self, addr) -> socket.socket:
        s = socket.create_connection(addr, timeout=5)
        self.socks.append(s)
        return s

    def idle(self, addr) -> None:
        self.connect(addr)

    def partial(self, addr) -> None:
        self.connect(addr).sendall(pack_header(Kind.HELLO, DType.U8, (100,), src=1, tag=0, nbytes=100)[:20])

    def hello_then_silent(self, addr) -> None:
        hello = json_payload({"version": PROTOCOL_VERSION, "rank": 1, "nonce": "ab" * 32})
        send_frame(self.connect(addr), Kind.HELLO, hello, src=1)

    def drip(self, addr) -> None:
        """A slow-loris: one byte of a valid HELLO every 0.2 s, never finishing within the deadline."""
        s = self.connect(addr)
        hello = json_payload({"version": PROTOCOL_VERSION, "rank": 1, "nonce": "ab" * 32})
        data = pack_header(Kind.HELLO, DType.U8, hello.shape, src=1, tag=0, nbytes=hello.nbytes) + hello.tobytes()

        def run() -> None:
            for b in data:
                if self.stop.wait(0.2):
                    return
                try:
                    s.send(bytes([b]))
                except OSError:
                    return

        t = threading.Thread(target=run, daemon=True)
        t.start()
        self.threads.append(t)

    def garbage(self, addr) -> None:
        s = self.connect(addr)
        try:
            s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" * 3)
        except OSError:
            pass

    def close(self) -> None:
        self.stop.set()
        for s in self.socks:
            s.close()


def form_group(n: int, before_workers, *, mesh: bool = True) -> tuple[list[Group], float]:
    """Start the master's listener, let `before_workers(addr)` attack it, then bring up ranks 0..n-1."""
    lst = open_listener()
    addr = lst.getsockname()[:2]
    before_workers(addr)
    workers: dict = {}

    def join(r: int) -> None:
        try:
            workers[r] = Group.worker(r, addr, world_size=n, secret=SECRET, fingerprint="fp", timeout_s=TIMEOUT_S)
        except Exception as e:
            workers[r] = e

    t0 = time.monotonic()
    threads = [threading.Thread(target=join, args=(r,), daemon=True) for r in range(1, n)]
    for t in threads:
        t.start()
    master = Group.master(n, listener=lst, secret=SECRET, fingerprint="fp", timeout_s=TIMEOUT_S, mesh=mesh)
    for t in threads:
        t.join(TIMEOUT_S + 5)
    took = time.monotonic() - t0
    groups = [master] + [workers[r] for r in range(1, n)]
    for g in groups:
        if isinstance(g, Exception):
            raise g
    return groups, took


def check_allreduce(groups: list[Group], algo: str) -> None:
    out: list = [None] * len(groups)

    def run(g: Group) -> None:
        try:
            out[g.rank] = allreduce(g, np.full(1000, g.rank + 1, np.float32), algo)
        except Exception as e:
            out[g.rank] = e

    threads = [threading.Thread(target=run, args=(g,)) for g in groups]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    want = sum(range(1, len(groups) + 1))
    for r, x in enumerate(out):
        assert not isinstance(x, Exception), (r, x)
        assert np.all(x == want), r
    for g in groups:
        g.close()


@pytest.mark.parametrize("how", ["idle", "partial", "hello_then_silent", "drip", "garbage"])
def test_stalling_peers_on_the_masters_listener_do_not_delay_the_group(how):
    hostile = Hostiles()
    try:
        groups, took = form_group(4, lambda addr: [getattr(hostile, how)(addr) for _ in range(STALLS)])
        print(f"{STALLS} x {how} on the master's listener: group of 4 formed in {took:.2f} s "
              f"(timeout {TIMEOUT_S} s)")
        check_allreduce(groups, "ring")
    finally:
        hostile.close()


@pytest.mark.parametrize("how", ["idle", "hello_then_silent"])
def test_stalling_peers_on_the_workers_mesh_ports_do_not_delay_the_group(how, monkeypatch):
    """Every worker's mesh listener gets its own stalls the moment it opens (before its peers connect)."""
    hostile = Hostiles()
    real_open = group_mod.open_listener

    def open_and_attack(host: str, port: int) -> socket.socket:
        lst = real_open(host, port)
        for _ in range(STALLS):
            getattr(hostile, how)(lst.getsockname()[:2])
        return lst

    monkeypatch.setattr(group_mod, "open_listener", open_and_attack)
    try:
        groups, took = form_group(4, lambda addr: None)
        print(f"{STALLS} x {how} on each mesh port: group of 4 formed in {took:.2f} s")
        assert len(hostile.socks) == 3 * STALLS  # ranks 1..3 each opened a mesh listener
        check_allreduce(groups, "tree")
    finally:
        hostile.close()


def test_a_flood_of_connections_while_workers_join(caplog):
    """300 connections (idle and garbage, past the cap of pending handshakes) opened while the workers join:
    the oldest pending are evicted, evicted real workers retry, and the master logs one warning."""
    hostile = Hostiles()
    flood_done = threading.Event()

    def open_some(addr, count: int) -> None:
        for i in range(count):
            try:
                (hostile.idle if i % 2 else hostile.garbage)(addr)
            except OSError:
                pass

    def flood(addr) -> None:
        open_some(addr, 100)  # already past the cap before any worker starts

        def run() -> None:
            open_some(addr, 200)
            flood_done.set()

        threading.Thread(target=run, daemon=True).start()

    caplog.set_level(logging.WARNING, logger="tpicore.comm.admission")
    try:
        groups, took = form_group(4, flood)
        print(f"group of 4 formed in {took:.2f} s during a flood of 300 connections")
        check_allreduce(groups, "star")
        flood_done.wait(30)
    finally:
        hostile.close()
    master_warnings = [r for r in caplog.records if r.getMessage().startswith("master refused")]
    assert len(master_warnings) <= 1, [r.getMessage() for r in master_warnings]


def test_refusals_are_logged_once_per_host_then_rate_limited(caplog):
    caplog.set_level(logging.WARNING, logger="tpicore.comm.admission")
    log = RefusalLog("master", interval_s=0.2)
    for i in range(50):
        log.note("10.0.0.1", f"bad peer {i}")
    log.note("10.0.0.2", "other host")
    time.sleep(0.25)
    log.note("10.0.0.1", "after the interval")
    msgs = [r.getMessage() for r in caplog.records]
    assert msgs == ["master refused a peer: bad peer 0", "master refused a peer: other host",
                    "master refused a peer: after the interval (49 more refusals from 10.0.0.1 since the "
                    "last warning)"]
    assert log.last == "after the interval"


# --- nothing about the model before authentication


def _handshake_as_stranger(addr, *, world_size: int, fingerprint: str) -> tuple[str, bytes]:
    """HELLO, then an AUTH that is not sealed with the secret: returns the refusal and every byte received."""
    received = bytearray()
    with socket.create_connection(addr, timeout=5) as s:
        hello = json_payload({"version": PROTOCOL_VERSION, "rank": 1, "nonce": "cd" * 32})
        send_frame(s, Kind.HELLO, hello, src=1)
        hdr, challenge = recv_frame(s)
        received += challenge.tobytes()
        assert hdr.kind == Kind.CHALLENGE and parse_json(challenge)["secret"] is True
        auth = json_payload({"world_size": world_size, "fingerprint": fingerprint, "sealed": True, "listen": None})
        send_frame(s, Kind.AUTH, auth, src=1)
        hdr, reply = recv_frame(s)
        received += reply.tobytes()
        assert hdr.kind == Kind.ERROR
        return parse_json(reply)["reason"], bytes(received)


def test_an_unauthenticated_peer_learns_nothing_about_the_model():
    lst = open_listener()
    addr = lst.getsockname()[:2]
    fingerprint = "llama-7b-sha256-0123456789abcdef"
    out: dict = {}

    def master() -> None:
        try:
            out["g"] = Group.master(3, listener=lst, secret=SECRET, fingerprint=fingerprint, timeout_s=3.0)
        except TpiError as e:
            out["g"] = e

    t = threading.Thread(target=master, daemon=True)
    t.start()
    reason, received = _handshake_as_stranger(addr, world_size=2, fingerprint="guess")
    assert reason.startswith("authentication failed for rank 1") and reason.endswith("wrong shared secret")
    assert fingerprint.encode() not in received and b"world" not in received and b"llama" not in received
    t.join(10)
    assert isinstance(out["g"], TpiError) and "wrong shared secret" in str(out["g"])


def test_without_a_secret_a_refusal_names_only_the_joiners_own_values():
    """Loopback without a secret authenticates nobody, so refusals never echo the master's values."""
    lst = open_listener()
    addr = lst.getsockname()[:2]
    t = threading.Thread(target=lambda: pytest.raises(TpiError, Group.master, 3, listener=lst,
                                                      fingerprint="the-real-model", timeout_s=3.0), daemon=True)
    t.start()
    for kw, shown in [(dict(world_size=2, fingerprint="the-real-model"), "has world_size 2"),
                      (dict(world_size=3, fingerprint="another-model"), "has 'another-model'")]:
        with pytest.raises(TpiError) as info:
            Group.worker(1, addr, timeout_s=3.0, **kw)
        assert shown in str(info.value)
        assert "the-real-model" not in str(info.value) and "rank 0 has" not in str(info.value)
    t.join(10)
