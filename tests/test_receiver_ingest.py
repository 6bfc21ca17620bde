"""Ingest over real loopback sockets: strict decoding, fingerprint check (both protocol
versions), exact latent shapes, duplicate and multipart messages, the clock window, counted
drops, and a per-node backlog whose size stays bounded however much is sent."""

from __future__ import annotations

import time

import msgpack
import numpy as np
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from receiver_fixtures import LATENT, VIEWS, connected_publisher, frame_set, make_tiny_model, wire

from mvld.common.transport import LatentSubscriber
from mvld.common.wire import (
    FrameSetMessage,
    ReasonCode,
    ViewRecord,
    ViewStatus,
    decode_frameset,
    encode_frameset,
    quantize_latent,
)
from mvld.receiver.ingest import (
    CameraLayout,
    Ingest,
    NodeBacklog,
    PendingFrameSet,
    RejectionError,
    assemble,
)
from mvld.receiver.observability import DROP_REASONS, ReceiverMetrics


@pytest.fixture(scope="module")
def model():
    return make_tiny_model()


@pytest.fixture
def ingest(model):
    metrics = ReceiverMetrics()
    subscriber = LatentSubscriber("tcp://127.0.0.1:0", latest_only=False, recv_hwm=1000)
    backlog = NodeBacklog(metrics, per_node=8)
    ingest = Ingest(
        subscriber,
        CameraLayout.default(VIEWS, LATENT),
        model.fingerprint,
        backlog,
        metrics,
        warn_interval_s=60.0,
    )
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
    other_camera = FrameSetMessage(
        "node-a",
        1,
        time.time(),
        model.fingerprint,
        (ViewRecord("cam9", ViewStatus.OK, ReasonCode.NONE, time.time(), good.views[0].latent),),
    )
    short_latent = FrameSetMessage(
        "node-a",
        2,
        time.time(),
        model.fingerprint,
        (
            ViewRecord(
                "cam0",
                ViewStatus.OK,
                ReasonCode.NONE,
                time.time(),
                np.zeros(LATENT - 1, np.float32),
            ),
        ),
    )
    packed = msgpack.unpackb(encode_frameset(good), raw=False)
    return {
        "malformed": [
            b"",
            b"\x00garbage",
            b"\xc1",
            encode_frameset(good)[:-5],
            msgpack.packb({**packed, "v": 3}),
            msgpack.packb({**packed, "seq": -1}),
            msgpack.packb({**packed, "extra": 1}),
            msgpack.packb([1, 2, 3]),
            msgpack.packb({**packed, "views": [{**packed["views"][0], "st": "exploded"}]}),
        ],
        "unknown_camera": [encode_frameset(other_camera)],
        "latent_shape": [encode_frameset(short_latent)],
    }


def test_malformed_messages_are_counted_by_reason_and_never_crash(ingest: Ingest, model) -> None:
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
        message=FrameSetMessage(
            node, seq, 0.0, "0f1e2d3c4b5a6978", (ViewRecord("cam0", "failed", "timeout", None),)
        ),
        receive_time=time.time() if receive_time is None else receive_time,
        client_key=None,
        latents=np.zeros((views, LATENT), np.float32),
        present=np.zeros(views, bool),
        records=(None,) * views,
    )


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


def test_a_repeated_seq_is_counted_as_duplicate_and_dropped(ingest: Ingest, model) -> None:
    """Issue 18, item 5: the same seq again used to be delivered twice ("restarted?")."""
    with _publisher(ingest) as publisher:
        for seq in (4, 4, 5, 5, 5, 0):  # 0: a smaller seq is a restart, still delivered
            assert publisher.send(wire(model, "node-a", seq))
        publisher.send(wire(model, "node-b", 4))  # the same seq from another node is fine
        _receive(ingest, 7)
    assert ingest.metrics.drops() == {"duplicate": 3}
    assert sorted((i.message.node_id, i.message.seq) for i in ingest.backlog.take(10)) == [
        ("node-a", 0),
        ("node-a", 4),
        ("node-a", 5),
        ("node-b", 4),
    ]


