"""The frame format, as bytes: header layout, its validation, the timestamp extension, JSON payloads.

Owns every byte layout that crosses the wire and the checks that refuse a malformed one. Bytes in, bytes
out: no sockets (channel.py), no keys (seal.py), nothing about ranks or handshakes. Never pickles: a
payload is the C-contiguous bytes of an array, or UTF-8 JSON for control frames.

A plain frame is a 40-byte header (little-endian, struct "<4sHBBBBHI4IQ"), then the optional timestamp
extension, then the payload:

    offset size field    meaning
         0    4 magic    b"TPI1"
         4    2 version  PROTOCOL_VERSION
         6    1 kind     Kind (HELLO, CHALLENGE, AUTH, WELCOME, TENSOR, BCAST, CONTROL, ERROR, BYE)
         7    1 dtype    DType code (f32, f16, bf16 as raw u16, i32, i64, u8)
         8    1 ndim     0..4
         9    1 flags    bit 0 STAMPED: the 16-byte extension follows; bit 1 BOXED: the payload is an
                         AEAD box (handshake frames only); other bits must be 0
        10    2 src      sender's rank
        12    4 tag      collective sequence number (or 0)
        16   16 shape    4 x u32; dims past ndim are 0
        32    8 nbytes   payload length = prod(shape) * itemsize

    extension (STAMPED only; the emulator's link hook, real runs never send it): "<dd" t_send, t_deliver

After an encrypting handshake a frame travels sealed (seal.py), in two AEAD messages:

    [ header (40) + tag (16) ] [ extension? + payload + tag (16) ]     second part absent when empty

so kind, shape, tag and the emulator's timestamps are as private as the payload, and the header is
authenticated before a payload-sized buffer is used. `wire_nbytes` is what one frame costs on a real
link (extension excluded): what the link hook charges.

Payloads are the host's native byte order; every supported host is little-endian.
"""

from __future__ import annotations

import enum
import json
import math
import struct
from typing import NamedTuple, Sequence

import ml_dtypes
import numpy as np

from tpicore.errors import TpiError

MAGIC = b"TPI1"
PROTOCOL_VERSION = 2  # 1: 56-byte header with timestamps in every frame, no encryption
MAX_NDIM = 4
DEFAULT_MAX_NBYTES = 1 << 30  # 1 GiB: far above any activation, well below "allocate the whole RAM"
HEADER = struct.Struct("<4sHBBBBHI4IQ")
HEADER_NBYTES = HEADER.size  # 40
STAMPS = struct.Struct("<dd")
STAMPS_NBYTES = STAMPS.size  # 16
TAG_NBYTES = 16  # Poly1305 tag per sealed part

STAMPED = 0x01
BOXED = 0x02
_KNOWN_FLAGS = STAMPED | BOXED


