"""Caches keyed by object identity that cannot mistake a new object for a dead one.

``id(obj)`` is only unique among live objects: once ``obj`` is garbage-collected, a new object may get the same
id, and a plain ``{id(obj): value}`` cache then hands the dead object's value to the new one (a tokenizer's
vocabulary to another tokenizer, one model's unconditional embedding to another model). ``ByIdentity`` holds a weak
reference next to each value and drops the entry when its object dies. Works for unhashable objects (dataclasses
with ``eq=True``), which ``weakref.WeakKeyDictionary`` refuses.
"""
from __future__ import annotations

import weakref
from typing import Generic, TypeVar

V = TypeVar("V")


class ByIdentity(Generic[V]):
    def __init__(self):
        self._items: dict[int, tuple[weakref.ref, V]] = {}

    def _live(self, obj) -> tuple[weakref.ref, V] | None:
        item = self._items.get(id(obj))
        return item if item is not None and item[0]() is obj else None

    def __contains__(self, obj) -> bool:
        return self._live(obj) is not None

    def __getitem__(self, obj) -> V:
        item = self._live(obj)
        if item is None:
            raise KeyError(f"no entry for this {type(obj).__name__}")
        return item[1]

    def __setitem__(self, obj, value: V) -> None:
        key = id(obj)
        self._items[key] = (weakref.ref(obj, lambda _ref: self._forget(key, _ref)), value)

    def _forget(self, key: int, ref: weakref.ref) -> None:
        item = self._items.get(key)
        if item is not None and item[0] is ref:
            del self._items[key]

    def pop(self, obj) -> V:
        value = self[obj]
        del self._items[id(obj)]
        return value

    def values(self) -> list[V]:
        return [value for ref, value in self._items.values() if ref() is not None]

    def __len__(self) -> int:
        return sum(ref() is not None for ref, _ in self._items.values())
