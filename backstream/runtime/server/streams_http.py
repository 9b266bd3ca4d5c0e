"""Durable Streams over HTTP: ``/v1/streams/{name}`` (authenticated as the rest of the HTTP API:
bearer token, JWT, or the auth cookie from an allowed Origin) and
``/v1/streams/~{capability}/{name}`` (a signed capability URL, ``stream_capability``).

This module authenticates, checks the headers into requests (``protocol/streams_wire``), runs
the operations (``streams_ops``) and writes the replies; reads are ``streams_read``. Every
refusal is the spec's status with a short text body, never a 500.
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Mapping
from http.cookies import CookieError, SimpleCookie
from urllib.parse import parse_qs

import attrs
import trio

from backstream.protocol.errors import BackstreamError, BadRequestError, UnauthorizedError
from backstream.protocol.stream_capability import (
    Capability,
    CapabilityError,
    mint_capability,
    verify_capability,
)
from backstream.protocol.streams_state import CLOSED, OFFSET, StreamRefusal, format_offset
from backstream.protocol.streams_wire import (
    ALLOWED_HEADERS,
    EXPOSED_HEADERS,
    SECURITY_HEADERS,
    append_request,
    create_request,
)
from backstream.runtime.server.auth import Authenticator, Identity
from backstream.runtime.server.http_app import HttpApp, Request
from backstream.runtime.server.session import UserBuckets
from backstream.runtime.server.streams_jobs import JOB_PREFIX, JobStreams
from backstream.runtime.server.streams_ops import StreamOps
from backstream.runtime.server.streams_read import StreamReader, StreamsSettings
from backstream.runtime.stores.streams import stream_key

__all__ = ["StreamsApi", "StreamsSettings"]

log = logging.getLogger("backstream.streams")

BASE = "/v1/streams/"
MAX_NAME_CHARS = 1024
DRAIN_BYTES = 64 * 1024 * 1024
"""The most of a refused (too large) body read and dropped so that its client gets the 413."""


@attrs.frozen
class _Caller:
    user: str
    capability: Capability | None

    def key(self, name: str) -> str:
        return stream_key(self.user, name)


class StreamsApi:
    def __init__(
        self, app: HttpApp, ops: StreamOps, authenticator: Authenticator | None, settings: StreamsSettings
    ) -> None:
        self._app = app
        self._ops = ops
        self._auth = authenticator
        self.settings = settings
        self._buckets = UserBuckets(
            settings.rate_per_s, settings.rate_burst, max_users=app.limits.max_tracked_users
        )
        self._reader = StreamReader(app, ops, settings, self._reply, self.cors)
        self._jobs = JobStreams(
            app,
            app.runtime,
            self._reply,
            self.cors,
            long_poll=settings.long_poll_timeout,
            sse_max=settings.sse_max_duration,
        )
        for method in ("PUT", "POST", "GET", "HEAD", "DELETE"):
            app.route(
                method, r"/v1/streams/~(?P<cap>[^/]*)/(?P<name>.+)", self._handle, self_authenticating=True
            )
            app.route(method, r"/v1/streams/(?P<name>[^~].*)", self._handle, self_authenticating=True)
        app.route("POST", r"/v1/stream-capabilities", self._mint)

    def capability_url_path(self, capability: Capability) -> str:
        """The base path (``/v1/streams/~TOKEN/``) a capability's holder puts names after."""
        if self.settings.signing_key is None:
            raise UnauthorizedError("capability URLs are not configured (no signing key)")
        return f"{BASE}~{mint_capability(self.settings.signing_key, capability)}/"

    async def _mint(self, request: Request, match: re.Match[str]) -> None:
        """``POST /v1/stream-capabilities {"prefix": "...", "ttl_s": 3600, "write": false}``: a
        capability URL path over the caller's own streams."""
        body = await request.json_body(64 * 1024, self.settings.body_timeout)
        if not isinstance(body, dict):
            raise BadRequestError("the body must be a JSON object")
        prefix, ttl, write = body.get("prefix", ""), body.get("ttl_s", 3600), body.get("write", False)
        if not isinstance(prefix, str) or not isinstance(write, bool):
            raise BadRequestError("prefix must be a string and write a boolean")
        if not isinstance(ttl, int) or isinstance(ttl, bool) or not 1 <= ttl <= 30 * 86400:
            raise BadRequestError("ttl_s must be whole seconds from 1 to 30 days")
        # Whole seconds, rounded up: the capability lives at least ttl_s, never less.
        expires_at = math.ceil(time.time()) + ttl
        path = self.capability_url_path(Capability(request.user, prefix, expires_at, write))
        await self._app.send_json(request, 200, {"path": path, "expires_at": expires_at})

    async def _handle(self, request: Request, match: re.Match[str]) -> None:
        try:
            if request.method == "OPTIONS":
                await self._reply(request, 204, b"", {"access-control-max-age": "600"} | self._preflight())
                return
            caller = self._caller(request, match.group("cap") if "cap" in match.groupdict() else None)
            name = match.group("name")
            request.identity = Identity(caller.user)
            self._check_name(name, caller)
            if not self._buckets.take(caller.user):
                raise StreamRefusal(429, "too many requests; slow down", {"retry-after": "1"})
            await self._dispatch(request, caller, name)
        except StreamRefusal as refusal:
            await self._reply(request, refusal.status, refusal.message.encode() + b"\n", refusal.headers)
        except BackstreamError as exc:
            headers = {"www-authenticate": "Bearer"} if exc.http_status == 401 else {}
            await self._reply(request, exc.http_status, exc.message.encode() + b"\n", headers)

    async def _dispatch(self, request: Request, caller: _Caller, name: str) -> None:
        method = request.method
        if (
            method in ("PUT", "POST", "DELETE")
            and caller.capability is not None
            and not caller.capability.writable
        ):
            raise StreamRefusal(403, "this capability URL is read-only")
        key = caller.key(name)
        if name.startswith(JOB_PREFIX):
            await self._jobs.handle(request, name[len(JOB_PREFIX) :], parse_qs(_query(request)))
            return
        if method == "GET":
            await self._reader.get(request, key, parse_qs(_query(request), keep_blank_values=True))
        elif method == "HEAD":
            await self._reader.head(request, key)
        elif method == "PUT":
            await self._create(request, caller, key, name)
        elif method == "POST":
            await self._append(request, key)
        else:
            await self._ops.delete(key)
            await self._reply(request, 204, b"")

    async def _create(self, request: Request, caller: _Caller, key: str, name: str) -> None:
        body = await self._body(request)

        def source(path: str) -> str:
            source_name = self._name_from_path(path)
            self._check_name(source_name, caller)
            return caller.key(source_name)

        create = create_request(request.header, body, resolve_source=source)
        status, state = await self._ops.create(key, create)
        headers = {"content-type": state.content_type, OFFSET: format_offset(state.tail)}
        if status == 201:
            headers["location"] = _absolute_url(request)
        if state.closed:
            headers[CLOSED] = "true"
        await self._reply(request, status, b"", headers)

    async def _append(self, request: Request, key: str) -> None:
        body = await self._body(request)
        plan = await self._ops.append(key, append_request(request.header, body))
        await self._reply(request, plan.status, b"", plan.headers)

    async def _body(self, request: Request) -> bytes:
        try:
            return await request.raw_body(self.settings.max_body_bytes, self.settings.body_timeout)
        except BackstreamError as exc:
            if exc.http_status != 413:
                raise StreamRefusal(400, exc.message) from None
            # A client still sending when the 413 comes would see its connection reset, not
            # the 413: the rest is read and dropped (bounded), then the connection goes on.
            drained = await self._drain(request)
            raise StreamRefusal(413, exc.message, {} if drained else {"connection": "close"}) from None

    async def _drain(self, request: Request) -> bool:
        """Read and drop the rest of a body, at most ``DRAIN_BYTES`` within the body timeout;
        whether it all came."""
        left = DRAIN_BYTES
        with trio.move_on_after(self.settings.body_timeout):
            while left > 0:
                message = await request.receive()
                if message["type"] != "http.request":
                    return False
                left -= len(message.get("body", b""))
                if not message.get("more_body", False):
                    return True
        return False

    def _name_from_path(self, path: str) -> str:
        """A ``Stream-Forked-From`` path: a full stream URL path, or a name (with or without a
        leading slash) relative to the base URL the client uses."""
        if path.startswith(BASE):
            rest = path[len(BASE) :]
            if rest.startswith("~"):
                rest = rest.partition("/")[2]
            return rest
        return path[1:] if path.startswith("/") else path

    def _check_name(self, name: str, caller: _Caller) -> None:
        if not name or len(name) > MAX_NAME_CHARS or any(ord(ch) < 32 or ord(ch) == 127 for ch in name):
            raise StreamRefusal(400, "a stream name is 1 to 1024 characters, no control characters")
        if caller.capability is not None and not caller.capability.covers(name):
            raise StreamRefusal(404, "no such stream")

    def _caller(self, request: Request, capability: str | None) -> _Caller:
        if capability is not None:
            key = self.settings.signing_key
            if key is None:
                raise StreamRefusal(401, "capability URLs are not configured")
            try:
                granted = verify_capability(key, capability, time.time())
            except CapabilityError as exc:
                raise StreamRefusal(401, str(exc)) from None
            return _Caller(granted.user, granted)
        return _Caller(self._identity(request).user, None)

    def _identity(self, request: Request) -> Identity:
        if self._auth is None:
            raise UnauthorizedError("authentication is not configured")
        authorization = request.header("authorization") or ""
        if authorization.lower().startswith("bearer ") and authorization[7:].strip():
            return self._auth.authenticate(authorization[7:].strip())
        if request.method in ("GET", "HEAD") and request.query("access_token"):
            return self._auth.authenticate(request.query("access_token") or "")
        cookie = self._cookie_token(request)
        if cookie is not None:
            origin = request.header("origin")
            if origin is None or origin not in self.settings.allow_origins:
                raise StreamRefusal(403, "the auth cookie is accepted only from an allowed Origin")
            return self._auth.authenticate(cookie)
        raise UnauthorizedError("an Authorization: Bearer token is required")

    def _cookie_token(self, request: Request) -> str | None:
        name = self.settings.auth_cookie
        header = request.header("cookie")
        if name is None or header is None:
            return None
        try:
            morsel = SimpleCookie(header).get(name)
        except CookieError:
            return None
        return morsel.value if morsel is not None and morsel.value else None

    def cors(self, request: Request) -> dict[str, str]:
        """CORS headers for a request from a browser page: its Origin, if allowed."""
        origin = request.header("origin")
        if origin is None or (self.settings.allow_origins and origin not in self.settings.allow_origins):
            return {}
        return {
            "access-control-allow-origin": origin,
            "access-control-expose-headers": EXPOSED_HEADERS,
            "access-control-allow-credentials": "true",
            "vary": "origin",
        }

    def _preflight(self) -> dict[str, str]:
        return {
            "access-control-allow-methods": "GET, HEAD, POST, PUT, DELETE, OPTIONS",
            "access-control-allow-headers": ALLOWED_HEADERS,
        }

    async def _reply(
        self, request: Request, status: int, body: bytes, headers: Mapping[str, str] | None = None
    ) -> None:
        """A whole reply with the security and CORS headers. Cancellation: may be cut."""
        head: dict[str, str] = {**SECURITY_HEADERS, **(headers or {}), **self.cors(request)}
        content_type = head.pop("content-type", "text/plain; charset=utf-8")
        lines = [(b"content-type", content_type.encode())]
        if status not in (204, 304):
            lines.append((b"content-length", str(len(body)).encode()))
        lines += [(k.lower().encode(), v.encode()) for k, v in head.items()]
        try:
            await request.send({"type": "http.response.start", "status": status, "headers": lines})
            await request.send({"type": "http.response.body", "body": b"" if status in (204, 304) else body})
        except (OSError, trio.BrokenResourceError):
            log.debug("a stream reply could not be sent: the client left")


def _query(request: Request) -> str:
    return bytes(request.scope.get("query_string", b"")).decode("latin-1")


def _absolute_url(request: Request) -> str:
    """The request's own URL, absolute (``Location`` of a 201)."""
    host = request.header("host") or "localhost"
    scheme = str(request.scope.get("scheme", "http"))
    path = bytes(request.scope.get("raw_path") or request.path.encode()).decode("latin-1")
    return f"{scheme}://{host}{path}"
