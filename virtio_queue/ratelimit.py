"""Rate-limited logging, so that a hostile guest or front-end cannot flood the journal.

STYLE.md §5: nothing logs in the per-descriptor loop; guest-triggered warnings are
rate-limited per queue.  A :class:`RateLimiter` allows ``burst`` messages per
``interval`` seconds for each key and counts what it suppressed, reporting the count
with the next message that gets through.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Hashable

__all__ = ["RateLimiter"]


class RateLimiter:
    """Token bucket per key for log messages."""

    def __init__(self, burst: int = 10, interval: float = 1.0) -> None:
        self._burst = burst
        self._interval = interval
        # key -> [window start, messages in window, suppressed since last report]
        self._state: dict[Hashable, list[float]] = {}

    def log(
        self,
        logger: logging.Logger,
        level: int,
        key: Hashable,
        msg: str,
        *args: object,
    ) -> bool:
        """Log ``msg % args`` unless ``key`` exceeded its budget; return whether it was logged."""
        now = time.monotonic()
        st = self._state.get(key)
        if st is None:
            if len(self._state) > 4096:  # bound the table itself against key churn
                self._state.clear()
            st = self._state[key] = [now, 0.0, 0.0]
        if now - st[0] >= self._interval:
            st[0], st[1] = now, 0.0
        if st[1] >= self._burst:
            st[2] += 1
            return False
        st[1] += 1
        if st[2]:
            logger.log(level, msg + " (%d similar messages suppressed)", *args, int(st[2]))
            st[2] = 0.0
        else:
            logger.log(level, msg, *args)
        return True
