from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import trio

from tests.upstream_server import FakeUpstream, open_fake_upstream


@pytest.fixture
async def upstream(nursery: trio.Nursery) -> AsyncIterator[FakeUpstream]:
    yield await open_fake_upstream(nursery)
