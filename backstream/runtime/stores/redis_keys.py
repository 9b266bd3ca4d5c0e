"""``RedisKeyspace``: the one place that names every key and channel of ``RedisStore``
and decides which cluster slot (hash tag) each lands in.

User-chosen ids are length-prefixed so that they cannot collide. Today every key
carries the store's one hash tag (``{prefix}``): all keys share a slot, so every
Lua script's keys are on one node. The keys group into three kinds of entity, and a
future per-entity tag would split them as marked below (scripts that span two
kinds, ``CREATE``, the terminal ``COMMIT`` and ``HANDOVER``, would then be split
into one script per slot, in that order, each retried until it lands):

- per job (``{p:job:ID}``): ``job``, ``log``, ``watching``, ``seen``, ``notified``,
  and the job's channel ``job_channel``;
- per user (``{p:user:USER}``): ``msg``, ``user_index``, ``thread_index``,
  ``user_running``, ``muted``, ``inbox``;
- the instance set (kept global): ``running``, ``expiry``, ``outbox``,
  ``outbox_due``, ``outbox_claims``, ``outbox_owned``, and the channels of aborts,
  decisions and notifications.
"""

from __future__ import annotations

__all__ = ["RedisKeyspace"]


class RedisKeyspace:
    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.tag = "{" + prefix + "}"

    def _k(self, *parts: str) -> str:
        """A key of the instance set: the store's own tag."""
        return ":".join((self.tag, *parts))

    def _of_job(self, job_id: str, *parts: str) -> str:
        return ":".join((self.slot_tag("job", job_id), *parts))

    def _of_user(self, user: str, *parts: str) -> str:
        return ":".join((self.slot_tag("user", user), *parts))

    @staticmethod
    def _named(name: str) -> str:
        return f"{len(name)}:{name}"

    def slot_tag(self, kind: str, name: str) -> str:
        """The hash tag of an entity's keys (``kind``: ``job`` or ``user``). For now the
        store's one tag, whatever the entity: returning ``{p:kind:name}`` here is what
        would spread jobs and users over the slots (once the scripts are split)."""
        return self.tag

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

    def none(self) -> str:
        """A key no entity uses (a script's placeholder for a key that does not apply)."""
        return self._k("none")

    # -- channels ------------------------------------------------------------------------

    def job_channel(self, job_id: str) -> str:
        """Where a job's commits are announced. For now one global channel for every job
        (one subscription per instance); a per-job channel (``SSUBSCRIBE`` in a cluster)
        would be ``{p:job:ID}:commits``, subscribed by ``RedisSubscriber.listen_job``."""
        return self._k("commits")

    def channel(self, name: str) -> str:
        """``aborts``, ``decisions``, ``notifications`` (and ``commits``)."""
        return self._k(name)

    def channels(self) -> list[str]:
        return [self.channel(name) for name in ("commits", "aborts", "decisions", "notifications")]
