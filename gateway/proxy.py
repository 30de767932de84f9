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
- ``traceparent`` is always keygate's own (``gateway.tracing``), ``tracestate`` passes only with
  a trace keygate continued; the client's copy of the signature header
  (``identity_signature.header``, default ``X-Keygate-Signature``) is always dropped, and
  keygate's own set last when signing is on (``gateway.signature``);
- everything else passes as sent, in order, repeats included.

Response headers: hop-by-hop and ``Connection``-named ones are dropped, the rest pass (repeats
such as ``Set-Cookie`` included); the pipeline's ``RateLimit`` fields and ``X-Request-Id`` are
set. Bodies are never decompressed or buffered whole.

WebSocket/``Upgrade`` is not proxied (``Upgrade`` is hop-by-hop and dropped).

The upstream client is ``gateway.upstream.UpstreamPool`` (httptools parsing over a plain
``asyncio.Protocol``: 3-5x less CPU per request than aiohttp's ClientSession, as measured
with the probes behind ``bench/``). Request bodies go upstream byte for byte as the client sent them (the proxy
listener never decodes a ``Content-Encoding``), framed exactly as declared.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import ssl
import time
from typing import Callable, Mapping

from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from .config import Config, Upstream
from .errors import BadGateway, GatewayError, GatewayTimeout, RequestTimeout, body_too_large
from .models import Principal
from .signature import DEFAULT_HEADER as SIGNATURE_HEADER, secrets_of, sign
from .tracing import Trace, Tracer
from .tokens import looks_like_token
from .trust import TrustedProxies
from .upstream import (BodyFramingError, UpstreamConnectError, UpstreamPool,
                       UpstreamProtocolError, UpstreamTimeout, UpstreamUnreached)

log = logging.getLogger("keygate.proxy")

HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding",
    "upgrade", "proxy-authorization", "proxy-authenticate",
})
_HOP_BY_HOP_BYTES = frozenset(n.encode() for n in HOP_BY_HOP)
_NO_BODY_STATUS = frozenset({204, 304})
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
# Control characters a header value may not carry (RFC 9110 5.5: HTAB is the only one allowed):
# CR/LF would split the lean client's request head, NUL and the rest get it refused upstream.
_CTL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


def _norm(name: str) -> str:
    """Header name for comparison: lower case, ``_`` read as ``-``."""
    name = name.lower()
    return name.replace("_", "-") if "_" in name else name


PREFETCH = 64 * 1024  # request body bytes read before an upstream connection is taken


class ClientBodyFailed(Exception):
    """The client's request body could not be read: the client went away mid-upload."""


async def _prefetched(source, limit: int):
    """``source`` with its first ``limit`` bytes (all of a smaller body) already read."""
    chunks: list[bytes] = []
    size, ended = 0, False
    while size < limit:
        chunk = await source()
        if not chunk:
            ended = True
            break
        chunks.append(chunk)
        size += len(chunk)
    chunks.reverse()

    async def read() -> bytes:
        if chunks:
            return chunks.pop()
        return b"" if ended else await source()
    return read


def _trusting(upstream: Upstream) -> ssl.SSLContext | None:
    """The TLS context trusting ``upstream.ca_file`` (instead of the system store), if set."""
    return ssl.create_default_context(cafile=upstream.ca_file) if upstream.ca_file else None


_TRACE_ONLY = Tracer()


