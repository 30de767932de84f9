"""The access log: one line per proxied request, JSON by default, text or off on request, and
never a token (not from a header, not from the query string)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import re
import signal
import socket
import subprocess
import sys
import json
import time
from pathlib import Path
from urllib.parse import quote, unquote

import pytest
from aiohttp import ClientSession, ClientTimeout
from hypothesis import given, strategies as st

from gateway.accesslog import _js, mask_query
from gateway.config import Route, Timeouts
from gateway.tokens import make_token

from harness import (VERIFY, bearer, closed_within, eventually, gateway_under_test,
                     make_config, raw_upstream, verify_config)
from served import ADMIN_TOKEN as ADMIN_TOKEN_OF_SERVE, Served, new_key, write_config

TOKEN, _ = make_token("kg", "live")

FIELDS = ("time", "request_id", "method", "path", "status", "workspace", "key_id", "route",
          "upstream", "bytes_in", "bytes_out")


def config_with(upstream, access_log: str):
    config = make_config(str(upstream.make_url("")))
    return dataclasses.replace(config, server=dataclasses.replace(config.server,
                                                                  access_log=access_log))


def json_lines(err: str) -> list[dict]:
    """The access lines (application log lines carry a "logger" field)."""
    return [entry for entry in all_json_lines(err) if "logger" not in entry]


def all_json_lines(err: str) -> list[dict]:
    return [json.loads(line) for line in err.splitlines() if line.startswith("{")]


async def test_json_lines_carry_every_field(redis_url, upstream, monkeypatch, capfd):
    async with gateway_under_test(config_with(upstream, "json"), redis_url, monkeypatch) as g:
        await g.workspace("acme")
        token, key = await g.key(scopes=["people:read", "people:write"])
        g.logs(capfd)
        async with g.proxy.post("/people", data=b"x" * 123,
                                headers={**bearer(token), "X-Request-Id": "rid-post-1"}) as r:
            assert r.status == 200
            body = await r.read()
        async with g.proxy.get("/people/1") as r:
            assert r.status == 401
            await r.read()
        out, err = g.logs(capfd)
    lines = json_lines(err)
    assert len(lines) == 2, err
    ok, refused = lines
    for line in lines:
        assert set(FIELDS) <= set(line), line
        assert any(k.startswith("duration") and isinstance(v, (int, float)) and v >= 0
                   for k, v in line.items()), line
        assert time.strptime(line["time"], "%Y-%m-%dT%H:%M:%SZ")
    assert ok["request_id"] == "rid-post-1" and ok["method"] == "POST"
    assert ok["path"] == "/people" and ok["status"] == 200
    assert ok["workspace"] == "acme" and ok["key_id"] == key["id"]
    assert ok["route"] == "/people/**" and ok["upstream"] == "api"
    assert ok["bytes_in"] == 123 and ok["bytes_out"] == len(body)
    assert refused["status"] == 401 and refused["workspace"] is None and refused["key_id"] is None
    assert refused["request_id"]  # generated, and the same one the client got
    assert out == ""  # stdout stays clean


async def test_no_token_in_the_log_from_header_or_query(redis_url, upstream, monkeypatch, capfd):
    async with gateway_under_test(config_with(upstream, "json"), redis_url, monkeypatch) as g:
        await g.workspace("acme")
        token, _ = await g.key()
        secret = token[-38:-6]
        g.logs(capfd)
        async with g.proxy.get("/people/1", headers=bearer(token)) as r:
            assert r.status == 200
        async with g.proxy.get("/people/1", headers={"X-Api-Key": token}) as r:
            assert r.status == 200
        async with g.proxy.get(f"/people/1?q=ada&token={token}&page=2",
                               headers=bearer(token)) as r:
            assert r.status == 400 and (await r.json())["error"]["code"] == "key_in_url"
            rid = r.headers["X-Request-Id"]
        _, err = g.logs(capfd)
    assert token not in err and secret not in err
    lines = json_lines(err)
    assert len(lines) == 3
    masked = next(line for line in lines if line["request_id"] == rid)
    assert masked["path"] == "/people/1?q=ada&token=***&page=2"
    assert masked["status"] == 400


async def test_text_access_log_gives_one_plain_line_per_request(redis_url, upstream,
                                                               monkeypatch, capfd):
    async with gateway_under_test(config_with(upstream, "text"), redis_url, monkeypatch) as g:
        await g.workspace("acme")
        token, key = await g.key()
        g.logs(capfd)
        async with g.proxy.get(f"/people/1?x=1&k={token}", headers=bearer(token)) as r:
            assert r.status == 400
        async with g.proxy.get("/people/1", headers={**bearer(token), "X-Request-Id": "rid-t"}) as r:
            assert r.status == 200
        _, err = g.logs(capfd)
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 2, err
    assert not any(line.lstrip().startswith("{") for line in lines)
    assert token not in err
    assert "GET /people/1?x=1&k=*** 400" in lines[0]
    assert "GET /people/1 200" in lines[1] and "rid-t" in lines[1] and key["id"] in lines[1]


async def test_access_log_off_writes_nothing(redis_url, upstream, monkeypatch, capfd):
    async with gateway_under_test(config_with(upstream, "off"), redis_url, monkeypatch) as g:
        await g.workspace("acme")
        token, _ = await g.key()
        g.logs(capfd)
        for headers in (bearer(token), {}):
            async with g.proxy.get("/people/1", headers=headers) as r:
                await r.read()
        _, err = g.logs(capfd)
    assert err.strip() == ""


def served_with_json_log(tmp_path, upstream, redis_url) -> Served:
    """A ``keygate serve`` process with the JSON access log on, before the given upstream."""
    config, pport, aport = write_config(tmp_path, redis_url=redis_url,
                                        upstream_url=str(upstream.make_url("")),
                                        access_log="json")
    return Served(config, pport, aport)


async def test_keygate_serve_writes_json_access_lines_to_stderr(tmp_path, upstream, redis_url):
    gw = served_with_json_log(tmp_path, upstream, redis_url)
    config = gw.config
    try:
        await gw.ready()
        async with ClientSession(timeout=ClientTimeout(total=15)) as s:
            token = await new_key(s, gw.admin)
            async with s.get(gw.proxy + "/people/1", headers=bearer(token)) as r:
                assert r.status == 200
            async with s.get(gw.proxy + f"/people/1?token={token}") as r:
                assert r.status == 400
        assert gw.terminate() == 0
        err = gw.stderr()
    finally:
        gw.close()
    assert token not in err
    lines = json_lines(err)
    assert [(line["path"], line["status"]) for line in lines] == [
        ("/people/1", 200), ("/people/1?token=***", 400)]
    assert lines[0]["workspace"] == "acme"
    # with a JSON access log, every line on stderr is JSON: the application's too
    text_lines = [line for line in err.splitlines() if line.strip() and not line.startswith("{")]
    assert text_lines == []
    app = [entry for entry in all_json_lines(err) if "logger" in entry]
    listening = [e["message"] for e in app if "listening" in e["message"]]
    assert listening and f"config {config}" in listening[0]  # serve says which file it runs
    assert all({"time", "level", "logger", "message"} <= set(e) for e in app)
    # admin calls are logged, with who and the answer, never the token
    admin = [e for e in app if e["logger"] == "keygate.admin"]
    assert [(e["method"], e["status"], e["actor"]) for e in admin][:2] == [
        ("POST", 201, "operator"), ("POST", 201, "operator")]
    assert admin[1]["path"] == "/admin/v1/workspaces/acme/keys"
    assert ADMIN_TOKEN_OF_SERVE not in err


async def test_sigterm_right_after_a_burst_loses_no_access_line(tmp_path, upstream, redis_url):
    gw = served_with_json_log(tmp_path, upstream, redis_url)
    try:
        await gw.ready()
        async with ClientSession(timeout=ClientTimeout(total=30)) as s:
            token = await new_key(s, gw.admin)

            async def one(i: int) -> int:
                async with s.get(gw.proxy + f"/people/{i}", headers=bearer(token)) as r:
                    return r.status
            statuses = await asyncio.gather(*(one(i) for i in range(200)))
        assert statuses == [200] * 200
        assert gw.terminate() == 0          # at once: lines still buffered must be written
        err = gw.stderr()
    finally:
        gw.close()
    paths = sorted(line["path"] for line in json_lines(err))
    assert paths == sorted(f"/people/{i}" for i in range(200))


async def test_a_blocked_stderr_never_stalls_requests_and_drops_are_counted(
        redis_url, upstream, monkeypatch):
    """stderr is a pipe nobody reads: the writer thread blocks once the pipe is full, and the
    requests go on at full speed; past the buffer bound, lines are dropped and counted."""
    read_end, write_end = os.pipe()
    blocked = os.fdopen(write_end, "w")
    try:
        async with gateway_under_test(config_with(upstream, "json"), redis_url,
                                      monkeypatch) as g:
            await g.workspace("acme")
            token, _ = await g.key(scopes=["people:read"])
            monkeypatch.setattr(sys, "stderr", blocked)
            g.gw.access_log.max_buffer = 64 * 1024
            started = time.monotonic()
            for batch in range(10):
                async def one(i: int) -> int:
                    async with g.proxy.get(f"/people/{i}", headers=bearer(token)) as r:
                        await r.read()
                        return r.status
                assert await asyncio.gather(*(one(i) for i in range(100))) == [200] * 100
                await asyncio.sleep(0.12)     # let the flusher hand lines to the stuck writer
            elapsed = time.monotonic() - started
            dropped = g.gw.access_log.dropped
            assert dropped > 0
            assert g.counter("keygate_access_log_dropped_total") == dropped
            assert elapsed < 20
            monkeypatch.setattr(sys, "stderr", sys.__stderr__)
            os.set_blocking(read_end, False)   # unblock the writer so the gateway can stop
            drain = asyncio.ensure_future(_drain(read_end))
        drain.cancel()
    finally:
        blocked.close()
        os.close(read_end)



async def test_lines_a_failing_stderr_loses_are_counted_as_dropped(redis_url, upstream,
                                                                    monkeypatch):
    """A stderr that refuses writes (its reader gone: EPIPE; a file on a full disk: ENOSPC)
    lost every access and application line without a trace: requests went on, as they must,
    but ``keygate_access_log_dropped_total`` and ``keygate_log_lines_dropped_total`` stayed
    at 0, so neither the dashboard nor the KeygateLogLinesDropped alert told the operator the
    log had stopped. Lines that could not be written are counted as dropped."""
    import logging
    from gateway.accesslog import BackgroundHandler
    read_end, write_end = os.pipe()
    os.close(read_end)                         # nobody will ever read: writes fail with EPIPE
    gone = os.fdopen(write_end, "w")
    handler = BackgroundHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)                   # as keygate serve installs it, before the app
    try:
        async with gateway_under_test(config_with(upstream, "json"), redis_url,
                                      monkeypatch) as g:
            monkeypatch.setattr(sys, "stderr", gone)
            for _ in range(20):
                async with g.proxy.get("/health") as r:
                    assert r.status == 200
            assert await eventually(lambda: g.gw.access_log.dropped == 20), \
                g.gw.access_log.dropped
            assert g.counter("keygate_access_log_dropped_total") == 20
            # what else reached the root logger meanwhile (an earlier test in this worker may
            # have left a logger propagating each request's line to it) is counted first
            await asyncio.to_thread(handler.flush)
            await asyncio.sleep(0.2)
            before = g.counter("keygate_log_lines_dropped_total")
            for i in range(7):
                logging.getLogger("keygate.test").warning("line %d", i)
            assert await eventually(
                lambda: g.counter("keygate_log_lines_dropped_total") == before + 7), \
                (before, g.counter("keygate_log_lines_dropped_total"))
            async with g.proxy.get("/health") as r:  # requests go on all the same
                assert r.status == 200
            monkeypatch.setattr(sys, "stderr", sys.__stderr__)
    finally:
        root.removeHandler(handler)
        gone.close()

def serve_into_a_pipe(config: Path) -> tuple[subprocess.Popen, int]:
    """``keygate serve`` whose stderr is a pipe: (the process, the pipe's read end, which the
    test reads or leaves unread)."""
    from served import env
    read_end, write_end = os.pipe()
    proc = subprocess.Popen([sys.executable, "-m", "gateway", "serve", "--config", str(config)],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=write_end, env=env(), cwd=str(config.parent))
    os.close(write_end)
    return proc, read_end


async def until_answering(s: ClientSession, url: str, timeout: float = 20) -> None:
    """Until ``url`` answers 2xx (the gateway is up)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            async with s.get(url) as r:
                await r.read()
                if r.status < 300:
                    return
        except OSError:
            pass
        assert time.monotonic() < deadline, "keygate serve did not start"
        await asyncio.sleep(0.1)


