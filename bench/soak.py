"""Chaos soak: watchers over jobs on real ``backstream serve`` processes sharing a Redis of
our own, with faults injected, every watch history recorded and checked.

    ./dev bench soak --minutes 10 --watchers 40 --jobs 16 --plot

Jobs (``backstream/lorem``, 3-20 s each) keep being started, ``--jobs`` at a time, some
with watchers (the Python client, over WebSocket, each to a random instance), some
never watched, some in a muted thread, some aborted midway. Faults, one every
``--fault-every`` seconds, in turn: a client connection reset (the watch reconnects and
resumes), a re-watch from the cursor, ``kill -9`` of an instance (restarted 2 s later;
its jobs end ``interrupted`` on another one, in a new epoch), a Redis pause (SIGSTOP,
then SIGCONT), a Redis restart that keeps its data (AOF, fsync always) and, with
``--wipe``, one that loses it; with ``--pause-past-lease``, a pause longer than the lease.

Checked (``bench/history.py``): every history contiguous, no repeat, no reorder, nothing
after the terminal status, all watches of a job agree, joined text equal to ``job.get``;
every job in a terminal state at the end (or lost to a wipe that came after its start);
notifications as the rules promise: at most one per job and type, of the type the end
status calls for, none for aborted jobs or muted threads, exactly one for a job nobody
ever watched. The servers' RSS is sampled every second. Results go to
``bench/results/soak.json`` (and ``soak.png`` with ``--plot``); the exit status is 1 if
any violation was found. Everything runs on loopback and stops by itself.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack, asynccontextmanager, contextmanager, suppress
from pathlib import Path
from typing import Any

import attrs
import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from backstream.actors.ports import OUTBOX_CLAIM_S
from backstream.client import Client, open_client
from backstream.protocol.errors import (
    BackstreamError,
    CapacityError,
    GoneError,
    NotFoundError,
    RateLimitedError,
    UnavailableError,
)
from backstream.protocol.events import TERMINAL_STATUSES, Batch
from bench._common import rss_bytes, write_json
from bench._procs import free_port, wait_for_port
from bench.history import History, Violation

FAULTS = ("reset", "rewatch", "kill_instance", "redis_pause", "redis_restart")
WIPE = "redis_wipe"
PAUSE_PAST_LEASE = "redis_pause_past_lease"
"""Off unless asked for: a Redis pause longer than the lease lets another instance recover
a job whose instance is alive, and nothing fences the old owner's later writes (it appends
after the recovery's terminal status). ``--pause-past-lease`` turns it on."""
END_TYPES = {
    "completed": "ai.message.received",
    "failed": "system.warning",
    "interrupted": "system.warning",
    "aborted": "system.warning",
}
# A job's end notification is carried out of the outbox by its owner's dispatcher; when the
# owner was killed right after the end, by another instance once the owner's claim lapses.
NOTIFICATION_PATIENCE_S = OUTBOX_CLAIM_S + 15.0


@attrs.frozen
class Settings:
    seconds: float = 600.0
    instances: int = 2
    jobs: int = 16  # running at once
    watchers: int = 40  # watching at once
    users: int = 4
    fault_every: float = 6.0
    faults: tuple[str, ...] = FAULTS
    lease_ttl: float = 10.0  # longer than any pause or restart, unless PAUSE_PAST_LEASE
    job_tokens: tuple[int, int] = (20, 200)  # words per job, at 10-40 words/s
    overrun: float = 150.0  # how long the jobs in flight at the end may take to end
    seed: int = 1
    out: str | None = None
    plot: str | None = None


