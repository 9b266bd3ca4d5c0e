"""The webhooks' HTTP client: signs each attempt (Standard Webhooks, as OpenAI signs) and
posts it with httpx (on trio), following no redirect."""

from __future__ import annotations

import datetime
import ssl

import httpx
import standardwebhooks

from backstream.actors.webhooks import WebhookSender, WebhookSendError
from backstream.protocol.version import VERSION
from backstream.protocol.webhooks import WebhookDelivery

__all__ = ["HttpWebhookSender", "check_secret"]


def check_secret(secret: str) -> standardwebhooks.Webhook:
    """The signer of ``whsec_<base64>``. Raises ``ValueError`` saying what is wrong."""
    if not secret.startswith("whsec_"):
        raise ValueError("the webhook secret must be whsec_ followed by base64 (Standard Webhooks)")
    try:
        return standardwebhooks.Webhook(secret)
    except Exception as exc:  # binascii.Error, EmptyWebhookSecretError
        raise ValueError(f"the webhook secret is not whsec_ followed by base64 ({exc})") from None


class HttpWebhookSender(WebhookSender):
    """One connection pool for every endpoint. ``ca_file``: the CA bundle that verifies
    ``https://`` endpoints (the system's when None)."""

    def __init__(self, secret: str, *, ca_file: str | None = None, max_connections: int = 64) -> None:
        self._signer = check_secret(secret)
        verify: ssl.SSLContext | bool = True
        if ca_file:
            verify = ssl.create_default_context(cafile=ca_file)
        self._client = httpx.AsyncClient(
            verify=verify,
            follow_redirects=False,
            trust_env=False,  # the operator's endpoints, not whatever proxy the environment names
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
        )

    def headers(self, delivery: WebhookDelivery, moment: datetime.datetime) -> dict[str, str]:
        """The signed headers of an attempt at ``moment`` (its ``webhook-timestamp``)."""
        return {
            "content-type": "application/json",
            "user-agent": f"backstream/{VERSION}",
            "webhook-id": delivery.event_id,
            "webhook-timestamp": str(int(moment.timestamp())),
            "webhook-signature": self._signer.sign(delivery.event_id, moment, delivery.body),
        }

    async def send(self, delivery: WebhookDelivery, timeout: float) -> int:
        moment = datetime.datetime.now(datetime.UTC)
        try:
            response = await self._client.post(
                delivery.url,
                content=delivery.body.encode(),
                headers=self.headers(delivery, moment),
                timeout=httpx.Timeout(timeout),
            )
        except httpx.HTTPError as exc:
            detail = _first_message(exc)
            raise WebhookSendError(
                f"{type(exc).__name__}: {detail}" if detail else type(exc).__name__
            ) from None
        return response.status_code

    async def aclose(self) -> None:
        """Cancellation: the connections are closed anyway."""
        await self._client.aclose()


def _first_message(exc: BaseException | None) -> str:
    """The first non-empty message down the chain of causes: httpx's own is often empty
    (a TLS failure says what went wrong only in its cause)."""
    for _ in range(8):
        if exc is None:
            return ""
        if str(exc):
            return str(exc)
        exc = exc.__cause__ or exc.__context__
    return ""
