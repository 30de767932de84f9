"""Bounded waits for a shutdown: a step that does not end in time is logged and left, and the
shutdown goes on with the next one.

Not ``asyncio.wait_for``: past its timeout, that cancels the awaitable and then waits for it to
end, with no bound; and on Python < 3.12 it swallows a cancellation that arrives once what it
waits for is done (it returns that result instead: cpython gh-86296). redis-py writes every
command under ``wait_for`` (its socket timeout), so a task cancelled at that instant goes on as
if it had not been: a loop that runs until cancelled (the Sentinel client's master check) then
runs for ever, and a close that waited for it hung the gateway's stop (seen once in a CI run).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Awaitable

log = logging.getLogger("keygate")

# Seconds each step of closing a store client may take (its connections closed, a background
# task stopped). redis-py bounds closing a connection by the store timeout (default 2 s).
CLOSE_STEP_TIMEOUT = 3.0
# Seconds between two cancellations of a task that goes on after one (see ``stop``).
CANCEL_AGAIN_EVERY = 0.05


async def bounded(awaitable: Awaitable[Any], timeout: float, what: str | None) -> bool:
    """Await ``awaitable`` for at most ``timeout`` seconds. True when it ended (what it raised
    is raised); False when it did not: it is then cancelled and not waited for, and - unless
    ``what`` is None (the caller logs) - a warning names ``what``. A cancellation of the caller
    cancels it too."""
    task = asyncio.ensure_future(awaitable)
    try:
        await asyncio.wait((task,), timeout=timeout)
    except asyncio.CancelledError:
        task.cancel()
        raise
    if not task.done():
        task.cancel()
        task.add_done_callback(_consume)
        if what is not None:
            log.warning("shutdown: %s did not end within %g s; left unfinished", what, timeout)
        return False
    task.result()
    return True


async def stop(task: asyncio.Future, timeout: float, what: str) -> bool:
    """Cancel ``task`` and wait for it to end, for at most ``timeout`` seconds: cancelled again
    every ``CANCEL_AGAIN_EVERY`` while it runs on (a cancellation ``asyncio.wait_for`` swallowed;
    the next one reaches the task at its next wait). False, with a warning naming ``what``, when
    it still runs: it is left. What the task raised is not raised."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not task.done():
        left = deadline - loop.time()
        if left <= 0:
            task.add_done_callback(_consume)
            log.warning("shutdown: %s did not stop within %g s; left running", what, timeout)
            return False
        task.cancel()
        await asyncio.wait((task,), timeout=min(left, CANCEL_AGAIN_EVERY))
    _consume(task)
    return True


def _consume(task: asyncio.Future) -> None:
    """Retrieve the task's exception, so that asyncio does not log it as never retrieved."""
    if not task.cancelled():
        task.exception()
