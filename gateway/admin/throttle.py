"""Wrong operator tokens, bounded per client IP with the failed-verification throttle's limits.

A wrong operator token is a failed verification like a wrong API key, held to the same limits
(``keys.failures.per_ip`` per ``window_seconds``) and counted in Redis so that every worker
shares one client's budget: ``kg:fail:operator:<ip>``, its own counter beside the key path's
``kg:fail:ip:<ip>``. Not the key path's counter: wrong API keys from an address (an
integration left with a stale key, every key after a Redis restarted empty) would then lock
out the operator who shares it (the CLI on the gateway's host, an office NAT), at the very
moment the admin API is needed to fix them. A guesser thus gets ``per_ip`` tries at keys and
``per_ip`` at the operator token per window, each bounded.

Over the limit, every operator-token attempt from that client is 429 ``too_many_failures``
with ``Retry-After``, *the right token too*: the refusal is decided before the token is
compared, else a guesser over the limit would still learn which guess was right (a 200 among
429s) and the bound would bound nothing.

The decision reads nothing from the store: the admin API must let the operator in while Redis
is down or stalled (``/admin/v1/reload`` to fix a store URL; reading the count before each
comparison held every operator call, a reload included, for ``store.timeout`` when Redis
stalled). It is made from what this process knows of the client:

- the wrong tokens it saw itself in the window, counted the moment each is seen;
- the shared count, as the write of its own last wrong token answered it (every other
  worker's before it included).

A client's next attempt waits while one of its wrong tokens is still being written, so each
comparison is decided on the count the previous one left: concurrent guesses are compared one
after another, ``per_ip`` of them per window in one process. What the design allows past the
shared limit: a worker that has not written a failure of the client since the limit was
reached by the others compares one more guess, whose write answers the count; so at most one
per worker and window. With the store down, the process's own count alone bounds (``per_ip``
per process and window).

What it costs: nothing for the right token (no store call), one write per wrong token, and for
a refusal the counter's reset instant, read once per client and window: refusals of one client
while that read is under way wait for it rather than each sending their own. Nothing on the proxy
listener.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from ..errors import StoreError, TooManyRequests
from ..trust import throttle_client

if TYPE_CHECKING:
    from ..auth import Authenticator

log = logging.getLogger("keygate.admin")

CLIENTS_KEPT = 4096
"""Clients this process remembers (their failures, the shared count, their last warning).
Past it, those whose window ended go; a client still in its window is never forgotten (with
the store down its count here is the only bound): new clients then share one count,
:data:`OVERFLOW`'s."""

OVERFLOW = "*"
"""The one count of the clients past CLIENTS_KEPT still in their window."""

SWEEP_EVERY = 1.0
"""Seconds between two sweeps of ended clients while the table is full (a sweep reads it all)."""


class _Client:
    """What this process knows of one client (its throttle address) in the current window."""

    __slots__ = ("failures", "resets_at", "shared", "shared_until", "reset_read", "writing",
                 "reading")

    def __init__(self) -> None:
        self.failures, self.resets_at = 0, 0.0   # its own count, and when its window ends
        self.shared, self.shared_until = 0, 0.0  # the store's count, and until when it holds
        self.reset_read = False  # shared_until is the counter's own reset (read), not a bound
        self.writing: asyncio.Future | None = None  # a wrong token of it being written
        self.reading: asyncio.Task | None = None  # its counter's reset being read (refusals)


