"""Adaptive micro-batching: the cost model, the latency-budget policy (pure: the clock is an
input) and the batcher on the real NodeBacklog, woken by real arrivals from another thread."""

from __future__ import annotations

import math
import threading
import time

import numpy as np
import pytest

from mvld.common.errors import ConfigError
from mvld.common.wire import FrameSetMessage, ViewRecord
from mvld.receiver.batcher import BatchCostModel, BatchPolicy, MicroBatcher
from mvld.receiver.config import ReceiverConfig, backlog_depth
from mvld.receiver.ingest import NodeBacklog, PendingFrameSet
from mvld.receiver.observability import ReceiverMetrics

VIEWS, LATENT = 3, 4


def _pending(node: str, seq: int) -> PendingFrameSet:
    return PendingFrameSet(
        message=FrameSetMessage(
            node, seq, 0.0, "0f1e2d3c4b5a6978", (ViewRecord("cam0", "failed", "timeout", None),)
        ),
        receive_time=time.time(),
        client_key=None,
        latents=np.zeros((VIEWS, LATENT), np.float32),
        present=np.zeros(VIEWS, bool),
        records=(None,) * VIEWS,
    )


def _cost(fixed_s: float, per_item_s: float) -> BatchCostModel:
    cost = BatchCostModel()
    for size in (1, 4, 16, 1, 4, 16):
        cost.observe(size, fixed_s + per_item_s * size)
    return cost


def test_cost_model_fits_fixed_and_per_item_seconds() -> None:
    cost = _cost(0.05, 0.01)
    assert cost.fixed_s == pytest.approx(0.05) and cost.per_item_s == pytest.approx(0.01)
    assert cost.predict(10) == pytest.approx(0.15)
    assert cost.largest_within(0.15, 64) == 10
    assert cost.largest_within(0.01, 64) == 64, "over budget at any size: batch for throughput"
    assert cost.largest_within(100.0, 64) == 64


def test_cost_model_with_one_batch_size_is_proportional_and_follows_a_slower_machine() -> None:
    cost = BatchCostModel()
    assert not cost.observed and cost.predict(8) == 0.0
    cost.observe(4, 0.2)
    assert cost.predict(8) == pytest.approx(0.4), "proportional: the safe side for larger B"
    for _ in range(60):  # the machine got 3x slower
        cost.observe(4, 0.6)
    assert cost.predict(4) == pytest.approx(0.6, rel=0.01)


def test_policy_takes_a_full_batch_and_a_late_one_at_once() -> None:
    policy = BatchPolicy(max_batch=8, latency_budget_s=0.2)
    cost = _cost(0.05, 0.001)
    assert policy.wait_s(waiting=8, oldest_age_s=0.0, arrivals_per_s=100, cost=cost) == 0
    # 3 frame sets take 53 ms: at 0.14 s old there is time to wait, at 0.15 s not
    assert policy.wait_s(waiting=3, oldest_age_s=0.14, arrivals_per_s=1000, cost=cost) > 0
    assert policy.wait_s(waiting=3, oldest_age_s=0.15, arrivals_per_s=1000, cost=cost) == 0


def test_policy_waits_only_when_the_batch_would_not_keep_up() -> None:
    policy = BatchPolicy(max_batch=64, latency_budget_s=0.2)
    cost = _cost(0.05, 0.001)  # B=2 takes 52 ms: 38 frame sets/s
    assert policy.wait_s(waiting=2, oldest_age_s=0.0, arrivals_per_s=30, cost=cost) == 0
    wait = policy.wait_s(waiting=2, oldest_age_s=0.01, arrivals_per_s=200, cost=cost)
    assert wait == pytest.approx(0.2 - 0.01 - cost.predict(3))
    # the next arrival (every 0.5 s) cannot join within the budget: go now
    assert policy.wait_s(waiting=1, oldest_age_s=0.0, arrivals_per_s=2, cost=_cost(0.05, 0.1)) == 0
    assert policy.wait_s(waiting=0, oldest_age_s=0.0, arrivals_per_s=2, cost=cost) == math.inf


def test_policy_caps_the_batch_at_what_the_budget_can_process() -> None:
    policy = BatchPolicy(max_batch=64, latency_budget_s=0.2)
    cost = _cost(0.02, 0.03)
    assert policy.batch_limit(cost) == 6  # 0.02 + 0.03 * 6 = 0.2
    assert policy.wait_s(waiting=6, oldest_age_s=0.0, arrivals_per_s=1000, cost=cost) == 0
    assert policy.batch_limit(BatchCostModel()) == 64, "nothing measured: max_batch"


