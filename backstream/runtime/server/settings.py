"""Settings of ``backstream serve``: flags over ``BACKSTREAM_*`` environment variables over a
TOML file over defaults.

One table, ``OPTIONS``: the server's own settings, then one option per field of the
runtime's ``Config``, derived from its attrs fields (type, default, docstring), so a new
``Config`` field is a flag, a variable and a TOML key with no more code.
"""

from __future__ import annotations

import argparse
import ast
import inspect
import itertools
import os
import pathlib
import ssl
import textwrap
import tomllib
import types
import typing
import urllib.parse
from collections.abc import Callable, Mapping
from typing import Any

import attrs

from backstream.actors.config import Config
from backstream.protocol.continuation import parse_continuation
from backstream.protocol.webhooks import (
    WebhookEndpoint,
    endpoint_from_table,
    parse_endpoint,
    parse_retry_schedule,
)

__all__ = [
    "OPTIONS",
    "Option",
    "ServeSettings",
    "add_serve_arguments",
    "boolean",
    "check_server_settings",
    "load_settings",
    "on_off",
    "runtime_config",
    "tls_context",
]

LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


@attrs.frozen
class Option:
    name: str
    """The setting: attribute of ``ServeSettings``, TOML key, flag ``--name-with-dashes``."""
    kind: Callable[[str], Any]
    default: Any
    help: str
    repeatable: bool = False
    flag: bool = True  # secrets come from the environment or the file only
    env: str = ""
    """The environment variable; ``BACKSTREAM_NAME`` unless given."""
    config_field: str | None = None
    """The ``Config`` field it sets, if any."""
    choices: tuple[str, ...] = ()

    @property
    def env_name(self) -> str:
        return self.env or "BACKSTREAM_" + self.name.upper()

    @property
    def flag_name(self) -> str:
        return "--" + self.name.replace("_", "-")


def boolean(text: str) -> bool:
    """``1``, ``true``, ``yes``, ``on`` or ``0``, ``false``, ``no``, ``off`` (any case)."""
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true or false, got {text!r}")


def on_off(text: str) -> bool:
    """A boolean whose flag takes a value (``--ws-deflate off``): for settings on by default."""
    return boolean(text)


def gc_thresholds(text: str) -> tuple[int, int, int] | None:
    """``GEN0,GEN1,GEN2`` (positive integers), or ``python`` for Python's own (None)."""
    if text.strip().lower() == "python":
        return None
    parts = text.split(",")
    try:
        values = tuple(int(part) for part in parts)
    except ValueError:
        values = ()
    if len(values) != 3 or min(values) < 1:
        raise ValueError(f"expected three positive integers GEN0,GEN1,GEN2 or python, got {text!r}")
    return values


def _header(text: str) -> tuple[str, str]:
    """``Name: value`` or ``Name=value``."""
    for separator in (":", "="):
        name, found, value = text.partition(separator)
        if found and name.strip():
            return name.strip(), value.strip()
    raise ValueError(f"{text!r} is not NAME: VALUE")


def _system_prompt(text: str) -> tuple[str, str]:
    """``PATTERN=TEXT``: split at the first ``=``, so the text may hold more."""
    pattern, found, prompt = text.partition("=")
    if not found or not pattern.strip():
        raise ValueError(f"{text!r} is not PATTERN=TEXT (a model pattern, =, the system prompt)")
    return pattern.strip(), prompt


def _continuation(text: str) -> tuple[str, str]:
    """``PATTERN=POLICY``: split at the last ``=``."""
    pattern, policy = parse_continuation(text)
    return pattern, policy.value


