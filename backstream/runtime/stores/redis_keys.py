"""``RedisKeyspace``: the one place that names every key and channel of ``RedisStore``
and decides which cluster slot (hash tag) each lands in.

The layout (version ``LAYOUT``, recorded in the marker key ``{p}:layout`` at the first
open of a prefix): keys are grouped by entity, each entity with a hash tag of its own,
so that jobs and users spread over a Redis Cluster's slots while every Lua script
touches one slot only. User-chosen ids are length-prefixed so that they cannot collide.

- per job (``{p:job:ID}``): ``job`` (its record; a terminal commit also leaves its
  outbox entry there, field ``outbox``; hidden fields ``lease_at``, the lease's end on
  Redis's clock, and ``shard``, the job's shard), ``log``, ``watching``, ``seen``,
  ``notified``;
- per user (``{p:user:USER}``): ``msg`` (the idempotency key), ``user_index``,
  ``thread_index``, ``user_running`` (the per-user capacity count), ``muted``, ``inbox``,
  ``seats`` (per kind: the user's open streams, connections; ``redis_seats``), and the
  quota of stored bytes (``redis_quota``): ``stored_bytes``, ``stored_charges``,
  ``stored_lapse``;
- per shard (``{p:shard:N}``, ``SHARDS`` of them; a job's shard is chosen when it is
  created, the one of its id's hash unless that one is full, and kept in its record):
  ``running`` (the shard's running jobs scored by lease end on Redis's clock: its share of
  the cluster-wide capacity count, and where orphans are found), ``expiry`` and
  ``expiry_taken`` (finished jobs by expiry; those a sweep took, by the end of its claim),
  ``outbox``, ``outbox_due``, ``outbox_claims``, ``outbox_owned``, ``scan`` (who scans the
  shard for orphans, until when);
- the store's own tag (``{p}``): the ``layout`` marker.

Capacity: ``max_jobs`` is split over the shards (``shard_budget``: the shares add up to
it), and a start takes a slot in the first shard of its order (its hash's, then the
next) that has room; so starts spread over the shards' keys, the total never exceeds
``max_jobs``, and a start is refused only once every shard was found full.

Channels are sharded (``SSUBSCRIBE``/``SPUBLISH``) and per entity, never global: a
message reaches only the instances that subscribed to it, and on a cluster travels only
within the shard that holds its slot:

- per job: ``commits`` (every commit, ``"ID SEQ JSON"`` with its entries, and the end,
  ``"ID SEQ"``; a commit is published only while the writer knows of a follower: one
  that reached nobody stops the announcements until a follower's ``watch`` on
  ``control`` turns them on again) and ``control`` (``abort``, ``decision CALL``,
  ``watch``: subscribed by the job's runner while it waits for them);
- per user: ``notifications`` (subscribed while the instance holds a connection of
  that user).

An instance subscribes to a channel on its first interest and unsubscribes after its
last (``RedisSubscriber.interest``); however many of its watchers follow a job, it
subscribes once and reads once per commit (``actors.remote_tail``).

What spans entities is a sequence of one-slot scripts, each idempotent, in an order
that leaves nothing a reader would misreport (``redis_steps``):

- create: (1) user slot: the idempotency key (``SET`` unless another job has it) and the
  user's running entry, checked against the per-user limit; then, in the same slot, the
  request's bytes checked against the user's quota and charged (a refusal undoes the
  first user step; a retry finds the charge made and makes none); (2) a shard: the running
  entry, checked against the shard's share of the cluster-wide limit (shard after shard
  until one has room; refused by all, step 1 is undone); (3) job slot: the record, with
  its shard and lease, unless it exists (who writes it is who inserted). The record
  comes last, so nobody sees a job before its slots are taken. A crash after (1) leaves
  the idempotency key naming a job with no record: the next create with that message id
  finishes that job's steps (under its id) instead of starting another; the user's
  running entry lapses with its lease meanwhile (its charge a day after its creation,
  should no create ever finish it). A crash after (2) leaves a running
  entry without a record: ``take_orphans`` drops it once its lease lapses (and one in
  another shard than the record names, left by such a retry, likewise).
- terminal commit: (1) job slot: entries, status and the outbox entry (one atomic step:
  the end and its effect are never apart; the log's stored bytes are summed on the
  record as each batch lands); (2) user slot: the user's running entry removed, then the
  job's charge set to its request and its log (only while it holds one: a charge the
  sweep released is never made again); (3) the job's shard: the outbox entry indexed
  (claimed by the writer), the expiry entry added, the running entry removed; then the
  end is announced on the job's channel (a watcher woken by it finds the slots freed
  too). (3) comes last among the writes, so the shard still lists a job whose terminal
  commit stopped after (1) or (2). The writer's next commit of the job (a retry) or,
  once the old lease lapsed, the keeper's ``take_orphans`` runs (2) and (3) again from
  the record: removals are idempotent, the charge is set (not added), and (3) writes the
  outbox entry only while the job is still in the running set.
- the sweep: per batch of expired jobs a shard gave it, the users' slots first (the
  idempotency keys, the indexes, then the jobs' charges released: they hold none
  afterwards, so nothing is released twice), then the jobs' keys and shard entries.
- hand-over: a shard's running set lists lapsed leases; the job slot's script takes the
  job (owner, lease, epoch + 1) atomically; then the running entries follow the new
  lease (if that step is lost, the new owner's next renewal moves them).
- lease renewal: per job (owner checked in its slot), then the running entries.
- a notification: the thread's mute is read (user slot); the job slot's script checks
  that nobody watches and marks the job notified (never twice); the user slot's script
  adds it to the inbox and publishes it on the user's channel.

Leases and watch presence are on Redis's clock: the scripts read ``TIME`` (see
``redis_clock``).
"""

