"""Who is connecting: authenticators that turn a bearer token into a user.

Built in: static tokens (``TOKEN=USER`` pairs, from flags, the environment or
a file) and HS256 JSON Web Tokens with ``sub`` as the user and ``exp`` honoured.
Tokens are never logged.
"""

from __future__ import annotations

import hashlib
import hmac
import pathlib
import secrets
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Protocol

import attrs
import jwt

from backstream.protocol.errors import UnauthorizedError

__all__ = [
    "AnyAuthenticator",
    "Authenticator",
    "Identity",
    "JWTAuthenticator",
    "StaticTokens",
    "mint_jwt",
    "parse_token_pairs",
]


@attrs.frozen
class Identity:
    user: str
    expires_at: float | None = None  # wall time at which the session ends


class Authenticator(Protocol):
    def authenticate(self, token: str) -> Identity:
        """The identity behind ``token``; raises ``UnauthorizedError``."""
        ...


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


class StaticTokens:
    """A fixed set of tokens, each naming its user. Lookups compare digests in constant time."""

    def __init__(self, tokens: Mapping[str, str]) -> None:
        if not tokens:
            raise ValueError("StaticTokens needs at least one token")
        self._users = [(_digest(token), user) for token, user in tokens.items()]

    def authenticate(self, token: str) -> Identity:
        wanted = _digest(token)
        found = None
        for digest, user in self._users:  # no early exit: timing does not tell which one matched
            if hmac.compare_digest(digest, wanted):
                found = user
        if found is None:
            raise UnauthorizedError("invalid token")
        return Identity(found)

    @classmethod
    def from_file(cls, path: str | pathlib.Path) -> StaticTokens:
        """A file of ``TOKEN=USER`` lines; blank lines and ``#`` comments are skipped."""
        lines = pathlib.Path(path).read_text().splitlines()
        return cls(
            parse_token_pairs(line for line in lines if line.strip() and not line.lstrip().startswith("#"))
        )


def parse_token_pairs(pairs: Iterable[str]) -> dict[str, str]:
    """``["tokA=alice", "tokB=bob"]`` → ``{"tokA": "alice", "tokB": "bob"}``."""
    out: dict[str, str] = {}
    for pair in pairs:
        token, sep, user = pair.strip().partition("=")
        if not sep or not token or not user:
            raise ValueError("a token must be given as TOKEN=USER")
        out[token] = user
    return out


class JWTAuthenticator:
    """HS256 JWTs: ``sub`` is the user, ``exp`` (if present) ends the session."""

    def __init__(self, secret: str, *, audience: str | None = None, issuer: str | None = None) -> None:
        if len(secret.encode()) < 32:
            raise ValueError("the JWT secret must be at least 32 bytes (RFC 7518, section 3.2)")
        self._secret = secret
        self._audience = audience
        self._issuer = issuer

    def authenticate(self, token: str) -> Identity:
        try:
            claims = jwt.decode(
                token,
                self._secret,
                algorithms=["HS256"],
                audience=self._audience,
                issuer=self._issuer,
                options={"require": ["sub"]},
            )
        except jwt.ExpiredSignatureError:
            raise UnauthorizedError("token expired") from None
        except jwt.PyJWTError:
            raise UnauthorizedError("invalid token") from None
        user = claims.get("sub")
        if not isinstance(user, str) or not user:
            raise UnauthorizedError("invalid token")
        exp = claims.get("exp")
        return Identity(user, float(exp) if isinstance(exp, int | float) else None)


class AnyAuthenticator:
    """Tries each authenticator in turn; the first that accepts wins."""

    def __init__(self, authenticators: Sequence[Authenticator]) -> None:
        self._all = list(authenticators)

    def authenticate(self, token: str) -> Identity:
        for auth in self._all:
            try:
                return auth.authenticate(token)
            except UnauthorizedError as exc:
                if str(exc) == "token expired":
                    raise
        raise UnauthorizedError("invalid token")


def mint_jwt(secret: str, user: str, *, ttl: float = 3600.0, now: float | None = None) -> str:
    issued = int(time.time() if now is None else now)
    claims = {"sub": user, "iat": issued, "exp": issued + int(ttl), "jti": secrets.token_hex(8)}
    return jwt.encode(claims, secret, algorithm="HS256")
