"""The wire format: one fixed binary header, then the raw bytes of one array.

Owns the frame layout, its validation, and the socket loops that move whole frames (`recv_exact`,
`recv_into`, `send_buffers`). Knows nothing of ranks, handshakes or collectives (that is transport.py),
and never pickles: a payload is the C-contiguous bytes of an array, or UTF-8 JSON for control frames.

Frame = header (56 bytes, little-endian, struct "<4sHHBB4IHIddQ") + payload (nbytes):

    offset size field      meaning
         0    4 magic      b"TPI1"
         4    2 version    PROTOCOL_VERSION
         6    2 kind       Kind (HELLO, CHALLENGE, AUTH, WELCOME, TENSOR, BCAST, CONTROL, ERROR, BYE)
         8    1 dtype      DType code (f32, f16, bf16 as raw u16, i32, i64, u8)
         9    1 ndim       0..4
        10   16 shape      4 x u32; dims past ndim are 0
        26    2 src        sender's rank
        28    4 tag        collective sequence number (or 0)
        32    8 t_send     link-hook clock when sent (0.0 = no hook)
        40    8 t_deliver  link-hook delivery deadline (0.0 = no hook)
        48    8 nbytes     payload length = prod(shape) * itemsize

Payloads are the host's native byte order; every supported host is little-endian.
"""

from __future__ import annotations

import enum
import json
import math
import socket
import struct
from typing import NamedTuple, Sequence

import numpy as np

from tpicore.errors import TpiError

MAGIC = b"TPI1"
PROTOCOL_VERSION = 1
MAX_NDIM = 4
DEFAULT_MAX_NBYTES = 1 << 30  # 1 GiB: far above any activation, well below "allocate the whole RAM"
HEADER = struct.Struct("<4sHHBB4IHIddQ")
HEADER_NBYTES = HEADER.size  # 56


class ProtocolError(TpiError):
    """A frame that breaks the protocol: bad magic/version/kind/dtype/shape/length, or unexpected content."""


class PeerLost(TpiError):
    """The peer closed or reset the connection."""


class PeerTimeout(TpiError):
    """The peer sent (or accepted) nothing for the whole timeout."""


class Kind(enum.IntEnum):
    HELLO = 1  # worker -> master: version, world size, rank, fingerprint (JSON)
    CHALLENGE = 2  # acceptor -> joiner: nonce to sign (JSON)
    AUTH = 3  # joiner -> acceptor: HMAC over the nonce and the HELLO (JSON)
    WELCOME = 4  # acceptor -> joiner: accepted, with the acceptor's own proof (JSON)
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


_CODE_BY_NAME = {"float32": DType.F32, "float16": DType.F16, "bfloat16": DType.BF16,
                 "int32": DType.I32, "int64": DType.I64, "uint8": DType.U8}
_ITEMSIZE = {DType.F32: 4, DType.F16: 2, DType.BF16: 2, DType.I32: 4, DType.I64: 8, DType.U8: 1}
_KINDS = frozenset(int(k) for k in Kind)
_NUMPY_BY_CODE: dict[int, np.dtype] = {}  # filled on first use (bf16 needs ml_dtypes)
_CODE_BY_DTYPE: dict[np.dtype, DType] = {}  # cache: dtype.name costs microseconds in NumPy 2


class Header(NamedTuple):
    kind: int
    dtype: int
    shape: tuple[int, ...]
    src: int
    tag: int
    t_send: float
    t_deliver: float
    nbytes: int
    version: int = PROTOCOL_VERSION


def dtype_code(dtype: np.dtype) -> DType:
    """The wire code of a NumPy dtype; TpiError for anything the wire does not carry."""
    code = _CODE_BY_DTYPE.get(dtype)
    if code is None:
        code = _CODE_BY_NAME.get(dtype.name)
        if code is None or not dtype.isnative:
            raise TpiError(f"dtype {dtype} cannot be sent; expected one of {', '.join(_CODE_BY_NAME)}")
        _CODE_BY_DTYPE[dtype] = code
    return code


