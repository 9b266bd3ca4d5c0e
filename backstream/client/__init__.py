"""The Python client for the WebSocket protocol (trio).

    async with backstream.client.open_client("ws://127.0.0.1:8765/v1", token) as client:
        started = await client.start_job(thread_id="t1", message_id="m1", model="backstream/echo",
                                          messages=[{"role": "user", "content": "hello"}])
        async with client.watch(started.job.job_id) as batches:
            async for batch in batches:
                print(batch.text, end="")

Watches survive dropped connections: the client reconnects with backoff and
jitter and resumes from the last ``seq`` it delivered, so the batches it yields
join into the job's content with no gap and no repeat. Errors are the typed
exceptions of ``backstream`` (``NotFoundError``, ``CapacityError``, ...).

Its parts: ``api`` (``Client``'s calls, ``open_client``), ``watch`` (``ClientWatch``,
resuming from its cursor), ``transport`` (connections, reconnects, routing what arrives).
The client speaks only the protocol (``backstream.protocol``), never the runtime.
"""

from backstream.client.api import Client, check_endpoint_url, open_client
from backstream.client.transport import CLOSE_TIMEOUT, INBOX_SIZE, WATCH_BUFFER
from backstream.client.watch import ClientWatch

__all__ = [
    "CLOSE_TIMEOUT",
    "INBOX_SIZE",
    "WATCH_BUFFER",
    "Client",
    "ClientWatch",
    "check_endpoint_url",
    "open_client",
]
