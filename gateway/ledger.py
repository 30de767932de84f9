"""Requests counted in this process while the store was down (``on_store_error: open``).

A fail-open decision still counts the request, here, per ``Slot``; the ledger writes those
counts to the store in the background as soon as it answers again (retrying every
``retry_every`` seconds, once a second by default, even if no request comes to trigger it) and
at shutdown. A request taken back (the upstream never received it) is subtracted here, whether
its count still waits here or was written already: the subtraction is written like a count.

Each write counts once, whatever the timing. A write the store did not answer in time may
still run there (a paused Redis runs what sits in its socket buffers when it wakes) while the
ledger sends it again; so every write has an id of its own that it keeps across retries, and
the store's script remembers the ids that ran (``store/lua/ledger_write.lua``). A write that
waits is never changed: counts made meanwhile go into a new write. The writes of one slot are
made in order, each once the store confirmed the one before, so a subtraction never reaches
the store before the count it takes back.

Each write carries when the earliest of its requests was served. A store that comes back
without the workspace a count was made for, or with one created after that (Redis lost
keygate's data: restarted without persistence, FLUSHDB, an older backup restored, and the
workspace created again with that id), takes nothing: the script drops the count rather than
let another workspace of that id inherit it. The ledger says so in one error line, at most
every ``DROPPED_SAID_EVERY`` seconds, with how many requests were dropped. For a key deleted
meanwhile, the workspace's counters take the count and the key's do not: the requests were
forwarded (``store/lua/_held_for.lua``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Callable, NamedTuple, Protocol

from .errors import StoreError
from .store.request import NO_KEY, NO_WORKSPACE, Slot
from .usage import MonthCache

log = logging.getLogger("keygate.proxy")
store_log = logging.getLogger("keygate.store")  # where the store's lost data is said

RETRY_EVERY = 1.0  # seconds between attempts to write local counts to the store (default)
DROPPED_SAID_EVERY = 60.0  # counts the store dropped are said at most this often (seconds)
FIRST_KEPT = 3600.0  # how long the ledger knows when it first counted in a slot (seconds)


class UsageWriter(Protocol):
    """The store side the ledger writes to (``gateway.store.request.RequestStore``)."""

    async def add_usage(self, slot: Slot, n: int, ttl: int, write_id: str,
                        since: float | None = None) -> int: ...


class Write(NamedTuple):
    """Requests of one slot on their way to the store, under an id they keep until it
    confirms the write."""
    id: str
    slot: Slot
    n: int  # negative: requests taken back
    since: float  # when the earliest of them was served (epoch s)


class LocalLedger:
    """Per-slot request counts not yet in the store."""

    def __init__(self, store: UsageWriter, months: MonthCache,
                 clock: Callable[[], float], *, retry_every: float = RETRY_EVERY) -> None:
        self.store = store
        self.months = months
        self.clock = clock
        self.retry_every = retry_every  # seconds between write attempts while counts wait
        # (workspace, key, month, day) → requests counted (negative: taken back) in no write yet
        self.counts: dict[Slot, int] = {}
        self.since: dict[Slot, float] = {}  # by slot in counts: its earliest request's time
        # by slot: when this ledger first counted a request there (kept FIRST_KEPT seconds
        # after its counts were written): what a take-back of one of them is written as of
        self._first: dict[Slot, float] = {}
        self.pending: dict[str, Write] = {}  # by id, in order: sent until the store confirms
        self._tag, self._seq = os.urandom(6).hex(), 0  # write ids unique across processes
        self._writer: asyncio.Task | None = None
        self._retry: asyncio.Task | None = None
        self._closing = False  # close() writes what is here; no retry loop starts any more
        # requests the store dropped (their workspace, or only their key, gone) and not yet
        # said, by workspace; and when the last line about them was said
        self._dropped: dict[str, int] = {}
        self._dropped_keys: dict[str, int] = {}
        self._dropped_said = -float("inf")

    def __bool__(self) -> bool:
        """Whether anything waits for the store."""
        return bool(self.counts or self.pending)

    def add(self, slot: Slot) -> None:
        """Count one request in ``slot``, and make sure a retry loop will write it."""
        now = self.clock()
        self._first.setdefault(slot, now)
        self._count(slot, 1, now)

    def take_back(self, slot: Slot) -> None:
        """Un-count one request this ledger counted in ``slot``: here while its count waits,
        else by writing the subtraction. The subtraction is written as of when this ledger
        first counted in ``slot`` (a request the store counted: now), so it takes nothing
        from a workspace created after the count it takes back (the store dropped that
        count: lua/_held_for.lua)."""
        first = self._first.get(slot)
        self._count(slot, -1, self.clock() if first is None else first)

    def _count(self, slot: Slot, n: int, at: float) -> None:
        n += self.counts.get(slot, 0)
        if n:
            self.counts[slot] = n
            if at < self.since.get(slot, at + 1):
                self.since[slot] = at
        else:
            del self.counts[slot]
            self.since.pop(slot, None)
        if not self._closing and (self._retry is None or self._retry.done()):
            self._retry = asyncio.ensure_future(self._retry_flush())

    def flush(self) -> None:
        """Write what waits, in the background. The counts become writes with ids of their
        own; while a write is under way they stay here, for the next flush."""
        if self._writer is not None and not self._writer.done():
            return
        # A slot with a write still pending keeps its new counts here, in one number, until
        # the store confirms that write: a write per slot and flush would grow the ledger by
        # every slot in use each retry for as long as the store is down (and each was sent
        # one round trip at a time once it was back).
        waiting = {write.slot for write in self.pending.values()}
        if self._first:
            old = self.clock() - FIRST_KEPT  # no request lives that long: none to take back
            self._first = {slot: at for slot, at in self._first.items()
                           if at > old or slot in self.counts or slot in waiting}
        kept: dict[Slot, int] = {}
        for slot, n in self.counts.items():
            if slot in waiting:
                kept[slot] = n
                continue
            self._seq += 1
            write = Write(f"{self._tag}-{self._seq}", slot, n, self.since.pop(slot))
            self.pending[write.id] = write
        self.counts = kept
        if self.pending:
            # a task nobody references can be garbage-collected mid-way: kept in _writer
            self._writer = asyncio.ensure_future(self._write())

    async def _retry_flush(self) -> None:
        while self:
            await asyncio.sleep(self.retry_every)
            self.flush()
            if self._writer is not None:  # cancelling this loop spares the writer
                await asyncio.wait((self._writer,))

    async def _write(self) -> None:
        now = self.clock()
        ttl = self.months.get(now).counter_ttl(now)
        failed: set[Slot] = set()
        for write in list(self.pending.values()):
            if write.slot in failed:
                continue  # a slot's writes stay in order: this one waits for the one before
            try:
                written = await self.store.add_usage(write.slot, write.n, ttl, write.id,
                                                     write.since)
            except StoreError:
                failed.add(write.slot)  # kept, id and all: sent again at the next flush
            else:
                del self.pending[write.id]
                if write.n > 0 and written in (NO_WORKSPACE, NO_KEY):
                    dropped = self._dropped if written == NO_WORKSPACE else self._dropped_keys
                    ws = write.slot.workspace
                    dropped[ws] = dropped.get(ws, 0) + write.n
        if self._dropped or self._dropped_keys:
            self._say_dropped()

    def _say_dropped(self, *, now: float | None = None) -> None:
        """Say the requests the store dropped since the last such line, at most every
        ``DROPPED_SAID_EVERY`` seconds (once a write pass ended, so a pass is one line):
        an error when a workspace is gone or another of its id was created since (Redis lost
        data); only when keys are gone (deleted meanwhile), that their requests counted for
        their workspaces only, as information."""
        now = time.monotonic() if now is None else now
        if now - self._dropped_said < DROPPED_SAID_EVERY:
            return
        self._dropped_said = now
        lost, keys = self._dropped, self._dropped_keys
        self._dropped, self._dropped_keys = {}, {}
        if lost:
            first = next(iter(lost))
            n = sum(lost.values())
            store_log.error(
                "%d request%s served while the store was down %s not written to the usage: "
                "workspace '%s'%s is no longer in the store, or was created again after they "
                "were served: Redis lost data (restarted without persistence, FLUSHDB or "
                "FLUSHALL, keys evicted under maxmemory, or an older backup restored). Nothing "
                "was counted for them (a workspace created again with that id starts from 0)",
                n, "" if n == 1 else "s", "was" if n == 1 else "were", first,
                f" (and {len(lost) - 1} more)" if len(lost) > 1 else "")
        if keys:
            first = next(iter(keys))
            n = sum(keys.values())
            store_log.info(
                "%d request%s served while the store was down %s counted for workspace "
                "'%s'%s but not for the key%s they were served with: deleted meanwhile",
                n, "" if n == 1 else "s", "was" if n == 1 else "were", first,
                f" (and {len(keys) - 1} more)" if len(keys) > 1 else "",
                "" if n == 1 else "s")

    async def close(self) -> None:
        """At shutdown, after the listeners stopped: write what is still here (a process that
        stops must not take its share of the month with it). A take-back that comes later (a
        late store reply, during the rest of the shutdown) is not written."""
        self._closing = True
        if self._retry is not None and not self._retry.done():
            self._retry.cancel()
            await asyncio.gather(self._retry, return_exceptions=True)
        if self._writer is not None:  # the write under way
            await asyncio.gather(self._writer, return_exceptions=True)
        self.flush()  # then everything left, once
        if self._writer is not None:
            await asyncio.gather(self._writer, return_exceptions=True)
        # counts kept behind writes the store just confirmed (while another slot's write may
        # still fail: that one must not hold back the slots the store now takes)
        waiting = {write.slot for write in self.pending.values()}
        if any(slot not in waiting for slot in self.counts):
            self.flush()
            await asyncio.gather(self._writer, return_exceptions=True)
        if self._dropped or self._dropped_keys:  # held back by the rate: said before stopping
            self._say_dropped(now=float("inf"))
        if self:
            log.warning("the store is unavailable: %d requests counted while it was down "
                        "(net of those taken back) were not written to the monthly usage",
                        sum(self.counts.values()) + sum(w.n for w in self.pending.values()))