def numpy_dtype(code: int) -> np.dtype:
    """The NumPy dtype of a wire code (validated by `unpack_header` before this is called)."""
    dt = _NUMPY_BY_CODE.get(code)
    if dt is None:
        if code == DType.BF16:
            import ml_dtypes  # only needed by peers that actually send bf16

            dt = np.dtype(ml_dtypes.bfloat16)
        else:
            dt = np.dtype({DType.F32: np.float32, DType.F16: np.float16, DType.I32: np.int32,
                           DType.I64: np.int64, DType.U8: np.uint8}[DType(code)])
        _NUMPY_BY_CODE[code] = dt
    return dt


def pack_header(kind: int, dtype: int, shape: Sequence[int], *, src: int, tag: int, nbytes: int,
                t_send: float = 0.0, t_deliver: float = 0.0, version: int = PROTOCOL_VERSION) -> bytes:
    """Build a header from raw fields (no validation: tests use this to forge bad frames)."""
    dims = list(shape) + [0] * (MAX_NDIM - len(shape))
    return HEADER.pack(MAGIC, version, kind, dtype, len(shape), *dims, src, tag & 0xFFFFFFFF,
                       t_send, t_deliver, nbytes)


def header_for(kind: int, arr: np.ndarray, *, src: int, tag: int,
               t_send: float = 0.0, t_deliver: float = 0.0) -> bytes:
    """The header that announces `arr` as the payload."""
    if arr.ndim > MAX_NDIM:
        raise TpiError(f"cannot send a {arr.ndim}-d array; the wire carries at most {MAX_NDIM} dimensions")
    return pack_header(kind, dtype_code(arr.dtype), arr.shape, src=src, tag=tag, nbytes=arr.nbytes,
                       t_send=t_send, t_deliver=t_deliver)


def unpack_header(buf: bytes | bytearray | memoryview, max_nbytes: int = DEFAULT_MAX_NBYTES, *,
                  any_version: bool = False) -> Header:
    """Decode and validate a header; ProtocolError naming the bad field otherwise.

    `any_version` lets the handshake read a peer of another version far enough to refuse it politely.
    """
    if len(buf) != HEADER_NBYTES:
        raise ProtocolError(f"header is {len(buf)} bytes, expected {HEADER_NBYTES}")
    (magic, version, kind, dtype, ndim, d0, d1, d2, d3, src, tag,
     t_send, t_deliver, nbytes) = HEADER.unpack(buf)
    if magic != MAGIC:
        raise ProtocolError(f"bad magic {bytes(magic)!r}, expected {MAGIC!r} (not a tpicore peer?)")
    if version != PROTOCOL_VERSION and not any_version:
        raise ProtocolError(f"protocol version {version}, expected {PROTOCOL_VERSION}")
    if kind not in _KINDS:
        raise ProtocolError(f"unknown message kind {kind}")
    itemsize = _ITEMSIZE.get(dtype)
    if itemsize is None:
        raise ProtocolError(f"unknown dtype code {dtype}")
    if ndim > MAX_NDIM:
        raise ProtocolError(f"ndim {ndim} exceeds the maximum of {MAX_NDIM}")
    dims = (d0, d1, d2, d3)
    if any(dims[ndim:]):
        raise ProtocolError(f"shape {dims} has non-zero dimensions past ndim {ndim}")
    shape = dims[:ndim]
    if math.prod(shape) * itemsize != nbytes:
        raise ProtocolError(f"payload of {nbytes} bytes does not match shape {shape} x {itemsize}-byte items")
    if nbytes > max_nbytes:
        raise ProtocolError(f"payload of {nbytes} bytes exceeds the limit of {max_nbytes} bytes")
    if not (math.isfinite(t_send) and math.isfinite(t_deliver)) or t_send < 0.0 or t_deliver < 0.0:
        raise ProtocolError(f"bad timestamps t_send={t_send} t_deliver={t_deliver}")
    return Header(kind, dtype, shape, src, tag, t_send, t_deliver, nbytes, version)