class RedisServer:
    """A redis-server of our own on a spare port, persisting every write (AOF, fsync always)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, *, wipe: bool = False) -> None:
        if wipe:
            shutil.rmtree(self.directory, ignore_errors=True)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly",
             "yes", "--appendfsync", "always", "--dir", str(self.directory)],
            stdout=subprocess.DEVNULL,
        )
        wait_for_port(self.port)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)


class Instance:
    """One ``backstream serve`` process; restartable on its port."""

    def __init__(
        self, index: int, redis_url: str, prefix: str, tokens: str, logs: Path, lease: float
    ) -> None:
        self.index = index
        self.lease = lease
        self.port = free_port()
        self.redis_url = redis_url
        self.env = {**os.environ, "BACKSTREAM_TOKENS": tokens, "BACKSTREAM_REDIS_PREFIX": prefix}
        self.log_path = logs / f"instance-{index}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/v1"

    def start(self) -> None:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "backstream", "serve", "--port", str(self.port),
                 "--store", self.redis_url, "--lease-ttl", str(self.lease), "--lease-renew-interval", "1",
                 "--drain-timeout", "1", "--max-jobs", "10000", "--max-jobs-per-user", "10000",
                 "--retention", "3600", "--log-level", "warning"],
                env=self.env,
                stdout=log,
                stderr=log,
            )
        wait_for_port(self.port)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()


@attrs.define
class SoakJob:
    job_id: str
    user: str
    thread_id: str
    started_at: float  # monotonic
    kind: str  # watched, unwatched, muted, aborted
    watchers: int = 0
    aborted: bool = False
    lost: bool = False
    final: str = ""  # status and epoch at the end


@attrs.define
class Soak:
    settings: Settings
    instances: list[Instance]
    redis: RedisServer
    history: History = attrs.Factory(History)
    jobs: dict[str, SoakJob] = attrs.Factory(dict)
    faults: Counter[str] = attrs.Factory(Counter)
    fault_log: list[tuple[float, str]] = attrs.Factory(list)
    wipes: list[float] = attrs.Factory(list)  # monotonic times of Redis restarts that lost data
    rss: list[tuple[float, int, int]] = attrs.Factory(list)  # (t, instance, bytes)
    errors: Counter[str] = attrs.Factory(Counter)
    reconnects: int = 0
    started: float = attrs.Factory(time.monotonic)
    running_watchers: int = 0
    stop_starting: trio.Event = attrs.Factory(trio.Event)
    rng: random.Random = attrs.Factory(random.Random)
    clients: list[Client] = attrs.Factory(list)  # open clients, for connection resets
    cursors: dict[str, tuple[str, int, float]] = attrs.Factory(dict)  # watcher -> job, cursor, since
    stuck: dict[str, Any] = attrs.Factory(dict)  # watchers still going when the load's time was up
    phases: dict[str, str] = attrs.Factory(dict)  # job task -> what it is doing
    stuck_tasks: dict[str, str] = attrs.Factory(dict)

    def now(self) -> float:
        return time.monotonic() - self.started

    def token(self, user: str) -> str:
        return f"tok-{user}"

    def url(self) -> str:
        return self.rng.choice(self.instances).url

    @asynccontextmanager
    async def client(self, user: str) -> AsyncIterator[Client]:
        """A client of a random instance; another one while the first is down (killed)."""
        async with AsyncExitStack() as stack:
            for _ in range(60):
                try:
                    client = await stack.enter_async_context(
                        open_client(self.url(), self.token(user), **CLIENT_OPTIONS)
                    )
                    break
                except (OSError, UnavailableError, trio.TooSlowError):
                    self.errors["connect retried"] += 1
                    await trio.sleep(0.5)
            else:
                raise UnavailableError("no instance answers")
            yield client

    # -- load -----------------------------------------------------------------------------

    async def run_jobs(self, nursery: trio.Nursery) -> None:
        """Keep ``settings.jobs`` jobs going until told to stop."""
        slots = trio.Semaphore(self.settings.jobs)
        sequence = 0
        while not self.stop_starting.is_set():
            await slots.acquire()
            if self.stop_starting.is_set():
                break
            sequence += 1
            nursery.start_soon(self.one_job, sequence, slots)

    async def one_job(self, sequence: int, slots: trio.Semaphore) -> None:
        task = f"job task {sequence}"
        self.phases[task] = "connecting"
        try:
            user = f"u{sequence % self.settings.users}"
            kind = self.rng.choices(["watched", "unwatched", "muted", "aborted"], [6, 2, 1, 1])[0]
            thread_id = "quiet" if kind == "muted" else f"t{sequence % 5}"
            tokens, rate = self.rng.randint(*self.settings.job_tokens), self.rng.choice([10.0, 20.0, 40.0])
            async with self.client(user) as client:
                self.phases[task] = "starting"
                started = await self.retrying(
                    lambda: client.start_job(
                        thread_id=thread_id,
                        message_id=f"m{sequence}",
                        model="backstream/lorem",
                        messages=[{"role": "user", "content": "soak"}],
                        params={"max_tokens": tokens, "tokens_per_s": rate},
                    )
                )
                if started is None:
                    return
                job = SoakJob(started.job.job_id, user, thread_id, time.monotonic(), kind)
                self.jobs[job.job_id] = job
                self.phases[task] = f"{kind} {job.job_id}"
                if kind in ("watched", "aborted"):
                    count = max(1, min(4, self.settings.watchers // max(1, self.settings.jobs)))
                    async with trio.open_nursery() as nursery:
                        for w in range(count):
                            nursery.start_soon(self.watch_job, job, f"{job.job_id}/w{w}", w == 1)
                        if kind == "aborted":
                            await trio.sleep(self.rng.uniform(0.5, 3.0))
                            self.phases[task] = f"aborting {job.job_id}"
                            result = await self.retrying(lambda: client.abort(job.job_id))
                            job.aborted = bool(result and result.aborted)
                else:
                    await trio.sleep(tokens / rate)
                self.phases[task] = "closing its client"
        except BackstreamError as exc:
            self.errors[f"job: {exc.code}"] += 1
        finally:
            del self.phases[task]
            slots.release()

    async def retrying(self, request: Any) -> Any:
        """A request, retried through outages (a fault may be in progress)."""
        for _ in range(40):
            try:
                return await request()
            except (UnavailableError, CapacityError, RateLimitedError) as exc:
                self.errors[f"retried: {exc.code}"] += 1
                await trio.sleep(0.5)
        return None

    async def watch_job(self, job: SoakJob, name: str, late_start: bool) -> None:
        """Watch to the end through resets and re-watches; a new epoch is a new history."""
        job.watchers += 1
        self.running_watchers += 1
        after_seq, epoch = 0, None
        try:
            async with self.client(job.user) as client:
                self.clients.append(client)
                try:
                    if late_start:  # a watch from a later cursor
                        await trio.sleep(self.rng.uniform(0.2, 1.5))
                        info = await self.retrying(lambda: client.get(job.job_id))
                        if info is not None and info.job.epoch == 1:
                            after_seq = self.rng.randint(0, info.job.seq)
                    while True:
                        batches: list[Batch] = []
                        start_seq = after_seq
                        self.cursors[name] = (job.job_id, after_seq, self.now())
                        try:
                            outcome = await self.follow(client, job, after_seq, epoch, batches, name)
                        finally:
                            del self.cursors[name]
                        self.history.observe(job.job_id, name, start_seq, batches)
                        if outcome == "gone":  # a new epoch: read it from the start
                            after_seq, epoch = 0, None
                            continue
                        return
                finally:
                    self.reconnects += client.reconnects
                    self.clients.remove(client)
        except BackstreamError as exc:
            self.errors[f"watch: {exc.code}"] += 1
        finally:
            self.running_watchers -= 1

    async def follow(
        self, client: Client, job: SoakJob, after_seq: int, epoch: int | None, batches: list[Batch], name: str
    ) -> str:
        """One epoch's history, re-watching from the cursor now and then."""
        cursor = after_seq
        while True:
            rewatch_at = time.monotonic() + self.rng.uniform(1.0, 8.0)
            try:
                async with client.watch(job.job_id, after_seq=cursor, epoch=epoch) as watch:
                    async for batch in watch:
                        batches.append(batch)
                        cursor, epoch = batch.to_seq, batch.epoch
                        self.cursors[name] = (job.job_id, cursor, self.now())
                        if "rewatch" in self.settings.faults and time.monotonic() > rewatch_at:
                            self.fault("rewatch")
                            break
                    else:
                        return "ended"
                    if watch.ended:
                        return "ended"
            except GoneError:
                return "gone"
            except NotFoundError:
                job.lost = True
                return "lost"
            except UnavailableError as exc:
                if "batch starts at" in str(exc):  # the client's own gap check
                    self.violation(job, "gap", f"client: {exc}")
                self.errors[f"watch: {exc.code}"] += 1
                await trio.sleep(0.5)

    # -- faults ------------------------------------------------------------------------------

    def fault(self, kind: str) -> None:
        self.faults[kind] += 1
        self.fault_log.append((self.now(), kind))

    async def inject_faults(self) -> None:
        kinds = [k for k in self.settings.faults if k != "rewatch"]
        turn = 0
        while not self.stop_starting.is_set() and kinds:
            await trio.sleep(self.settings.fault_every)
            if self.stop_starting.is_set():
                return
            kind = kinds[turn % len(kinds)]
            turn += 1
            self.fault(kind)
            # Never leave Redis stopped or an instance down; bounded, as a close may hang.
            with trio.CancelScope(shield=True) as scope:
                scope.deadline = trio.current_time() + self.settings.lease_ttl + 60
                await self.do_fault(kind)
            if scope.cancelled_caught:
                self.errors[f"fault {kind} overran"] += 1
                self.redis.signal(signal.SIGCONT)

    async def do_fault(self, kind: str) -> None:
        if kind == "reset":
            for client in self.rng.sample(self.clients, k=min(len(self.clients), 5)):
                with trio.move_on_after(5):  # the close handshake of a reset may never finish
                    await client.drop_connection()
        elif kind == "kill_instance":
            victim = self.rng.choice(self.instances)
            victim.kill()
            await trio.sleep(2.0)
            await self.restart(victim)
        elif kind in ("redis_pause", PAUSE_PAST_LEASE):
            self.redis.signal(signal.SIGSTOP)
            await trio.sleep(2.0 if kind == "redis_pause" else self.settings.lease_ttl + 3)
            self.redis.signal(signal.SIGCONT)
        elif kind in ("redis_restart", "redis_wipe"):
            self.redis.kill()
            await trio.sleep(1.0)
            if kind == "redis_wipe":
                self.wipes.append(time.monotonic())
            await trio.to_thread.run_sync(lambda: self.redis.start(wipe=kind == "redis_wipe"))

    async def watchdog(self, after: float) -> None:
        """Just before the load's time is up: which tasks are still going."""
        await trio.sleep(after)
        self.stuck = {
            watcher: {"job_id": job_id, "cursor": cursor, "last_batch_at": round(since, 1)}
            for watcher, (job_id, cursor, since) in self.cursors.items()
        }
        self.stuck_tasks = {**self.phases, "trio tasks": ", ".join(sorted(set(task_names())))}

    async def restart(self, instance: Instance) -> None:
        for _ in range(3):
            try:
                await trio.to_thread.run_sync(instance.start)
                return
            except TimeoutError:  # a slow start on a busy machine: kill it, try again
                self.errors[f"instance {instance.index} slow to restart"] += 1
                instance.kill()
        raise RuntimeError(f"instance {instance.index} did not restart; see {instance.log_path}")

    async def sample_rss(self) -> None:
        while True:
            for instance in self.instances:
                proc = instance.proc
                if proc is not None and proc.poll() is None:
                    with suppress(OSError):  # it died just now
                        self.rss.append((self.now(), instance.index, rss_bytes(proc.pid)))
            await trio.sleep(1.0)

    # -- the end -------------------------------------------------------------------------------

    async def check_end(self) -> dict[str, Any]:
        """Every job terminal (or lost to a wipe after its start), job.get equal to the log,
        notifications as promised."""
        statuses: Counter[str] = Counter()
        by_user: dict[str, list[SoakJob]] = {}
        final: dict[str, str] = {}
        for job in self.jobs.values():
            by_user.setdefault(job.user, []).append(job)
        for user, jobs in by_user.items():
            async with self.client(user) as client:
                for job in jobs:
                    status = await self.final_status(client, job)
                    for stuck in self.stuck.values():
                        if stuck["job_id"] == job.job_id:
                            stuck["job_at_the_end"] = job.final
                    final[job.job_id] = status
                    job.final = job.final or status
                    statuses[status] += 1
                listed = await self.settled_notifications(client, jobs, final)
                self.check_notifications(listed, jobs, final)
        for watcher, stuck in self.stuck.items():
            job = self.jobs[stuck["job_id"]]
            if final.get(job.job_id) in TERMINAL_STATUSES:
                detail = f"{watcher} waits after seq {stuck['cursor']} of a job that ended {job.final}"
                self.violation(job, "stuck_watch", detail)
        return dict(statuses)

    async def final_status(self, client: Client, job: SoakJob) -> str:
        deadline = time.monotonic() + 30
        while True:
            try:
                info = await client.get(job.job_id, include_content=True)
            except NotFoundError:
                if not any(w > job.started_at for w in self.wipes):
                    self.violation(job, "lost", "job.get: not_found, and no Redis wipe since its start")
                return "lost"
            except (UnavailableError, RateLimitedError) as exc:
                if time.monotonic() > deadline:
                    self.violation(job, "unavailable", f"job.get at the end: {exc}")
                    return "unavailable"
                await trio.sleep(0.5)
                continue
            if info.job.status in TERMINAL_STATUSES:
                break
            if time.monotonic() > deadline:
                self.violation(job, "not_terminal", f"still {info.job.status} at the end")
                return info.job.status
            await trio.sleep(0.5)
        if job.aborted and info.job.status != "aborted":
            self.violation(job, "status", f"abort said aborted, job.get says {info.job.status}")
        summary = info.job
        job.final = f"{summary.status} epoch {summary.epoch}"
        self.history.check_final(job.job_id, summary.epoch, summary.status, info.content or "", summary.seq)
        return info.job.status

    async def settled_notifications(self, client: Client, jobs: list[SoakJob], final: dict[str, str]) -> Any:
        """The user's notifications once every unwatched end has its own, or once
        ``NOTIFICATION_PATIENCE_S`` has passed (an end whose instance was killed is notified
        by another instance, after the dead one's claim on it lapsed)."""
        deadline = time.monotonic() + NOTIFICATION_PATIENCE_S
        while True:
            listed = await self.retrying(lambda: client.notifications_list(limit=200))
            if listed is None or time.monotonic() > deadline:
                return listed
            seen = {(n.job_id, n.type) for n in listed.notifications}
            expected = {
                (job.job_id, END_TYPES[final[job.job_id]])
                for job in jobs
                if job.kind == "unwatched" and final.get(job.job_id) in END_TYPES
            }
            if expected <= seen:
                return listed
            await trio.sleep(1.0)

    def check_notifications(self, result: Any, jobs: list[SoakJob], final: dict[str, str]) -> None:
        if result is None:
            self.errors["notifications.list unavailable"] += 1
            return
        seen: Counter[tuple[str, str]] = Counter((n.job_id, n.type) for n in result.notifications)
        for (job_id, kind), count in seen.items():
            job = self.jobs.get(job_id)
            if job is None:
                continue
            if count > 1:
                self.violation(job, "notification", f"{count} notifications of type {kind}")
            if job.kind == "muted":
                self.violation(job, "notification", f"{kind} for a muted thread")
            status = final.get(job_id)
            if status in TERMINAL_STATUSES and END_TYPES.get(status) != kind:
                self.violation(job, "notification", f"{kind} for a job that ended {status}")
        for job in jobs:
            status = final.get(job.job_id, "")
            if job.kind == "unwatched" and status in END_TYPES and seen[(job.job_id, END_TYPES[status])] != 1:
                self.violation(job, "notification", f"ended {status} unwatched, but no notification")

    def violation(self, job: SoakJob, kind: str, detail: str) -> None:
        self.history.add([Violation(job.job_id, "end", kind, detail)])


