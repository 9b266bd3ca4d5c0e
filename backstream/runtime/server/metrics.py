"""Prometheus metrics, collected on demand from the runtime's and front door's snapshots."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from backstream.actors.dispatcher import DispatcherStatistics
from backstream.actors.webhooks import WebhookDelivererStatistics
from backstream.runtime.api import Runtime
from backstream.runtime.models.http1 import PoolStatistics
from backstream.runtime.models.upstream import FIRST_TOKEN_BUCKETS
from backstream.runtime.server.frontdoor import FrontDoor
from backstream.runtime.server.http_app import HttpApp

__all__ = ["metrics_text"]


class _BackstreamCollector(Collector):
    def __init__(self, runtime: Runtime, front_door: FrontDoor | None, http: HttpApp | None) -> None:
        self._runtime = runtime
        self._front_door = front_door
        self._http = http

    def collect(self) -> Iterator[Metric]:
        stats = self._runtime.statistics()
        yield GaugeMetricFamily("backstream_jobs_running", "Jobs running in this process", stats.jobs.running)
        finished = CounterMetricFamily(
            "backstream_jobs_finished", "Jobs that ended in this process, by status", labels=["status"]
        )
        for status, count in sorted(stats.jobs.finished_total.items()):
            finished.add_metric([status], count)
        yield finished
        endings = CounterMetricFamily(
            "backstream_job_endings",
            "Jobs that ended in this process, by status and error code (empty: no error)",
            labels=["status", "error_code"],
        )
        for (status, code), count in sorted(stats.jobs.endings_total.items()):
            endings.add_metric([status, code], count)
        yield endings
        yield CounterMetricFamily("backstream_jobs_started", "Jobs started", stats.jobs.started_total)
        yield CounterMetricFamily(
            "backstream_jobs_taken_over",
            "Jobs of a dead instance taken over to run on here",
            stats.keeper.continued_total,
        )
        continuations = CounterMetricFamily(
            "backstream_job_continuations",
            "Jobs continued here after a takeover that ended, by how the turn cut short went on "
            "(prefill, restart, none: nothing was cut short)",
            labels=["policy"],
        )
        for policy, count in sorted(stats.jobs.continuations_total.items()):
            continuations.add_metric([policy], count)
        yield continuations
        yield CounterMetricFamily(
            "backstream_regenerated_chars",
            "Characters of output withdrawn and produced again by continued jobs (restart)",
            stats.jobs.regenerated_chars_total,
        )
        yield CounterMetricFamily(
            "backstream_quota_refusals",
            "Starts refused in this process: the user's stored bytes would pass max_stored_bytes_per_user",
            stats.jobs.quota_refusals_total,
        )
        threads = self._runtime.tools.statistics()
        yield GaugeMetricFamily(
            "backstream_tool_threads_busy",
            "Threads running sync tools, abandoned ones included",
            threads.busy,
        )
        yield GaugeMetricFamily(
            "backstream_tool_threads_abandoned",
            "Threads still running a sync tool call that timed out or was cancelled",
            threads.abandoned,
        )
        yield GaugeMetricFamily(
            "backstream_tool_threads_max", "Size of the sync tools' pool", threads.max_threads
        )
        yield CounterMetricFamily(
            "backstream_tool_calls_abandoned",
            "Sync tool calls abandoned on their thread",
            threads.abandoned_total,
        )
        yield CounterMetricFamily(
            "backstream_tool_calls_starved",
            "Sync tool calls that found no free thread before their timeout",
            threads.starved_total,
        )
        yield GaugeMetricFamily("backstream_watchers", "Watches open in this process", stats.watchers)
        yield from _outbox(stats.dispatcher)
        if self._runtime.webhook_deliverer is not None:
            yield from _webhooks(self._runtime.webhook_deliverer.statistics())
        yield from self._upstream()
        if stats.upstream_pool is not None:
            yield from _upstream_pool(stats.upstream_pool)
        yield from self._http_side()
        door = self._front_door
        if door is not None:
            s = door.statistics()
            yield GaugeMetricFamily("backstream_connections", "Open WebSocket connections", s.connections)
            yield CounterMetricFamily("backstream_batches_sent", "job.events batches sent", s.batches_sent)
            yield CounterMetricFamily("backstream_frames_sent", "WebSocket frames sent", s.frames_sent)
            yield CounterMetricFamily("backstream_bytes_sent", "Bytes (UTF-8) of frames sent", s.bytes_sent)
            yield CounterMetricFamily("backstream_requests", "Client requests received", s.requests)
            yield CounterMetricFamily("backstream_errors_sent", "Protocol errors sent", s.errors_sent)
            yield CounterMetricFamily(
                "backstream_clients_closed_slow", "Clients closed for not reading in time", s.closed_slow
            )

    def _http_side(self) -> Iterator[Metric]:
        http = self._http
        if http is None:
            return
        s = http.statistics()
        yield CounterMetricFamily("backstream_http_requests", "HTTP requests received", s.requests)
        yield CounterMetricFamily("backstream_http_errors_sent", "HTTP error replies", s.errors_sent)
        yield GaugeMetricFamily("backstream_http_streams", "Open Responses event streams", s.streams_open)
        yield CounterMetricFamily(
            "backstream_http_streams_cut", "Event streams cut off for not reading in time", s.streams_cut
        )

    def _upstream(self) -> Iterator[Metric]:
        up = self._runtime.upstream_statistics()
        if up is None:
            return
        responses = CounterMetricFamily(
            "backstream_upstream_responses", "Upstream responses by HTTP status", labels=["status"]
        )
        for status, count in sorted(up.responses.items()):
            responses.add_metric([str(status)], count)
        yield responses
        yield CounterMetricFamily(
            "backstream_upstream_connection_errors", "Upstream connection failures", up.connection_errors
        )
        yield CounterMetricFamily("backstream_upstream_retries", "Upstream retries", up.retries)
        bounds = [str(b) for b in FIRST_TOKEN_BUCKETS] + ["+Inf"]
        yield HistogramMetricFamily(
            "backstream_upstream_first_token_seconds",
            "Time from request to the first token",
            buckets=list(zip(bounds, up.first_token_buckets, strict=True)),
            sum_value=up.first_token_sum,
        )


def _outbox(s: DispatcherStatistics) -> Iterator[Metric]:
    yield CounterMetricFamily(
        "backstream_outbox_carried_out", "Outbox entries carried out and deleted", s.carried_out_total
    )
    yield CounterMetricFamily(
        "backstream_outbox_notifications",
        "Job-end notifications asked for from the outbox",
        s.delivered_total,
    )
    yield CounterMetricFamily(
        "backstream_outbox_failed", "Outbox entries whose effect failed (dropped)", s.failed_total
    )
    yield CounterMetricFamily(
        "backstream_outbox_retries", "Outbox store calls retried after an outage", s.retries_total
    )
    yield GaugeMetricFamily("backstream_outbox_in_hand", "Outbox entries claimed, not yet deleted", s.in_hand)


def _webhooks(s: WebhookDelivererStatistics) -> Iterator[Metric]:
    yield CounterMetricFamily(
        "backstream_webhooks_delivered", "Webhook attempts answered 2xx", s.delivered_total
    )
    yield CounterMetricFamily(
        "backstream_webhooks_failed_attempts",
        "Webhook attempts that failed (no answer in time, or not 2xx)",
        s.failed_attempts_total,
    )
    yield CounterMetricFamily(
        "backstream_webhooks_dead_lettered",
        "Webhook events dead-lettered once their retry schedule was spent",
        s.dead_lettered_total,
    )
    yield CounterMetricFamily(
        "backstream_webhooks_endpoints_disabled",
        "Webhook endpoints disabled for answering 410 Gone",
        s.endpoints_disabled_total,
    )
    yield GaugeMetricFamily("backstream_webhooks_in_flight", "Webhook attempts under way", s.in_flight)


def _upstream_pool(s: PoolStatistics) -> Iterator[Metric]:
    yield CounterMetricFamily(
        "backstream_upstream_connections_opened", "Upstream connections opened", s.opened
    )
    yield CounterMetricFamily(
        "backstream_upstream_connections_reused", "Idle upstream connections taken for a request", s.reused
    )
    yield CounterMetricFamily(
        "backstream_upstream_connections_kept", "Upstream connections kept for reuse after a response", s.kept
    )
    yield CounterMetricFamily(
        "backstream_upstream_connections_closed", "Upstream connections closed", s.closed
    )
    yield GaugeMetricFamily(
        "backstream_upstream_connections_idle", "Idle upstream connections in the pool", s.idle
    )


def metrics_text(
    runtime: Runtime, front_door: FrontDoor | None, http: HttpApp | None = None
) -> Callable[[], bytes]:
    """A function that renders the metrics in the Prometheus text format."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_BackstreamCollector(runtime, front_door, http))
    return lambda: generate_latest(registry)