# ---------------------------------------------------------------------------------------------------
# Socket loops. `peer` is how errors name the other end ("rank 3", "peer 127.0.0.1:5000").


_TIMEVAL = struct.Struct("@ll")  # struct timeval {time_t tv_sec; suseconds_t tv_usec} on 64-bit Linux/macOS


def set_kernel_timeouts(sock: socket.socket, timeout_s: float) -> None:
    """Blocking socket whose recv/send give up after `timeout_s` idle (SO_RCVTIMEO/SO_SNDTIMEO).

    Python's own socket timeouts poll() before every recv/send: two syscalls per operation. Kernel
    timeouts keep one, and the loops below map the resulting EAGAIN to PeerTimeout all the same.
    """
    sec = int(timeout_s)
    tv = _TIMEVAL.pack(sec, int(round((timeout_s - sec) * 1e6)))
    sock.settimeout(None)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)


def _timeout_text(sock: socket.socket, opt: int = socket.SO_RCVTIMEO) -> str:
    t = sock.gettimeout()
    if t is None:  # kernel timeouts (only read back on the error path)
        try:
            sec, usec = _TIMEVAL.unpack(sock.getsockopt(socket.SOL_SOCKET, opt, _TIMEVAL.size))
            t = sec + usec / 1e6
        except OSError:
            return "the timeout"
    return f"{t:.1f} s"


def recv_into(sock: socket.socket, view: memoryview, peer: str = "peer") -> None:
    """Fill `view` completely (recv may return fewer bytes); PeerLost on EOF, PeerTimeout when idle."""
    n = len(view)
    got = 0
    while got < n:
        try:  # MSG_WAITALL: one wakeup for a whole payload on blocking sockets, harmless otherwise
            k = sock.recv_into(view[got:] if got else view, 0, socket.MSG_WAITALL)
        except (socket.timeout, BlockingIOError):
            where = f" mid-frame ({got} of {n} bytes)" if got else ""
            raise PeerTimeout(f"{peer} sent nothing for {_timeout_text(sock)}{where}") from None
        except (ConnectionResetError, ConnectionAbortedError):
            raise PeerLost(f"{peer} reset the connection") from None
        except OSError as e:
            raise PeerLost(f"connection to {peer} failed: {e.strerror or e}") from None
        if k == 0:
            raise PeerLost(f"{peer} closed the connection")
        got += k


def recv_exact(sock: socket.socket, n: int, peer: str = "peer") -> bytearray:
    """Receive exactly n bytes into a new buffer (handshake and tests; the hot path uses recv_into)."""
    buf = bytearray(n)
    recv_into(sock, memoryview(buf), peer)
    return buf


def send_buffers(sock: socket.socket, header: bytes, payload: memoryview, peer: str = "peer") -> None:
    """Send header + payload with one sendmsg (no concatenated copy), finishing any partial send."""
    try:
        sent = sock.sendmsg([header, payload])
        if sent < len(header):
            sock.sendall(memoryview(header)[sent:])
            sent = len(header)
        if sent - len(header) < len(payload):
            sock.sendall(payload[sent - len(header):])
    except (socket.timeout, BlockingIOError):
        raise PeerTimeout(f"{peer} accepted no data for {_timeout_text(sock, socket.SO_SNDTIMEO)}") from None
    except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError):
        raise PeerLost(f"{peer} closed the connection") from None
    except OSError as e:
        raise PeerLost(f"connection to {peer} failed: {e.strerror or e}") from None


def contiguous(arr: np.ndarray) -> np.ndarray:
    """`arr` itself when C-contiguous, else a C-contiguous copy (np.ascontiguousarray would turn 0-d into 1-d)."""
    return arr if arr.flags.c_contiguous else arr.copy(order="C")


def payload_view(arr: np.ndarray) -> memoryview:
    """The bytes of a C-contiguous array, without a copy (0-d and bf16 arrays included)."""
    return memoryview(arr.reshape(-1).view(np.uint8))


