"""Settings of ``backstream serve``: flags over ``BACKSTREAM_*`` environment variables over a
TOML file over defaults."""

from __future__ import annotations

import argparse
import os
import pathlib
import tomllib
from collections.abc import Callable, Mapping
from typing import Any

import attrs

__all__ = ["OPTIONS", "Option", "ServeSettings", "add_serve_arguments", "load_settings"]


def boolean(text: str) -> bool:
    """``1``, ``true``, ``yes``, ``on`` or ``0``, ``false``, ``no``, ``off`` (any case)."""
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true or false, got {text!r}")


@attrs.frozen
class Option:
    name: str  # attribute; flag --name-with-dashes; env BACKSTREAM_NAME; TOML key name
    kind: Callable[[str], Any]
    default: Any
    help: str
    repeatable: bool = False
    flag: bool = True  # secrets come from the environment or the file only


OPTIONS: tuple[Option, ...] = (
    Option("host", str, "127.0.0.1", "interface to listen on"),
    Option("port", int, 8765, "WebSocket port (path /v1)"),
    Option("http_port", int, None, "port for /healthz, /readyz, /metrics and /client/ (off if unset)"),
    Option("web", boolean, False, "serve the demo chat page at / of --http-port"),
    Option(
        "store",
        str,
        "sqlite:///./backstream.db",
        "where jobs live: memory, sqlite:///PATH, redis://HOST:PORT/DB, redis+cluster://HOST:PORT",
    ),
    Option("upstream_url", str, None, "OpenAI-compatible base URL, e.g. https://openrouter.ai/api/v1"),
    Option("upstream_api_key", str, None, "upstream API key", flag=False),
    Option(
        "token", str, (), "TOKEN=USER, repeatable; env BACKSTREAM_TOKENS=tokA=alice,tokB=bob", repeatable=True
    ),
    Option("tokens_file", str, None, "a file of TOKEN=USER lines"),
    Option("tools", str, (), "tools to register, package.module:attribute, repeatable", repeatable=True),
    Option("jwt_secret", str, None, "HS256 secret for JWTs (sub = user)", flag=False),
    Option("max_jobs", int, 100, "jobs running at once"),
    Option("max_jobs_per_user", int, 8, "jobs one user may run at once"),
    Option("job_timeout", float, 300.0, "seconds a job may run"),
    Option("retention", float, 900.0, "seconds a finished job is kept"),
    Option("batch_ms", float, 50.0, "at most one batch per watcher per this many ms"),
    Option("drain_timeout", float, 10.0, "on shutdown, seconds running jobs get to finish"),
    Option("lease_ttl", float, 15.0, "seconds after which a silent instance's jobs are recovered"),
    Option("lease_renew_interval", float, 5.0, "how often leases are renewed and orphans looked for"),
    Option("flush_ms", float, 100.0, "a job writes its log at least this often"),
    Option(
        "allow_origin", str, (), "an Origin browsers may connect from (exact), repeatable", repeatable=True
    ),
    Option("hello_timeout", float, 10.0, "seconds a client has to send hello"),
    Option("max_message_bytes", int, 1024 * 1024, "largest client frame"),
    Option("tls_cert", str, None, "certificate file for wss://"),
    Option("tls_key", str, None, "key file for wss://"),
    Option("workers", int, 1, "processes serving one port (SO_REUSEPORT); needs a shared store (redis)"),
    Option("reuse_port", str, "", "internal: set on the processes of --workers", flag=False),
    Option("log_format", str, "text", "text or json"),
    Option("log_level", str, "info", "debug, info, warning or error"),
)
_ENV_ALIASES = {"token": "BACKSTREAM_TOKENS", "allow_origin": "BACKSTREAM_ALLOW_ORIGINS"}


@attrs.frozen
class ServeSettings:
    values: dict[str, Any]

    @classmethod
    def defaults(cls, **overrides: Any) -> ServeSettings:
        """Every setting at its default, but ``overrides``."""
        values = {option.name: option.default for option in OPTIONS}
        unknown = set(overrides) - set(values)
        if unknown:
            raise ValueError(f"unknown settings: {', '.join(sorted(unknown))}")
        values.update(overrides)
        return cls(values)

    def __getattr__(self, name: str) -> Any:
        try:
            return self.values[name]
        except KeyError:
            raise AttributeError(name) from None


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="a TOML file of settings (keys as the flags, with underscores)")
    for option in OPTIONS:
        if not option.flag:
            continue
        flag = "--" + option.name.replace("_", "-")
        if option.repeatable:
            parser.add_argument(flag, action="append", default=None, help=option.help)
        elif option.kind is boolean:
            parser.add_argument(flag, action="store_true", default=None, help=option.help)
        else:
            parser.add_argument(flag, type=option.kind, default=None, help=option.help)


def load_settings(args: argparse.Namespace, env: Mapping[str, str] | None = None) -> ServeSettings:
    """Merge the sources. Raises ``ValueError`` naming the bad setting."""
    env = os.environ if env is None else env
    file_values: dict[str, Any] = {}
    if getattr(args, "config", None):
        file_values = tomllib.loads(pathlib.Path(args.config).read_text())
        unknown = set(file_values) - {o.name for o in OPTIONS}
        if unknown:
            raise ValueError(f"unknown settings in {args.config}: {', '.join(sorted(unknown))}")
    values: dict[str, Any] = {}
    for option in OPTIONS:
        env_name = _ENV_ALIASES.get(option.name, "BACKSTREAM_" + option.name.upper())
        flag_value = getattr(args, option.name, None) if option.flag else None
        try:
            if flag_value is not None:
                value = tuple(flag_value) if option.repeatable else flag_value
            elif env_name in env:
                raw = env[env_name]
                value = tuple(p for p in raw.split(",") if p) if option.repeatable else option.kind(raw)
            elif option.name in file_values:
                value = file_values[option.name]
                value = (
                    tuple(value)
                    if option.repeatable
                    else option.kind(str(value))
                    if option.kind is not str
                    else value
                )
            else:
                value = option.default
        except ValueError as exc:
            raise ValueError(f"setting {option.name}: {exc}") from None
        values[option.name] = value
    if values["log_format"] not in ("text", "json"):
        raise ValueError("setting log_format: must be text or json")
    if values["web"] and values["http_port"] is None:
        raise ValueError("setting web: the page is served on http_port; set --http-port too")
    return ServeSettings(values)
