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

What the edge can know of a receiver that drops its messages (docs/PROTOCOL.md section 10.2),
from real signals only, since no message ever flows back: a socket monitor reports every
handshake a receiver refused (a key missing from the allow-list is ZAP status 400; a wrong
server key ends the handshake without detail; CurveZMQ on one side only is a mechanism
mismatch), and the receiver's socket carries its model's wire fingerprint and camera ids as
the ZMTP handshake properties ``X-MVLD-Enc`` and ``X-MVLD-Cameras`` (``ZMQ_METADATA``), which
the edge reads off the subscription notice, so a node that sends another encoder's latents, or
a camera the receiver does not know, learns it at once. (A
second subscription cannot carry it: with CONFLATE the SUB's outgoing pipe keeps only its
last subscription, measured with libzmq 4.3.5.) :meth:`LatentPublisher.receiver_state` sums
this up for the edge's status line, and each change is logged once.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import zmq
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils.monitor import recv_monitor_message

from mvld.common.errors import ConfigError, ProtocolError
from mvld.common.keys import load_allowed_keys, load_public_key, load_secret_key
from mvld.common.wire import WireLimits, wire_fingerprint

__all__ = [
    "CAMERAS_PROPERTY",
    "FINGERPRINT_PROPERTY",
    "CurveClientKeys",
    "CurveServerKeys",
    "LatentPublisher",
    "LatentSubscriber",
    "ReceivedMessage",
]

log = logging.getLogger(__name__)

_SUBSCRIBE = 1  # first byte of an XPUB subscription notification; 0 means unsubscribe

FINGERPRINT_PROPERTY = "X-MVLD-Enc"
"""ZMTP handshake property of the receiver's socket: its model's 16 hex digit wire fingerprint."""

CAMERAS_PROPERTY = "X-MVLD-Cameras"
"""ZMTP handshake property of the receiver's socket: the camera ids it accepts, a JSON array."""

_LINK_EVENTS = (
    zmq.EVENT_CONNECTED
    | zmq.EVENT_DISCONNECTED
    | zmq.EVENT_HANDSHAKE_SUCCEEDED
    | zmq.EVENT_HANDSHAKE_FAILED_AUTH
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
)
_MECHANISM_MISMATCH = zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH


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


def _wire_form(fingerprint: str) -> str:
    """The 16 hex digits of ``fingerprint``'s version 2 wire form (what receivers compare)."""
    try:
        return wire_fingerprint(fingerprint)
    except ProtocolError as exc:
        raise ConfigError(f"encoder fingerprint {fingerprint!r}: {exc}") from exc


def _property(frame: zmq.Frame, name: str) -> str | None:
    """A ZMTP handshake property of the peer that sent ``frame``; None if it has none."""
    try:
        return frame.get(name.encode())  # a bytes name is always a (text) message property
    except (zmq.ZMQError, UnicodeDecodeError):
        return None


def _readable(socket: zmq.Socket) -> bool:
    """Whether ``socket`` has a message waiting (its ZMQ_EVENTS, an integer option)."""
    events = socket.getsockopt(zmq.EVENTS)
    if not isinstance(events, int):
        raise TypeError(f"ZMQ_EVENTS is not an integer: {events!r}")
    return bool(events & zmq.POLLIN)


