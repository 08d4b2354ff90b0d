"""`ServerConfig`: the HTTP server's limits and batching, and their checks.

No aiohttp and no TensorFlow: `serve.py` checks its HTTP flags with these
before either loads.
"""

import dataclasses


@dataclasses.dataclass
class ServerConfig:
    """Limits and batching of the HTTP server.

    Args:
        max_instances: most instances in one request.
        max_body_bytes: largest request body.
        max_top: largest `"top"` a request may ask for.
        max_batch: most instances in one model call; 1 disables combining
            requests (each request is then its own call).
        batch_wait_ms: longest a request waits for others to share its
            model call.
        max_pending: most predict requests in progress at once; more get
            503 ("busy, retry").
        max_pending_per_client: most predict requests in progress at once
            from one remote address; more get 429. Behind a reverse proxy
            every request comes from its address: raise it to `max_pending`.
        header_timeout_s: longest wait for a whole request line and headers.
        body_timeout_s: longest wait for a request body.
        min_body_rate: after `body_grace_s`, a body must keep arriving at
            this many bytes per second on average (a client trickling it
            gets 408 instead of holding a request slot).
        body_grace_s: how long a body may take before `min_body_rate`
            counts.
    """

    max_instances: int = 64
    max_body_bytes: int = 1 << 20
    max_top: int = 100
    max_batch: int = 64
    batch_wait_ms: float = 2.0
    max_pending: int = 256
    max_pending_per_client: int = 64
    header_timeout_s: float = 10.0
    body_timeout_s: float = 10.0
    min_body_rate: int = 1024
    body_grace_s: float = 2.0

    def __post_init__(self):
        for name in ("max_instances", "max_body_bytes", "max_top", "max_batch",
                     "max_pending", "max_pending_per_client",
                     "min_body_rate"):  # fmt: skip
            if getattr(self, name) < 1:
                raise ValueError(
                    f"`{name}` must be at least 1. Received: "
                    f"{name}={getattr(self, name)}"
                )
        if not 0 <= self.batch_wait_ms <= 1000:
            raise ValueError(
                "`batch_wait_ms` must be between 0 and 1000. Received: "
                f"batch_wait_ms={self.batch_wait_ms}"
            )
        for name in ("header_timeout_s", "body_timeout_s", "body_grace_s"):
            if not 0 < getattr(self, name) <= 3600:
                raise ValueError(
                    f"`{name}` must be > 0 and at most 3600. Received: "
                    f"{name}={getattr(self, name)}"
                )


def check_port(port: int) -> None:
    """Raises `ValueError` unless `port` is a TCP port (0: any free one)."""
    if not 0 <= port <= 65535:
        raise ValueError(f"`port` must be 0-65535. Received: port={port}")
