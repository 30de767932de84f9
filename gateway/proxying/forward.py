"""Forwarding an allowed request to its upstream, streaming both ways.

One keep-alive connection pool (``gateway.proxying.upstream.UpstreamPool``) per upstream. The
request goes out with the method, raw path and raw query exactly as received (no re-quoting:
the path was checked canonical by ``gateway.routes`` and the upstream must see the same bytes
the routes were matched on).

What goes upstream of the client's headers, and back of the upstream's, is
``gateway.proxying.headers``; this module adds keygate's own: ``Host`` (the upstream's),
``X-Request-Id`` (the request id: the pipeline already adopted the client's when it was sane),
``traceparent`` (always keygate's own, ``gateway.tracing``; ``tracestate`` passes only with a
trace keygate continued), the identity headers, and the signature header last when signing is
on (``gateway.signature``). ``Expect: 100-continue`` is answered by keygate itself: ``100
Continue`` goes to the client only once the request is allowed and about to stream.

Response headers get the pipeline's ``RateLimit`` fields and ``X-Request-Id``. Bodies are never
decompressed or buffered whole.

``Upgrade`` is hop-by-hop and dropped, except on a route with ``websocket: true``, where a
WebSocket handshake goes through ``tunnel`` instead (``gateway.proxying.tunnel``).

The pool is keygate's own client (httptools parsing over a plain ``asyncio.Protocol``: 3-5x
less CPU per request than aiohttp's ClientSession, as measured with the probes behind
``bench/``). Request bodies go upstream byte for byte as the client sent them (the proxy
listener never decodes a ``Content-Encoding``), framed exactly as declared.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import ssl
import time
from typing import Callable, Iterable, Mapping

from aiohttp import web
from aiohttp.http_writer import HttpVersion11 as _HTTP11
from multidict import istr
from yarl import URL

from ..config import Config, Upstream
from ..cors import origin_of
from ..errors import (BadGateway, GatewayError, GatewayTimeout, RequestTimeout,
                      UploadSlotTimeout, body_cut_short, body_too_large, client_closed)
from ..models import Principal
from ..signature import secrets_of, sign
from ..tracing import Trace, Tracer
from ..trust import throttle_client
from .connection import (BodyFramingError, ClientGone, UploadShareFull, UploadSlotsFull,
                         UpstreamConnectError, UpstreamProtocolError, UpstreamResponse,
                         UpstreamTimeout, UpstreamUnreached)
from .headers import NotUtf8Headers, RequestHeaderRules, response_headers
from .upstream import UpstreamPool
from .response import WholeResponse, keep_header_bytes
from .server import continue_if_expected
from .tunnel import tunnel as run_tunnel

log = logging.getLogger("keygate.proxy")

_NO_BODY_STATUS = frozenset({204, 304})
_X_REQUEST_ID = istr("X-Request-Id")  # a str name is made an istr on every assignment
_CONTENT_LENGTH = istr("Content-Length")

PREFETCH = 64 * 1024  # request body bytes read before an upstream connection is taken,
PREFETCH_WAIT = 1.0   # or as many as came within this many seconds (a live body streams)


class _Unwatched:
    """Where a streamed answer notes its upstream wait when the server's connection handler
    is not keygate's (``server._JsonErrorRequestHandler.upstream_wait``): nobody ends it."""
    upstream_wait = None


class ClientBodyFailed(Exception):
    """The client's request body could not be read: the client went away mid-upload."""