_SERVER_OPTIONS: tuple[Option, ...] = (
    Option("host", str, "127.0.0.1", "interface to listen on"),
    Option("port", int, 8765, "WebSocket port (paths /v1 and /v1/ai-sdk)"),
    Option(
        "http_port",
        int,
        None,
        "HTTP port: the Responses API (/v1/responses), the JavaScript client (/client/), /healthz, "
        "/readyz, and /metrics unless --metrics-port is set (off if unset)",
    ),
    Option("web", boolean, False, "serve the demo chat page (/) and /api/config on --http-port"),
    Option("metrics_port", int, None, "a port of its own for /metrics, /healthz and /readyz"),
    Option(
        "store",
        str,
        "sqlite:///./backstream.db",
        "where jobs live: memory, sqlite:///PATH, redis://HOST:PORT/DB, redis+cluster://HOST:PORT, "
        "redis+sentinel://HOST:PORT[,HOST:PORT...]/SERVICE[/DB]",
    ),
    Option(
        "token",
        str,
        (),
        "TOKEN=USER",
        repeatable=True,
        env="BACKSTREAM_TOKENS",
    ),
    Option("tokens_file", str, None, "a file of TOKEN=USER lines"),
    Option("jwt_secret", str, None, "HS256 secret for JWTs (sub = user)", flag=False),
    Option("tools", str, (), "tools to register, package.module:attribute", repeatable=True),
    Option(
        "workflows",
        str,
        (),
        "workflows to register, package.module:attribute (a Workflow or a list of them)",
        repeatable=True,
    ),
    Option(
        "allow_origin",
        str,
        (),
        "an Origin browsers may connect from (exact); none: any, but then --auth-cookie is refused",
        repeatable=True,
        env="BACKSTREAM_ALLOW_ORIGINS",
    ),
    Option(
        "auth_cookie",
        str,
        None,
        "a cookie holding the token, for browsers on /v1/ai-sdk; needs --allow-origin: a connection "
        "that authenticates by the cookie must come from one of those Origins (else HTTP 403)",
    ),
    Option("default_model", str, "backstream/echo", "the model of /v1/ai-sdk requests that name none"),
    Option(
        "ai_sdk_coalesce_ms",
        int,
        0,
        "on /v1/ai-sdk, milliseconds between text frames of a request (merged deltas) unless its "
        "URL gives coalesce_ms; 0: one chunk per log entry",
    ),
    Option(
        "ws_deflate",
        on_off,
        True,
        "permessage-deflate on /v1 and /v1/ai-sdk for clients that offer it (browsers do); "
        "off: frames go uncompressed",
    ),
    Option(
        "http_gzip",
        on_off,
        True,
        "gzip for HTTP JSON replies and event streams when the client sends Accept-Encoding: gzip; "
        "off: bodies go uncompressed",
    ),
    Option(
        "compression_window_bits",
        int,
        10,
        "the window of permessage-deflate and of gzip'd event streams, 9 to 15 (a power of two): "
        "more compresses a little better and holds more memory per connection or stream (about "
        "2**(bits+2) + 2**(bits+1) + 6 KiB)",
    ),
    Option("hello_timeout", float, 10.0, "seconds a client has to send hello"),
    Option(
        "max_connections_per_user",
        int,
        32,
        "WebSocket connections one user may have open at once (/v1 and /v1/ai-sdk, on every "
        "instance sharing the store); past it a connection is closed 4409 once authenticated",
    ),
    Option(
        "max_streams_per_user",
        int,
        64,
        "HTTP requests one user may have waiting at once (event streams, and creates that wait "
        "for the response), on every instance sharing the store; past it a 429",
    ),
    Option(
        "sse_keepalive",
        float,
        15.0,
        "seconds an HTTP event stream may stay silent before a comment line keeps it open "
        "(proxies and load balancers cut idle connections, often after 60 s)",
    ),
    Option(
        "max_message_bytes",
        int,
        1024 * 1024,
        "largest frame, either way (but the hello of /v1, read before authentication: 8 KiB)",
    ),
    Option(
        "tls_cert",
        str,
        None,
        "PEM certificate (chain) file: --port serves wss:// and --http-port https:// with it "
        "(--metrics-port stays plain HTTP)",
    ),
    Option("tls_key", str, None, "PEM private key file of --tls-cert (unset: the key is in that file)"),
    Option("workers", int, 1, "processes serving one port (SO_REUSEPORT); needs a shared store (redis)"),
    Option("reuse_port", str, "", "internal: set on the processes of --workers", flag=False),
    Option(
        "gc_thresholds",
        gc_thresholds,
        (20000, 20, 100),
        "the cyclic garbage collector's thresholds GEN0,GEN1,GEN2 for the serving process "
        "(python: Python's 700,10,10); what was loaded at startup is frozen out of collections",
    ),
    Option(
        "webhook",
        parse_endpoint,
        (),
        "an endpoint that gets the events of jobs' ends (docs/webhooks.md): URL, or "
        "URL#events=TYPE+TYPE&content=true to choose them (default: the four response.* events)",
        repeatable=True,
        env="BACKSTREAM_WEBHOOKS",
    ),
    Option(
        "webhook_secret",
        str,
        None,
        "the secret that signs webhook events, whsec_ + base64 (Standard Webhooks)",
        flag=False,
    ),
    Option(
        "webhook_retry_schedule",
        parse_retry_schedule,
        parse_retry_schedule("5s,5m,30m,2h,5h,10h,10h"),
        "waits between a webhook's attempts, e.g. 5s,5m,30m (units ms, s, m, h, d); after the "
        "last, the event is dead-lettered (backstream webhooks failed) [5s,5m,30m,2h,5h,10h,10h]",
    ),
    Option("webhook_timeout", float, 10.0, "seconds one webhook attempt may take, connecting included"),
    Option("webhook_concurrency", int, 4, "webhook attempts under way at once per endpoint and instance"),
    Option("webhook_ca_file", str, None, "a PEM CA bundle that verifies https:// webhook endpoints"),
    Option("streams_long_poll_timeout", float, 20.0, "seconds a durable stream's long-poll waits for a 204"),
    Option("streams_sse_max_duration", float, 60.0, "seconds a durable stream's SSE reply lasts"),
    Option("streams_rate_per_s", float, 200.0, "durable streams requests per second per user (burst: 2x)"),
    Option("streams_max_per_user", int, 10_000, "durable streams one user may hold"),
    Option("streams_max_bytes_per_user", int, 1024**3, "bytes one user's durable streams may hold"),
    Option("streams_signing_key", str, None, "signs durable streams' capability URLs", flag=False),
    Option("log_format", str, "text", "text or json", choices=("text", "json")),
    Option("log_level", str, "info", "how much to log", choices=LOG_LEVELS),
)

