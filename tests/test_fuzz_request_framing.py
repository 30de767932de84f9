"""Request smuggling, generated: a differential, property-based fuzz of the proxy listener's
request framing, as an attacker would try it.

Hypothesis writes whole client byte streams (one connection, up to four pipelined requests,
allowed and refused ones mixed) with the framing variants smuggling lives on: Content-Length
and Transfer-Encoding in any case, padded, duplicated, listed (``identity, chunked``), both at
once; chunk extensions, trailers, over-long chunk-size lines; obs-fold, bare LF, control
characters in names and values; ``Expect: 100-continue``; HTTP/1.0 keep-alive; compressed
bodies. Each request carries forged identity headers and a marker of its own.

The reference is h11, a parser keygate does not use (aiohttp's and the lean client's are both
llhttp), reading the same bytes as an HTTP/1.1 server would. The properties:

- what keygate answers parses cleanly (h11 as the client), one answer per request at most;
- every request the upstream receives (parsed by h11 again, from the raw bytes) is one the
  reference parsed at that place in the stream, with the same method, target and body, and
  that keygate answered with the upstream's 200: nothing keygate refused, and nothing the
  reference did not read as a request of its own, ever reaches the upstream;
- each forwarded request carries exactly one of each identity header, keygate's values, and
  none of the client's forged copies (any case, ``_`` spelling);
- keygate is never more lenient than the reference: where the reference cannot parse a
  request, keygate forwards nothing from there on; where keygate refuses framing (a 400
  ``bad_request``) that is its last answer and the connection is closed.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import secrets
import zlib
from dataclasses import dataclass, field

import h11
import httptools
import pytest
from hypothesis import HealthCheck, event, given, note, settings
from hypothesis import strategies as st

from gateway.config import Route

from harness import eventually, gateway_under_test, make_config, tampered, target_parser

IDENTITY = (b"x-workspace-id", b"x-api-key-id", b"x-api-scopes", b"x-workspace-plan")
# what keygate writes into a forwarded request head itself
KEYGATES = frozenset({b"host", b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host",
                      b"x-request-id", b"traceparent", b"content-length", b"transfer-encoding",
                      *IDENTITY})
ROUTES = (Route("/public/**", "api", ("GET", "POST"), (), True),
          Route("/people/**", "api", ("GET", "POST"), ("people:read",)),
          Route("/admin/**", "api", ("GET", "POST"), ("admin:write",)))


# --- the upstream: records every byte, answers each request with its target -----------------

@dataclass
class Recorder:
    raw: list[bytearray] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    port: int = 0
    transports: list[asyncio.Transport] = field(default_factory=list)

    async def start(self) -> "Recorder":
        self.server = await asyncio.get_running_loop().create_server(
            lambda: _Recording(self), "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    def reset(self) -> None:
        """From now on: a kept-alive connection's earlier bytes are left out (``since``)."""
        self.since = {id(buf): len(buf) for buf in self.raw}
        self.errors.clear()

    def received(self) -> list[bytes]:
        """Each connection's bytes since the last ``reset``."""
        since = getattr(self, "since", {})
        return [bytes(buf[since.get(id(buf), 0):]) for buf in self.raw]

    def unread(self) -> bool:
        """Whether bytes (or an end) wait in a connection's socket that are not in ``raw``
        yet: each read goes into ``raw`` as it is made (a protocol's data_received, no
        stream buffer in between)."""
        import select
        open_ = [t for t in self.transports if not t.is_closing()]
        self.transports[:] = open_
        return bool(open_) and bool(select.select(
            [t.get_extra_info("socket").fileno() for t in open_], [], [], 0)[0])


class _Recording(asyncio.Protocol):
    """One upstream connection: records every byte, answers each request with its target;
    a head it cannot parse is an error, and the connection closes."""

    def __init__(self, up: Recorder) -> None:
        self.up = up
        self.answers: list[bytes] = []
        self.parser = target_parser(self.answers.append)

    def connection_made(self, transport) -> None:
        self.transport, self.buf = transport, bytearray()
        self.up.raw.append(self.buf)
        self.up.transports.append(transport)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self.up.errors.append(f"upstream could not parse what it got: {exc}")
            self.transport.close()
            return
        for target in self.answers:
            self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s"
                                 % (len(target), target))
        self.answers.clear()


