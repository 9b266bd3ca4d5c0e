"""Server-side tools: Python callables a model may call, run inside the job.

Register a function (sync or async) and its JSON Schema is derived from its type
hints (or from an attrs/dataclass parameter class), or given. Each tool has a
timeout, a cap on its output and may require a person's approval. Tools come
from code (``ToolRegistry.register``), from configuration (``--tools
package.module:attribute``) and from the entry-point group ``backstream.tools``.

Isolation: an async tool is cancelled at its timeout. A sync tool runs on a
worker thread; a thread cannot be killed, so at its timeout the job stops
waiting for it and the thread is abandoned to finish on its own. For tools
that must be stopped for sure (untrusted code, hangs), ``isolation="subprocess"``
runs each call in a child process that is killed at the timeout, under the tool's
``ToolLimits`` (CPU seconds, address space, open files, processes, and optionally no
network or another user; see ``sandbox``).
"""

from __future__ import annotations

import ast
import dataclasses
import datetime as dt
import inspect
import json
import logging
import math
import operator
import threading
import types
import typing
from collections.abc import Callable, Iterable
from typing import Any, Literal

import attrs
import jsonschema
import trio

from backstream.actors.ports import ToolOutcome
from backstream.runtime.loading import entry_point_objects, import_path
from backstream.runtime.tools.sandbox import DEFAULT_LIMITS, ToolLimits, call_in_subprocess, limit_warnings

__all__ = [
    "Tool",
    "ToolLimits",
    "ToolOutcome",
    "ToolRegistry",
    "ToolThreads",
    "ToolThreadsStatistics",
    "calculate",
    "clock_now",
    "run_tool",
    "schema_for",
    "tool",
]

DEFAULT_TIMEOUT = 30.0
DEFAULT_MAX_OUTPUT = 16_000
DEFAULT_MAX_THREADS = 16

log = logging.getLogger("backstream.tools")


@attrs.frozen
class Tool:
    name: str
    description: str
    parameters: dict[str, Any]  # a JSON Schema of type object
    fn: Callable[..., Any] = attrs.field(eq=False, repr=False)
    timeout: float = DEFAULT_TIMEOUT
    max_output_chars: int = DEFAULT_MAX_OUTPUT
    requires_approval: bool = False
    idempotent: bool = False
    """Running a call twice does no harm: a call cut short by a crash is run again by the
    instance that takes the job over (otherwise it gets an error result saying so)."""
    isolation: Literal["inline", "subprocess"] = "inline"
    import_path: str | None = None  # "module:attribute", for subprocess isolation
    param_class: type | None = attrs.field(default=None, eq=False, repr=False)
    limits: ToolLimits | None = None
    """For ``isolation="subprocess"``: what a call may use (``None``: ``DEFAULT_LIMITS``)."""

    def __attrs_post_init__(self) -> None:
        if self.limits is not None and self.isolation != "subprocess":
            raise ValueError(f"tool {self.name!r}: limits need isolation='subprocess'")

    def openai_spec(self) -> dict[str, Any]:
        return {
            "type": "function",
            "function": {"name": self.name, "description": self.description, "parameters": self.parameters},
        }


def tool(
    fn: Callable[..., Any] | None = None,
    *,
    name: str | None = None,
    description: str | None = None,
    parameters: dict[str, Any] | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    max_output_chars: int = DEFAULT_MAX_OUTPUT,
    requires_approval: bool = False,
    idempotent: bool = False,
    isolation: Literal["inline", "subprocess"] = "inline",
    limits: ToolLimits | None = None,
) -> Any:
    """Make a ``Tool`` of a function; usable as ``@tool`` or ``@tool(timeout=5)``.
    ``limits`` (subprocess isolation only) bound what each call may use. ``idempotent``: a
    call cut short by a crash may run again (see ``Tool.idempotent``)."""

    def make(f: Callable[..., Any]) -> Tool:
        schema, param_class = (parameters, None) if parameters is not None else schema_for(f)
        doc = inspect.getdoc(f) or ""
        module = getattr(f, "__module__", None)
        qualname = getattr(f, "__qualname__", "")
        return Tool(
            name=name or f.__name__,
            description=description or doc.split("\n\n", 1)[0].replace("\n", " ") or f.__name__,
            parameters=schema,
            fn=f,
            timeout=timeout,
            max_output_chars=max_output_chars,
            requires_approval=requires_approval,
            idempotent=idempotent,
            isolation=isolation,
            import_path=f"{module}:{qualname}" if module and "<" not in qualname else None,
            param_class=param_class,
            limits=limits,
        )

    return make(fn) if fn is not None else make


# -- schemas from type hints ---------------------------------------------------------


