"""ByIdentity: a cache keyed by object identity never hands a dead object's value to a new one at the same id."""
import gc
from dataclasses import dataclass

import pytest

from safediff.identity import ByIdentity


@dataclass
class Unhashable:  # eq=True dataclasses have no __hash__, like safediff.models.Model
    name: str


def test_entry_dies_with_its_object_even_when_the_id_is_reused():
    cache: ByIdentity[str] = ByIdentity()
    old = Unhashable("old")
    cache[old] = "old's value"
    old_id = id(old)
    del old
    gc.collect()
    assert len(cache) == 0
    reused = None
    for _ in range(10_000):  # CPython hands a freed block of the same size back almost at once
        candidate = Unhashable("new")
        if id(candidate) == old_id:
            reused = candidate
            break
    if reused is not None:
        assert reused not in cache
        with pytest.raises(KeyError):
            cache[reused]


def test_a_stale_entry_is_never_returned_for_a_new_object_at_its_id():
    """Even before the weak-reference callback has run, a lookup checks that the entry's object is the one asked."""
    cache: ByIdentity[str] = ByIdentity()
    a, b = Unhashable("a"), Unhashable("b")
    cache[a] = "a's value"
    cache._items[id(b)] = cache._items[id(a)]  # forge the collision: b's id pointing at a's entry
    assert b not in cache and a in cache and cache[a] == "a's value"


def test_set_get_pop():
    cache: ByIdentity[int] = ByIdentity()
    a, b = Unhashable("x"), Unhashable("x")  # equal, but different objects
    cache[a] = 1
    assert a in cache and b not in cache and cache[a] == 1
    assert cache.pop(a) == 1 and a not in cache and len(cache) == 0

