"""``RedisKeyspace``: the one place that names every key and channel of ``RedisStore``
and decides which cluster slot (hash tag) each lands in.

User-chosen ids are length-prefixed so that they cannot collide. Keys are grouped
by entity; with ``per_entity_slots`` each entity has a hash tag of its own, so that
jobs and users spread over a Redis Cluster's slots while every Lua script touches one
slot only. Without it (the default, and the layout of every deployment before it), every
key carries the store's one tag ``{p}``: the same key names as ever, all in one slot, and
the same scripts run unchanged. The layout is chosen per deployment (a prefix): data
written under one layout is not found under the other.

- per job (``{p:job:ID}``): ``job`` (its record; a terminal commit also leaves its
  outbox entry there, field ``outbox``), ``log``, ``watching``, ``seen``, ``notified``;
- per user (``{p:user:USER}``): ``msg`` (the idempotency key), ``user_index``,
  ``thread_index``, ``user_running`` (the per-user capacity count), ``muted``, ``inbox``;
- the instance set (``{p}``): ``running`` (the cluster-wide capacity count and the list
  of leases, where orphans and unfinished terminal commits are found), ``expiry``,
  ``outbox``, ``outbox_due``, ``outbox_claims``, ``outbox_owned``.

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
  user's running entry, checked against the per-user limit; (2) instance set: the
  running entry, checked against the cluster-wide limit (a refusal undoes step 1);
  (3) job slot: the record, unless it exists (who writes it is who inserted). The
  record comes last, so nobody sees a job before its slots are taken. A crash after
  (1) leaves the idempotency key naming a job with no record: the next create with
  that message id finishes that job's steps (under its id) instead of starting
  another; the user's running entry lapses with its lease meanwhile. A crash after
  (2) leaves a running entry without a record: the keeper's ``take_orphans`` drops it
  once its lease lapses.
- terminal commit: (1) job slot: entries, status and the outbox entry (one atomic
  step: the end and its effect are never apart); (2) user slot: the user's running
  entry removed; (3) instance set: the outbox entry indexed (claimed by the writer),
  the expiry entry added, the running entry removed; then the end is announced on the
  job's channel (a watcher woken by it finds the slots freed too). (3) comes last among
  the writes, so the running set still lists a job whose terminal commit stopped after
  (1) or (2). The writer's next commit of the job (a retry) or, once the old lease
  lapsed, the keeper's ``take_orphans`` runs (2) and (3) again from the record: removals are idempotent,
  and (3) writes the outbox entry only while the job is still in the running set.
- hand-over: the running set lists lapsed leases; the job slot's script takes the job
  (owner, lease, epoch + 1) atomically; then the running entries follow the new lease
  (if that step is lost, the new owner's next renewal moves them).
- lease renewal: per job (owner checked in its slot), then the running entries.
- a notification: the thread's mute is read (user slot); the job slot's script checks
  that nobody watches and marks the job notified (never twice); the user slot's script
  adds it to the inbox and publishes it on the user's channel.
"""

from __future__ import annotations

__all__ = ["RedisKeyspace"]


class RedisKeyspace:
    def __init__(self, prefix: str, *, per_entity_slots: bool = False) -> None:
        self.prefix = prefix
        self.tag = "{" + prefix + "}"
        self.per_entity_slots = per_entity_slots

    def _k(self, *parts: str) -> str:
        """A key of the instance set: the store's own tag (one slot)."""
        return ":".join((self.tag, *parts))

    def _of_job(self, job_id: str, *parts: str) -> str:
        return ":".join((self.slot_tag("job", job_id), *parts))

    def _of_user(self, user: str, *parts: str) -> str:
        return ":".join((self.slot_tag("user", user), *parts))

    @staticmethod
    def _named(name: str) -> str:
        return f"{len(name)}:{name}"

    def slot_tag(self, kind: str, name: str) -> str:
        """The hash tag of an entity's keys (``kind``: ``job`` or ``user``): with
        ``per_entity_slots`` one slot per job and per user (a name holding ``}`` ends the
        tag early: still the same tag for every key of that entity, which is all a script
        needs); otherwise the store's one tag."""
        if not self.per_entity_slots:
            return self.tag
        return "{" + f"{self.prefix}:{kind}:{name}" + "}"

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

    def muted(self, user: str) -> str:
        return self._of_user(user, "muted", self._named(user))

    def inbox(self, user: str) -> tuple[str, str]:
        """The user's notifications: a hash by id and a sorted set by time."""
        return self._of_user(user, "notif", self._named(user)), self._of_user(
            user, "notifs", self._named(user)
        )

    # -- the instance set ----------------------------------------------------------------

    def running(self) -> str:
        """Running jobs scored by lease expiry: the cluster-wide capacity count, and where
        orphans are found."""
        return self._k("running")

    def expiry(self) -> str:
        """Finished jobs by expiry time."""
        return self._k("expiry")

    def outbox(self) -> str:
        """A hash: job id → the ``OutboxEntry`` its terminal commit left (JSON)."""
        return self._k("outbox")

    def outbox_due(self) -> str:
        """A sorted set: job id → when the claim on its outbox entry lapses."""
        return self._k("outbox", "due")

    def outbox_claims(self) -> str:
        """A hash: job id → the instance that claims its outbox entry."""
        return self._k("outbox", "by")

    def outbox_owned(self, owner: str) -> str:
        """A set: the outbox entries an instance claimed (stale ids dropped at its next claim)."""
        return self._k("outbox", "owner", self._named(owner))

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
