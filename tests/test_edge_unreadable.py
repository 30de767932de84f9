"""Requests the proxy listener's HTTP parser refuses, and heads that never come whole, in the
access log and ``keygate_requests_total``, as nginx and Envoy log them.

aiohttp answers a request it cannot parse (bad header syntax, a head over 32 KiB, a version
keygate refuses, broken framing) with keygate's JSON 400 before the pipeline sees it: that
answer had no access-log line and no metric, so an operator looking for "my client got a
400" found nothing. A real gateway, raw sockets, the line read from its stderr.
"""

from __future__ import annotations

import asyncio
import json
import re

import pytest

from gateway.config import Route, ServerConfig, Timeouts
from gateway.proxying.server import HEAD_MAX
from gateway.tokens import make_token

from harness import closed_within, drips_until_closed, eventually, gateway_under_test, make_config

ROUTES = (Route("/public/**", "api", ("GET", "POST"), (), True),
          Route("/people/**", "api", ("GET", "POST"), ("people:read",)))
TOKEN, _ = make_token("kg", "live")
SECRET = TOKEN[-38:-6]


def config(upstream, access_log: str = "json", header: float = 30.0):
    return make_config(str(upstream.make_url("")), routes=ROUTES, server=ServerConfig(
        host="127.0.0.1", access_log=access_log,
        timeouts=Timeouts(header=header, body=30.0, idle=30.0)))


def access_lines(err: str) -> list[dict]:
    return [entry for entry in (json.loads(line) for line in err.splitlines()
                                if line.startswith("{")) if "logger" not in entry]


