"""Signed capability URLs for durable streams, sans-IO: a token that lets whoever holds it read
(or read and write) one user's streams under a name prefix until it expires, for readers that
cannot send headers (``EventSource``, a CDN, a conformance suite given only a base URL).

The token is ``base64url(claims) "." base64url(HMAC-SHA256(key, claims))``; the claims are
``{"u": user, "p": prefix, "x": expiry (Unix s), "a": "r" | "rw"}``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re

import attrs

__all__ = ["Capability", "CapabilityError", "mint_capability", "verify_capability"]

_TOKEN = re.compile(r"[A-Za-z0-9_-]{1,4096}\.[A-Za-z0-9_-]{43}")


class CapabilityError(Exception):
    """The token is malformed, forged or expired."""


@attrs.frozen
class Capability:
    user: str
    prefix: str
    expires_at: float
    writable: bool

    def covers(self, name: str) -> bool:
        return name.startswith(self.prefix)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _sign(key: bytes, claims: str) -> str:
    return _b64(hmac.new(key, claims.encode(), hashlib.sha256).digest())


def mint_capability(key: bytes, capability: Capability) -> str:
    claims = json.dumps(
        {
            "u": capability.user,
            "p": capability.prefix,
            "x": int(capability.expires_at),
            "a": "rw" if capability.writable else "r",
        },
        separators=(",", ":"),
    )
    encoded = _b64(claims.encode())
    return f"{encoded}.{_sign(key, encoded)}"


def verify_capability(key: bytes, token: str, now: float) -> Capability:
    if not _TOKEN.fullmatch(token):
        raise CapabilityError("malformed capability")
    encoded, signature = token.split(".")
    if not hmac.compare_digest(signature, _sign(key, encoded)):
        raise CapabilityError("invalid capability")
    try:
        claims = json.loads(_unb64(encoded))
        capability = Capability(
            user=str(claims["u"]),
            prefix=str(claims["p"]),
            expires_at=float(claims["x"]),
            writable=claims["a"] == "rw",
        )
    except (ValueError, KeyError, TypeError):
        raise CapabilityError("invalid capability") from None
    if now >= capability.expires_at:
        raise CapabilityError("capability expired")
    return capability
