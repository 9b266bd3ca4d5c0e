"""docs/protocol.md is the whole protocol: it names everything the code and the schema have."""

from __future__ import annotations

import re
from pathlib import Path

import attrs

from backstream.protocol.codec import EVENT_CLASSES
from backstream.protocol.errors import BackstreamError
from backstream.protocol.schema import json_schema

ROOT = Path(__file__).resolve().parent.parent
DOC = (ROOT / "docs" / "protocol.md").read_text()


def named(word: str) -> bool:
    return f"`{word}`" in DOC or f'"{word}"' in DOC


def test_every_message_type_and_field_is_documented() -> None:
    schema = json_schema()
    missing = []
    for name, definition in schema["$defs"].items():
        is_message = "." in name or name in ("hello", "welcome", "ping", "pong", "error", "notification")
        if is_message and not named(name):
            missing.append(name)
        for field in definition.get("properties", {}):
            if not named(field):
                missing.append(f"{name}.{field}")
    assert not missing, f"not in docs/protocol.md: {missing}"


def test_every_event_kind_is_documented() -> None:
    kinds = [attrs.fields_dict(cls)["kind"].default for cls in EVENT_CLASSES]
    assert [k for k in kinds if not named(k)] == []


def test_every_error_code_is_documented() -> None:
    codes = {cls.code for cls in [BackstreamError, *_subclasses(BackstreamError)]}
    assert sorted(c for c in codes if not named(c)) == []


def test_every_job_error_code_is_documented() -> None:
    pattern = re.compile(r'(?:ErrorInfo|_failure|ChatStreamError)\(\s*"([a-z_]+)"')
    codes = {
        code for path in (ROOT / "backstream").rglob("*.py") for code in pattern.findall(path.read_text())
    }
    assert {"timeout", "upstream_unreachable", "output_limit"} <= codes  # the scan works
    assert sorted(c for c in codes if not named(c)) == []


def test_close_codes_and_other_front_doors() -> None:
    for code in ("1000", "1001", "1007", "1008", "1009", "4400", "4401", "4408", "4429"):
        assert f"| {code} |" in DOC
    sections = re.findall(r"^## (.+)$", DOC, flags=re.M)
    assert sections[-1] == "Other front doors"  # the other endpoints' sections go last
    assert "### AI SDK endpoint" in DOC and "### HTTP Responses API" in DOC


def test_docs_link_only_to_files_in_the_repository() -> None:
    for path in (ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))):
        text = path.read_text()
        assert "PROTOCOL.md" not in text, path  # the protocol is documented here, not elsewhere
        for target in re.findall(r"\]\(([^)#]+)\)", text):
            if not target.startswith(("http://", "https://")) and not target.endswith("architecture.md"):
                assert (path.parent / target).exists(), f"{path.name} links to missing {target}"


def _subclasses(cls: type) -> list[type]:
    found = []
    for sub in cls.__subclasses__():
        found += [sub, *_subclasses(sub)]
    return found


def test_ai_sdk_query_parameters_are_documented() -> None:
    for name in ("token", "coalesce_ms", "lastSequence", "--ai-sdk-coalesce-ms"):
        assert named(name), name