def settled(g, tasks_before: set[asyncio.Task]) -> bool:
    """keygate handles no request, every task started since ``tasks_before`` (a connection's,
    a request's, or any keygate left running in the background) is done, and the upstream has
    read every byte keygate sent it. keygate, the upstream and the client all run in this
    event loop: a byte keygate wrote is in the upstream's socket once the write returns."""
    if g.gw.metrics.in_flight_now:
        return False
    if any(not t.done() for t in asyncio.all_tasks() - tasks_before
           if t is not asyncio.current_task()):
        return False
    return not g.up.unread()


# --- the reference: h11 reading the bytes as a server ------------------------------------------

@dataclass
class Parsed:
    method: bytes
    target: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes = b""
    version: bytes = b"1.1"


def reference_requests(data: bytes) -> tuple[list[Parsed], str]:
    """The requests h11 reads in ``data`` as a server, in order, and how the stream ended:
    ``"error"`` (a request h11 refuses), ``"closed"`` (after a request that closes the
    connection; the rest is never read), ``"partial"`` (bytes of a request not all there) or
    ``"end"``. An HTTP/1.0 keep-alive request (which h11 does not keep alive) is followed by
    the next request read from what comes after it."""
    out: list[Parsed] = []
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(data)
    current: Parsed | None = None
    while True:
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError:
            return out, "error"
        if event is h11.NEED_DATA:
            tail = conn.trailing_data[0] if conn.their_state is h11.DONE else b""
            return out, ("partial" if current is not None or tail.strip(b"\r\n") else "end")
        if isinstance(event, h11.Request):
            current = Parsed(event.method, event.target, list(event.headers.raw_items()),
                             version=event.http_version)
        elif isinstance(event, h11.Data):
            current.body += bytes(event.data)
        elif isinstance(event, h11.EndOfMessage):
            out.append(current)
            current = None
            conn.send(h11.Response(status_code=200, headers=[(b"content-length", b"0")]))
            conn.send(h11.EndOfMessage())
            if conn.our_state is h11.MUST_CLOSE:
                last = out[-1]
                connection = b",".join(v for k, v in last.headers if k.lower() == b"connection")
                if last.version == b"1.0" and b"keep-alive" in connection.lower() and \
                        b"close" not in connection.lower():
                    rest, _ = conn.trailing_data
                    conn = h11.Connection(h11.SERVER)
                    conn.receive_data(rest)
                    continue
                rest, _ = conn.trailing_data
                return out, ("closed" if not rest else "closed-more")
            conn.start_next_cycle()
        elif isinstance(event, h11.ConnectionClosed):
            return out, "end"


@dataclass
class Answer:
    status: int
    body: bytes
    headers: list[tuple[bytes, bytes]]

    def code(self) -> str | None:
        try:
            return json.loads(self.body)["error"]["code"]
        except (ValueError, KeyError, TypeError):
            return None


def reference_answers(data: bytes) -> tuple[list[Answer], bool]:
    """The final responses in ``data`` as h11 reads them as a client (interim 1xx skipped),
    and whether the bytes parse cleanly and end where a response ends (no stray bytes that
    could be read as the start of another)."""
    out: list[Answer] = []
    conn = h11.Connection(h11.CLIENT)
    if data:  # (h11 takes b"" for the end of the connection)
        conn.receive_data(data)
    conn.receive_data(b"")
    current: Answer | None = None
    while True:
        if conn.our_state is h11.IDLE:
            conn.send(h11.Request(method="GET", target="/", headers=[("Host", "x")]))
            conn.send(h11.EndOfMessage())
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError:
            # a close between two answers is no error (RFC 9112 9.6): h11 calls it one once
            # the next request is sent
            return out, current is None and out != [] and conn.trailing_data == (b"", True)
        if isinstance(event, h11.Response):
            current = Answer(event.status_code, b"", list(event.headers.raw_items()))
            version = event.http_version
            keep_alive = any(k.lower() == b"connection" and v.lower() == b"keep-alive"
                             for k, v in current.headers)
        elif isinstance(event, h11.Data):
            current.body += bytes(event.data)
        elif isinstance(event, h11.EndOfMessage):
            out.append(current)
            current = None
            if conn.their_state is h11.MUST_CLOSE or conn.our_state is h11.MUST_CLOSE:
                rest, _ = conn.trailing_data
                if version == b"1.0" and keep_alive:  # which h11 does not keep alive
                    conn = h11.Connection(h11.CLIENT)
                    conn.receive_data(rest)
                    conn.receive_data(b"")
                    continue
                return out, rest == b""
            conn.start_next_cycle()
        elif isinstance(event, h11.ConnectionClosed):
            return out, current is None
        elif event is h11.NEED_DATA:
            return out, current is None
        # InformationalResponse (100 Continue): not an answer of its own


