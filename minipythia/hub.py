"""Every request to the Hugging Face hub waits a bounded time for an answer.

huggingface_hub sends some requests (a repository's file listing, which `snapshot_download` asks first) with no
timeout at all, so a network that accepts connections and never answers (a proxy or firewall that drops packets)
would hang model resolution forever. `bound_hub_requests()` gives every request of its shared HTTP client, and
so of `datasets` too, a limit on connecting and on each read: a download that keeps receiving is never cut, a
silent one fails after MINIPYTHIA_HUB_TIMEOUT seconds (default 5) and the caller falls back as when offline.
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager

from .bounded import first_line

HUB_TIMEOUT_ENV = "MINIPYTHIA_HUB_TIMEOUT"
DEFAULT_HUB_TIMEOUT = 5.0


def hub_timeout() -> float:
    """Seconds a hub request may wait to connect or for each piece of its answer: $MINIPYTHIA_HUB_TIMEOUT."""
    text = os.environ.get(HUB_TIMEOUT_ENV, "").strip()
    if not text:
        return DEFAULT_HUB_TIMEOUT
    try:
        seconds = float(text)
    except ValueError:
        seconds = float("nan")
    if not 0 < seconds < float("inf"):
        raise ValueError(f"{HUB_TIMEOUT_ENV}={text[:40]!r} is not a positive number of seconds; "
                         f"set it to e.g. {DEFAULT_HUB_TIMEOUT:g} or unset it")
    return seconds


def transport_errors() -> tuple[type[BaseException], ...]:
    """What a request to an unreachable or silent hub raises: OS errors, and the timeouts, refused proxies and
    broken connections of the HTTP library huggingface_hub uses (httpx, which some versions vendor as httpx2)."""
    from huggingface_hub.utils import _http

    library = getattr(_http, "httpx2", None) or getattr(_http, "httpx")
    return OSError, library.TransportError


def _bounded(timeout: dict | None, seconds: float) -> dict:
    """An httpx timeout extension with each unset (None, unbounded) phase limited to `seconds`."""
    timeout = dict(timeout or {})
    for phase in ("connect", "read", "write", "pool"):
        if timeout.get(phase) is None or timeout[phase] > seconds:
            timeout[phase] = seconds
    return timeout


def bound_hub_requests():
    """Makes huggingface_hub's HTTP clients bound every request by hub_timeout() (idempotent; reads the
    variable again at each call, so a test or a caller may change it)."""
    import huggingface_hub
    from huggingface_hub.utils import _http

    seconds = hub_timeout()

    def limit(request):  # runs before each request is sent: the transport reads the limits from here
        request.extensions["timeout"] = _bounded(request.extensions.get("timeout"), seconds)

    async def limit_async(request):
        limit(request)

    def client():
        made = _http.default_client_factory()
        made.event_hooks = {**made.event_hooks, "request": [*made.event_hooks["request"], limit]}
        return made

    def async_client():
        made = _http.default_async_client_factory()
        made.event_hooks = {**made.event_hooks, "request": [*made.event_hooks["request"], limit_async]}
        return made

    huggingface_hub.set_client_factory(client)  # closes the shared client, so the next request makes a bounded one
    huggingface_hub.set_async_client_factory(async_client)


def check_hub_answers():
    """Raises ConnectionError in at most hub_timeout() seconds when the hub does not answer one request: asked
    before a library (datasets) that would retry a silent hub five times with backoff, printing each retry."""
    import huggingface_hub
    from huggingface_hub import constants

    if constants.is_offline_mode():
        raise ConnectionError("HF_HUB_OFFLINE is set")
    bound_hub_requests()
    seconds = hub_timeout()
    try:
        huggingface_hub.get_session().head(constants.ENDPOINT, timeout=seconds)
    except (*transport_errors(), huggingface_hub.errors.OfflineModeIsEnabled) as e:
        raise ConnectionError(f"the hub ({constants.ENDPOINT}) did not answer within {seconds:g} s "
                              f"(${HUB_TIMEOUT_ENV}): {first_line(e)}") from None


@contextmanager
def quiet_hub_logs():
    """huggingface_hub's warnings (each retry of a request) silenced: the caller says what failed in one line."""
    logger = logging.getLogger("huggingface_hub")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)
