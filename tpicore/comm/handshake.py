"""The handshake on one fresh connection: who the peer is, whether it knows the secret, the frame keys.

Owns the four handshake messages and every refusal. Runs on a bare socket with plain frames
(channel.py's send_frame/recv_frame); returns what a Channel needs. Does not accept connections or
keep deadlines (admission.py), and knows the model only as an opaque fingerprint string.

    joiner (connects)                                       acceptor (listens)
      HELLO {version, rank, nonce_j}              ------->  version check (refused by name if other)
                                                  <-------  CHALLENGE {nonce_a, secret: bool}
      keys = HKDF(secret, nonce_j|nonce_a, HELLO|CHALLENGE)      (seal.py; both sides, secret only)
      AUTH box{world_size, fingerprint, listen, sealed} ---->  open: fails = wrong secret (plain ERROR)
                                                            check world size, fingerprint, rank, sealed
                                                  <-------  WELCOME box{rank}, or ERROR box{reason}
      open: fails = acceptor does not know the secret

A "box" is a plain frame flagged BOXED whose payload is AEAD-sealed with the direction's key (frame 0
of that direction; the kind and sender are its associated data). Opening the peer's box is the proof
that it knows the secret, both ways; the nonces make every box single-use, so a recorded handshake
cannot be replayed. Nothing about the model leaves the acceptor before the joiner has proved the
secret: fingerprints and world sizes travel inside boxes, and refusals to an unauthenticated peer
(no secret configured) name only the joiner's own values. Without a secret (loopback only) AUTH and
WELCOME are plain JSON and nothing is authenticated.
"""

from __future__ import annotations

import os
import socket
import struct
from dataclasses import dataclass
from typing import Callable

import numpy as np

from tpicore.comm.channel import SMALL_FRAME_NBYTES, recv_frame, send_frame
from tpicore.comm.frame import (
    BOXED,
    PROTOCOL_VERSION,
    Header,
    Kind,
    ProtocolError,
    VersionMismatch,
    json_payload,
    parse_json,
)
from tpicore.comm.seal import (
    NONCE_NBYTES,
    PART_BOX,
    FrameCipher,
    Opener,
    Sealer,
    TamperedFrame,
    derive_keys,
)
from tpicore.errors import TpiError

_AAD = struct.Struct("<BH")  # a box's associated data: frame kind, sender rank


class Refused(TpiError):
    """This end refused the peer (the peer was told why, as far as it may know)."""


class Mismatch(Refused):
    """A refusal for other terms (world size, model fingerprint, encryption) after a well-formed AUTH: the peer
    is a rank of a differently set-up group; it was told why and reports it as its own error line, so this
    end records it for its own timeout message instead of warning (admission.py)."""


@dataclass(frozen=True)
class Terms:
    """What both ends of a link must agree on; `sealed` = encrypt every frame after the handshake."""

    world_size: int
    fingerprint: str
    sealed: bool


@dataclass(frozen=True)
class Admitted:
    """An accepted joiner: its rank, its mesh listen address (workers joining the master), its cipher."""

    rank: int
    listen: tuple[str, int] | None
    cipher: FrameCipher | None


# A claim on a rank: returns None when granted, else the reason it is refused. Release undoes it.
Claim = Callable[[int], "str | None"]


def _send(sock: socket.socket, kind: int, obj: dict, src: int, peer: str, box: Sealer | None = None) -> None:
    data = json_payload(obj)
    if box is not None:
        data = np.frombuffer(box.seal(PART_BOX, data.tobytes(), _AAD.pack(kind, src)), np.uint8)
        box.advance()
    send_frame(sock, kind, data, src=src, flags=BOXED if box is not None else 0, peer=peer)


def _recv(sock: socket.socket, peer: str, *, any_version: bool = False) -> tuple[Header, np.ndarray]:
    return recv_frame(sock, max_nbytes=SMALL_FRAME_NBYTES, peer=peer, any_version=any_version)


def _open(hdr: Header, payload: np.ndarray, peer: str, opener: Opener | None) -> dict:
    """The JSON of a handshake frame: plain, or a box opened with `opener` (TamperedFrame if it fails)."""
    if opener is None:
        if hdr.flags & BOXED:
            raise ProtocolError(f"{peer} sent a sealed {Kind(hdr.kind).name} where none was agreed")
        return parse_json(payload, peer)
    if not hdr.flags & BOXED:
        raise TamperedFrame(f"{peer} sent a plain {Kind(hdr.kind).name} where a sealed one was required")
    plain = opener.open(PART_BOX, payload.tobytes(), _AAD.pack(hdr.kind, hdr.src))
    opener.advance()
    return parse_json(plain, peer)