# --- generated requests ---------------------------------------------------------------------

KINDS = ("ok", "public", "missing", "malformed", "scope", "limited", "ambiguous")
# keygate's refusals of a request it cannot frame (or will not: a transfer coding it lacks)
FRAMING_REFUSED = {(400, "bad_request"), (501, "not_implemented")}
REFUSED = {"missing": 401, "malformed": 401, "scope": 403, "limited": 429, "ambiguous": 400}
CTL = [b"\x00", b"\x01", b"\x08", b"\x0b", b"\x0c", b"\x7f", b"\r", b"\x1b"]

forged = st.lists(st.tuples(
    st.sampled_from(["X-Workspace-Id", "x-workspace-id", "X_Workspace_Id", "X-API-KEY-ID",
                     "x_api_key_id", "X-Api-Scopes", "X-Workspace-Plan", "x-WORKSPACE_plan"]),
    st.sampled_from(["evil", "ALL", "FORGEDKEYID1"])), max_size=3)

cl_names = st.sampled_from(["Content-Length", "content-length", "CONTENT-LENGTH",
                            "Content-length"])
te_names = st.sampled_from(["Transfer-Encoding", "transfer-encoding", "TRANSFER-ENCODING"])
te_values = st.sampled_from(["chunked", "Chunked", "CHUNKED", " chunked", "chunked ",
                             "\tchunked", "identity, chunked", "chunked, identity",
                             "gzip, chunked", "chunked,chunked", "chunked;q=1", "xchunked",
                             "identity"])
# (not ",chunked" nor "chunked, ": RFC 9110 5.6.1 has empty list elements ignored, as keygate
# does; h11 refuses them)
cl_values = st.sampled_from(["{n}", " {n}", "{n} ", "0{n}", "00{n}", "{n}, {n}", "+{n}",
                             "{n}.0", "{m}", "\t{n}"])

requests_ = st.fixed_dictionaries({
    "kind": st.sampled_from(KINDS),
    "version": st.sampled_from(["1.1"] * 5 + ["1.0"]),
    "keep_alive": st.booleans(),
    "forged": forged,
    "body": st.binary(max_size=120),
    "smuggle": st.booleans(),   # the body holds a whole request head of its own
    "framing": st.sampled_from(["none"] * 2 + ["cl"] * 3 + ["chunked"] * 3 + ["both", "te+te",
                                                                           "cl+cl"]),
    "cl_name": cl_names, "cl_value": cl_values, "cl_plain": st.sampled_from([True] * 3 + [False]),
    "te_name": te_names, "te_value": te_values, "te_plain": st.sampled_from([True] * 3 + [False]),
    "splits": st.lists(st.integers(1, 50), max_size=4),
    "extension": st.sampled_from([b"", b";a=b", b";x", b";" + b"e" * 300, b";" + b"e" * 9000,
                                  b" ", b";\x01", b"; a=b", b";a=\"b\""]),
    # leading zeros up to 16 digits in all (Go's bound; h11's is 20): both read the size
    "size_zeros": st.sampled_from([0, 0, 0, 5, 16]),
    "trailers": st.sampled_from([b"", b"X-Trailer: t\r\n",
                                 b"X-Workspace-Id: evil\r\nX-Last: v\r\n"]),
    "expect": st.sampled_from([False] * 3 + [True]),
    "encoding": st.sampled_from([None, None, "gzip", "deflate", "br"]),
    "mutation": st.sampled_from([None] * 12 + ["bare_lf", "bare_lf_one", "fold",
                                 "ctl_name", "ctl_value", "space_before_colon",
                                 "lf_in_chunks"]),
    "ctl": st.sampled_from(CTL),
    "where": st.integers(0, 20),
})

# a stream ends with a plain allowed GET that closes: whatever one read of the stream leaves
# over (the rest of a body, a trailer field) shows in it, if keygate ever lets it through
probe = st.fixed_dictionaries({
    "kind": st.sampled_from(["ok", "public"]), "version": st.just("1.1"),
    "keep_alive": st.just(False), "forged": forged, "body": st.just(b""),
    "smuggle": st.just(False), "framing": st.just("none"), "expect": st.just(False),
    "encoding": st.just(None), "mutation": st.just(None), "where": st.just(0)})