async def test_sigterm_exits_even_when_stderr_is_a_pipe_nobody_reads(tmp_path, upstream,
                                                                     redis_url):
    """AccessLog.close() waits 5 s for the writer thread, then shutdown(wait=False); but the
    writer is a ThreadPoolExecutor thread stuck in os.write(), and the interpreter joins those
    threads at exit. With stderr blocked (a stalled log collector), SIGTERM never ends the
    process (the supervisor has to SIGKILL it, losing whatever else shutdown does)."""
    config, pport, aport = write_config(tmp_path, redis_url=redis_url,
                                        upstream_url=str(upstream.make_url("")),
                                        access_log="json", log_level="warning")
    proc, read_end = serve_into_a_pipe(config)
    try:
        async with ClientSession(timeout=ClientTimeout(total=10)) as s:
            await until_answering(s, f"http://127.0.0.1:{pport}/health")
            for _ in range(8):                       # ~300 KB of lines: the pipe (64 KiB) fills
                async def one() -> int:
                    async with s.get(f"http://127.0.0.1:{pport}/health") as r:
                        await r.read()
                        return r.status
                assert await asyncio.gather(*(one() for _ in range(100))) == [200] * 100
                await asyncio.sleep(0.15)
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(20)
        except subprocess.TimeoutExpired:
            code = None
        assert code == 0, "keygate serve did not exit within 20 s of SIGTERM (stderr blocked)"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        os.close(read_end)



async def _drain(fd: int) -> None:
    while True:
        try:
            if not os.read(fd, 1 << 16):
                return
        except BlockingIOError:
            await asyncio.sleep(0.01)


async def test_admin_calls_are_logged_without_tokens(redis_url, upstream, monkeypatch, caplog):
    """Every admin call is logged with its outcome and actor; a refused token is never
    written, nor a key that appears in the path."""
    import logging
    from harness import ADMIN_TOKEN
    caplog.set_level(logging.INFO, logger="keygate.admin")
    async with gateway_under_test(config_with(upstream, "json"), redis_url, monkeypatch) as g:
        await g.workspace("acme")
        token, key = await g.key(scopes=["people:read"])
        async with g.admin.get(f"/admin/v1/workspaces/acme/keys/{token}") as r:
            assert r.status == 404
        async with g.admin.get("/admin/v1/workspaces",
                               headers={"Authorization": "Bearer wrong-operator-token"}) as r:
            assert r.status == 401
        async with g.admin.get("/healthz") as r:   # probes are not admin calls
            assert r.status == 200
    records = [r for r in caplog.records if r.name == "keygate.admin"]
    calls = [(r.method, r.path, r.status, r.actor) for r in records]
    assert calls == [
        ("POST", "/admin/v1/workspaces", 201, "operator"),
        ("POST", "/admin/v1/workspaces/acme/keys", 201, "operator"),
        ("GET", "/admin/v1/workspaces/acme/keys/***", 404, "operator"),
        ("GET", "/admin/v1/workspaces", 401, "-"),
    ]
    # operations.md: the line names the client address. Only the JSON line had it (a field
    # of its own): with access_log text or off the message is the whole line, and it ended
    # at the actor, so a text log could not say where a refused or leaked token came from.
    assert [r.getMessage().rsplit(" ", 1)[1] for r in records] == ["127.0.0.1"] * 4
    assert records[3].getMessage() == "admin GET /admin/v1/workspaces 401 - 127.0.0.1"
    text = caplog.text + "".join(str(r.__dict__) for r in records)
    for secret in (token, ADMIN_TOKEN, "wrong-operator-token"):
        assert secret not in text


async def test_a_token_in_an_admin_path_is_never_echoed_in_the_answer(redis_url, upstream,
                                                                      monkeypatch):
    """SPEC: no error message echoes a token found in the path. The 404 for a key id that is
    not one repeated the whole path segment, a pasted token included."""
    async with gateway_under_test(config_with(upstream, "json"), redis_url, monkeypatch) as g:
        await g.workspace("acme")
        token, _ = await g.key(scopes=["people:read"])
        for path in (f"/admin/v1/workspaces/acme/keys/{token}",
                     f"/admin/v1/workspaces/acme/keys/{token}/revoke",
                     f"/admin/v1/workspaces/{token}/keys", f"/admin/v1/workspaces/{token}"):
            method = "POST" if path.endswith("revoke") else "GET"
            async with g.admin.request(method, path) as r:
                assert r.status == 404, path
                assert token not in await r.text(), path
        async with g.proxy.get(f"/_keygate/v1/keys/{token}",
                               headers={"Authorization": "Bearer " + (await g.key(
                                   role="admin"))[0]}) as r:
            assert r.status == 404
            assert token not in await r.text()