def test_a_multipart_message_is_malformed(ingest: Ingest, model) -> None:
    """Issue 18, item 6: ``[b"", valid]`` must not be delivered as ``valid``."""
    valid = wire(model, "node-a", 0)
    with zmq.Context() as context, context.socket(zmq.XPUB) as pub:
        pub.setsockopt(zmq.LINGER, 0)
        pub.connect(ingest.subscriber.endpoints[0])
        deadline = time.monotonic() + 5.0
        while not pub.poll(0):
            assert not ingest.poll(5) and time.monotonic() < deadline
        pub.recv()
        pub.send_multipart([b"", valid])
        pub.send_multipart([valid, valid])
        pub.send(valid)
        _receive(ingest, 3)
    assert ingest.metrics.drops() == {"malformed": 2}
    assert len(ingest.backlog.take(10)) == 1


def _message(
    model,
    seq: int,
    shape: tuple[int, ...],
    version: int = 2,
    dtype: str = "float32",
    fingerprint: str | None = None,
) -> bytes:
    latents = frame_set(model, "node-a", seq, failed=()).views
    views = tuple(
        ViewRecord(
            v.camera_id,
            "ok",
            "none",
            v.capture_time,
            quantize_latent(np.asarray(v.latent).reshape(shape), dtype),
        )
        for v in latents
    )
    return encode_frameset(
        FrameSetMessage(
            "node-a", seq, time.time(), fingerprint or model.fingerprint, views, version
        )
    )


