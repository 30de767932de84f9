"""Small leaks at the edge: tokens echoed back, paths that decode to something else, text
that rewrites an operator's terminal."""

from __future__ import annotations

import pytest
from yarl import URL

from gateway.errors import BadRequest
from gateway.routes import check_path
from gateway.tokens import adoptable_request_id, make_token


@pytest.fixture
async def gut(gut):
    """conftest's gateway under test, with workspace acme made."""
    await gut.workspace("acme")
    return gut


TOKEN, _ = make_token("kg", "live")
BODY = TOKEN.split("_")[2]          # key id + secret + checksum
SECRET = BODY[12:44]


@pytest.mark.parametrize("rid, adopted", [
    ("req-123", True),
    ("0f8e1c2a-3b4d-4e5f-8a9b-0c1d2e3f4a5b", True),                      # a UUID
    ("4bf92f3577b34da6a3ce929d0e0e4736", True),                           # a trace id (hex)
    ("a" * 64, True),                                                     # a sha-256 (hex)
    (TOKEN, False),                                                       # a token
    (BODY, False),                                                        # its body alone
    ("x-" + SECRET + "-y", False),                                        # the secret inside
    ("x" * 129, False),
    ("", False),
    ("has space", False),
])
def test_a_request_id_that_can_hold_a_key_is_never_adopted(rid, adopted):
    assert adoptable_request_id(rid) is adopted


@pytest.mark.parametrize("rid", [BODY, "x-" + SECRET + "-y"])
async def test_a_key_sent_as_request_id_is_replaced_on_both_listeners(gut, rid):
    async with gut.proxy.get("/health", headers={"X-Request-Id": rid}) as r:
        assert r.status == 200
        assert SECRET not in r.headers["X-Request-Id"]
    forwarded = [v for k, v in gut.upstream.requests[-1]["headers"] if k.lower() == "x-request-id"]
    assert forwarded and SECRET not in forwarded[0]
    async with gut.admin.get("/admin/v1/workspaces", headers={"X-Request-Id": rid}) as r:
        assert SECRET not in r.headers["X-Request-Id"]


async def test_no_route_never_echoes_a_key_found_in_the_path(gut):
    for path in (f"/nowhere/{TOKEN}", f"/nowhere/{BODY}/x", f"/nowhere/a{SECRET}b"):
        async with gut.proxy.get(URL(str(gut.proxy_server.make_url("")).rstrip("/") + path,
                                     encoded=True)) as r:
            text = await r.text()
            assert r.status == 404 and (await r.json())["error"]["code"] == "no_route"
            assert SECRET not in text
    async with gut.proxy.get("/nowhere/short") as r:       # ordinary paths are still named
        assert "/nowhere/short" in (await r.json())["error"]["message"]


@pytest.mark.parametrize("path", ["/people/%c0%ae%c0%ae/x", "/people/%c0%af", "/people/%e0%80%ae",
                                  "/people/%ed%a0%80", "/people/%ff", "/people/%c3"])
def test_percent_encoding_that_is_not_valid_utf8_is_bad_path(path):
    with pytest.raises(BadRequest) as caught:
        check_path(path)
    assert caught.value.code == "bad_path"


def test_valid_utf8_percent_encoding_is_still_accepted():
    check_path("/people/ren%C3%A9e")
    check_path("/people/%e2%82%ac")


async def test_overlong_dot_in_the_path_is_refused_end_to_end(gut):
    url = URL(str(gut.proxy_server.make_url("")).rstrip("/") + "/people/%c0%ae%c0%ae/admin",
              encoded=True)
    async with gut.proxy.get(url) as r:
        assert r.status == 400 and (await r.json())["error"]["code"] == "bad_path"
    assert gut.upstream.requests == []


@pytest.mark.parametrize("text", ["evil\x1b[2J", "csi\u009b31m", "bell\x07", "new\nline",
                                  "rtl\u202eexe.txt", "iso\u2066x\u2069", "rlm\u200fx", "sep\u2028x", "del\x7f"])
@pytest.mark.parametrize("field", ["name", "description"])
async def test_text_fields_with_control_characters_are_refused(gut, text, field):
    body = {"name": "ok", "scopes": ["people:read"], field: text}
    status, answer = await gut.admin_json("POST", "/workspaces/acme/keys", body)
    assert status == 400, answer
    assert "control characters" in answer["error"]["message"]


async def test_ordinary_unicode_text_is_accepted(gut):
    status, answer = await gut.admin_json("POST", "/workspaces/acme/keys", {
        "name": "Zoë's CRM — prod", "description": "日本語 ✓", "scopes": ["people:read"]})
    assert status == 201, answer


