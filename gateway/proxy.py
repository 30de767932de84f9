"""Forwarding an allowed request to its upstream, streaming both ways.

One keep-alive connection pool (``aiohttp.ClientSession`` + ``TCPConnector``) per upstream. The
request goes out with the method, raw path and raw query exactly as received (no re-quoting:
the path was checked canonical by ``gateway.routes`` and the upstream must see the same bytes
the routes were matched on).

Request header hygiene, in one pass over the client's headers:

- hop-by-hop headers (``Connection``, ``Keep-Alive``, ``Proxy-Connection``, ``TE``,
  ``Trailer``, ``Transfer-Encoding``, ``Upgrade``, ``Proxy-Authorization``,
  ``Proxy-Authenticate``) and every header ``Connection`` names are dropped. The headers keygate
  sets are added after this filtering, so ``Connection`` can never remove one of them;
- keygate's credential headers (``config.keys.headers``) are dropped, and ``Authorization``
  when it is the ``Bearer`` credential (on a public route, only when it carries a keygate token:
  an upstream doing its own auth still gets its own ``Authorization``);
- client-sent identity headers are dropped whatever their case, however often repeated, and
  in the ``_`` spelling (``X_Workspace_Id``) that CGI/WSGI-style upstreams read as the same
  header. All header-name comparisons here map ``_`` to ``-``;
- ``X-Forwarded-*`` and ``Forwarded`` from the client are dropped unless the peer is in
  ``server.trusted_proxies``; from a trusted peer they are kept and the peer is appended to
  ``X-Forwarded-For`` (its ``X-Forwarded-Proto``/``-Host`` are kept when present);
- ``Host`` is the upstream's host (like nginx's default ``proxy_set_header Host $proxy_host``):
  the client's ``Host`` goes to ``X-Forwarded-Host``;
- ``Expect: 100-continue`` is answered by keygate itself (``100 Continue`` is sent to the client
  only once the request is allowed and about to stream), so it is not forwarded;
- the client's ``X-Request-Id`` is replaced by the request id (the pipeline already adopted the
  client's when it was sane);
- everything else passes as sent, in order, repeats included.

Response headers: hop-by-hop and ``Connection``-named ones are dropped, the rest pass (repeats
such as ``Set-Cookie`` included); the pipeline's ``RateLimit`` fields and ``X-Request-Id`` are
set. Bodies are never decompressed or buffered whole.

WebSocket/``Upgrade`` is not proxied (``Upgrade`` is hop-by-hop and dropped).

Two upstream clients sit behind the same header rules: ``client="lean"`` (the default,
``gateway.upstream.UpstreamPool``: httptools parsing over a plain ``asyncio.Protocol``, 3-5x
less CPU per request, see PERFORMANCE.md) and ``client="aiohttp"`` (``ClientSession``). The
test suite runs every forwarding test against both.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import re
import ssl
import time
from typing import AsyncIterator, Callable, Mapping

import aiohttp
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from .config import Config, Upstream
from .errors import BadGateway, GatewayError, GatewayTimeout, PayloadTooLarge
from .models import Principal
from .tokens import looks_like_token
from .upstream import (UpstreamConnectError, UpstreamPool, UpstreamProtocolError,
                       UpstreamTimeout)

log = logging.getLogger("keygate.proxy")

HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding",
    "upgrade", "proxy-authorization", "proxy-authenticate",
})
_HOP_BY_HOP_BYTES = frozenset(n.encode() for n in HOP_BY_HOP)
_NO_BODY_STATUS = frozenset({204, 304})
_SKIP_AUTO = ("User-Agent", "Accept", "Accept-Encoding", "Content-Type")
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
# Control characters a header value may not carry (RFC 9110 5.5: HTAB is the only one allowed):
# CR/LF would split the lean client's request head, NUL and the rest get it refused upstream.
_CTL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


def _norm(name: str) -> str:
    """Header name for comparison: lower case, ``_`` read as ``-``."""
    name = name.lower()
    return name.replace("_", "-") if "_" in name else name


class _BodyState:
    __slots__ = ("too_large",)

    def __init__(self) -> None:
        self.too_large = False


def _trusting(upstream: Upstream) -> ssl.SSLContext | None:
    """The TLS context trusting ``upstream.ca_file`` (instead of the system store), if set."""
    return ssl.create_default_context(cafile=upstream.ca_file) if upstream.ca_file else None


class Forwarder:
    """Forwards requests to upstreams; one keep-alive pool per upstream."""

    def __init__(self, config: Config, *, client: str = "lean") -> None:
        if client not in ("lean", "aiohttp"):
            raise ValueError(f"unknown upstream client {client!r} (lean | aiohttp)")
        self.client = client
        self._pools: dict[str, tuple[UpstreamPool, str, str]] = {}  # name → pool, base, Host
        self._sessions: dict[str, aiohttp.ClientSession] = {}
        self._bases: dict[str, str] = {}
        self._retiring: set[asyncio.Task] = set()
        self._settle(config)
        # Called with (upstream name, seconds from sending to the response headers) for each
        # upstream answer; the app wires it to keygate_upstream_duration_seconds.
        self.on_upstream: Callable[[str, float], None] | None = None

    def _settle(self, config: Config) -> None:
        self.config = config
        self.max_body = config.server.max_body_bytes
        ident = config.identity_headers
        self._identity = tuple(n for n in ident.names())
        # Dropped from every request whatever the route (names normalised with _norm).
        always = set(HOP_BY_HOP)
        always.update(_norm(n) for n in ident.names())
        always.update(_norm(h) for h in config.keys.headers)
        always.update(("host", "expect", "x-request-id"))
        self._drop = frozenset(always)
        self._trusted = tuple(ipaddress.ip_network(p.strip(), strict=False)
                              for p in config.server.trusted_proxies)
        self._trust_cache: dict[str, bool] = {}
        self._prefix = config.keys.prefix

    # --- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        for upstream in self.config.upstreams.values():
            if self.client == "lean":
                self._pool(upstream)
            else:
                self._session(upstream)

    def reconfigure(self, config: Config) -> None:
        """Take ``config`` for the next request (a reload). The pool of an upstream that was
        removed or changed is taken out of use now and closed once its requests are done;
        requests already forwarding finish on it."""
        old = self.config.upstreams
        self._settle(config)
        for name, before in old.items():
            if config.upstreams.get(name) == before:
                continue
            pool = self._pools.pop(name, None)
            session = self._sessions.pop(name, None)
            self._bases.pop(name, None)
            task = asyncio.ensure_future(self._retire(pool and pool[0], session, before))
            self._retiring.add(task)
            task.add_done_callback(self._retiring.discard)

    async def _retire(self, pool: UpstreamPool | None, session, upstream: Upstream) -> None:
        loop = asyncio.get_running_loop()
        # Bounded: a response that streams for ever must not keep an old pool open for ever.
        deadline = loop.time() + max(60.0, 4 * upstream.timeout)
        try:
            while pool is not None and pool.active and loop.time() < deadline:
                await asyncio.sleep(0.25)
            if session is not None:  # aiohttp's session shows no in-flight count to wait on
                await asyncio.sleep(min(deadline - loop.time(), upstream.timeout + 1))
        finally:
            if pool is not None:
                await pool.close()
            if session is not None:
                await session.close()

    async def close(self) -> None:
        for task in list(self._retiring):
            task.cancel()
        await asyncio.gather(*self._retiring, return_exceptions=True)
        sessions, self._sessions = self._sessions, {}
        for session in sessions.values():
            await session.close()
        pools, self._pools = self._pools, {}
        for pool, _, _ in pools.values():
            await pool.close()

    def _pool(self, upstream: Upstream) -> tuple[UpstreamPool, str, str]:
        entry = self._pools.get(upstream.name)
        if entry is None:
            url = URL(upstream.url)
            pool = UpstreamPool(str(url.origin()), connect_timeout=upstream.timeout,
                                ssl_context=_trusting(upstream))
            entry = (pool, url.raw_path.rstrip("/"), url.host_port_subcomponent or url.host or "")
            self._pools[upstream.name] = entry
        return entry

    def _session(self, upstream: Upstream) -> aiohttp.ClientSession:
        session = self._sessions.get(upstream.name)
        if session is None or session.closed:
            connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=30,
                                             enable_cleanup_closed=False,
                                             ssl=_trusting(upstream) or True)
            t = upstream.timeout
            session = aiohttp.ClientSession(
                connector=connector, auto_decompress=False,
                cookie_jar=aiohttp.DummyCookieJar(), skip_auto_headers=_SKIP_AUTO,
                # connect: pool wait + TCP/TLS connect; sock_read: from the end of the request
                # body to the response headers, then the longest silence while streaming.
                timeout=aiohttp.ClientTimeout(total=None, connect=t, sock_connect=t,
                                              sock_read=t),
                trust_env=False, raise_for_status=False)
            self._sessions[upstream.name] = session
            url = URL(upstream.url)
            base = str(url.origin()) + url.raw_path.rstrip("/")
            self._bases[upstream.name] = base
        return session

    # --- the request -------------------------------------------------------------------------

    def _is_trusted(self, peer: str | None) -> bool:
        if not self._trusted or peer is None:
            return False
        trusted = self._trust_cache.get(peer)
        if trusted is None:
            try:
                ip = ipaddress.ip_address(peer)
                trusted = any(ip in net for net in self._trusted)
            except ValueError:
                trusted = False
            if len(self._trust_cache) > 10000:
                self._trust_cache.clear()
            self._trust_cache[peer] = trusted
        return trusted

    def request_headers(self, request: web.BaseRequest, principal: Principal | None,
                        request_id: str, *, framing: bool = True) -> list[tuple[str, str]]:
        """The headers to send upstream (see the module docstring for the rules).

        ``framing=False`` also leaves out ``Content-Length`` (the lean client frames the body
        itself)."""
        headers = request.headers
        named: frozenset[str] | set[str] = frozenset()
        connection = headers.getall("Connection", None)
        if connection:
            named = {_norm(t.strip()) for v in connection for t in v.split(",") if t.strip()}
        peer = request.remote
        trusted = self._is_trusted(peer)
        drop = self._drop
        out: list[tuple[str, str]] = []
        xff: list[str] = []
        xf_proto = xf_host = None
        for name, value in headers.items():
            lname = _norm(name)
            if lname in drop or lname in named:
                continue
            if not framing and lname == "content-length":
                continue
            if lname.startswith("x-forwarded-") or lname == "forwarded":
                if not trusted:
                    continue
                if lname == "x-forwarded-for":
                    xff.append(value)
                    continue
                if lname == "x-forwarded-proto":
                    xf_proto = value
                elif lname == "x-forwarded-host":
                    xf_host = value
            elif lname == "authorization":
                # any whitespace after the scheme (RFC 9110 allows HTAB): "Bearer\t<token>"
                # on a public route must not carry a keygate token upstream
                parts = value.split(None, 1)
                if parts and parts[0].lower() == "bearer" and (
                        principal is not None
                        or (len(parts) == 2 and looks_like_token(parts[1].strip(), self._prefix))):
                    continue
            out.append((name, value))
        xff.append(peer or "unknown")
        out.append(("X-Forwarded-For", ", ".join(xff)))
        if xf_proto is None:
            out.append(("X-Forwarded-Proto", request.scheme))
        if xf_host is None:
            host = headers.get("Host")
            if host is not None:
                out.append(("X-Forwarded-Host", host))
        out.append(("X-Request-Id", request_id))
        if principal is not None:
            ws, kid, scopes, plan = self._identity
            values = (principal.workspace, principal.key_id, " ".join(sorted(principal.scopes)),
                      principal.plan)
            # store data: never let it split the request head (one search for all four)
            if _CTL.search(f"{values[0]}|{values[1]}|{values[2]}|{values[3]}") is not None:
                raise ValueError("identity value with a control character")
            out.append((ws, values[0]))
            out.append((kid, values[1]))
            out.append((scopes, values[2]))
            out.append((plan, values[3]))
        return out

    async def _limited(self, request: web.BaseRequest,
                       state: _BodyState) -> AsyncIterator[bytes]:
        """A chunked request body, stopped as soon as it grows past ``max_body_bytes``."""
        total, limit = 0, self.max_body
        async for chunk in request.content.iter_any():
            total += len(chunk)
            if total > limit:
                state.too_large = True
                raise PayloadTooLarge(self._too_large_message())
            yield chunk

    def _too_large_message(self) -> str:
        return f"The request body is larger than the limit of {self.max_body} bytes."

    async def forward(self, request: web.BaseRequest, upstream: Upstream,
                      principal: Principal | None, request_id: str,
                      response_headers: Mapping[str, str]) -> web.StreamResponse:
        """Send ``request`` to ``upstream`` and stream its answer back.

        Raises ``PayloadTooLarge`` (413), ``BadGateway`` (502) or ``GatewayTimeout`` (504)
        while no response has started; once it has, an upstream failure aborts the client
        connection (a truncated body must not look complete)."""
        if self.client == "lean":
            return await self._forward_lean(request, upstream, principal, request_id,
                                            response_headers)
        session = self._session(upstream)
        state = _BodyState()
        data = None
        if request.body_exists:
            length = request.content_length
            if length is not None:
                if length > self.max_body:
                    raise PayloadTooLarge(self._too_large_message())
                data = request.content
            else:
                data = self._limited(request, state)
            if request.version >= (1, 1) and \
                    request.headers.get("Expect", "").lower() == "100-continue":
                await request.writer.write(_CONTINUE)
                request.writer.output_size = 0
        headers = self.request_headers(request, principal, request_id)
        url = URL(self._bases[upstream.name] + request.raw_path, encoded=True)
        started = time.perf_counter()
        try:
            resp = await session.request(request.method, url, headers=headers, data=data,
                                         allow_redirects=False, compress=None)
        except asyncio.TimeoutError:
            if state.too_large:
                raise PayloadTooLarge(self._too_large_message()) from None
            raise GatewayTimeout(f"The upstream '{upstream.name}' did not answer within "
                                 f"{upstream.timeout:g} seconds.") from None
        except (aiohttp.ClientError, OSError, ValueError) as exc:
            if state.too_large:
                raise PayloadTooLarge(self._too_large_message()) from None
            log.warning("upstream %s failed: %s", upstream.name, type(exc).__name__)
            error = BadGateway(f"The upstream '{upstream.name}' is unavailable.")
            error.not_forwarded = isinstance(exc, aiohttp.ClientConnectorError)
            raise error from None
        if self.on_upstream is not None:
            self.on_upstream(upstream.name, time.perf_counter() - started)
        try:
            return await self._stream_back(request, resp, request_id, response_headers,
                                           upstream)
        finally:
            resp.release()

    async def _stream_back(self, request: web.BaseRequest, resp: aiohttp.ClientResponse,
                           request_id: str, response_headers: Mapping[str, str],
                           upstream: Upstream) -> web.StreamResponse:
        named: frozenset[str] | set[str] = frozenset()
        connection = resp.headers.getall("Connection", None)
        if connection:
            named = {_norm(t.strip()) for v in connection for t in v.split(",") if t.strip()}
        out: CIMultiDict[str] = CIMultiDict()
        for name, value in resp.headers.items():
            lname = name.lower()
            if lname in HOP_BY_HOP or lname in named:
                continue
            out.add(name, value)
        for name, value in response_headers.items():
            out[name] = value
        out["X-Request-Id"] = request_id
        response = web.StreamResponse(status=resp.status, reason=resp.reason, headers=out)
        try:
            await response.prepare(request)
            if request.method == "HEAD" or resp.status in _NO_BODY_STATUS:
                await response.write_eof()
                return response
            async for chunk in resp.content.iter_any():
                await response.write(chunk)
        except ConnectionError:       # the client went away: drop the upstream connection too
            resp.close()
            return response
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            log.warning("upstream %s failed mid-response: %s", upstream.name,
                        type(exc).__name__)
            resp.close()
            transport = request.transport
            if transport is not None:
                transport.abort()     # never let a truncated body look complete
            return response
        await response.write_eof()
        return response

    # --- the lean client ---------------------------------------------------------------------

    async def _forward_lean(self, request: web.BaseRequest, upstream: Upstream,
                            principal: Principal | None, request_id: str,
                            response_headers: Mapping[str, str]) -> web.StreamResponse:
        pool, base, host = self._pool(upstream)
        body = None
        length = None
        if request.body_exists:
            length = request.content_length
            content = request.content
            if length is not None:
                if length > self.max_body:
                    raise PayloadTooLarge(self._too_large_message())
                body = content.readany
            else:
                body = self._limited_source(content)
            if request.version >= (1, 1) and \
                    request.headers.get("Expect", "").lower() == "100-continue":
                await request.writer.write(_CONTINUE)
                request.writer.output_size = 0
        headers = self.request_headers(request, principal, request_id, framing=False)
        parts = [f"{request.method} {base}{request.raw_path} HTTP/1.1\r\nHost: {host}"]
        for name, value in headers:
            parts.append(f"{name}: {value}")
        if body is None and request.content_length == 0:
            parts.append("Content-Length: 0")  # as sent: a POST without it may get a 411
        head = "\r\n".join(parts).encode("utf-8", "surrogateescape")
        is_head = request.method == "HEAD"
        started = time.perf_counter()
        try:
            resp = await pool.request(head, body=body, content_length=length,
                                      timeout=upstream.timeout, is_head=is_head)
        except GatewayError:
            raise
        except UpstreamTimeout:
            raise GatewayTimeout(f"The upstream '{upstream.name}' did not answer within "
                                 f"{upstream.timeout:g} seconds.") from None
        except (UpstreamConnectError, UpstreamProtocolError, OSError, ValueError) as exc:
            log.warning("upstream %s failed: %s", upstream.name, type(exc).__name__)
            error = BadGateway(f"The upstream '{upstream.name}' is unavailable.")
            error.not_forwarded = isinstance(exc, UpstreamConnectError)
            raise error from None
        except Exception as exc:  # the client's body failed (client gone mid-upload)
            log.info("request body failed while forwarding to %s: %s", upstream.name,
                     type(exc).__name__)
            raise BadGateway(f"The request to upstream '{upstream.name}' failed.") from None
        if self.on_upstream is not None:
            self.on_upstream(upstream.name, time.perf_counter() - started)
        return await self._stream_back_lean(request, resp, request_id, response_headers,
                                            upstream, is_head)

    def _limited_source(self, content):
        """A chunked request body as a lean-client body source, capped at max_body_bytes."""
        total = 0
        limit = self.max_body
        readany = content.readany

        async def read() -> bytes:
            nonlocal total
            chunk = await readany()
            total += len(chunk)
            if total > limit:
                raise PayloadTooLarge(self._too_large_message())
            return chunk
        return read

    async def _stream_back_lean(self, request: web.BaseRequest, resp, request_id: str,
                                response_headers: Mapping[str, str], upstream: Upstream,
                                is_head: bool) -> web.StreamResponse:
        named: set[bytes] = set()
        for raw_name, raw_value in resp.headers:
            if raw_name.lower() == b"connection":
                named.update(t.strip().lower() for t in raw_value.split(b",") if t.strip())
        out: CIMultiDict[str] = CIMultiDict()
        for raw_name, raw_value in resp.headers:
            lname = raw_name.lower()
            if lname in _HOP_BY_HOP_BYTES or lname in named:
                continue
            out.add(raw_name.decode("latin-1"), raw_value.decode("utf-8", "surrogateescape"))
        for name, value in response_headers.items():
            out[name] = value
        out["X-Request-Id"] = request_id
        status = resp.status
        if is_head or status in _NO_BODY_STATUS:
            resp.release()
            response = web.StreamResponse(status=status, headers=out)
            await response.prepare(request)
            await response.write_eof()
            return response
        whole = resp.body_if_complete()
        if whole is not None:  # the common small case: one write, exact Content-Length
            out.popall("Content-Length", None)
            return web.Response(status=status, body=whole, headers=out)
        response = web.StreamResponse(status=status, headers=out)
        chunks = resp.chunks()
        timeout = upstream.timeout
        try:
            await response.prepare(request)
            while True:
                try:
                    async with asyncio.timeout(timeout):
                        chunk = await anext(chunks)
                except StopAsyncIteration:
                    break
                await response.write(chunk)
        except ConnectionError:       # the client went away: drop the upstream connection too
            return response
        except (UpstreamProtocolError, TimeoutError, OSError) as exc:
            log.warning("upstream %s failed mid-response: %s", upstream.name,
                        type(exc).__name__)
            transport = request.transport
            if transport is not None:
                transport.abort()     # never let a truncated body look complete
            return response
        finally:
            # any way out but the end of the body (client gone, cancelled, upstream failed):
            # the upstream connection is closed, never left open or pooled half-read
            await chunks.aclose()
            resp.close()
        await response.write_eof()
        return response