# Config fields whose setting is named otherwise, or that are secrets.
_CONFIG_RENAMES: dict[str, dict[str, Any]] = {
    "allowed_models": {"name": "allow_model", "env": "BACKSTREAM_ALLOW_MODELS"},
    "upstream_headers": {"name": "upstream_header", "env": "BACKSTREAM_UPSTREAM_HEADERS"},
    "upstream_api_key": {"flag": False},
    # Each prompt is PATTERN=TEXT; the variable splits on commas, so its texts can hold none.
    "system_prompts": {"name": "system_prompt", "env": "BACKSTREAM_SYSTEM_PROMPTS", "kind": _system_prompt},
    "continuations": {"name": "continuation", "env": "BACKSTREAM_CONTINUATIONS", "kind": _continuation},
}
_PAIRS = (_header, _system_prompt, _continuation)  # settings given as NAME=VALUE pairs


def _field_docs(cls: type) -> dict[str, str]:
    """The docstrings written under the fields of ``cls``, first sentence each."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for statement, following in itertools.pairwise(body):
        if (
            isinstance(statement, ast.AnnAssign)
            and isinstance(statement.target, ast.Name)
            and isinstance(following, ast.Expr)
            and isinstance(following.value, ast.Constant)
            and isinstance(following.value.value, str)
        ):
            text = " ".join(following.value.value.split())
            docs[statement.target.id] = text.replace("``", "")
    return docs


def _kind_of(hint: Any) -> tuple[Callable[[str], Any], bool]:
    """The parser of one value of a field typed ``hint``, and whether it is repeatable."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        (hint,) = [arg for arg in typing.get_args(hint) if arg is not type(None)]
    origin = typing.get_origin(hint)
    if origin is dict:
        return _header, True
    if origin in (tuple, list):
        return str, True
    return hint, False


