"""Transport over real tcp://127.0.0.1 sockets: delivery, many nodes, never blocking, CurveZMQ."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import pytest
import zmq

from mvld.common.errors import ConfigError
from mvld.common.keys import generate_keypair
from mvld.common.transport import (
    CAMERAS_PROPERTY,
    FINGERPRINT_PROPERTY,
    CurveClientKeys,
    CurveServerKeys,
    LatentPublisher,
    LatentSubscriber,
)
from mvld.common.wire import FrameSetMessage, ViewRecord, decode_frameset, encode_frameset

ANY_PORT = "tcp://127.0.0.1:*"
CurveTrio = tuple[CurveServerKeys, CurveClientKeys, CurveClientKeys]


def frame_set(node: str, seq: int) -> bytes:
    latent = np.full((4, 8), seq, dtype=np.float16)
    views = (
        ViewRecord("cam0", "ok", "none", 1.0, latent),
        ViewRecord("cam1", "failed", "timeout", None),
    )
    return encode_frameset(FrameSetMessage(node, seq, 2.0, "0f1e2d3c4b5a6978", views))


def wait_until_subscribed(
    subscriber: LatentSubscriber, publishers: list[LatentPublisher], timeout: float = 5.0
) -> None:
    """Service the receiver socket (it must run to process joins) until every node sees it."""
    deadline = time.monotonic() + timeout
    while not all(p.has_subscriber for p in publishers):
        assert subscriber.recv(5) is None, "no message was sent yet"
        assert time.monotonic() < deadline, "publishers never saw the subscription"


def drain(subscriber: LatentSubscriber, quiet_ms: int = 300) -> list[bytes]:
    """Receive until nothing arrives for ``quiet_ms``."""
    received = []
    while (data := subscriber.recv(quiet_ms)) is not None:
        received.append(data)
    return received


@pytest.fixture
def curve_keys(tmp_path: Path) -> CurveTrio:
    """Receiver keys with node1 allow-listed, plus node1 (allowed) and intruder (unlisted)."""
    allow_dir = tmp_path / "allowed"
    _, server_secret = generate_keypair(tmp_path / "receiver", "receiver")
    server_public = tmp_path / "receiver" / "receiver.key"
    _, node_secret = generate_keypair(allow_dir, "node1")
    _, intruder_secret = generate_keypair(tmp_path / "elsewhere", "intruder")
    return (
        CurveServerKeys.from_files(server_secret, allow_dir),
        CurveClientKeys.from_files(node_secret, server_public),
        CurveClientKeys.from_files(intruder_secret, server_public),
    )


def test_delivery_in_order() -> None:
    with (
        LatentSubscriber(ANY_PORT, latest_only=False, recv_hwm=1000) as sub,
        LatentPublisher(sub.endpoints, send_hwm=1000) as pub,
    ):
        wait_until_subscribed(sub, [pub])
        sent = [frame_set("node1", seq) for seq in range(200)]
        assert all(pub.send(data) for data in sent)
        assert drain(sub) == sent
        assert (pub.sent, pub.dropped, sub.received) == (200, 0, 200)


def test_many_publishers_one_subscriber() -> None:
    with LatentSubscriber(ANY_PORT, latest_only=False, recv_hwm=1000) as sub:
        publishers = [LatentPublisher(sub.endpoints, send_hwm=1000) for _ in range(6)]
        try:
            wait_until_subscribed(sub, publishers)
            for seq in range(30):
                for index, pub in enumerate(publishers):
                    assert pub.send(frame_set(f"node{index}", seq))
            messages = [decode_frameset(data) for data in drain(sub)]
        finally:
            for pub in publishers:
                pub.close()
    by_node: dict[str, list[int]] = {}
    for msg in messages:
        by_node.setdefault(msg.node_id, []).append(msg.seq)
    assert by_node == {f"node{i}": list(range(30)) for i in range(6)}


def test_publisher_never_blocks_without_receiver() -> None:
    with LatentSubscriber(ANY_PORT) as probe:
        unused = probe.endpoints[0]  # a port that nobody listens on once the probe is closed
    with LatentPublisher(unused) as pub:
        start = time.perf_counter()
        results = [pub.send(frame_set("node1", seq)) for seq in range(2000)]
        elapsed = time.perf_counter() - start
    assert not any(results)
    assert (pub.sent, pub.dropped) == (0, 2000)
    # about 0.1 s on an idle machine; a send that waited even one reconnect interval (100 ms)
    # would take 200 s, so the bound tells the two apart however loaded the machine is
    assert elapsed < 10.0


def test_full_queue_is_counted_not_blocked() -> None:
    payload = bytes(256 * 1024)
    with (
        LatentSubscriber(ANY_PORT, latest_only=False, recv_hwm=2, max_message_bytes=1 << 20) as sub,
        LatentPublisher(sub.endpoints, send_hwm=2) as pub,
    ):
        wait_until_subscribed(sub, [pub])
        start = time.perf_counter()
        results = [pub.send(payload) for _ in range(400)]  # 100 MiB against a receiver not reading
        elapsed = time.perf_counter() - start
        assert pub.dropped > 0 and pub.sent + pub.dropped == 400
        assert results.count(True) == pub.sent
        assert elapsed < 5.0
        assert 0 < len(drain(sub)) <= pub.sent


@pytest.mark.parametrize("use_curve", [False, True], ids=["null", "curve"])
def test_subscriber_latest_only_keeps_newest_per_node(use_curve: bool) -> None:
    server_public, server_secret = zmq.curve_keypair()
    clients = [zmq.curve_keypair() for _ in range(3)]
    server = CurveServerKeys(server_public, server_secret, frozenset(c[0] for c in clients))
    with LatentSubscriber(ANY_PORT, latest_only=True, curve=server if use_curve else None) as sub:
        publishers = [
            LatentPublisher(
                sub.endpoints,
                send_hwm=1000,
                curve=CurveClientKeys(*client, server_public) if use_curve else None,
            )
            for client in clients
        ]
        try:
            wait_until_subscribed(sub, publishers)
            for seq in range(100):
                for index, pub in enumerate(publishers):
                    assert pub.send(frame_set(f"node{index}", seq))
            time.sleep(0.5)  # the receiver is "busy": everything arrives before it reads
            newest = {m.node_id: m.seq for m in map(decode_frameset, drain(sub))}
            assert sub.received == 3
        finally:
            for pub in publishers:
                pub.close()
    assert newest == {"node0": 99, "node1": 99, "node2": 99}


def test_allowed_curve_key_delivers_and_is_reported(
    curve_keys: CurveTrio,
) -> None:
    server, node, _ = curve_keys
    with (
        LatentSubscriber(ANY_PORT, curve=server, latest_only=False) as sub,
        LatentPublisher(sub.endpoints, curve=node) as pub,
    ):
        wait_until_subscribed(sub, [pub])
        assert pub.send(frame_set("node1", 7))
        received = sub.recv_message(2000)
    assert received is not None
    assert decode_frameset(received.data).seq == 7
    assert received.client_key == node.public.decode("ascii")


@pytest.mark.parametrize("who", ["unlisted", "no-curve", "wrong-server-key"])
def test_unauthorised_publisher_delivers_nothing(curve_keys: CurveTrio, who: str) -> None:
    server, node, intruder = curve_keys
    bogus_server = CurveClientKeys(intruder.public, intruder.secret, intruder.public)
    bad_curve = {"unlisted": intruder, "no-curve": None, "wrong-server-key": bogus_server}[who]
    with (
        LatentSubscriber(ANY_PORT, curve=server, latest_only=False) as sub,
        LatentPublisher(sub.endpoints, curve=bad_curve, reconnect_ivl_ms=20) as bad,
        LatentPublisher(sub.endpoints, curve=node) as good,
    ):
        wait_until_subscribed(sub, [good])
        deadline = time.monotonic() + 1.0
        bad_results = []
        while time.monotonic() < deadline:
            bad_results.append(bad.send(frame_set("intruder", len(bad_results))))
            assert sub.recv(10) is None
        assert good.send(frame_set("node1", 1))
        nodes = [decode_frameset(data).node_id for data in drain(sub)]
    assert not any(bad_results) and bad.dropped == len(bad_results) > 10
    assert nodes == ["node1"]


def test_oversized_message_is_cut_off_by_maxmsgsize() -> None:
    with (
        LatentSubscriber(ANY_PORT, latest_only=False, max_message_bytes=4096) as sub,
        LatentPublisher(sub.endpoints, reconnect_ivl_ms=20) as pub,
    ):
        wait_until_subscribed(sub, [pub])
        assert pub.send(bytes(8192))  # queued; the receiver drops the connection on arrival
        small = frame_set("node1", 1)
        deadline = time.monotonic() + 5.0
        while (data := sub.recv(20)) is None:
            pub.send(small)  # delivered again once the node has reconnected
            assert time.monotonic() < deadline, "publisher never reconnected"
    assert data == small


def test_publisher_resumes_after_receiver_restart() -> None:
    with LatentSubscriber(ANY_PORT, latest_only=False) as first:
        endpoint = first.endpoints[0]
        pub = LatentPublisher(endpoint, reconnect_ivl_ms=20, reconnect_ivl_max_ms=100)
        wait_until_subscribed(first, [pub])
        assert pub.send(frame_set("node1", 1)) and first.recv(2000) is not None
    try:
        deadline = time.monotonic() + 5.0
        while pub.has_subscriber:  # the receiver is gone: the node notices and stops queueing
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert not pub.send(frame_set("node1", 2))
        with LatentSubscriber(endpoint, latest_only=False) as second:
            wait_until_subscribed(second, [pub])
            assert pub.send(frame_set("node1", 3))
            received = second.recv(2000)
    finally:
        pub.close()
    assert received is not None and decode_frameset(received).seq == 3


@pytest.mark.parametrize("latest_only", [True, False])
def test_a_multipart_message_is_reported_or_reduced_to_its_last_part(latest_only: bool) -> None:
    """PROTOCOL.md 10.1: without CONFLATE every part arrives and the count is reported (the
    receiver drops it); libzmq's CONFLATE keeps only the last part, which then stands alone."""
    valid = frame_set("node1", 1)
    with (
        LatentSubscriber(ANY_PORT, latest_only=latest_only) as sub,
        zmq.Context() as context,
        context.socket(zmq.XPUB) as pub,
    ):
        pub.setsockopt(zmq.LINGER, 0)
        pub.connect(sub.endpoints[0])
        deadline = time.monotonic() + 5.0
        while not pub.poll(0):  # wait for the subscription notice, servicing the receiver
            assert sub.recv_message(5) is None and time.monotonic() < deadline
        assert pub.recv() == b"\x01"
        pub.send_multipart([b"", valid])
        received = sub.recv_message(2000)
        assert received is not None
        assert sub.recv_message(100) is None, "one message, not one per part"
    assert received.data == valid
    assert received.parts == (1 if latest_only else 2)


