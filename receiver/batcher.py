"""Micro-batching: frame sets of many nodes go through one imputation call.

A batch of B frame sets costs about ``a + b*B`` seconds: ``a`` (reading the weights, Python
and kernel launches per score evaluation) is paid once per batch, so big batches are cheaper
per frame set, and every frame set in a batch waits for the whole batch.

Two policies:

- **Latency budget** (``latency_budget_s``, the receiver's default): the batcher fits
  ``a + b*B`` online from the batches the worker reports (:meth:`MicroBatcher.observe`) and
  takes a batch as soon as (a) ``max_batch`` frame sets wait, (b) the oldest one's age plus the
  predicted time of the batch would exceed the budget, (c) a batch of what waits now keeps up
  with the measured arrival rate (waiting longer would only add latency), or (d) no further
  frame set is expected before the budget runs out. A batch never holds more frame sets than
  the budget lets it process; the rest stay queued, newest first per node, and are dropped and
  counted by the backlog (superseded / stale) if the receiver cannot keep up.
- **Fixed window** (``latency_budget_s=None``): up to ``max_batch`` frame sets, waiting at
  most ``max_wait_s`` after the first one arrives.

Waiting is on the backlog's condition variable (woken by every arrival), not a sleep loop.
The clock (:class:`mvld.common.clock.Clock`, read for ages and windows) is injected so the
policy can be tested deterministically.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from mvld.common.clock import MONOTONIC, Clock
from mvld.common.errors import ConfigError
from mvld.receiver.ingest import PendingFrameSet

__all__ = ["Batch", "BatchCostModel", "BatchPolicy", "FrameSetQueue", "MicroBatcher"]

log = logging.getLogger(__name__)

IDLE_POLL_S = 0.05  # longest single wait, so a stop request is seen within this time
POLL_S = 0.001  # arrival polling of a queue without a condition variable


class FrameSetQueue(Protocol):
    """What the batcher takes from: a :class:`~mvld.receiver.ingest.NodeBacklog` or a view of
    one (the cluster's per-worker queue)."""

    def __len__(self) -> int: ...

    def wait(self, timeout_s: float) -> bool: ...

    def take(self, max_items: int) -> list[PendingFrameSet]: ...


@dataclass(eq=False)
class Batch:
    """Frame sets imputed together; ``latents``/``present`` stack them in the model's order."""

    items: list[PendingFrameSet]
    latents: torch.Tensor  # float32 [B, V, D]
    present: torch.Tensor  # bool [B, V]

    @classmethod
    def stack(cls, items: list[PendingFrameSet], device: torch.device | str) -> Batch:
        """Stack the frame sets' latents and presence masks on ``device``."""
        latents = torch.from_numpy(np.stack([item.latents for item in items])).to(device)
        present = torch.from_numpy(np.stack([item.present for item in items])).to(device)
        return cls(items, latents, present)

    def __len__(self) -> int:
        return len(self.items)


class BatchCostModel:
    """Seconds to process a batch of B frame sets, ``a + b*B``, fitted online.

    Exponentially weighted least squares over the observed (B, seconds) pairs, so the model
    follows a machine whose load changes. Until two batch sizes are seen, the cost is taken as
    proportional to B (an overestimate for larger batches: the safe side for a budget).
    With no observation at all it predicts 0, and the policy then takes batches greedily.
    """

    def __init__(self, *, decay: float = 0.9) -> None:
        if not 0.0 < decay < 1.0:
            raise ConfigError(f"cost model decay must be in (0, 1), got {decay}")
        self.decay = decay
        self._w = self._x = self._y = self._xx = self._xy = 0.0
        self.fixed_s, self.per_item_s = 0.0, 0.0

    @property
    def observed(self) -> bool:
        """True once at least one batch has been reported."""
        return self._w > 0.0

    def observe(self, size: int, seconds: float) -> None:
        """Add one processed batch of ``size`` frame sets that took ``seconds``."""
        if size < 1 or not math.isfinite(seconds) or seconds < 0:
            return
        d = self.decay
        self._w = d * self._w + 1.0
        self._x = d * self._x + size
        self._y = d * self._y + seconds
        self._xx = d * self._xx + size * size
        self._xy = d * self._xy + size * seconds
        self._fit()

    def _fit(self) -> None:
        mean_x, mean_y = self._x / self._w, self._y / self._w
        var_x = self._xx / self._w - mean_x * mean_x
        slope = (self._xy / self._w - mean_x * mean_y) / var_x if var_x > 1e-6 else -1.0
        intercept = mean_y - slope * mean_x
        if slope < 0 or intercept < 0:  # one size only, or noise: proportional through 0
            slope, intercept = mean_y / mean_x, 0.0
        self.fixed_s, self.per_item_s = intercept, slope

    def predict(self, size: int) -> float:
        """Predicted seconds for a batch of ``size`` frame sets."""
        return self.fixed_s + self.per_item_s * size

    def largest_within(self, seconds: float, limit: int) -> int:
        """The largest batch (1..limit) predicted to finish within ``seconds``.

        When not even one frame set fits, the budget cannot be met at any size: then the
        whole ``limit``, since batching at least keeps throughput up instead of also losing it.
        """
        if self.predict(1) > seconds:
            return limit
        if self.per_item_s <= 0:
            return limit
        fits = math.floor((seconds - self.fixed_s) / self.per_item_s + 1e-9)  # 5.99999 is 6
        return max(1, min(limit, fits))


@dataclass(frozen=True)
class BatchPolicy:
    """When to take a batch and how big, given what waits (pure: the clock is an input)."""

    max_batch: int
    latency_budget_s: float

    def __post_init__(self) -> None:
        if self.max_batch < 1:
            raise ConfigError(f"max batch must be >= 1, got {self.max_batch}")
        if not self.latency_budget_s > 0:
            raise ConfigError(f"latency budget must be > 0, got {self.latency_budget_s}")

    def batch_limit(self, cost: BatchCostModel) -> int:
        """The most frame sets one batch may hold: ``max_batch``, or fewer if the budget says."""
        return cost.largest_within(self.latency_budget_s, self.max_batch)

    def wait_s(
        self, *, waiting: int, oldest_age_s: float, arrivals_per_s: float, cost: BatchCostModel
    ) -> float:
        """0: take a batch now; otherwise wait at most this long for another arrival.

        ``waiting`` frame sets are queued, the oldest ``oldest_age_s`` old; frame sets arrive
        at ``arrivals_per_s`` (0 if unknown).
        """
        if waiting < 1:
            return math.inf
        size = min(waiting, self.batch_limit(cost))
        if size >= self.batch_limit(cost):
            return 0.0  # (a) full, by max_batch or by what the budget can process
        if oldest_age_s + cost.predict(size) >= self.latency_budget_s:
            return 0.0  # (b) the oldest would be late
        if arrivals_per_s <= 0 or not cost.observed:
            return 0.0  # nothing known to be coming, or no cost measured yet: greedy
        if size >= arrivals_per_s * cost.predict(size):
            return 0.0  # (c) this batch size keeps up with the arrivals
        slack_s = self.latency_budget_s - oldest_age_s - cost.predict(size + 1)
        if slack_s <= 0 or 1.0 / arrivals_per_s > slack_s:
            return 0.0  # (d) the next frame set is not expected in time to join
        return slack_s


class MicroBatcher:
    """Collects batches from a :class:`FrameSetQueue` by a latency budget or a fixed window.

    ``MicroBatcher(backlog, max_batch=..., max_wait_s=...)`` is the fixed window;
    ``latency_budget_s=S`` switches to the adaptive policy. The worker reports each processed
    batch with :meth:`observe`; a caller that never does gets greedy batches (no waiting).
    """

    def __init__(
        self,
        backlog: FrameSetQueue,
        *,
        max_batch: int = 64,
        max_wait_s: float = 0.010,
        latency_budget_s: float | None = None,
        clock: Clock = MONOTONIC,
        arrival_decay: float = 0.8,
    ) -> None:
        if max_batch < 1:
            raise ConfigError(f"max batch must be >= 1, got {max_batch}")
        if max_wait_s < 0:
            raise ConfigError(f"max wait must be >= 0, got {max_wait_s}")
        self.backlog, self.max_batch, self.max_wait_s = backlog, max_batch, max_wait_s
        self.policy = None if latency_budget_s is None else BatchPolicy(max_batch, latency_budget_s)
        self.cost = BatchCostModel()
        self.clock = clock
        self.arrival_decay = arrival_decay
        self.arrivals_per_s = 0.0
        # NodeBacklog notifies this condition on every put; waiting on it hears each arrival
        # without polling (ingest.py offers no public "wait for more than N"). A queue without
        # one (the cluster's per-worker view) is polled every POLL_S instead.
        ready = getattr(backlog, "_ready", None)
        self._arrived = ready if isinstance(ready, threading.Condition) else None
        self._pending_since: float | None = None  # upper bound of the oldest waiting's arrival
        self._last_take: float | None = None
        self._left_after_take = 0

    def observe(self, size: int, seconds: float) -> None:
        """Report one processed batch (imputation, decoding and hooks) to the cost model."""
        self.cost.observe(size, seconds)

    def next_items(self, stop: threading.Event, idle_s: float = 0.1) -> list[PendingFrameSet]:
        """The next batch's frame sets; empty if nothing arrived within ``idle_s`` or on stop."""
        entered, was_empty = self.clock.now(), len(self.backlog) == 0
        if not self.backlog.wait(idle_s) or stop.is_set():
            return []
        if self.policy is None or not self.cost.observed:  # fixed window until a cost is known
            self._wait_fixed_window(stop)
            return self._take(self.max_batch)
        if self._pending_since is None:  # the oldest arrived after the last take, and after
            # this call began if the backlog was empty then
            self._pending_since = (
                entered if was_empty or self._last_take is None else self._last_take
            )
        return self._next_within_budget(self.policy, self._pending_since, stop)

    def _wait_for_size(self, size: int, timeout_s: float) -> int:
        """Block until ``size`` frame sets wait or ``timeout_s`` passes; the number waiting."""
        if self._arrived is None:
            deadline = time.monotonic() + timeout_s
            while len(self.backlog) < size and time.monotonic() < deadline:
                time.sleep(POLL_S)
            return len(self.backlog)
        with self._arrived:
            self._arrived.wait_for(lambda: len(self.backlog) >= size, max(0.0, timeout_s))
            return len(self.backlog)

    def _wait_fixed_window(self, stop: threading.Event) -> None:
        """Wait up to ``max_wait_s`` for ``max_batch`` frame sets."""
        deadline = self.clock.now() + self.max_wait_s
        while not stop.is_set():
            remaining = deadline - self.clock.now()
            if remaining <= 0:
                break
            if self._wait_for_size(self.max_batch, min(remaining, IDLE_POLL_S)) >= self.max_batch:
                break

    def _next_within_budget(
        self, policy: BatchPolicy, pending_since: float, stop: threading.Event
    ) -> list[PendingFrameSet]:
        waiting = len(self.backlog)
        while not stop.is_set():
            wait_s = policy.wait_s(
                waiting=waiting,
                oldest_age_s=self.clock.now() - pending_since,
                arrivals_per_s=self.arrivals_per_s,
                cost=self.cost,
            )
            if wait_s <= 0:
                break
            if waiting < 1:  # everything went stale meanwhile
                return []
            waiting = self._wait_for_size(waiting + 1, min(wait_s, IDLE_POLL_S))
        return self._take(policy.batch_limit(self.cost))

    def _take(self, limit: int) -> list[PendingFrameSet]:
        now = self.clock.now()
        before = len(self.backlog)
        items = self.backlog.take(limit)
        left = len(self.backlog)
        if self._last_take is not None and now > self._last_take:
            arrived = max(0, before - self._left_after_take)
            rate = arrived / (now - self._last_take)
            self.arrivals_per_s = (
                rate
                if self.arrivals_per_s == 0.0
                else self.arrival_decay * self.arrivals_per_s + (1.0 - self.arrival_decay) * rate
            )
        self._last_take, self._left_after_take = now, left
        if not left:
            self._pending_since = None
        log.debug(
            "batch of %d (limit %d, %d left); cost %.4f + %.4f*B s; %.1f arrivals/s",
            len(items),
            limit,
            left,
            self.cost.fixed_s,
            self.cost.per_item_s,
            self.arrivals_per_s,
        )
        return items
