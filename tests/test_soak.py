"""A short chaos soak (bench/soak.py) against real ``backstream serve`` processes and a
redis-server of its own. Its history checker must find no violation.

Every fault runs; ``BACKSTREAM_SOAK_FAULTS=reset,rewatch,kill_instance,...``
chooses others, ``BACKSTREAM_SOAK_SECONDS`` the length.
"""

from __future__ import annotations

import os
import shutil

import pytest

from backstream.protocol.events import TERMINAL_STATUSES
from bench.soak import FAULTS, Settings, soak


def soak_faults() -> tuple[str, ...]:
    """Every fault, unless ``BACKSTREAM_SOAK_FAULTS`` names some."""
    chosen = os.environ.get("BACKSTREAM_SOAK_FAULTS")
    if chosen:
        return tuple(f for f in chosen.split(",") if f)
    return tuple(FAULTS)


async def test_a_short_soak_keeps_every_promise() -> None:
    if shutil.which("redis-server") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("CI=true but redis-server is not installed")
        pytest.skip("the soak needs redis-server (apt-get install redis-server)")
    faults = soak_faults()
    settings = Settings(
        seconds=float(os.environ.get("BACKSTREAM_SOAK_SECONDS", "24")),
        instances=2,
        jobs=5,
        watchers=12,
        fault_every=2.5,
        faults=faults,
        lease_ttl=10.0,
        job_tokens=(10, 60),
        overrun=60.0,
        seed=7,
    )
    result = await soak(settings)
    assert result["violation_count"] == 0, result["violations"][:20]
    assert result["jobs"] >= 5 and result["watch_histories"] >= 5 and result["events"] > 0
    assert set(result["faults"]) == set(faults), result["faults"]  # every kind happened
    assert set(result["final_statuses"]) <= set(TERMINAL_STATUSES), result["final_statuses"]
    assert not result["errors"].get("the load overran"), (result["errors"], result["stuck_job_tasks"])
