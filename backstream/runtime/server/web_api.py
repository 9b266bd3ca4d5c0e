"""``GET /api/config`` of ``--web``: what the demo page needs to know about the server.

The WebSocket port and scheme (the page is served on ``--http-port``, the protocol on
``--port``) and the models to offer: the built-in ones, and the upstream's when
``--upstream-url`` is set (its ``GET /models``, asked at most once a minute, under a 5 s
deadline; a failure is reported in the answer and leaves the built-in models). Only the models
``--allow-model`` lets a job name are offered.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import httpx
import trio

from backstream.protocol.workflow import workflow_name_of
from backstream.runtime.api import Runtime
from backstream.runtime.models.builtin import BUILTIN_MODELS

__all__ = ["WebConfig"]

log = logging.getLogger("backstream.web")

_CACHE_SECONDS = 60.0
_FETCH_TIMEOUT = 5.0
_MAX_MODELS = 500
_MAX_BODY_BYTES = 8 * 1024 * 1024


class WebConfig:
    """A static route of the HTTP app: call it for (status, content type, body)."""

    def __init__(self, runtime: Runtime, *, ws_port: int, tls: bool) -> None:
        config = runtime.config
        self._runtime = runtime
        self._websocket = {"port": ws_port, "path": "/v1", "scheme": "wss" if tls else "ws"}
        self._upstream_url = config.upstream_url.rstrip("/") if config.upstream_url else None
        self._headers = dict(config.upstream_headers)
        if config.upstream_api_key:
            self._headers["authorization"] = f"Bearer {config.upstream_api_key}"
        self._lock = trio.Lock()
        self._upstream: tuple[list[str], str | None] = ([], None)
        self._fetched_at: float | None = None

    async def __call__(self) -> tuple[int, str, bytes]:
        """The configuration as JSON. Cancellation: an upstream request in flight is dropped."""
        upstream_models, upstream_error = await self._upstream_models()
        allowed = self._runtime.model_allowed
        models: list[dict[str, Any]] = [
            {"id": name, "builtin": True} for name in sorted(BUILTIN_MODELS) if allowed(name)
        ]
        flows = [m for m in self._runtime.allowed_models() if workflow_name_of(m) is not None]
        models += [{"id": name, "builtin": True} for name in flows]
        models += [{"id": name, "builtin": False} for name in upstream_models if allowed(name)]
        body = {
            "websocket": self._websocket,
            "models": models,
            "upstream": {"configured": self._upstream_url is not None, "error": upstream_error},
        }
        return 200, "application/json", json.dumps(body).encode()

    async def _upstream_models(self) -> tuple[list[str], str | None]:
        if self._upstream_url is None:
            return [], None
        async with self._lock:  # one request at a time; the others use its answer
            now = trio.current_time()
            if self._fetched_at is None or now - self._fetched_at > _CACHE_SECONDS:
                self._upstream = await self._fetch(self._upstream_url)
                self._fetched_at = now
            return self._upstream

    async def _fetch(self, base_url: str) -> tuple[list[str], str | None]:
        try:
            body = bytearray()
            async with (
                httpx.AsyncClient(timeout=_FETCH_TIMEOUT) as http,
                http.stream("GET", f"{base_url}/models", headers=self._headers) as response,
            ):
                response.raise_for_status()
                async for chunk in response.aiter_bytes():
                    body += chunk
                    if len(body) > _MAX_BODY_BYTES:
                        raise ValueError("the model list is too long")
            entries = json.loads(body).get("data", [])
            names = [e["id"] for e in entries if isinstance(e, dict) and isinstance(e.get("id"), str)]
        except (httpx.HTTPError, ValueError, AttributeError) as exc:
            log.warning("the upstream's model list could not be read: %s", type(exc).__name__)
            return [], f"the upstream's model list could not be read ({type(exc).__name__})"
        return sorted(names)[:_MAX_MODELS], None