def _refuse(sock: socket.socket, my_rank: int, reason: str, peer_reason: str | None = None,
            box: Sealer | None = None, kind: type[Refused] = Refused) -> Refused:
    """Tell the peer why (best effort; `peer_reason` when it may know less) and return the local error."""
    try:
        _send(sock, Kind.ERROR, {"reason": peer_reason or reason, "error": "TpiError"}, my_rank, "peer", box)
    except (TpiError, OSError):
        pass
    return kind(reason)


def _field(msg: dict, name: str, typ: type, what: str) -> object:
    value = msg.get(name)
    if type(value) is not typ:
        raise ProtocolError(f"malformed {what}: field '{name}' must be {typ.__name__}, got {value!r}")
    return value


def _listen_addr(value: object, who: str) -> tuple[str, int] | None:
    if value is None:
        return None
    if not (isinstance(value, list) and len(value) == 2 and isinstance(value[0], str) and type(value[1]) is int
            and 0 < value[1] < 65536 and len(value[0]) <= 255):
        raise ProtocolError(f"malformed AUTH from {who}: bad listen address {value!r}")
    return value[0], value[1]


def accept_peer(sock: socket.socket, *, my_rank: int, terms: Terms, secret: bytes | None, claim: Claim,
                release: Callable[[int], None], peer: str) -> Admitted:
    """Acceptor side; returns the admitted joiner. Refused (peer told why) or another TpiError otherwise."""
    try:
        hdr, payload = _recv(sock, peer, any_version=True)
    except VersionMismatch as e:  # unreadable header of another version
        raise _refuse(sock, my_rank, f"protocol version mismatch: {peer} speaks version {e.version}, "
                                     f"rank {my_rank} speaks {PROTOCOL_VERSION}") from None
    if hdr.kind != Kind.HELLO:
        raise _refuse(sock, my_rank, f"{peer} sent {Kind(hdr.kind).name} instead of HELLO")
    hello = parse_json(payload, peer)
    hello_bytes = payload.tobytes()
    rank = hello.get("rank")
    who = f"rank {rank} ({peer})" if type(rank) is int else peer
    version = hello.get("version", hdr.version)
    if hdr.version != PROTOCOL_VERSION or version != PROTOCOL_VERSION:
        raise _refuse(sock, my_rank, f"protocol version mismatch: {who} speaks version "
                                     f"{version if hdr.version == PROTOCOL_VERSION else hdr.version}, "
                                     f"rank {my_rank} speaks {PROTOCOL_VERSION}")
    try:
        rank = _field(hello, "rank", int, f"HELLO from {peer}")
        nonce_j = bytes.fromhex(str(_field(hello, "nonce", str, f"HELLO from {peer}")))
        if len(nonce_j) != NONCE_NBYTES:
            raise ValueError(f"nonce of {len(nonce_j)} bytes, expected {NONCE_NBYTES}")
    except (ProtocolError, ValueError) as e:
        raise _refuse(sock, my_rank, f"malformed HELLO from {who}: {e}") from None
    nonce_a = os.urandom(NONCE_NBYTES)
    challenge = json_payload({"nonce": nonce_a.hex(), "secret": secret is not None})
    send_frame(sock, Kind.CHALLENGE, challenge, src=my_rank, peer=peer)
    cipher = None
    if secret is not None:
        keys = derive_keys(secret, nonce_j, nonce_a, hello_bytes + challenge.tobytes())
        cipher = FrameCipher.for_acceptor(keys, who)
    ahdr, apayload = _recv(sock, who)
    if ahdr.kind == Kind.ERROR and not ahdr.flags & BOXED:
        raise Refused(f"{who} gave up authenticating: {parse_json(apayload, who).get('reason')}")
    if ahdr.kind != Kind.AUTH:
        raise _refuse(sock, my_rank, f"{who} sent {Kind(ahdr.kind).name} instead of AUTH")
    try:
        auth = _open(ahdr, apayload, who, cipher.opener if cipher else None)
    except TamperedFrame:
        raise _refuse(sock, my_rank, f"authentication failed for {who}: wrong shared secret") from None
    box = cipher.sealer if cipher else None
    try:
        peer_world = _field(auth, "world_size", int, f"AUTH from {who}")
        peer_fp = _field(auth, "fingerprint", str, f"AUTH from {who}")
        sealed = _field(auth, "sealed", bool, f"AUTH from {who}")
        listen = _listen_addr(auth.get("listen"), who)
    except ProtocolError as e:
        raise _refuse(sock, my_rank, str(e), box=box) from None
    mine = secret is not None  # our own values only to a peer that proved the secret
    if peer_world != terms.world_size:
        raise _refuse(sock, my_rank, f"world size mismatch: {who} has world_size {peer_world}, "
                                     f"rank {my_rank} has {terms.world_size}",
                      None if mine else f"world size mismatch: {who} has world_size {peer_world}", box,
                      Mismatch)
    if peer_fp != terms.fingerprint:
        raise _refuse(sock, my_rank, f"model fingerprint mismatch: {who} has {peer_fp!r}, "
                                     f"rank {my_rank} has {terms.fingerprint!r}",
                      None if mine else f"model fingerprint mismatch: {who} has {peer_fp!r}", box,
                      Mismatch)
    if sealed != terms.sealed:
        raise _refuse(sock, my_rank, f"encryption mismatch: {who} wants {'sealed' if sealed else 'plain'} "
                                     f"frames, rank {my_rank} {'sealed' if terms.sealed else 'plain'} ones",
                      box=box, kind=Mismatch)
    if not 1 <= rank < terms.world_size:
        raise _refuse(sock, my_rank, f"rank {rank} out of range: expected 1..{terms.world_size - 1}", box=box)
    why = claim(rank)
    if why is not None:
        raise _refuse(sock, my_rank, why, box=box)
    try:
        _send(sock, Kind.WELCOME, {"rank": my_rank}, my_rank, who, box)
    except BaseException:
        release(rank)
        raise
    return Admitted(rank, listen, cipher if sealed else None)


