"""Wrong operator tokens, bounded per client IP by the failed-verification throttle.

A wrong operator token is a failed verification like a wrong API key: it is counted in the
same per-IP counter (``kg:fail:ip:<ip>``, ``keys.failures.per_ip`` per ``window_seconds``), so
one client's budget is shared by every worker and by guesses at keys and at the operator
token alike. Over it, every operator-token attempt from that client is 429
``too_many_failures`` with ``Retry-After``, *the right token too*: the refusal is decided
before the token is compared, else a guesser over the limit would still learn which guess was
right (a 200 among 429s) and the bound would bound nothing.

The store holds the shared count, but the admin API must not need the store to let the
operator in (``/admin/v1/reload`` to fix a store URL, health checks by hand): when the count
cannot be read, this process's own count of the client's failures decides. It is kept always,
and counts a failure the moment it is seen (the store's count only once written), so that
concurrent wrong guesses, all reading the store before any of them is written, are compared
no more than ``per_ip`` times per process and window. Across ``--workers N`` processes a
burst can get at most ``per_ip`` comparisons into each before the shared count catches up.

What it costs: one read of the counter before each operator-token comparison (a GET on the
request path's store connection, the admin listener only), one write per wrong token. Nothing
on the proxy listener.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from ..errors import StoreError, TooManyRequests
from ..trust import throttle_client

if TYPE_CHECKING:
    from ..auth import Authenticator

log = logging.getLogger("keygate.admin")

CLIENTS_KEPT = 4096
"""Clients whose failures (and whose last warning) this process remembers; past it, those
whose window ended go first, then the oldest."""


class _Window:
    __slots__ = ("failures", "resets_at")

    def __init__(self, resets_at: float) -> None:
        self.failures, self.resets_at = 0, resets_at


class OperatorThrottle:
    """Admits a client to an operator-token comparison (:meth:`admit`) and counts a wrong
    token (:meth:`failed`). Limits are read from ``auth.config`` each time, so a reload of
    ``keys.failures`` applies to the next attempt."""

    def __init__(self, auth: "Authenticator") -> None:
        self.auth = auth
        self._windows: dict[str, _Window] = {}  # this process's failures per client, by window
        self._writing: dict[str, int] = {}      # failures seen but not yet in the store
        self._warned: dict[str, float] = {}     # client -> until when its refusal was logged

    async def admit(self, client: str) -> None:
        """Nothing when ``client`` may try a token; else 429 ``too_many_failures``."""
        ip = throttle_client(client)
        limits = self.auth.config.keys.failures
        try:
            stored, _ = await self.auth.requests.failure_counts(ip, None)
        except StoreError:
            stored = None  # the store is down: this process's own count decides
        now = time.monotonic()  # read after the await: failures seen meanwhile count
        window = self._windows.get(ip)
        if window is not None:  # a reload may have shortened the window since it began
            window.resets_at = min(window.resets_at, now + limits.window_seconds)
            if window.resets_at <= now:
                del self._windows[ip]
                window = None
        local = window.failures if window is not None else 0
        over_store = stored is not None and stored + self._writing.get(ip, 0) >= limits.per_ip
        over_local = local >= limits.per_ip
        if not (over_store or over_local):
            return
        wait = 1
        if over_local:
            wait = max(wait, -int(-(window.resets_at - now) // 1))
        if over_store:
            wait = max(wait, await self.auth.failures_reset_in(ip, None))
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

    async def failed(self, client: str) -> None:
        """Count one wrong token from ``client``: here at once, in the store as it is
        written (a store that cannot take it leaves it counted here only)."""
        ip = throttle_client(client)
        limits = self.auth.config.keys.failures
        now = time.monotonic()
        window = self._windows.get(ip)
        if window is None or window.resets_at <= now:
            self._windows.pop(ip, None)
            self._keep_room(self._windows)
            window = self._windows[ip] = _Window(now + limits.window_seconds)
        window.failures += 1
        self._writing[ip] = self._writing.get(ip, 0) + 1
        try:
            await self.auth.requests.record_failure(ip, None, limits.window_seconds)
        except StoreError:
            pass  # counted here; the store's count misses it, as the key path's would
        finally:
            if (n := self._writing[ip] - 1) > 0:
                self._writing[ip] = n
            else:
                del self._writing[ip]

    @staticmethod
    def _keep_room(remembered: dict) -> None:
        """Room for one more client: those whose window ended go first, then the oldest."""
        if len(remembered) < CLIENTS_KEPT:
            return
        now = time.monotonic()
        for ip in [ip for ip, value in remembered.items()
                   if (value.resets_at if isinstance(value, _Window) else value) <= now]:
            del remembered[ip]
        while len(remembered) >= CLIENTS_KEPT:
            del remembered[next(iter(remembered))]
