"""Static files of ``--http-port``: the browser client and the demo chat page.

``/client/backstream-client.js`` (and the modules it imports) is served whenever the HTTP
port is on, so a page can ``import`` the client with no bundler; it is the JavaScript package
of ``clients/js``. With ``--web`` the demo chat page is served too: ``/`` and ``/demo/...``.

The client's one source is ``clients/js/src``. A wheel carries a copy in
``backstream/web/client`` (setup.py makes it at build time); an editable install or a source
checkout has no such folder and serves ``clients/js/src`` in place (``client_folder``).

The files are read once, then every lookup is a dictionary access. Only the files found at
startup are served; a request's path is never joined onto the file system. ``asset_routes``
gives them to the HTTP app as static routes (exact path -> GET/HEAD route, with each file's
headers).
"""

from __future__ import annotations

import functools
from importlib import resources
from pathlib import Path

import attrs
import trio

from backstream.runtime.server.http_app import StaticReply, StaticRoute

__all__ = ["Asset", "asset_routes", "client_folder", "find_asset"]

_TYPES = {
    ".js": "text/javascript; charset=utf-8",
    ".html": "text/html; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
}
_CLIENT_ENTRY = "backstream-client.js"
_COMMON = (("cache-control", "no-cache"), ("x-content-type-options", "nosniff"))
# Other origins may import the client as a module (that needs CORS); the page may not be framed.
_CLIENT_HEADERS = (*_COMMON, ("access-control-allow-origin", "*"))
_PAGE_HEADERS = (
    *_COMMON,
    (
        "content-security-policy",
        "default-src 'self'; connect-src 'self' ws: wss:; img-src 'self' data:; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    ),
    ("referrer-policy", "no-referrer"),
)


@attrs.frozen
class Asset:
    """One file as served: its bytes, its content type, and headers for caching and security."""

    body: bytes = attrs.field(repr=lambda body: f"<{len(body)} bytes>")
    content_type: str
    headers: tuple[tuple[str, str], ...]

    async def __call__(self) -> StaticReply:
        """The file as a static route's reply."""
        await trio.lowlevel.checkpoint()
        return 200, self.content_type, self.body, dict(self.headers)


def asset_routes(*, web: bool) -> dict[str, StaticRoute]:
    """Every file served, by path, as static routes. Demo page files only if ``web``."""
    client, page = _catalog()
    return {**client, **(page if web else {})}


def find_asset(path: str, *, web: bool) -> Asset | None:
    """The file served at ``path`` (no query string), or None. Demo page files only if ``web``."""
    client, page = _catalog()
    found = client.get(path)
    if found is None and web:
        found = page.get(path)
    return found


def client_folder() -> resources.abc.Traversable:
    """Where the JavaScript client's modules are: the package's ``web/client`` (a wheel), else
    the checkout's ``clients/js/src`` (an editable install). Raises ``FileNotFoundError``
    naming both places when neither holds ``backstream-client.js``."""
    packaged = resources.files("backstream.web").joinpath("client")
    if packaged.joinpath(_CLIENT_ENTRY).is_file():
        return packaged
    # backstream/web/ sits two levels below the checkout's root.
    source = Path(str(resources.files("backstream.web"))).parent.parent / "clients" / "js" / "src"
    if (source / _CLIENT_ENTRY).is_file():
        return source
    raise FileNotFoundError(
        f"the JavaScript client is missing: neither {packaged} (an installed wheel) nor {source} "
        f"(a source checkout) holds {_CLIENT_ENTRY}; reinstall backstream"
    )


@functools.cache
def _catalog() -> tuple[dict[str, Asset], dict[str, Asset]]:
    root = resources.files("backstream.web")
    client_files = _read_folder(client_folder(), _CLIENT_HEADERS)
    page_files = _read_folder(root.joinpath("demo"), _PAGE_HEADERS)
    vendor = _read_folder(root.joinpath("demo", "vendor"), _PAGE_HEADERS)
    page_files |= {f"vendor/{name}": asset for name, asset in vendor.items()}
    client = {f"/client/{name}": asset for name, asset in client_files.items()}
    page = {f"/demo/{name}": asset for name, asset in page_files.items()}
    if "/demo/index.html" in page:
        page["/"] = page["/demo/index.html"]
    return client, page


def _read_folder(folder: resources.abc.Traversable, headers: tuple[tuple[str, str], ...]) -> dict[str, Asset]:
    found: dict[str, Asset] = {}
    if not folder.is_dir():
        return found
    for item in folder.iterdir():
        suffix = "." + item.name.rsplit(".", 1)[-1] if "." in item.name else ""
        if item.is_file() and suffix in _TYPES:
            found[item.name] = Asset(item.read_bytes(), _TYPES[suffix], headers)
    return found
