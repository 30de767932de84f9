"""Response desync, generated: a property-based fuzz of how keygate reads its upstream's
answers and passes them on.

Hypothesis writes upstream answers with odd framing: Content-Length and Transfer-Encoding
together, duplicate or conflicting or listed lengths, codings other than chunked, chunked with
trailers or a broken chunk, a body on 204/304/HEAD, interim 1xx answers (a 101 nobody asked
for among them), obs-fold, bare CR, NUL and other control characters in the head, an over-long
head, a body cut short, HTTP/1.0 with and without keep-alive, and a whole second response (the
desync) written right behind the first on a kept-alive connection.

The reference is h11 reading the upstream's bytes as a client. For each answer a client asks
twice (``a``, the odd answer; then ``b``, a plain one), and the properties are:

- what the client gets for ``a`` parses as exactly one response and nothing after it: either
  the upstream's status and, if complete, exactly the body h11 reads; or a 502/504 with SPEC's
  JSON error; or a connection cut mid-body (never a truncated body that looks complete);
- no bytes of the injected second response ever reach the client as anything but body bytes
  the reference reads as body;
- the upstream connection that gave an answer that is not strictly clean (anything above
  beyond one plain length or ``chunked``, bytes after the message, a close asked for) is never
  used again: ``b`` arrives on another one;
- ``b``'s answer is exactly the upstream's plain answer to ``b``.
"""

from __future__ import annotations

import asyncio
import json
import secrets
from dataclasses import dataclass, field

import h11
import httptools
import pytest
from hypothesis import HealthCheck, event, given, note, settings
from hypothesis import strategies as st

from gateway.config import Route

from harness import gateway_under_test, make_config, target_parser

ROUTES = (Route("/public/**", "api", ("GET", "HEAD"), (), True),)
SECOND = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-Desync: yes\r\n\r\nPWNED"


@dataclass
class Scripted:
    """An upstream answering the first request it gets with ``script`` (once), every other one
    plainly with its target; it records on which connection each request came."""
    # (the answer's bytes in one write or several, whether it closes after them)
    script: list[tuple[list[bytes], bool]] = field(default_factory=list)
    arrivals: list[tuple[int, bytes]] = field(default_factory=list)  # (connection, target)
    port: int = 0
    connections: int = 0

    async def start(self) -> "Scripted":
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def _serve(self, reader, writer) -> None:
        self.connections += 1
        me = self.connections
        targets: list[bytes] = []

        parser = target_parser(targets.append)
        try:
            while data := await reader.read(65536):
                try:
                    parser.feed_data(data)
                except httptools.HttpParserError:
                    break
                for target in targets:
                    self.arrivals.append((me, target))
                    if self.script:
                        parts, close = self.script.pop(0)
                        for i, part in enumerate(parts):
                            if i:  # each part its own read at keygate's end
                                await asyncio.sleep(0.02)
                            writer.write(part)
                            await writer.drain()
                        if close:
                            writer.close()
                            return
                    else:
                        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s"
                                     % (len(target), target))
                targets.clear()
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()


# --- generated answers ------------------------------------------------------------------------

answers = st.fixed_dictionaries({
    "interim": st.lists(st.sampled_from([
        b"HTTP/1.1 100 Continue\r\n\r\n", b"HTTP/1.1 102 Processing\r\n\r\n",
        b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n",
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
        b"HTTP/1.1 100 Continue\r\nContent-Length: 5\r\n\r\n"]), max_size=2),
    "version": st.sampled_from(["1.1"] * 5 + ["1.0"]),
    "keep_alive": st.booleans(),       # HTTP/1.0: Connection: keep-alive
    "close": st.sampled_from([False] * 4 + [True]),  # Connection: close
    "status": st.sampled_from([200, 200, 201, 204, 304, 404, 500, 299]),
    "method": st.sampled_from(["GET"] * 4 + ["HEAD"]),
    "body": st.binary(max_size=200),
    "framing": st.sampled_from(["cl"] * 4 + ["te"] * 3 + [
        "cl_short", "cl_long", "cl_dup_same", "cl_dup_conflict", "cl_list", "cl_plus",
        "cl_space", "te+cl", "cl+te", "te_chunked_identity", "te_identity_chunked",
        "te_gzip_chunked", "te_chunked_gzip", "te_identity", "te_twice", "te_upper", "close",
        "te_trailers", "te_bad_chunk", "te_truncated", "te_ext", "te_lf"]),
    "head": st.sampled_from([None] * 8 + ["fold", "bare_cr", "nul", "ctl", "space_colon",
                                          "bare_lf", "huge", "split_response_line",
                                          "crlf_value"]),
    "extra": st.sampled_from([None] * 3 + ["second", "garbage", "crlf"]),
    "split": st.sampled_from([None] * 3 + [1, 7, 40]),  # write the answer in two, this far in
})


