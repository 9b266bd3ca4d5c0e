"""The interfaces the actors depend on: a store, a model and tools.

Actors never import the runtime that implements these. The runtime builds a
store (memory, SQLite, Redis), models (the upstream client, the built-ins) and
a tool registry, and hands them to the actors at construction.
"""

from __future__ import annotations

import abc
import enum
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any, ClassVar, Protocol

import attrs
import trio

from backstream.actors.signals import StoreClosedError
from backstream.actors.webhook_queue import WebhookQueue
from backstream.protocol.chat_stream import ModelOutput, ToolCallDone
from backstream.protocol.events import ErrorInfo, JobStatus, LogEvent
from backstream.protocol.records import JobProgress, JobRecord, NotificationRecord, SharedCapacity

__all__ = [
    "Capability",
    "ChatTurn",
    "EntriesListener",
    "Handover",
    "Housekeeping",
    "Inbox",
    "JobAccess",
    "JobEndedElsewhereError",
    "JobStore",
    "JobWriter",
    "Leases",
    "LogBehindError",
    "LogStore",
    "Model",
    "ModelFailure",
    "NotificationListener",
    "Outbox",
    "OutboxEntry",
    "OutputSink",
    "SeatKey",
    "Seats",
    "Signals",
    "Store",
    "StoreClosedError",
    "StoreService",
    "StoredLogs",
    "ToolOutcome",
    "ToolSpec",
    "Tools",
    "TurnResult",
    "seen_end_counts",
]

# -- models ------------------------------------------------------------------------------

OutputSink = Callable[[ModelOutput], None]
"""Receives each output as it arrives; may raise to stop the turn (e.g. the output limit)."""


class ModelFailure(Exception):
    """The turn failed; ``error`` says why, with a job error code."""

    def __init__(self, error: ErrorInfo) -> None:
        super().__init__(error.message)
        self.error = error


@attrs.frozen
class ChatTurn:
    """One request to a model: the conversation so far and the options."""

    model: str
    messages: tuple[dict[str, Any], ...]
    params: dict[str, Any] = attrs.field(factory=dict)
    tools: tuple[dict[str, Any], ...] = ()  # OpenAI "tools" entries
    prefill: str | None = None
    """The start of this turn's answer, to be continued (a turn cut short by a crash,
    ``prefill`` policy): sent as a final assistant message. A model may echo it, continue
    it, or start over; the job tells which (``PrefixJoiner``)."""


@attrs.frozen
class TurnResult:
    finish_reason: str
    usage: dict[str, Any] | None
    tool_calls: tuple[ToolCallDone, ...]


class Model(Protocol):
    async def run_turn(self, turn: ChatTurn, sink: OutputSink) -> TurnResult:
        """Stream one turn into ``sink``. Raises ``ModelFailure``.

        Cancellation: the request is abandoned at once and its connection closed.
        """
        ...


# -- tools -------------------------------------------------------------------------------


@attrs.frozen
class ToolOutcome:
    """What a tool call gave back to the model: its output text, or an error text."""

    output: str
    is_error: bool


class ToolSpec(Protocol):
    """A tool as a job sees it."""

    @property
    def name(self) -> str: ...

    @property
    def requires_approval(self) -> bool: ...

    @property
    def idempotent(self) -> bool:
        """Whether a call cut short by a crash may run again on the instance that takes over."""
        ...

    @property
    def max_output_chars(self) -> int:
        """Characters of output kept of one call; the rest is cut before the log."""
        ...

    def openai_spec(self) -> dict[str, Any]:
        """The OpenAI ``tools`` entry that describes it to a model."""
        ...


class Tools(Protocol):
    """The tools a job may call, by name."""

    def get(self, name: str) -> ToolSpec | None: ...

    async def run(self, name: str, arguments: str) -> ToolOutcome:
        """Validate ``arguments`` (JSON text) and run the tool under its own timeout.

        Never raises for the tool's faults: they become an error outcome.
        Cancellation: the call is abandoned (a subprocess is killed).
        """
        ...


