"""``Config``: every setting of the runtime, with its default, in one frozen object."""

from __future__ import annotations

from typing import Any

import attrs

from backstream.protocol.continuation import Continuation

__all__ = ["Config"]


def _positive(_instance: Any, attribute: attrs.Attribute[Any], value: float) -> None:
    if not value > 0:
        raise ValueError(f"Config.{attribute.name} must be positive, not {value!r}")


def _positive_or_none(_instance: Any, attribute: attrs.Attribute[Any], value: int | None) -> None:
    if value is not None and not value > 0:
        raise ValueError(f"Config.{attribute.name} must be positive, not {value!r}")


def _non_negative(_instance: Any, attribute: attrs.Attribute[Any], value: float) -> None:
    if not value >= 0:
        raise ValueError(f"Config.{attribute.name} must not be negative, not {value!r}")


def _wait_point(_instance: Any, attribute: attrs.Attribute[Any], value: str) -> None:
    if value not in ("end", "flush"):
        raise ValueError(f"Config.{attribute.name} must be end or flush, not {value!r}")


def _prompt_patterns(_instance: Any, attribute: attrs.Attribute[Any], value: dict[str, str]) -> None:
    for pattern, text in value.items():
        if not isinstance(pattern, str) or not pattern.strip():
            raise ValueError(f"Config.{attribute.name} needs a model pattern before each prompt")
        if not isinstance(text, str):
            raise ValueError(f"Config.{attribute.name} must map patterns to text, not {text!r}")


def _continuation_patterns(_instance: Any, attribute: attrs.Attribute[Any], value: dict[str, str]) -> None:
    known = {policy.value for policy in Continuation}
    for pattern, policy in value.items():
        if not isinstance(pattern, str) or not pattern.strip():
            raise ValueError(f"Config.{attribute.name} needs a model pattern before each policy")
        if policy not in known:
            names = ", ".join(sorted(known))
            raise ValueError(f"Config.{attribute.name} maps {pattern!r} to {policy!r}, not one of {names}")