class OperatorThrottle:
    """Admits a client to an operator-token comparison (:meth:`admit`) and counts a wrong
    token (:meth:`failed`). Limits are read from ``auth.config`` each time, so a reload of
    ``keys.failures`` applies to the next attempt."""

    def __init__(self, auth: "Authenticator") -> None:
        self.auth = auth
        self._clients: dict[str, _Client] = {}
        self._warned: dict[str, float] = {}  # client -> until when its refusal was logged
        self._swept_at = float("-inf")

    def _slot(self, client: str) -> str:
        """The throttle address of ``client``, or OVERFLOW when this process already keeps
        CLIENTS_KEPT clients still in their window and ``client`` is not one of them."""
        ip = throttle_client(client)
        if ip in self._clients or len(self._clients) < CLIENTS_KEPT:
            return ip
        now = time.monotonic()
        if now - self._swept_at >= SWEEP_EVERY:
            self._swept_at = now
            for gone in [k for k, c in self._clients.items()
                         if c.writing is None and max(c.resets_at, c.shared_until) <= now]:
                del self._clients[gone]
        return ip if len(self._clients) < CLIENTS_KEPT else OVERFLOW

    async def admit(self, client: str) -> None:
        """Nothing when ``client`` may try a token; else 429 ``too_many_failures``."""
        ip = self._slot(client)
        while True:
            known = self._clients.get(ip)
            if known is None:
                return
            limits = self.auth.config.keys.failures
            now = time.monotonic()
            # a reload may have shortened the window since either began
            known.resets_at = min(known.resets_at, now + limits.window_seconds)
            known.shared_until = min(known.shared_until, now + limits.window_seconds)
            own = known.failures if now < known.resets_at else 0
            shared = known.shared if now < known.shared_until else 0
            if own >= limits.per_ip or shared >= limits.per_ip:
                await self._refuse(client, ip, known, own >= limits.per_ip,
                                   shared >= limits.per_ip)
            if known.writing is None:
                return
            # its last wrong token is being written: decide on the count that write answers
            await asyncio.shield(known.writing)

    async def failed(self, client: str) -> None:
        """Count one wrong token from ``client``: here at once, then in the store, whose
        answer is the shared count (a store that cannot take it leaves it counted here)."""
        ip = self._slot(client)
        limits = self.auth.config.keys.failures
        now = time.monotonic()
        known = self._clients.get(ip)
        if known is None:
            known = self._clients[ip] = _Client()
        if ip == OVERFLOW:  # counted here only: the store's count is of one address
            if known.resets_at <= now:
                known.failures, known.resets_at = 0, now + limits.window_seconds
            known.failures += 1
            return
        if known.resets_at <= now:
            known.failures, known.resets_at = 0, now + limits.window_seconds
        known.failures += 1
        written = known.writing = asyncio.get_running_loop().create_future()
        try:
            shared = await self.auth.requests.record_operator_failure(ip, limits.window_seconds)
        except StoreError:
            pass  # counted here; the store's count misses it, as the key path's would
        else:  # the counter's window ends at most a whole window from now (read if refused)
            if shared < known.shared or time.monotonic() >= known.shared_until:
                known.reset_read = False  # a new window of the counter's
            known.shared = shared
            if not known.reset_read:
                known.shared_until = time.monotonic() + limits.window_seconds
        finally:
            if known.writing is written:
                known.writing = None
            written.set_result(None)

    async def _refuse(self, client: str, ip: str, known: _Client, over_own: bool,
                      over_shared: bool) -> None:
        limits = self.auth.config.keys.failures
        now = time.monotonic()
        wait = 1
        if over_own:
            wait = max(wait, -int(-(known.resets_at - now) // 1))
        if over_shared:  # when the store's counter resets: read once per window and client
            if not known.reset_read:
                # one read for every refusal of the client meanwhile (a burst of guesses
                # made as many store calls as it had requests); shielded: a caller that
                # leaves does not cancel it for the others
                if known.reading is None:
                    known.reading = asyncio.ensure_future(
                        self._read_reset(ip, known, limits.window_seconds))
                await asyncio.shield(known.reading)
            wait = max(wait, -int(-(known.shared_until - now) // 1))
        wait = min(wait, limits.window_seconds)
        if self._warned.get(ip, 0.0) <= now:
            self._keep_room(self._warned)
            self._warned[ip] = now + wait
            log.warning("admin: refusing operator-token attempts from %s for %d s: %d failed "
                        "authentications within keys.failures.window_seconds (%d s)",
                        client, wait, limits.per_ip, limits.window_seconds)
        raise TooManyRequests("Too many failed attempts with a wrong token from this address; "
                              "wait before trying again.", code="too_many_failures",
                              headers={"Retry-After": str(wait)})

    async def _read_reset(self, ip: str, known: _Client, window_seconds: int) -> None:
        """Bound ``known.shared_until`` by when the store's counter of ``ip`` resets."""
        try:
            ms = await self.auth.requests.operator_failures_reset_ms(ip, window_seconds)
        except StoreError:  # the window from the last write's answer stands, and is not
            ms = None        # asked again this window (each refusal would wait)
        finally:
            known.reading = None
        known.reset_read = True
        if ms is not None:
            at = time.monotonic() + (window_seconds if ms == -1 else max(ms, 0) / 1000)
            known.shared_until = min(known.shared_until, at)

    @staticmethod
    def _keep_room(warned: dict[str, float]) -> None:
        """Room for one more logged client: those whose quiet time ended go first, then the
        oldest (it only costs a log line more)."""
        if len(warned) < CLIENTS_KEPT:
            return
        now = time.monotonic()
        for ip in [ip for ip, until in warned.items() if until <= now]:
            del warned[ip]
        while len(warned) >= CLIENTS_KEPT:
            del warned[next(iter(warned))]
