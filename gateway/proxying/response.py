"""``WholeResponse``: a response whose body is all in memory, written the way aiohttp's
``web.Response`` writes it, with fewer layers in between.

Every proxied answer with a known, complete body and every JSON error keygate renders is one
of these. ``web.Response`` prepares it through five nested coroutines (``_start`` twice,
``_prepare_headers``, ``_write_headers``, ``write_eof`` twice) that weigh compression,
chunking, cookies and payload objects, none of which such a response has: ~3 µs of a request's
CPU (profiled under wrk). ``prepare`` here sets the same headers under the same rules and
hands status line, headers and body to the same payload writer, which serialises and
validates the headers and sends them with the body in one write. Anything off that path
(HEAD, 1xx/204/304, compression, chunking, cookies, a Content-Length set by the caller,
a body that is not ``bytes``) goes through
``web.Response`` unchanged. ``tests/test_whole_response.py`` compares the bytes on the wire
with ``web.Response``'s for generated responses and requests.

Like ``gateway.proxying.server`` this reads aiohttp private attributes (the response's
``_body``, ``_headers``, ``_status``, ``_reason``, ``_keep_alive``, ``_payload_writer``,
``_eof_sent``, ``_req``, ``_body_length``, ``_must_be_empty_body``, ``_compression``,
``_chunked``, ``_cookies``, and, for ``of``, ``_state``, ``_zlib_executor_size`` and
``_zlib_executor``, which ``web.Response.__init__`` sets; the request's ``_payload_writer`` and ``_prepare_hook``). An
aiohttp upgrade that moves them fails that test.
"""

from __future__ import annotations

import hashlib
import inspect
import re

from aiohttp import hdrs, web
from aiohttp.helpers import must_be_empty_body, rfc822_formatted_time
from aiohttp.http import SERVER_SOFTWARE, HttpVersion10, HttpVersion11
from aiohttp.web_response import MAX_SYNC_CHUNK_SIZE, REASON_PHRASES
from aiohttp.http_writer import StreamWriter, _serialize_headers
from multidict import CIMultiDict

_CONTENT_LENGTH, _CONTENT_TYPE = hdrs.CONTENT_LENGTH, hdrs.CONTENT_TYPE

# What ``WholeResponse.send_at_once`` does in one step is what these do in aiohttp 3.14.5 (the
# release it was read from); with any other code in them it does nothing and ``prepare`` and
# ``write_eof`` run. Its write_eof half stands for the response's write_eof (web.Response's,
# then StreamResponse's bookkeeping) and the writer's, drain included (its wait for a paused
# transport is a copy of StreamWriter.drain's).
_SEND_RELIES_ON = ((StreamWriter, ("write_headers", "write_eof", "_send_headers_with_payload",
                                   "__init__", "drain")),
                   (web.Response, ("write_eof",)),
                   (web.StreamResponse, ("write_eof",)),
                   (web.BaseRequest, ("_prepare_hook",)))
_SEND_READ_FROM = "a26bc4a2130f4368ff66713926e5b2761360f801d9465383ff76982165dc4d31"


def _send_digest() -> str:
    try:
        source = "".join(inspect.getsource(getattr(cls, name))
                         for cls, names in _SEND_RELIES_ON for name in names)
    except (OSError, TypeError):  # no source shipped: treat as unknown
        return ""
    return hashlib.sha256(source.encode()).hexdigest()


SEND_AT_ONCE = _send_digest() == _SEND_READ_FROM
_DATE, _SERVER, _CONNECTION = hdrs.DATE, hdrs.SERVER, hdrs.CONNECTION


# what aiohttp's serialiser refuses in a status line, name or value (RFC 9110 5.5: no
# control character but HTAB)
_FORBIDDEN = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


def raw_header_block(status_line: str, headers) -> bytes:
    """The status line and header block as aiohttp's serialiser writes them, except that a
    value decoded with surrogateescape (bytes that are not UTF-8) goes out as the bytes it
    came from, where aiohttp's drops them. Like aiohttp's, refuses (``ValueError``) a control
    character other than HTAB anywhere, CR and LF included: nothing can split the head."""
    lines = [status_line]
    for name, value in headers.items():
        lines.append(f"{name}: {value}")
    for line in lines:
        if _FORBIDDEN.search(line) is not None:
            raise ValueError("Forbidden control character detected in headers. "
                             "Potential header injection attack.")
    lines.append("\r\n")
    try:
        return "\r\n".join(lines).encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a lone surrogate that came from no byte: not ours to send
        raise ValueError("a header value that cannot be encoded") from None


def keep_header_bytes(writer) -> None:
    """Have ``writer`` (this request's aiohttp ``StreamWriter``) write the response's header
    block with ``raw_header_block``. Set only for a response carrying an upstream value that
    is not UTF-8 (rare): the usual one stays on aiohttp's C serialiser. Uses the writer's
    ``_on_headers_sent``, ``_headers_buf`` and ``_headers_written``, as its own
    ``write_headers`` does."""
    async def write_headers(status_line: str, headers) -> None:
        if writer._on_headers_sent is not None:
            await writer._on_headers_sent(headers)
        writer._headers_buf = raw_header_block(status_line, headers)
        writer._headers_written = False
    writer.write_headers = write_headers