class Forwarder:
    """Forwards requests to upstreams; one keep-alive pool per upstream."""

    def __init__(self, config: Config) -> None:
        self._pools: dict[str, tuple[UpstreamPool, str, str]] = {}  # name → pool, base, Host
        self._retiring: set[asyncio.Task] = set()
        self._settle(config)
        # Called with (upstream name, seconds from sending to the response headers) for each
        # upstream answer; the app wires it to keygate_upstream_duration_seconds.
        self.on_upstream: Callable[[str, float], None] | None = None

    def _settle(self, config: Config) -> None:
        self.config = config
        self.max_body = config.server.max_body_bytes
        self.body_timeout = config.server.timeouts.body
        ident = config.identity_headers
        self._identity = tuple(n for n in ident.names())
        # Dropped from every request whatever the route (names normalised with _norm).
        always = set(HOP_BY_HOP)
        always.update(_norm(n) for n in ident.names())
        always.update(_norm(h) for h in config.keys.headers)
        always.update(("host", "expect", "x-request-id", "traceparent", "tracestate"))
        signing = config.identity_signature
        self._sign_header = signing.header if signing else SIGNATURE_HEADER
        # the default name too: an upstream still checking it must never read a client's copy
        always.update((_norm(self._sign_header), _norm(SIGNATURE_HEADER)))
        self._sign_secret: bytes | None = None
        if signing is not None:
            secrets = secrets_of(os.environ.get(signing.secret_env, ""))
            if not secrets:
                raise ValueError(f"identity_signature: environment variable "
                                 f"{signing.secret_env} holds no secret")
            self._sign_secret = secrets[0]
        self._drop = frozenset(always)
        self.trusted = TrustedProxies(config.server.trusted_proxies)
        self._prefix = config.keys.prefix

    # --- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        for upstream in self.config.upstreams.values():
            self._pool(upstream)

    def reconfigure(self, config: Config) -> None:
        """Take ``config`` for the next request (a reload). The pool of an upstream that was
        removed or changed is taken out of use now and closed once its requests are done;
        requests already forwarding finish on it."""
        old = self.config.upstreams
        self._settle(config)
        for name, before in old.items():
            if config.upstreams.get(name) == before:
                continue
            entry = self._pools.pop(name, None)
            if entry is None:
                continue
            task = asyncio.ensure_future(self._retire(entry[0], before))
            self._retiring.add(task)
            task.add_done_callback(self._retiring.discard)

    @staticmethod
    async def _retire(pool: UpstreamPool, upstream: Upstream) -> None:
        loop = asyncio.get_running_loop()
        # Bounded: a response that streams for ever must not keep an old pool open for ever.
        deadline = loop.time() + max(60.0, 4 * upstream.timeout)
        try:
            while pool.active and loop.time() < deadline:
                await asyncio.sleep(0.25)
        finally:
            await pool.close()

    async def close(self) -> None:
        for task in list(self._retiring):
            task.cancel()
        await asyncio.gather(*self._retiring, return_exceptions=True)
        pools, self._pools = self._pools, {}
        for pool, _, _ in pools.values():
            await pool.close()

    def _pool(self, upstream: Upstream) -> tuple[UpstreamPool, str, str]:
        entry = self._pools.get(upstream.name)
        if entry is None:
            url = URL(upstream.url)
            pool = UpstreamPool(str(url.origin()), connect_timeout=upstream.timeout,
                                ssl_context=_trusting(upstream),
                                max_connections=upstream.max_connections)
            entry = (pool, url.raw_path.rstrip("/"), url.host_port_subcomponent or url.host or "")
            self._pools[upstream.name] = entry
        return entry

    # --- the request -------------------------------------------------------------------------

    def request_headers(self, request: web.BaseRequest, principal: Principal | None,
                        request_id: str, *, target: str | None = None,
                        trace: Trace | None = None) -> list[tuple[str, str]]:
        """The headers to send upstream (see the module docstring for the rules), without
        ``Content-Length``: the upstream writer frames the body itself. ``target`` is the
        request line's path and query as sent upstream (what the signature covers); ``trace``
        the request's trace context (read from the request when not given)."""
        headers = request.headers
        named: frozenset[str] | set[str] = frozenset()
        connection = headers.getall("Connection", None)
        if connection:
            named = {_norm(t.strip()) for v in connection for t in v.split(",") if t.strip()}
        peer = request.remote
        trusted = self.trusted.is_trusted(peer)
        drop = self._drop
        out: list[tuple[str, str]] = []
        xff: list[str] = []
        xf_proto = xf_host = None
        for name, value in headers.items():
            lname = _norm(name)
            if lname in drop or lname in named:
                continue
            if lname == "content-length":  # the writer frames the body itself
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
        if trace is None:
            trace = _TRACE_ONLY.start(request)
        out.append(("traceparent", trace.traceparent()))
        for value in trace.tracestate:
            out.append(("tracestate", value))
        values = ("", "", "", "")
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
        if self._sign_secret is not None:
            out.append((self._sign_header, sign(
                self._sign_secret, request.method,
                request.raw_path if target is None else target, request_id, *values)))
        return out

    def _body_source(self, content, length: int | None):
        """The request body as the upstream writer's chunk source.

        A chunked body is judged against ``max_body_bytes`` as it streams (a declared length
        was judged before); a body that stalls for ``server.timeouts.body`` ends the request
        with 408. Both are keygate's own refusals: the writer then closes the upstream
        connection before the request is complete upstream."""
        readany, at_eof = content.readany, content.is_eof
        limit, stall = self.max_body, self.body_timeout
        total = 0

        async def read() -> bytes:
            nonlocal total
            try:
                if at_eof():  # all of it is buffered: nothing to wait for
                    chunk = await readany()
                else:
                    async with asyncio.timeout(stall):
                        chunk = await readany()
            except TimeoutError:
                raise RequestTimeout(f"The request body stalled for {stall:g} seconds.") \
                    from None
            except Exception as exc:  # the client went away mid-upload (ConnectionResetError)
                raise ClientBodyFailed(type(exc).__name__) from exc
            if length is None:
                total += len(chunk)
                if total > limit:
                    raise body_too_large(limit)
            return chunk
        return read

    async def forward(self, request: web.BaseRequest, upstream: Upstream,
                      principal: Principal | None, request_id: str,
                      response_headers: Mapping[str, str], *,
                      trace: Trace | None = None) -> web.StreamResponse:
        """Send ``request`` to ``upstream`` and stream its answer back.

        Raises ``PayloadTooLarge`` (413), ``RequestTimeout`` (408), ``BadGateway`` (502) or
        ``GatewayTimeout`` (504) while no response has started (each says whether the upstream
        may have received the request); once a response has started, an upstream failure
        aborts the client connection (a truncated body must not look complete)."""
        pool, base, host = self._pool(upstream)
        body = None
        length = None
        if request.body_exists:
            length = request.content_length
            if length is not None and length > self.max_body:
                raise body_too_large(self.max_body)
            body = self._body_source(request.content, length)
            if request.version >= (1, 1) and \
                    request.headers.get("Expect", "").lower() == "100-continue":
                await request.writer.write(_CONTINUE)
                request.writer.output_size = 0
        target = base + request.raw_path
        headers = self.request_headers(request, principal, request_id, target=target,
                                       trace=trace)
        parts = [f"{request.method} {target} HTTP/1.1\r\nHost: {host}"]
        for name, value in headers:
            parts.append(f"{name}: {value}")
        if body is None and request.content_length == 0:
            parts.append("Content-Length: 0")  # as sent: a POST without it may get a 411
        head = "\r\n".join(parts).encode("utf-8", "surrogateescape")
        is_head = request.method == "HEAD"
        started = time.perf_counter()
        try:
            if body is not None:
                # no upstream connection is taken before the first PREFETCH bytes (all of a
                # small body) are here: clients trickling bodies cannot hold the upstream's
                # connections
                body = await _prefetched(body, PREFETCH)
            resp = await pool.request(head, body=body, content_length=length,
                                      timeout=upstream.timeout, is_head=is_head)
        except GatewayError:  # the body source's own: 413, 408
            raise
        except ClientBodyFailed as exc:
            log.info("the client went away while sending its body to %s: %s", upstream.name,
                     exc)
            raise BadGateway(f"The request to upstream '{upstream.name}' failed: its body "
                             "did not arrive.", reached_upstream=False) from None
        except UpstreamTimeout as exc:
            raise GatewayTimeout(f"The upstream '{upstream.name}' did not answer within "
                                 f"{upstream.timeout:g} seconds.",
                                 reached_upstream=not isinstance(exc, UpstreamUnreached)) \
                from None
        except (UpstreamConnectError, UpstreamProtocolError, OSError, ValueError) as exc:
            log.warning("upstream %s failed: %s: %s", upstream.name, type(exc).__name__, exc)
            raise BadGateway(f"The upstream '{upstream.name}' is unavailable.",
                             reached_upstream=not isinstance(
                                 exc, (UpstreamConnectError, BodyFramingError))) from None
        except Exception as exc:
            log.warning("forwarding to %s failed: %s: %s", upstream.name, type(exc).__name__,
                        exc)
            raise BadGateway(f"The request to upstream '{upstream.name}' failed.") from None
        if self.on_upstream is not None:
            self.on_upstream(upstream.name, time.perf_counter() - started)
        return await self._stream_back(request, resp, request_id, response_headers,
                                       upstream, is_head)

    async def _stream_back(self, request: web.BaseRequest, resp, request_id: str,
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
        timeout, stall = upstream.timeout, self.body_timeout
        try:
            await response.prepare(request)
            while True:
                try:
                    async with asyncio.timeout(timeout):
                        chunk = await anext(chunks)
                except StopAsyncIteration:
                    break
                try:
                    async with asyncio.timeout(stall):
                        await response.write(chunk)
                except TimeoutError:  # not an upstream failure: the client stopped reading
                    log.info("client stopped reading a response from %s for %g s; closed",
                             upstream.name, stall)
                    if request.transport is not None:
                        request.transport.abort()
                    return response
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
