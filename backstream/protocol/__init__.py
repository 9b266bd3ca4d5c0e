"""backstream's sans-IO protocol core: wire types, errors and stream decoders.

Nothing in this package does I/O or imports trio; the runtime, the front door
and the clients are shells around it.
"""

from backstream.protocol.errors import *  # noqa: F403
from backstream.protocol.events import *  # noqa: F403
