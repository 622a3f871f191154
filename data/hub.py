"""Is the Hugging Face hub usable? One quick check for `data.prepare` and the zero-shot evaluation.

Without it `datasets` retries for minutes before giving up; here a TCP connection must open within a
few seconds, and the offline switches (HF_HUB_OFFLINE, HF_DATASETS_OFFLINE) count as unreachable.
"""

from __future__ import annotations

import functools
import os
import socket
from urllib.parse import urlparse

OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")


class HubUnreachable(ConnectionError):
    """The Hugging Face hub cannot be used; the message says what to use instead."""


def hub_address() -> tuple[str, int]:
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    return endpoint.hostname or "huggingface.co", endpoint.port or (80 if endpoint.scheme == "http" else 443)


def hub_problem(timeout: float = 5.0) -> str | None:
    """None when the hub can be reached, else why not."""
    offline = [v for v in OFFLINE_VARS if os.environ.get(v, "").upper() in ("1", "ON", "YES", "TRUE")]
    if offline:
        return f"{offline[0]} is set"
    return connection_problem(*hub_address(), float(timeout))


@functools.lru_cache(maxsize=4)
def connection_problem(host: str, port: int, timeout: float) -> str | None:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except OSError as e:
        return f"{host}:{port} unreachable ({e.__class__.__name__}: {e})"


def require_hub(what: str, fix: str, timeout: float = 5.0) -> None:
    """Raise HubUnreachable("... so <what> ... <fix>") unless the hub can be reached."""
    problem = hub_problem(timeout)
    if problem:
        raise HubUnreachable(f"The Hugging Face hub is unreachable ({problem}), so {what}. {fix}")