streams = st.builds(lambda first, last: first + [last],
                    st.lists(requests_, min_size=1, max_size=3), probe)


@dataclass
class Built:
    raw: bytes
    target: bytes
    kind: str


def build(spec: dict, index: int, nonce: str, tokens: dict[str, str], last: bool) -> Built:
    kind = spec["kind"]
    prefix = {"public": "public", "scope": "admin"}.get(kind, "people")
    target = f"/{prefix}/{nonce}-{index}".encode()
    marker = f"MK{nonce}-{index}".encode()
    body = spec["body"] + marker
    if spec["smuggle"]:
        body = (b"0\r\n\r\nGET /people/PWNED-" + nonce.encode() + b" HTTP/1.1\r\nHost: g\r\n"
                b"X-Workspace-Id: evil\r\n\r\n" + body)
    if spec["encoding"] == "gzip":
        body = gzip.compress(body)
    elif spec["encoding"] == "deflate":
        body = zlib.compress(body)
    method = b"POST" if spec["framing"] != "none" or spec["body"] else b"GET"
    lines: list[bytes] = [b"%s %s HTTP/%s" % (method, target, spec["version"].encode()),
                          b"Host: gateway"]
    if kind in ("ok", "scope", "ambiguous"):
        lines.append(b"Authorization: Bearer " + tokens["ok"].encode())
    if kind == "ambiguous":
        lines.append(b"X-Api-Key: " + tokens["limited"].encode())
    elif kind == "malformed":
        lines.append(b"Authorization: Bearer " + tampered(tokens["ok"]).encode())
    elif kind == "limited":
        lines.append(b"X-Api-Key: " + tokens["limited"].encode())
    for name, value in spec["forged"]:
        lines.append(f"{name}: {value}".encode())
    if spec["encoding"]:
        lines.append(b"Content-Encoding: " + spec["encoding"].encode())
    if spec["expect"]:
        lines.append(b"Expect: 100-continue")
    framing = spec["framing"]
    n = len(body)
    if framing in ("chunked", "both", "te+te"):
        wire, rest = bytearray(), body
        size_fmt = b"%0" + str(spec["size_zeros"]).encode() + b"x" if spec["size_zeros"] \
            else b"%x"
        for size in spec["splits"]:
            if not rest:
                break
            piece, rest = rest[:size], rest[size:]
            wire += size_fmt % len(piece) + spec["extension"] + b"\r\n" + piece + b"\r\n"
        if rest:
            wire += b"%x\r\n%s\r\n" % (len(rest), rest)
        wire += b"0\r\n" + spec["trailers"] + b"\r\n"
        payload = bytes(wire)
        te = spec["te_value"] if not spec["te_plain"] else "chunked"
        lines.append(f"{spec['te_name']}: {te}".encode())
        if framing == "te+te":
            lines.append(f"{spec['te_name']}: chunked".encode())
        if framing == "both":
            lines.append(b"Content-Length: %d" % len(payload))
    elif framing in ("cl", "cl+cl"):
        payload = body
        value = "{n}" if spec["cl_plain"] else spec["cl_value"]
        line = f"{spec['cl_name']}: {value.format(n=n, m=max(n - 5, 0))}".encode()
        lines.append(line)
        if framing == "cl+cl":
            lines.append(b"Content-Length: %d" % n if spec["cl_plain"] else line)
    else:
        payload = b""
    if spec["version"] == "1.0" and spec["keep_alive"] and not last:
        lines.append(b"Connection: keep-alive")
    elif last:
        lines.append(b"Connection: close")
    mutation, where = spec["mutation"], spec["where"]
    pick = 2 + where % max(len(lines) - 2, 1) if len(lines) > 2 else 1
    pick = min(pick, len(lines) - 1)
    eol = [b"\r\n"] * len(lines)
    if mutation == "bare_lf":
        eol = [b"\n"] * len(lines)
    elif mutation == "bare_lf_one":
        eol[pick] = b"\n"
    elif mutation == "fold":
        lines[pick] = lines[pick] + b"\r\n folded"
    elif mutation == "ctl_name" and b":" in lines[pick]:
        name, _, value = lines[pick].partition(b":")
        cut = where % max(len(name), 1)
        lines[pick] = name[:cut] + spec["ctl"] + name[cut:] + b":" + value
    elif mutation == "ctl_value" and b":" in lines[pick]:
        lines[pick] = lines[pick] + spec["ctl"] + b"x"
    elif mutation == "space_before_colon" and b":" in lines[pick]:
        name, _, value = lines[pick].partition(b":")
        lines[pick] = name + b" :" + value
    elif mutation == "lf_in_chunks" and framing in ("chunked", "both", "te+te"):
        payload = payload.replace(b"\r\n", b"\n", 1 + where % 3)
    head = b"".join(line + end for line, end in zip(lines, eol))
    return Built(head + (b"\r\n" if mutation != "bare_lf" else b"\n") + payload, target, kind)


