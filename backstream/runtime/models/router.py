"""The model router: which models a job may name, and which ``Model`` serves each.

Three kinds of model, in this order of precedence: the ones a program embeds (given to
``open_runtime``), the built-ins (``backstream/...``, offline), and the upstream (any
other name, when one is configured). ``config.allowed_models`` narrows what may be
named: glob patterns, ``!pattern`` to exclude. ``config.system_prompts`` gives a model the
operator's system prompt when a request brings none.

Built once per runtime, before the registry and the runtime; ``Runtime.start_job``
resolves each start's model here once, and hands the ``Model`` to the registry with
the start.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping
from typing import Any

from backstream.actors.config import Config
from backstream.actors.ports import Model
from backstream.actors.workflow import WorkflowTarget
from backstream.protocol.continuation import Continuation, continuation_for
from backstream.protocol.errors import BadRequestError
from backstream.protocol.records import JobRequest
from backstream.protocol.workflow import WORKFLOW_PREFIX, workflow_name_of
from backstream.runtime.models.builtin import BUILTIN_MODELS, builtin_model, validate_builtin_params
from backstream.runtime.models.upstream import UpstreamClient
from backstream.runtime.models.workflows import WorkflowRegistry

__all__ = ["BUILTIN_PREFIX", "ModelRouter"]

BUILTIN_PREFIX = "backstream/"


class ModelRouter:
    """Answers from its configuration only: no I/O, nothing to cancel."""

    def __init__(
        self,
        config: Config,
        models: Mapping[str, Model],
        upstream: UpstreamClient | None,
        workflows: WorkflowRegistry | None = None,
    ) -> None:
        self._config = config
        self._models = dict(models)
        self.upstream = upstream
        """The upstream client, or None without ``config.upstream_url``."""
        self.workflows = workflows if workflows is not None else WorkflowRegistry.with_builtins()
        """The workflows a job may name as ``workflow/<name>``."""

    def is_local(self, model: str) -> bool:
        """Whether ``model`` is embedded or named as a built-in (the upstream's params are
        restricted; these take their own)."""
        return model.startswith((BUILTIN_PREFIX, WORKFLOW_PREFIX)) or model in self._models

    def model_allowed(self, model: str) -> bool:
        """Whether ``config.allowed_models`` lets a job name ``model``: not excluded by a
        ``!pattern``, and built in, or matching a pattern (any model when there is none)."""
        patterns = self._config.allowed_models
        if any(p.startswith("!") and fnmatch.fnmatchcase(model, p[1:]) for p in patterns):
            return False
        if self.is_local(model):
            return True
        allowing = [p for p in patterns if not p.startswith("!")]
        return not allowing or any(fnmatch.fnmatchcase(model, p) for p in allowing)

    def allowed_models(self) -> list[str]:
        """What a client may name, as glob patterns: the built-in and embedded models not
        excluded, then ``config.allowed_models`` (``*`` for any model with an upstream and no
        pattern)."""
        flows = {WORKFLOW_PREFIX + name for name in self.workflows.names()}
        fixed = [m for m in sorted({*BUILTIN_MODELS, *self._models, *flows}) if self.model_allowed(m)]
        allowing = [p for p in self._config.allowed_models if not p.startswith("!")]
        if not allowing and self.upstream is not None:
            allowing = ["*"]
        return fixed + allowing

    def system_prompt(self, model: str) -> str | None:
        """The operator's system prompt for ``model``: the text of the first pattern of
        ``config.system_prompts`` that matches it, or None."""
        for pattern, text in self._config.system_prompts.items():
            if fnmatch.fnmatchcase(model, pattern):
                return text
        return None

    def with_system_prompt(
        self, model: str, messages: tuple[dict[str, Any], ...]
    ) -> tuple[dict[str, Any], ...]:
        """``messages`` with the operator's system prompt for ``model`` first, unless they hold
        a ``system`` or ``developer`` message of their own (the request's wins) or no pattern
        matches (then ``messages`` as they are)."""
        if any(message.get("role") in ("system", "developer") for message in messages):
            return messages
        text = self.system_prompt(model)
        if text is None:
            return messages
        return ({"role": "system", "content": text}, *messages)

    def continuation(self, model: str) -> Continuation:
        """How a job of ``model`` is continued when its instance died: the first pattern of
        ``config.continuations`` that matches it, else the built-ins' ``prefill``, else
        ``interrupt`` (an upstream not known to continue a final assistant message). A
        workflow is always continued: it replays its log (``restart``)."""
        if workflow_name_of(model) is not None:
            return Continuation.RESTART
        patterns = {pattern: Continuation(policy) for pattern, policy in self._config.continuations.items()}
        return continuation_for(model, patterns)

    def resolve(self, request: JobRequest) -> Model:
        """The model that serves ``request``: an embedded one, a built-in, or the upstream.
        Raises ``BadRequestError``, also for a model that ``config.allowed_models`` does not
        allow, or a built-in's bad params."""
        if not self.model_allowed(request.model):
            allowed = ", ".join(self.allowed_models()) or "none"
            raise BadRequestError(
                f"model {request.model!r} is not allowed on this server (allowed: {allowed})"
            )
        model = self._models.get(request.model)
        if model is not None:
            return model
        name = workflow_name_of(request.model)
        if name is not None:
            return self._workflow(name)
        if request.model.startswith(BUILTIN_PREFIX):
            validate_builtin_params(request.model, request.params)
            return builtin_model(
                request.model,
                echo_rate=self._config.echo_words_per_s,
                max_argument_chars=self._config.max_output_chars,
            )
        if self.upstream is None:
            raise BadRequestError(
                f"model {request.model!r} needs an upstream, and none is configured "
                f"(built-in models: {', '.join(sorted(BUILTIN_MODELS))})"
            )
        return self.upstream

    def _workflow(self, name: str) -> WorkflowTarget:
        found = self.workflows.get(name)
        if found is None:
            known = ", ".join(self.workflows.names()) or "none"
            raise BadRequestError(f"unknown workflow {name!r} (known: {known})")
        return WorkflowTarget(found, self._step_model)

    def _step_model(self, model: str) -> Model:
        """The model a workflow's ``ctx.model`` names (no workflow). Raises
        ``BadRequestError``."""
        if workflow_name_of(model) is not None:
            raise BadRequestError(f"{model!r} is a workflow; ctx.model takes a model")
        return self.resolve(JobRequest(model=model, messages=()))
