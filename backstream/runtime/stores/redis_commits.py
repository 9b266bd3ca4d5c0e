"""``RedisWriters``: the jobs one ``RedisStore`` writes, and their commits.

What this process knows of each job it writes (``Writing``: names, shard, owner, the
stored seq), the commit of its log (one script in its slot, planned in Python against
that seq: ``stores.shared.plan_commit``), the announcement of entries between commits,
and a terminal commit's later steps and replicas. A writer that a takeover fenced off is
remembered, so that its later commits never read the record and take the new owner's
place. The one owner of this state: ``RedisStore`` holds it and asks.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import trio

from backstream.actors.ports import JobEndedElsewhereError, LogBehindError
from backstream.actors.signals import OUTBOX_BELL, SignalHub
from backstream.protocol.errors import UnavailableError
from backstream.protocol.events import LogEvent
from backstream.protocol.lifecycle import is_terminal
from backstream.protocol.records import JobProgress, events_to_json
from backstream.runtime.stores.redis_client import RedisConnection
from backstream.runtime.stores.redis_groups import ScriptGroups
from backstream.runtime.stores.redis_housekeeping import RedisHousekeeping
from backstream.runtime.stores.redis_scripts import ANNOUNCE_LIMIT
from backstream.runtime.stores.redis_steps import Finish, RedisSteps, decode_record
from backstream.runtime.stores.redis_writing import (
    Writing,
    commit_args,
    finish_of,
    shard_in,
    writing_of,
)
from backstream.runtime.stores.shared import plan_commit

__all__ = ["FENCED_KEPT", "RedisWriters"]

FENCED_KEPT = 10_000
"""Fenced-off jobs remembered (``RedisWriters.fence``)."""


class RedisWriters:
    def __init__(
        self,
        conn: RedisConnection,
        steps: RedisSteps,
        groups: ScriptGroups,
        housekeeping: RedisHousekeeping,
        hub: SignalHub,
    ) -> None:
        self._conn = conn
        self._keys = conn.keys
        self._steps = steps
        self._commit_groups = groups
        self._housekeeping = housekeeping
        self._hub = hub
        self.writing: dict[str, Writing] = {}
        self._fenced: dict[str, None] = {}
        """Jobs whose writer here was fenced off (another owner holds them, or they ended):
        a later commit of theirs is refused before it reads the record, which names the new
        owner. At most ``FENCED_KEPT``, the oldest forgotten (its writer stopped long ago);
        a job this instance takes over again is written again (``adopt``)."""
        self.finishing: dict[str, Finish] = {}
        """Terminal commits whose later steps did not land yet: the job's next commit (a
        retry) or this instance's next ``take_orphans`` runs them again. Bounded by the
        jobs this process ends; each goes once its steps land."""
        self._unreplicated: dict[str, Finish] = {}
        """Terminal commits that landed but that the replicas ``replication`` asks for did not
        acknowledge in time: not done until they do (the job's own retry, alone, settles
        them). Bounded by the jobs this process ends; one whose lease lapsed is dropped
        when it is taken over (``lapsed``)."""
        self.commits_replanned = 0
        self.commits_announced = 0
        self.entries_announced = 0

    def adopt(self, job_id: str, writing: Writing) -> None:
        """This process writes the job from now on (it created it, or took it over)."""
        self.writing[job_id] = writing
        self._fenced.pop(job_id, None)

    def lapsed(self, job_id: str) -> None:
        """The job's lease lapsed and it was taken over: its ending is the new owner's."""
        self._unreplicated.pop(job_id, None)

    async def finish_pending(self) -> None:
        """Run the later steps of the terminal commits that stopped after their first.
        Cancellation: those not finished are run again next time."""
        for job_id, step in list(self.finishing.items()):
            await self._steps.finish(step, first=False)
            del self.finishing[job_id]

    def fence(self, job_id: str) -> None:
        self.writing.pop(job_id, None)
        self._fenced[job_id] = None
        if len(self._fenced) > FENCED_KEPT:
            del self._fenced[next(iter(self._fenced))]

    async def commit(self, job_id: str, entries: Sequence[LogEvent], progress: JobProgress) -> None:
        """One script call in the job's slot, two if the log was not where this process
        last saw it; a terminal commit then frees the user's and the cluster's slots
        (``RedisSteps.finish``). Cancellation: the job's script ran entirely or not at
        all; commit again (a terminal commit's later steps are run again)."""
        if await self._end_landed_before(job_id):
            return
        if job_id in self._fenced:
            raise JobEndedElsewhereError(job_id)
        writing = self.writing.get(job_id)
        if writing is None:
            writing = await self.read_writing(job_id)
            if writing is None:
                return  # the store no longer holds it (swept, or Redis lost it): watchers get gone
        terminal = is_terminal(progress.status)
        try:
            for attempt in range(3):
                try:
                    plan = plan_commit(job_id, entries, progress, writing.stored_seq)
                except LogBehindError:
                    if attempt > 0:
                        raise  # planned against the seq Redis holds: the log is really behind
                    stored = await self._conn.call(self._conn.client.hget(self._keys.job(job_id), "seq"))
                    if stored is None:
                        return
                    writing.stored_seq = int(stored)  # this process's view may be stale
                    writing.written = {}
                    continue
                replicated = self._conn.replication.applies(terminal)
                if not plan.entries and not plan.apply_progress:
                    if replicated:  # it landed, but its replicas may not have answered
                        await self._conn.confirm_replicated(self._keys.job(job_id))
                    return  # a late retry: the store is ahead of it
                reply = await self._commit_groups.script(
                    "commit",
                    [self._keys.job(job_id), self._keys.log(job_id)],
                    commit_args(self._keys, job_id, writing, plan.entries, progress),
                )
                if int(reply[0]) == 0:  # Redis lost the job (a restart without its data)
                    self.writing.pop(job_id, None)
                    return
                if int(reply[0]) == 3:  # ended, or handed over: another instance has it
                    self.fence(job_id)
                    raise JobEndedElsewhereError(job_id)
                if int(reply[0]) == 1:
                    await self._landed(job_id, writing, progress, reply, replicated=replicated)
                    return
                self.commits_replanned += 1
                writing.stored_seq = int(reply[1])
                writing.written = {}  # the record is not where this writer left it
            raise UnavailableError(f"{job_id}: its log kept moving under the commit")
        finally:
            if terminal:  # the job's last write here, whether it landed or not
                self.writing.pop(job_id, None)

    async def _end_landed_before(self, job_id: str) -> bool:
        """A retry of a terminal commit that landed: settle what is left of it (its
        replicas' answer, or its later steps). False if there is none."""
        if await self._end_unreplicated(job_id):  # it landed unreplicated
            return True
        pending = self.finishing.get(job_id)
        if pending is None:
            return False
        await self._steps.finish(pending, first=False)  # its first step landed
        del self.finishing[job_id]
        return True

    async def _landed(
        self, job_id: str, writing: Writing, progress: JobProgress, reply: Any, *, replicated: bool
    ) -> None:
        """The commit script applied: note it, then wait for the replicas if asked, and for
        a terminal commit run its later steps."""
        writing.stored_seq = progress.seq
        writing.written = writing.writing
        self._announced(writing, int(reply[1]))
        if not is_terminal(progress.status):
            self.writing[job_id] = writing
            if replicated:
                await self._conn.confirm_replicated(self._keys.job(job_id))
            self._hub.signal_job(job_id)  # waiters here need no round trip
            return
        step = finish_of(job_id, writing, progress, int(reply[2]))
        if replicated:
            await self._confirm(step)
        await self._finish(step)

    async def _confirm(self, step: Finish) -> None:
        """The replicas hold the job's end, or it waits in ``_unreplicated`` for the commit's
        retry, its later steps not yet run."""
        try:
            await self._conn.confirm_replicated(self._keys.job(step.job_id))
        except BaseException:
            self._unreplicated[step.job_id] = step
            raise

    async def _end_unreplicated(self, job_id: str) -> bool:
        """True once the replicas hold the job's landed end and its later steps ran; False
        if none waits, or if it is no longer there (a failover lost it: the commit is
        planned again, against the new primary)."""
        step = self._unreplicated.pop(job_id, None)
        if step is None:
            return False
        await self._confirm(step)
        try:
            key = self._keys.job(job_id)
            seq, status = await self._conn.call(self._conn.client.hmget(key, ["seq", "status"]))
        except BaseException:
            self._unreplicated[job_id] = step
            raise
        if seq is None or int(seq) != step.seq or not is_terminal(json.loads(status)):
            return False
        await self._finish(step)
        return True

    async def _finish(self, step: Finish) -> None:
        try:
            await self._steps.finish(step, first=True)
        except BaseException:  # an outage or a cancellation: the retry, or the keeper, ends it
            self.finishing[step.job_id] = step
            raise
        self._housekeeping.wrote_entry(
            step.shard, step.owner, job_id=step.job_id, entry=step.outbox, until=step.claim_until
        )
        self._hub.ring(OUTBOX_BELL)
        self._hub.signal_job(step.job_id)

    async def announce_entries(self, job_id: str, entries: Sequence[LogEvent]) -> None:
        """An ``SPUBLISH`` on the job's channel, with the next commit group: the writer's
        epoch, the seq the log is durable through, and ``entries``; only while a follower
        is known (as commits are announced), and only up to ``ANNOUNCE_LIMIT`` bytes (past
        it the followers get them with the commit). Cancellation: sent or not."""
        writing = self.writing.get(job_id)
        if writing is None or not writing.announce or not entries:
            await trio.lowlevel.checkpoint()
            return
        payload = events_to_json(entries)
        if len(payload) > ANNOUNCE_LIMIT:
            await trio.lowlevel.checkpoint()
            return
        message = f"{job_id}@{writing.epoch} {writing.stored_seq} {payload}"
        receivers = await self._commit_groups.publish(self._keys.job_channel(job_id), message)
        writing.announced_seq = max(writing.announced_seq, entries[-1].seq)
        self.entries_announced += 1
        if receivers == 0:
            writing.announce = False

    def _announced(self, writing: Writing, receivers: int) -> None:
        """A commit landed; ``receivers``: how many instances its announcement reached
        (-1: not announced). Nobody: stop announcing until a follower asks."""
        if receivers >= 0:
            self.commits_announced += 1
        if receivers == 0:
            writing.announce = False

    def watched(self, job_id: str) -> None:
        """A follower asked for the job's commits (``watch`` on its control channel)."""
        writing = self.writing.get(job_id)
        if writing is not None:
            writing.announce = True

    async def read_writing(self, job_id: str) -> Writing | None:
        """What a commit or a renewal needs of a job this process does not write yet."""
        raw = await self._conn.call(self._conn.client.hgetall(self._keys.job(job_id)))
        record = decode_record(raw)
        return None if record is None else writing_of(record, shard_in(raw, job_id))