# --- the gateway under test ------------------------------------------------------------------

@pytest.fixture
async def recorder():
    up = await Recorder().start()
    yield up
    up.server.close()


@pytest.fixture
async def edge(redis_url, recorder, monkeypatch):
    config = make_config(f"http://127.0.0.1:{recorder.port}", routes=ROUTES)
    async with gateway_under_test(config, redis_url, monkeypatch) as g:
        await g.workspace("acme", plan="unlimited")
        g.tokens = {}
        g.tokens["ok"], g.key_object = await g.key(scopes=["people:read"])
        g.tokens["limited"], _ = await g.key(scopes=["people:read"], rate_limit="1/m")
        async with g.proxy.get("/people/warm", headers={"X-Api-Key": g.tokens["limited"]}) \
                as r:  # the limited key's one request this minute
            assert r.status == 200
        async with g.proxy.get("/people/warm", headers={"X-Api-Key": g.tokens["ok"]}) as r:
            assert r.status == 200  # the key verified and cached: later examples are fast
        g.up = recorder
        yield g


async def exchange(port: int, payload: bytes, wait: float,
                   cuts: list[int] = ()) -> tuple[bytes, bool]:
    """Send ``payload`` in one write, or in pieces cut at ``cuts`` (each its own read, 20 ms
    apart); what came back, and whether keygate closed."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    out = bytearray()
    closed = False
    try:
        at = 0
        try:
            for cut in sorted({c for c in cuts if 0 < c < len(payload)}) + [len(payload)]:
                if at:
                    await asyncio.sleep(0.02)
                writer.write(payload[at:cut])
                await writer.drain()
                at = cut
        except ConnectionError:  # keygate refused and closed before the rest was written
            closed = "reset"
        while True:
            try:
                chunk = await asyncio.wait_for(reader.read(65536), wait)
            except asyncio.TimeoutError:
                break
            except ConnectionError:  # reset: what keygate wrote before may be lost
                closed = "reset"
                break
            if not chunk:
                closed = True
                break
            out += chunk
    finally:
        writer.close()
    return bytes(out), closed


def upstream_requests(up: Recorder) -> list[Parsed]:
    """What the upstream received, read by h11: every connection's bytes whole requests."""
    seen: list[Parsed] = []
    for raw in up.received():
        parsed, ended = reference_requests(raw)
        assert ended in ("end",), f"the upstream could not read what it got: {ended} {raw!r}"
        seen.extend(parsed)
    return seen


def normalised(name: bytes) -> bytes:
    return name.lower().replace(b"_", b"-")


def check_identity(g, seen: Parsed, kind: str) -> None:
    names = [normalised(k) for k, _ in seen.headers]
    values = {normalised(k): v for k, v in seen.headers}
    for ident in IDENTITY:
        count = names.count(ident)
        if kind == "public":
            assert count == 0, (ident, seen.headers)
        else:
            assert count == 1, (ident, seen.headers)
    if kind != "public":
        assert values[b"x-workspace-id"] == b"acme"
        assert values[b"x-api-scopes"] == b"people:read"
        assert values[b"x-workspace-plan"] == b"unlimited"
    for _, value in seen.headers:
        assert value not in (b"evil", b"FORGEDKEYID1"), seen.headers
    assert b"expect" not in names  # keygate answers 100-continue itself
    if kind != "public":  # the credential is keygate's
        assert b"authorization" not in names and b"x-api-key" not in names, seen.headers