@attrs.frozen(kw_only=True)
class Config:
    """Settings of a runtime. Times are in seconds unless the name says ``_ms``."""

    # Admission and lifetime.
    max_jobs: int = attrs.field(default=100, validator=_positive)
    """Jobs running at once in this runtime; past it ``start_job`` raises ``CapacityError``."""
    max_jobs_per_user: int = attrs.field(default=8, validator=_positive)
    """Jobs one user may have running at once."""
    job_timeout: float = attrs.field(default=300.0, validator=_positive)
    """A job still running after this long ends ``failed`` with error ``timeout``."""
    retention: float = attrs.field(default=900.0, validator=_non_negative)
    """How long a finished job stays readable before the sweep frees it."""
    max_stored_bytes_per_user: int = attrs.field(default=16 * 1024 * 1024, validator=_positive)
    """Bytes one user's retained jobs may hold in the store (requests, and the logs of the
    jobs that ended, until the sweep frees them); a start past it: ``QuotaExceededError``."""
    sweep_interval: float = attrs.field(default=5.0, validator=_positive)
    """How often the registry looks for jobs whose retention expired."""
    capacity_retry_after_ms: int = attrs.field(default=1000, validator=_positive)
    """The retry hint sent with a capacity error."""
    drain_timeout: float = attrs.field(default=10.0, validator=_non_negative)
    """On a clean close, how long running jobs may go on before they end ``interrupted``."""
    finalize_timeout: float = attrs.field(default=5.0, validator=_positive)
    """Bound on a job's cleanup (its last write to the store) once it has ended."""

    # Many instances and durable stores.
    lease_ttl: float = attrs.field(default=15.0, validator=_positive)
    """A running job's lease; an instance that stops renewing it for this long is presumed dead."""
    lease_renew_interval: float = attrs.field(default=5.0, validator=_positive)
    """How often leases are renewed and orphaned jobs of dead instances looked for."""
    remote_abort_wait: float = attrs.field(default=5.0, validator=_positive)
    """How long ``abort`` of a job running on another instance waits for it to end."""
    store_outage_limit: float = attrs.field(default=30.0, validator=_positive)
    """A job whose writes keep failing this long ends ``failed``/``unavailable``; until then it
    retries and keeps streaming to watchers in this process."""
    store_wait_replicas: int = attrs.field(default=0, validator=_non_negative)
    """Replicas that must hold a job's end (Redis WAIT) before it is reported; 0: none waited for."""
    store_wait_timeout: float = attrs.field(default=1.0, validator=_positive)
    """How long a write waits for store_wait_replicas; fewer in time is an outage (the write is retried)."""
    store_wait_on: str = attrs.field(default="end", validator=_wait_point)
    """end: only a job's terminal commit waits for replicas; flush: every write of its log does."""

    # The job log and its writes to the store.
    max_output_chars: int = attrs.field(default=1_000_000, validator=_positive)
    """Characters the model may produce (text, reasoning, tool arguments); past it: ``output_limit``.
    Tool results have a budget of this size of their own (cut, never failing the job)."""
    flush_events: int = attrs.field(default=64, validator=_positive)
    """A job writes its new log entries to the store once this many are waiting (or after flush_ms)."""
    flush_ms: float = attrs.field(default=100.0, validator=_positive)
    """A job writes its log once the oldest unwritten entry is this old (or at flush_events),
    and at its end."""
    commit_ms: float = attrs.field(default=500.0, validator=_positive)
    """With a store that tells the instances following a job of its new entries before they
    are durable (Redis), a job makes its log durable at the flush nearest commit_ms after
    its last commit (and at flush_events, a change of status and its end) and only
    announces what is new at the flushes between. Other stores commit at every flush. A
    process that dies loses about this much (a job taken over regenerates it)."""

    # Watchers.
    batch_ms: float = attrs.field(default=50.0, validator=_non_negative)
    """At most one batch per watcher per this many milliseconds while events keep coming."""
    max_batch_events: int = attrs.field(default=1024, validator=_positive)
    """Bound on the events of one batch; a longer backlog goes out in several batches."""
    max_batch_chars: int = attrs.field(default=256 * 1024, validator=_positive)
    """Bound on the text of one batch, so a replay never makes a frame too large."""

    # The upstream model server.
    upstream_url: str | None = None
    """Base URL of an OpenAI-compatible API, such as ``https://openrouter.ai/api/v1``."""
    upstream_api_key: str | None = attrs.field(default=None, repr=False)
    """Sent as ``Authorization: Bearer``; never logged."""
    upstream_headers: dict[str, str] = attrs.field(factory=dict, repr=False)
    """Extra headers for every upstream request, ``NAME: VALUE`` (e.g. OpenRouter's ``HTTP-Referer``)."""
    upstream_connect_timeout: float = attrs.field(default=10.0, validator=_positive)
    """Seconds to connect to the upstream."""
    upstream_idle_timeout: float = attrs.field(default=60.0, validator=_positive)
    """No byte from the upstream for this long ends the job ``failed``/``upstream_timeout``."""
    upstream_max_retries: int = attrs.field(default=3, validator=_non_negative)
    """Retries of 429, 502, 503 and connection errors, before the first token only."""
    upstream_retry_base: float = attrs.field(default=0.5, validator=_positive)
    """First backoff delay; it doubles each retry, with jitter, unless Retry-After says more."""
    upstream_retry_max_delay: float = attrs.field(default=30.0, validator=_positive)
    """Longest wait between retries, Retry-After included."""
    upstream_max_connections: int = attrs.field(default=1000, validator=_positive)
    """Connections to the upstream open at once, over all jobs."""

    # Cost control.
    allowed_models: tuple[str, ...] = attrs.field(default=(), converter=tuple)
    """Glob patterns of the models a job may name; ``!pattern`` excludes. Built-in models
    (``backstream/*``) are allowed unless excluded; with no pattern at all, any model is."""
    max_output_tokens: int | None = attrs.field(default=None, validator=_positive_or_none)
    """A cap on every upstream request: ``max_tokens``/``max_completion_tokens`` are clamped
    to it, and ``max_tokens`` is set to it when a request names neither."""

    # The operator's default system prompt.
    system_prompts: dict[str, str] = attrs.field(factory=dict, converter=dict, validator=_prompt_patterns)
    """Glob pattern of a model to a system prompt, added as the first message of a job whose
    messages hold no ``system`` or ``developer`` message; patterns are tried in order, the
    first match wins."""

    # Continuing the jobs of an instance that died.
    continuations: dict[str, str] = attrs.field(
        factory=dict, converter=dict, validator=_continuation_patterns
    )
    """Glob pattern of a model to how its jobs are continued when their instance died:
    prefill (the turn goes on from its text), restart (the turn runs again) or interrupt
    (the job ends interrupted); the first match wins; built-in models prefill, others interrupt."""
    max_continuations: int = attrs.field(default=3, validator=_non_negative)
    """Times one job may be taken over and continued after a crash (a hand-off by an instance
    that stopped cleanly does not count); past it the job ends interrupted."""

    # Server-side tools.
    max_turns: int = attrs.field(default=8, validator=_positive)
    """Model turns a job may take; a model still calling tools after them: ``tool_loop_limit``."""
    max_parallel_tools: int = attrs.field(default=4, validator=_positive)
    """Tool calls of one turn that run at once."""
    max_tool_threads: int = attrs.field(default=16, validator=_positive)
    """Threads for sync tools, a pool of their own; a hung tool keeps its thread until it
    returns, and a call that finds none free before its timeout is an error outcome."""
    approval_timeout: float = attrs.field(default=600.0, validator=_positive)
    """A tool call waiting this long for a person's decision counts as declined."""

    # Conversations continued on the server (previous_response_id, previous_job_id).
    max_chain_depth: int = attrs.field(default=100, validator=_positive)
    """Jobs one conversation may chain (each continuing the one before); past it: a 400."""
    max_chain_bytes: int = attrs.field(default=4 * 1024 * 1024, validator=_positive)
    """Bytes (compact JSON) the messages of a continued conversation may hold; past it: a 400."""

    # Workflows.
    max_workflow_steps: int = attrs.field(default=10_000, validator=_positive)
    """Steps one workflow job may take; one more ends it ``failed``/``workflow_limit``."""
    max_workflow_recorded_bytes: int = attrs.field(default=8_000_000, validator=_positive)
    """Bytes of step data (arguments, results, summaries) one workflow job may record in its
    log; a step past it ends the job ``failed``/``workflow_limit``."""
    workflow_step_timeout: float = attrs.field(default=300.0, validator=_positive)
    """Seconds one workflow step (a model turn, a tool, a ``ctx.step``) may run; past it the
    step fails with ``StepTimeout`` (a wait for a person or a sleep has its own time)."""

    # Notifications.
    max_notifications_per_user: int = attrs.field(default=500, validator=_positive)
    """Notifications kept per user; past it the oldest go first."""

    # Built-in offline models.
    echo_words_per_s: float = attrs.field(default=30.0, validator=_positive)
    """Speed of ``backstream/echo``."""

    @property
    def batch_seconds(self) -> float:
        return self.batch_ms / 1000.0

    @property
    def flush_seconds(self) -> float:
        return self.flush_ms / 1000.0

    @property
    def commit_seconds(self) -> float:
        return self.commit_ms / 1000.0
