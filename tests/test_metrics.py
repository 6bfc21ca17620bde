"""Prometheus text-format registry and its HTTP endpoint (real sockets, real HTTP)."""

import re
import threading
import urllib.error
import urllib.request

import pytest

from mvld.common.errors import ConfigError
from mvld.common.metrics import CONTENT_TYPE, MetricsRegistry, MetricsServer

# One sample line of the text exposition format 0.0.4.
SAMPLE = re.compile(
    r'^[a-zA-Z_:][a-zA-Z0-9_:]*(\{([a-zA-Z_][a-zA-Z0-9_]*="([^"\\]|\\.)*",?)*\})? '
    r"(-?[0-9.e+-]+|\+Inf|-Inf|NaN)$"
)


def parse_samples(text: str) -> dict[str, float]:
    """``{'name{labels}': value}`` of every sample; asserts every line is well formed."""
    samples = {}
    assert text.endswith("\n")
    for line in text.splitlines():
        if line.startswith("# HELP ") or line.startswith("# TYPE "):
            continue
        assert SAMPLE.match(line), f"malformed sample line: {line!r}"
        key, value = line.rsplit(" ", 1)
        samples[key] = float(value)
    return samples


def test_counter_gauge_and_labels_render_in_text_format() -> None:
    registry = MetricsRegistry()
    frames = registry.counter("frames_total", "Frames", ["camera"])
    state = registry.gauge("camera_up", "Up?", ["camera"])
    registry.counter("events_total", "Events")
    frames.inc(camera="cam0")
    frames.inc(2, camera="cam0")
    frames.inc(camera='we"ird\\name\n')
    state.set(1, camera="cam0")
    state.inc(-1, camera="cam0")
    text = registry.render()
    samples = parse_samples(text)
    assert samples['frames_total{camera="cam0"}'] == 3
    assert samples['frames_total{camera="we\\"ird\\\\name\\n"}'] == 1
    assert samples['camera_up{camera="cam0"}'] == 0
    assert samples["events_total"] == 0  # an unlabelled series exists from the start
    assert "# TYPE frames_total counter" in text and "# TYPE camera_up gauge" in text
    assert frames.value(camera="cam0") == 3


def test_histogram_buckets_are_cumulative_with_sum_and_count() -> None:
    registry = MetricsRegistry()
    latency = registry.histogram("latency_seconds", "Latency", ["stage"], buckets=(0.1, 1.0))
    for value in (0.05, 0.1, 0.5, 3.0):
        latency.observe(value, stage="encode")
    samples = parse_samples(registry.render())
    assert samples['latency_seconds_bucket{stage="encode",le="0.1"}'] == 2  # le is inclusive
    assert samples['latency_seconds_bucket{stage="encode",le="1"}'] == 3
    assert samples['latency_seconds_bucket{stage="encode",le="+Inf"}'] == 4
    assert samples['latency_seconds_count{stage="encode"}'] == 4
    assert samples['latency_seconds_sum{stage="encode"}'] == pytest.approx(3.65)
    assert latency.count(stage="encode") == 4


def test_misuse_is_refused() -> None:
    registry = MetricsRegistry()
    counter = registry.counter("a_total", "A", ["camera"])
    with pytest.raises(ConfigError, match="already registered"):
        registry.gauge("a_total", "again")
    with pytest.raises(ConfigError, match="cannot decrease"):
        counter.inc(-1, camera="x")
    with pytest.raises(ConfigError, match="takes labels"):
        counter.inc(camera="x", extra="y")
    with pytest.raises(ConfigError, match="invalid metric name"):
        registry.counter("bad-name", "x")
    with pytest.raises(ConfigError, match="invalid label name"):
        registry.histogram("h", "x", ["le"])


def test_concurrent_increments_are_not_lost() -> None:
    registry = MetricsRegistry()
    counter = registry.counter("n_total", "N", ["t"])

    def work() -> None:
        for _ in range(5000):
            counter.inc(t="x")

    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert counter.value(t="x") == 20000


def test_server_serves_metrics_over_http() -> None:
    registry = MetricsRegistry()
    registry.counter("served_total", "Served").inc(7)
    with MetricsServer(registry, port=0, host="127.0.0.1") as server:
        url = f"http://127.0.0.1:{server.port}"
        with urllib.request.urlopen(f"{url}/metrics", timeout=5) as response:
            assert response.status == 200
            assert response.headers["Content-Type"] == CONTENT_TYPE
            assert parse_samples(response.read().decode())["served_total"] == 7
        with pytest.raises(urllib.error.HTTPError) as missing:
            urllib.request.urlopen(f"{url}/other", timeout=5)
        assert missing.value.code == 404


def test_a_busy_port_is_a_config_error() -> None:
    registry = MetricsRegistry()
    with (
        MetricsServer(registry, port=0, host="127.0.0.1") as server,
        pytest.raises(ConfigError, match="cannot serve metrics"),
    ):
        MetricsServer(registry, port=server.port, host="127.0.0.1")
