"""Addresses and raw TCP sockets: listen, connect (retrying until a deadline), parse, tell loopback apart.

Owns socket creation and address handling; speaks no protocol (handshake.py, channel.py) and keeps no
group state (group.py).
"""

from __future__ import annotations

import ipaddress
import socket
import time

from tpicore.errors import TpiError


def open_listener(host: str = "127.0.0.1", port: int = 0, backlog: int = 128) -> socket.socket:
    """A listening TCP socket (port 0 = ephemeral; read the real one from `getsockname()`)."""
    host = host.strip("[]")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    if not 0 <= port <= 65535:
        raise TpiError(f"cannot listen on {host}:{port}: port must be in 0..65535")
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(backlog)
    except OSError as e:
        sock.close()
        raise TpiError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock


def tune(sock: socket.socket) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # tiny frames must not wait for Nagle


def connect(addr: tuple[str, int], deadline: float, peer: str) -> socket.socket:
    """Connect, retrying refused/unreachable attempts until the deadline (the peer may not listen yet)."""
    delay = 0.01
    while True:
        remaining = deadline - time.monotonic()
        try:
            sock = socket.create_connection(addr, timeout=max(remaining, 0.01))
            tune(sock)
            return sock
        except OSError as e:
            if time.monotonic() + delay >= deadline:
                raise TpiError(f"could not reach {peer} at {addr[0]}:{addr[1]}: {e.strerror or e}") from None
            time.sleep(delay)
            delay = min(delay * 2, 0.25)


def parse_addr(addr: str | tuple[str, int]) -> tuple[str, int]:
    """("host", port) from "host:port", "[v6]:port" or a tuple; TpiError otherwise."""
    if isinstance(addr, tuple):
        return addr[0], int(addr[1])
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise TpiError(f"bad master address {addr!r}: expected host:port")
    return host.strip("[]") or "127.0.0.1", int(port)


def is_loopback(host: str) -> bool:
    """True only if every address `host` names is a loopback address (127.0.0.0/8, ::1).

    Names are resolved: "localhost" is loopback, "127.lan.example" is whatever it resolves to. A name
    that does not resolve, or an unspecified address (0.0.0.0, ::), is not loopback.
    """
    host = host.strip().strip("[]")
    if not host:
        return False
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except (OSError, UnicodeError):
        return False
    addrs = {info[4][0] for info in infos}
    try:
        return bool(addrs) and all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addrs)
    except ValueError:
        return False