# --- keys in the query or the path never reach the log -------------------------------------------


def _recoverable(logged: str) -> bool:
    """Could a reader of the log line get the token back (decoding up to three times)?"""
    text = logged
    for _ in range(4):
        if TOKEN in text or TOKEN[-38:-6] in text:
            return True
        text = unquote(text.replace("+", " "))
    return False


@pytest.mark.parametrize("query", [
    f"a=1;token={TOKEN}",                                  # ';' separator
    f"token={TOKEN};a=1",
    f"token=%6B{TOKEN[1:]}",                                 # first letter percent-encoded
    f"token={quote(quote(TOKEN, safe=''), safe='')}",         # double-encoded
    "token=" + "".join(f"%{b:02X}" for b in TOKEN.encode()),  # every byte encoded
    f"next=https%3A%2F%2Fx.example%2F%3Fkey%3D{TOKEN}",     # inside a larger value
    f"q=Bearer+{TOKEN}",
    f"{TOKEN}=1",                                            # in a name
    f"a={TOKEN}&a={TOKEN}",                                  # repeated
])
def test_access_log_masks_every_query_form_the_gateway_refuses_as_key_in_url(query):
    from gateway.routes import query_has_token
    assert query_has_token(query, "kg")  # the pipeline refuses it as key_in_url ...
    assert not _recoverable(mask_query(query, "kg"))  # ... and the log must not hold it


def test_access_log_keeps_queries_without_keys_as_sent():
    q = "q=ada%20lovelace&page=2&sort=-name;x=1&kg_x=y"
    assert mask_query(q, "kg") == q


async def test_a_key_in_the_path_is_forwarded_but_never_logged(redis_url, upstream, monkeypatch,
                                                                capfd):
    config = make_config(str(upstream.make_url("")))
    async with gateway_under_test(config, redis_url, monkeypatch) as g:
        await g.workspace("acme")
        token, _ = await g.key()
        g.logs(capfd)
        for path in (f"/people/{token}", f"/people/x{token}y/z"):
            async with g.proxy.get(path, headers=bearer(token)) as r:
                assert r.status == 200  # SPEC refuses keys in the query only
        _, err = g.logs(capfd)
    assert token not in err and token[-38:-6] not in err
    paths = [json.loads(line)["path"] for line in err.splitlines() if line.startswith("{")]
    assert paths == ["/people/***", "/people/x***y/z"]


def test_access_log_path_masking_handles_encoded_keys():
    from gateway.accesslog import mask_path
    assert mask_path("/people/1", "kg") == "/people/1"
    assert mask_path("/a/kg_live_short/b%C3%A9", "kg") == "/a/kg_live_short/b%C3%A9"
    assert mask_path(f"/a/%6B{TOKEN[1:]}", "kg") == "/***"
    assert mask_path(f"/a/{quote(TOKEN, safe='')}".replace("_", "%5F"), "kg") == "/***"


def test_a_key_cut_short_is_masked_once_any_of_its_secret_follows_the_key_id():
    """A token pasted cut short (a line wrapped, a copy stopped early) still holds part of its
    secret: 20 of its 32 characters leave 12 to guess. Only a whole secret's worth was
    masked, so the log kept the 20. Masked now from the first character after the key id;
    the key's public prefix (``kg_live_<id>``, shown in listings) stays as it is."""
    from gateway.accesslog import mask_path
    head = len("kg_live_") + 12
    for cut in (head + 1, head + 20, head + 31, head + 32):
        part = TOKEN[:cut]
        assert mask_path(f"/people/{part}/x", "kg") == "/people/***/x", cut
        assert mask_query(f"q=1&token={part}", "kg") == "q=1&token=***", cut
    assert mask_path(f"/people/{TOKEN[:head]}", "kg") == f"/people/{TOKEN[:head]}"
    assert mask_path("/a/kg_live_short/b", "kg") == "/a/kg_live_short/b"


@given(st.text() | st.text(alphabet=st.characters(max_codepoint=0x80))
       | st.text(alphabet=st.characters(blacklist_categories=())))
def test_every_string_field_is_written_as_json_that_reads_back_as_sent(value):
    """The line's string fields go through json's C escaper without json.dumps around it;
    whatever the value (quotes, backslashes, control characters, U+2028, non-ASCII, lone
    surrogates from undecodable bytes), the JSON is the same."""
    assert _js(value) == json.dumps(value)
    assert json.loads(_js(value)) == value


def test_lines_go_to_a_shared_pipe_in_whole_line_writes_of_at_most_pipe_buf(monkeypatch):
    """Workers share one stderr pipe: each write must be whole lines and at most PIPE_BUF
    bytes (atomic), or two workers' lines interleave mid-line. A SOCK_SEQPACKET pair keeps
    every write a message of its own, so the test sees each write as made."""
    import socket
    from gateway import accesslog

    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
    theirs.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)

    class Stderr:
        def fileno(self):
            return ours.fileno()

    monkeypatch.setattr(accesslog.sys, "stderr", Stderr())
    lines = [("x" * (i * 37 % 900)) + f" line {i}\n" for i in range(300)]
    lines.insert(150, "L" * 6000 + "\n")   # longer than PIPE_BUF: goes out alone, whole
    accesslog._write_block(accesslog._encode(lines))
    ours.close()
    writes = []
    while chunk := theirs.recv(1 << 16):
        writes.append(chunk)
    assert b"".join(writes).decode() == "".join(lines)
    assert len(writes) > 10
    for chunk in writes:
        assert chunk.endswith(b"\n")
        assert len(chunk) <= 4096 or chunk.count(b"\n") == 1


# --- bytes_out: the response body's bytes, never the status line, headers or chunk framing ----

STREAMED = {                      # path → (the body's pieces, how the upstream frames them)
    "/public/chunked": ([b"c" * 1000] * 5, "chunked"),
    "/public/large": ([b"l" * 65536] * 4, "length"),
    "/public/close": ([b"e" * 700] * 3, "close"),   # no length: the body ends with the connection
}
PUBLIC = (Route("/public/**", "api", ("GET", "HEAD"), (), True),)


async def _bytes_upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """A loopback upstream answering ``/public/...``: a whole 2-byte body, 204, 304, and the
    STREAMED bodies written piece by piece with pauses, so keygate streams them back."""
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            is_head = head.startswith(b"HEAD ")
            path = head.split(b" ", 2)[1].decode()
            if path in STREAMED:
                pieces, framing = STREAMED[path]
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n" + {
                    "chunked": b"Transfer-Encoding: chunked\r\n\r\n",
                    "length": b"Content-Length: %d\r\n\r\n" % sum(map(len, pieces)),
                    "close": b"Connection: close\r\n\r\n"}[framing])
                for piece in pieces:
                    await writer.drain()
                    await asyncio.sleep(0.02)
                    writer.write(b"%x\r\n%s\r\n" % (len(piece), piece)
                                 if framing == "chunked" else piece)
                if framing == "chunked":
                    writer.write(b"0\r\n\r\n")
                await writer.drain()
                if framing == "close":
                    return
            elif path == "/public/cut":  # 3000 bytes of the 10000 it declares, then gone
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10000\r\n\r\n")
                await writer.drain()
                await asyncio.sleep(0.02)
                writer.write(b"t" * 3000)
                await writer.drain()
                await asyncio.sleep(0.1)
                return
            elif path == "/public/no-content":
                writer.write(b"HTTP/1.1 204 No Content\r\nX-A: b\r\n\r\n")
            elif path == "/public/not-modified":
                writer.write(b"HTTP/1.1 304 Not Modified\r\nETag: \"v1\"\r\n\r\n")
            else:
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
                             b"Content-Length: 2\r\n\r\n" + (b"" if is_head else b"ok"))
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


def line_of(err: str, request_id: str) -> dict:
    lines = [line for line in json_lines(err) if line["request_id"] == request_id]
    assert len(lines) == 1, err
    return lines[0]


@contextlib.asynccontextmanager
async def public_gateway_before(answer, redis_url, monkeypatch, capfd):
    """A gateway whose public routes go to a raw upstream that runs ``answer`` per connection,
    its log read so far (the test reads its own with ``g.logs(capfd)``)."""
    server, url = await raw_upstream(answer)
    try:
        async with gateway_under_test(make_config(url, routes=PUBLIC), redis_url,
                                      monkeypatch) as g:
            g.logs(capfd)
            yield g
    finally:
        server.close()