def build_answer(spec: dict, marker: bytes) -> tuple[bytes, bool]:
    """The upstream's bytes for ``spec``, and whether it closes the connection after them."""
    body = spec["body"] + marker
    status = spec["status"]
    lines = [b"HTTP/%s %d Whatever" % (spec["version"].encode(), status),
             b"Content-Type: application/octet-stream", b"X-Upstream: here"]
    if spec["version"] == "1.0" and spec["keep_alive"]:
        lines.append(b"Connection: keep-alive")
    if spec["close"]:
        lines.append(b"Connection: close")
    framing = spec["framing"]
    n = len(body)
    chunks = b"%x\r\n%s\r\n0\r\n\r\n" % (n, body) if body else b"0\r\n\r\n"
    close = False
    payload = body
    if framing == "cl":
        lines.append(b"Content-Length: %d" % n)
    elif framing == "cl_short":
        lines.append(b"Content-Length: %d" % max(n - 3, 0))
    elif framing == "cl_long":
        lines.append(b"Content-Length: %d" % (n + 10))
        close = True
    elif framing == "cl_dup_same":
        lines += [b"Content-Length: %d" % n] * 2
    elif framing == "cl_dup_conflict":
        lines += [b"Content-Length: %d" % n, b"Content-Length: %d" % (n + 1)]
    elif framing == "cl_list":
        lines.append(b"Content-Length: %d, %d" % (n, n))
    elif framing == "cl_plus":
        lines.append(b"Content-Length: +%d" % n)
    elif framing == "cl_space":
        lines.append(b"Content-Length: %d 0" % n)
    elif framing in ("te+cl", "cl+te"):
        both = [b"Transfer-Encoding: chunked", b"Content-Length: %d" % len(chunks)]
        lines += both if framing == "te+cl" else both[::-1]
        payload = chunks
    elif framing.startswith("te"):
        value = {"te": b"chunked", "te_chunked_identity": b"chunked, identity",
                 "te_identity_chunked": b"identity, chunked",
                 "te_gzip_chunked": b"gzip, chunked", "te_chunked_gzip": b"chunked, gzip",
                 "te_identity": b"identity", "te_upper": b"CHUNKED"}.get(framing, b"chunked")
        lines.append(b"Transfer-Encoding: " + value)
        if framing == "te_twice":
            lines.append(b"Transfer-Encoding: chunked")
        payload = chunks
        if framing == "te_trailers":
            payload = chunks[:-2] + b"X-Trailer: t\r\nSet-Cookie: forged=1\r\n\r\n"
        elif framing == "te_bad_chunk":
            payload = b"zz\r\n" + chunks
        elif framing == "te_truncated":
            payload = chunks[:-5]
            close = True
        elif framing == "te_ext":
            payload = b"%x;ext=\"v\"\r\n%s\r\n0\r\n\r\n" % (n, body) if body else chunks
        elif framing == "te_lf":
            payload = chunks.replace(b"\r\n", b"\n", 1)
        elif framing in ("te_identity",):
            payload = body
            close = True
    elif framing == "close":
        close = True
    head = spec["head"]
    if head == "fold":
        lines[1] += b"\r\n folded"
    elif head == "bare_cr":
        lines[2] += b"\rX-Injected: yes"
    elif head == "nul":
        lines[2] += b"\x00x"
    elif head == "ctl":
        lines[2] += b"\x01x"
    elif head == "space_colon":
        lines[2] = b"X-Upstream : here"
    elif head == "crlf_value":
        lines[2] += b"\r\nSet-Cookie: injected=1"  # (well-formed: just another header)
    elif head == "huge":
        lines.append(b"X-Huge: " + b"h" * (1100 * 1024))
    eol = b"\n" if head == "bare_lf" else b"\r\n"
    out = b"".join(spec["interim"]) + eol.join(lines) + eol + eol
    if head == "split_response_line":
        out = b"".join(spec["interim"]) + b"HTTP/1.1\r\n 200 OK\r\n" + eol.join(lines[1:]) \
            + eol + eol
    out += payload
    extra = spec["extra"]
    if extra == "second":
        out += SECOND
    elif extra == "garbage":
        out += b"\x00garbage\r\n"
    elif extra == "crlf":
        out += b"\r\n"
    return out, close or (spec["version"] == "1.0" and not spec["keep_alive"]) or spec["close"]


# Transfer-Encoding lists h11 refuses that keygate reads as chunked: "identity" is no coding at
# all (RFC 7230 dropped it; llhttp and nginx skip it), so the body is chunked either way.
# And "identity" alone: no chunked last, so the body ends at the close (RFC 9112 6.3).
LENIENT = frozenset({"te_identity_chunked", "te_identity"})


