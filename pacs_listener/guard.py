"""The connection guard: what a peer may hold before its association is negotiated.

pynetdicom starts an association thread for every TCP connection, counts it against
``maximum_associations`` whatever it has sent, and reads a PDU of any announced length with a
blocking ``recv``. A peer that connects and says nothing, or sends the 6-byte header of an
A-ASSOCIATE-RQ claiming 4 GiB and then nothing, holds a slot until a timeout that may never
come, and a few of them refuse every legitimate sender.

So the listener answers each new connection in two phases:

1. **pending** (here, before pynetdicom sees the connection): the TLS handshake and the complete
   A-ASSOCIATE-RQ PDU must arrive within ``associate_timeout`` seconds; the PDU type must be
   A-ASSOCIATE-RQ and its announced length at most ``maximum_associate_rq_size`` (checked from
   the 6-byte header, before anything else is read). Pending connections are counted apart from
   associations, in total (``maximum_pending``) and per peer address
   (``maximum_pending_per_peer``); when a limit is reached the *oldest* pending connection of
   that peer (or of all) is dropped, so connections that stay silent make room for new ones
   instead of locking them out, and a legitimate peer, which sends its request at once, gets in.
2. **association** (pynetdicom): the request read in phase 1 is handed to a normal pynetdicom
   acceptor with a per-read socket timeout (``pdu_timeout``: a peer silent in the middle of a
   PDU is cut off), pynetdicom's ACSE/DIMSE timeouts and its idle timer (``network_timeout``),
   and the ``maximum_associations`` limit, which now only counts negotiated associations.

:class:`GuardedAssociationServer` and :class:`GuardedRequestHandler` are the pynetdicom server
and request handler with phase 1 added (``AE.make_server(server_class=...,
request_handler=...)``).
"""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
import struct
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from pynetdicom import evt
from pynetdicom.transport import (
    AssociationSocket,
    RequestHandler,
    ThreadedAssociationServer,
)

__all__ = [
    "ConnectionGuard",
    "GuardLimits",
    "GuardedAssociationServer",
    "GuardedRequestHandler",
    "PendingGate",
]

logger = logging.getLogger(__name__)

_A_ASSOCIATE_RQ = 0x01
#: A-ABORT PDU from the service provider (source 2) with a reason: 1 unrecognised PDU,
#: 2 unexpected PDU, 6 invalid PDU parameter value (PS3.8 9.3.8).
_ABORT = "!BBLBBBB"


def _abort_pdu(reason: int) -> bytes:
    return struct.pack(_ABORT, 0x07, 0, 4, 0, 0, 2, reason)


@dataclass(frozen=True)
class GuardLimits:
    """Limits of the pending phase (see :class:`~pacs_listener.config.ScpConfig`).

    Attributes
    ----------
    associate_timeout : float
        Seconds a new connection has to complete TLS and deliver its whole A-ASSOCIATE-RQ.
    pdu_timeout : float
        Seconds a peer may stay silent while a PDU is incomplete (after the request).
    maximum_associate_rq_size : int
        Largest A-ASSOCIATE-RQ PDU (bytes after the 6-byte header) read.
    maximum_pending : int
        Pending connections in total.
    maximum_pending_per_peer : int
        Pending connections per peer IP address.
    """

    associate_timeout: float = 10.0
    pdu_timeout: float = 30.0
    maximum_associate_rq_size: int = 262144
    maximum_pending: int = 32
    maximum_pending_per_peer: int = 8


