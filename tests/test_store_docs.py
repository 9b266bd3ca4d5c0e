"""Every public async method of the stores says what cancellation does to it."""

from __future__ import annotations

import inspect

import pytest

from backstream.actors.ports import Store
from backstream.runtime.stores.memory import MemoryStore
from backstream.runtime.stores.redis import RedisStore
from backstream.runtime.stores.sqlite import SqliteStore


@pytest.mark.parametrize("cls", [Store, MemoryStore, SqliteStore, RedisStore])
def test_async_methods_document_cancellation(cls: type) -> None:
    undocumented = [
        name
        for name, member in inspect.getmembers(cls, inspect.iscoroutinefunction)
        if not name.startswith("_") and "Cancellation" not in (inspect.getdoc(member) or "")
    ]
    assert undocumented == []