def _config_options() -> tuple[Option, ...]:
    docs = _field_docs(Config)
    hints = typing.get_type_hints(Config)
    options = []
    for field in attrs.fields(Config):
        kind, repeatable = _kind_of(hints[field.name])
        default: Any = field.default
        if isinstance(default, attrs.Factory):  # type: ignore[arg-type]
            default = ()  # a dict of pairs: none
        rename = _CONFIG_RENAMES.get(field.name, {})
        options.append(
            Option(
                rename.get("name", field.name),
                rename.get("kind", kind),
                default,
                docs.get(field.name, ""),
                repeatable=repeatable,
                flag=rename.get("flag", True),
                env=rename.get("env", ""),
                config_field=field.name,
            )
        )
    return tuple(options)


OPTIONS: tuple[Option, ...] = _SERVER_OPTIONS + _config_options()
_BY_NAME = {option.name: option for option in OPTIONS}


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


def runtime_config(settings: ServeSettings) -> Config:
    """The runtime's ``Config`` from the settings. Raises ``ValueError`` naming the setting."""
    fields: dict[str, Any] = {}
    for option in OPTIONS:
        if option.config_field is None:
            continue
        value = settings.values[option.name]
        if option.kind in _PAIRS:
            value = dict(value)
        fields[option.config_field] = value
    try:
        return Config(**fields)
    except ValueError as exc:
        message = str(exc)
        for option in OPTIONS:
            if option.config_field and f"Config.{option.config_field} " in message:
                detail = message.split(f"Config.{option.config_field} ", 1)[1]
                raise ValueError(f"{option.flag_name} ({option.env_name}): {detail}") from None
        raise


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per option; each help says the default and the environment variable."""
    parser.add_argument("--config", help="a TOML file of settings (keys as the flags, with underscores)")
    for option in OPTIONS:
        if not option.flag:
            continue
        default = option.default if option.default not in (None, (), "") else "none"
        if option.kind in (boolean, on_off):
            default = "on" if option.default else "off"
        more = " Repeatable; in the variable, comma-separated." if option.repeatable else ""
        text = f"{option.help}{more} [default: {default}; env {option.env_name}]"
        text = text.replace("%", "%%")
        if option.kind is boolean:  # a switch: --web; false from the variable or the file
            parser.add_argument(option.flag_name, action="store_true", default=None, help=text)
            continue
        choices = option.choices or (("on", "off") if option.kind is on_off else ())
        metavar = "|".join(choices) if choices else None
        action = "append" if option.repeatable else "store"
        parser.add_argument(option.flag_name, action=action, default=None, help=text, metavar=metavar)


def _convert(option: Option, raw: Any, source: str) -> Any:
    """One value of ``option`` from ``source`` (a flag, a variable or the file)."""
    try:
        if option.kind is str:
            if not isinstance(raw, str):
                raise ValueError(f"expected text, got {raw!r}")
            value: Any = raw
        elif option.kind in (int, float) and isinstance(raw, str | int | float) and not isinstance(raw, bool):
            value = option.kind(raw)
        elif option.kind is _header and isinstance(raw, str):
            value = _header(raw)
        elif option.kind in (_system_prompt, _continuation) and isinstance(raw, str):
            value = option.kind(raw)
        elif option.kind in (boolean, on_off) and isinstance(raw, bool | str):
            value = raw if isinstance(raw, bool) else boolean(raw)
        elif option.kind is gc_thresholds and isinstance(raw, str):
            value = gc_thresholds(raw)
        elif option.kind is parse_endpoint and isinstance(raw, dict):
            value = endpoint_from_table(raw)
        elif option.kind in (parse_endpoint, parse_retry_schedule) and isinstance(raw, str):
            value = option.kind(raw)
        else:
            raise ValueError(f"unexpected value {raw!r}")
    except ValueError as exc:
        what = {int: "an integer", float: "a number"}.get(option.kind)  # type: ignore[call-overload]
        detail = f"{raw!r} is not {what}" if what and isinstance(raw, str) else str(exc)
        raise ValueError(f"{source}: {detail}") from None
    if option.choices and isinstance(value, str):
        value = value.lower()  # --log-level INFO as well as info
    if option.choices and value not in option.choices:
        raise ValueError(f"{source}: {value!r} is not one of {', '.join(option.choices)}")
    return value


def _from_file(option: Option, raw: Any, source: str) -> Any:
    if not option.repeatable:
        return _convert(option, raw, source)
    if option.kind in (_system_prompt, _continuation) and isinstance(raw, dict):
        not_text = [k for k, v in raw.items() if not isinstance(v, str)]
        if not_text:
            what = "prompt" if option.kind is _system_prompt else "policy"
            raise ValueError(f"{source}: the {what} of {not_text[0]!r} is not text")
        return tuple(_convert(option, f"{k}={v}", source) for k, v in raw.items())
    if option.kind is _header and isinstance(raw, dict):
        return tuple((str(k), str(v)) for k, v in raw.items())
    items = raw if isinstance(raw, list) else [raw]
    return tuple(_convert(option, item, source) for item in items)


def load_settings(args: argparse.Namespace, env: Mapping[str, str] | None = None) -> ServeSettings:
    """Merge the sources. Raises ``ValueError`` with one line naming the bad setting and
    where it came from (the flag, the variable or the file)."""
    env = os.environ if env is None else env
    file_values: dict[str, Any] = {}
    config_path = getattr(args, "config", None)
    if config_path:
        try:
            file_values = tomllib.loads(pathlib.Path(config_path).read_text())
        except OSError as exc:
            raise ValueError(f"--config {config_path}: {exc.strerror or exc}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ValueError(f"--config {config_path}: not TOML ({exc})") from None
        unknown = set(file_values) - set(_BY_NAME)
        if unknown:
            raise ValueError(f"unknown settings in {config_path}: {', '.join(sorted(unknown))}")
    values: dict[str, Any] = {}
    for option in OPTIONS:
        flag_value = getattr(args, option.name, None) if option.flag else None
        if flag_value is not None:
            source = option.flag_name
            if option.repeatable:
                value = tuple(_convert(option, item, source) for item in flag_value)
            else:
                value = _convert(option, flag_value, source)
        elif option.env_name in env:
            raw, source = env[option.env_name], option.env_name
            if option.repeatable:
                value = tuple(
                    _convert(option, item.strip(), source) for item in raw.split(",") if item.strip()
                )
            else:
                value = _convert(option, raw, source)
        elif option.name in file_values:
            value = _from_file(option, file_values[option.name], f"{option.name} in {config_path}")
        else:
            value = option.default
        values[option.name] = value
    settings = ServeSettings(values)
    check_server_settings(settings)
    runtime_config(settings)  # every Config validator, now, with the setting's name
    return settings


def check_server_settings(settings: ServeSettings) -> None:
    """Raise ``ValueError`` (one line, naming the settings) for server settings that do not go
    together, or an upstream URL that is not one."""
    _check_upstream_url(settings.upstream_url)
    if settings.workers < 1:
        workers = _BY_NAME["workers"]
        raise ValueError(f"{workers.flag_name} ({workers.env_name}): {settings.workers} is not at least 1")
    ports = [(name, settings.values[name]) for name in ("port", "http_port", "metrics_port")]
    for (name, port), (other, other_port) in itertools.combinations(ports, 2):
        if port and port == other_port:
            first, second = _BY_NAME[name].flag_name, _BY_NAME[other].flag_name
            raise ValueError(f"{first} {port} and {second} {port}: each listener needs a port of its own")
    if settings.auth_cookie and not settings.allow_origin:
        cookie, origin = _named("auth_cookie"), _named("allow_origin")
        raise ValueError(
            f"{cookie} needs {origin}: a browser sends the cookie from any page, so it is accepted "
            "only from the Origins listed there"
        )
    tls_context(settings)  # the files are readable and hold a certificate and its key
    _check_webhooks(settings)
    if settings.web and settings.http_port is None:
        web, port = _BY_NAME["web"], _BY_NAME["http_port"]
        raise ValueError(
            f"{web.flag_name} ({web.env_name}): the demo page is served on the HTTP port; "
            f"set {port.flag_name} ({port.env_name}) too"
        )


def _check_webhooks(settings: ServeSettings) -> None:
    endpoints: tuple[WebhookEndpoint, ...] = settings.webhook
    if not endpoints:
        return
    secret = settings.webhook_secret
    if not secret or not secret.startswith("whsec_"):
        raise ValueError(
            f"{_named('webhook')} needs BACKSTREAM_WEBHOOK_SECRET: whsec_ followed by base64 "
            "(the secret receivers verify the events with)"
        )
    for name in ("webhook_timeout", "webhook_concurrency"):
        if settings.values[name] <= 0:
            raise ValueError(f"{_named(name)}: {settings.values[name]} is not above 0")
    ca_file = settings.webhook_ca_file
    if ca_file:
        try:
            ssl.create_default_context(cafile=ca_file)
        except (OSError, ssl.SSLError) as exc:
            raise ValueError(f"{_named('webhook_ca_file')}: cannot load {ca_file} ({exc})") from None


def _named(name: str) -> str:
    """``--flag (VARIABLE)`` of the option ``name``, for an error message."""
    option = _BY_NAME[name]
    return f"{option.flag_name} ({option.env_name})"


def tls_context(settings: ServeSettings) -> ssl.SSLContext | None:
    """The server's TLS context from ``--tls-cert`` and ``--tls-key`` (None without a
    certificate), for the WebSocket port and the HTTP API port alike. Raises ``ValueError``
    (one line, naming the setting) for a key without a certificate, a file that is missing or
    unreadable, or files that do not hold a PEM certificate and its matching unencrypted key."""
    cert, key = settings.tls_cert, settings.tls_key
    if not cert:
        if key:
            raise ValueError(f"{_named('tls_key')}: a key without a certificate: set {_named('tls_cert')}")
        return None
    for name, path in (("tls_cert", cert), ("tls_key", key)):
        try:
            if path:
                pathlib.Path(path).read_bytes()
        except OSError as exc:
            raise ValueError(f"{_named(name)}: cannot read {path}: {exc.strerror or exc}") from None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        # An empty password: an encrypted key fails here instead of prompting on the terminal.
        context.load_cert_chain(cert, key or None, password=b"")
    except ssl.SSLError as exc:
        files = f"{_named('tls_cert')} {cert}" + (f" and {_named('tls_key')} {key}" if key else "")
        raise ValueError(
            f"{files}: not a PEM certificate with its matching unencrypted private key ({exc.reason or exc})"
        ) from None
    context.set_alpn_protocols(["http/1.1"])
    return context


def _check_upstream_url(url: str | None) -> None:
    """Raise ``ValueError`` naming ``--upstream-url`` for a URL the upstream client cannot use:
    no scheme or one other than http/https, no host, a port that is not one."""
    if url is None:
        return
    option = _BY_NAME["upstream_url"]
    where = f"{option.flag_name} ({option.env_name})"
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError as exc:
        raise ValueError(f"{where}: {url.rpartition('@')[2]!r} is not a URL ({exc})") from None
    netloc = parts.netloc.rpartition("@")[2]  # never echo a password
    shown = urllib.parse.urlunsplit(parts._replace(netloc=netloc)) if "://" in url else url
    if "://" not in url:
        problem = "has no scheme: write http:// or https:// before the host"
    elif parts.scheme not in ("http", "https"):
        problem = f"has the scheme {parts.scheme!r}: use http or https"
    elif not parts.hostname:
        problem = "has no host"
    else:
        try:
            parts.port  # noqa: B018 (raises ValueError for a port that is not one)
        except ValueError:
            problem = "has a port that is not a number from 0 to 65535"
        else:
            return
    raise ValueError(f"{where}: {shown!r} {problem}")
