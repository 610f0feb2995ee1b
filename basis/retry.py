"""Transient storage errors: telling them from data errors, and retrying them.

pyarrow raises OSError both for a throttled S3 request and for an undecodable
Parquet footer; `is_transient` tells them apart by exception type, errno and
message, and `retry_transient` retries the first kind with exponential backoff
and jitter, raising `StorageError` (infrastructure, never bad data) when they
outlast the retries. Nothing here imports Ray, torch or pyarrow.
"""

from __future__ import annotations

import errno
import logging
import random
import re
import time
from collections.abc import Callable
from typing import TypeVar

from basis.errors import StorageError

logger = logging.getLogger(__name__)

T = TypeVar("T")

RETRY_ATTEMPTS = 6  # tries of one operation; the sleeps between them add up to 3-6 s
RETRY_BASE_DELAY = 0.2  # seconds before the second try; doubles each time
RETRY_MAX_DELAY = 10.0

# errno values that say "the path to the data failed", never "the data is bad". EIO is among
# them: on network mounts (NFS, FUSE over object stores) it is the generic transport error, and
# even on a local disk it says nothing about the bytes, so it must not become a data error.
_TRANSIENT_ERRNOS = frozenset(
    getattr(errno, name) for name in (
        "ETIMEDOUT", "EAGAIN", "EWOULDBLOCK", "EINTR", "EIO", "ESTALE", "EBUSY", "ECONNRESET",
        "ECONNABORTED", "ECONNREFUSED", "EPIPE", "ENETDOWN", "ENETUNREACH", "ENETRESET",
        "EHOSTDOWN", "EHOSTUNREACH",
    ) if hasattr(errno, name)
)
# How pyarrow words a transient failure of S3 (AWS SDK error names, curl codes), GCS
# (google-cloud-cpp status codes) and HDFS (Java exception names) in an OSError message.
_TRANSIENT_MESSAGE = re.compile(
    r"AWS Error (SLOW_DOWN|THROTTLING|REQUEST_TIMEOUT|SERVICE_UNAVAILABLE|INTERNAL_FAILURE|NETWORK_CONNECTION"
    r"|REQUEST_LIMIT_EXCEEDED|REQUEST_EXPIRED)\b"
    r"|\bHTTP (status|response code):? ?(408|429|5\d\d)\b"
    r"|\b(SlowDown|ServiceUnavailable|InternalError|RequestTimeout|Throttling(Exception)?|TooManyRequests"
    r"|RequestLimitExceeded|OperationAborted)\b"
    r"|curlCode: (6|7|18|28|35|52|55|56)\b"
    r"|\b(UNAVAILABLE|DEADLINE_EXCEEDED|RESOURCE_EXHAUSTED|ABORTED)\b"
    r"|\b(SocketTimeoutException|ConnectException|ConnectTimeoutException|NoRouteToHostException"
    r"|RetriableException|StandbyException)\b"
    r"|[Cc]onnection (reset|refused|aborted|closed)|[Bb]roken pipe|[Tt]imed out|[Tt]emporarily unavailable"
)
_NEVER_TRANSIENT = (FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError, NotADirectoryError)


class BrokenStream(StorageError):
    """A write stream broken by a transient error: redoing the whole file may succeed.

    Raised at once (a stream cannot be retried); `is_transient` counts it, so a
    `retry_transient` around code that rewrites the whole file redoes it.
    """


def is_transient(exc: BaseException) -> bool:
    """Whether `exc` is a storage failure that may go away on retry (never one about the data).

    pyarrow raises OSError for both a throttled request and, e.g., an undecodable Parquet
    footer, so the message decides: AWS/GCS/HDFS error names, HTTP 408/429/5xx, curl network
    codes, timeouts and resets, or a network errno. Missing files, denied access and
    everything that is not an OSError (ArrowInvalid, ...) are not transient.

    Example:
        >>> is_transient(OSError("AWS Error SLOW_DOWN during GetObject operation: Please reduce your request rate."))
        True
        >>> is_transient(OSError("Couldn't deserialize thrift: invalid data"))
        False
    """
    if isinstance(exc, BrokenStream):
        return True
    if isinstance(exc, StorageError) or isinstance(exc, _NEVER_TRANSIENT):
        return False
    if isinstance(exc, OSError):
        if isinstance(exc, (TimeoutError, ConnectionError)) or exc.errno in _TRANSIENT_ERRNOS:
            return True
        if _TRANSIENT_MESSAGE.search(str(exc)):
            return True
    cause = exc.__cause__
    return cause is not None and cause is not exc and is_transient(cause)


def backoff(attempt: int, base_delay: float = RETRY_BASE_DELAY, max_delay: float = RETRY_MAX_DELAY) -> float:
    """Seconds to sleep after failed try number `attempt` (1-based): exponential, with jitter."""
    return min(max_delay, base_delay * 2 ** (attempt - 1)) * random.uniform(0.5, 1.0)


def retry_transient(fn: Callable[[], T], *, what: str, attempts: int = RETRY_ATTEMPTS,
                    base_delay: float = RETRY_BASE_DELAY, max_delay: float = RETRY_MAX_DELAY) -> T:
    """Call `fn`, retrying transient storage errors with exponential backoff and jitter.

    Returns what `fn` returns; re-raises any other error unchanged. Raises `StorageError`
    (naming `what`) when transient errors outlast `attempts` tries.

    Example:
        >>> retry_transient(lambda: fs.get_file_info(path), what=f"listing {path}")  # doctest: +SKIP
    """
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except Exception as exc:
            if not is_transient(exc):
                raise
            if attempt == attempts:
                raise StorageError(f"{what}: still failing after {attempts} attempt(s): {exc}") from exc
            delay = backoff(attempt, base_delay, max_delay)
            logger.warning("%s failed (%s); retrying in %.2f s (attempt %d of %d)", what, exc, delay,
                           attempt + 1, attempts)
            time.sleep(delay)
    raise AssertionError("unreachable")  # the loop returns or raises