@pytest.mark.parametrize("method, path, length", [
    ("GET", "/public/whole", 2),                  # complete with its head: WholeResponse
    ("GET", "/public/chunked", 5000),             # streamed, chunked on both sides
    ("GET", "/public/large", 4 * 65536),          # streamed, with its Content-Length
    ("GET", "/public/close", 2100),               # streamed, no length upstream: chunked here
    ("HEAD", "/public/whole", 0),                 # a head and no body
    ("GET", "/public/no-content", 0),             # 204
    ("GET", "/public/not-modified", 0),           # 304
])
async def test_bytes_out_is_the_body_the_client_received(redis_url, monkeypatch, capfd,
                                                         method, path, length):
    async with public_gateway_before(_bytes_upstream, redis_url, monkeypatch, capfd) as g:
        async with g.proxy.request(method, path, headers={"X-Request-Id": "rid-b"}) as r:
            body = await r.read()
        _, err = g.logs(capfd)
    assert len(body) == length
    assert line_of(err, "rid-b")["bytes_out"] == length


async def test_bytes_out_of_a_body_cut_short_upstream_is_what_went_out(redis_url, monkeypatch,
                                                                      capfd):
    async with public_gateway_before(_bytes_upstream, redis_url, monkeypatch, capfd) as g:
        reader, writer = await g.raw_connection()
        writer.write(b"GET /public/cut HTTP/1.1\r\nHost: g\r\nX-Request-Id: rid-cut\r\n\r\n")
        closed, answer = await closed_within(reader, 5.0)
        writer.close()
        _, err = g.logs(capfd)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert closed and b"Content-Length: 10000" in head and body == b"t" * 3000
    assert line_of(err, "rid-cut")["bytes_out"] == 3000


async def test_bytes_out_leaves_out_a_100_continue(redis_url, upstream, monkeypatch, capfd):
    async with gateway_under_test(config_with(upstream, "json"), redis_url, monkeypatch) as g:
        await g.workspace("acme")
        token, _ = await g.key(scopes=["people:write"])
        g.logs(capfd)
        reader, writer = await g.raw_connection()
        writer.write(b"POST /people HTTP/1.1\r\nHost: g\r\nX-Request-Id: rid-100\r\n"
                     b"Authorization: Bearer " + token.encode() + b"\r\nConnection: close"
                     b"\r\nExpect: 100-continue\r\nContent-Length: 50\r\n\r\n")
        interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        writer.write(b"x" * 50)
        closed, answer = await closed_within(reader, 5.0)
        writer.close()
        _, err = g.logs(capfd)
    assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
    head, _, body = answer.partition(b"\r\n\r\n")
    assert closed and head.startswith(b"HTTP/1.1 200 ") and json.loads(body)["body_len"] == 50
    assert line_of(err, "rid-100")["bytes_out"] == len(body)


async def test_bytes_out_of_keygate_errors_is_the_json_body(redis_url, upstream, monkeypatch,
                                                            capfd):
    async with gateway_under_test(config_with(upstream, "json"), redis_url, monkeypatch) as g:
        g.logs(capfd)
        async with g.proxy.get("/people/1", headers={"X-Request-Id": "rid-401"}) as r:
            assert r.status == 401
            refused = await r.read()
        async with g.proxy.head("/people/1", headers={"X-Request-Id": "rid-401-head"}) as r:
            assert r.status == 401 and int(r.headers["Content-Length"]) > 0
            assert await r.read() == b""           # a HEAD is answered without the body
        _, err = g.logs(capfd)
    assert json.loads(refused)["error"]["code"] == "missing_key"
    assert line_of(err, "rid-401")["bytes_out"] == len(refused)
    assert line_of(err, "rid-401-head")["bytes_out"] == 0


async def test_bytes_out_of_a_408_written_before_its_line_is_the_json_body(redis_url, upstream,
                                                                           monkeypatch, capfd):
    """keygate writes a 408 itself (then closes) before the line is logged."""
    config = config_with(upstream, "json")
    config = dataclasses.replace(config, server=dataclasses.replace(
        config.server, timeouts=Timeouts(header=5.0, body=0.5, idle=5.0)))
    async with gateway_under_test(config, redis_url, monkeypatch) as g:
        await g.workspace("acme")
        token, _ = await g.key(scopes=["people:read", "people:write"])
        g.logs(capfd)
        reader, writer = await g.raw_connection()
        writer.write(b"POST /people/x HTTP/1.1\r\nHost: g\r\nX-Request-Id: rid-408\r\n"
                     b"Authorization: Bearer " + token.encode() +
                     b"\r\nContent-Length: 100\r\n\r\n0123456789")
        closed, answer = await closed_within(reader, 5.0)
        writer.close()
        _, err = g.logs(capfd)
    assert closed and answer.startswith(b"HTTP/1.1 408 "), answer[:200]
    body = answer.partition(b"\r\n\r\n")[2]
    assert json.loads(body)["error"]["code"] == "request_timeout"
    assert line_of(err, "rid-408")["bytes_out"] == len(body)


async def test_bytes_out_of_the_reserved_endpoints(redis_url, upstream, monkeypatch, capfd):
    async with gateway_under_test(verify_config(str(upstream.make_url(""))), redis_url,
                                  monkeypatch) as g:
        await g.workspace("acme")
        token, _ = await g.key(scopes=["people:read"])
        g.logs(capfd)
        async with g.proxy.get("/_keygate/v1/usage",
                               headers={**bearer(token), "X-Request-Id": "rid-usage"}) as r:
            assert r.status == 200
            usage = await r.read()
        async with g.proxy.head("/_keygate/v1/usage",
                                headers={**bearer(token), "X-Request-Id": "rid-usage-head"}) as r:
            assert r.status == 200
            assert await r.read() == b""
        async with g.proxy.get(VERIFY, headers={**bearer(token), "X-Request-Id": "rid-verify",
                                                "X-Original-Method": "GET",
                                                "X-Original-URI": "/people/1"}) as r:
            assert r.status == 200
            verified = await r.read()
        _, err = g.logs(capfd)
    assert len(usage) > 0 and line_of(err, "rid-usage")["bytes_out"] == len(usage)
    assert line_of(err, "rid-usage-head")["bytes_out"] == 0
    assert line_of(err, "rid-verify")["bytes_out"] == len(verified) == 0


async def test_the_operations_guide_lists_every_field_of_a_json_line(redis_url, upstream,
                                                                     monkeypatch, capfd):
    guide = (Path(__file__).resolve().parent.parent / "docs" / "operations.md").read_text()
    table = guide[guide.index("A JSON line has these fields"):]
    documented = re.findall(r"^\| `(\w+)` \|", table[:table.index("\n\n", table.index("|"))],
                            re.M)
    async with gateway_under_test(config_with(upstream, "json"), redis_url, monkeypatch) as g:
        g.logs(capfd)
        async with g.proxy.get("/people/1") as r:
            await r.read()
        _, err = g.logs(capfd)
    line, = json_lines(err)
    assert documented == list(line)


@pytest.mark.parametrize("access_log", ["json", "text"])
async def test_behind_a_trusted_proxy_the_line_names_the_client_not_the_proxy(
        redis_url, upstream, monkeypatch, capfd, access_log):
    """Behind a load balancer listed in ``server.trusted_proxies`` every line said the load
    balancer's address: the failure throttle and the keys' allow-lists saw the client, the
    log did not. ``client`` is now the same address they use, for every line."""
    config = config_with(upstream, access_log)
    config = dataclasses.replace(config, server=dataclasses.replace(
        config.server, trusted_proxies=("127.0.0.1/32",)))
    forwarded = {"X-Forwarded-For": "198.51.100.7, 203.0.113.9"}
    async with gateway_under_test(config, redis_url, monkeypatch) as g:
        await g.workspace("acme")
        token, _ = await g.key()
        g.logs(capfd)
        for headers, status in (({**bearer(token), **forwarded}, 200),  # a key checked
                                (forwarded, 401),                       # no key
                                ({"X-Forwarded-For": "not an address"}, 401),
                                ({}, 401)):                             # no header
            async with g.proxy.get("/people/1", headers=headers) as r:
                assert r.status == status
                await r.read()
        async with g.proxy.get("/_keygate/v1/verify/people/1",
                               headers={**bearer(token), **forwarded}) as r:
            assert r.status == 200
        _, err = g.logs(capfd)
    if access_log == "json":
        clients = [line["client"] for line in json_lines(err)]
    else:
        clients = [line.split(" ", 1)[0] for line in err.splitlines() if " ws=" in line]
    # the nearest hop our proxy did not write; a hop that is no address proves nothing
    assert clients == ["203.0.113.9", "203.0.113.9", "127.0.0.1", "127.0.0.1",
                       "203.0.113.9"], err


