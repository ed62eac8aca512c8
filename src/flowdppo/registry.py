"""Named registries that users extend without editing the library.

Rewards, model families, trust regions (losses), samplers and worlds are each a :class:`Registry`.
A config value is either a registered name (``"shapes"``) or an import path ``"package.module:object"``
(the object is imported when the config is resolved, so a module that lives only in a user's project
or in a test folder works as well as a built-in one).

    from flowdppo.rewards import REWARDS

    @REWARDS.register("aesthetic")
    def aesthetic(**args): ...

An entry may be the object itself or a lazy ``"module:attr"`` string, imported on first use (model
families use this so that ``import flowdppo`` never imports diffusers).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class RegistryError(ValueError):
    """An unknown name or an import path that does not resolve; the message lists what is valid."""


def is_import_path(value: str) -> bool:
    """``"package.module:object"`` (a colon with a non-empty module and object on each side)."""
    mod, sep, obj = value.partition(":")
    return bool(sep and mod and obj) and all(part.isidentifier() for part in mod.split(".") + obj.split("."))


def import_object(path: str) -> Any:
    """Import ``"package.module:object"`` (``object`` may be dotted: ``module:Class.attr``)."""
    mod_name, _, attr = path.partition(":")
    try:
        obj: Any = importlib.import_module(mod_name)
    except ImportError as e:
        raise RegistryError(f"cannot import module {mod_name!r} of {path!r}: {e}") from None
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise RegistryError(f"module {mod_name!r} has no attribute {attr!r} (from {path!r})") from None
    return obj


class Registry(Generic[T]):
    """A name -> object table with import-path fallback.

    ``kind`` names what is registered (used in messages, e.g. ``"reward"``); ``key`` is the config key
    that selects an entry (``"reward.name"``), so an error names the key the user has to change.
    ``check`` (optional) validates or wraps an object before it is returned (e.g. a bare function
    registered as a trust region becomes a :class:`flowdppo.core.losses.TrustRegion`).
    """

    def __init__(self, kind: str, key: str, check: Callable[[Any, str], T] | None = None):
        self.kind, self.key = kind, key
        self._check = check
        self._entries: dict[str, Any] = {}

    def register(self, name: str, obj: Any = None, *, replace: bool = False) -> Any:
        """Register ``obj`` under ``name``; without ``obj``, a decorator."""
        if obj is None:
            return lambda o: self.register(name, o, replace=replace)
        if not replace and name in self._entries:
            raise RegistryError(f"{self.kind} {name!r} is already registered")
        if ":" in name:
            raise RegistryError(f"{self.kind} names may not contain ':' (that marks an import path): {name!r}")
        self._entries[name] = obj
        return obj

    def names(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def valid(self) -> str:
        """What a user may write: the registered names, or an import path."""
        return f"valid: {', '.join(self._entries)}, or an import path 'package.module:object'"

    def get(self, name: str) -> T:
        """The entry for a registered name or an import path; a clear :class:`RegistryError` otherwise."""
        if not isinstance(name, str) or not name:
            raise RegistryError(f"{self.key}: expected a {self.kind} name, got {name!r}; {self.valid()}")
        if name in self._entries:
            obj = self._entries[name]
            if isinstance(obj, str) and is_import_path(obj):  # lazy built-in entry
                obj = import_object(obj)
        elif is_import_path(name):
            try:
                obj = import_object(name)
            except RegistryError as e:
                raise RegistryError(f"{self.key}: {e}") from None
        else:
            raise RegistryError(f"{self.key}: unknown {self.kind} {name!r}; {self.valid()}")
        return self._check(obj, name) if self._check is not None else obj
