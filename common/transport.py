"""ZeroMQ transport of wire messages: edge publishers connect, one receiver subscriber binds.

Pattern (``docs/PROTOCOL.md`` section "Transport"): every edge node owns
a publishing socket that *connects* to the receiver; the receiver owns one SUB socket that
*binds* and subscribes to everything, so any number of nodes can join. One wire message is
one single-part ZeroMQ message, which lets CONFLATE and the high-water marks act on whole
frame sets.

The edge side is an XPUB socket, which speaks to SUB exactly like PUB but tells the sender
whether a subscriber is attached; with XPUB_NODROP a full queue is reported instead of
silently dropped. So :meth:`LatentPublisher.send` never blocks, and it knows and counts
every frame set it could not queue (no receiver subscribed, or queue full).

Latest-only (CONFLATE), measured with libzmq 4.3.5: on the receiver's SUB it keeps the
newest message *per connected edge node* (one queue per connection), with and without
CurveZMQ, so several nodes are not merged (``tests/test_transport.py``). Conflation replaces
messages without counting them: the receiver sees the loss as gaps in a node's sequence
numbers. On the edge, CONFLATE works on PUB but is ignored by XPUB (it then behaves like
SNDHWM, keeping the oldest); the edge therefore keeps XPUB for its drop accounting and bounds
staleness with a short send queue (``send_hwm``, default 2) instead. CONFLATE also keeps only
the *last part* of a multipart message, so such a receiver cannot see that a message had
several parts; without CONFLATE :meth:`LatentSubscriber.recv_message` reports the count
(``ReceivedMessage.parts``) and the receiver drops any message of more than one part.

CurveZMQ ("Ironhouse"): the receiver is the Curve server; each edge is a client with its own
key pair and the server's public key; a ``ThreadAuthenticator`` on the receiver's private
context admits only allow-listed client public keys. Key files: :mod:`mvld.common.keys`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import zmq
from zmq.auth.thread import ThreadAuthenticator

from mvld.common.errors import ConfigError
from mvld.common.keys import load_allowed_keys, load_public_key, load_secret_key
from mvld.common.wire import WireLimits

__all__ = [
    "CurveClientKeys",
    "CurveServerKeys",
    "LatentPublisher",
    "LatentSubscriber",
    "ReceivedMessage",
]

log = logging.getLogger(__name__)

_SUBSCRIBE = 1  # first byte of an XPUB subscription notification; 0 means unsubscribe


@dataclass(frozen=True)
class CurveClientKeys:
    """An edge node's Curve identity (Z85 keys, 40 ASCII bytes each) and the receiver's key."""

    public: bytes
    secret: bytes
    server_public: bytes

    @classmethod
    def from_files(cls, secret_file: str | Path, server_public_file: str | Path) -> CurveClientKeys:
        """Load ``NODE.key_secret`` (mode 0600) and the receiver's ``.key`` file."""
        public, secret = load_secret_key(secret_file)
        return cls(public, secret, load_public_key(server_public_file))


@dataclass(frozen=True)
class CurveServerKeys:
    """The receiver's Curve identity and the allow-list of edge public keys."""

    public: bytes
    secret: bytes
    allowed_clients: frozenset[bytes]

    @classmethod
    def from_files(cls, secret_file: str | Path, allow_dir: str | Path) -> CurveServerKeys:
        """Load the receiver's secret file and every ``*.key`` file of the allow-list folder."""
        public, secret = load_secret_key(secret_file)
        return cls(public, secret, frozenset(load_allowed_keys(allow_dir)))


@dataclass(frozen=True)
class ReceivedMessage:
    """One received wire message and the Curve public key (Z85) of the node that sent it."""

    data: bytes
    client_key: str | None  # None without Curve
    parts: int = 1  # ZeroMQ frames of the message; MVLD messages are single-part


class _AllowList:
    """Credentials provider for ThreadAuthenticator: admit only listed Z85 public keys."""

    def __init__(self, keys: frozenset[bytes]) -> None:
        self._keys = keys

    def callback(self, domain: str, key: bytes) -> bool:
        allowed = key in self._keys
        if not allowed:
            log.warning("refused CurveZMQ client key %s (not in allow-list)", key.decode())
        return allowed


