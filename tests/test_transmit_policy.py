"""Transmit policy: limits, rotation, priority, and the always-send-one rule."""

from collections import Counter

import pytest

from mvld.common.errors import ConfigError
from mvld.edge.policy import TransmitPolicy, TransmitPolicyConfig


def test_no_limit_sends_every_usable_view() -> None:
    policy = TransmitPolicy()
    assert policy.select([2, 0, 1], bytes_per_view=512) == ([0, 1, 2], [])


def test_round_robin_rotates_withheld_views_evenly() -> None:
    policy = TransmitPolicy(TransmitPolicyConfig(max_views=2))
    withheld = Counter()
    for _ in range(30):
        sent, held = policy.select([0, 1, 2], bytes_per_view=512)
        assert len(sent) == 2 and len(held) == 1
        assert sorted(sent + held) == [0, 1, 2]
        withheld.update(held)
    assert withheld == Counter({0: 10, 1: 10, 2: 10})


def test_byte_budget_limits_views() -> None:
    policy = TransmitPolicy(TransmitPolicyConfig(budget_bytes=1100))
    sent, held = policy.select([0, 1, 2, 3], bytes_per_view=512)
    assert len(sent) == 2 and len(held) == 2


def test_budget_below_one_view_still_sends_one() -> None:
    policy = TransmitPolicy(TransmitPolicyConfig(budget_bytes=10))
    sent, _ = policy.select([0, 1, 2], bytes_per_view=512)
    assert len(sent) == 1


def test_priority_keeps_listed_cameras() -> None:
    policy = TransmitPolicy(TransmitPolicyConfig(max_views=1, rule="priority", priority=(2,)))
    for _ in range(5):
        assert policy.select([0, 1, 2], bytes_per_view=512) == ([2], [0, 1])
    assert policy.select([0, 1], bytes_per_view=512) == ([0], [1])


def test_random_rule_is_seeded() -> None:
    def run() -> list[list[int]]:
        policy = TransmitPolicy(TransmitPolicyConfig(max_views=1, rule="random", seed=7))
        return [policy.select([0, 1, 2], bytes_per_view=512)[0] for _ in range(20)]

    first = run()
    assert first == run()
    assert len({tuple(s) for s in first}) > 1


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"rule": "nope"}, "valid rules"),
        ({"max_views": 0}, "at least 1"),
        ({"budget_bytes": 0}, "positive"),
    ],
)
def test_bad_config_is_a_clear_error(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        TransmitPolicyConfig(**kwargs)