def send_frame(sock: socket.socket, kind: int, arr: np.ndarray, *, src: int = 0, tag: int = 0,
               t_send: float = 0.0, t_deliver: float = 0.0, peer: str = "peer") -> None:
    """Send one array as a frame (copies only if `arr` is not C-contiguous)."""
    arr = contiguous(arr)
    send_buffers(sock, header_for(kind, arr, src=src, tag=tag, t_send=t_send, t_deliver=t_deliver),
                 payload_view(arr), peer)


def recv_header(sock: socket.socket, buf: bytearray | None = None, *, max_nbytes: int = DEFAULT_MAX_NBYTES,
                peer: str = "peer", any_version: bool = False) -> Header:
    """Receive and validate one header, into `buf` (HEADER_NBYTES long) when given."""
    buf = bytearray(HEADER_NBYTES) if buf is None else buf
    recv_into(sock, memoryview(buf), peer)
    try:
        return unpack_header(buf, max_nbytes, any_version=any_version)
    except ProtocolError as e:
        raise ProtocolError(f"from {peer}: {e}") from None


def recv_payload(sock: socket.socket, hdr: Header, peer: str = "peer") -> np.ndarray:
    """Receive the payload announced by `hdr` into a new array of its dtype and shape."""
    out = np.empty(hdr.shape, dtype=numpy_dtype(hdr.dtype))
    if hdr.nbytes:
        recv_into(sock, payload_view(out), peer)
    return out


def recv_frame(sock: socket.socket, *, max_nbytes: int = DEFAULT_MAX_NBYTES, peer: str = "peer",
               any_version: bool = False) -> tuple[Header, np.ndarray]:
    """Receive one whole frame into new memory."""
    hdr = recv_header(sock, max_nbytes=max_nbytes, peer=peer, any_version=any_version)
    return hdr, recv_payload(sock, hdr, peer)


def check_fits(hdr: Header, out: np.ndarray, peer: str = "peer") -> None:
    """ProtocolError unless the frame announced by `hdr` has exactly the shape and dtype of `out`."""
    code = _CODE_BY_DTYPE.get(out.dtype)
    if code is None:
        code = _CODE_BY_NAME.get(out.dtype.name) if out.dtype.isnative else None
    if hdr.shape != out.shape or hdr.dtype != code:
        raise ProtocolError(f"{peer} sent shape {hdr.shape} {numpy_dtype(hdr.dtype)}, "
                            f"expected {out.shape} {out.dtype}")


def recv_tensor_into(sock: socket.socket, out: np.ndarray, *, header_buf: bytearray | None = None,
                     max_nbytes: int = DEFAULT_MAX_NBYTES, peer: str = "peer") -> Header:
    """Receive one frame straight into the preallocated C-contiguous `out`; no payload-sized allocation.

    The frame must match `out` in shape and dtype (ProtocolError otherwise). Returns the header, so the
    caller can check kind/src/tag and handle ERROR frames (whose JSON payload is then still unread).
    """
    hdr = recv_header(sock, header_buf, max_nbytes=max_nbytes, peer=peer)
    if hdr.kind == Kind.ERROR:
        return hdr
    check_fits(hdr, out, peer)
    if hdr.nbytes:
        recv_into(sock, payload_view(out), peer)
    return hdr


def json_payload(obj: object) -> np.ndarray:
    """A JSON-able object as a u8 payload."""
    return np.frombuffer(json.dumps(obj, separators=(",", ":")).encode(), dtype=np.uint8)


def parse_json(payload: np.ndarray, peer: str = "peer") -> dict:
    """Decode a u8 JSON payload that must hold an object; ProtocolError otherwise."""
    if payload.dtype != np.uint8 or payload.ndim != 1:
        raise ProtocolError(f"{peer} sent a control payload of dtype {payload.dtype}, shape {payload.shape}; "
                            f"expected 1-d uint8 JSON")
    try:
        obj = json.loads(payload.tobytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise ProtocolError(f"{peer} sent invalid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise ProtocolError(f"{peer} sent JSON {type(obj).__name__}, expected an object")
    return obj