def _announcement(frame: zmq.Frame) -> tuple[str | None, tuple[str, ...] | None]:
    """(X-MVLD-Enc, X-MVLD-Cameras) of the receiver that sent a subscription notice; what is
    missing or unreadable is None (the node then cannot tell, and assumes it is accepted)."""
    enc = _property(frame, FINGERPRINT_PROPERTY)
    text = _property(frame, CAMERAS_PROPERTY)
    cameras = None
    if text:
        try:
            parsed = json.loads(text)
        except ValueError:
            parsed = None
        if isinstance(parsed, list) and all(isinstance(c, str) for c in parsed):
            cameras = tuple(parsed)
    return (enc.lower() if enc else None), cameras


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
        fingerprint: str | None = None,
        camera_ids: Sequence[str] = (),
    ) -> None:
        self.endpoints = _check_endpoints(endpoints)
        self.sent = 0
        self.dropped = 0
        self._curve = curve is not None
        self._topics: set[bytes] = set()  # subscriptions the receiver(s) hold right now
        self._own = _wire_form(fingerprint) if fingerprint else None
        self._cameras = tuple(camera_ids)
        # what each receiver that subscribed announced: (X-MVLD-Enc, X-MVLD-Cameras), None if
        # it announced nothing (forgotten only once the last receiver has left)
        self._announced: set[tuple[str | None, tuple[str, ...] | None]] = set()
        self._refusal: str | None = None  # why the last handshake failed, until one succeeds
        self._reported: str | None = None  # the last state that was logged
        self._context = zmq.Context()
        self._socket = self._context.socket(zmq.XPUB)
        self._monitor: zmq.Socket | None = None
        try:
            self._socket.setsockopt(zmq.XPUB_NODROP, 1)
            self._socket.setsockopt(zmq.XPUB_VERBOSE, 1)  # every receiver's notice
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
            self._monitor = self._socket.get_monitor_socket(_LINK_EVENTS)
            for endpoint in self.endpoints:
                self._socket.connect(endpoint)
        except zmq.ZMQError as exc:
            self.close()
            raise ConfigError(f"cannot set up publisher to {self.endpoints}: {exc}") from exc

    @property
    def has_subscriber(self) -> bool:
        """Whether a receiver is connected and subscribed right now (updates the state)."""
        self._poll_subscriptions()
        return b"" in self._topics

    @property
    def receiver_fingerprints(self) -> frozenset[str]:
        """Wire fingerprints (16 hex digits) the subscribed receivers advertise."""
        self._poll_subscriptions()
        return frozenset(enc for enc, _ in self._announced if enc is not None)

    def _refused_by(self, enc: str | None, cameras: tuple[str, ...] | None) -> str | None:
        """Why a receiver that announced ``enc`` and ``cameras`` drops all of this node's
        frame sets (``fingerprint`` / ``cameras``), None if it may accept them."""
        if enc is not None and self._own is not None and enc != self._own:
            return "fingerprint"
        if cameras is not None and not set(self._cameras) <= set(cameras):
            return "cameras"
        return None

    def receiver_state(self) -> str:
        """One word for the status line: ``up``, ``none`` or ``refused(<why>)``.

        ``refused(fingerprint)`` / ``refused(cameras)``: subscribed, but every receiver
        announces another encoder fingerprint or lacks one of this node's camera ids, so
        they drop every frame set (a receiver that announces nothing counts as accepting);
        ``refused(auth)``: the receiver's ZAP handler refused this node's key;
        ``refused(handshake)``: the CurveZMQ handshake failed otherwise (wrong server key,
        CurveZMQ on one side only). Each change is logged once.
        """
        self._poll_subscriptions()
        if b"" in self._topics:
            reasons = {self._refused_by(*announced) for announced in self._announced}
            if not reasons or None in reasons:
                state = "up"
            else:
                state = f"refused({min(reason for reason in reasons if reason is not None)})"
        elif self._refusal is not None:
            state = "refused(auth)" if self._refusal.startswith("auth") else "refused(handshake)"
        else:
            state = "none"
        self._report(state)
        return state

    def _report(self, state: str) -> None:
        """Log a change of state once: a warning for refusals, info otherwise."""
        if state == self._reported:
            return
        self._reported = state
        if state == "refused(fingerprint)":
            theirs = ", ".join(sorted(self.receiver_fingerprints))
            log.warning(
                "receiver connected but it drops every frame set of this node: it "
                "expects encoder fingerprint %s..., this node's encoder is %s... "
                "(export the edge's ONNX from the receiver's model)",
                theirs,
                self._own,
            )
        elif state == "refused(cameras)":
            theirs = " or ".join(sorted(",".join(c) for _, c in self._announced if c))
            log.warning(
                "receiver connected but it drops every frame set of this node: it "
                "accepts the cameras %s, this node sends %s (a model view per camera; "
                "mvld-receiver --cameras names them)",
                theirs,
                ",".join(self._cameras),
            )
        elif state.startswith("refused"):
            log.warning("receiver refuses this node: %s", self._refusal)
        elif state == "up":
            log.info("receiver subscribed on %s", ", ".join(self.endpoints))

    def _poll_subscriptions(self) -> None:
        """Drain XPUB (un)subscribe notifications and the socket monitor's handshake events.

        With XPUB_VERBOSE every receiver's subscription is reported (each carrying its
        handshake properties), an unsubscription only when the topic's last subscriber left.
        """
        while _readable(self._socket):  # cheaper than zmq.Again
            note = self._socket.recv(zmq.NOBLOCK, copy=False)
            body = note.bytes
            if not body:
                continue
            topic = body[1:]
            if body[0] == _SUBSCRIBE:
                self._topics.add(topic)
                self._announced.add(_announcement(note))
            else:
                self._topics.discard(topic)
                if not self._topics:
                    self._announced.clear()
        self._poll_monitor()

    def _poll_monitor(self) -> None:
        while self._monitor is not None and _readable(self._monitor):
            event = recv_monitor_message(self._monitor, zmq.NOBLOCK)
            kind, value = event["event"], event["value"]
            endpoint = event["endpoint"].decode("utf-8", "replace")
            if kind == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self._refusal = None
            elif kind == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                self._refusal = (
                    f"authentication failed at {endpoint}: the receiver's "
                    f"CurveZMQ handler answered status {value} (400: this node's "
                    "public key is not in the receiver's --allow folder; ZeroMQ "
                    "does not retry a refused handshake, so restart this node "
                    "once its key is allowed)"
                )
            elif kind == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL and value == _MECHANISM_MISMATCH:
                self._refusal = f"handshake failed at {endpoint}: " + (
                    "this node uses CurveZMQ, the receiver does not (drop --keys/--server-key "
                    "or start the receiver with --keys/--allow)"
                    if self._curve
                    else "the receiver requires CurveZMQ (give --keys and --server-key)"
                )
            elif kind == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
                self._refusal = f"handshake failed at {endpoint} (ZMTP protocol error {value:#x})"
            elif kind == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL:
                self._refusal = f"the receiver at {endpoint} closed the handshake " + (
                    "(is --server-key that receiver's public key, and does it run with --keys?)"
                    if self._curve
                    else "(does it require CurveZMQ? then give --keys and --server-key)"
                )

    def send(self, data: bytes) -> bool:
        """Queue one wire message; return False (and count a drop) if it cannot go now."""
        self._poll_subscriptions()
        if b"" not in self._topics:
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
        """Close the socket and its monitor at once (LINGER applies), end the context."""
        if self._monitor is not None:
            if not self._socket.closed:
                self._socket.disable_monitor()
            self._monitor.close(linger=0)
            self._monitor = None
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
        fingerprint: str | None = None,
        camera_ids: Sequence[str] = (),
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
            if fingerprint:  # handshake properties: XPUB senders read them off the notice
                self._socket.setsockopt(
                    zmq.METADATA,
                    f"{FINGERPRINT_PROPERTY}:{_wire_form(fingerprint)}".encode("ascii"),
                )
            if camera_ids:
                self._socket.setsockopt(
                    zmq.METADATA,
                    f"{CAMERAS_PROPERTY}:".encode("ascii")
                    + json.dumps(list(camera_ids)).encode("utf-8"),
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
        client_key = frame.get(b"User-Id") if self._curve else None  # bytes: a text property
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