@dataclass
class Read:
    status: int | None = None
    interim: list[int] = field(default_factory=list)
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytes = b""
    complete: bool = False
    error: str | None = None
    trailing: bytes = b""
    version: bytes = b""
    keep_alive: bool = True


def reference_read(data: bytes, method: str, eof: bool) -> Read:
    """One response read from ``data`` by h11 as a client that sent ``method``."""
    read = Read()
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method=method, target="/", headers=[("Host", "x")]))
    conn.send(h11.EndOfMessage())
    if data:  # (h11 takes b"" for the end of the connection)
        conn.receive_data(data)
    if eof:
        conn.receive_data(b"")
    while True:
        try:
            event_ = conn.next_event()
        except h11.RemoteProtocolError as exc:
            read.error = str(exc)
            return read
        if isinstance(event_, h11.InformationalResponse):
            read.interim.append(event_.status_code)
        elif isinstance(event_, h11.Response):
            read.status = event_.status_code
            read.headers = list(event_.headers.raw_items())
            read.version = event_.http_version
        elif isinstance(event_, h11.Data):
            read.body += bytes(event_.data)
        elif isinstance(event_, h11.EndOfMessage):
            read.complete = True
            read.trailing = conn.trailing_data[0]
            read.keep_alive = conn.their_state is not h11.MUST_CLOSE
            return read
        else:  # NEED_DATA, ConnectionClosed
            return read


def strictly_clean(raw: bytes, spec: dict, ref: Read) -> bool:
    """Whether an upstream answer leaves its connection in a known state: h11 reads one
    whole response with nothing after it, framed by one plain length or by ``chunked`` alone
    (or with no body by its status or the method), no 101, no odd bytes in the head, and the
    upstream did not ask to close."""
    # (empty lines between messages are nothing: RFC 9112 2.2 has them ignored)
    if spec["framing"] == "te_identity_chunked" and ref.error and ref.status is None:
        # h11 refuses a coding of "identity" (RFC 7230 dropped it); keygate reads it as no
        # coding at all, so its reading of where the answer ends is chunked's: known
        ref = reference_read(raw.replace(b"identity, chunked", b"chunked"), spec["method"],
                             False)
    # h11 never keeps an HTTP/1.0 connection; RFC 9112 9.3 lets a client keep one whose
    # response said Connection: keep-alive, framed by a length (with Transfer-Encoding, 6.1:
    # the framing is faulty and the connection closed after it)
    kept = ref.keep_alive or (spec["version"] == "1.0" and spec["keep_alive"]
                              and spec["framing"] == "cl")
    if ref.error or not ref.complete or ref.trailing.strip(b"\r\n") or not kept:
        return False
    if 101 in ref.interim or spec["head"] not in (None, "crlf_value") or spec["close"]:
        return False
    return spec["framing"] in ("cl", "te", "te_ext", "te_upper", "te_identity_chunked",
                               "te_trailers")


# --- the gateway under test ------------------------------------------------------------------

@pytest.fixture
async def scripted():
    up = await Scripted().start()
    yield up
    up.server.close()


@pytest.fixture
async def edge(redis_url, scripted, monkeypatch):
    config = make_config(f"http://127.0.0.1:{scripted.port}", routes=ROUTES)
    async with gateway_under_test(config, redis_url, monkeypatch) as g:
        g.up = scripted
        yield g


async def read_one(reader, method: str, quiet: float) -> tuple[bytes, bool]:
    """Read one answer to ``method``: until h11 has a whole response and ``quiet`` seconds
    pass without more bytes (bytes after it are part of what is judged), or the connection
    ends; the bytes, and whether it ended."""
    out = bytearray()
    while True:
        done = reference_read(bytes(out), method, False)
        timeout = quiet if done.complete or done.error else 3.0
        try:
            chunk = await asyncio.wait_for(reader.read(65536), timeout)
        except asyncio.TimeoutError:
            return bytes(out), False
        except ConnectionError as exc:
            return bytes(out), f"reset ({type(exc).__name__})"
        if not chunk:
            return bytes(out), True
        out += chunk


def code_of(body: bytes) -> str | None:
    try:
        return json.loads(body)["error"]["code"]
    except (ValueError, KeyError, TypeError):
        return None