CLIENT_OPTIONS: dict[str, Any] = {
    "request_timeout": 10.0,
    "reconnect_base": 0.1,
    "reconnect_max": 1.0,
    "max_reconnect_attempts": 60,
}


@contextmanager
def processes(settings: Settings, directory: Path) -> Iterator[tuple[RedisServer, list[Instance]]]:
    if shutil.which("redis-server") is None:
        raise SystemExit("soak: redis-server is needed (apt-get install redis-server)")
    redis = RedisServer(directory / "redis")
    redis.start()
    tokens = ",".join(f"tok-u{i}=u{i}" for i in range(settings.users))
    prefix = f"soak:{uuid.uuid4().hex[:8]}"
    url = f"redis://127.0.0.1:{redis.port}/0"
    instances = [
        Instance(i, url, prefix, tokens, directory, settings.lease_ttl) for i in range(settings.instances)
    ]
    try:
        for instance in instances:
            instance.start()
        yield redis, instances
    finally:
        for instance in instances:
            instance.stop()
        redis.signal(signal.SIGCONT)
        redis.kill()


async def soak(settings: Settings) -> dict[str, Any]:
    """Run the soak; return its results (``violations`` empty if all held)."""
    directory = Path(tempfile.mkdtemp(prefix="bssoak-"))
    try:
        with processes(settings, directory) as (redis, instances):
            state = Soak(settings, instances, redis, rng=random.Random(settings.seed))
            for user in range(settings.users):
                async with open_client(instances[0].url, f"tok-u{user}") as client:
                    await client.mute_thread("quiet")
            async with trio.open_nursery() as nursery:
                nursery.start_soon(state.sample_rss)
                nursery.start_soon(state.watchdog, settings.seconds + settings.overrun - 1)
                # Jobs in flight end by themselves (20 s at most, or a lease later): bounded.
                with trio.move_on_after(settings.seconds + settings.overrun) as bounded:
                    async with trio.open_nursery() as load:
                        load.start_soon(state.run_jobs, load)
                        load.start_soon(state.inject_faults)
                        await trio.sleep(settings.seconds)
                        state.stop_starting.set()
                if bounded.cancelled_caught:
                    state.errors["the load overran"] += 1
                statuses: dict[str, int] = {}
                with trio.move_on_after(300) as checked:  # 30 s per job at most, in practice a few
                    statuses = await state.check_end()
                if checked.cancelled_caught:
                    state.errors["the final check overran"] += 1
                nursery.cancel_scope.cancel()
            logs = {i.index: i.log_path.read_text(errors="replace")[-4000:] for i in instances}
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    return results(state, statuses, logs)