from __future__ import annotations

import zlib

__all__ = ["LAYOUT", "SHARDS", "RedisKeyspace", "shard_budget"]

LAYOUT = "2"
"""The layout this module names (the marker's value). 1, never written: one tag ``{p}``
for every key (or, opted into, per-entity tags with the running set, expiry and outbox
in ``{p}``)."""

SHARDS = 16
"""Shards of the running set, expiry index and outbox. Part of the layout: a prefix's
jobs are found only with the number they were written with."""


def shard_budget(max_jobs: int, shard: int) -> int:
    """Shard ``shard``'s share of ``max_jobs``: the shares differ by one at most and add up
    to ``max_jobs`` (with fewer jobs than shards, the last shards have none)."""
    return max_jobs // SHARDS + (1 if shard < max_jobs % SHARDS else 0)


class RedisKeyspace:
    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.tag = "{" + prefix + "}"

    def _k(self, *parts: str) -> str:
        """A key of the store's own tag (the layout marker, the channels)."""
        return ":".join((self.tag, *parts))

    def _of_job(self, job_id: str, *parts: str) -> str:
        return ":".join((self.slot_tag("job", job_id), *parts))

    def _of_user(self, user: str, *parts: str) -> str:
        return ":".join((self.slot_tag("user", user), *parts))

    def _of_shard(self, shard: int, *parts: str) -> str:
        return ":".join((self.slot_tag("shard", str(shard)), *parts))

    @staticmethod
    def _named(name: str) -> str:
        return f"{len(name)}:{name}"

    def slot_tag(self, kind: str, name: str) -> str:
        """The hash tag of an entity's keys (``kind``: ``job``, ``user`` or ``shard``): one
        slot per job, per user and per shard (a name holding ``}`` ends the tag early: still
        the same tag for every key of that entity, which is all a script needs)."""
        return "{" + f"{self.prefix}:{kind}:{name}" + "}"

    @staticmethod
    def home_shard(job_id: str) -> int:
        """The shard a job tries first (its id's hash): starts spread evenly."""
        return zlib.crc32(job_id.encode()) % SHARDS

    def layout(self) -> str:
        """The marker: ``LAYOUT``, written at the first open of the prefix."""
        return self._k("layout")

    def earlier_layout_keys(self) -> list[str]:
        """Keys that only an earlier layout writes (its instance set): present without the
        marker, the prefix holds data this layout would not find."""
        return [self._k("running"), self._k("expiry"), self._k("outbox"), self._k("outbox", "due")]

    # -- per job -----------------------------------------------------------------------

    def job(self, job_id: str) -> str:
        """A hash: the job record, JSON-encoded fields; ``decision:{call}`` fields."""
        return self._of_job(job_id, "job", job_id)

    def log(self, job_id: str) -> str:
        """A stream: one entry per flush batch, whose id is the batch's last seq (``seq-0``)."""
        return self._of_job(job_id, "log", job_id)

    def watching(self, job_id: str) -> str:
        """A sorted set of watch ids scored by presence expiry."""
        return self._of_job(job_id, "watching", job_id)

    def seen(self, job_id: str) -> str:
        """Set when a watch delivered the job's end."""
        return self._of_job(job_id, "seen", job_id)

    def notified(self, job_id: str, kind: str) -> str:
        """Set once the job has a notification of ``kind``: never twice."""
        return self._of_job(job_id, "notified", job_id, kind)

    # -- per user ----------------------------------------------------------------------

    def msg(self, user: str, message_id: str) -> str:
        """The idempotency key: user and message id → job id."""
        return self._of_user(user, "msg", self._named(user), message_id)

    def user_index(self, user: str) -> str:
        """A sorted set of the user's jobs by creation time."""
        return self._of_user(user, "user", self._named(user))

    def thread_index(self, user: str, thread_id: str) -> str:
        return self._of_user(user, "thread", self._named(user), thread_id)

    def user_running(self, user: str) -> str:
        """The user's running jobs scored by lease expiry (the per-user capacity count)."""
        return self._of_user(user, "running", self._named(user))

    def stored_bytes(self, user: str) -> str:
        """The bytes charged to the user: the sum of ``stored_charges`` (absent: none)."""
        return self._of_user(user, "stored", self._named(user))

    def stored_charges(self, user: str) -> str:
        """A hash: job id → the bytes the job is charged (its request; at its end, its log too)."""
        return self._of_user(user, "charges", self._named(user))

    def stored_lapse(self, user: str) -> str:
        """A sorted set: job id → when its charge lapses by itself (once Redis has expired
        the job's keys, should no sweep release it)."""
        return self._of_user(user, "charges_lapse", self._named(user))

    def muted(self, user: str) -> str:
        return self._of_user(user, "muted", self._named(user))

    def inbox(self, user: str) -> tuple[str, str]:
        """The user's notifications: a hash by id and a sorted set by time."""
        return self._of_user(user, "notif", self._named(user)), self._of_user(
            user, "notifs", self._named(user)
        )

    def seats(self, user: str, kind: str) -> str:
        """A sorted set of the user's seats of ``kind`` scored by lease expiry (Redis time, ms)."""
        return self._of_user(user, "seats", self._named(user), kind)

    # -- per shard ---------------------------------------------------------------------

    def instances(self) -> str:
        """The instances alive: a sorted set of instance ids, each scored with the end of
        its last announcement on Redis's clock (one small key, written once a lease round
        by each instance)."""
        return self._k("instances")

    def running(self, shard: int) -> str:
        """The shard's running jobs scored by lease end (Redis's clock): its share of the
        cluster-wide capacity count, and where orphans are found."""
        return self._of_shard(shard, "running")

    def expiry(self, shard: int) -> str:
        """Finished jobs by expiry time."""
        return self._of_shard(shard, "expiry")

    def expiry_taken(self, shard: int) -> str:
        """Expired jobs a sweep took, scored by the end of its claim (Redis's clock): taken
        again by any sweep once it lapses (its sweeper died)."""
        return self._of_shard(shard, "expiry", "taken")

    def scan(self, shard: int) -> str:
        """Who scans the shard for orphans, and until when."""
        return self._of_shard(shard, "scan")

    def outbox(self, shard: int) -> str:
        """A hash: job id → the ``OutboxEntry`` its terminal commit left (JSON)."""
        return self._of_shard(shard, "outbox")

    def outbox_due(self, shard: int) -> str:
        """A sorted set: job id → when the claim on its outbox entry lapses."""
        return self._of_shard(shard, "outbox", "due")

    def outbox_claims(self, shard: int) -> str:
        """A hash: job id → the instance that claims its outbox entry."""
        return self._of_shard(shard, "outbox", "by")

    def outbox_owned(self, shard: int, owner: str) -> str:
        """A set: the outbox entries an instance claimed (stale ids dropped at its next claim)."""
        return self._of_shard(shard, "outbox", "owner", self._named(owner))

    def webhooks(self, *parts: str) -> str:
        """Webhook deliveries (``redis_webhooks``), in the prefix's own slot: ``webhooks()`` a
        hash delivery id → its JSON; ``webhooks("due", ENDPOINT)`` a sorted set delivery id
        → when it may be claimed (its next attempt, or its claim's end); ``webhooks("dead")``
        dead letters by when; ``webhooks("disabled")`` a hash endpoint → why."""
        return self._k("webhooks", *parts)

    # -- channels (sharded pub/sub: each lives on the shard of its entity's slot) ---------

    def job_channel(self, job_id: str) -> str:
        """Where a job's commits are announced (``SPUBLISH``, message ``"ID SEQ"``): in the
        job's slot, so on a cluster only the job's shard carries it, and only instances
        that follow the job (a remote tail, a remote wait for its end) subscribe."""
        return self._of_job(job_id, "commits", job_id)

    def control_channel(self, job_id: str) -> str:
        """What reaches the instance that runs a job (it subscribes while it waits for
        them): ``abort``, ``decision CALL``, and ``watch`` (a follower asks the writer to
        announce its commits again, see ``RedisStore.commit``)."""
        return self._of_job(job_id, "control", job_id)

    def user_channel(self, user: str) -> str:
        """A user's new notifications (JSON), in the user's slot; subscribed by the
        instances that hold a connection of that user."""
        return self._of_user(user, "notifications", self._named(user))