class PendingGate:
    """Counts pending connections per peer and in total; makes room by dropping the oldest.

    Parameters
    ----------
    maximum_pending : int
        Pending connections in total.
    maximum_pending_per_peer : int
        Pending connections per peer address.
    """

    def __init__(self, maximum_pending: int, maximum_pending_per_peer: int) -> None:
        self.maximum_pending = maximum_pending
        self.maximum_pending_per_peer = maximum_pending_per_peer
        self._lock = threading.Lock()
        # socket -> peer, in arrival order (oldest first)
        self._pending: OrderedDict[socket.socket, str] = OrderedDict()
        self.dropped = 0

    def enter(self, sock: socket.socket, peer: str) -> int:
        """Register a new pending connection; drop the oldest ones over a limit.

        Returns
        -------
        int
            How many older pending connections were dropped to make room.
        """
        with self._lock:
            victims: list[socket.socket] = []
            same_peer = [s for s, p in self._pending.items() if p == peer]
            while len(same_peer) >= self.maximum_pending_per_peer:
                victims.append(same_peer.pop(0))
            others = [s for s in self._pending if s not in victims]
            while len(others) >= self.maximum_pending:
                victims.append(others.pop(0))
            for victim in victims:
                del self._pending[victim]
                # wakes the thread blocked in recv() on it; done under the lock, so a
                # connection that already left the gate (handed to pynetdicom) is never touched
                with contextlib.suppress(OSError):
                    victim.shutdown(socket.SHUT_RDWR)
            self._pending[sock] = peer
            self.dropped += len(victims)
            return len(victims)

    def leave(self, sock: socket.socket) -> bool:
        """Unregister a connection; False when it had been dropped meanwhile."""
        with self._lock:
            return self._pending.pop(sock, None) is not None

    def drop_all(self) -> int:
        """Close every pending connection (the server is stopping); return how many."""
        with self._lock:
            for sock in self._pending:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
            n = len(self._pending)
            self._pending.clear()
            return n

    def counts(self) -> tuple[int, dict[str, int]]:
        """``(total, per peer)`` pending right now."""
        with self._lock:
            per: dict[str, int] = {}
            for peer in self._pending.values():
                per[peer] = per.get(peer, 0) + 1
            return len(self._pending), per


class ConnectionGuard:
    """Phase 1 of every connection: bounded TLS handshake and A-ASSOCIATE-RQ.

    Parameters
    ----------
    limits : GuardLimits
        Timeouts and limits.
    """

    def __init__(self, limits: GuardLimits) -> None:
        self.limits = limits
        self.gate = PendingGate(limits.maximum_pending, limits.maximum_pending_per_peer)

    def receive_request(self, sock: socket.socket, peer: str) -> bytes | None:
        """Read the whole A-ASSOCIATE-RQ PDU of a new connection, or None to close it.

        Parameters
        ----------
        sock : socket.socket
            The accepted socket (an ``ssl.SSLSocket`` whose handshake is still to be done
            with TLS).
        peer : str
            Peer IP address.

        Returns
        -------
        bytes or None
            The PDU (header included); None when the connection must be closed: silent past
            ``associate_timeout``, closed by the peer, dropped to make room, a TLS failure, a
            first PDU that is not an A-ASSOCIATE-RQ, or one larger than the limit.
        """
        limits = self.limits
        deadline = time.monotonic() + limits.associate_timeout
        self.gate.enter(sock, peer)  # older pending connections it pushes out log themselves
        why = "closed the connection before sending a complete association request"
        pdu: bytes | None = None
        try:
            if isinstance(sock, ssl.SSLSocket):
                self._settimeout(sock, deadline)
                sock.do_handshake()
            header = self._recv_exactly(sock, 6, deadline)
            if header is not None:
                pdu_type, _, length = struct.unpack(">BBL", header)
                if pdu_type != _A_ASSOCIATE_RQ:
                    why = f"sent a PDU of type 0x{pdu_type:02X} instead of an A-ASSOCIATE-RQ"
                    self._send(sock, _abort_pdu(2 if pdu_type <= 0x07 else 1), deadline)
                elif length > limits.maximum_associate_rq_size:
                    why = (
                        f"announced an A-ASSOCIATE-RQ of {length} bytes, more than the "
                        f"{limits.maximum_associate_rq_size} accepted"
                    )
                    self._send(sock, _abort_pdu(6), deadline)
                else:
                    pdu = self._recv_exactly(sock, length, deadline)
                    pdu = header + pdu if pdu is not None else None
        except TimeoutError:
            why = f"sent no complete association request within {limits.associate_timeout:g} s"
        except (ssl.SSLError, OSError, ValueError) as exc:
            why = f"failed before its association request ({type(exc).__name__}: {exc})"
        finally:
            still_pending = self.gate.leave(sock)
        if not still_pending:
            why, pdu = "was dropped to make room for newer connections", None
        if pdu is not None:
            return pdu
        logger.warning("connection from %s closed: it %s", peer, why)
        return None

    @staticmethod
    def _settimeout(sock: socket.socket, deadline: float) -> None:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("association request deadline passed")
        sock.settimeout(left)

    def _recv_exactly(self, sock: socket.socket, n: int, deadline: float) -> bytes | None:
        buf = bytearray()
        while len(buf) < n:
            self._settimeout(sock, deadline)
            chunk = sock.recv(min(65536, n - len(buf)))
            if not chunk:
                return None
            buf += chunk
        return bytes(buf)

    def _send(self, sock: socket.socket, data: bytes, deadline: float) -> None:
        with contextlib.suppress(OSError, TimeoutError):
            sock.settimeout(max(0.1, min(2.0, deadline - time.monotonic())))
            sock.sendall(data)


