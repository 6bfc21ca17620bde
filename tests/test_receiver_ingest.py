"""Ingest over real loopback sockets: strict decoding, fingerprint check, counted drops, and a
per-node backlog whose size stays bounded however much is sent."""

from __future__ import annotations

import time

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from receiver_fixtures import LATENT, VIEWS, connected_publisher, frame_set, make_tiny_model, wire

from mvld.common.transport import LatentSubscriber
from mvld.common.wire import FrameSetMessage, ReasonCode, ViewRecord, ViewStatus, encode_frameset
from mvld.receiver.ingest import CameraLayout, Ingest, NodeBacklog, PendingFrameSet, assemble
from mvld.receiver.observability import ReceiverMetrics


@pytest.fixture(scope="module")
def model():
    return make_tiny_model()


@pytest.fixture
def ingest(model):
    metrics = ReceiverMetrics()
    subscriber = LatentSubscriber("tcp://127.0.0.1:0", latest_only=False, recv_hwm=1000)
    backlog = NodeBacklog(metrics, per_node=8)
    ingest = Ingest(subscriber, CameraLayout.default(VIEWS, LATENT), model.fingerprint, backlog,
                    metrics, warn_interval_s=60.0)
    yield ingest
    subscriber.close()


def _publisher(ingest: Ingest):
    return connected_publisher(ingest.subscriber.endpoints[0], subscriber=ingest.subscriber)


