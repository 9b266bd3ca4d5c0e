"""JSON Schema (draft 2020-12) of every wire message, generated from the attrs classes."""

from __future__ import annotations

import types
import typing
from typing import Any, Literal, Union, get_args, get_origin

import attrs

from backstream.protocol.codec import EVENT_CLASSES
from backstream.protocol.messages import CLIENT_MESSAGES, PROTOCOL_VERSION, SERVER_MESSAGES

__all__ = ["json_schema"]


def json_schema() -> dict[str, Any]:
    """A schema whose ``$defs`` hold every message and nested type; ``oneOf`` lists the
    client messages (``client``) and the server messages (``server``)."""
    defs: dict[str, Any] = {}
    client = [_ref(cls, defs, tag=("type", cls.TYPE)) for cls in CLIENT_MESSAGES.values()]
    server = [_ref(cls, defs, tag=("type", cls.TYPE)) for cls in SERVER_MESSAGES.values()]
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": f"https://backstream.dev/schema/protocol-v{PROTOCOL_VERSION}.json",
        "title": f"backstream wire protocol, version {PROTOCOL_VERSION}",
        "$defs": defs,
        "properties": {"client": {"oneOf": client}, "server": {"oneOf": server}},
    }


def _ref(cls: type[Any], defs: dict[str, Any], tag: tuple[str, str] | None = None) -> dict[str, Any]:
    name = tag[1] if tag else cls.__name__
    if name not in defs:
        defs[name] = {}  # placeholder first: classes may refer to themselves
        hints = typing.get_type_hints(cls)
        props: dict[str, Any] = {}
        required: list[str] = []
        for field in attrs.fields(cls):
            props[field.name] = _schema(hints[field.name], defs)
            if field.default is attrs.NOTHING:
                required.append(field.name)
        if tag:
            props[tag[0]] = {"const": tag[1]}
            required.insert(0, tag[0])
        doc = (cls.__doc__ or "").strip().splitlines()
        defs[name] = {
            "type": "object",
            **({"description": doc[0]} if doc and tag else {}),
            "properties": props,
            "required": required,
        }
    return {"$ref": f"#/$defs/{name}"}


def _schema(tp: Any, defs: dict[str, Any]) -> dict[str, Any]:
    origin = get_origin(tp)
    if tp is Any:
        return {}
    if tp is str:
        return {"type": "string"}
    if tp is bool:
        return {"type": "boolean"}
    if tp is int:
        return {"type": "integer"}
    if tp is float:
        return {"type": "number"}
    if tp is type(None):
        return {"type": "null"}
    if origin is Literal:
        return {"enum": list(get_args(tp))}
    if origin in (Union, types.UnionType):
        members = get_args(tp)
        if set(members) == set(EVENT_CLASSES):
            return {"oneOf": [_event(cls, defs) for cls in members]}
        return {"anyOf": [_schema(m, defs) for m in members]}
    if origin in (list, tuple):
        args = [a for a in get_args(tp) if a is not Ellipsis]
        return {"type": "array", "items": _schema(args[0], defs) if args else {}}
    if origin is dict:
        return {"type": "object"}
    if attrs.has(tp):
        return _ref(tp, defs)
    raise TypeError(f"no schema for {tp!r}")


def _event(cls: type[Any], defs: dict[str, Any]) -> dict[str, Any]:
    ref = _ref(cls, defs)
    definition = defs[cls.__name__]
    kind = attrs.fields_dict(cls)["kind"].default
    definition["properties"]["kind"] = {"const": kind}
    if "kind" not in definition["required"]:
        definition["required"].append("kind")
    return ref