class WholeResponse(web.Response):
    """``web.Response(status=, body=bytes, headers=)``, prepared and written in one step."""

    _lean = False  # prepared here (else by web.Response)

    @classmethod
    def of(cls, status: int, body: bytes, headers: CIMultiDict[str]) -> "WholeResponse":
        """``WholeResponse(status=status, body=body, headers=headers)`` for the hot path: it
        takes ``headers`` as its own instead of copying them, and skips what ``web.Response``
        weighs at construction (text, content type and charset arguments, a body of another
        type): 13.5k instructions per response in a callgrind micro-benchmark, with the
        header copy. ``body`` must be ``bytes``; ``status`` an int."""
        self = cls.__new__(cls)
        self._state = {}
        self._headers = headers
        self._status = status
        self._reason = REASON_PHRASES.get(status, "")
        self._body = body
        self._zlib_executor_size = MAX_SYNC_CHUNK_SIZE
        self._zlib_executor = None
        return self

    def _lean_head(self, request: web.BaseRequest) -> str | None:
        """Set the headers as ``web.Response.prepare`` would and take the request's payload
        writer; the status line. None, having changed nothing, for a response off the lean
        path (``web.Response`` prepares it)."""
        body = self._body
        headers = self._headers
        if body.__class__ is not bytes or self._compression or self._chunked or \
                self._cookies or _CONTENT_LENGTH in headers or \
                must_be_empty_body(request.method, self._status):
            return None
        self._lean = True
        self._must_be_empty_body = False
        self._req = request
        writer = self._payload_writer = request._payload_writer
        keep_alive = self._keep_alive
        if keep_alive is None:
            keep_alive = self._keep_alive = request.keep_alive
        length = len(body)
        headers[_CONTENT_LENGTH] = str(length)
        writer.length = length
        if length:
            headers.setdefault(_CONTENT_TYPE, "application/octet-stream")
        if _DATE not in headers:
            headers[_DATE] = rfc822_formatted_time()
        headers.setdefault(_SERVER, SERVER_SOFTWARE)
        version = request.version
        if _CONNECTION not in headers:
            if keep_alive:
                if version == HttpVersion10:
                    headers[_CONNECTION] = "keep-alive"
            elif version == HttpVersion11:
                headers[_CONNECTION] = "close"
        return f"HTTP/{version[0]}.{version[1]} {self._status} {self._reason}"

    async def prepare(self, request: web.BaseRequest):
        if self._eof_sent:
            return None
        if self._payload_writer is not None:
            return self._payload_writer
        status_line = self._lean_head(request)
        if status_line is None:
            return await super().prepare(request)
        await request._prepare_hook(self)
        writer = self._payload_writer
        await writer.write_headers(status_line, self._headers)
        return writer

    def send_at_once(self, request: web.BaseRequest) -> bool:
        """``prepare`` and ``write_eof`` in one synchronous step, without their six nested
        coroutines (~2 µs of a proxied request), for a request of the proxy listener whose
        writer and request are aiohttp's own: a plain ``BaseRequest`` (whose prepare hook does
        nothing) and a ``StreamWriter`` with no callbacks and its own header serialiser
        (``keep_header_bytes`` not set). Writes the status line, headers and body with one
        write, as ``write_eof`` does, except the wait for the client to take them
        (``drain``), which is the caller's (``gateway.proxying.server``). False, having done
        nothing, for any other response, request or writer. Raises ``ConnectionError`` for a
        client already gone, as ``write_eof`` does.

        Relies on ``StreamWriter``'s ``_on_headers_sent``, ``_on_chunk_sent``,
        ``on_body_write``, ``_headers_buf``, ``_headers_written``, ``_eof`` and
        ``_send_headers_with_payload``; ``SEND_AT_ONCE`` says whether the installed aiohttp is
        the release they were read from."""
        if not SEND_AT_ONCE or self._eof_sent or self._payload_writer is not None or \
                request.__class__ is not web.BaseRequest:
            return False
        writer = request._payload_writer
        if writer.__class__ is not StreamWriter or writer._on_headers_sent is not None or \
                writer._on_chunk_sent is not None or writer._compress is not None or \
                writer.chunked or "write_headers" in writer.__dict__:
            return False
        status_line = self._lean_head(request)
        if status_line is None:
            return False
        writer._headers_buf = _serialize_headers(status_line, self._headers)
        writer._headers_written = False
        body = self._body
        writer._send_headers_with_payload(body, True)
        if body and (notify := writer.on_body_write) is not None:
            notify(len(body), writer.output_size)
        writer._eof = True
        self._eof_sent = True
        self._req = None
        self._body_length = writer.output_size
        self._payload_writer = None
        return True

    async def write_eof(self, data: bytes = b"") -> None:
        if not self._lean or self._eof_sent:
            return await super().write_eof(data)
        writer = self._payload_writer
        await writer.write_eof(self._body)  # the buffered head and the body, one write
        self._eof_sent = True
        self._req = None
        self._body_length = writer.output_size
        self._payload_writer = None