def _receive(ingest: Ingest, count: int, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    handled = 0
    while handled < count:
        assert time.monotonic() < deadline, f"received {handled} of {count} messages"
        handled += ingest.poll(50)


def test_good_frame_set_is_queued_in_model_order(ingest: Ingest, model) -> None:
    message = frame_set(model, "node-a", 7, failed=("cam1",))
    with _publisher(ingest) as publisher:
        assert publisher.send(encode_frameset(message))
        _receive(ingest, 1)
    [item] = ingest.backlog.take(10)
    assert (item.message.node_id, item.message.seq) == ("node-a", 7)
    assert item.present.tolist() == [True, False, True]
    assert np.array_equal(item.latents[0], message.views[0].latent)
    assert not item.latents[1].any(), "a missing view's slot is zero, never garbage"
    assert item.records[1].status is ViewStatus.FAILED
    assert ingest.metrics.accepted.value() == 1 and ingest.metrics.drops() == {}


def test_fingerprint_mismatch_is_counted_and_rejected(ingest: Ingest, model) -> None:
    with _publisher(ingest) as publisher:
        publisher.send(wire(model, "node-a", 0, fingerprint="0" * 64))
        publisher.send(wire(model, "node-a", 1))
        _receive(ingest, 2)
    assert ingest.metrics.drops() == {"fingerprint": 1}
    assert ingest.metrics.dropped.value(reason="fingerprint") == 1
    assert [item.message.seq for item in ingest.backlog.take(10)] == [1]


def _bad_messages(model) -> dict[str, list[bytes]]:
    good = frame_set(model, "node-a", 0)
    other_camera = FrameSetMessage("node-a", 1, time.time(), model.fingerprint, (
        ViewRecord("cam9", ViewStatus.OK, ReasonCode.NONE, time.time(), good.views[0].latent),))
    short_latent = FrameSetMessage("node-a", 2, time.time(), model.fingerprint, (
        ViewRecord("cam0", ViewStatus.OK, ReasonCode.NONE, time.time(),
                   np.zeros(LATENT - 1, np.float32)),))
    packed = msgpack.unpackb(encode_frameset(good), raw=False)
    return {
        "malformed": [
            b"", b"\x00garbage", b"\xc1", encode_frameset(good)[:-5],
            msgpack.packb({**packed, "v": 2}), msgpack.packb({**packed, "seq": -1}),
            msgpack.packb({**packed, "extra": 1}), msgpack.packb([1, 2, 3]),
            msgpack.packb({**packed, "views": [{**packed["views"][0], "st": "exploded"}]}),
        ],
        "unknown_camera": [encode_frameset(other_camera)],
        "latent_shape": [encode_frameset(short_latent)],
    }


def test_malformed_messages_are_counted_by_reason_and_never_crash(ingest: Ingest,
                                                                   model) -> None:
    bad = _bad_messages(model)
    with _publisher(ingest) as publisher:
        for messages in bad.values():
            for data in messages:
                assert publisher.send(data)
        publisher.send(wire(model, "node-a", 3))
        _receive(ingest, sum(map(len, bad.values())) + 1)
    assert ingest.metrics.drops() == {reason: len(m) for reason, m in bad.items()}
    assert [item.message.seq for item in ingest.backlog.take(10)] == [3], "ingest goes on"


def test_node_id_stays_bound_to_its_curve_key(ingest: Ingest, model) -> None:
    assert ingest.handle(wire(model, "node-a", 0), "KEY-A", time.time())
    assert not ingest.handle(wire(model, "node-a", 1), "KEY-B", time.time())
    assert ingest.handle(wire(model, "node-b", 0), "KEY-B", time.time())
    assert ingest.metrics.drops() == {"node_key": 1}


def _pending(node: str, seq: int, receive_time: float | None = None) -> PendingFrameSet:
    views = VIEWS
    return PendingFrameSet(
        message=FrameSetMessage(node, seq, 0.0, "f", (ViewRecord("cam0", "failed", "timeout",
                                                                 None),)),
        receive_time=time.time() if receive_time is None else receive_time, client_key=None,
        latents=np.zeros((views, LATENT), np.float32), present=np.zeros(views, bool),
        records=(None,) * views)


def test_backlog_stays_bounded_under_overload_and_counts_every_drop() -> None:
    metrics = ReceiverMetrics()
    backlog = NodeBacklog(metrics, per_node=4, max_nodes=16)
    sent = 0
    for seq in range(2000):
        for node in range(20):  # 4 nodes more than tracked
            backlog.put(_pending(f"n{node}", seq))
            sent += 1
            assert len(backlog) <= 16 * 4
    drops = metrics.drops()
    assert drops["too_many_nodes"] == 4 * 2000
    assert drops["superseded"] == 16 * 2000 - 16 * 4
    assert len(backlog) == 16 * 4
    assert sent == len(backlog) + sum(drops.values()), "every frame set is accounted for"


def test_take_prefers_the_newest_of_every_node_and_drops_stale() -> None:
    metrics = ReceiverMetrics()
    backlog = NodeBacklog(metrics, per_node=4, max_age_s=1.0)
    now = time.time()
    for seq in range(4):
        backlog.put(_pending("a", seq, now - 0.1 * (3 - seq)))
        backlog.put(_pending("b", seq, now - 0.1 * (3 - seq)))
    taken = backlog.take(2, now)
    assert sorted((i.message.node_id, i.message.seq) for i in taken) == [("a", 3), ("b", 3)]
    assert len(backlog) == 6
    later = backlog.take(100, now + 0.85)  # seq 0 and 1 are then older than 1 s
    assert sorted((i.message.node_id, i.message.seq) for i in later) == [("a", 2), ("b", 2)]
    assert metrics.drops() == {"stale": 4}
    assert len(backlog) == 0


def test_sequence_gaps_are_counted(model) -> None:
    metrics = ReceiverMetrics()
    backlog = NodeBacklog(metrics)
    layout = CameraLayout.default(VIEWS, LATENT)
    for seq in (0, 1, 5, 6):
        backlog.put(assemble(frame_set(model, "a", seq), layout, time.time(), None))
    assert metrics.seq_gaps.value() == 3


_MSGPACK_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats()
    | st.text(max_size=20) | st.binary(max_size=64),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner,
                                                                max_size=4),
    max_leaves=10)


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=512) | _MSGPACK_VALUES.map(
    lambda value: msgpack.packb(value, use_bin_type=True)))
def test_any_bytes_are_dropped_with_a_reason_never_raised(ingest: Ingest, data: bytes) -> None:
    before = sum(ingest.metrics.drops().values())
    assert ingest.handle(data, None, time.time()) is False
    assert sum(ingest.metrics.drops().values()) == before + 1


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(key=st.sampled_from(["v", "node", "seq", "t", "enc", "views"]), value=_MSGPACK_VALUES)
def test_a_mutated_field_is_dropped_or_accepted_never_raised(ingest: Ingest, model, key: str,
                                                              value: object) -> None:
    packed = msgpack.unpackb(wire(model, "node-a", 0), raw=False)
    data = msgpack.packb({**packed, key: value}, use_bin_type=True)
    accepted_before = ingest.metrics.accepted.value()
    drops_before = sum(ingest.metrics.drops().values())
    ingest.handle(data, None, time.time())
    accepted = ingest.metrics.accepted.value() - accepted_before
    assert accepted + sum(ingest.metrics.drops().values()) - drops_before == 1
    assert ingest.metrics.drops().get("internal_error", 0) == 0