def test_latent_shape_is_checked_exactly(ingest: Ingest, model) -> None:
    """Issue 18, item 3: any shape with the right element count used to be accepted."""
    good = [
        _message(model, 0, (LATENT,)),
        _message(model, 1, (LATENT,), version=1),
        _message(model, 2, (LATENT,), dtype="int8"),
        _message(model, 3, (LATENT,), dtype="float16"),
    ]
    bad = [
        _message(model, 10, (1, LATENT)),
        _message(model, 11, (2, LATENT // 2)),
        _message(model, 12, (LATENT // 2, 2), version=1),
    ]
    for data in good + bad:
        ingest.handle(data, None, time.time())
    assert ingest.metrics.drops() == {"latent_shape": len(bad)}
    items = ingest.backlog.take(10)
    assert sorted(i.message.seq for i in items) == [0, 1, 2, 3]
    exact = next(i for i in items if i.message.seq == 0)
    assert np.array_equal(
        exact.latents, np.stack([v.latent for v in frame_set(model, "node-a", 0, failed=()).views])
    )
    dequantized = next(i for i in items if i.message.seq == 2).latents
    floats = np.stack([v.latent for v in frame_set(model, "node-a", 2, failed=()).views])
    per_view_scale = np.abs(floats).max(axis=1, keepdims=True) / 127
    assert (np.abs(dequantized - floats) <= per_view_scale / 2 + 1e-6).all()


def test_a_spatial_model_takes_its_grid_in_v2_and_the_flat_vector_in_v1(model) -> None:
    layout = CameraLayout.default(VIEWS, LATENT, (4, 2, 2))
    for data, version, accepted in [
        (_message(model, 0, (4, 2, 2)), 2, True),
        (_message(model, 0, (LATENT,)), 2, False),
        (_message(model, 0, (LATENT,), version=1), 1, True),
        (_message(model, 0, (4, 2, 2), version=1), 1, False),
    ]:
        message = decode_frameset(data)
        assert message.version == version
        try:
            item = assemble(message, layout, time.time(), None)
        except RejectionError as exc:
            assert not accepted and exc.reason == "latent_shape"
        else:
            assert accepted and item.latents.shape == (VIEWS, LATENT) and item.present.all()


def test_fingerprints_of_both_versions_are_compared_in_their_own_form(
    ingest: Ingest, model
) -> None:
    other = "f" * 64
    same_prefix = model.fingerprint[:16] + "0" * 48  # v2 sees only the first 8 bytes
    messages = {
        "v2": _message(model, 0, (LATENT,)),
        "v1": _message(model, 1, (LATENT,), version=1),
        "v2-other": _message(model, 2, (LATENT,), fingerprint=other),
        "v1-other": _message(model, 3, (LATENT,), version=1, fingerprint=other),
        "v1-short": _message(model, 4, (LATENT,), version=1, fingerprint=model.fingerprint[:16]),
        "v2-prefix": _message(model, 5, (LATENT,), fingerprint=same_prefix),
    }
    for data in messages.values():
        ingest.handle(data, None, time.time())
    assert ingest.metrics.drops() == {"fingerprint": 3}
    assert sorted(i.message.seq for i in ingest.backlog.take(10)) == [0, 1, 5]


@pytest.mark.parametrize(
    ("send_time", "capture_time", "in_window"),
    [
        (None, None, True),
        (0.0, None, False),  # issue 18, item 4: t = 0 and t = 1e15 poisoned the latency figures
        (1e15, None, False),
        (None, 0.0, False),
        (None, 1e15, False),
        ("past", None, False),
        ("future", "future", False),
        ("near", "near", True),
    ],
)
def test_times_outside_the_clock_window_are_counted_and_flagged(
    ingest: Ingest,
    model,
    send_time: float | str | None,
    capture_time: float | str | None,
    in_window: bool,
) -> None:
    now = time.time()
    shift = {"past": now - 61.0, "future": now + 61.0, "near": now - 59.0}
    good = frame_set(model, "node-a", 0, capture_time=shift.get(capture_time, capture_time))  # type: ignore[arg-type]
    t = shift.get(send_time, send_time) if send_time is not None else good.send_time
    message = FrameSetMessage("node-a", 0, t, model.fingerprint, good.views)
    assert ingest.handle(encode_frameset(message), None, now)
    [item] = ingest.backlog.take(1)
    assert item.clock_ok is in_window
    assert ingest.metrics.clock_window.value() == (0 if in_window else 1)
    assert ingest.metrics.drops() == {}, "delivered, not dropped"


_MSGPACK_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=20)
    | st.binary(max_size=64),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4)
    ),
    max_leaves=10,
)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    data=st.binary(max_size=512)
    | _MSGPACK_VALUES.map(lambda value: msgpack.packb(value, use_bin_type=True))
)
def test_any_bytes_are_dropped_with_a_reason_never_raised(ingest: Ingest, data: bytes) -> None:
    before = sum(ingest.metrics.drops().values())
    assert ingest.handle(data, None, time.time()) is False
    assert sum(ingest.metrics.drops().values()) == before + 1


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(key=st.sampled_from(["v", "node", "seq", "t", "enc", "views"]), value=_MSGPACK_VALUES)
def test_a_mutated_field_is_dropped_or_accepted_never_raised(
    ingest: Ingest, model, key: str, value: object
) -> None:
    packed = msgpack.unpackb(wire(model, "node-a", 0), raw=False)
    data = msgpack.packb({**packed, key: value}, use_bin_type=True)
    accepted_before = ingest.metrics.accepted.value()

    def refused() -> int:  # a duplicate seq is accepted first, then dropped by the backlog
        return sum(n for reason, n in ingest.metrics.drops().items() if reason != "duplicate")

    drops_before = refused()
    ingest.handle(data, None, time.time())
    accepted = ingest.metrics.accepted.value() - accepted_before
    assert accepted + refused() - drops_before == 1
    assert ingest.metrics.drops().get("internal_error", 0) == 0


def test_drop_reasons_are_one_closed_vocabulary() -> None:
    """Every drop is counted under a reason from DROP_REASONS, so dashboards and docs can list
    them all; an unlisted reason is a bug and says so instead of inventing a label."""
    metrics = ReceiverMetrics()
    for reason in DROP_REASONS:
        metrics.drop(reason)
    assert metrics.drops() == dict.fromkeys(DROP_REASONS, 1)
    with pytest.raises(ValueError, match="DROP_REASONS"):
        metrics.drop("worker_gone")
