"""One bounded network probe, so that a service that cannot be reached fails a run in seconds, not after the
client's minutes of retries (the Hugging Face hub client, ``datasets`` and ``wandb`` all retry with back-off)."""

from __future__ import annotations

import os
import socket
import threading
from urllib.parse import urlparse

#: Seconds a probe waits for a TCP connection (name lookup included) before calling the endpoint unreachable.
PROBE_TIMEOUT_S = 4.0
PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")


def endpoint_reachable(url: str, timeout: float | None = None) -> bool:
    """Whether ``url``'s host accepts a TCP connection within ``timeout`` seconds (default
    :data:`PROBE_TIMEOUT_S`), DNS lookup included.

    The attempt runs in a daemon thread, because ``getaddrinfo`` has no timeout of its own: a resolver that does not
    answer must not stall the run. Behind a proxy a direct connection proves nothing, so the answer is yes and the
    client is left to go through the proxy (and report its own error).
    """
    if any(os.environ.get(v) for v in PROXY_VARIABLES):
        return True
    timeout = PROBE_TIMEOUT_S if timeout is None else timeout
    parsed = urlparse(url)
    if not parsed.hostname:
        return False
    port = parsed.port or (80 if parsed.scheme == "http" else 443)
    answer: list[bool] = []

    def attempt() -> None:
        try:
            with socket.create_connection((parsed.hostname, port), timeout=timeout):
                answer.append(True)
        except (OSError, UnicodeError):
            answer.append(False)

    worker = threading.Thread(target=attempt, name=f"probe {parsed.hostname}", daemon=True)
    worker.start()
    worker.join(timeout)
    return bool(answer and answer[0])
