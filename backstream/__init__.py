"""backstream: AI responses as supervised background jobs, on trio.

The embeddable API::

    import backstream

    async with backstream.open_runtime(backstream.Config()) as rt:
        started = await rt.start_job(user="alice", thread_id="t1", message_id="m1",
                                     model="backstream/echo",
                                     messages=[{"role": "user", "content": "hello"}])
        async with rt.watch(started.job_id, user="alice") as batches:
            async for batch in batches:
                print(batch.text, end="")
"""

from backstream.actors.config import Config
from backstream.actors.ports import ChatTurn, Model, ModelFailure, OutputSink, Store, TurnResult
from backstream.protocol.errors import (
    BackstreamError,
    BadRequestError,
    CapacityError,
    ConflictError,
    GoneError,
    InternalError,
    NotFoundError,
    QuotaExceededError,
    RateLimitedError,
    TooLargeError,
    UnauthorizedError,
    UnavailableError,
    UnsupportedProtocolError,
)
from backstream.protocol.events import (
    Batch,
    ErrorInfo,
    JobInfo,
    JobSummary,
    LogEvent,
    StatusEvent,
    TextEvent,
)
from backstream.protocol.version import VERSION
from backstream.runtime.api import (
    AbortResult,
    Runtime,
    RuntimeStatistics,
    StartedJob,
)
from backstream.runtime.models.turns import TurnCollector
from backstream.runtime.stores.memory import MemoryStore
from backstream.runtime.tree import open_runtime

__version__ = VERSION

__all__ = [
    "AbortResult",
    "BackstreamError",
    "BadRequestError",
    "Batch",
    "CapacityError",
    "ChatTurn",
    "Config",
    "ConflictError",
    "ErrorInfo",
    "GoneError",
    "InternalError",
    "JobInfo",
    "JobSummary",
    "LogEvent",
    "MemoryStore",
    "Model",
    "ModelFailure",
    "NotFoundError",
    "OutputSink",
    "QuotaExceededError",
    "RateLimitedError",
    "Runtime",
    "RuntimeStatistics",
    "StartedJob",
    "StatusEvent",
    "Store",
    "TextEvent",
    "TooLargeError",
    "TurnCollector",
    "TurnResult",
    "UnauthorizedError",
    "UnavailableError",
    "UnsupportedProtocolError",
    "__version__",
    "open_runtime",
]
