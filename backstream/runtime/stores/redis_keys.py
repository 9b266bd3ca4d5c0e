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
  ``thread_index``, ``user_running`` (the per-user capacity count), ``muted``, ``inbox``,
  ``seats`` (per kind: the user's open streams, connections; ``redis_seats``), and the
  quota of stored bytes (``redis_quota``): ``stored_bytes``, ``stored_charges``,
  ``stored_lapse``;
- the instance set (``{p}``): ``running`` (the cluster-wide capacity count and the list
  of leases, where orphans and unfinished terminal commits are found), ``expiry``,
  ``outbox``, ``outbox_due``, ``outbox_claims``, ``outbox_owned``, and every channel.

What spans entities is a sequence of one-slot scripts, each idempotent, in an order
that leaves nothing a reader would misreport (``redis_steps``):

- create: (1) user slot: the idempotency key (``SET`` unless another job has it) and the
  user's running entry, checked against the per-user limit; then, in the same slot, the
  request's bytes checked against the user's quota and charged (a refusal undoes the
  first user step; a retry finds the charge made and makes none); (2) instance set: the
  running entry, checked against the cluster-wide limit (a refusal undoes step 1);
  (3) job slot: the record, unless it exists (who writes it is who inserted). The
  record comes last, so nobody sees a job before its slots are taken. A crash after
  (1) leaves the idempotency key naming a job with no record: the next create with
  that message id finishes that job's steps (under its id) instead of starting
  another; the user's running entry lapses with its lease meanwhile (its charge a day
  after its creation, should no create ever finish it). A crash after
  (2) leaves a running entry without a record: the keeper's ``take_orphans`` drops it
  once its lease lapses.
- terminal commit: (1) job slot: entries, status and the outbox entry (one atomic
  step: the end and its effect are never apart; the log's stored bytes are summed on
  the record as each batch lands); (2) user slot: the user's running entry removed,
  then the job's charge set to its request and its log (only while it holds one: a
  charge the sweep released is never made again); (3) instance set: the outbox entry
  indexed (claimed by the writer), the expiry entry added, the running entry removed,
  and the commit announced on the job's channel (a watcher woken by it finds the slots
  freed too); last, so the running set still lists a job whose terminal commit stopped
  after (1) or (2). The writer's next commit of the job (a retry) or, once the old
  lease lapsed, the keeper's ``take_orphans`` runs (2) and (3) again from the record:
  removals are idempotent, the charge is set (not added), and (3) writes the outbox
  entry only while the job is still in the running set.
- the sweep: per expired job, the user slot first (the idempotency key, the indexes,
  then the job's charge released: it holds none afterwards, so nothing is released
  twice), then the job's keys, then its expiry entry.
- hand-over: the running set lists lapsed leases; the job slot's script takes the job
  (owner, lease, epoch + 1) atomically; then the running entries follow the new lease
  (if that step is lost, the new owner's next renewal moves them).
- lease renewal: per job (owner checked in its slot), then the running entries.
- a notification: the thread's mute is read (user slot); the job slot's script checks
  that nobody watches and marks the job notified (never twice); the user slot's script
  adds it to the inbox and publishes it.
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

    def webhooks(self, *parts: str) -> str:
        """Webhook deliveries (``redis_webhooks``), in the instance set: ``webhooks()`` a
        hash delivery id → its JSON; ``webhooks("due", ENDPOINT)`` a sorted set delivery id
        → when it may be claimed (its next attempt, or its claim's end); ``webhooks("dead")``
        dead letters by when; ``webhooks("disabled")`` a hash endpoint → why."""
        return self._k("webhooks", *parts)

    # -- channels ------------------------------------------------------------------------

    def job_channel(self, job_id: str) -> str:
        """Where a job's commits are announced. For now one global channel for every job
        (one subscription per instance; ``PUBLISH`` reaches every node of a cluster); a
        per-job channel (``SSUBSCRIBE`` in a cluster) would be ``{p:job:ID}:commits``,
        subscribed by ``RedisSubscriber.listen_job``."""
        return self._k("commits")

    def channel(self, name: str) -> str:
        """``aborts``, ``decisions``, ``notifications`` (and ``commits``)."""
        return self._k(name)

    def channels(self) -> list[str]:
        return [self.channel(name) for name in ("commits", "aborts", "decisions", "notifications")]