def join_peer(sock: socket.socket, *, rank: int, terms: Terms, secret: bytes | None, expect_rank: int,
              listen: tuple[str, int] | None) -> FrameCipher | None:
    """Joiner side; returns the cipher for the new channel (None: plain frames). TpiError on refusal."""
    peer = f"rank {expect_rank}"
    nonce_j = os.urandom(NONCE_NBYTES)
    hello = json_payload({"version": PROTOCOL_VERSION, "rank": rank, "nonce": nonce_j.hex()})
    send_frame(sock, Kind.HELLO, hello, src=rank, peer=peer)
    hdr, payload = _recv(sock, peer)
    msg = parse_json(payload, peer)
    if hdr.kind == Kind.ERROR:
        raise TpiError(f"{peer} refused rank {rank}: {msg.get('reason', 'no reason given')}")
    if hdr.kind != Kind.CHALLENGE:
        raise ProtocolError(f"{peer} sent {Kind(hdr.kind).name} during the handshake")
    try:
        nonce_a = bytes.fromhex(str(msg.get("nonce", "")))
    except ValueError:
        nonce_a = b""
    if len(nonce_a) != NONCE_NBYTES or type(msg.get("secret")) is not bool:
        raise ProtocolError(f"{peer} sent a malformed CHALLENGE")
    if msg["secret"] and secret is None:
        _refuse(sock, rank, f"rank {rank} has no shared secret")
        raise TpiError(f"{peer} requires a shared secret and rank {rank} has none")
    if secret is not None and not msg["secret"]:
        _refuse(sock, rank, f"rank {expect_rank} did not prove the shared secret to rank {rank}")
        raise TpiError(f"{peer} did not prove the shared secret; refusing to trust it")
    cipher = None
    if secret is not None:
        cipher = FrameCipher.for_joiner(derive_keys(secret, nonce_j, nonce_a, hello.tobytes() + payload.tobytes()),
                                        peer)
    auth = {"world_size": terms.world_size, "fingerprint": terms.fingerprint, "sealed": terms.sealed,
            "listen": list(listen) if listen else None}
    _send(sock, Kind.AUTH, auth, rank, peer, cipher.sealer if cipher else None)
    hdr, payload = _recv(sock, peer)
    if hdr.kind == Kind.ERROR and not hdr.flags & BOXED:  # refused before (or for failing) authentication
        raise TpiError(f"{peer} refused rank {rank}: {parse_json(payload, peer).get('reason', 'no reason given')}")
    try:
        reply = _open(hdr, payload, peer, cipher.opener if cipher else None)
    except TamperedFrame:
        _refuse(sock, rank, f"rank {expect_rank} did not prove the shared secret to rank {rank}")
        raise TpiError(f"{peer} did not prove the shared secret; refusing to trust it") from None
    if hdr.kind == Kind.ERROR:
        raise TpiError(f"{peer} refused rank {rank}: {reply.get('reason', 'no reason given')}")
    if hdr.kind != Kind.WELCOME:
        raise ProtocolError(f"{peer} sent {Kind(hdr.kind).name} during the handshake")
    if reply.get("rank") != expect_rank:
        raise TpiError(f"expected rank {expect_rank} at this address, found rank {reply.get('rank')}")
    return cipher if terms.sealed else None
