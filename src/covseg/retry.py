"""Bounded retries of registry and artifact-store calls on connection-level failures.

:func:`with_retries` retries a whole operation with jittered exponential backoff when
:func:`is_transient` recognises the error (a refused or dropped connection, a timeout, MLflow's
``TEMPORARILY_UNAVAILABLE``); any other error propagates at once.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from typing import TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")

_TRANSIENT_MLFLOW_CODES = {"TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED", "DEADLINE_EXCEEDED"}


def is_transient(exc: BaseException) -> bool:
    """True if ``exc`` (or anything in its cause/context chain) is a connection-level failure."""
    transient: list[type[BaseException]] = [ConnectionError, TimeoutError]
    try:
        import requests

        transient += [
            requests.exceptions.ConnectionError,
            requests.exceptions.Timeout,
            requests.exceptions.ChunkedEncodingError,
        ]
    except ImportError:  # pragma: no cover
        pass
    try:
        import urllib3

        transient += [
            urllib3.exceptions.ProtocolError,
            urllib3.exceptions.NewConnectionError,
            urllib3.exceptions.MaxRetryError,
            urllib3.exceptions.TimeoutError,
        ]
    except ImportError:  # pragma: no cover
        pass
    try:
        import botocore.exceptions as bx

        transient += [
            bx.ConnectionError,
            bx.ConnectionClosedError,
            bx.ReadTimeoutError,
            bx.ConnectTimeoutError,
        ]
    except ImportError:  # pragma: no cover
        pass
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, tuple(transient)):
            return True
        if getattr(cur, "error_code", None) in _TRANSIENT_MLFLOW_CODES:
            return True
        cur = cur.__cause__ or cur.__context__
    return False


def with_retries(
    fn: Callable[[], T],
    *,
    what: str,
    attempts: int = 4,
    base_delay_s: float = 0.5,
    max_delay_s: float = 8.0,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """Call ``fn``; on a transient (connection) error retry with jittered exponential backoff.

    Non-transient errors propagate at once. After ``attempts`` tries the last error propagates.
    Note that the MLflow REST client already retries each HTTP request itself
    (``MLFLOW_HTTP_REQUEST_MAX_RETRIES``); this loop adds retries around whole operations.
    """
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except Exception as exc:
            if attempt == attempts or not is_transient(exc):
                raise
            delay = min(max_delay_s, base_delay_s * 2 ** (attempt - 1)) * (0.5 + random.random() / 2)
            log.warning(
                "%s failed (attempt %d/%d, transient: %s); retrying in %.1f s",
                what,
                attempt,
                attempts,
                exc,
                delay,
            )
            sleep(delay)
    raise AssertionError("unreachable")  # pragma: no cover