async def _prefetched(source, limit: int, at_eof: Callable[[], bool], wait: float):
    """``source`` with its first ``limit`` bytes (all of a smaller body) already read, or as
    many as came within ``wait`` seconds, and whether the whole body is here: read to its end,
    or all of it received (``at_eof``: the client's whole body is buffered, so nothing the
    client does can slow the rest). A body all buffered already is read without a timer."""
    chunks: list[bytes] = []
    size, ended = 0, False

    async def fill() -> None:
        nonlocal size, ended
        while size < limit:
            chunk = await source()
            if not chunk:
                ended = True
                break
            chunks.append(chunk)
            size += len(chunk)

    if at_eof():
        await fill()
    else:
        # the wait is cancelled only inside the body source's read, before it takes a chunk
        # from the buffer (aiohttp's readany): no byte is lost, the rest streams from there
        try:
            async with asyncio.timeout(wait):
                await fill()
        except TimeoutError:
            pass
    chunks.reverse()
    complete = ended or at_eof()

    async def read() -> bytes:
        if chunks:
            return chunks.pop()
        return b"" if ended else await source()
    return read, complete


def _upload_owner(request: web.BaseRequest, principal: Principal | None,
                  client_of: Callable[[web.BaseRequest], str] | None) -> object:
    """Whose share of the upload slots an upload takes: its workspace (a str), or on a public
    route its client address (a tuple: told apart from any workspace id); None: nobody's.
    An IPv6 address is its /64, as the failure throttle counts it (``throttle_client``): a
    subscriber is handed a whole /64, and one upload from each of its addresses would
    otherwise take every slot."""
    if principal is not None:
        return principal.workspace
    return None if client_of is None else ("client", throttle_client(client_of(request)))


def _trusting(upstream: Upstream) -> tuple[ssl.SSLContext | None, bytes | None]:
    """The TLS context trusting ``upstream.ca_file`` (instead of the system store), if set,
    and the digest of the file's contents it was made from (None: unknown, the file changed
    while it was read), which a reload compares (``_trust_changed``)."""
    if not upstream.ca_file:
        return None, None
    before = _ca_digest(upstream.ca_file)
    context = ssl.create_default_context(cafile=upstream.ca_file)
    return context, before if before == _ca_digest(upstream.ca_file) else None


def _ca_digest(path: str) -> bytes | None:
    """The SHA-256 of the file at ``path`` (None if it cannot be read)."""
    try:
        with open(path, "rb") as f:
            return hashlib.sha256(f.read()).digest()
    except OSError:
        return None


_TRACE_ONLY = Tracer()


RETIRED_QUIET = 10.0  # seconds a pool a reload took out of use stays unused before it closes
RETIRED_MAX = 60.0    # at least this long (4 x the upstream's timeout if longer) after the
                      # reload, its WebSocket tunnels are closed (responses finish)


