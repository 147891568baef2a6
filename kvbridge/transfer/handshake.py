"""Bootstrap endpoint: the versioned metadata exchange, and a liveness channel per peer.

    client (usually decode)                         server (every transceiver runs one)
    connect(host:port) ── Hello(token, PeerInfo) ──▶ token checked first: a wrong token
                                                     gets Refused("token") and nothing else
                                                     then protocol, backend, layout and the
                                                     fingerprint fields are compared
                       ◀── Welcome(PeerInfo) ──      or Refused(field, reason), logged here
    the client compares too (refuses on its side)

Frames are 4-byte big-endian length + one message from ``base.encode``. After a Welcome the
TCP connection stays open: it is the liveness channel, and it carries single "nudge" bytes
that wake the peer's ``wait()`` when a message was sent to it (so waiting sleeps in a
blocking call instead of polling the transport). When the peer's
process dies the kernel closes it, and ``on_lost(peer)`` fires; that is how a transfer to a
dead peer fails fast (PEER_DEAD) instead of waiting for its timeout.

One thread per transceiver blocks in ``select`` on the listening socket and the liveness
sockets (no polling loop); it never touches the transport: accepted peers are queued and
the transceiver adds them from its own thread (``poll``).
"""

from __future__ import annotations

import hmac
import logging
import os
import selectors
import socket
import struct
import threading
import time
from collections.abc import Callable

from kvbridge.transfer.base import (
    PROTOCOL_VERSION,
    FailureCause,
    HandshakeRefused,
    Hello,
    PeerInfo,
    ProtocolError,
    Refused,
    TransferError,
    Welcome,
    decode,
    encode,
)

log = logging.getLogger("kvbridge.transfer.handshake")

MAX_FRAME = 16 * 1024 * 1024
NUDGE_EVERY_S = 4e-3  # must stay below the receiver's hot window (waiting.py HOT_S)


def compare(mine: PeerInfo, theirs: PeerInfo) -> tuple[str, str] | None:
    """The first field that does not let the two sides exchange KV: (field, reason), or None."""
    if mine.protocol_version != theirs.protocol_version:
        return "protocol_version", f"protocol version {theirs.protocol_version} != {mine.protocol_version}"
    if mine.backend != theirs.backend:
        return "backend", f"peer uses backend {theirs.backend!r}, this side {mine.backend!r}"
    if mine.layout != theirs.layout:
        return "layout", f"peer KV layout {theirs.layout!r} != {mine.layout!r}"
    keys = sorted(set(mine.fingerprint_fields) | set(theirs.fingerprint_fields))
    for k in keys:
        a, b = mine.fingerprint_fields.get(k), theirs.fingerprint_fields.get(k)
        if a != b:
            return k, f"peer {k}={b!r}, this side {k}={a!r}"
    if mine.fingerprint != theirs.fingerprint:
        return "fingerprint", f"peer fingerprint {theirs.fingerprint} != {mine.fingerprint}"
    if mine.block_bytes != theirs.block_bytes:
        return "block_bytes", f"peer block_bytes {theirs.block_bytes} != {mine.block_bytes}"
    return None


# --------------------------------------------------------------------------- framing


def send_frame(sock: socket.socket, payload: bytes) -> None:
    sock.sendall(struct.pack(">I", len(payload)) + payload)


def recv_frame(sock: socket.socket) -> bytes:
    head = _recv_exact(sock, 4)
    (n,) = struct.unpack(">I", head)
    if n > MAX_FRAME:
        raise ProtocolError(f"bootstrap frame of {n} bytes is too large")
    return _recv_exact(sock, n)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("bootstrap peer closed the connection")
        buf += chunk
    return bytes(buf)


# --------------------------------------------------------------------------- server