# -- the store ---------------------------------------------------------------------------
# Small ports, so that an actor depends only on what it uses; ``Store`` is their union,
# for whoever needs everything (the runtime that builds and hands them out).

NotificationListener = Callable[[NotificationRecord], None]


class JobEndedElsewhereError(Exception):
    """The store holds the job as ended, or handed to another owner, although this writer
    still runs it: another instance took it for an orphan (its lease lapsed, e.g. while
    the store was away). Nothing was changed; the writer must stop writing, since the
    stored state stands."""

    def __init__(self, job_id: str) -> None:
        super().__init__(f"{job_id}: the store holds this job as ended or taken over by another instance")
        self.job_id = job_id


class LogBehindError(Exception):
    """A commit's entries do not continue the stored log: the store holds fewer entries
    than the writer believed written (Redis came back from an older snapshot). The
    writer sends again what follows ``stored_seq``; nothing was changed."""

    def __init__(self, job_id: str, stored_seq: int) -> None:
        super().__init__(f"{job_id}: the stored log ends at seq {stored_seq}")
        self.job_id = job_id
        self.stored_seq = stored_seq


class Capability(enum.Enum):
    """What a store offers beyond the ports every store implements."""

    SHARED_BETWEEN_PROCESSES = "shared_between_processes"
    """Many instances use it at once (Redis): presence, signals and notifications cross them."""
    SURVIVES_RESTART = "survives_restart"
    """Its jobs outlive the process (SQLite, Redis): a new instance finds the old one's jobs."""
    LEASES = "leases"
    """Running jobs hold leases; a job whose lease lapsed is an orphan another instance takes."""
    SHARED_CAPACITY = "shared_capacity"
    """``create_job`` counts running jobs across instances (``SharedCapacity``)."""


@attrs.frozen
class Handover:
    """An orphan handed to a new owner by ``Leases.take_orphans``: its record (new owner,
    new lease, epoch + 1) and its durable entries."""

    record: JobRecord
    entries: tuple[LogEvent, ...]


@attrs.frozen
class OutboxEntry:
    """The effect a job's terminal commit leaves behind: its end, to be told to its user.
    Written in the same atomic step as the terminal commit, so a crash cannot lose it."""

    job_id: str
    user: str
    thread_id: str
    status: JobStatus
    error: ErrorInfo | None
    preview: str | None = None
    """The start of the job's content (``JobProgress.preview``); None: read it from the log."""


