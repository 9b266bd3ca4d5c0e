"""The client for OpenAI-compatible chat-completion streams (OpenRouter, OpenAI, vLLM, ...).

Retries live here and only here: 429, 502, 503 and connection errors are
retried with backoff (honouring ``Retry-After``), a bounded number of times,
and only before the first token; after it a retry would pay the upstream twice
and repeat text a watcher has already seen.
"""

from __future__ import annotations

import bisect
import email.utils
import http
import json
import logging
import time
from collections import Counter
from typing import Any

import attrs
import orjson
import trio

from backstream.actors.config import Config
from backstream.actors.ports import ChatTurn, ModelFailure, OutputSink, TurnResult
from backstream.protocol.backoff import Backoff
from backstream.protocol.events import ErrorInfo
from backstream.protocol.sse import SSEDecoder, SSEError
from backstream.runtime.models.http1 import (
    HTTP1Pool,
    StreamingResponse,
    UpstreamBroken,
    UpstreamConnectError,
    UpstreamConnectTimeout,
    UpstreamReadTimeout,
)
from backstream.runtime.models.proxies import environment_proxy
from backstream.runtime.models.turns import TurnCollector

__all__ = [
    "FIRST_TOKEN_BUCKETS",
    "RETRY_STATUSES",
    "UpstreamClient",
    "UpstreamStatistics",
    "open_http_client",
]

log = logging.getLogger("backstream.upstream")

# What is read after "[DONE]" so the connection can be reused (the body's end).
DRAIN_AFTER_DONE_BYTES = 64 * 1024
DRAIN_AFTER_DONE_SECONDS = 0.5

RETRY_STATUSES = frozenset({429, 502, 503})
_ERROR_BODY_LIMIT = 2048  # bytes of a non-2xx body kept for the error message


FIRST_TOKEN_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0)


@attrs.frozen
class UpstreamStatistics:
    """A snapshot: responses by HTTP status, retries, and time to first token as
    cumulative histogram counts over ``FIRST_TOKEN_BUCKETS`` (then +Inf)."""

    responses: dict[int, int]
    connection_errors: int
    retries: int
    first_token_buckets: tuple[int, ...]
    first_token_count: int
    first_token_sum: float


class _Retryable(Exception):
    def __init__(self, failure: ModelFailure, retry_after: float | None = None) -> None:
        super().__init__(failure.error.message)
        self.failure = failure
        self.retry_after = retry_after


def open_http_client(config: Config) -> HTTP1Pool:
    """The connections to the upstream, through the proxy the environment names for it
    (``HTTP_PROXY``/``HTTPS_PROXY``/``ALL_PROXY``/``NO_PROXY``, as httpx reads them). Its
    read timeout is the upstream idle timeout: no byte for that long fails the read.
    Close it with ``aclose``. Raises ``ValueError`` for a proxy it cannot use."""
    if not config.upstream_url:
        raise ValueError("open_http_client needs config.upstream_url")
    url = config.upstream_url.rstrip("/") + "/chat/completions"
    proxy = environment_proxy(url)
    if proxy is not None:
        log.info("upstream requests go through the proxy %s (%s)", proxy.address, proxy.variable)
    return HTTP1Pool(
        url,
        connect_timeout=config.upstream_connect_timeout,
        idle_timeout=config.upstream_idle_timeout,
        max_connections=config.upstream_max_connections,
        max_keepalive=min(100, config.upstream_max_connections),
        proxy=proxy,
    )