UNREADABLE = {
    "bad header syntax": b"GET /public/x HTTP/1.1\r\nHost: g\r\nBad\x01: x\r\n\r\n",
    "head over 32 KiB": b"GET /public/x HTTP/1.1\r\nHost: g\r\n" +
                        b"".join(b"X-Pad-%d: %s\r\n" % (i, b"p" * 1000)
                                 for i in range(HEAD_MAX // 1000 + 2)) + b"\r\n",
    "HTTP/2 preface": b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
    "a token in a malformed head": (
        b"GET /people/1?api_key=" + TOKEN.encode() + b" HTTP/1.1\r\nHost: g\r\n"
        b"Authorization: Bearer " + TOKEN.encode() + b"\r\nX-Bad: " + TOKEN.encode() +
        b"\x01\r\n\r\n"),
    "a token in a request line the parser refuses": (
        b"GET /people/" + TOKEN.encode() + b" HTTP/1.1 extra\r\nHost: g\r\n\r\n"),
    "broken chunked framing": (b"POST /public/x HTTP/1.1\r\nHost: g\r\nTransfer-Encoding: "
                               b"chunked\r\n\r\nzz\r\nab\r\n0\r\n\r\n"),
    "HTTP/1.0 with Transfer-Encoding": (b"POST /public/x HTTP/1.0\r\nHost: g\r\n"
                                        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
}


async def refused(g, payload: bytes) -> tuple[bytes, dict]:
    """Send ``payload`` on a fresh connection: the 400's head (its body's length kept as
    ``refused.body_len``) and its JSON body."""
    reader, writer = await g.raw_connection()
    writer.write(payload)
    closed, answer = await closed_within(reader, 5.0)
    writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert closed and head.startswith(b"HTTP/1.1 400 "), answer[:300]
    refused.body_len = len(body)
    return head, json.loads(body)


def unread_count(g) -> float:
    return g.counter("keygate_requests_total", route="(none)", method="OTHER",
                     status_class="4xx")


@pytest.mark.parametrize("payload", UNREADABLE.values(), ids=UNREADABLE.keys())
async def test_a_request_the_parser_refuses_is_logged_and_counted(redis_url, upstream,
                                                                 monkeypatch, capfd, payload):
    async with gateway_under_test(config(upstream), redis_url, monkeypatch) as g:
        g.logs(capfd)
        before = unread_count(g)
        head, body = await refused(g, payload)
        _, err = g.logs(capfd)
        assert unread_count(g) == before + 1
        rid = body["error"]["request_id"]
        assert body["error"]["code"] == "bad_request"
        # the pipeline's own request ids (its process prefix, a counter), not a stray uuid
        assert rid.startswith(g.gw.pipeline._rid_prefix) and len(rid) == 20, rid
        assert f"X-Request-Id: {rid}".encode() in head
    assert TOKEN not in err and SECRET not in err
    lines = access_lines(err)
    assert len(lines) == 1, err
    line = lines[0]
    assert line["request_id"] == rid
    assert (line["method"], line["path"], line["status"]) == ("-", "-", 400)
    assert (line["error"], line["route"], line["upstream"]) == ("bad_request", None, None)
    assert (line["workspace"], line["key_id"]) == (None, None)
    assert line["client"] == "127.0.0.1"
    assert re.fullmatch(r"[0-9a-f]{32}", line["trace_id"]) and set(line["trace_id"]) != {"0"}
    assert line["bytes_in"] == 0
    assert line["bytes_out"] == refused.body_len
    assert isinstance(line["duration_ms"], float) and line["duration_ms"] >= 0
    assert upstream.requests == []


async def test_each_refusal_gets_its_own_request_id_and_trace(redis_url, upstream,
                                                              monkeypatch, capfd):
    async with gateway_under_test(config(upstream), redis_url, monkeypatch) as g:
        g.logs(capfd)
        _, one = await refused(g, UNREADABLE["HTTP/2 preface"])
        _, two = await refused(g, UNREADABLE["HTTP/2 preface"])
        _, err = g.logs(capfd)
    lines = access_lines(err)
    assert [line["request_id"] for line in lines] == [one["error"]["request_id"],
                                                      two["error"]["request_id"]]
    assert lines[0]["trace_id"] != lines[1]["trace_id"]


async def test_a_request_refused_behind_a_served_one_is_logged_after_it(redis_url, upstream,
                                                                        monkeypatch, capfd):
    """A valid request then a malformed one in one write: the first is served and logged as
    usual, the second gets its own line (the id its 400 said)."""
    async with gateway_under_test(config(upstream), redis_url, monkeypatch) as g:
        g.logs(capfd)
        reader, writer = await g.raw_connection()
        writer.write(b"GET /public/ok HTTP/1.1\r\nHost: g\r\nX-Request-Id: rid-ok\r\n\r\n"
                     + UNREADABLE["bad header syntax"])
        closed, answer = await closed_within(reader, 5.0)
        writer.close()
        _, err = g.logs(capfd)
    assert closed and answer.count(b"HTTP/1.1 ") == 2, answer[:400]
    rid = json.loads(answer.rpartition(b"\r\n\r\n")[2])["error"]["request_id"]
    lines = access_lines(err)
    assert [(line["request_id"], line["method"], line["status"]) for line in lines] == \
        [("rid-ok", "GET", 200), (rid, "-", 400)]


async def test_the_text_log_says_dash_for_the_method_and_path(redis_url, upstream,
                                                              monkeypatch, capfd):
    async with gateway_under_test(config(upstream, "text"), redis_url, monkeypatch) as g:
        g.logs(capfd)
        _, body = await refused(g, UNREADABLE["a token in a malformed head"])
        _, err = g.logs(capfd)
    assert TOKEN not in err and SECRET not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    rid = body["error"]["request_id"]
    assert re.fullmatch(r"127\.0\.0\.1 - - 400 \d+\.\dms ws=- key=- rid=" + rid +
                        r" trace=[0-9a-f]{32}", lines[0]), lines[0]


async def test_a_failing_hook_never_breaks_the_400(redis_url, upstream, monkeypatch, capfd,
                                                   caplog):
    """What logs and counts a refusal raising is logged; the client still gets its 400."""
    async with gateway_under_test(config(upstream), redis_url, monkeypatch) as g:
        def broken(*args, **kwargs):
            raise RuntimeError("the access log is broken")
        monkeypatch.setattr(g.gw.proxy_server, "on_unreadable", broken)
        g.logs(capfd)
        _, body = await refused(g, UNREADABLE["bad header syntax"])
    assert body["error"]["code"] == "bad_request" and body["error"]["request_id"]
    assert "the access log is broken" in caplog.text


async def test_the_admin_listener_logs_no_access_line_for_its_refusals(redis_url, upstream,
                                                                       monkeypatch, capfd):
    """The admin listener shares the handler: its own 400 is as it was (JSON, a request id),
    and the proxy's access log and metric do not count it."""
    async with gateway_under_test(config(upstream), redis_url, monkeypatch) as g:
        g.logs(capfd)
        before = unread_count(g)
        reader, writer = await asyncio.open_connection("127.0.0.1", g.admin_server.port)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: g\r\nBad\x01: x\r\n\r\n")
        closed, answer = await closed_within(reader, 5.0)
        writer.close()
        _, err = g.logs(capfd)
        assert unread_count(g) == before
    assert closed and answer.startswith(b"HTTP/1.1 400 ")
    body = json.loads(answer.partition(b"\r\n\r\n")[2])
    assert body["error"]["code"] == "bad_request" and body["error"]["request_id"]
    assert access_lines(err) == []


# --- server.timeouts.header ---------------------------------------------------------------------

async def test_a_head_cut_off_at_the_header_timeout_is_logged_as_nginx_does(
        redis_url, upstream, monkeypatch, capfd):
    """A slow-loris that sent part of a head: closed unanswered at server.timeouts.header, and
    logged (as nginx logs a client_header_timeout once some bytes came) with status 408
    ``request_timeout``, "-" for the method and path, no body sent, no byte of the head (a
    token in it) written."""
    async with gateway_under_test(config(upstream, header=1.0), redis_url, monkeypatch) as g:
        g.logs(capfd)
        before = unread_count(g)
        reader, writer = await g.raw_connection()
        closed = await drips_until_closed(
            reader, writer, b"GET /people/1 HTTP/1.1\r\nHost: g\r\nAuthorization: Bearer " +
            TOKEN.encode() + b"\r\n", 6.0)
        assert closed
        await eventually(lambda: unread_count(g) == before + 1, 3.0)
        _, err = g.logs(capfd)
    assert TOKEN not in err and SECRET not in err
    lines = access_lines(err)
    assert len(lines) == 1, err
    line = lines[0]
    assert (line["method"], line["path"], line["status"]) == ("-", "-", 408)
    assert (line["error"], line["route"], line["bytes_out"]) == ("request_timeout", None, 0)
    assert line["client"] == "127.0.0.1" and re.fullmatch(r"[0-9a-f]{32}", line["trace_id"])
    assert re.fullmatch(r"[0-9a-f]{20}", line["request_id"])
    assert line["duration_ms"] >= 900


@pytest.mark.parametrize("sent", [b"", b"\r\n\r\n"], ids=["nothing", "blank lines"])
async def test_a_connection_closed_at_the_header_timeout_with_no_head_begun_is_not_logged(
        redis_url, upstream, monkeypatch, capfd, sent):
    """As nginx: a connection that sent no byte of a head (blank lines before a request line
    are none) is closed without a line; so is an idle keep-alive connection."""
    async with gateway_under_test(config(upstream, header=1.0), redis_url, monkeypatch) as g:
        g.logs(capfd)
        before = unread_count(g)
        reader, writer = await g.raw_connection()
        writer.write(sent)
        closed, _ = await closed_within(reader, 5.0)
        writer.close()
        assert closed
        await asyncio.sleep(0.3)
        _, err = g.logs(capfd)
        assert unread_count(g) == before
    assert access_lines(err) == []


async def test_a_chunked_body_broken_mid_body_is_logged_once_as_the_request_it_was(
        redis_url, upstream, monkeypatch, capfd):
    """A body's chunked framing that breaks in a later read than its head: the request was
    under way, and the pipeline answers and logs it (its method and path known); the parser's
    own 400 queued behind it is never sent, so never logged either."""
    async with gateway_under_test(config(upstream), redis_url, monkeypatch) as g:
        g.logs(capfd)
        before = unread_count(g)
        reader, writer = await g.raw_connection()
        writer.write(b"POST /public/x HTTP/1.1\r\nHost: g\r\nX-Request-Id: rid-mid\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
        await asyncio.sleep(0.3)
        writer.write(b"zz\r\nab\r\n0\r\n\r\n")
        closed, answer = await closed_within(reader, 5.0)
        writer.close()
        _, err = g.logs(capfd)
        assert unread_count(g) == before
    assert closed and answer.count(b"HTTP/1.1 ") == 1, answer[:400]
    lines = access_lines(err)
    assert [(line["request_id"], line["method"], line["path"]) for line in lines] == \
        [("rid-mid", "POST", "/public/x")], err


async def test_a_next_head_cut_off_on_a_kept_alive_connection_is_logged(redis_url, upstream,
                                                                       monkeypatch, capfd):
    """A request served, then part of a next head on the same connection and no more: the
    served one's line, then a 408 line for the head cut off (its bytes counted anew, not the
    first head's)."""
    async with gateway_under_test(config(upstream, header=1.0), redis_url, monkeypatch) as g:
        g.logs(capfd)
        reader, writer = await g.raw_connection()
        writer.write(b"GET /public/ok HTTP/1.1\r\nHost: g\r\nX-Request-Id: rid-first\r\n\r\n")
        await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        closed = await drips_until_closed(reader, writer, b"GET /public/next HTTP/1.1\r\n", 6.0)
        assert closed
        await eventually(lambda: unread_count(g) == 1, 3.0)
        _, err = g.logs(capfd)
    lines = access_lines(err)
    assert [(line["request_id"], line["status"]) for line in lines][0] == ("rid-first", 200)
    assert [(line["method"], line["status"], line["error"]) for line in lines[1:]] == \
        [("-", 408, "request_timeout")], err