@settings(max_examples=120, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(spec=answers)
async def test_property_an_upstream_answer_reaches_the_client_clean_or_as_a_502_never_as_two(
        edge, spec, caplog):
    up = edge.up
    nonce = secrets.token_hex(4).encode()
    marker = b"MK" + nonce
    raw, closes = build_answer(spec, marker)
    method = spec["method"]
    reference = reference_read(raw, method, closes)
    note(f"upstream answer: {raw[:2000]!r} (closes: {closes}); reference: {reference}")
    split = spec["split"]
    up.script = [([raw[:split], raw[split:]] if split else [raw], closes)]
    up.arrivals.clear()

    reader, writer = await edge.raw_connection()
    writer.write(f"{method} /public/a-{nonce.decode()} HTTP/1.1\r\nHost: g\r\n\r\n".encode())
    began = asyncio.get_running_loop().time()
    got, ended = await read_one(reader, method, quiet=0.05)
    took = asyncio.get_running_loop().time() - began
    up.script.clear()
    client = reference_read(got, method, bool(ended))
    event(f"{spec['framing']}/{spec['head']}/{spec['extra']}: "
          f"{client.status if client.complete else 'cut' if client.status else 'nothing'}")
    note(f"client got: {got[:3000]!r} (ended: {ended}); read: {client}")

    # exactly one response, nothing after it that could be read as another
    if client.error is not None:  # only ever a body cut short, the connection closed
        assert client.status is not None and ended and "complete message body" in \
            client.error, f"the client's answer does not parse: {client.error}; {raw[:300]!r}" \
            f" {spec} arrivals {up.arrivals} of {up.connections}; logged: " \
            f"{[r.getMessage()[:200] for r in caplog.records[-6:]]} ended {ended} in {took:.3f}: got {got[:400]!r}"
        assert not reference.complete, "keygate cut short a body the upstream sent whole"
    assert not client.trailing, f"bytes after the answer: {client.trailing!r}"
    assert client.status is not None or ended, "no answer and the connection left open"
    if spec["framing"] != "te_identity":  # (there the rest, to the close, is the body)
        # the smuggled answer's bytes only as the body the upstream really sent: an answer
        # with neither length nor chunks (its body ends at the close) holds them as content
        for smuggled in (b"X-Desync", b"PWNED"):
            assert smuggled not in got or smuggled in reference.body, smuggled
    assert 101 not in client.interim and b"X-Injected" not in got
    if client.status in (502, 504) and client.status != reference.status:
        assert client.complete
        if method != "HEAD":  # (an answer to HEAD has no body)
            assert code_of(client.body) in ("upstream_unavailable", "upstream_timeout"), \
                client.body
    elif client.status is not None and reference.error is not None and reference.status is None:
        # h11 refuses the answer and keygate passed it on re-framed: only where keygate's
        # reading is the one any reader has (and its connection is never used again)
        event(f"passed on what h11 refuses: {spec['framing']}/{spec['head']}")
        assert spec["framing"] in LENIENT and spec["head"] in (None, "crlf_value") \
            and 101 not in reference.interim, (spec, reference.error, client)
        # to the close (RFC 9112 6.3, item 7), after the final answer's head (not a 1xx's)
        whole = raw[len(b"".join(spec["interim"])):].split(b"\r\n\r\n", 1)[1]
        assert client.complete and client.body == (
            b"" if method == "HEAD" or client.status in (204, 304)
            else whole if spec["framing"] == "te_identity" else spec["body"] + marker)
    elif client.status is not None:
        assert reference.status == client.status, (reference, client)
        if client.complete:
            assert reference.complete, "a body cut short reached the client as complete"
            expected = b"" if method == "HEAD" or client.status in (204, 304) \
                else reference.body
            assert client.body == expected, (client.body, reference.body)
        else:
            assert ended, "an incomplete answer on a connection keygate left open"

    # the next request: never on an upstream connection whose state is not known
    a_connection = up.arrivals[0][0] if up.arrivals else None
    if ended or not client.keep_alive:
        writer.close()
        reader, writer = await edge.raw_connection()
    try:
        writer.write(f"GET /public/b-{nonce.decode()} HTTP/1.1\r\nHost: g\r\n\r\n".encode())
        got_b, ended_b = await read_one(reader, "GET", quiet=0.02)
    finally:
        writer.close()
    b = reference_read(got_b, "GET", ended_b)
    assert (b.status, b.body, b.trailing) == (200, b"/public/b-" + nonce, b""), got_b
    assert not any(k.lower() in (b"x-trailer", b"x-desync", b"x-injected") or b"forged" in v
                   for k, v in b.headers), b.headers  # nothing of a's answer in b's
    assert b"MK" + nonce not in got_b
    b_connection = [c for c, t in up.arrivals if t.startswith(b"/public/b-")]
    assert len(b_connection) == 1, up.arrivals
    if not strictly_clean(raw, spec, reference):
        assert b_connection[0] != a_connection, \
            "an upstream connection was used again after an answer that was not clean"
    else:
        event("clean answer: connection reused" if b_connection[0] == a_connection
              else "clean answer: new connection")