@pytest.mark.parametrize("endpoints", [[], "localhost:5555", ["tcp://127.0.0.1:not-a-port"]])
def test_bad_endpoints_raise_config_error(endpoints: object) -> None:
    with pytest.raises(ConfigError):
        LatentSubscriber(endpoints)  # type: ignore[arg-type]


# --- what the edge learns of a receiver that refuses it (PROTOCOL.md 10.2, issue 17 item 6) ---

FP_A, FP_B = "0f1e2d3c4b5a6978" * 4, "ffeeddccbbaa9988" * 4  # two encoders' fingerprints


def settle(sub: LatentSubscriber, pub: LatentPublisher, want: str, timeout: float = 5.0) -> str:
    """Service the receiver until the node's view of it is ``want`` (or the time is up)."""
    deadline = time.monotonic() + timeout
    while (state := pub.receiver_state()) != want and time.monotonic() < deadline:
        assert sub.recv(5) is None, "nothing was sent"
    return state


@pytest.mark.parametrize(
    ("who", "state", "hint"),
    [
        ("unlisted", "refused(auth)", "not in the receiver's --allow folder"),
        ("wrong-server-key", "refused(handshake)", "is --server-key that receiver's public key"),
        ("no-curve", "refused(handshake)", "give --keys and --server-key"),  # either detail
    ],
)
def test_a_refused_handshake_is_an_authentication_error_not_receiver_none(
    curve_keys: CurveTrio, caplog: pytest.LogCaptureFixture, who: str, state: str, hint: str
) -> None:
    server, _, intruder = curve_keys
    bogus_server = CurveClientKeys(intruder.public, intruder.secret, intruder.public)
    curve = {"unlisted": intruder, "no-curve": None, "wrong-server-key": bogus_server}[who]
    with (
        caplog.at_level(logging.WARNING, logger="mvld.common.transport"),
        LatentSubscriber(ANY_PORT, curve=server, fingerprint=FP_A) as sub,
        LatentPublisher(sub.endpoints, curve=curve, fingerprint=FP_A) as pub,
    ):
        assert pub.receiver_state() == "none", "nothing is known before the handshake"
        assert settle(sub, pub, state) == state
        assert not pub.has_subscriber and not pub.send(frame_set("intruder", 0))
        pub.receiver_state()
    refusals = [r.getMessage() for r in caplog.records if "refuses this node" in r.getMessage()]
    assert len(refusals) == 1, "a change of state is logged once, not per frame set"
    assert hint in refusals[0] and sub.endpoints[0] in refusals[0]