def task_names() -> list[str]:
    """The names of every task of this run (what is left when the load overruns)."""
    found: list[str] = []

    def walk(task: trio.lowlevel.Task) -> None:
        for nursery in task.child_nurseries:
            for child in nursery.child_tasks:
                found.append(child.name.rsplit(".", 1)[-1])
                walk(child)

    walk(trio.lowlevel.current_root_task())
    return found


def results(state: Soak, statuses: dict[str, int], logs: dict[int, str]) -> dict[str, Any]:
    history = state.history
    rss_by_instance: dict[int, list[int]] = {}
    for _t, index, value in state.rss:
        rss_by_instance.setdefault(index, []).append(value)
    return {
        "settings": attrs.asdict(state.settings),
        "duration_s": round(state.now(), 1),
        "jobs": len(state.jobs),
        "jobs_by_kind": dict(Counter(j.kind for j in state.jobs.values())),
        "final_statuses": statuses,
        "watch_histories": history.watches,
        "batches": history.batches,
        "events": history.events,
        "client_reconnects": state.reconnects,
        "faults": dict(state.faults),
        "fault_log": state.fault_log,
        "stuck_watchers": state.stuck,
        "stuck_job_tasks": state.stuck_tasks,
        "errors": dict(state.errors),
        "violations": [v.as_json() for v in history.violations[:200]],
        "violating_jobs": {
            v.job_id: attrs.asdict(state.jobs[v.job_id]) for v in history.violations if v.job_id in state.jobs
        },
        "violation_count": len(history.violations),
        "violation_kinds": dict(Counter(v.kind for v in history.violations)),
        "rss_mb": {
            str(i): {"first": v[0] / 2**20, "max": max(v) / 2**20, "last": v[-1] / 2**20}
            for i, v in rss_by_instance.items()
        },
        "rss_samples": state.rss,
        "server_log_tails": logs if history.violations else {},
    }