async def test_a_client_gone_before_a_chunked_body_ends_is_logged_as_what_went_out(
        redis_url, monkeypatch, capfd, caplog):
    """The client read part of a chunked answer and left; the upstream ended the body after
    that. Writing the last chunk to the closed connection raised out of the streaming code,
    so the request was logged as keygate's 500 ``internal_error`` (with a traceback "unhandled
    error") and bytes_out as the JSON error's length, though the client got a 200 and the
    body's first chunk."""
    line, got = await logged_after_the_client_left(
        redis_url, monkeypatch, capfd, "GET /public/stream HTTP/1.1", b"0\r\n\r\n", "rid-gone",
        first=b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
              b"Transfer-Encoding: chunked\r\n\r\n|3\r\nabc\r\n", until=b"abc\r\n")
    assert got.startswith(b"HTTP/1.1 200 ")
    assert (line["status"], line["error"], line["bytes_out"]) == (200, None, 3), line
    assert not [r for r in caplog.records if "unhandled error" in r.getMessage()]


async def logged_after_the_client_left(redis_url, monkeypatch, capfd, head: str,
                                       reply: bytes, request_id: str, *, first: bytes = b"",
                                       until: bytes = b"") -> tuple[dict, bytes]:
    """The access line of ``head`` (a public route) whose client closes its connection while
    a raw upstream holds the answer, and what the client read: the upstream sends ``first``
    at once (pieces separated by ``|`` written one by one), the client reads until it has ``until``
    and leaves, and the upstream sends ``reply`` once keygate has seen it go. Without
    ``first``, the upstream sends ``reply`` as the client goes, both seen by keygate in one turn
    of its loop: the head has come, and the client's connection is found gone when keygate
    writes the answer (a client gone before the head came ends the wait for it: a 400)."""
    client_left = asyncio.Event()
    upstreams: list[asyncio.StreamWriter] = []

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
            if not first:  # the test sends the reply as the client goes
                upstreams.append(writer)
                await asyncio.wait_for(client_left.wait(), 5)
                await asyncio.sleep(0.2)
                return
            for piece in filter(None, first.split(b"|")):
                writer.write(piece)
                await writer.drain()
                await asyncio.sleep(0.05)  # the head alone first: keygate streams the answer
            await asyncio.wait_for(client_left.wait(), 5)
            await asyncio.sleep(0.2)   # keygate has seen the client go
            writer.write(reply)
            await writer.drain()
            await asyncio.sleep(0.2)
        finally:
            writer.close()

    async with public_gateway_before(answer, redis_url, monkeypatch, capfd) as g:
        reader, writer = await g.raw_connection()
        writer.write(f"{head}\r\nHost: g\r\nX-Request-Id: {request_id}\r\n\r\n".encode())
        got = b""
        while not got.endswith(until):
            got += await asyncio.wait_for(reader.read(65536), 5)
        await asyncio.sleep(0.1)
        if not first:
            assert await eventually(lambda: upstreams)
            upstreams[0].write(reply)  # sent at once: nothing is buffered before it
            writer.transport.get_extra_info("socket").shutdown(socket.SHUT_RDWR)
            time.sleep(0.2)  # the loop blocked: both are there when it next polls
        writer.close()
        client_left.set()
        # the line is written when keygate is done with the request, which the upstream ends
        # 0.2 s from here: wait for it (a fixed 0.6 s could end first on a loaded machine)
        err, deadline = "", time.monotonic() + 10
        while f'"request_id":"{request_id}"' not in err and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
            err += g.logs(capfd)[1]
        await asyncio.sleep(0.3)       # and no second line for it follows
        err += g.logs(capfd)[1]
    return line_of(err, request_id), got


@pytest.mark.parametrize("method, path, status", [("HEAD", "/public/whole", 200),
                                                  ("GET", "/public/no-content", 204)])