class UpstreamClient:
    """Runs chat turns against ``config.upstream_url``."""

    def __init__(self, config: Config, http: HTTP1Pool) -> None:
        self._config = config
        self._http = http
        headers = {"accept": "text/event-stream", "user-agent": "backstream", **config.upstream_headers}
        if config.upstream_api_key:
            headers["authorization"] = f"Bearer {config.upstream_api_key}"
        self._headers = headers
        self._responses: Counter[int] = Counter()
        self._connection_errors = 0
        self._retries = 0
        self._first_token = [0] * (len(FIRST_TOKEN_BUCKETS) + 1)
        self._first_token_sum = 0.0

    def statistics(self) -> UpstreamStatistics:
        cumulative, total = [], 0
        for count in self._first_token:
            total += count
            cumulative.append(total)
        return UpstreamStatistics(
            responses=dict(self._responses),
            connection_errors=self._connection_errors,
            retries=self._retries,
            first_token_buckets=tuple(cumulative),
            first_token_count=total,
            first_token_sum=self._first_token_sum,
        )

    def _note_first_token(self, seconds: float) -> None:
        self._first_token[bisect.bisect_left(FIRST_TOKEN_BUCKETS, seconds)] += 1
        self._first_token_sum += seconds

    async def run_turn(self, turn: ChatTurn, sink: OutputSink) -> TurnResult:
        """Stream one turn into ``sink``. Raises ``ModelFailure``.

        Cancellation: the request is abandoned and its connection closed at once.
        """
        body = _encode_body(self._body(turn))
        backoff = Backoff(self._config.upstream_retry_base, self._config.upstream_retry_max_delay)
        started = trio.current_time()
        while True:
            collector = TurnCollector(sink, max_argument_chars=self._config.max_output_chars)
            try:
                await self._attempt(body, collector, started)
                return collector.result()
            except _Retryable as exc:
                if collector.produced or backoff.attempt >= self._config.upstream_max_retries:
                    raise exc.failure from None
                self._retries += 1
                delay = backoff.next_delay(at_least=exc.retry_after)
                log.info("upstream retry %d in %.2fs: %s", backoff.attempt, delay, exc.failure.error.message)
                await trio.sleep(delay)

    def _body(self, turn: ChatTurn) -> dict[str, Any]:
        body: dict[str, Any] = dict(turn.params)
        body.update(
            model=turn.model,
            messages=list(turn.messages),
            stream=True,
            stream_options={"include_usage": True},
        )
        if turn.tools:
            body["tools"] = list(turn.tools)
        if turn.prefill:
            # A final assistant message to continue: llama.cpp's llama-server continues it by
            # itself; vLLM needs these two; an upstream that ignores them starts over.
            body["messages"].append({"role": "assistant", "content": turn.prefill})
            body.update(continue_final_message=True, add_generation_prompt=False)
        cap = self._config.max_output_tokens
        if cap is not None:  # the operator's cost cap, whatever the client asked
            named = [key for key in ("max_tokens", "max_completion_tokens") if key in body]
            for key in named:
                asked = body[key]
                body[key] = min(asked, cap) if isinstance(asked, int) and not isinstance(asked, bool) else cap
            if not named:
                body["max_tokens"] = cap
        return body

    async def _attempt(self, body: bytes, collector: TurnCollector, started: float) -> None:
        try:
            async with self._http.stream_post(body, self._headers) as response:
                self._responses[response.status_code] += 1
                if not 200 <= response.status_code < 300:
                    await self._raise_for_status(response)
                decoder = SSEDecoder()
                feed = collector.feed_data
                assembler = collector.assembler
                # One socket read brings every chunk the upstream sent since the last one.
                while data := await response.receive_some():
                    for event in decoder.feed(data):
                        feed(event.data)
                        if assembler.done:
                            await _read_to_end(response)
                            return
                    if started >= 0 and collector.produced:  # the first token: time it once
                        self._note_first_token(trio.current_time() - started)
                        started = -1.0
                for event in decoder.close():
                    feed(event.data)
        except SSEError as exc:
            raise ModelFailure(ErrorInfo("upstream_protocol", str(exc))) from None
        except UpstreamConnectTimeout:
            raise _Retryable(
                _failure("upstream_unreachable", "connecting to the upstream timed out")
            ) from None
        except UpstreamReadTimeout:
            raise ModelFailure(
                ErrorInfo(
                    "upstream_timeout",
                    f"no data from the upstream for {self._config.upstream_idle_timeout:g} s",
                )
            ) from None
        except (UpstreamConnectError, UpstreamBroken) as exc:
            # Refused, reset or closed: retryable before the first token, a broken stream after.
            self._connection_errors += 1
            message = f"upstream connection failed: {exc}"
            if collector.produced:
                raise ModelFailure(ErrorInfo("upstream_protocol", message)) from None
            raise _Retryable(_failure("upstream_unreachable", message)) from None

    async def _raise_for_status(self, response: StreamingResponse) -> None:
        status = response.status_code
        snippet = b""
        while len(snippet) < _ERROR_BODY_LIMIT and (data := await response.receive_some()):
            snippet += data
        detail = snippet[:_ERROR_BODY_LIMIT].decode("utf-8", "replace").strip()
        # The body may name keys, hosts or accounts: it goes to the server's log, and the
        # job (which its user reads) says only the status.
        log.warning("upstream answered HTTP %d: %s", status, detail or "(no body)")
        message = f"upstream answered HTTP {status} ({_reason(status)})"
        failure = ModelFailure(ErrorInfo("upstream_http", message, http_status=status))
        if status in RETRY_STATUSES:
            raise _Retryable(failure, _retry_after(response.headers.get("retry-after")))
        raise failure


def _encode_body(body: dict[str, Any]) -> bytes:
    try:
        return orjson.dumps(body)
    except TypeError:  # a lone surrogate (orjson refuses them) or a type orjson lacks
        return json.dumps(body, separators=(",", ":")).encode()


def _reason(status: int) -> str:
    try:
        return http.HTTPStatus(status).phrase
    except ValueError:
        return "an unknown status"


def _failure(code: str, message: str) -> ModelFailure:
    return ModelFailure(ErrorInfo(code, message))


def _retry_after(value: str | None) -> float | None:
    """Seconds from a ``Retry-After`` header: delta-seconds or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


async def _read_to_end(response: StreamingResponse) -> None:
    """Read what follows ``[DONE]`` (the body's end: a few bytes, often in a later read),
    so that the connection can go back to the pool. Past ``DRAIN_AFTER_DONE_BYTES`` or
    ``DRAIN_AFTER_DONE_SECONDS`` the rest is left unread and the pool closes the
    connection instead. Cancellation: the connection is closed, as for any unread body."""
    left = DRAIN_AFTER_DONE_BYTES
    with trio.move_on_after(DRAIN_AFTER_DONE_SECONDS):
        while left > 0 and (data := await response.receive_some()):
            left -= len(data)
