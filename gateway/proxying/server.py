"""The listeners' low-level aiohttp server: SPEC's JSON errors for requests aiohttp's parser
refuses, and the edge limits aiohttp lacks (a whole request head within
``server.timeouts.header``, at most ``server.max_connections`` client connections).

aiohttp offers no public hook for either, so this module subclasses its ``RequestHandler`` and
reads some of its private attributes (``_manager``, ``_loop``, ``_request_in_progress``,
``_messages``, ``_request_count``, ``_connections``, ``_kwargs``). They are used here and
nowhere else, so an aiohttp upgrade that moves them breaks one module (and
tests/test_edge_*.py say so).
"""

from __future__ import annotations

import asyncio
import logging
import uuid

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from ..errors import BadRequest, GatewayError

log = logging.getLogger("keygate")


class _JsonErrorRequestHandler(RequestHandler):
    """aiohttp answers requests its HTTP parser refuses (ambiguous framing, bad header
    syntax) itself, as text; keygate's contract is a JSON body for every error.

    It also holds the edge's limits that aiohttp lacks (``server.timeouts.header`` and
    ``server.max_connections``); idle keep-alive is aiohttp's own ``keepalive_timeout``."""

    # loop time the current request head started arriving (None: no head under way); the
    # server's sweep closes the connection once it is older than server.timeouts.header
    _head_since: float | None = None
    _last_payload = None  # the body stream of the newest request parsed on this connection

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        server = self._manager
        limit = getattr(server, "max_connections", None)
        if limit is not None and len(server.connections) > limit:
            # over the bound: refused at once, so idle or slow clients cannot take the file
            # descriptors that the upstream and store connections need
            server.refused_connections += 1
            transport.abort()
            return
        if getattr(server, "header_timeout", None):
            self._head_since = self._loop.time()   # the first head is due from now
            server.sweep_heads()

    def data_received(self, data: bytes) -> None:
        if data and self._head_since is None and not self._request_in_progress \
                and not self._messages \
                and (self._last_payload is None or self._last_payload.is_eof()):
            # the first bytes of the next request head (not the rest of a body that aiohttp
            # reads after a handler that did not read it)
            self._head_since = self._loop.time()
        seen = self._request_count
        super().data_received(data)
        if self._request_count != seen:
            self._head_since = None
            if self._messages:
                self._last_payload = self._messages[-1][1]

    def head_overdue(self, deadline: float) -> bool:
        """No whole request head since before ``deadline`` (a slow-loris, a stalled client)."""
        since = self._head_since
        return since is not None and since < deadline and not self._request_in_progress \
            and not self._messages and self.transport is not None

    def handle_error(self, request, status=500, exc=None, message=None):
        if status >= 500:
            self.log_exception("error handling request", exc_info=exc)
            error = GatewayError("Internal error.")
        else:  # the client's fault: no traceback in the log, no parser detail on the wire
            log.debug("refused a malformed request from %s: %s", request.remote, exc)
            error = BadRequest("The request is not valid HTTP/1.1.", status=status)
        response = error.response(uuid.uuid4().hex)
        response.force_close()
        return response


class ProxyServer(web.Server):
    """A low-level aiohttp server whose parser errors are SPEC's JSON errors. The proxy
    listener uses it directly (one handler, no router); the admin listener via AdminRunner.

    ``header_timeout``: seconds for a whole request head; ``max_connections``: open client
    connections beyond which a new one is closed at once (None: no bound)."""

    def __init__(self, handler, *, header_timeout: float | None = None,
                 max_connections: int | None = None, **kwargs) -> None:
        super().__init__(handler, **kwargs)
        self.header_timeout = header_timeout
        self.max_connections = max_connections
        self.refused_connections = 0
        self._sweeper: asyncio.Task | None = None

    def sweep_heads(self) -> None:
        """Make sure the header-timeout sweep runs while there are connections. One task per
        server checks every connection a few times per timeout, instead of a timer armed and
        cancelled for every request."""
        if self._sweeper is None or self._sweeper.done():
            self._sweeper = self._loop.create_task(self._sweep())

    async def _sweep(self) -> None:
        timeout = self.header_timeout
        every = min(1.0, timeout / 4)
        while self._connections:
            await asyncio.sleep(every)
            deadline = self._loop.time() - timeout
            for handler in list(self._connections):
                if handler.head_overdue(deadline):
                    handler.force_close()  # closes the transport

    async def shutdown(self, timeout: float | None = None) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
        await super().shutdown(timeout)

    def __call__(self) -> RequestHandler:
        return _JsonErrorRequestHandler(self, loop=self._loop, **self._kwargs)


class AdminRunner(web.AppRunner):
    """``web.AppRunner`` for the admin app, with JSON answers to unparseable requests too."""

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        return ProxyServer(server.request_handler, request_factory=server.request_factory,
                           loop=server._loop, **server._kwargs)