class BootstrapServer:
    """Listens on ``host:port`` (port 0: any free port). ``accept(hello)`` decides (called on
    the server thread, must not touch the transport); ``on_lost(peer_name)`` reports a
    liveness connection that closed."""

    def __init__(
        self,
        host: str,
        port: int,
        token: str,
        local_info: Callable[[], PeerInfo],
        on_accept: Callable[[PeerInfo], None],
        on_lost: Callable[[str], None],
        on_nudge: Callable[[], None] = lambda: None,
    ) -> None:
        self._token = token
        self._on_nudge = on_nudge
        self._socks: dict[str, socket.socket] = {}  # peer name → liveness connection
        self._nudged: dict[str, float] = {}  # peer name → when we last sent it a message
        self._local_info = local_info
        self._on_accept = on_accept
        self._on_lost = on_lost
        self.refusals: list[tuple[str, str]] = []  # (field, reason), for health and tests
        self._listen = socket.create_server((host, port), reuse_port=False)
        self._listen.setblocking(False)
        self.host, self.port = self._listen.getsockname()[:2]
        self._sel = selectors.DefaultSelector()
        self._sel.register(self._listen, selectors.EVENT_READ, None)
        self._wake_r, self._wake_w = os.pipe()
        self._sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        self._lock = threading.Lock()
        self._to_watch: list[tuple[socket.socket, str]] = []
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=f"kv-bootstrap-{self.port}", daemon=True)
        self._thread.start()

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def nudge(self, peer_name: str) -> None:
        """Wake the peer's ``wait()``: one byte on the liveness connection, after a message,
        so a waiting engine sleeps in ``select`` instead of polling. Only when no message
        went to that peer in the last ``NUDGE_EVERY_S``: a peer keeps polling quickly for
        ``HOT_S`` (waiting.py, longer than this) after it takes a message, so a message
        sent within ``NUDGE_EVERY_S`` of the one before finds it polling, or busy in an
        engine step after which it polls anyway. A wake-up costs a context switch (50 to
        250 µs on a busy 2-core machine): back-to-back transfers send none."""
        sock = self._socks.get(peer_name)
        if sock is None:
            return  # not watched (yet): no wake-up can go, so the next message must send one
        now = time.monotonic()
        last, self._nudged[peer_name] = self._nudged.get(peer_name, 0.0), now
        if now - last >= NUDGE_EVERY_S:
            try:
                sock.send(b"!")
            except (BlockingIOError, OSError):
                pass  # a full buffer already holds a nudge; a dead peer is reported by the thread

    def watch(self, sock: socket.socket, peer_name: str) -> None:
        """Watch a liveness connection made by this side (client side of a handshake)."""
        sock.setblocking(False)
        self._socks[peer_name] = sock
        with self._lock:
            self._to_watch.append((sock, peer_name))
        os.write(self._wake_w, b"w")

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            os.write(self._wake_w, b"q")
        except OSError:
            pass
        self._thread.join(timeout=2)
        for key in list(self._sel.get_map().values()):
            if isinstance(key.fileobj, socket.socket):
                key.fileobj.close()
        self._sel.close()
        os.close(self._wake_r)
        os.close(self._wake_w)

    # ----------------------------------------------------------------- thread
    def _run(self) -> None:
        while not self._closed:
            for key, _ in self._sel.select():
                if key.data == "wake":
                    os.read(self._wake_r, 64)
                    with self._lock:
                        pending, self._to_watch = self._to_watch, []
                    for sock, name in pending:
                        sock.setblocking(False)
                        self._sel.register(sock, selectors.EVENT_READ, name)
                elif key.data is None:
                    self._accept_one()
                else:
                    self._check_alive(key.fileobj, key.data)  # type: ignore[arg-type]

    def _check_alive(self, sock: socket.socket, peer_name: str) -> None:
        try:
            data = sock.recv(64)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if data:
            self._on_nudge()  # the peer sent us a message: wake wait()
            return
        self._socks.pop(peer_name, None)
        self._sel.unregister(sock)
        sock.close()
        if not self._closed:
            self._on_lost(peer_name)

    def _accept_one(self) -> None:
        try:
            conn, _ = self._listen.accept()
        except (BlockingIOError, InterruptedError):
            return
        conn.setblocking(True)
        conn.settimeout(5.0)
        try:
            msg = decode(recv_frame(conn))
            if not isinstance(msg, Hello):
                raise ProtocolError(f"expected Hello, got {type(msg).__name__}")
            reply = self._decide(msg)
            send_frame(conn, encode(reply))
        except (OSError, ConnectionError, ProtocolError) as e:
            log.warning("bootstrap: bad handshake attempt: %s", e)
            conn.close()
            return
        if isinstance(reply, Welcome):
            conn.setblocking(False)
            self._socks[msg.info.agent_name] = conn
            self._sel.register(conn, selectors.EVENT_READ, msg.info.agent_name)
        else:
            conn.close()

    def _decide(self, hello: Hello) -> Welcome | Refused:
        if self._token and not hmac.compare_digest(hello.token.encode(), self._token.encode()):
            self.refusals.append(("token", "wrong or missing shared token"))
            log.error("bootstrap: refused a peer without the shared token (nothing sent)")
            return Refused(field="token", reason="shared token does not match")
        mine = self._local_info()
        bad = compare(mine, hello.info)
        if bad is not None:
            field, reason = bad
            self.refusals.append(bad)
            log.error("handshake with %s refused: %s mismatch: %s", hello.info.agent_name, field, reason)
            return Refused(field=field, reason=reason)
        self._on_accept(hello.info)
        return Welcome(info=mine)


# --------------------------------------------------------------------------- client


def handshake(address: str, token: str, mine: PeerInfo, timeout_s: float) -> tuple[PeerInfo, socket.socket]:
    """Do the handshake with ``address``; returns the peer's info and the open liveness
    socket. Raises ``HandshakeRefused`` (either side refused) or ``TransferError``."""
    host, _, port = address.rpartition(":")
    try:
        sock = socket.create_connection((host, int(port)), timeout=timeout_s)
    except OSError as e:
        raise TransferError(FailureCause.PEER_DEAD, f"cannot reach bootstrap endpoint {address}: {e}") from None
    try:
        send_frame(sock, encode(Hello(token=token, info=mine)))
        reply = decode(recv_frame(sock))
    except (OSError, ConnectionError, ProtocolError) as e:
        sock.close()
        raise TransferError(FailureCause.BACKEND, f"handshake with {address} failed: {e}") from None
    if isinstance(reply, Refused):
        sock.close()
        raise HandshakeRefused(f"peer {address} refused the handshake: {reply.field} mismatch: {reply.reason}", reply.field)
    if not isinstance(reply, Welcome):
        sock.close()
        raise TransferError(FailureCause.BACKEND, f"unexpected handshake reply {type(reply).__name__}")
    bad = compare(mine, reply.info)
    if bad is not None:  # the server accepted but we do not: refuse on our side too
        sock.close()
        raise HandshakeRefused(f"refused peer {address}: {bad[0]} mismatch: {bad[1]}", bad[0])
    if reply.info.protocol_version != PROTOCOL_VERSION:
        sock.close()
        raise HandshakeRefused("protocol version mismatch", "protocol_version")
    return reply.info, sock