@pytest.mark.parametrize("name", ["..", ".", ".hidden", "-x", "_x"])
async def test_role_names_are_slugs(gut, name):
    url = f"/admin/v1/workspaces/acme/roles/{name.replace('.', '%2E')}"
    async with gut.admin.put(URL(str(gut.admin_server.make_url("")).rstrip("/") + url,
                                 encoded=True), json={"scopes": ["people:read"]}) as r:
        assert r.status in (400, 404), await r.text()
    status, _ = await gut.admin_json("POST", "/workspaces/acme/keys",
                                     {"name": "k", "role": name})
    assert status == 400
    status, roles = await gut.admin_json("GET", "/workspaces/acme/roles")
    assert name not in [r["name"] for r in roles["items"]]


@pytest.mark.parametrize("where", ["query", "path"])
@pytest.mark.parametrize("mangled", [TOKEN[:-6], TOKEN[:-1], TOKEN[:-6] + "zzzzzz", TOKEN + "x"])
async def test_a_key_with_a_broken_checksum_in_the_url_never_reaches_the_log(gut, capfd,
                                                                              where, mangled):
    """A token cut short or mistyped in its checksum still carries its key id and secret
    whole, and the checksum is computed from them: as good as the token to a reader of the
    log, which never holds a secret (README). The access log masked only tokens whose checksum
    verified."""
    target = f"/health?api_key={mangled}" if where == "query" else f"/nowhere/{mangled}"
    gut.logs(capfd)
    async with gut.proxy.get(URL(str(gut.proxy_server.make_url("")).rstrip("/") + target,
                                 encoded=True)) as r:
        assert r.status in (200, 400, 404)  # 400: a valid token inside (key_in_url)
    _, err = gut.logs(capfd)
    assert "request_id" in err  # the line was written
    assert SECRET not in err


@pytest.mark.parametrize("request_head", [
    f"GET /health HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {TOKEN}\x01\r\n\r\n",
    f"GET /health/{TOKEN}\x01 HTTP/1.1\r\nHost: t\r\n\r\n",
    f"GET /health HTTP/1.1\r\nHost: t\r\nX-Api-Key {TOKEN}\r\n\r\n",
    # a target without its leading '/' (a client joining URLs by hand): the parser's
    # InvalidURLError is the target itself, unquoted
    f"GET health?api_key={TOKEN} HTTP/1.1\r\nHost: t\r\n\r\n",
    # an absolute-form target without a host: its InvalidURLError is the target, unquoted
    f"GET http:///health?api_key={TOKEN} HTTP/1.1\r\nHost: t\r\n\r\n",
    f"CONNECT {TOKEN}@ HTTP/1.1\r\nHost: t\r\n\r\n",
], ids=["header-value", "path", "header-name", "relative-target", "absolute-no-host",
        "connect-target"])
async def test_a_request_the_parser_refuses_is_logged_without_the_bytes_it_quotes(
        gut, caplog, request_head):
    """aiohttp's HTTP parser quotes the bytes it refused in its message (the whole header line
    or request line), and keygate logged that message at debug level: with
    ``server.log_level: debug`` a token or the operator token sent in a malformed header or
    path was written to the log, which never holds one at any level. The log keeps the
    parser's reason only."""
    import asyncio
    import logging
    caplog.set_level(logging.DEBUG)
    reader, writer = await asyncio.open_connection("127.0.0.1", gut.proxy_server.port)
    writer.write(request_head.encode("latin-1"))
    head = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    assert head.startswith(b"HTTP/1.0 400 ") or head.startswith(b"HTTP/1.1 400 "), head
    refused = [r.getMessage() for r in caplog.records if "malformed request" in r.getMessage()]
    assert refused, "the refusal is logged"
    for secret in (TOKEN, BODY, SECRET):
        assert secret not in caplog.text
        assert not any(secret in message for message in refused)


async def test_the_admin_listener_logs_a_refused_request_without_the_operator_token(
        tmp_path, redis_url):
    """The same for the admin listener of ``keygate serve`` at ``log_level: debug``: an
    operator token in a header line the parser refused was written to the log whole."""
    import asyncio
    from served import ADMIN_TOKEN, Served, write_config
    config, pport, aport = write_config(tmp_path, redis_url=redis_url, log_level="debug")
    gw = Served(config, pport, aport)
    try:
        await gw.ready()
        reader, writer = await asyncio.open_connection("127.0.0.1", aport)
        writer.write(f"GET /admin/v1/workspaces HTTP/1.1\r\nHost: t\r\n"
                     f"Authorization: Bearer {ADMIN_TOKEN}\x01\r\n\r\n".encode())
        assert (await asyncio.wait_for(reader.read(), 5)).startswith(b"HTTP/1.1 400 ")
        writer.close()
        assert gw.terminate() == 0
        err = gw.stderr()
        assert "refused a malformed request" in err
        assert ADMIN_TOKEN not in err
    finally:
        gw.close()
