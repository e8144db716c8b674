"""Name -> builder registries (as timm's ``@register_model``): the one list of valid names.

A module that builds things by name (backbones, self-maps) keeps a :class:`Registry` and
decorates each builder with ``@REGISTRY.register("name")``. The registry is then the only place
that knows the names: lookups, error messages and ``names()`` all come from it, so a list kept
beside the builders cannot drift from them.

This module imports nothing of redi but :mod:`redi.core.errors`, so any module (including
``redi.core.config``) may import a registry's module without an import cycle.
"""

from __future__ import annotations

from typing import Callable, Generic, Iterator, TypeVar

from redi.core.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """Builders (any callables) by name, in registration order.

    Args:
        kind: what the names are, for messages (e.g. "backbone").
        setting: the config key that takes one of the names (e.g. "model.backbone"), named in
            the error for an unknown name; empty if none.
    """

    def __init__(self, kind: str, setting: str = "") -> None:
        self.kind = kind
        self.setting = setting
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: register the decorated builder under ``name`` and return it unchanged.

        Raises:
            ValueError: ``name`` is empty or already registered (a programming error: two
                builders would claim one name).
        """
        if not isinstance(name, str) or not name:
            raise ValueError(f"a {self.kind} name must be a non-empty string, got {name!r}")
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is already registered (to {self._entries[name]!r})")

        def decorate(builder: T) -> T:
            self._entries[name] = builder
            return builder

        return decorate

    def get(self, name: str) -> T:
        """The builder registered as ``name``.

        Raises:
            ConfigError: no builder has that name; the message lists the known names.
        """
        try:
            return self._entries[name]
        except (KeyError, TypeError):
            where = f" (setting {self.setting})" if self.setting else ""
            raise ConfigError(f"unknown {self.kind} {name!r}{where}; choose one of {list(self._entries)}") from None

    def names(self) -> tuple[str, ...]:
        """The registered names, in registration order."""
        return tuple(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(tuple(self._entries))

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, names={list(self._entries)})"
