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
runs each call in a child process that is killed at the timeout.
"""

from __future__ import annotations

import ast
import dataclasses
import datetime as dt
import importlib
import importlib.metadata
import inspect
import json
import math
import operator
import sys
import types
import typing
from collections.abc import Callable, Iterable
from typing import Any, Literal

import attrs
import jsonschema
import trio

from backstream.actors.ports import ToolOutcome

__all__ = ["Tool", "ToolOutcome", "ToolRegistry", "calculate", "clock_now", "run_tool", "schema_for", "tool"]

DEFAULT_TIMEOUT = 30.0
DEFAULT_MAX_OUTPUT = 16_000


@attrs.frozen
class Tool:
    name: str
    description: str
    parameters: dict[str, Any]  # a JSON Schema of type object
    fn: Callable[..., Any] = attrs.field(eq=False, repr=False)
    timeout: float = DEFAULT_TIMEOUT
    max_output_chars: int = DEFAULT_MAX_OUTPUT
    requires_approval: bool = False
    isolation: Literal["inline", "subprocess"] = "inline"
    import_path: str | None = None  # "module:attribute", for subprocess isolation
    param_class: type | None = attrs.field(default=None, eq=False, repr=False)

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
    isolation: Literal["inline", "subprocess"] = "inline",
) -> Any:
    """Make a ``Tool`` of a function; usable as ``@tool`` or ``@tool(timeout=5)``."""

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
            isolation=isolation,
            import_path=f"{module}:{qualname}" if module and "<" not in qualname else None,
            param_class=param_class,
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


# -- the registry ----------------------------------------------------------------------


class ToolRegistry:
    """Tools by name. Built with ``ToolRegistry.with_builtins()`` by default."""

    def __init__(self, tools: Iterable[Tool] = ()) -> None:
        self._tools: dict[str, Tool] = {}
        for item in tools:
            self.register(item)

    @classmethod
    def with_builtins(cls) -> ToolRegistry:
        return cls([clock_now, calculate])

    def register(self, item: Tool | Callable[..., Any], **options: Any) -> Tool:
        """Add a ``Tool``, or a function with ``tool()`` options. Raises ``ValueError`` on a
        name already taken."""
        made = item if isinstance(item, Tool) else tool(item, **options)
        if not made.name.replace("_", "").replace("-", "").isalnum() or len(made.name) > 64:
            raise ValueError(f"tool name {made.name!r}: use 1-64 letters, digits, '_' or '-'")
        if made.name in self._tools:
            raise ValueError(f"a tool named {made.name!r} is registered already")
        jsonschema.Draft202012Validator.check_schema(made.parameters)
        self._tools[made.name] = made
        return made

    def get(self, name: str) -> Tool | None:
        return self._tools.get(name)

    def names(self) -> list[str]:
        return sorted(self._tools)

    async def run(self, name: str, arguments: str) -> ToolOutcome:
        """Run the tool called ``name`` with ``arguments`` (JSON text); see ``run_tool``.

        An unknown name is an error outcome, never an exception.
        Cancellation: the call is abandoned (a subprocess is killed, a thread left to finish).
        """
        found = self._tools.get(name)
        if found is None:
            await trio.lowlevel.checkpoint()
            return ToolOutcome(f"tool {name!r} does not exist", True)
        return await run_tool(found, arguments)

    def load(self, path: str) -> list[Tool]:
        """Register what ``package.module:attribute`` names: a Tool, a function, a registry
        or a list of those."""
        module_name, _, attribute = path.partition(":")
        if not module_name or not attribute:
            raise ValueError(f"{path!r}: expected package.module:attribute")
        target: Any = importlib.import_module(module_name)
        for part in attribute.split("."):
            target = getattr(target, part)
        return self._register_any(target, path)

    def load_entry_points(self, group: str = "backstream.tools") -> list[Tool]:
        loaded: list[Tool] = []
        for entry in importlib.metadata.entry_points(group=group):
            loaded += self._register_any(entry.load(), entry.value)
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


async def run_tool(item: Tool, arguments: str) -> ToolOutcome:
    """Validate ``arguments`` (JSON text) and run the tool under its timeout.

    Never raises for the tool's faults: invalid arguments, exceptions and timeouts
    become an error outcome with a short message the model can read.
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
    with trio.move_on_after(item.timeout) as waited:
        try:
            result = await _call(item, args)
        except Exception as exc:
            return ToolOutcome(f"{type(exc).__name__}: {exc}"[:500], True)
    if waited.cancelled_caught:
        return ToolOutcome(f"the tool timed out after {item.timeout:g} s", True)
    text = result if isinstance(result, str) else json.dumps(result, default=str, ensure_ascii=False)
    if len(text) > item.max_output_chars:
        text = text[: item.max_output_chars] + f"\n[output cut at {item.max_output_chars} characters]"
    return ToolOutcome(text, False)


async def _call(item: Tool, args: dict[str, Any]) -> Any:
    if item.isolation == "subprocess":
        return await _call_in_subprocess(item, args)
    call_args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = args
    if item.param_class is not None:
        call_args, kwargs = (item.param_class(**args),), {}
    if inspect.iscoroutinefunction(item.fn):
        return await item.fn(*call_args, **kwargs)
    # A thread cannot be killed: at the timeout the job stops waiting and the thread is abandoned.
    return await trio.to_thread.run_sync(lambda: item.fn(*call_args, **kwargs), abandon_on_cancel=True)


async def _call_in_subprocess(item: Tool, args: dict[str, Any]) -> Any:
    if not item.import_path:
        raise RuntimeError("subprocess isolation needs a tool importable as module:attribute")
    # trio.run_process kills the child when the call is cancelled (the timeout).
    done = await trio.run_process(
        [sys.executable, "-m", "backstream.runtime.tools.subprocess_runner", item.import_path],
        stdin=json.dumps(args).encode(),
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"the tool process failed (exit {done.returncode})")
    reply = json.loads(done.stdout)
    if reply.get("error"):
        raise RuntimeError(reply["error"])
    return reply["result"]


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


clock_now: Tool = tool(_clock_now, name="clock_now", timeout=5)
calculate: Tool = tool(_calculate, name="calculate", timeout=5)