class _PrefetchedSocket(AssociationSocket):
    """pynetdicom's socket wrapper that first returns the A-ASSOCIATE-RQ already read."""

    _prefetched: bytearray

    @classmethod
    def adopt(cls, original: AssociationSocket, data: bytes) -> _PrefetchedSocket:
        """Take over the wrapper pynetdicom built (which already queued its "connection open"
        event) and put ``data`` in front of what the socket delivers."""
        new = cls.__new__(cls)
        new.__dict__.update(original.__dict__)
        new._prefetched = bytearray(data)
        return new

    @property
    def ready(self) -> bool:
        return bool(self._prefetched) or super().ready

    def recv(self, nr_bytes: int) -> bytearray:
        head = self._prefetched[:nr_bytes]
        del self._prefetched[:nr_bytes]
        if len(head) < nr_bytes:
            head += super().recv(nr_bytes - len(head))
        return head


class GuardedRequestHandler(RequestHandler):
    """pynetdicom's request handler with the pending phase (:class:`ConnectionGuard`) first."""

    server: GuardedAssociationServer

    def handle(self) -> None:
        """Read the association request within the limits, then run the association."""
        sock = self.request
        peer = str(self.client_address[0])
        guard = self.server.guard
        pdu = guard.receive_request(sock, peer)
        if pdu is None:
            self.server.shutdown_request(sock)
            return
        # from now on: a peer silent in the middle of a PDU (or not reading ours) is cut off
        sock.settimeout(guard.limits.pdu_timeout)
        assoc = self._create_association()
        assoc.dul.socket = _PrefetchedSocket.adopt(assoc.dul.socket, pdu)
        evt.trigger(assoc, evt.EVT_CONN_OPEN, {"address": self.client_address})
        assoc.start()


class GuardedAssociationServer(ThreadedAssociationServer):
    """pynetdicom's threaded server whose connections pass a :class:`ConnectionGuard` first.

    The TLS handshake moves from the accepting thread (where a silent TLS client would block
    every other connection) into the connection's own thread, under the guard's deadline.

    Parameters
    ----------
    *args, **kwargs
        As for :class:`pynetdicom.transport.AssociationServer`.
    guard : ConnectionGuard
        The limits of the pending phase.
    """

    #: pending connections must not keep the process alive when it stops
    daemon_threads = True

    def __init__(self, *args: Any, guard: ConnectionGuard, **kwargs: Any) -> None:
        self.guard = guard
        kwargs.setdefault("request_handler", GuardedRequestHandler)
        super().__init__(*args, **kwargs)

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        """Accept a connection; with TLS, wrap it without doing the handshake yet."""
        assert self.socket is not None
        client_socket, address = self.socket.accept()
        if self.ssl_context:
            client_socket = self.ssl_context.wrap_socket(
                client_socket, server_side=True, do_handshake_on_connect=False
            )
        return client_socket, address

    def server_close(self) -> None:
        """Stop listening and drop the connections still pending."""
        super().server_close()
        self.guard.gate.drop_all()
