"""Requests counted in this process while the store was down (``on_store_error: open``).

A fail-open decision still counts the request, here, per ``Slot``; the ledger writes those
counts to the store in the background as soon as it answers again (retrying every
``retry_every`` seconds, once a second by default, even if no request comes to trigger it) and
at shutdown. A request the upstream never received is taken back from the ledger while its
count is still here.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Callable, Protocol

from .errors import StoreError
from .store.request import Slot
from .usage import MonthCache

log = logging.getLogger("keygate.proxy")

RETRY_EVERY = 1.0  # seconds between attempts to write local counts to the store (default)


class UsageWriter(Protocol):
    """The store side the ledger writes to (``gateway.store.request.RequestStore``)."""

    async def add_usage(self, slot: Slot, n: int, ttl: int) -> int: ...


class LocalLedger:
    """Per-slot request counts not yet in the store."""

    def __init__(self, store: UsageWriter, months: MonthCache,
                 clock: Callable[[], float], *, retry_every: float = RETRY_EVERY) -> None:
        self.store = store
        self.months = months
        self.clock = clock
        self.retry_every = retry_every  # seconds between write attempts while counts wait
        self.counts: dict[Slot, int] = {}  # (workspace, key, month, day) → requests
        self._flushes: set[asyncio.Task] = set()
        self._retry: asyncio.Task | None = None

    def __bool__(self) -> bool:
        """Whether any count waits for the store."""
        return bool(self.counts)

    def add(self, slot: Slot) -> None:
        """Count one request in ``slot``, and make sure a retry loop will write it."""
        self.counts[slot] = self.counts.get(slot, 0) + 1
        if self._retry is None or self._retry.done():
            self._retry = asyncio.ensure_future(self._retry_flush())

    def take_back(self, slot: Slot) -> bool:
        """Un-count one request of ``slot``; False when its count already went to the store
        (the caller refunds it there)."""
        n = self.counts.get(slot, 0)
        if n > 1:
            self.counts[slot] = n - 1
        elif n == 1:
            del self.counts[slot]
        return n > 0

    def flush(self) -> None:
        """Write the counts to the store, in the background. They are taken out of the ledger
        first, so concurrent flushes never write one twice, and put back when the store fails
        again, so none is lost."""
        counts, self.counts = self.counts, {}
        task = asyncio.ensure_future(self._write(counts))
        self._flushes.add(task)  # a task nobody references can be garbage-collected mid-way
        task.add_done_callback(self._flushes.discard)

    async def _retry_flush(self) -> None:
        while self.counts:
            await asyncio.sleep(self.retry_every)
            if self.counts:
                self.flush()  # a tracked task: cancelling this loop spares it
                await asyncio.wait(set(self._flushes))

    async def _write(self, counts: dict[Slot, int]) -> None:
        now = self.clock()
        ttl = self.months.get(now).counter_ttl(now)
        for slot, n in counts.items():
            try:
                await self.store.add_usage(slot, n, ttl)
            except StoreError:
                self.counts[slot] = self.counts.get(slot, 0) + n

    async def close(self) -> None:
        """At shutdown, after the listeners stopped: write what is still here (a process that
        stops must not take its share of the month with it)."""
        if self._retry is not None and not self._retry.done():
            self._retry.cancel()
            await asyncio.gather(self._retry, return_exceptions=True)
        if self._flushes:
            await asyncio.gather(*self._flushes, return_exceptions=True)
        if self.counts:
            counts, self.counts = self.counts, {}
            await self._write(counts)
        if self.counts:
            log.warning("the store is unavailable: %d requests counted while it was down were "
                        "not written to the monthly usage", sum(self.counts.values()))
