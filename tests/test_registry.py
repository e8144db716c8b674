"""redi.core.name_registry: names map to builders; unknown names are clear errors; no import cycle."""

from __future__ import annotations

import subprocess
import sys

import pytest

from redi.core.errors import ConfigError
from redi.core.name_registry import Registry


def test_register_get_and_names_in_order() -> None:
    registry: Registry = Registry("widget", "model.widget")

    @registry.register("b")
    def build_b() -> str:
        return "B"

    registry.register("a")(lambda: "A")
    assert registry.names() == ("b", "a") and list(registry) == ["b", "a"] and len(registry) == 2
    assert registry.get("b") is build_b and registry.get("a")() == "A"
    assert "a" in registry and "c" not in registry


def test_unknown_name_lists_the_known_ones() -> None:
    registry: Registry = Registry("widget", "model.widget")
    registry.register("round")(object)
    with pytest.raises(ConfigError, match=r"unknown widget 'square' \(setting model.widget\); choose one of \['round'\]"):
        registry.get("square")
    with pytest.raises(ConfigError, match="unknown widget"):
        registry.get(None)  # type: ignore[arg-type]


def test_duplicate_or_empty_names_are_refused() -> None:
    registry: Registry = Registry("widget")
    registry.register("x")(object)
    with pytest.raises(ValueError, match="already registered"):
        registry.register("x")
    with pytest.raises(ValueError, match="non-empty"):
        registry.register("")


def test_registry_modules_do_not_import_the_config() -> None:
    """redi.core.config may import redi.core.backbones / redi.core.selfmaps (for their names) without a cycle."""
    code = ("import sys, redi.core.backbones, redi.core.selfmaps, redi.core.name_registry; "
            "bad = [m for m in ('redi.core.config',) if m in sys.modules]; "
            "assert not bad, bad; import redi.core.config")
    subprocess.run([sys.executable, "-c", code], check=True)