class Forwarder:
    """Forwards requests to upstreams; one keep-alive pool per upstream."""

    def __init__(self, config: Config) -> None:
        self._pools: dict[str, tuple[UpstreamPool, str, str]] = {}  # name → pool, base, Host
        self._retiring: set[asyncio.Task] = set()
        # the pools a reload took out of use, by the upstream they were made for, until their
        # requests are done: requests in flight through the reload still use them
        self._retired: dict[Upstream, tuple[UpstreamPool, str, str]] = {}
        self.header_rules: RequestHeaderRules | None = None
        self._settle(config)
        # Called with (upstream name, seconds from sending to the response headers) for each
        # upstream answer; the app wires it to keygate_upstream_duration_seconds.
        self.on_upstream: Callable[[str, float], None] | None = None

    def _settle(self, config: Config) -> None:
        self.config = config
        # the identity and credential header names earlier configs had stay dropped from
        # client requests, and tokens of the key prefixes they used from public routes'
        # Authorization
        before = self.header_rules
        self.header_rules = RequestHeaderRules(config, before.own_names if before else (),
                                               before.prefixes if before else ())
        signing = config.identity_signature
        self._sign_secret: bytes | None = None
        if signing is not None:
            secrets = secrets_of(os.environ.get(signing.secret_env, ""))
            if not secrets:
                raise ValueError(f"identity_signature: environment variable "
                                 f"{signing.secret_env} holds no secret")
            self._sign_secret = secrets[0]
        # with the rules it signs under: a request in flight through a reload that passes its
        # rules (Pipeline) signs, or not, as the config it was read under did
        self.header_rules.sign_secret = self._sign_secret

    def learn_prefixes(self, prefixes: Iterable[str]) -> None:
        """Tokens of ``prefixes`` too (recorded in the store by any keygate:
        ``Store.key_prefixes_seen``) are dropped from public routes' Authorization."""
        rules = self.header_rules
        if all(p in rules.prefixes for p in prefixes):
            return
        learnt = RequestHeaderRules(self.config, rules.own_names, (*rules.prefixes, *prefixes))
        learnt.sign_secret = rules.sign_secret
        self.header_rules = learnt

    # --- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        for upstream in self.config.upstreams.values():
            self._pool(upstream)

    def reconfigure(self, config: Config) -> None:
        """Take ``config`` for the next request (a reload). The pool of an upstream that was
        removed or changed (its ``ca_file``'s contents too: ``_trust_changed``) is taken out
        of use now and closed once its requests are done; requests already forwarding finish
        on it."""
        old = self.config.upstreams
        self._settle(config)
        for name, before in old.items():
            if config.upstreams.get(name) == before and not self._trust_changed(name):
                continue
            entry = self._pools.pop(name, None)
            if entry is None:
                continue
            self._retire_later(entry, before)

    def _retire_later(self, entry: tuple[UpstreamPool, str, str], upstream: Upstream) -> None:
        """Serve the requests still meant for ``upstream`` (a reload changed or removed it)
        from ``entry``'s pool, within its bound, and close it once they are done."""
        self._retired[upstream] = entry
        task = asyncio.ensure_future(self._retire(entry, upstream))
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    def _trust_changed(self, name: str) -> bool:
        """Whether the ``ca_file`` of upstream ``name``'s pool holds other contents than its
        TLS context was made from (an operator rotated the CA; the path is the same): its
        pool is retired, its connections made under the old trust not reused, and the next
        request's makes a new context from the file."""
        entry = self._pools.get(name)
        if entry is None or entry[0].tls is None:
            return False
        digest = entry[0].ca_digest
        ca_file = self.config.upstreams[name].ca_file
        return ca_file is not None and (digest is None or digest != _ca_digest(ca_file))

    async def _retire(self, entry: tuple[UpstreamPool, str, str], upstream: Upstream) -> None:
        """Close a pool a reload took out of use once nothing has used it for ``RETIRED_QUIET``
        seconds. Until then it keeps no idle connection (each is closed as its request ends)
        and serves the requests that matched their route before the reload, within its
        ``max_connections``: also those that reach the forwarder only after the reload (their
        key being verified, their authorize call under way), which no count of the pool's
        sees coming."""
        pool = entry[0]
        pool.retire()
        loop = asyncio.get_running_loop()
        # A WebSocket tunnel to the old upstream may stay open for ever: it is closed after a
        # while, and its client reconnects to the new one (docs/websocket.md). A response
        # still streaming (a long download, an event stream) finishes: a reload cuts nothing
        # off mid-body, as nginx's old workers finish theirs.
        deadline = loop.time() + max(RETIRED_MAX, 4 * upstream.timeout)
        quiet_since = loop.time()
        try:
            while True:
                now = loop.time()
                if deadline is not None and now >= deadline:
                    pool.close_tunnels()
                    deadline = None
                if pool.in_use():
                    quiet_since = now
                elif now - quiet_since >= RETIRED_QUIET:
                    break
                await asyncio.sleep(0.25)
        finally:
            if self._retired.get(upstream) is entry:
                del self._retired[upstream]
            await pool.close()

    async def close(self) -> None:
        for task in list(self._retiring):
            task.cancel()
        await asyncio.gather(*self._retiring, return_exceptions=True)
        pools, self._pools = self._pools, {}
        for pool, _, _ in pools.values():
            await pool.close()

    def _pool(self, upstream: Upstream) -> tuple[UpstreamPool, str, str]:
        current = self.config.upstreams.get(upstream.name)
        current = current is upstream or current == upstream
        # a request in flight through a reload that changed its upstream: its pool was retired
        # with the old config, and it must not put one for the old URL back under the name
        # the new config's requests look up
        entry = self._pools.get(upstream.name) if current else self._retired.get(upstream)
        if entry is None:
            url = URL(upstream.url)
            context, digest = _trusting(upstream)
            # a vanished upstream host is found as a vanished client is, within
            # server.timeouts.body, but never before the upstream's own timeout: the user
            # timeout also ends a connection whose upstream, alive, reads nothing that long
            # (a zero window: busy, reading an upload or a tunnel's frames slowly), which its
            # timeout allows
            pool = UpstreamPool(str(url.origin()), connect_timeout=upstream.timeout,
                                ssl_context=context, max_connections=upstream.max_connections,
                                vanish_timeout=max(self.config.server.timeouts.body,
                                                   upstream.timeout))
            pool.ca_digest = digest
            entry = (pool, url.raw_path.rstrip("/"), url.host_port_subcomponent or url.host or "")
            if current:
                self._pools[upstream.name] = entry
            else:
                # its retired pool is closed (its requests reached here after it had been
                # quiet for RETIRED_QUIET: their store calls were slower): one retired pool
                # again, which they all share within the upstream's max_connections (a pool
                # each took as many connections as there were such requests)
                pool.retire()
                self._retire_later(entry, upstream)
        return entry

    # --- the request -------------------------------------------------------------------------

    def request_head(self, request: web.BaseRequest, principal: Principal | None,
                     request_id: str, target: str, host: str, *, trace: Trace | None = None,
                     rules: RequestHeaderRules | None = None, last: str | None = None) -> bytes:
        """The request head to send upstream, for ``forward`` and the WebSocket tunnel alike:
        the request line (the client's method, ``target``: the path and query as sent
        upstream, what the signature covers), ``Host: host``, the client's headers as
        ``gateway.proxying.headers`` passes them on, then keygate's own, then ``last`` (lines
        of the caller's, if any), without the blank line that ends it. No ``Content-Length``
        of the client's: the upstream writer frames the body itself. ``trace`` is the
        request's trace context (read from the request when not given); ``rules`` the header
        rules the request was checked under (the current ones when not given: a reload must
        not change them for a request in flight)."""
        if rules is None:
            rules = self.header_rules
        out = rules.passed_on(request.headers, request.remote, request.scheme, principal)
        out.append(("X-Request-Id", request_id))
        if trace is None:
            trace = _TRACE_ONLY.start(request)
        out.append(("traceparent", trace.traceparent()))
        for value in trace.tracestate:
            out.append(("tracestate", value))
        values = rules.identity_values(principal)
        if principal is not None:
            out.extend(zip(rules.identity, values))
        if rules.sign_secret is not None:
            out.append((rules.sign_header, sign(
                rules.sign_secret, request.method, target, request_id, *values)))
        parts = [f"{request.method} {target} HTTP/1.1\r\nHost: {host}"]
        for name, value in out:
            parts.append(f"{name}: {value}")
        if last is not None:
            parts.append(last)
        return "\r\n".join(parts).encode("utf-8", "surrogateescape")

    @staticmethod
    def upstream_failed(exc: Exception, upstream: Upstream) -> GatewayError:
        """What a failure to get ``upstream``'s answer (its head: nothing was sent back yet)
        is answered: 504 ``upstream_timeout`` for an ``UpstreamTimeout``, else 502
        ``upstream_unavailable`` (logged), each saying whether the upstream may have received
        the request (not when it timed out unreached, could not be connected to, or was sent a
        body that did not match its framing). For ``forward`` and the WebSocket tunnel."""
        if isinstance(exc, UpstreamTimeout):
            return GatewayTimeout(f"The upstream '{upstream.name}' did not answer within "
                                  f"{upstream.timeout:g} seconds.",
                                  reached_upstream=not isinstance(exc, UpstreamUnreached))
        log.warning("upstream %s failed: %s: %s", upstream.name, type(exc).__name__, exc)
        return BadGateway(f"The upstream '{upstream.name}' is unavailable.",
                          reached_upstream=not isinstance(
                              exc, (UpstreamConnectError, BodyFramingError)))

    def _body_source(self, content, length: int | None, rules: RequestHeaderRules):
        """The request body as the upstream writer's chunk source.

        A chunked body is judged against ``max_body_bytes`` as it streams (a declared length
        was judged before); a body that stalls for ``server.timeouts.body`` ends the request
        with 408. Both are keygate's own refusals: the writer then closes the upstream
        connection before the request is complete upstream."""
        readany, at_eof = content.readany, content.is_eof
        limit, stall = rules.max_body, rules.body_timeout
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
                      trace: Trace | None = None,
                      rules: RequestHeaderRules | None = None,
                      client_of: Callable[[web.BaseRequest], str] | None = None,
                      held=None) -> web.StreamResponse:
        """Send ``request`` to ``upstream`` and stream its answer back.

        A body still streaming in takes one of the upstream's upload slots, and at most its
        owner's share of them (``UpstreamPool.share``): the owner is ``principal``'s workspace,
        or with no principal (a public route) the client address ``client_of`` gives (the
        pipeline's ``client_ip``). Both are read only for such a body: the request whose body
        is complete, or absent, pays nothing for them. Without either, no share applies.

        Raises ``PayloadTooLarge`` (413), ``RequestTimeout`` (408), ``BadGateway`` (502) or
        ``GatewayTimeout`` (504) while no response has started (each says whether the upstream
        may have received the request); once a response has started, an upstream failure
        aborts the client connection (a truncated body must not look complete), and the
        response's ``upstream_failed`` says the error code (``upstream_timeout`` for a gap
        longer than the upstream's timeout, else ``upstream_unavailable``).

        ``held``: the request's hold on its quota (``gateway.pipeline.Held``), released once
        the upstream's answer head came: it can no longer be taken back."""
        if rules is None:
            rules = self.header_rules
        pool, base, host = self._pool(upstream)
        body = None
        length = None
        if request.body_exists:
            length = request.content_length
            if length is not None and length > rules.max_body:
                raise body_too_large(rules.max_body)
            body = self._body_source(request.content, length, rules)
            await continue_if_expected(request)  # a client gone meanwhile: body_cut_short
        head = self.request_head(request, principal, request_id, base + request.raw_path, host,
                                 trace=trace, rules=rules,
                                 # as sent: a POST without it may get a 411
                                 last="Content-Length: 0" if body is None
                                 and request.content_length == 0 else None)
        is_head = request.method == "HEAD"
        started = time.perf_counter()
        streaming = False
        client = request.protocol  # its going ends the wait for the answer (connection_lost)
        if not hasattr(client, "upstream_wait"):  # not keygate's own server (some tests')
            client = None
        try:
            if body is not None:
                # no upstream connection is taken before the first PREFETCH bytes (all of a
                # small body) are here, or PREFETCH_WAIT seconds have passed (a live body: an
                # NDJSON line, a log record, waiting for the upstream's answer before the
                # next); a body not all here by then is streaming: it may trickle in for as
                # long as the client likes (a byte now and then never stalls it for
                # server.timeouts.body), so it takes one of the upstream's upload slots (half
                # its connections, and its owner's share of those) and cannot hold the
                # connections the rest need
                body, complete = await _prefetched(body, PREFETCH, request.content.is_eof,
                                                   PREFETCH_WAIT)
                streaming = not complete
            if streaming:  # and at most its workspace's (or client address's) share of those
                resp = await pool.request(head, body=body, content_length=length,
                                          timeout=upstream.timeout, is_head=is_head,
                                          streaming=True,
                                          owner=_upload_owner(request, principal, client_of),
                                          client=client)
            else:
                resp = await pool.request(head, body=body, content_length=length,
                                          timeout=upstream.timeout, is_head=is_head,
                                          client=client)
        except GatewayError:  # the body source's own: 413, 408
            raise
        except ClientGone as exc:  # nobody is left to answer: what the access log says
            if not exc.sent and body is not None:  # as a client gone mid-body: uncounted
                log.info("the client went away while sending its body to %s", upstream.name)
                raise body_cut_short() from None
            log.info("the client went away before %s answered; the upstream connection is "
                     "closed", upstream.name)
            raise client_closed(reached_upstream=exc.sent) from None
        except ClientBodyFailed as exc:
            log.info("the client went away while sending its body to %s: %s", upstream.name,
                     exc)
            raise body_cut_short() from None  # not the upstream's failure: no 502
        except UploadShareFull as exc:
            whose = f"client {exc.owner[1]}" if isinstance(exc.owner, tuple) else \
                f"workspace {exc.owner}"
            log.warning("upstream %s: an upload waited %g s for a connection and was refused: "
                        "%s holds its share of the upload connections (%d of %d)",
                        upstream.name, upstream.timeout, whose, exc.share, pool.max_streaming)
            yours = "your client address" if isinstance(exc.owner, tuple) else "your workspace"
            raise UploadSlotTimeout(f"No connection to the upstream '{upstream.name}' was "
                                    f"free for an upload within {upstream.timeout:g} seconds: "
                                    f"{yours} holds its share of the connections for uploads "
                                    f"still streaming in ({exc.share} of "
                                    f"{pool.max_streaming}).") from None
        except UploadSlotsFull as exc:
            log.warning("upstream %s: an upload waited %g s for a connection and was refused: "
                        "%s", upstream.name, upstream.timeout, exc)
            raise UploadSlotTimeout(f"No connection to the upstream '{upstream.name}' was "
                                    f"free for an upload within {upstream.timeout:g} "
                                    f"seconds.") from None
        except (UpstreamTimeout, UpstreamConnectError, UpstreamProtocolError, OSError,
                ValueError) as exc:
            raise self.upstream_failed(exc, upstream) from None
        except Exception as exc:
            log.warning("forwarding to %s failed: %s: %s", upstream.name, type(exc).__name__,
                        exc)
            raise BadGateway(f"The request to upstream '{upstream.name}' failed.") from None
        if held is not None:
            held.release()
        if self.on_upstream is not None:
            self.on_upstream(upstream.name, time.perf_counter() - started)
        try:
            return await self._stream_back(request, resp, request_id, response_headers,
                                           upstream, is_head, rules)
        finally:
            if resp.sending():  # a body still being sent (an upstream that answered early)
                await resp.settled()

    async def tunnel(self, request: web.BaseRequest, upstream: Upstream,
                     principal: Principal | None, request_id: str,
                     response_headers: Mapping[str, str], *, trace: Trace | None = None,
                     rules: RequestHeaderRules | None = None,
                     watch=None, held=None) -> web.StreamResponse:
        """``forward`` for a WebSocket handshake (no body: no upload share to judge): see
        ``gateway.proxying.tunnel``."""
        return await run_tunnel(self, request, upstream, principal, request_id,
                                response_headers, trace=trace, rules=rules, watch=watch,
                                held=held)

    async def _stream_back(self, request: web.BaseRequest, resp: UpstreamResponse,
                           request_id: str, limit_headers: Mapping[str, str],
                           upstream: Upstream, is_head: bool,
                           rules: RequestHeaderRules) -> web.StreamResponse:
        """``rules``: the config's header rules (keygate's identity and signature headers are
        not passed back; ``cors``, the policy the answer's ``Access-Control-*`` headers
        follow, if any) and ``body_timeout``, the seconds a client may stop reading the
        answer (``server.timeouts.body``)."""
        out = response_headers(resp.headers, rules)
        cors = rules.cors
        if out.__class__ is NotUtf8Headers:  # written byte for byte, not by aiohttp's writer
            keep_header_bytes(request.writer)
        for name, value in limit_headers.items():
            out[name] = value
        out[_X_REQUEST_ID] = request_id
        if cors is not None:
            cors.label_forwarded(out, origin_of(request.headers))
        status = resp.status
        if is_head or status in _NO_BODY_STATUS:
            resp.release()
            response = web.StreamResponse(status=status, headers=out)
            try:
                await response.prepare(request)
                await response.write_eof()
            except ConnectionError:  # the client left while the upstream answered: not a
                pass                 # keygate failure (no 500, no traceback), as below
            return response
        whole = resp.body_if_complete()
        if whole is not None:  # the common small case: one write, exact Content-Length
            out.popall("Content-Length", None)
            return WholeResponse.of(status, whole, out)
        response = web.StreamResponse(status=status, headers=out)
        if request.version != _HTTP11 and _CONTENT_LENGTH not in out:
            # an HTTP/1.0 client reads an answer of unknown length to the connection's end,
            # but aiohttp keeps the connection after writing one (its _prepare_headers turns
            # keep-alive off for it only locally): the client waited for the end of the body
            # until the idle timeout, and the next answer on the connection went into it
            response.force_close()
        chunks = resp.chunks()
        timeout = upstream.timeout
        sent = 0  # body bytes written, for the access log (aiohttp's count has the head)
        client = request.protocol  # ends the wait below if the client goes (connection_lost)
        if not hasattr(client, "upstream_wait"):  # not keygate's own server (some tests')
            client = _Unwatched()
        try:
            await response.prepare(request)
            # the head is on the wire (aiohttp's StreamResponse sends it at once): the end of
            # keygate_request_duration_seconds, which a body streaming for minutes must not
            # stretch (the access log's duration_ms runs to the body's last byte)
            response.headers_at = time.perf_counter()
            while True:
                try:
                    async with asyncio.timeout(timeout) as waiting:
                        client.upstream_wait = waiting
                        chunk = await anext(chunks)
                except StopAsyncIteration:
                    break
                finally:
                    client.upstream_wait = None
                # a client that takes none of it for server.timeouts.body is cut off by the
                # server's write-stall timer (its connection_lost fails this write: below),
                # which judges bytes taken, not the wait: a timeout on the whole write cut
                # off a client reading steadily but slower than a chunk (up to 256 KiB) in
                # that time
                await response.write(chunk)
                sent += len(chunk)
        except ConnectionError:       # the client went away: drop the upstream connection too
            return response
        except (UpstreamProtocolError, TimeoutError, OSError) as exc:
            if request.transport is None:  # the client went between two chunks: its
                return response            # connection_lost ended the wait, not the upstream
            log.warning("upstream %s failed mid-response: %s", upstream.name,
                        type(exc).__name__)
            transport = request.transport
            if transport is not None:
                transport.abort()     # never let a truncated body look complete
            # for the access log's error and keygate_upstream_errors_total (the pipeline
            # reads it): the status stays the one the client got
            response.upstream_failed = "upstream_timeout" if isinstance(exc, TimeoutError) \
                else "upstream_unavailable"
            return response
        finally:
            response.body_bytes_sent = sent  # the whole body, or as much of it as went out
            # any way out but the end of the body (client gone, cancelled, upstream failed):
            # the upstream connection is closed, never left open or pooled half-read
            await chunks.aclose()
            resp.close()
        try:
            await response.write_eof()  # the last chunk of a chunked answer
        except ConnectionError:  # the client left after the body's last bytes, before its end:
            pass                 # what it got is logged, not keygate's 500 with a traceback
        return response
