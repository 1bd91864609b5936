"""Frame encryption: per-direction keys from the shared secret, and ChaCha20-Poly1305 with sequence nonces.

Owns the key schedule and the AEAD calls; bytes in, bytes out. Does not frame (frame.py), does not touch
sockets (channel.py) and does not decide when to seal (handshake.py, group.py).

    keys   = HKDF-SHA256(ikm = secret, salt = nonce_joiner | nonce_acceptor,
                         info = "tpicore v2 frame keys" | SHA-256(HELLO payload | CHALLENGE payload))
           -> 64 bytes: joiner->acceptor key, acceptor->joiner key
    nonce  = part (u32 LE) | sequence number (u64 LE)

Each direction counts its frames from 0 (0 is the handshake's boxed AUTH or WELCOME; data frames follow);
a frame's header and body are its parts 0 and 1, a handshake box part 2. A receiver only ever tries the
next sequence number, so a replayed, reordered, dropped or altered frame fails authentication and ends
the session (`TamperedFrame`). Both nonces are fresh per connection: no key is used on two connections.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from tpicore.comm.frame import TAG_NBYTES, ProtocolError

KEY_NBYTES = 32
NONCE_NBYTES = 32  # the handshake nonces (not the AEAD's 12-byte nonce)
PART_HEADER, PART_BODY, PART_BOX = 0, 1, 2
_NONCE = struct.Struct("<IQ")
_INFO = b"tpicore v2 frame keys"


class TamperedFrame(ProtocolError):
    """A sealed frame that fails authentication: altered, replayed, reordered, or sealed with another key."""


@dataclass(frozen=True)
class DirectionKeys:
    joiner_to_acceptor: bytes
    acceptor_to_joiner: bytes


def derive_keys(secret: bytes, nonce_joiner: bytes, nonce_acceptor: bytes, transcript: bytes) -> DirectionKeys:
    """Both directions' keys for one connection, bound to its handshake transcript."""
    okm = HKDF(algorithm=hashes.SHA256(), length=2 * KEY_NBYTES, salt=nonce_joiner + nonce_acceptor,
               info=_INFO + hashlib.sha256(transcript).digest()).derive(secret)
    return DirectionKeys(okm[:KEY_NBYTES], okm[KEY_NBYTES:])


class Sealer:
    """One direction's sending side: seals parts of frame `seq`, then `advance()` moves to the next frame."""

    def __init__(self, key: bytes) -> None:
        self._aead = ChaCha20Poly1305(key)
        self.seq = 0

    def seal(self, part: int, data: bytes | memoryview, aad: bytes | None = None) -> bytes:
        return self._aead.encrypt(_NONCE.pack(part, self.seq), data, aad)

    def seal_into(self, part: int, data: bytes | memoryview, out: memoryview | bytearray) -> None:
        """Ciphertext and tag into `out` (len(data) + TAG_NBYTES bytes), no allocation."""
        self._aead.encrypt_into(_NONCE.pack(part, self.seq), data, None, out)

    def advance(self) -> None:
        self.seq += 1


class Opener:
    """One direction's receiving side: opens parts of frame `seq` only (anything else is tampering)."""

    def __init__(self, key: bytes, peer: str = "peer") -> None:
        self._aead = ChaCha20Poly1305(key)
        self.seq = 0
        self.peer = peer

    def _tampered(self, part: int) -> TamperedFrame:
        what = ("header", "payload", "handshake message")[part]
        return TamperedFrame(f"the {what} of frame {self.seq} from {self.peer} failed authentication "
                             f"(altered, replayed, reordered or sealed with another key); ending the session")

    def open(self, part: int, box: bytes | memoryview, aad: bytes | None = None) -> bytes:
        if len(box) < TAG_NBYTES:
            raise self._tampered(part)
        try:
            return self._aead.decrypt(_NONCE.pack(part, self.seq), box, aad)
        except InvalidTag:
            raise self._tampered(part) from None

    def open_into(self, part: int, box: memoryview | bytearray, out: memoryview | bytearray) -> None:
        """Verify and decrypt `box` (len(out) + TAG_NBYTES bytes) into `out`."""
        try:
            self._aead.decrypt_into(_NONCE.pack(part, self.seq), box, None, out)
        except InvalidTag:
            raise self._tampered(part) from None

    def advance(self) -> None:
        self.seq += 1


@dataclass
class FrameCipher:
    """A channel's sealing state after the handshake: its own direction's Sealer, the peer's Opener."""

    sealer: Sealer
    opener: Opener

    @classmethod
    def for_joiner(cls, keys: DirectionKeys, peer: str) -> FrameCipher:
        return cls(Sealer(keys.joiner_to_acceptor), Opener(keys.acceptor_to_joiner, peer))

    @classmethod
    def for_acceptor(cls, keys: DirectionKeys, peer: str) -> FrameCipher:
        return cls(Sealer(keys.acceptor_to_joiner), Opener(keys.joiner_to_acceptor, peer))