async def test_a_client_gone_before_a_head_only_answer_is_logged_as_the_upstreams(
        redis_url, monkeypatch, capfd, caplog, method, path, status):
    """The same for an answer without a body (HEAD, 204, 304): the client left while the
    upstream was answering; writing the head to the closed connection raised, and the line
    said keygate's 500 ``internal_error`` with a traceback."""
    line, _ = await logged_after_the_client_left(
        redis_url, monkeypatch, capfd, f"{method} {path} HTTP/1.1",
        b"HTTP/1.1 204 No Content\r\n\r\n" if status == 204 else
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n", "rid-gone-head")
    assert (line["status"], line["error"], line["bytes_out"]) == (status, None, 0), line
    assert not [r for r in caplog.records if "unhandled error" in r.getMessage()]


async def test_a_whole_answer_to_a_client_gone_is_logged_with_no_body_bytes(
        redis_url, monkeypatch, capfd):
    """A whole answer is logged before aiohttp writes it. When the client has left by then
    (here while the upstream took its time), nothing of it is written, but bytes_out said
    its whole length; operations.md: for a client gone, the part written before it ended."""
    line, _ = await logged_after_the_client_left(
        redis_url, monkeypatch, capfd, "GET /public/whole HTTP/1.1",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", "rid-left")
    assert (line["status"], line["bytes_out"]) == (200, 0), line


async def test_the_operator_token_pasted_into_an_admin_url_is_never_logged(
        redis_url, upstream, monkeypatch, caplog):
    """The admin log line wrote the request target as sent, masking keygate API keys only: a
    script that put the operator token in the query (``?token=...``, a habit of other APIs) or
    in the path, raw or percent-encoded, left full control of every workspace in the log,
    for anyone who reads logs. The gateway knows the operator token: it is masked like a key."""
    import logging
    from yarl import URL
    from harness import ADMIN_TOKEN
    caplog.set_level(logging.INFO, logger="keygate.admin")
    encoded = "".join(f"%{b:02X}" for b in ADMIN_TOKEN.encode())
    partly = ADMIN_TOKEN.replace("-", "%2D")
    async with gateway_under_test(config_with(upstream, "json"), redis_url, monkeypatch) as g:
        for target, auth in ((f"/admin/v1/workspaces?token={ADMIN_TOKEN}", ADMIN_TOKEN),
                             (f"/admin/v1/workspaces?access_token={partly}", ""),
                             (f"/admin/v1/workspaces?t={encoded}", ADMIN_TOKEN),
                             (f"/admin/v1/{ADMIN_TOKEN}", ""),
                             (f"/admin/v1/workspaces/{encoded}", ADMIN_TOKEN)):
            async with g.admin.get(URL(target, encoded=True),
                                   headers={"Authorization": f"Bearer {auth}"}) as r:
                assert r.status in (400, 401, 404), target
    records = [r for r in caplog.records if r.name == "keygate.admin"]
    assert len(records) == 5
    text = caplog.text + "".join(str(r.__dict__) for r in records)
    assert ADMIN_TOKEN not in text and encoded not in text
    assert partly not in text


async def test_the_operator_token_sent_to_the_proxy_listener_is_never_logged(
        redis_url, upstream, monkeypatch, capfd):
    """Regression: the admin log masked the operator token a script pastes into a URL, but the
    same script pointed at the proxy port (8080 for 8081) had its target written to the access
    log with the operator token whole (the access log masked API keys only): full control of
    every workspace for anyone who reads the log most widely shipped. The access log masks it
    as the admin log does; a target that does not hold it is logged as sent."""
    from yarl import URL
    from harness import ADMIN_TOKEN
    encoded = "".join(f"%{b:02X}" for b in ADMIN_TOKEN.encode())
    plain = "/people/" + "a" * len(ADMIN_TOKEN)  # long enough to hold it; does not
    async with gateway_under_test(config_with(upstream, "json"), redis_url, monkeypatch) as g:
        g.logs(capfd)
        for target, status in ((f"/admin/v1/workspaces?token={ADMIN_TOKEN}", 404),
                               (f"/people/1?access_token={ADMIN_TOKEN}", 401),
                               (f"/people/{ADMIN_TOKEN}", 401),
                               (f"/people/x?t={encoded}", 401),
                               (plain, 401)):
            async with g.proxy.get(URL(target, encoded=True)) as r:
                assert r.status == status, target
        _, err = g.logs(capfd)
    paths = [line["path"] for line in json_lines(err)]
    assert paths == ["/admin/v1/workspaces?token=***", "/people/1?access_token=***",
                     "/people/***", "/people/x?***", plain], err
    assert ADMIN_TOKEN not in err and encoded not in err


async def test_an_operator_token_sent_as_the_request_id_is_never_adopted(
        redis_url, upstream, monkeypatch, capfd, caplog):
    """Regression: a client's ``X-Request-Id`` is adopted when it is shaped like a sane id,
    and an operator token such as ``token_urlsafe(32)`` without a ``_`` is (its runs between
    ``-`` are short): one sent as the request id was echoed, forwarded upstream and written
    to the access and admin logs whole. A request id holding the operator token is replaced
    by a generated one on either listener."""
    import logging
    from harness import ADMIN_TOKEN
    caplog.set_level(logging.INFO, logger="keygate.admin")
    async with gateway_under_test(config_with(upstream, "json"), redis_url, monkeypatch) as g:
        g.logs(capfd)
        async with g.proxy.get("/people/1", headers={"X-Request-Id": ADMIN_TOKEN}) as r:
            assert r.status == 401
            assert r.headers["X-Request-Id"] != ADMIN_TOKEN
        async with g.admin.get("/admin/v1/workspaces",
                               headers={"X-Request-Id": f"job-{ADMIN_TOKEN}"}) as r:
            assert r.status == 200
            assert ADMIN_TOKEN not in r.headers["X-Request-Id"]
        async with g.proxy.get("/people/1", headers={"X-Request-Id": "job-42.a"}) as r:
            assert r.headers["X-Request-Id"] == "job-42.a"  # a sane one is still adopted
        _, err = g.logs(capfd)
    assert len(json_lines(err)) == 2, err
    assert ADMIN_TOKEN not in err
    assert ADMIN_TOKEN not in caplog.text + "".join(
        str(r.__dict__) for r in caplog.records if r.name == "keygate.admin")


@pytest.mark.parametrize("token, target", [
    # base64 (openssl rand -base64): '+' '/' '='. Go's url.PathEscape escapes '/' and keeps
    # '+' and '=': unquote_plus read the '+' as a space, so the decoded path did not hold it
    ("Zq8+w/Rk9mVt4A/b==", "/admin/v1/workspaces/Zq8+w%2FRk9mVt4A%2Fb%3D%3D"),
    # a generated password with a '?': pasted into the path, the '?' splits the target, and
    # neither half held the whole token
    ("pL9?xK2!vQ7*mR4=", "/admin/v1/workspaces/pL9?xK2!vQ7*mR4="),
    ("pL9?xK2!vQ7*mR4=", "/admin/v1/workspaces/pL9%3FxK2!vQ7*mR4="),
])
async def test_an_operator_token_with_url_characters_is_never_logged(
        redis_url, upstream, monkeypatch, caplog, token, target):
    """loggable_target looked for the operator token as sent and once decoded with
    ``unquote_plus``, in the path and the query separately. A ``+`` in a path is a plus, not a
    space, so a base64 token with its ``/`` percent-encoded was written nearly as sent (every
    reader decodes ``%2F``); and a token holding a ``?`` pasted into the path was cut in two by
    the split, each half written as is."""
    import logging
    from urllib.parse import unquote_plus
    from yarl import URL
    import harness
    monkeypatch.setattr(harness, "ADMIN_TOKEN", token)
    caplog.set_level(logging.INFO, logger="keygate.admin")
    async with gateway_under_test(config_with(upstream, "json"), redis_url, monkeypatch) as g:
        async with g.admin.get(URL(target, encoded=True),
                               headers={"Authorization": f"Bearer {token}"}) as r:
            assert r.status in (400, 404), await r.text()
    records = [r for r in caplog.records if r.name == "keygate.admin"]
    assert len(records) == 1
    logged = records[0].path
    for shown_as in (logged, unquote(logged), unquote_plus(logged)):
        assert token not in shown_as, logged
    assert token not in caplog.text + str(records[0].__dict__)


@pytest.mark.parametrize("times", [2, 3])
async def test_an_operator_token_encoded_more_than_once_in_an_admin_url_is_never_logged(
        redis_url, upstream, monkeypatch, caplog, times):
    """API keys in a URL are masked however often they were percent-encoded (up to three
    times, as a reader or a script that encodes a URL twice would decode it), the operator
    token only once: a base64 operator token put in a query by a script that encodes twice
    (``%252F`` for ``/``) was written so that two decodings gave it back whole."""
    import logging
    from urllib.parse import quote, unquote_plus
    from yarl import URL
    import harness
    token = "Zq8+w/Rk9mVt4A/bXy3+Lp0/Qw7=="
    monkeypatch.setattr(harness, "ADMIN_TOKEN", token)
    caplog.set_level(logging.INFO, logger="keygate.admin")
    sent = token
    for _ in range(times):
        sent = quote(sent, safe="")  # Zq8%252Bw%252FRk... twice
    async with gateway_under_test(config_with(upstream, "json"), redis_url, monkeypatch) as g:
        async with g.admin.get(URL(f"/admin/v1/workspaces?token={sent}", encoded=True)) as r:
            assert r.status == 400, await r.text()  # an unknown query parameter
    records = [r for r in caplog.records if r.name == "keygate.admin"]
    assert len(records) == 1
    logged = records[0].path
    for decode in (unquote, unquote_plus):
        shown_as = logged
        for _ in range(times + 1):
            assert token not in shown_as, logged
            shown_as = decode(shown_as)
    assert sent not in caplog.text + str(records[0].__dict__)


async def test_an_admin_call_through_a_trusted_proxy_logs_the_caller(redis_url, upstream,
                                                                     monkeypatch, caplog):
    """The admin API's own line names the caller as the allow-list and the failure throttle
    see it (through ``server.trusted_proxies``), not the load balancer in front."""
    import logging
    caplog.set_level(logging.INFO, logger="keygate.admin")
    config = config_with(upstream, "json")
    config = dataclasses.replace(config, server=dataclasses.replace(
        config.server, trusted_proxies=("127.0.0.1/32",)))
    async with gateway_under_test(config, redis_url, monkeypatch) as g:
        async with g.admin.get("/admin/v1/workspaces",
                               headers={"X-Forwarded-For": "198.51.100.7"}) as r:
            assert r.status == 200
        async with g.admin.get("/admin/v1/workspaces") as r:
            assert r.status == 200
    records = [r for r in caplog.records if r.name == "keygate.admin"]
    assert [r.client for r in records] == ["198.51.100.7", "127.0.0.1"]


async def test_a_token_in_an_admin_path_is_masked_when_the_store_is_down(own_redis, upstream,
                                                                         monkeypatch, caplog):
    """The admin API's warning for a call the store could not answer wrote the request's
    decoded path: a key pasted into an admin URL (even percent-encoded) reached the log
    whenever Redis was down, while the call's own line masked it."""
    import logging
    caplog.set_level(logging.INFO, logger="keygate.admin")
    async with gateway_under_test(config_with(upstream, "json"), own_redis.url,
                                  monkeypatch) as g:
        await g.workspace("acme")
        token, _ = await g.key(scopes=["people:read"])
        own_redis.stop()
        try:
            encoded = "".join(f"%{b:02X}" for b in token.encode())
            for path in (f"/admin/v1/workspaces/acme/keys/{token}",
                         f"/admin/v1/workspaces/acme/keys/{encoded}"):
                async with g.admin.get(path) as r:
                    assert r.status == 503
        finally:
            own_redis.start()
    records = [r for r in caplog.records if r.name == "keygate.admin"]
    assert any("store unavailable" in r.getMessage() for r in records)
    text = caplog.text + "".join(str(r.__dict__) for r in records)
    assert token not in text and token[-38:-6] not in text


async def test_a_blocked_stderr_never_stalls_requests_that_log_warnings(tmp_path, redis_url):
    """The access log never blocks on stderr, but application lines went straight to a
    blocking StreamHandler on the event loop: with stderr a pipe nobody reads (a stalled log
    collector) and an upstream down, each 502 logs a warning, and once the pipe was full the
    next warning blocked the loop: every request of the process hung, healthy routes too."""
    config, pport, aport = write_config(tmp_path, redis_url=redis_url,
                                        upstream_url="http://127.0.0.1:9",  # nobody listens
                                        access_log="json")
    proc, read_end = serve_into_a_pipe(config)
    try:
        async with ClientSession(timeout=ClientTimeout(total=5)) as s:
            await until_answering(s, f"http://127.0.0.1:{aport}/healthz")
            for _ in range(10):   # ~600 warnings and their access lines: well past 64 KiB
                async def one() -> int:
                    async with s.get(f"http://127.0.0.1:{pport}/health") as r:
                        await r.read()
                        return r.status
                assert await asyncio.gather(*(one() for _ in range(60))) == [502] * 60
            async with s.get(f"http://127.0.0.1:{aport}/healthz") as r:
                assert r.status == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        os.close(read_end)


async def test_an_unknown_reserved_path_is_logged_and_counted_with_no_route(
        redis_url, upstream, monkeypatch, capfd):
    """operations.md: ``route`` is null when no route matched. A request for an unknown path
    under ``/_keygate/`` (a 404 ``no_route``) was logged, and counted in
    keygate_requests_total, as the ``/_keygate/v1/keys`` endpoint's."""
    async with gateway_under_test(verify_config(str(upstream.make_url(""))), redis_url,
                                  monkeypatch) as g:
        g.logs(capfd)
        for path in ("/_keygate/v2/anything", "/_keygate/v1/usagex"):
            async with g.proxy.get(path, headers={"X-Request-Id": "rid-" + path[-4:]}) as r:
                assert r.status == 404
                assert (await r.json())["error"]["code"] == "no_route"
        _, err = g.logs(capfd)
        assert g.counter("keygate_requests_total", route="/_keygate/v1/keys", method="GET",
                         status_class="4xx") == 0
    for rid in ("rid-hing", "rid-agex"):
        line = line_of(err, rid)
        assert (line["route"], line["upstream"], line["error"]) == (None, None, "no_route"), line


def test_application_lines_queued_at_exit_are_written_while_logging_shutdown_flushes(capfd):
    """At exit ``logging.shutdown`` takes each handler's lock and calls ``flush`` under it.
    The writer thread of BackgroundHandler took that same lock for every batch (to read the
    dropped-lines count), so with more than one batch waiting it stopped behind the lock
    ``flush`` held: flush gave up after its 2 s and the lines still queued were lost (a third
    of runs of a script logging 2,000 lines lost up to half of them, each after a 2.5 s
    exit). Here the lock is held as logging.shutdown holds it."""
    import logging
    from gateway.accesslog import BackgroundHandler
    handler = BackgroundHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    record = logging.LogRecord("keygate", logging.WARNING, __file__, 1, "line %d", (0,), None)
    handler.acquire()            # as logging.shutdown does, around flush()
    try:
        for i in range(5000):    # five batches of the writer
            record.args = (i,)
            handler.handle(record)
        started = time.monotonic()
        handler.flush()
        took = time.monotonic() - started
    finally:
        handler.release()
    written = capfd.readouterr().err.splitlines()
    assert len(written) == 5000 and took < 1.5, (len(written), took)



async def _lines_through_a_stderr_that_stopped(monkeypatch, formatter) -> list[str]:
    """The lines a BackgroundHandler with ``formatter`` writes to a stderr that stops taking
    lines (a pipe nobody reads) and then takes them again: lines were dropped meanwhile."""
    import logging
    from gateway.accesslog import BackgroundHandler
    read_end, write_end = os.pipe()
    blocked = os.fdopen(write_end, "w")
    handler = BackgroundHandler(max_lines=50)
    handler.setFormatter(formatter)
    try:
        monkeypatch.setattr(sys, "stderr", blocked)
        record = logging.LogRecord("keygate.test", logging.WARNING, __file__, 1, "line %d %s",
                                   (0, "x" * 200), None)
        for i in range(2000):  # the pipe (64 KiB) and the queue (50) fill: lines dropped
            record.args = (i, "x" * 200)
            handler.handle(record)
        os.set_blocking(read_end, False)  # the reader comes back
        out = bytearray()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            idle = not handler._queue.unfinished_tasks
            with contextlib.suppress(BlockingIOError):
                while chunk := os.read(read_end, 1 << 16):
                    out += chunk
            if idle and b"dropped" in out:
                break
            handler.handle(logging.LogRecord("keygate.test", logging.WARNING, __file__, 1,
                                             "after", (), None))  # carries the notice out
            await asyncio.sleep(0.05)
    finally:
        monkeypatch.setattr(sys, "stderr", sys.__stderr__)
        blocked.close()
        os.close(read_end)
    return bytes(out).decode().splitlines()


async def test_the_dropped_lines_notice_is_a_json_object_when_the_log_is_json(upstream,
                                                                             monkeypatch):
    """docs/operations.md: "With `access_log: json` every line keygate writes once it has
    started is a JSON object" and "past 10,000 lines waiting, lines are dropped and one line
    says how many". That one line was plain text whatever the format: a log pipeline parsing
    JSON rejected (or mis-filed) exactly the line that says logs were lost."""
    from gateway.workers import _log_format
    formatter = _log_format(config_with(upstream, "json"))  # what serve installs for json
    lines = await _lines_through_a_stderr_that_stopped(monkeypatch, formatter)
    notices = [json.loads(line) for line in lines if "dropped" in line]
    assert notices, "no line said that lines were dropped"
    assert all(re.fullmatch(r"\d+ log lines were dropped: stderr did not keep up",
                            notice["message"]) and notice["level"] == "warning"
               for notice in notices), notices
    not_json = []
    for line in lines:
        try:
            json.loads(line)
        except ValueError:
            not_json.append(line)
    assert not_json == [], not_json[:3]


async def test_the_dropped_lines_notice_names_the_worker_in_the_text_log(upstream,
                                                                        monkeypatch):
    """Under ``serve --workers N`` every text line a worker logs begins with its name
    (``worker I (pid P): ``): the notice of dropped lines too, so the operator knows whose
    lines were lost."""
    from gateway.workers import _log_format
    formatter = _log_format(config_with(upstream, "text"), "worker 2 (pid 4242): ")
    lines = await _lines_through_a_stderr_that_stopped(monkeypatch, formatter)
    notices = [line for line in lines if "dropped" in line]
    assert notices, "no line said that lines were dropped"
    for notice in notices:
        assert re.fullmatch(r"\S+ \S+ WARNING keygate: worker 2 \(pid 4242\): \d+ log lines "
                            r"were dropped: stderr did not keep up", notice), notice


def test_ending_the_application_log_writer_loses_no_line(capfd):
    """``end_writer`` (the supervisor, before it forks its workers: no thread may run at
    ``fork()``) writes every line queued, ends the writer's thread, and the next line starts
    another: nothing is lost either side."""
    import logging
    from gateway.accesslog import BackgroundHandler
    handler = BackgroundHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    record = logging.LogRecord("keygate", logging.WARNING, __file__, 1, "line %d", (0,), None)
    for i in range(3000):
        record.args = (i,)
        handler.handle(record)
    writer = handler._writer
    handler.end_writer()
    assert not writer.is_alive()
    for i in range(3000, 3010):
        record.args = (i,)
        handler.handle(record)
    handler.flush()
    written = capfd.readouterr().err.splitlines()
    assert written == [f"line {i}" for i in range(3010)]

async def test_application_lines_dropped_on_a_blocked_stderr_are_counted_in_a_metric(
        redis_url, upstream, monkeypatch):
    """Application log lines past BackgroundHandler's bound were only reported in a log line,
    written once stderr takes lines again, which on a stderr that stays blocked is never:
    nothing an operator's scrape could see. They are counted in
    ``keygate_log_lines_dropped_total``, on the registry ``/metrics`` serves."""
    import logging
    from gateway.accesslog import BackgroundHandler
    read_end, write_end = os.pipe()
    blocked = os.fdopen(write_end, "w")
    handler = BackgroundHandler(max_lines=50)
    handler.setFormatter(logging.Formatter("%(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)                   # as keygate serve installs it, before the app
    try:
        async with gateway_under_test(config_with(upstream, "off"), redis_url,
                                      monkeypatch) as g:
            monkeypatch.setattr(sys, "stderr", blocked)
            log = logging.getLogger("keygate.test")
            for i in range(3000):              # ~600 KB: the pipe (64 KiB) and queue fill
                log.warning("line %d %s", i, "x" * 180)
            os.set_blocking(read_end, False)   # unblock the writer: it writes what it holds
            out = bytearray()
            deadline = time.monotonic() + 10
            done = False
            while not done and time.monotonic() < deadline:
                done = not handler._queue.unfinished_tasks  # then one last read of the rest
                with contextlib.suppress(BlockingIOError):
                    while chunk := os.read(read_end, 1 << 16):
                        out += chunk
                await asyncio.sleep(0.01)
            written = len(re.findall(rb"^line \d+ x+$", bytes(out), re.M))
            dropped = 3000 - written
            assert dropped > 1000, dropped
            assert g.counter("keygate_log_lines_dropped_total") == dropped
            async with g.admin.get("/metrics") as r:
                scraped = await r.text()
            assert f"\nkeygate_log_lines_dropped_total {float(dropped)}\n" in scraped
            monkeypatch.setattr(sys, "stderr", sys.__stderr__)
    finally:
        root.removeHandler(handler)
        blocked.close()
        os.close(read_end)


async def test_under_workers_every_scrape_carries_the_dropped_log_lines_counter(
        tmp_path, redis_url):
    """Under ``serve --workers N`` a scrape is answered by any one worker from prometheus-
    client's shared files: the application log's drop counter is one of the series in them
    (like the access log's), whichever worker answers."""
    from prometheus_client.parser import text_string_to_metric_families
    config, pport, aport = write_config(tmp_path, redis_url=redis_url)
    gw = Served(config, pport, aport, "--workers", "2")
    try:
        await gw.ready()
        for _ in range(6):
            async with ClientSession() as fresh:
                async with fresh.get(gw.admin + "/metrics",
                                     headers={"Connection": "close"}) as r:
                    text = await r.text()
            samples = {s.name: s.value for f in text_string_to_metric_families(text)
                       for s in f.samples}
            assert samples.get("keygate_log_lines_dropped_total") == 0.0
            assert samples.get("keygate_access_log_dropped_total") == 0.0
    finally:
        gw.close()


def test_the_readmes_short_list_of_access_log_fields_is_the_whole_line():
    """The README lists an access line's fields in words; docs/operations.md's table (checked
    against a real line above) is the reference. The README's list had no `error`, the field
    that says which of keygate's refusals a line is."""
    root = Path(__file__).resolve().parent.parent
    guide = (root / "docs" / "operations.md").read_text()
    table = guide[guide.index("A JSON line has these fields"):]
    fields = re.findall(r"^\| `(\w+)` \|", table[:table.index("\n\n", table.index("|"))], re.M)
    readme = " ".join((root / "README.md").read_text().split())
    listed = re.search(r"Access log: one line per request on stderr \(`[^`]*`\): (.*?)\. ",
                       readme).group(1)
    words = [w.strip() for w in re.split(r",(?: and)? ", listed)]
    spoken = []
    for field in fields:
        word = field.removesuffix("_ms").replace("_", " ")
        if word in ("bytes in", "bytes out"):
            word = "bytes in/out"
        if word not in spoken:
            spoken.append(word)
    assert words == spoken


async def _raw_request(g, target: bytes, rid: str) -> bytes:
    """The status line of one GET of ``target`` (raw bytes) on a fresh connection."""
    reader, writer = await g.raw_connection()
    try:
        writer.write(b"GET " + target + b" HTTP/1.1\r\nHost: gw.example\r\nConnection: close\r\n"
                     b"X-Request-Id: " + rid.encode() + b"\r\n\r\n")
        return (await asyncio.wait_for(reader.readuntil(b"\r\n"), 10)).strip()
    finally:
        writer.close()


@pytest.mark.parametrize("access_log", ["json", "text"])
async def test_a_line_with_a_long_target_fits_in_one_atomic_pipe_write(
        redis_url, upstream, monkeypatch, capfd, access_log):
    """Under ``serve --workers N`` the workers share one stderr pipe, and a write of at most
    PIPE_BUF (4 KiB) bytes is the only one never interleaved with another worker's: a line
    holding a long path or query (the request head may be 32 KiB) was written whole, so two
    workers' lines could interleave mid-line. The logged target is cut (visibly) so that a
    line always fits; masking comes first, so a cut never shows part of a key."""
    async with gateway_under_test(config_with(upstream, access_log), redis_url,
                                  monkeypatch) as g:
        await g.workspace("acme")
        token, _ = await g.key()
        cases = {
            # a long query, no key: forwarded and logged
            "rid-long-query": b"/people/1?q=" + b"a" * 30_000,
            # a key in the query (refused key_in_url) straddling where a cut would fall
            "rid-key-query": b"/people/1?q=" + b"b" * 2030 + b"&k=" + token.encode()
                             + b"&r=" + b"c" * 20_000,
            # a key in the path (masked as ***) straddling it too
            "rid-key-path": b"/people/" + b"d" * 2030 + b"/" + token.encode() + b"/"
                            + b"e" * 20_000,
            # percent-escapes (the parser refuses what JSON would escape: test below)
            "rid-escapes": b"/people/1?q=" + b"%C3%A9" * 5_000,
        }
        g.logs(capfd)
        for rid, target in cases.items():
            status = await _raw_request(g, target, rid)
            assert status.startswith(b"HTTP/1.1 "), status
        _, err = g.logs(capfd)
    secret = token.split("_")[-1]
    for rid in cases:
        (line,) = [line for line in err.splitlines() if rid in line]
        assert len(line.encode()) + 1 <= 4096, (rid, len(line.encode()))
        assert secret[:8] not in line and token[:20] not in line, line
        path = json.loads(line)["path"] if access_log == "json" else line.split(" ")[2]
        assert path.endswith("...[cut]"), path[-40:]
        assert len(path) >= 1024, len(path)  # still most of what a reader wants to see


async def test_an_admin_line_with_a_long_target_fits_in_one_atomic_pipe_write(
        redis_url, upstream, monkeypatch, caplog):
    """The admin API's line (a JSON application line: the target in its message and in
    ``path``) fits in one PIPE_BUF write however long the target, its operator token masked
    before the cut (a token straddling where the cut falls shows no part of itself)."""
    import logging
    from yarl import URL
    import harness
    from gateway.accesslog import JsonFormatter
    token = "Tq7Rk9mVt4AbXy3Lp0Qw7zZ1"
    monkeypatch.setattr(harness, "ADMIN_TOKEN", token)
    caplog.set_level(logging.INFO, logger="keygate.admin")
    # (the admin listener reads request lines of up to 8 KiB)
    target = f"/admin/v1/workspaces?q={'a' * 1010}&token={token}&r={'c' * 6_000}"
    async with gateway_under_test(config_with(upstream, "json"), redis_url, monkeypatch) as g:
        async with g.admin.get(URL(target, encoded=True)) as r:
            assert r.status == 400, await r.text()  # unknown query parameters
    (record,) = [r for r in caplog.records if r.name == "keygate.admin"]
    line = JsonFormatter("worker 12 (pid 4194304): ").format(record) + "\n"
    assert len(line.encode()) <= 4096, len(line.encode())
    assert token[:6] not in line
    assert record.path.endswith("...[cut]") and len(record.path) >= 512, record.path[-40:]


@given(st.one_of(st.text(st.characters(codec="utf-8"), max_size=6000),
                 st.text(st.characters(min_codepoint=0x80, codec="utf-8"), min_size=300,
                         max_size=3000),
                 st.text(st.characters(min_codepoint=0x10000), min_size=200, max_size=600),
                 # bytes that are not UTF-8, as the server decodes them (surrogateescape)
                 st.binary(min_size=300, max_size=5000).map(
                     lambda b: b.decode("utf-8", "surrogateescape"))),
       st.sampled_from(["json", "text"]))
def test_a_cut_target_fits_as_written_and_keeps_its_beginning(target, form):
    """What the request parser lets through is visible ASCII, but a cut must hold for any
    text: JSON writes a control character or a non-ASCII one as \\uXXXX (6 bytes), UTF-8 up
    to 4 bytes; the cut is measured as written."""
    from gateway.accesslog import CUT, TARGET_MAX, _json_size, _text_size, cut_target
    size = _json_size if form == "json" else _text_size
    cut = cut_target(target, size)
    assert size(cut) <= TARGET_MAX
    if cut != target:
        assert cut.endswith(CUT) and target.startswith(cut[:-len(CUT)])
        # as much as fits: one more character would not
        kept = cut[:-len(CUT)]
        assert size(target[:len(kept) + 1]) + len(CUT) > TARGET_MAX


def test_an_operator_token_costs_nothing_on_a_target_too_short_to_hold_it(monkeypatch):
    """AccessLog.__init__: "Only a target with a query or an escape, or long enough to hold
    it, is looked at: the usual request's line costs what it did." Every target with a query
    went through mask_secret, however short, and one with a '%' or a '+' (any
    percent-encoded search) through six percent-decodings, though a target shorter than the
    token cannot hold it, raw or decoded (decoding never lengthens): ~12 us a line without an
    operator token and ~29 us with one, measured on a 42-character search query. Counted here
    rather than timed: a short target is never searched for the token, a long one is (and
    the token in it is masked)."""
    import gateway.accesslog as accesslog
    from harness import make_config
    from gateway.accesslog import AccessLog
    from aiohttp import web

    class Outcome:
        client, workspace, key_id, route, upstream, code, trace = \
            "10.0.0.1", "acme", "abcdefabcdef", "/v1/**", "api", None, None

    token = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"  # hex(32)
    searched = []
    real = accesslog.mask_secret
    monkeypatch.setattr(accesslog, "mask_secret",
                        lambda target, secret: searched.append(target) or real(target, secret))
    log = AccessLog(make_config("http://127.0.0.1:1"), operator_token=token)
    log._task = object()  # never started: lines are only buffered
    response = web.Response(body=b"ok")

    def line(path: str) -> str:
        request = type("Request", (), {"raw_path": path, "method": "GET", "remote": "10.0.0.1",
                                       "transport": None, "content_length": None})()
        log.write(request, response, Outcome, "rid", 0.001)
        written = "".join(log._lines)
        log._lines.clear()
        log._size = 0
        return written

    short = "/v1/people/search?q=caf%C3%A9+%E2%82%AC+ann&sort=name&limit=10"
    assert len(short) < len(token)
    for path in (short, "/v1/a+b", "/v1/people/123"):
        line(path)
    assert searched == [], searched
    leaked = line(f"/v1/people/search?token={token}")
    assert searched and token not in leaked, leaked
