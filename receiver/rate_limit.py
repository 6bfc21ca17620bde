"""Per-node message rate limit: a token bucket for each sender, in bounded memory.

A node that floods the receiver (a bug, or an allowed key turned hostile) must not take the
decoder and the imputation from the others. Each sender — its CurveZMQ public key when the
link is authenticated (checked before decoding, so a flood costs no decoding), else its node
id — refills ``rate`` tokens per second up to ``burst``; a message without a token is dropped
and counted with reason ``rate``. Senders are kept in least-recently-seen order and the
oldest is forgotten beyond ``max_senders``, so memory does not grow with the number of ids.
"""

import time
from collections import OrderedDict
from collections.abc import Callable

from mvld.common.errors import ConfigError


class RateLimiter:
    """Token buckets keyed by sender: ``allow(sender)`` takes a token or says no."""

    def __init__(
        self,
        rate: float,
        burst: float | None = None,
        *,
        max_senders: int = 4096,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not rate > 0:
            raise ConfigError(f"the per-node rate limit must be > 0 messages/s, got {rate}")
        self.rate = float(rate)
        self.burst = float(burst) if burst is not None else max(1.0, self.rate)
        if self.burst < 1:
            raise ConfigError(f"the rate limit burst must be at least 1, got {self.burst}")
        self.max_senders = max_senders
        self._clock = clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # tokens, time

    def allow(self, sender: str) -> bool:
        """Take one token from ``sender``'s bucket; False when it is empty."""
        now = self._clock()
        tokens, last = self._buckets.pop(sender, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        allowed = tokens >= 1.0
        self._buckets[sender] = (tokens - 1.0 if allowed else tokens, now)
        if len(self._buckets) > self.max_senders:
            self._buckets.popitem(last=False)
        return allowed

    def __len__(self) -> int:
        return len(self._buckets)