def test_an_allowed_node_of_the_right_model_sees_the_receiver_up(curve_keys: CurveTrio) -> None:
    server, node, _ = curve_keys
    with (
        LatentSubscriber(ANY_PORT, curve=server, fingerprint=FP_A) as sub,
        LatentPublisher(sub.endpoints, curve=node, fingerprint=FP_A) as pub,
    ):
        assert settle(sub, pub, "up") == "up"
        assert pub.receiver_fingerprints == {FP_A[:16]}
        assert pub.send(frame_set("node1", 3))
        received = sub.recv_message(2000)
    assert received is not None and decode_frameset(received.data).seq == 3


@pytest.mark.parametrize("latest_only", [True, False])
def test_a_receiver_of_another_model_is_reported_as_refusing_the_fingerprint(
    caplog: pytest.LogCaptureFixture, latest_only: bool
) -> None:
    """The receiver's X-MVLD-Enc handshake property reaches the node with CONFLATE on or off,
    and the subscription it rides on still delivers every message exactly once."""
    with (
        caplog.at_level(logging.WARNING, logger="mvld.common.transport"),
        LatentSubscriber(ANY_PORT, latest_only=latest_only, fingerprint=FP_B) as sub,
        LatentPublisher(sub.endpoints, fingerprint=FP_A) as pub,
    ):
        assert settle(sub, pub, "refused(fingerprint)") == "refused(fingerprint)"
        assert pub.receiver_fingerprints == {FP_B[:16]} and pub.has_subscriber
        assert pub.send(frame_set("node1", 1))  # still sent: the receiver counts the drop
        assert [decode_frameset(d).seq for d in drain(sub)] == [1]
    [warning] = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert FP_B[:16] in warning and FP_A[:16] in warning


