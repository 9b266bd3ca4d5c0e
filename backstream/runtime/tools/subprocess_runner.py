"""Runs one tool call in its own process, inside the tool's limits.

``python -m backstream.runtime.tools.subprocess_runner [--limits JSON] module:attribute``.

Applies the limits first (before the tool's module is imported, so that its import
runs inside them too), then reads the arguments as JSON on stdin and writes
``{"result": ...}`` or ``{"error": "..."}`` as JSON on stdout. A limit it was asked for
and cannot apply is an error, never a call run without it. The parent kills the
process at the tool's timeout.

``--probe-network`` only tries to leave the network and says whether it could
(exit 0, or 1 and the reason on stdout).

Stdlib only, and kept small: it starts once per call.
"""

from __future__ import annotations

import ctypes
import errno
import importlib
import inspect
import json
import os
import pwd
import resource
import sys
from typing import Any

_CLONE_NEWNET = 0x40000000
_CLONE_NEWUSER = 0x10000000


class LimitError(Exception):
    """A limit that could not be applied; the call does not run."""


def _unshare(flags: int) -> int:
    """``unshare(2)`` (``os.unshare`` is Python 3.12+); 0 or the errno."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(flags) == 0:
        return 0
    return ctypes.get_errno()


def leave_network() -> None:
    """Move this process into a new network namespace (no interfaces up: nothing is
    reachable, loopback included). Without the privilege to, a new user namespace that
    maps this process's own user and group gives it. Raises ``LimitError`` if neither works."""
    if not sys.platform.startswith("linux"):
        raise LimitError(f"no network isolation on {sys.platform} (Linux network namespaces only)")
    failure = _unshare(_CLONE_NEWNET)
    if failure == 0:
        return
    if failure != errno.EPERM:
        raise LimitError(f"no network isolation: unshare(CLONE_NEWNET): {os.strerror(failure)}")
    uid, gid = os.getuid(), os.getgid()
    failure = _unshare(_CLONE_NEWUSER | _CLONE_NEWNET)
    if failure != 0:
        raise LimitError(
            f"no network isolation: unshare(CLONE_NEWUSER|CLONE_NEWNET): {os.strerror(failure)} "
            "(user namespaces are off, or the container forbids them)"
        )
    try:
        for name, text in (
            ("setgroups", "deny"),
            ("uid_map", f"{uid} {uid} 1"),
            ("gid_map", f"{gid} {gid} 1"),
        ):
            with open(f"/proc/self/{name}", "w") as file:
                file.write(text)
    except OSError as exc:
        raise LimitError(f"no network isolation: mapping the user namespace: {exc}") from None


def _tasks_of(uid: int) -> int:
    """Processes and threads whose real user is ``uid`` now (RLIMIT_NPROC counts those)."""
    total = 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/status") as file:
                status = dict(line.split(":", 1) for line in file if ":" in line)
        except OSError:
            continue  # it exited meanwhile
        if int(status.get("Uid", "-1 ").split()[0]) == uid:
            total += int(status.get("Threads", "1").strip() or 1)
    return total


def _lower(which: int, value: int) -> None:
    """Set soft and hard limit to ``value``, never above the current hard limit."""
    _soft, hard = resource.getrlimit(which)
    if hard != resource.RLIM_INFINITY:
        value = min(value, hard)
    resource.setrlimit(which, (value, value))


def _switch_user(name: str) -> int:
    """The uid of user ``name``, if this process may become it. Raises ``LimitError``."""
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        raise LimitError(f"no such user {name!r}") from None
    if entry.pw_uid == os.getuid():
        return entry.pw_uid
    if os.geteuid() != 0:
        raise LimitError(f"cannot run as {name!r}: the server does not run as root")
    return entry.pw_uid


def apply_limits(limits: dict[str, Any]) -> None:
    """Apply ``limits`` (``ToolLimits`` as a dict) to this process, for good: soft and hard
    limits alike, and the user switched last. Raises ``LimitError``."""
    try:
        if limits.get("network") is False:
            leave_network()
        user = limits.get("user")
        uid = _switch_user(user) if user else os.getuid()
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # a core dump would hold the call's data
        switching = uid != os.getuid()
        if limits.get("processes") is not None:
            # RLIMIT_NPROC counts every task of the real user: allow what it runs now (this
            # process too, once it switches to the user) plus the allowance.
            running = _tasks_of(uid) + (1 if switching else 0)
            _lower(resource.RLIMIT_NPROC, running + int(limits["processes"]))
        if limits.get("cpu_seconds") is not None:
            soft = int(limits["cpu_seconds"])
            # SIGXCPU at the soft limit ends the call; SIGKILL a second later if it is caught.
            resource.setrlimit(resource.RLIMIT_CPU, (soft, soft + 1))
        if limits.get("address_space_mib") is not None:
            _lower(resource.RLIMIT_AS, int(limits["address_space_mib"]) * 1024 * 1024)
        if limits.get("open_files") is not None:
            _lower(resource.RLIMIT_NOFILE, int(limits["open_files"]))
        if switching:
            entry = pwd.getpwuid(uid)
            os.setgroups([])
            os.setgid(entry.pw_gid)
            os.setuid(uid)
    except (OSError, ValueError) as exc:
        raise LimitError(f"cannot apply the tool's limits: {exc}") from None


def _explain(exc: BaseException, limits: dict[str, Any]) -> str:
    """The error the model reads; a limit that was hit is named."""
    text = (f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)[:400]
    if isinstance(exc, MemoryError) and limits.get("address_space_mib") is not None:
        return f"{text} (over the tool's address-space limit, {limits['address_space_mib']} MiB)"
    if isinstance(exc, OSError) and exc.errno == errno.EMFILE and limits.get("open_files") is not None:
        return f"{text} (over the tool's open-files limit, {limits['open_files']})"
    if isinstance(exc, OSError) and exc.errno == errno.EAGAIN and limits.get("processes") is not None:
        return f"{text} (over the tool's process limit, {limits['processes']})"
    if (
        isinstance(exc, OSError)
        and exc.errno in (errno.ENETUNREACH, errno.EPERM)
        and limits.get("network") is False
    ):
        return f"{text} (the tool has no network)"
    return text


def _run(path: str, limits: dict[str, Any]) -> dict[str, Any]:
    module_name, _, attribute = path.partition(":")
    target: Any = importlib.import_module(module_name)
    for part in attribute.split("."):
        target = getattr(target, part)
    fn = getattr(target, "fn", target)  # a Tool or a plain function
    param_class = getattr(target, "param_class", None)
    args = json.loads(sys.stdin.read() or "{}")
    call_args = (param_class(**args),) if param_class is not None else ()
    kwargs = {} if param_class is not None else args
    if inspect.iscoroutinefunction(fn):
        import trio

        return {"result": trio.run(lambda: fn(*call_args, **kwargs))}
    return {"result": fn(*call_args, **kwargs)}


def main() -> None:
    argv = sys.argv[1:]
    if argv == ["--probe-network"]:
        try:
            leave_network()
        except LimitError as exc:
            sys.stdout.write(str(exc))
            sys.exit(1)
        return
    limits: dict[str, Any] = {}
    if argv[0] == "--limits":
        limits, argv = json.loads(argv[1]), argv[2:]
    try:
        apply_limits(limits)
        reply = _run(argv[0], limits)
    except LimitError as exc:
        reply = {"error": str(exc)}
    except Exception as exc:
        reply = {"error": _explain(exc, limits)[:500]}
    sys.stdout.write(json.dumps(reply, default=str))


if __name__ == "__main__":
    main()
