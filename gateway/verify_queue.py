"""Who runs the next cold-path verification: a bounded, fair queue in front of argon2.

A verification (read the key, argon2 its secret) runs only while it holds one of ``slots``
turns. Verifications waiting for a turn queue instead of being refused, bounded per client IP
(``keys.verify_queue.per_ip``) and in total (``keys.verify_queue.total``); past either bound
the request is answered 503 ``overloaded`` with ``Retry-After: 1`` (never one whose token
already verified in this process: its turn is outside the bounds). Turns are handed out
round-robin across client IPs, so one address with a long queue cannot delay every other
address's first request by its whole queue.

The argon2 work itself runs on ``gateway.argon2_pool``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from typing import AsyncIterator

from .errors import ServiceUnavailable


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
    async def turn(self, ip: str, bounded: bool = True) -> AsyncIterator[None]:
        """``bounded`` False: a caller outside the bounds (a token verified in this process
        whose ``keys.cache_ttl`` ran out, bounded by the verification cache itself): never
        refused, counted in neither bound, it waits for a turn round-robin as others do."""
        if not bounded:
            await self._acquire(ip)
            try:
                yield
            finally:
                self._release()
            return
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
            elif fut in waiters:  # else a hand-over (resize, _release) in the same turn of the
                # loop popped it, cancelled, and passed the turn on: nothing of it is left
                waiters.remove(fut)
                if not waiters:
                    del self._waiters[ip]
                    self._ring.remove(ip)
            raise

    def resize(self, slots: int) -> None:
        """``slots`` turns from now on (the argon2 pool resized to a new CPU limit): more
        are handed to waiters at once; fewer are freed as the turns held end."""
        self.slots = slots
        while self.busy < self.slots and self._hand_over():
            self.busy += 1

    def _release(self) -> None:
        """Hand the turn to the first waiter of the next IP in the ring, or free it (and keep
        it free while more turns are held than there are now: ``resize``)."""
        if self.busy > self.slots or not self._hand_over():
            self.busy -= 1

    def _hand_over(self) -> bool:
        """Give a turn to the first waiter of the next IP in the ring; False if none waits."""
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
                return True
        return False