@pytest.mark.parametrize(
    ("receiver_cameras", "state"),
    [
        (("cam0", "cam1", "cam2"), "up"),
        (("cam0", "cam1", "cam2", "cam3"), "up"),  # a camera may be absent (PROTOCOL.md 8)
        (("cam0", "cam1"), "refused(cameras)"),  # cam2 is unknown there: every set is dropped
        (("left", "right", "rear"), "refused(cameras)"),
    ],
)
def test_a_receiver_without_one_of_the_nodes_cameras_is_reported(
    receiver_cameras: tuple[str, ...], state: str
) -> None:
    with (
        LatentSubscriber(ANY_PORT, fingerprint=FP_A, camera_ids=receiver_cameras) as sub,
        LatentPublisher(
            sub.endpoints, fingerprint=FP_A, camera_ids=("cam0", "cam1", "cam2")
        ) as pub,
    ):
        assert settle(sub, pub, state) == state


def test_a_receiver_that_advertises_nothing_is_simply_up() -> None:
    """A third-party receiver need not set X-MVLD-Enc; the node cannot compare, so it is up."""
    with (
        LatentSubscriber(ANY_PORT) as sub,
        LatentPublisher(sub.endpoints, fingerprint=FP_A) as pub,
    ):
        assert settle(sub, pub, "up") == "up" and pub.receiver_fingerprints == frozenset()


def test_the_fingerprint_property_is_readable_by_any_xpub_client() -> None:
    """What PROTOCOL.md 10.2 tells a third-party client: read X-MVLD-Enc off the notice."""
    with (
        LatentSubscriber(ANY_PORT, fingerprint=FP_B, camera_ids=("cam0", "gate")) as sub,
        zmq.Context() as context,
        context.socket(zmq.XPUB) as pub,
    ):
        pub.setsockopt(zmq.LINGER, 0)
        pub.connect(sub.endpoints[0])
        deadline = time.monotonic() + 5.0
        while not pub.poll(0):
            assert sub.recv(5) is None and time.monotonic() < deadline
        notice = pub.recv(copy=False)
    assert notice.bytes == b"\x01" and notice.get(FINGERPRINT_PROPERTY) == FP_B[:16]
    assert notice.get(CAMERAS_PROPERTY) == '["cam0", "gate"]'  # a JSON array


def test_a_fingerprint_that_is_no_hex_digest_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="encoder fingerprint"):
        LatentSubscriber(ANY_PORT, fingerprint="not-hex")
    with pytest.raises(ConfigError, match="encoder fingerprint"):
        LatentPublisher("tcp://127.0.0.1:1", fingerprint="not-hex")