def schema_for(fn: Callable[..., Any]) -> tuple[dict[str, Any], type | None]:
    """The JSON Schema of ``fn``'s parameters; a single attrs/dataclass parameter is
    described by its fields (and the call gets an instance)."""
    hints = typing.get_type_hints(fn)
    params = [p for p in inspect.signature(fn).parameters.values() if p.name not in ("self", "cls")]
    if len(params) == 1 and _is_record_class(hints.get(params[0].name)):
        cls = hints[params[0].name]
        return _record_schema(cls), cls
    properties: dict[str, Any] = {}
    required: list[str] = []
    for param in params:
        properties[param.name] = _type_schema(hints.get(param.name, Any))
        if param.default is inspect.Parameter.empty:
            required.append(param.name)
    return {
        "type": "object",
        "properties": properties,
        "required": required,
        "additionalProperties": False,
    }, None


def _is_record_class(tp: Any) -> bool:
    return isinstance(tp, type) and (attrs.has(tp) or dataclasses.is_dataclass(tp))


def _record_schema(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    properties: dict[str, Any] = {}
    required: list[str] = []
    if attrs.has(cls):
        for field in attrs.fields(cls):
            properties[field.name] = _type_schema(hints.get(field.name, Any))
            if field.default is attrs.NOTHING:
                required.append(field.name)
    else:
        for dfield in dataclasses.fields(cls):
            properties[dfield.name] = _type_schema(hints.get(dfield.name, Any))
            if dfield.default is dataclasses.MISSING and dfield.default_factory is dataclasses.MISSING:
                required.append(dfield.name)
    return {"type": "object", "properties": properties, "required": required, "additionalProperties": False}


def _type_schema(tp: Any) -> dict[str, Any]:
    origin = typing.get_origin(tp)
    simple = {str: "string", int: "integer", float: "number", bool: "boolean", type(None): "null"}
    if tp in simple:
        return {"type": simple[tp]}
    if tp is Any or tp is inspect.Parameter.empty:
        return {}
    if origin is Literal:
        return {"enum": list(typing.get_args(tp))}
    if origin in (typing.Union, types.UnionType):
        return {"anyOf": [_type_schema(arg) for arg in typing.get_args(tp)]}
    if origin in (list, tuple, set, frozenset) or tp in (list, tuple):
        args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        return {"type": "array", "items": _type_schema(args[0]) if args else {}}
    if origin is dict or tp is dict:
        return {"type": "object"}
    if _is_record_class(tp):
        return _record_schema(tp)
    return {}


# -- worker threads for sync tools -------------------------------------------------------


@attrs.frozen
class ToolThreadsStatistics:
    max_threads: int
    busy: int
    """Threads running a sync tool now, abandoned ones included."""
    abandoned: int
    """Threads still running a call whose caller stopped waiting (timeout or cancellation)."""
    abandoned_total: int
    """Calls abandoned so far."""
    starved_total: int
    """Calls that found no free thread before their timeout."""


class ToolThreads:
    """The worker threads of sync tools: a pool of their own, bounded by ``max_threads``.

    A sync tool that hangs keeps its thread (a thread cannot be killed); with a pool of
    their own, hung tools can only exhaust this pool, never trio's shared one, which the
    rest of the server (the upstream's host-name lookups, SQLite) needs. A call that gets
    no thread before its timeout is an error outcome, like any other timeout.
    """

    def __init__(self, max_threads: int = DEFAULT_MAX_THREADS) -> None:
        if max_threads < 1:
            raise ValueError("max_threads must be at least 1")
        self.limiter = trio.CapacityLimiter(max_threads)
        self._lock = threading.Lock()  # counters are updated from the worker threads too
        self._abandoned = 0
        self._abandoned_total = 0
        self._starved_total = 0

    def statistics(self) -> ToolThreadsStatistics:
        with self._lock:
            return ToolThreadsStatistics(
                max_threads=int(self.limiter.total_tokens),
                busy=self.limiter.borrowed_tokens,
                abandoned=self._abandoned,
                abandoned_total=self._abandoned_total,
                starved_total=self._starved_total,
            )

    async def run_sync(self, fn: Callable[[], Any], call: ThreadCall | None = None) -> Any:
        """Run ``fn`` on a thread of this pool and return its result; ``call`` (if given)
        tells afterwards whether a thread ever took the call.

        Cancellation: raises ``Cancelled``. A call still waiting for a thread is counted
        starved; a running one is abandoned to finish on its own, and its place in the
        pool comes back when it does.
        """
        call = call if call is not None else ThreadCall()

        def work() -> Any:
            with self._lock:
                call.started = True
            try:
                return fn()
            finally:
                with self._lock:
                    call.done = True
                    if call.abandoned:
                        self._abandoned -= 1

        try:
            return await trio.to_thread.run_sync(work, abandon_on_cancel=True, limiter=self.limiter)
        except trio.Cancelled:
            with self._lock:
                if not call.started:
                    self._starved_total += 1
                elif not call.done:
                    call.abandoned = True
                    self._abandoned += 1
                    self._abandoned_total += 1
            raise


@attrs.define
class ThreadCall:
    """What became of one call on ``ToolThreads`` (written under its lock)."""

    started: bool = False
    abandoned: bool = False
    done: bool = False


# -- the registry ----------------------------------------------------------------------


class ToolRegistry:
    """Tools by name. Built with ``ToolRegistry.with_builtins()`` by default."""

    def __init__(self, tools: Iterable[Tool] = (), *, max_threads: int = DEFAULT_MAX_THREADS) -> None:
        self._tools: dict[str, Tool] = {}
        self.threads = ToolThreads(max_threads)
        for item in tools:
            self.register(item)

    @classmethod
    def with_builtins(cls, *, max_threads: int = DEFAULT_MAX_THREADS) -> ToolRegistry:
        return cls([clock_now, calculate], max_threads=max_threads)

    def statistics(self) -> ToolThreadsStatistics:
        """A snapshot of the sync tools' thread pool."""
        return self.threads.statistics()

    def register(self, item: Tool | Callable[..., Any], **options: Any) -> Tool:
        """Add a ``Tool``, or a function with ``tool()`` options. Raises ``ValueError`` on a
        name already taken."""
        made = item if isinstance(item, Tool) else tool(item, **options)
        if not made.name.replace("_", "").replace("-", "").isalnum() or len(made.name) > 64:
            raise ValueError(f"tool name {made.name!r}: use 1-64 letters, digits, '_' or '-'")
        if made.name in self._tools:
            raise ValueError(f"a tool named {made.name!r} is registered already")
        jsonschema.Draft202012Validator.check_schema(made.parameters)
        if made.isolation == "subprocess":
            for warning in limit_warnings(made.name, made.limits or DEFAULT_LIMITS):
                log.warning("%s", warning)
        self._tools[made.name] = made
        return made

    def get(self, name: str) -> Tool | None:
        return self._tools.get(name)

    def names(self) -> list[str]:
        return sorted(self._tools)

    def approval_names(self) -> frozenset[str]:
        """The names of the tools that wait for a person's approval before they run."""
        return frozenset(name for name, item in self._tools.items() if item.requires_approval)

    async def run(self, name: str, arguments: str) -> ToolOutcome:
        """Run the tool called ``name`` with ``arguments`` (JSON text); see ``run_tool``.

        An unknown name is an error outcome, never an exception.
        Cancellation: the call is abandoned (a subprocess is killed, a thread left to finish).
        """
        found = self._tools.get(name)
        if found is None:
            await trio.lowlevel.checkpoint()
            return ToolOutcome(f"tool {name!r} does not exist", True)
        return await run_tool(found, arguments, threads=self.threads)

    def load(self, path: str) -> list[Tool]:
        """Register what ``package.module:attribute`` names: a Tool, a function, a registry
        or a list of those."""
        return self._register_any(import_path(path), path)

    def load_entry_points(self, group: str = "backstream.tools") -> list[Tool]:
        loaded: list[Tool] = []
        for target, origin in entry_point_objects(group):
            loaded += self._register_any(target, origin)
        return loaded

    def _register_any(self, target: Any, origin: str) -> list[Tool]:
        if isinstance(target, ToolRegistry):
            return [self.register(t) for t in target._tools.values()]
        if isinstance(target, list | tuple):
            return [t for item in target for t in self._register_any(item, origin)]
        if isinstance(target, Tool):
            return [self.register(target)]
        if callable(target):
            made = tool(target)
            return [self.register(attrs.evolve(made, import_path=made.import_path or origin))]
        raise ValueError(f"{origin}: not a tool, function, registry or list")


# -- running a call ----------------------------------------------------------------------


_DEFAULT_THREADS: trio.lowlevel.RunVar[ToolThreads] = trio.lowlevel.RunVar("backstream_tool_threads")


def _default_threads() -> ToolThreads:
    try:
        return _DEFAULT_THREADS.get()
    except LookupError:
        made = ToolThreads()
        _DEFAULT_THREADS.set(made)
        return made


async def run_tool(item: Tool, arguments: str, *, threads: ToolThreads | None = None) -> ToolOutcome:
    """Validate ``arguments`` (JSON text) and run the tool under its timeout.

    A sync tool runs on ``threads`` (by default a pool shared by this trio run); waiting
    for a free thread counts toward the timeout. Never raises for the tool's faults:
    invalid arguments, exceptions, timeouts and a pool with no free thread become an
    error outcome with a short message the model can read.
    Cancellation: the call is abandoned (a subprocess is killed, a thread left to finish).
    """
    try:
        args = json.loads(arguments or "{}")
    except ValueError as exc:
        return ToolOutcome(f"invalid arguments: not JSON ({exc})", True)
    if not isinstance(args, dict):
        return ToolOutcome("invalid arguments: expected a JSON object", True)
    errors = sorted(
        jsonschema.Draft202012Validator(item.parameters).iter_errors(args), key=lambda e: list(e.path)
    )
    if errors:
        where = "/".join(str(p) for p in errors[0].path) or "arguments"
        return ToolOutcome(f"invalid arguments: {where}: {errors[0].message}"[:500], True)
    threads = threads if threads is not None else _default_threads()
    thread_call = ThreadCall()
    with trio.move_on_after(item.timeout) as waited:
        try:
            result = await _call(item, args, threads, thread_call)
        except Exception as exc:
            return ToolOutcome(f"{type(exc).__name__}: {exc}"[:500], True)
    if waited.cancelled_caught:
        if _is_sync(item) and not thread_call.started:
            busy = threads.statistics()
            return ToolOutcome(
                f"the tool could not start within {item.timeout:g} s: all {busy.max_threads} "
                f"threads for tools are busy ({busy.abandoned} held by calls that timed out)",
                True,
            )
        return ToolOutcome(f"the tool timed out after {item.timeout:g} s", True)
    text = result if isinstance(result, str) else json.dumps(result, default=str, ensure_ascii=False)
    return ToolOutcome(cap_output(text, item.max_output_chars), False)


def cap_output(text: str, max_chars: int) -> str:
    """``text`` cut to ``max_chars`` characters, with a note saying so."""
    if len(text) <= max_chars:
        return text
    return text[:max_chars] + f"\n[output cut at {max_chars} characters]"


def _is_sync(item: Tool) -> bool:
    return item.isolation == "inline" and not inspect.iscoroutinefunction(item.fn)


async def _call(item: Tool, args: dict[str, Any], threads: ToolThreads, thread_call: ThreadCall) -> Any:
    if item.isolation == "subprocess":
        return await _call_in_subprocess(item, args)
    call_args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = args
    if item.param_class is not None:
        call_args, kwargs = (item.param_class(**args),), {}
    if inspect.iscoroutinefunction(item.fn):
        return await item.fn(*call_args, **kwargs)
    # A thread cannot be killed: at the timeout the job stops waiting and the thread is abandoned.
    return await threads.run_sync(lambda: item.fn(*call_args, **kwargs), thread_call)


async def _call_in_subprocess(item: Tool, args: dict[str, Any]) -> Any:
    if not item.import_path:
        raise RuntimeError("subprocess isolation needs a tool importable as module:attribute")
    return await call_in_subprocess(item.import_path, args, item.limits or DEFAULT_LIMITS)


# -- built-in tools ----------------------------------------------------------------------------


def _clock_now() -> str:
    """The current time, RFC 3339 in UTC."""
    now = dt.datetime.now(dt.UTC)
    return now.strftime("%Y-%m-%dT%H:%M:%S.") + f"{now.microsecond // 1000:03d}Z"


_BINARY: dict[type, Callable[[Any, Any], Any]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARY: dict[type, Callable[[Any], Any]] = {ast.UAdd: operator.pos, ast.USub: operator.neg}


def _evaluate(node: ast.AST) -> int | float:
    if isinstance(node, ast.Expression):
        return _evaluate(node.body)
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        value: int | float = node.value  # type: ignore[assignment]
        return value
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_evaluate(node.operand))  # type: ignore[no-any-return]
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _evaluate(node.left), _evaluate(node.right)
        if isinstance(node.op, ast.Pow) and (abs(right) > 1000 or abs(left) > 10**100):
            raise ValueError("exponent or base too large")
        result = _BINARY[type(node.op)](left, right)
        if isinstance(result, int) and result.bit_length() > 4096:
            raise ValueError("result too large")
        if isinstance(result, complex) or (isinstance(result, float) and not math.isfinite(result)):
            raise ValueError("result is not a finite real number")
        return result  # type: ignore[no-any-return]
    raise ValueError(f"not allowed in an arithmetic expression: {type(node).__name__}")


def _calculate(expression: str) -> str:
    """Evaluate an arithmetic expression: numbers, + - * / // % ** and parentheses."""
    if len(expression) > 500:
        raise ValueError("expression longer than 500 characters")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError:
        raise ValueError("not an arithmetic expression") from None
    try:
        value = _evaluate(tree)
    except ZeroDivisionError:
        raise ValueError("division by zero") from None
    return str(value)


clock_now: Tool = tool(_clock_now, name="clock_now", timeout=5, idempotent=True)
calculate: Tool = tool(_calculate, name="calculate", timeout=5, idempotent=True)