def _check_endpoints(endpoints: str | Sequence[str]) -> list[str]:
    items = [endpoints] if isinstance(endpoints, str) else list(endpoints)
    if not items or not all(isinstance(e, str) and "://" in e for e in items):
        raise ConfigError(f"endpoints must be ZeroMQ addresses like tcp://host:port: {items!r}")
    return items


def _set_liveness(
    socket: zmq.Socket,
    *,
    linger_ms: int,
    heartbeat_ivl_ms: int,
    heartbeat_timeout_ms: int,
    reconnect_ivl_ms: int,
    reconnect_ivl_max_ms: int,
) -> None:
    """Options both sides share: no lingering on close, heartbeats, reconnect back-off."""
    socket.setsockopt(zmq.LINGER, linger_ms)
    socket.setsockopt(zmq.HEARTBEAT_IVL, heartbeat_ivl_ms)
    socket.setsockopt(zmq.HEARTBEAT_TIMEOUT, heartbeat_timeout_ms)
    socket.setsockopt(zmq.HEARTBEAT_TTL, heartbeat_timeout_ms)
    socket.setsockopt(zmq.RECONNECT_IVL, reconnect_ivl_ms)
    socket.setsockopt(zmq.RECONNECT_IVL_MAX, reconnect_ivl_max_ms)


class LatentPublisher:
    """Edge side: connect to the receiver(s) and send wire messages without ever blocking."""

    def __init__(
        self,
        endpoints: str | Sequence[str],
        *,
        curve: CurveClientKeys | None = None,
        send_hwm: int = 2,
        immediate: bool = True,
        linger_ms: int = 0,
        heartbeat_ivl_ms: int = 1000,
        heartbeat_timeout_ms: int = 3000,
        reconnect_ivl_ms: int = 100,
        reconnect_ivl_max_ms: int = 1000,
    ) -> None:
        self.endpoints = _check_endpoints(endpoints)
        self.sent = 0
        self.dropped = 0
        self._subscribed = False
        self._context = zmq.Context()
        self._socket = self._context.socket(zmq.XPUB)
        try:
            self._socket.setsockopt(zmq.XPUB_NODROP, 1)
            self._socket.setsockopt(zmq.SNDHWM, send_hwm)
            self._socket.setsockopt(zmq.IMMEDIATE, int(immediate))
            _set_liveness(
                self._socket,
                linger_ms=linger_ms,
                heartbeat_ivl_ms=heartbeat_ivl_ms,
                heartbeat_timeout_ms=heartbeat_timeout_ms,
                reconnect_ivl_ms=reconnect_ivl_ms,
                reconnect_ivl_max_ms=reconnect_ivl_max_ms,
            )
            if curve is not None:
                self._socket.curve_publickey = curve.public
                self._socket.curve_secretkey = curve.secret
                self._socket.curve_serverkey = curve.server_public
            for endpoint in self.endpoints:
                self._socket.connect(endpoint)
        except zmq.ZMQError as exc:
            self.close()
            raise ConfigError(f"cannot set up publisher to {self.endpoints}: {exc}") from exc

    @property
    def has_subscriber(self) -> bool:
        """Whether a receiver is connected and subscribed right now (updates the state)."""
        self._poll_subscriptions()
        return self._subscribed

    def _poll_subscriptions(self) -> None:
        """Drain XPUB (un)subscribe notifications; non-verbose XPUB reports first-in/last-out."""
        while True:
            try:
                note = self._socket.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            if note:
                self._subscribed = note[0] == _SUBSCRIBE

    def send(self, data: bytes) -> bool:
        """Queue one wire message; return False (and count a drop) if it cannot go now."""
        self._poll_subscriptions()
        if not self._subscribed:
            self.dropped += 1
            return False
        try:
            self._socket.send(data, zmq.NOBLOCK, copy=len(data) < 65536)
        except zmq.Again:
            self.dropped += 1
            return False
        self.sent += 1
        return True

    def close(self) -> None:
        """Close the socket at once (LINGER applies) and end the private context."""
        if not self._socket.closed:
            self._socket.close()
        if not self._context.closed:
            self._context.term()

    def __enter__(self) -> LatentPublisher:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


