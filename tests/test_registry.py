"""The one registry mechanism: duplicates rejected, unknown names list the valid ones."""

import pytest

from mvld.common.errors import ConfigError
from mvld.common.registry import Registry


def test_register_get_and_list() -> None:
    registry: Registry[int] = Registry("widget")
    registry.add("b", 2)

    @registry.register("a")
    def a() -> int:
        return 1

    assert registry.get("a") is a
    assert registry.names() == ["a", "b"]
    assert "b" in registry and "c" not in registry


def test_duplicate_name_is_rejected() -> None:
    registry: Registry[int] = Registry("widget")
    registry.add("a", 1)
    with pytest.raises(ConfigError, match="widget 'a' is already registered"):
        registry.add("a", 2)
    assert registry.get("a") == 1


def test_unknown_name_lists_valid_ones() -> None:
    registry: Registry[int] = Registry("widget")
    registry.add("alpha", 1)
    registry.add("beta", 2)
    with pytest.raises(ConfigError, match="unknown widget 'gamma'; valid: alpha, beta"):
        registry.get("gamma")
