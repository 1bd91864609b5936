"""Send one frame to a peer while receiving one from another (or the same) peer, without threads.

Owns `exchange`, the poll() loop under every ring step. Frames are laid out, sealed and opened by the
Channels (channel.py); this module only moves their bytes in both directions at once.

Ring steps have every rank send and receive at once; with blocking sends a payload bigger than the
socket buffers would deadlock the ring. The send is tried without blocking; if the kernel takes it
whole (the usual case for activations) this is a plain receive, otherwise both directions are pumped
with poll() (no spinning):

    tx: [header part][body part]  --- MSG_DONTWAIT sendmsg, as much as fits --->  send_ch
    rx: header view -> header_in() (open, validate, check kind/tag/shape) -> body views -> body_in()
"""

from __future__ import annotations

import select
import socket

import numpy as np

from tpicore.comm.channel import Channel, PeerLost, PeerTimeout
from tpicore.comm.frame import Header, Stamps, check_fits, contiguous, payload_view
from tpicore.errors import TpiError

_IN = select.POLLIN | select.POLLHUP | select.POLLERR
_OUT = select.POLLOUT | select.POLLHUP | select.POLLERR


def exchange(send_ch: Channel | None, kind: int, arr: np.ndarray | None, tag: int,
             recv_ch: Channel | None, out: np.ndarray | None) -> None:
    """Send `arr` on `send_ch` while receiving one frame into `out` from `recv_ch`, concurrently.

    Either side may be None (nothing to send / to receive).
    """
    if send_ch is None or arr is None:
        if recv_ch is not None and out is not None:
            recv_ch.recv_into(out, kind, tag)
        return
    if recv_ch is None or out is None:
        send_ch.send_array(kind, arr, tag)
        return
    tx = [memoryview(b) for b in send_ch.frame(kind, contiguous(arr), tag)]
    _advance(tx, _send_some(send_ch, tx))
    if not tx:
        recv_ch.recv_into(out, kind, tag)
        return
    _Pump(send_ch, tx, recv_ch, kind, tag, out).run()


class _Pump:
    """The poll() loop of one `exchange` whose send did not fit the socket buffer at once."""

    def __init__(self, send_ch: Channel, tx: list[memoryview], recv_ch: Channel, kind: int, tag: int,
                 out: np.ndarray) -> None:
        self.send_ch, self.tx, self.recv_ch = send_ch, tx, recv_ch
        self.kind, self.tag, self.out = kind, tag, out
        self.rx: list[memoryview] = [recv_ch.header_view()]
        self.rx_hdr: Header | None = None
        self.stamps: Stamps | None = None

    def run(self) -> None:
        send_ch, recv_ch = self.send_ch, self.recv_ch
        recv_ch.link_hook.on_wait(recv_ch.peer_rank, recv_ch.rank)
        sfd, rfd = send_ch.sock.fileno(), recv_ch.sock.fileno()
        poller = select.poll()
        if sfd == rfd:
            poller.register(sfd, select.POLLIN | select.POLLOUT)
        else:
            poller.register(sfd, select.POLLOUT)
            poller.register(rfd, select.POLLIN)
        timeout_ms = int(recv_ch.timeout_s * 1000)
        try:
            while self.tx or self.stamps is None:
                ready = poller.poll(timeout_ms)
                if not ready:
                    if self.stamps is None:
                        raise PeerTimeout(f"{recv_ch.peer} sent nothing for {recv_ch.timeout_s:.1f} s").at(
                            recv_ch.peer_rank)
                    raise PeerTimeout(f"{send_ch.peer} accepted no data for {send_ch.timeout_s:.1f} s").at(
                        send_ch.peer_rank)
                for fd, ev in ready:
                    if fd == rfd and self.stamps is None and ev & _IN:
                        self._receive()
                        if self.stamps is not None:
                            if sfd == rfd:
                                poller.modify(sfd, select.POLLOUT)
                            else:
                                poller.unregister(rfd)
                    if fd == sfd and self.tx and ev & _OUT:
                        _advance(self.tx, _send_some(send_ch, self.tx))
                        if not self.tx:
                            if sfd != rfd:
                                poller.unregister(sfd)
                            elif self.stamps is None:
                                poller.modify(sfd, select.POLLIN)
        except TpiError:
            if self.tx:
                send_ch.tx_broken = True
            raise
        assert self.rx_hdr is not None and self.stamps is not None
        recv_ch.delivered(self.rx_hdr, self.stamps)

    def _receive(self) -> None:
        """Whatever has arrived; on a complete header, validate it and aim at the body; then open it."""
        ch = self.recv_ch
        _advance(self.rx, _recv_some(ch, self.rx[0]))
        if self.rx:
            return
        dst = payload_view(self.out)
        if self.rx_hdr is None:
            hdr = self.rx_hdr = ch.header_in()
            ch.check(hdr, self.kind, self.tag)
            check_fits(hdr, self.out, ch.peer)
            self.rx = [v for v in ch.body_views(hdr, dst) if len(v)]
            if self.rx:
                return
        self.stamps = ch.body_in(self.rx_hdr, dst)


def _recv_some(ch: Channel, view: memoryview) -> int:
    """Whatever is there without blocking (0 if nothing); PeerLost on EOF or reset."""
    try:
        k = ch.sock.recv_into(view, 0, socket.MSG_DONTWAIT)
    except BlockingIOError:
        return 0
    except OSError as e:
        raise PeerLost(f"{ch.peer} reset the connection ({e.strerror or e})").at(ch.peer_rank) from None
    if k == 0:
        raise PeerLost(f"{ch.peer} closed the connection").at(ch.peer_rank)
    return k


def _send_some(ch: Channel, bufs: list[memoryview]) -> int:
    """As much as the kernel takes without blocking (0 if nothing); PeerLost if the peer is gone."""
    try:
        return ch.sock.sendmsg(bufs, [], socket.MSG_DONTWAIT)
    except BlockingIOError:
        return 0
    except OSError:
        ch.tx_broken = True
        raise ch.pending_error() or PeerLost(f"{ch.peer} closed the connection").at(ch.peer_rank) from None


def _advance(bufs: list[memoryview], n: int) -> None:
    """Drop the first n bytes from a list of buffers, in place (and any that are then empty)."""
    while n and bufs:
        if n >= len(bufs[0]):
            n -= len(bufs.pop(0))
        else:
            bufs[0] = bufs[0][n:]
            n = 0
    while bufs and not len(bufs[0]):
        bufs.pop(0)