class LatentSubscriber:
    """Receiver side: bind, subscribe to every node, receive size-limited wire messages."""

    def __init__(
        self,
        endpoints: str | Sequence[str],
        *,
        curve: CurveServerKeys | None = None,
        recv_hwm: int = 16,
        latest_only: bool = True,
        max_message_bytes: int = WireLimits().max_message_bytes,
        linger_ms: int = 0,
        heartbeat_ivl_ms: int = 1000,
        heartbeat_timeout_ms: int = 3000,
        reconnect_ivl_ms: int = 100,
        reconnect_ivl_max_ms: int = 5000,
    ) -> None:
        requested = _check_endpoints(endpoints)
        self.endpoints: list[str] = []
        self.received = 0
        self._curve = curve is not None
        self._context = zmq.Context()
        self._authenticator: ThreadAuthenticator | None = None
        self._socket = self._context.socket(zmq.SUB)
        try:
            if curve is not None:
                self._start_authenticator(curve)
            self._socket.setsockopt(zmq.RCVHWM, recv_hwm)
            self._socket.setsockopt(zmq.CONFLATE, int(latest_only))
            self._socket.setsockopt(zmq.MAXMSGSIZE, max_message_bytes)
            _set_liveness(
                self._socket,
                linger_ms=linger_ms,
                heartbeat_ivl_ms=heartbeat_ivl_ms,
                heartbeat_timeout_ms=heartbeat_timeout_ms,
                reconnect_ivl_ms=reconnect_ivl_ms,
                reconnect_ivl_max_ms=reconnect_ivl_max_ms,
            )
            self._socket.setsockopt(zmq.SUBSCRIBE, b"")
            for endpoint in requested:
                self._socket.bind(endpoint)
                self.endpoints.append(self._socket.getsockopt_string(zmq.LAST_ENDPOINT))
        except zmq.ZMQError as exc:
            self.close()
            raise ConfigError(f"cannot bind subscriber to {requested}: {exc}") from exc

    def _start_authenticator(self, curve: CurveServerKeys) -> None:
        """Ironhouse: Curve server socket, ZAP handler admitting only allow-listed clients."""
        self._authenticator = ThreadAuthenticator(self._context, log=log)
        self._authenticator.start()
        self._authenticator.configure_curve_callback(
            domain="*", credentials_provider=_AllowList(curve.allowed_clients)
        )
        self._socket.curve_server = True
        self._socket.curve_publickey = curve.public
        self._socket.curve_secretkey = curve.secret

    def recv(self, timeout_ms: int) -> bytes | None:
        """Return the next wire message, or None if none arrives within ``timeout_ms``."""
        message = self.recv_message(timeout_ms)
        return None if message is None else message.data

    def recv_message(self, timeout_ms: int) -> ReceivedMessage | None:
        """Like :meth:`recv`, also naming the sender's Curve public key (to bind node ids)."""
        if not self._socket.poll(timeout_ms, zmq.POLLIN):
            return None
        try:
            frame = self._socket.recv(zmq.NOBLOCK, copy=False)
        except zmq.Again:
            return None
        self.received += 1
        client_key = frame.get("User-Id") if self._curve else None
        parts = 1
        while frame.more:  # without CONFLATE every part arrives: take them all, report them
            frame = self._socket.recv(copy=False)
            parts += 1
        return ReceivedMessage(frame.bytes, client_key, parts)

    def close(self) -> None:
        """Close the socket, stop the authenticator, end the private context."""
        if not self._socket.closed:
            self._socket.close()
        if self._authenticator is not None:
            self._authenticator.stop()
            self._authenticator = None
        if not self._context.closed:
            self._context.term()

    def __enter__(self) -> LatentSubscriber:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()
