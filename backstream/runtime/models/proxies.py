"""The proxy the upstream client goes through, if any, from the environment, read as httpx
reads it (so moving off httpx changed nothing for a deployment behind a proxy):

- ``HTTP_PROXY`` for ``http://`` upstreams, ``HTTPS_PROXY`` for ``https://`` ones, else
  ``ALL_PROXY``; lower-case names win over upper-case ones, and an empty lower-case one
  unsets its upper-case twin (``urllib.request.getproxies_environment``). A value
  without a scheme means ``http://``. ``HTTP_PROXY`` (upper case) is ignored when
  ``REQUEST_METHOD`` is set: under CGI it is a request header (httpoxy).
- ``NO_PROXY``: comma-separated; ``*`` turns proxies off; an IP address or ``localhost``
  matches that host exactly; ``example.com`` matches it and its subdomains,
  ``.example.com`` only its subdomains; ``host:port`` only that port; ``scheme://host``
  only that scheme. (httpx never matches an entry that names a scheme's default port;
  here ``example.com:443`` matches ``https://example.com``.)

Only ``http://`` and ``https://`` proxies (TLS to the proxy itself) are supported; the
userinfo of the proxy URL becomes a ``Proxy-Authorization: Basic`` header. Pure: no I/O.
"""

from __future__ import annotations

import base64
import ipaddress
import os
import re
import urllib.parse
from collections.abc import Mapping

import attrs

__all__ = ["ProxyConfigError", "ProxyURL", "environment_proxy"]


class ProxyConfigError(ValueError):
    """A proxy variable names something the upstream client cannot use."""


@attrs.frozen
class ProxyURL:
    """Where to send upstream requests instead: ``scheme`` is how to reach the proxy."""

    scheme: str
    host: str
    port: int
    authorization: str | None = attrs.field(default=None, repr=False)
    """The ``Proxy-Authorization`` value from the URL's userinfo."""
    variable: str = ""
    """The environment variable that named it, for messages."""

    @property
    def address(self) -> str:
        """The proxy's URL without credentials."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"

    @classmethod
    def parse(cls, value: str, variable: str = "") -> ProxyURL:
        """Raises ``ProxyConfigError`` for a scheme other than http(s) or no host."""
        url = value if "://" in value else f"http://{value}"
        try:
            parts = urllib.parse.urlsplit(url)
            port = parts.port
        except ValueError as exc:
            raise ProxyConfigError(f"{variable or 'the proxy URL'} is not a URL: {exc}") from None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ProxyConfigError(
                f"{variable or 'the proxy URL'} names a {parts.scheme}:// proxy; the upstream client "
                "goes through http:// and https:// proxies only (unset it, or add the upstream to NO_PROXY)"
            )
        authorization = None
        if parts.username or parts.password:
            user = urllib.parse.unquote(parts.username or "")
            password = urllib.parse.unquote(parts.password or "")
            token = base64.b64encode(f"{user}:{password}".encode()).decode("ascii")
            authorization = f"Basic {token}"
        default_port = 443 if parts.scheme == "https" else 80
        return cls(parts.scheme, parts.hostname, port or default_port, authorization, variable)


def environment_proxy(url: str, environ: Mapping[str, str] | None = None) -> ProxyURL | None:
    """The proxy for requests to ``url`` under ``environ`` (the process's environment by
    default), or None to connect directly. Raises ``ProxyConfigError`` when the proxy
    that applies is not one the client can use."""
    variables = _proxy_variables(os.environ if environ is None else environ)
    target = urllib.parse.urlsplit(url)
    scheme = target.scheme
    if scheme not in variables and "all" not in variables:
        return None
    no_proxy = [entry.strip() for entry in variables.get("no", ("", ""))[1].split(",")]
    if "*" in no_proxy:
        return None
    host = (target.hostname or "").lower()
    port = target.port or (443 if scheme == "https" else 80)
    if any(_Bypass.parse(entry).matches(scheme, host, port) for entry in no_proxy if entry):
        return None
    name, value = variables[scheme] if scheme in variables else variables["all"]
    return ProxyURL.parse(value, name)


def _proxy_variables(environ: Mapping[str, str]) -> dict[str, tuple[str, str]]:
    """``{"http": (variable name, value), ...}`` as ``getproxies_environment`` finds them."""
    found: dict[str, tuple[str, str]] = {}
    for name, value in environ.items():
        key = name.lower()
        if value and key.endswith("_proxy"):
            found[key[:-6]] = (name, value)
    if "REQUEST_METHOD" in environ:
        found.pop("http", None)
    for name, value in environ.items():  # a lower-case name has the last word
        if name.endswith("_proxy"):
            key = name.lower()[:-6]
            if value:
                found[key] = (name, value)
            else:
                found.pop(key, None)
    return found


@attrs.frozen
class _Bypass:
    """One ``NO_PROXY`` entry: an optional scheme, a host pattern, an optional port."""

    scheme: str
    host: re.Pattern[str] | None
    port: int | None

    @classmethod
    def parse(cls, entry: str) -> _Bypass:
        if "://" in entry:
            pattern = entry
        elif _is_ip(entry, ipaddress.IPv4Address):
            pattern = f"all://{entry}"
        elif _is_ip(entry, ipaddress.IPv6Address):
            pattern = f"all://[{entry.split('/')[0]}]"
        elif entry.lower() == "localhost":
            pattern = f"all://{entry}"
        else:
            pattern = f"all://*{entry}"
        try:
            parts = urllib.parse.urlsplit(pattern)
            port = parts.port
        except ValueError:
            return cls("", re.compile(r"(?!)"), None)  # matches nothing, as httpx's would not
        return cls("" if parts.scheme == "all" else parts.scheme, _host_pattern(parts.hostname or ""), port)

    def matches(self, scheme: str, host: str, port: int) -> bool:
        if self.scheme and self.scheme != scheme:
            return False
        if self.host is not None and not self.host.match(host):
            return False
        return self.port is None or self.port == port


def _host_pattern(host: str) -> re.Pattern[str] | None:
    if not host or host == "*":
        return None
    if host.startswith("*."):  # subdomains only
        return re.compile(rf"^.+\.{re.escape(host[2:])}$")
    if host.startswith("*"):  # the domain and its subdomains
        return re.compile(rf"^(.+\.)?{re.escape(host[1:])}$")
    return re.compile(rf"^{re.escape(host)}$")


def _is_ip(entry: str, kind: type[ipaddress.IPv4Address] | type[ipaddress.IPv6Address]) -> bool:
    try:
        kind(entry.split("/")[0])
    except ValueError:
        return False
    return True