class StoreService(abc.ABC):
    """Opening, closing and the store's own background work."""

    capabilities: frozenset[Capability] = frozenset()

    @abc.abstractmethod
    async def open(self, *, on_notification: NotificationListener | None = None) -> None:
        """Connect and prepare (migrations, scripts). Called once before use.

        ``on_notification`` is called (synchronously, it must not block) with every
        notification created on any instance for a user this process follows
        (``Inbox.notifications_of``). Cancellation: nothing stays open.
        """

    @abc.abstractmethod
    async def aclose(self) -> None:
        """Release connections. Cancellation: resources are still released."""

    @abc.abstractmethod
    async def ping(self) -> None:
        """Return if the store answers; raise ``UnavailableError`` if not. Cancellation: safe."""

    @abc.abstractmethod
    def statistics(self) -> object:
        """A frozen snapshot of the store's counters (an attrs class per store)."""

    @abc.abstractmethod
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The store's background work (a writer, or listening for other instances), until
        cancelled. Cancellation: stops it; waits of a shared store fall back to polling."""


class JobStore(abc.ABC):
    """Job records: created, found, listed and swept."""

    @abc.abstractmethod
    async def create_job(
        self,
        record: JobRecord,
        capacity: SharedCapacity | None = None,
        *,
        max_stored_bytes: int | None = None,
    ) -> tuple[JobRecord, bool]:
        """Insert ``record`` unless the user already has a job with its ``message_id``.

        Returns ``(record, True)`` when inserted, or ``(existing, False)``. Atomic: two
        racing creates never both insert. A store with ``SHARED_CAPACITY`` also takes a
        running-job slot before the record is written (nobody sees a job without its
        slot), and raises ``CapacityError`` past
        ``capacity``'s limits (leases that ended before ``capacity.now``, a dead
        instance's, do not count); other stores ignore ``capacity``.

        Every store charges the new job's request (``request_bytes``) to its user's
        stored bytes (``stored_bytes``), checked and charged in one atomic step, across
        instances for a shared store: past ``max_stored_bytes`` (None: no limit) it raises
        ``QuotaExceededError`` and nothing is created. A repeat is never refused.
        Cancellation: the job may or may not exist; creating it again finds it.
        """

    @abc.abstractmethod
    async def stored_bytes(self, user: str) -> int:
        """The bytes charged to ``user``: the request of each of the user's jobs the store
        holds, plus the log of each that ended (charged by its terminal commit; a running
        job's log is not counted yet). A job's bytes are released, exactly once, when the
        sweep deletes it. Cancellation: safe (a read)."""

    @abc.abstractmethod
    async def get_job(self, job_id: str) -> JobRecord | None:
        """The record, or None if there is none (never existed, or swept).
        Cancellation: safe (a read)."""

    @abc.abstractmethod
    async def find_job(self, user: str, message_id: str) -> JobRecord | None:
        """The user's job started with ``message_id``, if any. Cancellation: safe (a read)."""

    @abc.abstractmethod
    async def list_jobs(
        self,
        user: str,
        *,
        thread_id: str | None = None,
        statuses: frozenset[str] | None = None,
        limit: int = 50,
    ) -> list[JobRecord]:
        """The user's jobs, newest first, filtered by thread and status. Cancellation: safe."""

    @abc.abstractmethod
    async def delete_job(self, job_id: str) -> bool:
        """Delete a finished job now (its record, log and outbox entry), releasing its
        stored bytes in the same step, as the sweep does; False if there is no such job or
        it has not finished (a running job is aborted first, then deleted).

        Cancellation: the job may or may not be deleted; deleting again is safe."""

    @abc.abstractmethod
    async def delete_expired(self, now: float) -> list[str]:
        """Delete every finished job whose ``expires_at`` has passed, releasing its stored
        bytes in the same step; return their ids.

        Cancellation: some jobs may be deleted already; the next sweep finds the rest."""


EntriesListener = Callable[[Sequence[LogEvent], int, int], None]
"""Given an announcement's entries, its writer's epoch and the seq the store holds the log
through (``LogStore.follow_job``)."""


class LogStore(abc.ABC):
    """A job's log, written by its one writer and read by anyone."""

    @abc.abstractmethod
    async def commit(self, job_id: str, entries: Sequence[LogEvent], progress: JobProgress) -> None:
        """Append ``entries`` (which continue the stored log) and apply ``progress``, atomically.

        Entries the store already holds (a retried commit) are not appended twice. If the
        entries (or, without entries, ``progress.seq``) go beyond what the stored log
        holds plus one batch, nothing changes and ``LogBehindError`` tells the writer
        where the stored log ends. A commit for a job the store no longer holds does
        nothing; one from a writer whose job was handed to another owner (or ended by
        one) changes nothing and raises ``JobEndedElsewhereError``. Only what a commit
        changes is written: the entries and the progress fields, never the request
        again. Wakes everyone in ``wait_for_entries`` on this job. A commit that ends the
        job writes its ``OutboxEntry`` in the same atomic step as its entries and status
        (the end and its effect are never apart), and has freed the job's shared slots
        when it returns (a store that frees them in later steps finishes those on a
        retried commit, or in ``take_orphans``, if they did not land). A terminal commit
        also charges the job's log (``log_bytes`` of every batch stored) to its user's
        stored bytes, once (a retry sets the same charge again).
        Cancellation: the entries and the status happened or none of them; commit again.
        """

    @abc.abstractmethod
    async def read(self, job_id: str, after_seq: int, limit: int) -> list[LogEvent]:
        """Up to ``limit`` stored entries after ``after_seq``, in order. Cancellation: safe."""

    @abc.abstractmethod
    async def wait_for_entries(self, job_id: str, after_seq: int) -> None:
        """Return once the stored record goes past ``after_seq``, has ended, or is gone.

        May return early (callers re-read and wait again), but never at once twice in a
        row for the same state: a poll has a floor. Waits through an outage.
        Cancellation: safe; nothing is consumed.
        """

    def follow_job(
        self, job_id: str, on_entries: EntriesListener | None = None
    ) -> AbstractContextManager[None]:
        """For the block, this process follows the job's commits made elsewhere (a shared
        store subscribes to them once, however many follow; ``wait_for_entries`` follows
        for its own wait only). ``on_entries`` (synchronous, it must not block) gets each
        announcement: the entries it carries (empty when the store announces them without:
        they are read), the epoch of the writer (0 if unknown) and the seq the store holds
        the log through, which the entries may pass (``announce_entries``). A store one process
        owns has nothing to follow."""
        return nullcontext()

    announces_uncommitted: ClassVar[bool] = False
    """Whether ``announce_entries`` tells the instances following a job of entries not yet committed
    (then a writer commits every ``commit_ms`` and announces in between)."""

    async def announce_entries(self, job_id: str, entries: Sequence[LogEvent]) -> None:
        """Tell the instances that follow the job (``follow_job``) of ``entries``: the ones
        after its last commit, not yet durable; nothing if none follows it. Best effort: a
        lost announcement is made good by the next commit's. Only the job's writer calls
        it. Cancellation: sent or not."""
        await trio.lowlevel.checkpoint()


class Signals(abc.ABC):
    """Aborts and approval decisions, which may come through another instance."""

    @abc.abstractmethod
    async def request_abort(self, job_id: str) -> None:
        """Mark the job to be aborted, and tell the instance that runs it, wherever it is.

        Cancellation: the mark may or may not be set; asking again is harmless."""

    @abc.abstractmethod
    async def wait_abort_requested(self, job_id: str) -> None:
        """Return when, and only when, an abort of ``job_id`` has been requested (perhaps
        already). Waits through an outage of the store, however long.

        Cancellation: safe; nothing is consumed.
        """

    @abc.abstractmethod
    async def send_decision(self, job_id: str, call_id: str, approved: bool) -> None:
        """Deliver a person's decision on a tool call to the instance that runs the job.
        Cancellation: it may or may not be delivered; sending it again is harmless (the
        first decision stands)."""

    @abc.abstractmethod
    async def wait_decision(self, job_id: str, call_id: str) -> bool:
        """Wait for the decision on a tool call, through any outage of the store.
        Cancellation: safe; a decision sent meanwhile is still found by the next wait."""


class Inbox(abc.ABC):
    """Who watches, muted threads, and the notifications of users."""

    @abc.abstractmethod
    async def watch_started(self, job_id: str, watch_id: str, until: float) -> None:
        """Someone watches ``job_id`` (until ``until`` unless renewed, for shared stores);
        ``watch_id`` names the presence (``WatchPresence``: one per job and instance,
        whatever the number of its watches there).
        Cancellation: the watch may or may not be recorded; ``watch_ended`` is safe either way."""

    @abc.abstractmethod
    async def watch_ended(self, job_id: str, watch_id: str, *, saw_end: bool) -> None:
        """That watch ended (unwatched, finished, or its connection dropped). ``saw_end``:
        it delivered the terminal status, so the job counts as watched when it ended, even
        if the watch is gone before the notification check runs. Cancellation: a shared
        store's presence lapses by itself at ``until``."""

    @abc.abstractmethod
    async def renew_watches(self, watches: Sequence[tuple[str, str]], until: float) -> None:
        """Extend the presence of this instance's ``(job_id, watch_id)`` watches (a store
        that one process owns has nothing to extend). Cancellation: some may be renewed;
        the next renewal catches up."""

    @abc.abstractmethod
    async def notify_unwatched(self, notification: NotificationRecord, now: float, max_per_user: int) -> bool:
        """Atomically: if nobody watches the job (on any instance), the thread is not muted
        and the job has no notification of this type yet, store ``notification`` (keeping
        the user's newest ``max_per_user``) and announce it to every instance that follows
        the user (``notifications_of``). Returns
        whether it was created. A watch that saw the job end counts as watching for the
        end's notifications only (see ``seen_end_counts``).
        Cancellation: it may or may not be created, never twice."""

    def notifications_of(self, user: str) -> AbstractContextManager[None]:
        """For the block, this process receives the user's new notifications made on any
        instance (through ``open``'s ``on_notification``): a shared store subscribes to
        them while some block of the user's is open here. A store one process owns
        delivers every one anyway."""
        return nullcontext()

    @abc.abstractmethod
    async def list_notifications(
        self, user: str, *, unread_only: bool, limit: int
    ) -> tuple[list[NotificationRecord], int]:
        """The user's notifications, newest first, and how many are unread. Cancellation: safe."""

    @abc.abstractmethod
    async def mark_notifications_read(self, user: str, ids: Sequence[str], *, everything: bool) -> int:
        """Mark some (or all) of the user's notifications read; return how many stay unread.
        Cancellation: some may be marked; marking again is harmless."""

    @abc.abstractmethod
    async def set_thread_muted(self, user: str, thread_id: str, muted: bool) -> None:
        """Mute or unmute a thread's notifications for its user. Cancellation: it may or
        may not be applied; repeating it is harmless."""


class Leases(abc.ABC):
    """Which instance runs a job, and handing the jobs of dead instances to live ones."""

    @abc.abstractmethod
    async def renew_leases(self, owner: str, job_ids: Sequence[str], until: float) -> None:
        """Extend the leases of ``owner``'s running jobs to ``until`` (a store without
        ``LEASES`` has none). Cancellation: some may be renewed; the next renewal catches up."""

    @abc.abstractmethod
    async def hand_off(self, owner: str, job_ids: Sequence[str], now: float) -> None:
        """``owner`` stops and leaves these jobs running for another instance: their leases
        end ``now`` (a live instance takes them at its next round) and each counts a
        hand-off (``JobRecord.handoffs``), not a crash. A store one process owns marks them
        as it closes instead. Cancellation: some may be handed off; the others' leases
        lapse by themselves."""

    @abc.abstractmethod
    async def announce(self, owner: str, until: float) -> None:
        """Tell a store shared by several instances that ``owner`` is alive until ``until``
        (renewed every lease round; nothing in a store one process owns). Cancellation:
        announced or not; the next round does it again."""

    @abc.abstractmethod
    async def withdraw(self, owner: str) -> None:
        """``owner`` stops: it no longer counts as alive. Cancellation: withdrawn or not (an
        announcement lapses by itself)."""

    @abc.abstractmethod
    async def others_alive(self, owner: str, now: float) -> bool:
        """Whether an instance other than ``owner`` announced itself alive past ``now``: one
        that would take over ``owner``'s jobs. Cancellation: nothing changes."""

    @abc.abstractmethod
    async def take_orphans(self, owner: str, now: float, lease_until: float) -> list[Handover]:
        """Hand every orphan (a live job whose instance is gone: its lease lapsed before
        ``now``, or, in a store one process owns, any live job another instance started)
        to ``owner``, each atomically: new owner, lease until ``lease_until``, epoch + 1
        (readers holding an older epoch's cursor get ``gone``), and its old writer fenced
        off (its commits raise ``JobEndedElsewhereError``). Returns each job this call took
        (each exactly once across instances) with its durable entries; what to do with it
        is the new owner's policy (``RecoveryPolicy``). Cancellation: each job is taken
        atomically or not at all; a job taken but not yet ended is an orphan again once
        ``lease_until`` passes."""


SeatKey = tuple[str, str, str]
"""A seat: its user, its kind (what it counts, e.g. ``streams``) and its id."""


class Seats(abc.ABC):
    """Seats of users: how many of something (open streams, connections) each user holds at
    once, counted across every instance that shares the store. A seat is leased: a shared
    store drops one not renewed within its lease (its instance died), by the store's own
    clock; a store one process owns keeps it until released."""

    @abc.abstractmethod
    async def take_seat(self, user: str, kind: str, seat_id: str, limit: int, lease: float) -> bool:
        """Atomically: unless the user already holds ``limit`` live seats of ``kind`` (lapsed
        ones do not count, and are dropped), take ``seat_id`` for ``lease`` seconds. Returns
        whether it was taken (taking a seat held already renews it). Cancellation: it may or
        may not be taken; ``release_seat`` is safe either way."""

    @abc.abstractmethod
    async def release_seat(self, user: str, kind: str, seat_id: str) -> None:
        """Give the seat back (nothing if it is not held). Cancellation: it may or may not be
        released; a shared store's seat lapses with its lease."""

    @abc.abstractmethod
    async def renew_seats(self, seats: Sequence[SeatKey], lease: float) -> None:
        """Extend these seats of this instance to ``lease`` seconds from now (a seat that
        lapsed meanwhile stays gone). Cancellation: some may be renewed; the next renewal
        catches up."""


OUTBOX_CLAIM_S = 30.0
"""How long a claim on an outbox entry holds. A terminal commit's entry starts claimed
by the job's owner for this long (from the commit's ``updated_at``): its own
dispatcher carries it out at once, others only if that instance died."""


class Outbox(abc.ABC):
    """The effects terminal commits left, until someone has carried them out."""

    @abc.abstractmethod
    async def claim_outbox(self, owner: str, now: float, until: float, limit: int) -> list[OutboxEntry]:
        """Claim up to ``limit`` entries held by ``owner`` already or by nobody (a claim
        that lapsed before ``now``; in a store one process owns, another owner's claim is
        a dead instance's) for ``owner`` until ``until``: while claimed, no other caller
        gets them. Cancellation: they may or may not be claimed; a claim lapses by itself."""

    @abc.abstractmethod
    async def delete_outbox(self, job_ids: Sequence[str]) -> None:
        """Delete these entries: carried out. Cancellation: some may be deleted; a claim
        left lapses and the entry is carried out again (its effect is idempotent)."""

    @abc.abstractmethod
    async def wait_outbox(self, timeout: float) -> None:
        """Return when an entry may have been written (by this process: at once; by
        another instance: at the latest after ``timeout``). Close: raises
        ``StoreClosedError``. Cancellation: safe."""


# -- intersections: what one actor uses of several ports ----------------------------------
# Python has no intersection type, so each is a port of its own that ``Store`` inherits;
# an actor's constructor names the smallest one that covers what it calls.


class StoredLogs(JobStore, LogStore):
    """Records and logs: what reads a job not running here (``StoredSource``)."""


class JobWriter(LogStore, Signals):
    """A job's log and the signals sent to it: what a running job uses (``JobActor``)."""


class JobAccess(StoredLogs, JobWriter):
    """Records, logs and signals: what admits jobs and starts their actors (``Registry``),
    and what acts on a job wherever it runs (``StoredJob``, ``JobHandles``)."""


class Housekeeping(JobStore, Inbox, Leases, Seats):
    """Retention, leases (of jobs, watches and seats) and orphans: the ``Keeper``'s."""


class Store(StoreService, JobAccess, Housekeeping, Outbox, WebhookQueue):
    """Jobs, their logs and the signals between instances: every port in one.

    Methods raise ``UnavailableError`` when the backing service cannot be reached,
    except the ``wait_*`` methods, which wait through an outage (retrying with
    backoff, never in a busy loop). None of them takes a timeout: deadlines live with
    the caller. Close: after ``aclose``, a store that holds connections (SQLite, Redis)
    raises ``StoreClosedError`` from every method, waits included, and waits under way
    raise it at their next look at the store; the memory store has nothing to close.
    What a store offers beyond the ports is in ``capabilities``.

    Cancellation: every method may be cancelled. A write that was cancelled may or may
    not have happened (it is atomic either way: all of it or none); repeating it is
    safe, because creates are idempotent per message id and commits skip the entries
    the store already holds. Cancelling a wait consumes nothing.
    """


def seen_end_counts(notification_type: str) -> bool:
    """Whether a watch that delivered the job's end counts as watching for a notification
    of this type: yes for the end's notifications; no for ``ai.tool.approval_required``,
    which concerns a wait that begins later (nobody saw it)."""
    return notification_type != "ai.tool.approval_required"
