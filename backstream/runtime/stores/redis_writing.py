"""What ``RedisStore`` keeps of each job it writes (``Writing``), and the arguments of
its commit script built from it: the fence, the entries, the fields that changed since
the last commit, and the announcement to the job's followers."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import attrs

from backstream.actors.ports import OUTBOX_CLAIM_S, OutboxEntry
from backstream.protocol.events import LogEvent
from backstream.protocol.lifecycle import TERMINAL_STATUSES, is_terminal
from backstream.protocol.records import (
    JobProgress,
    JobRecord,
    events_to_json,
    progress_to_dict,
    request_bytes,
)
from backstream.runtime.stores.redis_client import SAFETY_TTL_S, ms
from backstream.runtime.stores.redis_keys import RedisKeyspace
from backstream.runtime.stores.redis_steps import OUTBOX_FIELD, SHARD_FIELD, Finish, encode_fields
from backstream.runtime.stores.shared import outbox_to_json

__all__ = ["Writing", "commit_args", "finish_of", "outbox_json", "shard_in", "writing_of"]

_TERMINAL_JSON = json.dumps(sorted(TERMINAL_STATUSES))


@attrs.define
class Writing:
    """A job this process writes: its names and shard (so a commit takes one round trip),
    its owner (the fence) and the ``seq`` its log had at the last commit seen."""

    shard: int
    user: str
    message_id: str
    thread_id: str
    owner: str | None
    stored_seq: int
    request_bytes: int
    """What its request counts against its user's quota (with its log, from its end on)."""
    epoch: int = 1
    """The epoch it writes (announced with each commit, so followers label entries right)."""
    announce: bool = True
    """Announce commits on the job's channel: until one reaches no follower, and again
    once a follower asks (``watch``)."""
    announced_seq: int = 0
    """The last seq announced before its commit (``RedisStore.announce_entries``): a commit that
    brings nothing new to followers (no entry after it, the same status) is not announced."""
    written: dict[str, str] = attrs.Factory(dict)
    """The progress fields as last written (JSON): a commit writes only those that changed.
    Emptied when a commit does not land as planned (then every field is written again)."""
    writing: dict[str, str] = attrs.Factory(dict)
    """... and as the commit under way writes them (``written`` once it lands)."""


def writing_of(record: JobRecord, shard: int) -> Writing:
    return Writing(
        shard,
        record.user,
        record.message_id,
        record.thread_id,
        record.owner,
        record.seq,
        request_bytes(record.request),
        epoch=record.epoch,
    )


def shard_in(raw: dict[str, str], job_id: str) -> int:
    """The shard a job's record names (its home shard for a record written without one)."""
    value = raw.get(SHARD_FIELD)
    return RedisKeyspace.home_shard(job_id) if value is None else int(value)


def outbox_json(job_id: str, writing: Writing, progress: JobProgress) -> str:
    entry = OutboxEntry(
        job_id, writing.user, writing.thread_id, progress.status, progress.error, progress.preview
    )
    return outbox_to_json(entry)


def finish_of(job_id: str, writing: Writing, progress: JobProgress, logged: int) -> Finish:
    """The steps after a terminal commit's first, for ``RedisSteps.finish``."""
    return Finish(
        job_id,
        writing.shard,
        progress.seq,
        writing.user,
        writing.message_id,
        outbox_json(job_id, writing, progress),
        writing.owner or "",
        progress.updated_at + OUTBOX_CLAIM_S if writing.owner else 0.0,
        progress.expires_at or 0.0,
        ms(max((progress.expires_at or 0) - progress.updated_at + SAFETY_TTL_S, 1.0)),
        writing.request_bytes + logged,
    )


def commit_args(
    keys: RedisKeyspace, job_id: str, writing: Writing, entries: Sequence[LogEvent], progress: JobProgress
) -> list[str]:
    """The ``COMMIT`` script's arguments (see ``redis_scripts``); notes in ``writing`` the
    fields this commit writes."""
    terminal = is_terminal(progress.status)
    fields: dict[str, Any] = dict(progress_to_dict(progress))
    if terminal:
        fields["lease_until"] = None
        fields[OUTBOX_FIELD] = outbox_json(job_id, writing, progress)
    encoded = encode_fields(fields)
    changed: list[str] = []
    for name, value in zip(encoded[::2], encoded[1::2], strict=True):
        if writing.written.get(name) != value:
            changed += [name, value]
    writing.writing = dict(zip(encoded[::2], encoded[1::2], strict=True))
    ttl_s = (progress.expires_at or 0) - progress.updated_at + SAFETY_TTL_S
    # Followers have every entry but the status: the next announcement tells them how far
    # this commit made the log durable.
    news = (bool(entries) and entries[-1].seq > writing.announced_seq) or "status" in changed[::2]
    return [
        f"{job_id}@{writing.epoch}",  # the announcement's first word: its writer's epoch
        str(writing.stored_seq),
        str(entries[-1].seq if entries else progress.seq),
        events_to_json(entries) if entries else "",
        "1" if terminal else "0",
        str(ms(max(ttl_s, 1.0))),
        keys.job_channel(job_id) if writing.announce and news else "",
        _TERMINAL_JSON,
        "" if writing.owner is None else json.dumps(writing.owner),
        *changed,
    ]
