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

from backstream.protocol.errors import (
    BackstreamError,
    BadRequestError,
    CapacityError,
    ConflictError,
    GoneError,
    InternalError,
    NotFoundError,
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
from backstream.runtime.config import Config
from backstream.runtime.memory_store import MemoryStore
from backstream.runtime.models import ChatTurn, Model, ModelFailure, OutputSink, TurnCollector, TurnResult
from backstream.runtime.runtime import (
    AbortResult,
    Runtime,
    RuntimeStatistics,
    StartedJob,
    open_runtime,
)
from backstream.runtime.store import Store

__version__ = "0.1.0"

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
