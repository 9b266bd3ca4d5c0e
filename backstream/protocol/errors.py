"""Errors named for their protocol codes.

Every failure a caller can see, in-process or over the wire, is one of these.
They carry a code from PROTOCOL.md and a message that is safe to show to a
client: never a traceback, never another user's data. Each class also says which
HTTP status answers it (``http_status``), so every HTTP front door maps errors alike.
"""

from __future__ import annotations

from typing import Any, ClassVar

__all__ = [
    "BackstreamError",
    "BadRequestError",
    "CapacityError",
    "ConflictError",
    "GoneError",
    "InternalError",
    "NotFoundError",
    "QuotaExceededError",
    "RateLimitedError",
    "TooLargeError",
    "UnauthorizedError",
    "UnavailableError",
    "UnsupportedProtocolError",
    "error_for_code",
]


class BackstreamError(Exception):
    """Base of every error with a protocol code."""

    code: ClassVar[str] = "internal"
    http_status: ClassVar[int] = 500

    def __init__(self, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.message = message
        # Extra protocol fields such as ``retry_after_ms``; JSON-safe values only.
        self.extra: dict[str, Any] = extra

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r})"


class BadRequestError(BackstreamError):
    code = "bad_request"
    http_status = 400


class UnauthorizedError(BackstreamError):
    code = "unauthorized"
    http_status = 401


class UnsupportedProtocolError(BackstreamError):
    code = "unsupported_protocol"
    http_status = 400


class NotFoundError(BackstreamError):
    code = "not_found"
    http_status = 404

    def __init__(self, message: str = "no such job", **extra: Any) -> None:
        super().__init__(message, **extra)


class CapacityError(BackstreamError):
    code = "capacity"
    http_status = 429

    def __init__(self, message: str, *, retry_after_ms: int) -> None:
        super().__init__(message, retry_after_ms=retry_after_ms)
        self.retry_after_ms = retry_after_ms


class RateLimitedError(BackstreamError):
    code = "rate_limited"
    http_status = 429


class QuotaExceededError(BackstreamError):
    """The user's retained jobs hold ``max_stored_bytes_per_user`` bytes already: a new
    job is refused until some of them expire (retention) and the sweep frees them."""

    code = "quota_exceeded"
    http_status = 429


class ConflictError(BackstreamError):
    code = "conflict"
    http_status = 409


class GoneError(BackstreamError):
    code = "gone"
    http_status = 410


class TooLargeError(BackstreamError):
    code = "too_large"
    http_status = 413


class UnavailableError(BackstreamError):
    code = "unavailable"
    http_status = 503


class InternalError(BackstreamError):
    code = "internal"
    http_status = 500


_BY_CODE: dict[str, type[BackstreamError]] = {
    cls.code: cls
    for cls in (
        BadRequestError,
        UnauthorizedError,
        UnsupportedProtocolError,
        NotFoundError,
        CapacityError,
        RateLimitedError,
        QuotaExceededError,
        ConflictError,
        GoneError,
        TooLargeError,
        UnavailableError,
        InternalError,
    )
}


def error_for_code(code: str, message: str, **extra: Any) -> BackstreamError:
    """Rebuild the typed error for a protocol ``code`` (used by clients)."""
    cls = _BY_CODE.get(code, InternalError)
    if cls is CapacityError:
        return CapacityError(message, retry_after_ms=int(extra.get("retry_after_ms") or 0))
    err = cls(message, **extra)
    return err