def test_bad_policy_bounds_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="latency budget"):
        BatchPolicy(max_batch=4, latency_budget_s=0)
    with pytest.raises(ConfigError, match="max batch"):
        MicroBatcher(NodeBacklog(ReceiverMetrics()), max_batch=0)
    with pytest.raises(ConfigError, match="--latency-budget-ms"):
        ReceiverConfig(latency_budget_ms=-1)


def test_default_backlog_holds_what_one_node_sends_within_the_budget() -> None:
    assert ReceiverConfig().backlog_per_node == backlog_depth(64, 120.0, 150.0) == 18
    assert ReceiverConfig(max_rate=0).backlog_per_node == 64
    assert ReceiverConfig(backlog_per_node=3).backlog_per_node == 3
    assert backlog_depth(2, 120.0, 150.0) == 2, "never more than a batch"


def test_budget_batch_takes_the_newest_the_budget_can_process_and_counts_the_rest() -> None:
    metrics = ReceiverMetrics()
    backlog = NodeBacklog(metrics, per_node=8)
    batcher = MicroBatcher(backlog, max_batch=64, latency_budget_s=0.2)
    for _ in range(4):
        batcher.observe(4, 0.2)  # 50 ms per frame set: 4 fit in the budget
    for seq in range(10):  # one fast node, deeper than the old default backlog of 4
        backlog.put(_pending("a", seq))
    stop = threading.Event()
    start = time.monotonic()
    items = batcher.next_items(stop)
    assert time.monotonic() - start < 0.1, "a full batch goes at once"
    assert [i.message.seq for i in items] == [6, 7, 8, 9], "the newest, handed on in order"
    assert metrics.drops() == {"superseded": 2}, "what the backlog could not hold is counted"
    assert len(backlog) == 4


def test_batches_grow_across_nodes_to_keep_up_within_the_budget() -> None:
    """Arrivals faster than single frame sets can be processed: the batcher waits for more,
    woken by each arrival, and never past the budget."""
    backlog = NodeBacklog(ReceiverMetrics(), per_node=64)
    budget_s = 0.25
    batcher = MicroBatcher(backlog, max_batch=64, latency_budget_s=budget_s)
    for size in (1, 2, 4, 8):
        batcher.observe(size, 0.05 + 0.001 * size)  # a big fixed cost per batch
    stop = threading.Event()

    def nodes() -> None:  # 4 nodes at 100 frame sets/s each
        for seq in range(60):
            for node in range(4):
                backlog.put(_pending(f"n{node}", seq))
            time.sleep(0.01)
            if stop.is_set():
                return

    sender = threading.Thread(target=nodes)
    sender.start()
    sizes, waits = [], []
    try:
        deadline = time.monotonic() + 5
        while sum(sizes) < 200 and time.monotonic() < deadline:
            start = time.monotonic()
            items = batcher.next_items(stop)
            waits.append(time.monotonic() - start)
            if items:
                sizes.append(len(items))
                time.sleep(0.05)  # the worker "processes" the batch
                batcher.observe(len(items), 0.05 + 0.001 * len(items))
    finally:
        stop.set()
        sender.join()
    assert max(sizes[1:]) > 4, f"batches across nodes and backlogs: {sizes}"
    assert max(waits) < budget_s, f"no wait past the budget: {max(waits):.3f} s"
    assert batcher.arrivals_per_s == pytest.approx(400, rel=0.5)


def test_fixed_window_wakes_as_soon_as_the_batch_is_full() -> None:
    """The constructor the cluster workers use: max_batch / max_wait_s, no budget."""
    backlog = NodeBacklog(ReceiverMetrics(), per_node=8)
    batcher = MicroBatcher(backlog, max_batch=4, max_wait_s=5.0)
    stop = threading.Event()
    backlog.put(_pending("a", 0))

    def later() -> None:
        time.sleep(0.05)
        for node in "bcd":
            backlog.put(_pending(node, 0))

    sender = threading.Thread(target=later)
    sender.start()
    start = time.monotonic()
    items = batcher.next_items(stop)
    sender.join()
    assert len(items) == 4
    assert time.monotonic() - start < 1.0, "woken by the arrivals, not the 5 s window"


def test_fixed_window_ends_at_max_wait_and_on_stop() -> None:
    backlog = NodeBacklog(ReceiverMetrics(), per_node=8)
    batcher = MicroBatcher(backlog, max_batch=4, max_wait_s=0.05)
    stop = threading.Event()
    assert batcher.next_items(stop, idle_s=0.01) == []
    backlog.put(_pending("a", 0))
    start = time.monotonic()
    assert len(batcher.next_items(stop)) == 1
    assert 0.04 <= time.monotonic() - start < 0.5
    stop.set()
    backlog.put(_pending("a", 1))
    assert batcher.next_items(stop) == []
