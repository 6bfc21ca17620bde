"""Per-node rate limit: token buckets in bounded memory, and ingest drops counted as ``rate``."""

import pytest
from receiver_fixtures import LATENT, VIEWS, frame_set, make_tiny_model

from mvld.common.errors import ConfigError
from mvld.common.transport import LatentSubscriber
from mvld.common.wire import encode_frameset
from mvld.receiver.ingest import CameraLayout, Ingest, NodeBacklog
from mvld.receiver.observability import ReceiverMetrics
from mvld.receiver.rate_limit import RateLimiter


class FakeClock:
    """A clock the test moves by hand (time itself, not the component under test)."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_bucket_allows_the_burst_then_the_rate() -> None:
    clock = FakeClock()
    limiter = RateLimiter(10, burst=5, clock=clock)
    assert [limiter.allow("a") for _ in range(7)] == [True] * 5 + [False] * 2
    clock.now += 0.25  # 2.5 tokens refilled
    assert [limiter.allow("a") for _ in range(3)] == [True, True, False]
    assert limiter.allow("b"), "another sender has its own bucket"


def test_memory_is_bounded_by_max_senders() -> None:
    limiter = RateLimiter(1, max_senders=100, clock=FakeClock())
    for i in range(1000):
        limiter.allow(f"node{i}")
    assert len(limiter) == 100


@pytest.mark.parametrize("rate, burst", [(0, None), (-1, None), (5, 0.5)])
def test_bad_limits_are_config_errors(rate: float, burst: float | None) -> None:
    with pytest.raises(ConfigError):
        RateLimiter(rate, burst)


def test_ingest_drops_a_flooding_node_and_keeps_a_normal_one() -> None:
    model = make_tiny_model()
    metrics = ReceiverMetrics()
    clock = FakeClock()
    with LatentSubscriber("tcp://127.0.0.1:0") as subscriber:
        ingest = Ingest(
            subscriber,
            CameraLayout.default(VIEWS, LATENT),
            model.fingerprint,
            NodeBacklog(metrics, per_node=1000),
            metrics,
            warn_interval_s=60.0,
            rate_limiter=RateLimiter(30, clock=clock),
        )
        flood = [encode_frameset(frame_set(model, "flood", seq)) for seq in range(100)]
        normal = [encode_frameset(frame_set(model, "normal", seq)) for seq in range(10)]
        for data in flood:
            ingest.handle(data, None, clock.now)
        for data in normal:
            ingest.handle(data, None, clock.now)
        assert metrics.drops() == {"rate": 70}
        assert metrics.accepted.value() == 40
        clock.now += 1.0
        assert ingest.handle(flood[0], None, clock.now), "the bucket refills with time"
