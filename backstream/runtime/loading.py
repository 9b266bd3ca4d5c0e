"""Loading what an operator names: ``package.module:attribute`` paths (``--tools``,
``--workflows``) and the objects of an entry-point group of installed packages."""

from __future__ import annotations

import importlib
import importlib.metadata
from typing import Any

__all__ = ["entry_point_objects", "import_path"]


def import_path(path: str) -> Any:
    """The object ``package.module:attribute`` names (the attribute may be dotted).
    Raises ``ValueError`` for another shape, ``ImportError`` or ``AttributeError`` when
    it is not there."""
    module_name, _, attribute = path.partition(":")
    if not module_name or not attribute:
        raise ValueError(f"{path!r}: expected package.module:attribute")
    target: Any = importlib.import_module(module_name)
    for part in attribute.split("."):
        target = getattr(target, part)
    return target


def entry_point_objects(group: str) -> list[tuple[Any, str]]:
    """Each entry point of ``group``, loaded, with its value (where it came from). Raises
    whatever a package's import raises."""
    return [(entry.load(), entry.value) for entry in importlib.metadata.entry_points(group=group)]