class CommError(TpiError):
    """A failure of the link to a peer. `reason` is the root cause, forwarded unchanged to other ranks."""

    def __init__(self, message: str, reason: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason if reason is not None else message
        self.peer_rank: int | None = None  # the rank at the other end of the link that failed, when known

    def at(self, peer_rank: int) -> "CommError":
        """This error, marked as the failure of the link to `peer_rank` (the first mark stays)."""
        if self.peer_rank is None:
            self.peer_rank = peer_rank
        return self


class ProtocolError(CommError):
    """A frame that breaks the protocol: bad magic/version/kind/dtype/shape/length, or unexpected content."""


class VersionMismatch(ProtocolError):
    """A well-formed header of another protocol version (the handshake refuses such a peer politely)."""

    def __init__(self, message: str, version: int = 0) -> None:
        super().__init__(message)
        self.version = version


class Kind(enum.IntEnum):
    HELLO = 1  # joiner -> acceptor: version, rank, nonce (JSON; nothing about the model)
    CHALLENGE = 2  # acceptor -> joiner: nonce, whether a secret is required (JSON)
    AUTH = 3  # joiner -> acceptor: world size, fingerprint, listen address (JSON, boxed with a secret)
    WELCOME = 4  # acceptor -> joiner: accepted (JSON, boxed with a secret)
    TENSOR = 5  # allreduce traffic
    BCAST = 6  # broadcast traffic
    CONTROL = 7  # anything else that is JSON (peer addresses, ready)
    ERROR = 8  # {"reason": ..., "error": class name}; the receiver raises it
    BYE = 9  # orderly goodbye


class DType(enum.IntEnum):
    F32 = 1
    F16 = 2
    BF16 = 3  # raw 16-bit patterns; decoded as ml_dtypes.bfloat16
    I32 = 4
    I64 = 5
    U8 = 6


_NUMPY_BY_CODE: dict[int, np.dtype] = {
    DType.F32: np.dtype(np.float32), DType.F16: np.dtype(np.float16), DType.BF16: np.dtype(ml_dtypes.bfloat16),
    DType.I32: np.dtype(np.int32), DType.I64: np.dtype(np.int64), DType.U8: np.dtype(np.uint8)}
_CODE_BY_DTYPE: dict[np.dtype, DType] = {dt: DType(code) for code, dt in _NUMPY_BY_CODE.items()}
_ITEMSIZE = {code: dt.itemsize for code, dt in _NUMPY_BY_CODE.items()}
_KINDS = frozenset(int(k) for k in Kind)


class Header(NamedTuple):
    kind: int
    dtype: int
    shape: tuple[int, ...]
    src: int
    tag: int
    nbytes: int
    flags: int = 0
    version: int = PROTOCOL_VERSION


class Stamps(NamedTuple):
    """The link hook's timestamps of one frame; (0.0, 0.0) when the frame carries no extension."""

    t_send: float = 0.0
    t_deliver: float = 0.0


NO_STAMPS = Stamps()


def dtype_code(dtype: np.dtype) -> DType:
    """The wire code of a NumPy dtype; TpiError for anything the wire does not carry."""
    code = _CODE_BY_DTYPE.get(dtype)
    if code is None:
        raise TpiError(f"dtype {dtype} cannot be sent; expected one of "
                       f"{', '.join(dt.name for dt in _NUMPY_BY_CODE.values())}")
    return code


def numpy_dtype(code: int) -> np.dtype:
    """The NumPy dtype of a wire code (validated by `unpack_header` before this is called)."""
    return _NUMPY_BY_CODE[code]


def pack_header(kind: int, dtype: int, shape: Sequence[int], *, src: int, tag: int, nbytes: int, flags: int = 0,
                version: int = PROTOCOL_VERSION) -> bytes:
    """Build a header from raw fields (no validation: tests use this to forge bad frames)."""
    dims = list(shape) + [0] * (MAX_NDIM - len(shape))
    return HEADER.pack(MAGIC, version, kind, dtype, len(shape), flags, src, tag & 0xFFFFFFFF, *dims, nbytes)


def header_for(kind: int, arr: np.ndarray, *, src: int, tag: int, flags: int = 0) -> bytes:
    """The header that announces `arr` as the payload."""
    if arr.ndim > MAX_NDIM:
        raise TpiError(f"cannot send a {arr.ndim}-d array; the wire carries at most {MAX_NDIM} dimensions")
    return pack_header(kind, dtype_code(arr.dtype), arr.shape, src=src, tag=tag, nbytes=arr.nbytes, flags=flags)


def unpack_header(buf: bytes | bytearray | memoryview, max_nbytes: int = DEFAULT_MAX_NBYTES, *,
                  any_version: bool = False) -> Header:
    """Decode and validate a header; ProtocolError naming the bad field otherwise.

    Another version raises VersionMismatch unless `any_version` (the handshake reads a peer of another
    version as far as it can, to refuse it by name).
    """
    if len(buf) != HEADER_NBYTES:
        raise ProtocolError(f"header is {len(buf)} bytes, expected {HEADER_NBYTES}")
    fields = HEADER.unpack(buf)
    magic, version = fields[0], fields[1]
    if magic != MAGIC:
        raise ProtocolError(f"bad magic {bytes(magic)!r}, expected {MAGIC!r} (not a tpicore peer?)")
    if version == PROTOCOL_VERSION:
        return _checked(fields, max_nbytes)
    mismatch = VersionMismatch(f"protocol version {version}, expected {PROTOCOL_VERSION}", version)
    if not any_version:
        raise mismatch
    try:  # another version's header may not even parse in this layout
        return _checked(fields, max_nbytes)
    except ProtocolError:
        raise mismatch from None


def _checked(fields: tuple, max_nbytes: int) -> Header:
    (_, version, kind, dtype, ndim, flags, src, tag, d0, d1, d2, d3, nbytes) = fields
    if kind not in _KINDS:
        raise ProtocolError(f"unknown message kind {kind}")
    itemsize = _ITEMSIZE.get(dtype)
    if itemsize is None:
        raise ProtocolError(f"unknown dtype code {dtype}")
    if ndim > MAX_NDIM:
        raise ProtocolError(f"ndim {ndim} exceeds the maximum of {MAX_NDIM}")
    if flags & ~_KNOWN_FLAGS:
        raise ProtocolError(f"unknown flag bits {flags & ~_KNOWN_FLAGS:#04x}")
    dims = (d0, d1, d2, d3)
    if any(dims[ndim:]):
        raise ProtocolError(f"shape {dims} has non-zero dimensions past ndim {ndim}")
    shape = dims[:ndim]
    if math.prod(shape) * itemsize != nbytes:
        raise ProtocolError(f"payload of {nbytes} bytes does not match shape {shape} x {itemsize}-byte items")
    if nbytes > max_nbytes:
        raise ProtocolError(f"payload of {nbytes} bytes exceeds the limit of {max_nbytes} bytes")
    return Header(kind, dtype, shape, src, tag, nbytes, flags, version)


def pack_stamps(stamps: Stamps) -> bytes:
    return STAMPS.pack(stamps.t_send, stamps.t_deliver)


def unpack_stamps(buf: bytes | bytearray | memoryview) -> Stamps:
    """Decode the timestamp extension; ProtocolError for NaN, infinite or negative times."""
    t_send, t_deliver = STAMPS.unpack(buf)
    if not (math.isfinite(t_send) and math.isfinite(t_deliver)) or t_send < 0.0 or t_deliver < 0.0:
        raise ProtocolError(f"bad timestamps t_send={t_send} t_deliver={t_deliver}")
    return Stamps(t_send, t_deliver)


def wire_nbytes(payload_nbytes: int, sealed: bool) -> int:
    """Bytes one frame puts on a real link: header, payload, and the AEAD tags when sealed."""
    if not sealed:
        return HEADER_NBYTES + payload_nbytes
    return HEADER_NBYTES + TAG_NBYTES + payload_nbytes + (TAG_NBYTES if payload_nbytes else 0)


def contiguous(arr: np.ndarray) -> np.ndarray:
    """`arr` itself when C-contiguous, else a C-contiguous copy (np.ascontiguousarray would turn 0-d into 1-d)."""
    return arr if arr.flags.c_contiguous else arr.copy(order="C")


def payload_view(arr: np.ndarray) -> memoryview:
    """The bytes of a C-contiguous array, without a copy (0-d and bf16 arrays included)."""
    return memoryview(arr.reshape(-1).view(np.uint8))


def check_fits(hdr: Header, out: np.ndarray, peer: str = "peer") -> None:
    """ProtocolError unless the frame announced by `hdr` has exactly the shape and dtype of `out`."""
    if hdr.shape != out.shape or hdr.dtype != _CODE_BY_DTYPE.get(out.dtype):
        raise ProtocolError(f"{peer} sent shape {hdr.shape} {numpy_dtype(hdr.dtype)}, "
                            f"expected {out.shape} {out.dtype}")


def json_payload(obj: object) -> np.ndarray:
    """A JSON-able object as a u8 payload."""
    return np.frombuffer(json.dumps(obj, separators=(",", ":")).encode(), dtype=np.uint8)


def parse_json(payload: np.ndarray | bytes, peer: str = "peer") -> dict:
    """Decode a u8 JSON payload that must hold an object; ProtocolError otherwise."""
    if isinstance(payload, np.ndarray):
        if payload.dtype != np.uint8 or payload.ndim != 1:
            raise ProtocolError(f"{peer} sent a control payload of dtype {payload.dtype}, shape {payload.shape}; "
                                f"expected 1-d uint8 JSON")
        payload = payload.tobytes()
    try:
        obj = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise ProtocolError(f"{peer} sent invalid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise ProtocolError(f"{peer} sent JSON {type(obj).__name__}, expected an object")
    return obj