def plot(payload: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 4.5))
    series: dict[int, list[tuple[float, float]]] = {}
    for t, index, value in payload["rss_samples"]:
        series.setdefault(index, []).append((t, value / 2**20))
    for index, points in sorted(series.items()):
        ax.plot([p[0] for p in points], [p[1] for p in points], ".", markersize=2, label=f"instance {index}")
    colors = {"kill_instance": "red", "redis_restart": "orange", WIPE: "purple", PAUSE_PAST_LEASE: "black"}
    colors["redis_pause"] = "gray"
    for t, kind in payload["fault_log"]:
        if kind in colors:
            ax.axvline(t, color=colors[kind], alpha=0.25, linewidth=0.8)
    ax.set_xlabel("seconds")
    ax.set_ylabel("RSS (MiB)")
    ax.set_title(
        f"soak: {payload['jobs']} jobs, {payload['watch_histories']} histories, "
        f"{sum(payload['faults'].values())} faults, {payload['violation_count']} violations"
    )
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--instances", type=int, default=2)
    parser.add_argument("--jobs", type=int, default=16, help="jobs running at once")
    parser.add_argument("--watchers", type=int, default=40, help="watchers at once (about)")
    parser.add_argument("--fault-every", type=float, default=6.0)
    parser.add_argument("--wipe", action="store_true", help="also restart Redis without its data")
    parser.add_argument(
        "--pause-past-lease", action="store_true", help="also pause Redis for longer than the lease"
    )
    parser.add_argument("--lease-ttl", type=float, default=10.0)
    parser.add_argument(
        "--faults", default=",".join(FAULTS), help=f"the faults to inject, of {', '.join(FAULTS)}"
    )
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", default=None, help="JSON results (default bench/results/soak.json)")
    parser.add_argument("--plot", nargs="?", const="", default=None, help="PNG of RSS over time")
    args = parser.parse_args()
    settings = Settings(
        seconds=args.minutes * 60,
        instances=args.instances,
        jobs=args.jobs,
        watchers=args.watchers,
        fault_every=args.fault_every,
        faults=tuple(f for f in args.faults.split(",") if f)
        + (WIPE,) * args.wipe
        + (PAUSE_PAST_LEASE,) * args.pause_past_lease,
        lease_ttl=args.lease_ttl,
        seed=args.seed,
    )
    payload = trio.run(soak, settings)
    path = write_json("soak", payload, args.out)
    if args.plot is not None:
        png = args.plot or str(path.with_suffix(".png"))
        plot(payload, png)
        print(f"plot: {png}")
    summary = {k: payload[k] for k in ("duration_s", "jobs", "final_statuses", "watch_histories", "batches",
                                       "events", "client_reconnects", "faults", "violation_count", "rss_mb")}
    print(summary)
    for violation in payload["violations"][:20]:
        print("VIOLATION", violation)
    print(f"results: {path}")
    sys.exit(1 if payload["violation_count"] else 0)


if __name__ == "__main__":
    main()
