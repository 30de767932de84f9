"""Who runs the next cold-path verification: a bounded, fair queue in front of argon2.

A verification (read the key, argon2 its secret) runs only while it holds one of ``slots``
turns. Verifications waiting for a turn queue instead of being refused, bounded per client IP
(``keys.verify_queue.per_ip``) and in total (``keys.verify_queue.total``); past either bound
the request is answered 503 ``overloaded`` with ``Retry-After: 1``. Turns are handed out
round-robin across client IPs, so one address with a long queue cannot delay every other
address's first request by its whole queue.

The argon2 work itself runs on :func:`argon2_executor`: a bounded thread pool whose threads
have a higher nice value than the event loop's thread, so a cold burst takes CPU from argon2
first and cached keys keep their latency.

Each argon2 run mallocs ``memory_cost`` KiB (19 MiB by default) and frees it. Left to itself,
glibc keeps that memory for the life of the process in every thread that ran argon2 (the
argon2 threads, and asyncio's default executor threads that hash new keys): a thread has its
own malloc arena, the first free raises glibc's mmap threshold above the run's size, and
``malloc_trim`` never shrinks a thread's arena. ``keygate serve`` went from 56 to 115 MB RSS
after its first four verifications. :func:`one_malloc_arena` (called by ``serve`` before any
thread starts) has every thread allocate from the main arena, which
:func:`release_freed_memory` can return to the system; the gateway calls it every
``RELEASE_EVERY`` seconds. Runs in a burst still reuse the memory the previous run freed.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ctypes
import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import AsyncIterator

from .errors import ServiceUnavailable

log = logging.getLogger("keygate.auth")

ARGON2_NICE = 10  # added to the process's nice value for the argon2 threads (Linux)
RELEASE_EVERY = 10.0  # seconds between returns of freed memory to the system
_M_ARENA_MAX = -8     # glibc's mallopt() parameter number


def _c_library() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(None)  # the C library this process runs on
    except OSError:
        return None


_LIBC = _c_library()


def one_malloc_arena() -> None:
    """Every thread started after this allocates from glibc's main arena (see the module
    docstring). Elsewhere a no-op."""
    if (mallopt := getattr(_LIBC, "mallopt", None)) is not None:
        mallopt(_M_ARENA_MAX, 1)


def release_freed_memory() -> None:
    """Return the memory freed inside the main malloc arena to the system (glibc's
    ``malloc_trim``; well under a millisecond when there is little to return, ~2 ms after an
    argon2 run). Elsewhere a no-op."""
    if (trim := getattr(_LIBC, "malloc_trim", None)) is not None:
        trim(0)


async def release_freed_memory_every(seconds: float = RELEASE_EVERY) -> None:
    """Runs until cancelled (a task of the gateway's lifecycle). The trim runs on the default
    executor's thread, not the event loop's: it walks the heap (~2 ms after an argon2 run),
    and a foreign call through ctypes does not hold the GIL, so requests go on meanwhile."""
    loop = asyncio.get_running_loop()
    while True:
        await asyncio.sleep(seconds)
        await loop.run_in_executor(None, release_freed_memory)


def argon2_threads() -> int:
    """Threads of the argon2 pool: one per CPU this process may run on, at least 1, at most 4
    (each argon2 run takes ``memory_cost`` KiB, and beyond the CPUs more threads only queue
    inside the kernel). The CPUs it may run on, not the machine's: a gateway pinned to one
    CPU (taskset, a cpuset container) with a thread per machine CPU ran two argon2 threads
    beside its event loop, each weighing as much in the scheduler, so a cold burst took
    ~18% of the loop's core instead of ~10%."""
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        usable = os.cpu_count() or 1
    return max(1, min(4, usable))


def _lower_priority() -> None:
    """Thread initializer: raise this thread's nice value (on Linux a thread has its own; no
    privilege is needed to lower one's priority). Elsewhere a no-op."""
    try:
        tid = threading.get_native_id()
        current = os.getpriority(os.PRIO_PROCESS, tid)
        os.setpriority(os.PRIO_PROCESS, tid, min(19, current + ARGON2_NICE))
    except (AttributeError, OSError) as exc:  # not Linux, or a sandbox that forbids it
        log.debug("argon2 threads keep the default priority: %s", exc)


def argon2_executor(threads: int | None = None) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=threads or argon2_threads(),
                              thread_name_prefix="argon2", initializer=_lower_priority)


def overloaded() -> ServiceUnavailable:
    return ServiceUnavailable("Too many first requests are waiting for their keys to be "
                              "verified; retry in a moment.", code="overloaded",
                              headers={"Retry-After": "1"})


class VerifyQueue:
    """``async with queue.turn(ip): ...`` runs the body once one of ``slots`` turns is this
    caller's; raises 503 ``overloaded`` at once when the queue is full for ``ip`` or in
    total. Counts include the verifications holding a turn."""

    def __init__(self, slots: int, per_ip: int, total: int) -> None:
        self.slots, self.per_ip, self.total = slots, per_ip, total
        self.busy = 0                                       # turns held
        self.queued = 0                                     # callers holding or waiting
        self._by_ip: dict[str, int] = {}                    # the same, per client IP
        self._waiters: dict[str, collections.deque[asyncio.Future]] = {}
        self._ring: collections.deque[str] = collections.deque()  # IPs with waiters, in turn

    @contextlib.asynccontextmanager
    async def turn(self, ip: str) -> AsyncIterator[None]:
        n = self._by_ip.get(ip, 0)
        if n >= self.per_ip or self.queued >= self.total:
            raise overloaded()
        self._by_ip[ip] = n + 1
        self.queued += 1
        try:
            await self._acquire(ip)
            try:
                yield
            finally:
                self._release()
        finally:
            self.queued -= 1
            if (n := self._by_ip[ip] - 1) > 0:
                self._by_ip[ip] = n
            else:
                del self._by_ip[ip]

    async def _acquire(self, ip: str) -> None:
        if self.busy < self.slots and not self._ring:
            self.busy += 1
            return
        fut = asyncio.get_running_loop().create_future()
        waiters = self._waiters.get(ip)
        if waiters is None:
            waiters = self._waiters[ip] = collections.deque()
            self._ring.append(ip)
        waiters.append(fut)
        try:
            await fut  # resolved by _release: the turn was handed to us
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self._release()  # handed over just as we were cancelled: pass it on
            else:
                waiters.remove(fut)
                if not waiters:
                    del self._waiters[ip]
                    self._ring.remove(ip)
            raise

    def _release(self) -> None:
        """Hand the turn to the first waiter of the next IP in the ring, or free it."""
        while self._ring:
            ip = self._ring.popleft()
            waiters = self._waiters[ip]
            fut = waiters.popleft()
            if waiters:
                self._ring.append(ip)
            else:
                del self._waiters[ip]
            if not fut.done():
                fut.set_result(None)
                return
        self.busy -= 1