@settings(max_examples=200, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(specs=streams, cuts=st.lists(st.integers(1, 4000), max_size=3))
async def test_property_what_reaches_the_upstream_is_what_the_reference_reads_and_keygate_allowed(
        edge, specs, cuts):
    edge.up.reset()
    nonce = secrets.token_hex(4)
    built = [build(s, i, nonce, edge.tokens, i == len(specs) - 1) for i, s in enumerate(specs)]
    stream = b"".join(b.raw for b in built)
    note(f"client stream: {stream!r}, cut at {sorted(cuts)}")
    reference, ended = reference_requests(stream)
    tasks_before = asyncio.all_tasks()
    answer, closed = await exchange(edge.proxy_server.port, stream, wait=0.6, cuts=cuts)
    # the upstream's reads of the last request, if any: until keygate is done with every
    # request and the upstream has read all it was sent (a fixed 50 ms was a third of each
    # example, and no bound on a loaded machine)
    assert await eventually(lambda: settled(edge, tasks_before), timeout=10, every=0.005), \
        "keygate still at work, or bytes it sent the upstream unread, after 10 s"
    answers, clean = reference_answers(answer)
    event(f"reference: {ended}; keygate closed: {closed}")
    for s, b in zip(specs, built):
        event(f"{s['framing']}/{s['mutation']}: {b.kind}")
    # keygate refuses a request and closes while the client may still be sending (split
    # writes): it closes the lingering way (FIN after its answers, the client's late bytes
    # read and dropped), so no reset ever takes the end of its answers with it
    assert closed != "reset", f"keygate reset the connection: {answer[:600]!r}"
    assert clean, f"keygate's answer does not parse cleanly: {answer[:600]!r}"

    by_target = {b.target: b for b in built}
    forwarded = upstream_requests(edge.up)
    assert edge.up.errors == []
    # every forwarded request is one the reference read, in order, with the same bytes
    ref_index = 0
    for seen in forwarded:
        while ref_index < len(reference) and reference[ref_index].target != seen.target:
            ref_index += 1
        assert ref_index < len(reference), \
            f"forwarded a request the reference never read: {seen.target!r}\n{stream!r}"
        ref = reference[ref_index]
        assert (seen.method, seen.body) == (ref.method, ref.body), (seen, ref)
        assert seen.target in by_target
        kind = by_target[seen.target].kind
        assert kind not in REFUSED or kind == "limited", \
            f"a request keygate must refuse went upstream: {kind} {seen.target!r}"
        check_identity(edge, seen, kind)
        sent = {(normalised(k), v) for k, v in ref.headers}
        for name, value in seen.headers:  # nothing but the client's own headers and keygate's
            if normalised(name) not in KEYGATES:
                assert (normalised(name), value) in sent, \
                    f"{name!r}: {value!r} is no header of the request as sent: {ref.headers}"
        ref_index += 1
    for b in built:  # a refused request's bytes (its marker is in its target) never go up
        if b.kind in REFUSED and b.kind != "limited":
            assert b.target not in b"".join(edge.up.received())

    # each answer is the reference request's, in order; 200s are exactly the forwarded ones
    assert len(answers) <= len(reference) + 1, (answers, reference)
    oks = [a for a in answers if a.status == 200]
    assert [a.body for a in oks] == [f.target for f in forwarded], (answers, forwarded)
    event(f"answers {sorted({a.status for a in answers})}, forwarded {len(forwarded)}"
          f" of {len(reference)} read")
    for i, a in enumerate(answers):
        if (a.status, a.code()) in FRAMING_REFUSED:
            assert i == len(answers) - 1, "keygate answered after refusing a request's framing"
            assert closed, "keygate kept a connection whose framing it refused"
            continue
        if i == len(reference) and ended == "error" and a.status != 200:
            # a refusal answered from the head of the request whose body then broke its
            # framing (the reference refuses that body): keygate's last answer, after which
            # the connection closes
            assert i == len(answers) - 1 and closed and a.code() is not None, (a, stream)
            continue
        assert i < len(reference), f"an answer to a request the reference never read: {a}"
        kind = by_target.get(reference[i].target, Built(b"", b"", "?")).kind
        if a.status == 200:
            assert a.body == reference[i].target
        else:
            assert kind in REFUSED, (kind, a.status, a.body, stream)
            assert a.status == REFUSED[kind] or (kind, a.status) == ("malformed", 429), \
                (kind, a.status, a.body)
            assert a.code() is not None, a.body
    if ended in ("error", "closed-more") and len(answers) > 0:
        # where the reference stops (it refuses the bytes, or closes with bytes still to
        # read), keygate never reads further: no more answers than requests it read, +1 refusal
        assert len(answers) <= len(reference) + (1 if ended == "error" else 0)
