"""The workflows a server runs, by name: the built-in ``demo``, ``serve --workflows`` and the
entry-point group ``backstream.workflows`` (``docs/workflows.md``)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from backstream.actors.workflow import Workflow
from backstream.runtime.loading import entry_point_objects, import_path
from backstream.runtime.models.workflow_demo import demo_workflow

__all__ = ["WorkflowRegistry"]


class WorkflowRegistry:
    """Workflows by name; ``with_builtins`` holds the offline ``demo``."""

    def __init__(self, workflows: Iterable[Workflow] = ()) -> None:
        self._workflows: dict[str, Workflow] = {}
        for item in workflows:
            self.register(item)

    @classmethod
    def with_builtins(cls) -> WorkflowRegistry:
        return cls([demo_workflow])

    def register(self, item: Workflow) -> Workflow:
        """Add ``item``. Raises ``ValueError`` on a name already taken."""
        if not isinstance(item, Workflow):
            raise ValueError(f"{item!r} is not a workflow (make it one with @workflow)")
        if item.name in self._workflows:
            raise ValueError(f"a workflow named {item.name!r} is registered already")
        self._workflows[item.name] = item
        return item

    def get(self, name: str) -> Workflow | None:
        return self._workflows.get(name)

    def names(self) -> list[str]:
        return sorted(self._workflows)

    def load(self, path: str) -> list[Workflow]:
        """Register what ``package.module:attribute`` names: a Workflow or a list of them."""
        return self._register_any(import_path(path), path)

    def load_entry_points(self, group: str = "backstream.workflows") -> list[Workflow]:
        loaded: list[Workflow] = []
        for target, origin in entry_point_objects(group):
            loaded += self._register_any(target, origin)
        return loaded

    def _register_any(self, target: Any, origin: str) -> list[Workflow]:
        if isinstance(target, Workflow):
            return [self.register(target)]
        if isinstance(target, list | tuple):
            return [w for item in target for w in self._register_any(item, origin)]
        raise ValueError(f"{origin}: not a workflow or a list of workflows")
