"""The console's server side, without a browser: the page's files and headers, and the admin
API answering a workspace admin's key with exactly the self-service rules (own workspace only,
never wider than the key itself, operator-only routes stay operator-only)."""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser

import pytest
from yarl import URL

from gateway.admin import WORKSPACE_ADMIN_ROUTES
from harness import gateway_under_test, make_config

CSP = re.compile(r"(^|;)\s*default-src 'self'\s*(;|$)")


@pytest.fixture
async def gut(upstream, redis_url, monkeypatch):
    async with gateway_under_test(make_config(str(upstream.make_url(""))), redis_url,
                                  monkeypatch) as g:
        await g.workspace("acme")
        await g.workspace("beta")
        g.admin_token, g.admin_key = await g.key("acme", name="acme-admin",
                                                  scopes=["keys:admin", "people:read"])
        yield g


async def as_key(g, token: str, method: str, path: str, body=None):
    async with g.admin.request(method, "/admin/v1" + path, json=body,
                               headers={"Authorization": f"Bearer {token}"}) as r:
        return r.status, await r.json()


# --- the page ----------------------------------------------------------------------------------

class _Scan(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.inline_scripts, self.style_attrs, self.handlers, self.refs = 0, 0, [], []
        self._in_script = False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "script":
            self._in_script = "src" not in attrs
        if tag == "style" or "style" in attrs:
            self.style_attrs += 1
        self.handlers += [a for a in attrs if a.startswith("on")]
        self.refs += [attrs[a] for a in ("src", "href") if a in attrs]

    def handle_data(self, data):
        if self._in_script and data.strip():
            self.inline_scripts += 1

    def handle_endtag(self, tag):
        if tag == "script":
            self._in_script = False


async def test_console_page_is_served_without_auth_with_strict_headers(gut):
    async with gut.admin.get("/console/", headers={"Authorization": ""}) as r:
        assert r.status == 200 and r.content_type == "text/html"
        page = await r.text()
        headers = r.headers
    csp = headers["Content-Security-Policy"]
    assert CSP.search(csp) and "'unsafe-inline'" not in csp and "'unsafe-eval'" not in csp
    assert "frame-ancestors 'none'" in csp and "object-src 'none'" in csp
    assert "require-trusted-types-for 'script'" in csp and "trusted-types 'none'" in csp
    assert headers["X-Frame-Options"] == "DENY"
    assert headers["X-Content-Type-Options"] == "nosniff"
    scan = _Scan()
    scan.feed(page)
    assert scan.inline_scripts == 0 and scan.style_attrs == 0 and scan.handlers == []
    # every file the page names is served from here, relative: no CDN, no third party
    assert sorted(scan.refs) == ["#workspaces", "app.css", "app.js", "favicon.svg"]
    for ref in (r for r in scan.refs if not r.startswith("#")):
        async with gut.admin.get("/console/" + ref) as r:
            assert r.status == 200, ref
            assert r.headers["Content-Security-Policy"] == csp
            assert r.headers["X-Frame-Options"] == "DENY"


async def test_console_scripts_never_touch_storage_cookies_or_html_sinks(gut):
    async with gut.admin.get("/console/app.js") as r:
        script = re.sub(r"^\s*//.*$", "", await r.text(), flags=re.M)  # code, not comments
        assert r.content_type == "text/javascript"
    for forbidden in ("localStorage", "sessionStorage", "document.cookie", "innerHTML",
                      "outerHTML", "insertAdjacentHTML", "eval(", "new Function",
                      "location.hash =", "history.pushState", "console.log", "http://",
                      "https://"):
        assert forbidden not in script, forbidden


async def test_no_served_file_holds_inline_script_handlers_or_foreign_urls(gut):
    """Every file in the package's console folder is served (and nothing else), each with the
    type its name says and nosniff; none holds an inline script, an inline event handler, a
    style attribute, a javascript: URL or a URL to another origin, nor builds one in script."""
    from importlib import resources
    from gateway.admin.console import CONSOLE_FILES
    folder = resources.files("gateway.admin") / "console"
    assert sorted(f.name for f in folder.iterdir()) == sorted(CONSOLE_FILES)
    for name, kind in CONSOLE_FILES.items():
        async with gut.admin.get("/console/" + ("" if name == "index.html" else name)) as r:
            assert r.status == 200 and r.content_type == kind, name
            assert r.headers["X-Content-Type-Options"] == "nosniff"
            text = await r.text()
        assert not re.search(r"javascript:|data:|vbscript:", text, re.I), name
        assert not re.search(r"(https?:)?//(?!www\.w3\.org/2000/svg\b)[\w.-]+\.[a-z]{2,}/",
                             re.sub(r"^\s*(//|/\*|\*).*$", "", text, flags=re.M)), name
        if name.endswith((".html", ".svg")):
            scan = _Scan()
            scan.feed(text)
            assert scan.inline_scripts == 0 and scan.style_attrs == 0, name
            assert scan.handlers == [], name
            assert "<script" not in text or name == "index.html", name
        if name.endswith(".js"):
            code = re.sub(r"^\s*//.*$", "", text, flags=re.M)
            # event handlers only by addEventListener: never an on* attribute or property
            assert not re.search(r"""setAttribute\(\s*["']on|\.on[a-z]+\s*=[^=]|["']on[a-z]+["']\s*:""",
                                 code), name
        if name.endswith(".css"):
            assert not re.search(r"expression\(|@import|url\(", text, re.I), name


async def test_every_answer_under_console_carries_the_pages_headers(gut):
    """Not only the files: a 404 or 405 under /console/ (a mistyped asset, a path-traversal
    probe, a POST) is the console's answer too, and a browser must not sniff or frame it."""
    async with gut.admin.get("/console/") as r:
        expected = {h: r.headers[h] for h in ("Content-Security-Policy", "X-Frame-Options",
                                             "X-Content-Type-Options", "Referrer-Policy")}
    assert expected["Referrer-Policy"] == "no-referrer"
    for method, path in (("GET", "/console/nope.js"), ("GET", "/console/%2e%2e/"),
                         ("GET", "/console/..%2fpyproject.toml"), ("GET", "/console/index.html"),
                         ("HEAD", "/console/app.css"), ("POST", "/console/"),
                         ("DELETE", "/console/app.js"), ("GET", "/console")):
        async with gut.admin.request(method, URL(path, encoded=True),
                                     allow_redirects=False) as r:
            got = {h: r.headers.get(h) for h in expected}
            assert got == expected, (method, path, r.status)
    async with gut.admin.get("/admin/v1/workspaces") as r:  # the API is not the console
        assert "Content-Security-Policy" not in r.headers


async def test_nothing_that_shows_or_carries_a_token_may_be_stored_by_a_cache(gut):
    """The console's page (where tokens are typed and shown) and every answer of the admin API
    and of self-service (a new key's token, key listings, usage) say ``Cache-Control:
    no-store``: no browser, proxy or CDN in between may keep a copy on disk. ``no-cache`` (the
    page's before) lets any cache store it, and the API's answers said nothing at all."""
    for path in ("/console/", "/console/app.js", "/console/nope"):
        async with gut.admin.get(path) as r:
            assert r.headers.get("Cache-Control") == "no-store", path
    auth = {"Authorization": f"Bearer {gut.admin_token}"}
    calls = (("POST", "/admin/v1/workspaces/acme/keys", {"name": "ci", "scopes": ["people:read"]}),
             ("GET", "/admin/v1/workspaces/acme/keys", None),
             ("GET", "/admin/v1/workspaces/acme/usage", None),
             ("GET", "/admin/v1/workspaces/nope/keys", None))
    for method, path, body in calls:
        async with gut.admin.request(method, path, json=body, headers=auth) as r:
            assert r.status in (200, 201, 404) and r.headers.get("Cache-Control") == "no-store", \
                (method, path, r.status, r.headers.get("Cache-Control"))
            if r.status == 201:
                rotate = (await r.json())["key"]["id"]
    async with gut.admin.post(f"/admin/v1/workspaces/acme/keys/{rotate}/rotate", json={},
                              headers=auth) as r:
        assert r.status == 201 and r.headers.get("Cache-Control") == "no-store"
    for method, path, body in (("POST", "/_keygate/v1/keys", {"name": "self",
                                                             "scopes": ["people:read"]}),
                               ("GET", "/_keygate/v1/keys", None)):
        async with gut.proxy.request(method, path, json=body, headers=auth) as r:
            assert r.status in (200, 201) and r.headers.get("Cache-Control") == "no-store", \
                (method, path, r.status, r.headers.get("Cache-Control"))


async def test_console_without_slash_redirects_and_other_paths_are_404(gut):
    async with gut.admin.get("/console", allow_redirects=False) as r:
        # relative, so that a path prefix a reverse proxy adds is kept (/kg/console → /kg/console/)
        assert r.status == 308 and r.headers["Location"] == "console/"
        assert r.url.join(URL(r.headers["Location"])).path == "/console/"
    for path in ("/console/app.py", "/console/x/app.js",
                 "/console/%2e%2e/pyproject.toml", "/ui"):
        async with gut.admin.get(URL(path, encoded=True), allow_redirects=False) as r:
            assert r.status == 404, path
            assert (await r.json())["error"]["code"] == "not_found"


# --- a workspace admin on the admin API --------------------------------------------------------

async def test_workspace_admin_lists_only_its_own_workspace(gut):
    status, body = await as_key(gut, gut.admin_token, "GET", "/workspaces")
    assert status == 200 and [w["id"] for w in body["items"]] == ["acme"]
    status, body = await as_key(gut, gut.admin_token, "GET", "/workspaces/acme")
    assert status == 200 and body["id"] == "acme" and body["plan"] == "starter"


async def test_workspace_admin_manages_its_own_keys(gut):
    token = gut.admin_token
    status, created = await as_key(gut, token, "POST", "/workspaces/acme/keys",
                                   {"name": "ci", "scopes": ["people:read"]})
    assert status == 201 and created["token"].startswith("kg_live_")
    key_id = created["key"]["id"]
    async with gut.proxy.get("/people", headers={"Authorization":
                                                 f"Bearer {created['token']}"}) as r:
        assert r.status == 200
    status, listing = await as_key(gut, token, "GET", "/workspaces/acme/keys")
    assert status == 200 and key_id in [k["id"] for k in listing["items"]]
    status, patched = await as_key(gut, token, "PATCH", f"/workspaces/acme/keys/{key_id}",
                                   {"description": "nightly"})
    assert status == 200 and patched["description"] == "nightly"
    status, rotated = await as_key(gut, token, "POST", f"/workspaces/acme/keys/{key_id}/rotate",
                                   {"grace_seconds": 60})
    assert status == 201 and rotated["key"]["name"] == "ci"
    status, revoked = await as_key(gut, token, "POST",
                                   f"/workspaces/acme/keys/{rotated['key']['id']}/revoke")
    assert status == 200 and revoked["status"] == "revoked"
    async with gut.proxy.get("/people", headers={"Authorization":
                                                 f"Bearer {rotated['token']}"}) as r:
        assert r.status == 401 and (await r.json())["error"]["code"] == "revoked_key"
    status, usage = await as_key(gut, token, "GET", "/workspaces/acme/usage")
    assert status == 200 and usage["limits"]["max_keys"] == 5
    status, roles = await as_key(gut, token, "GET", "/workspaces/acme/roles")
    assert status == 200 and "reader" in [r["name"] for r in roles["items"]]
    # the audit records the acting key, not the operator
    status, audit = await gut.admin_json("GET", "/workspaces/acme/audit")
    actors = {e["action"]: e["actor"] for e in audit["items"]
              if e["action"].startswith("key.") and e["target"] != gut.admin_key["id"]}
    assert set(actors.values()) == {gut.admin_key["id"]}, audit


async def test_another_workspace_reads_exactly_as_one_that_does_not_exist(gut):
    _, beta_key = await gut.key("beta", name="beta-key")
    paths = [("GET", "/workspaces/{ws}"), ("PATCH", "/workspaces/{ws}"),
             ("GET", "/workspaces/{ws}/keys"), ("POST", "/workspaces/{ws}/keys"),
             ("GET", "/workspaces/{ws}/keys/" + beta_key["id"]),
             ("PATCH", "/workspaces/{ws}/keys/" + beta_key["id"]),
             ("POST", "/workspaces/{ws}/keys/" + beta_key["id"] + "/revoke"),
             ("POST", "/workspaces/{ws}/keys/" + beta_key["id"] + "/rotate"),
             ("GET", "/workspaces/{ws}/usage"), ("GET", "/workspaces/{ws}/roles"),
             ("PUT", "/workspaces/{ws}/roles/x"), ("DELETE", "/workspaces/{ws}/roles/x"),
             ("GET", "/workspaces/{ws}/audit")]
    body = {"name": "x", "scopes": ["people:read"]}
    for method, path in paths:
        answers = []
        for ws in ("beta", "ghost"):
            status, error = await as_key(gut, gut.admin_token, method, path.format(ws=ws),
                                         body if method in ("POST", "PATCH", "PUT") else None)
            answers.append((status, error["error"]["code"],
                            error["error"]["message"].replace(ws, "WS")))
        assert answers[0] == answers[1] == (404, "not_found", "There is no workspace 'WS'."), \
            (method, path, answers)
    # a token pasted where a workspace id goes is not echoed back
    status, error = await as_key(gut, gut.admin_token, "GET",
                                 f"/workspaces/{gut.admin_token}/keys")
    assert status == 404 and gut.admin_token[12:] not in json.dumps(error)
    status, key = await gut.admin_json("GET", f"/workspaces/beta/keys/{beta_key['id']}")
    assert key["status"] == "active" and key["name"] == "beta-key"  # nothing changed


async def test_operator_only_routes_stay_operator_only(gut):
    token = gut.admin_token
    for method, path, body in [("POST", "/workspaces", {"id": "mine", "name": "Mine"}),
                               ("PATCH", "/workspaces/acme", {"plan": "unlimited"}),
                               ("PATCH", "/workspaces/acme", {"name": "Renamed"}),
                               ("PUT", "/workspaces/acme/roles/reader", {"scopes": ["ALL"]}),
                               ("DELETE", "/workspaces/acme/roles/reader", None),
                               ("GET", "/workspaces/acme/audit", None)]:
        status, error = await as_key(gut, token, method, path, body)
        assert status == 403, (method, path, error)
        assert "operator" in error["error"]["message"]
    status, ws = await gut.admin_json("GET", "/workspaces/acme")
    assert ws["plan"] == "starter" and ws["name"] == "Acme"
    status, listing = await gut.admin_json("GET", "/workspaces")
    assert [w["id"] for w in listing["items"]] == ["acme", "beta"]
    status, roles = await gut.admin_json("GET", "/workspaces/acme/roles")
    assert {"name": "reader", "scopes": ["people:read", "companies:read"],
            "source": "config"} in roles["items"]


async def test_a_workspace_admins_refused_admin_calls_are_logged_as_that_key(gut, caplog):
    """The admin log's actor is who called: a `keys:admin` key's calls are logged under its
    id. A call of such a key refused an operator-only route (403), or another workspace
    (404), was logged with actor `-` (as an unidentified caller), so the log hid which key
    was probing the operator's routes: the key was known, the refusal came after it."""
    import logging
    key_id = gut.admin_key["id"]
    calls = [("POST", "/workspaces", {"id": "mine", "name": "Mine"}, 403),
             ("GET", "/workspaces/acme/audit", None, 403),
             ("GET", "/workspaces/beta/keys", None, 404),
             ("GET", "/workspaces/acme/keys", None, 200)]
    with caplog.at_level(logging.INFO, logger="keygate.admin"):
        for method, path, body, expected in calls:
            status, _ = await as_key(gut, gut.admin_token, method, path, body)
            assert status == expected, (method, path, status)
    lines = [r for r in caplog.records if r.name == "keygate.admin"
             and r.getMessage().startswith("admin ")]
    logged = [(r.method, r.path, r.status, r.actor) for r in lines]
    assert logged == [(m, "/admin/v1" + p, s, key_id) for m, p, _, s in calls], logged


async def test_every_admin_route_not_listed_for_workspace_admins_is_refused_to_them(gut):
    """A route added later (reload, scopes, ...) is operator-only unless it is listed."""
    routes = {(route.method, route.resource.canonical)
              for route in gut.gw.admin_app.router.routes()
              if route.resource is not None and route.resource.canonical.startswith("/admin/")
              and route.method != "HEAD"}
    assert len(WORKSPACE_ADMIN_ROUTES & routes) >= 10  # the list names routes as registered
    for method, canonical in sorted(routes - WORKSPACE_ADMIN_ROUTES):
        path = canonical.removeprefix("/admin/v1").format(ws="acme", key=gut.admin_key["id"],
                                                          name="reader")
        async with gut.admin.request(method, "/admin/v1" + path,
                                     headers={"Authorization": ""}) as r:
            if r.status != 401:  # a route that needs no auth at all (a public document)
                continue
        status, error = await as_key(gut, gut.admin_token, method, path)
        assert status == 403, (method, canonical, error)


async def test_workspace_admin_cannot_widen_a_key(gut):
    token = gut.admin_token
    writer_token, writer = await gut.key("acme", name="writer", role="editor")
    _, reader = await gut.key("acme", name="reader", role="reader")
    refusals = [
        ("POST", "/workspaces/acme/keys", {"name": "w", "scopes": ["people:write"]}),
        ("POST", "/workspaces/acme/keys", {"name": "w", "scopes": ["ALL"]}),
        ("POST", "/workspaces/acme/keys", {"name": "w", "role": "editor"}),
        ("POST", "/workspaces/acme/keys", {"name": "w", "role": "admin"}),
        ("PATCH", f"/workspaces/acme/keys/{reader['id']}", {"role": "editor"}),
        ("PATCH", f"/workspaces/acme/keys/{reader['id']}", {"scopes": ["companies:read"]}),
        ("PATCH", f"/workspaces/acme/keys/{gut.admin_key['id']}",
         {"scopes": ["keys:admin", "ALL"]}),
        ("POST", f"/workspaces/acme/keys/{writer['id']}/rotate", {}),
    ]
    for method, path, body in refusals:
        status, error = await as_key(gut, token, method, path, body)
        assert status == 403 and error["error"]["code"] == "insufficient_scope", \
            (method, path, body, error)
    status, listing = await gut.admin_json("GET", "/workspaces/acme/keys")
    scopes = {k["name"]: k["scopes"] for k in listing["items"]}
    assert scopes == {"acme-admin": ["keys:admin", "people:read"], "writer":
                      ["people:read", "companies:read", "people:write"],
                      "reader": ["people:read", "companies:read"]}
    async with gut.proxy.get("/people", headers={"Authorization": f"Bearer {writer_token}"}) as r:
        assert r.status == 200  # the refused rotation left the writer's key alone


async def test_workspace_admin_key_with_an_expiry_cannot_outlive_itself(gut):
    token, key = await gut.key("acme", name="temp-admin", scopes=["keys:admin", "people:read"],
                               expires_in=3600)
    status, error = await as_key(gut, token, "POST", "/workspaces/acme/keys",
                                 {"name": "forever", "scopes": ["people:read"],
                                  "expires_at": "2099-01-01T00:00:00Z"})
    assert status == 403, error
    status, error = await as_key(gut, token, "PATCH", f"/workspaces/acme/keys/{key['id']}",
                                 {"expires_at": None})
    assert status == 403, error
    status, created = await as_key(gut, token, "POST", "/workspaces/acme/keys",
                                   {"name": "child", "scopes": ["people:read"]})
    assert status == 201 and created["key"]["expires_at"] == key["expires_at"]


async def test_keys_that_are_not_workspace_admins_are_refused(gut):
    reader_token, reader = await gut.key("acme", name="reader", role="reader")
    status, error = await as_key(gut, reader_token, "GET", "/workspaces/acme/keys")
    assert status == 403 and error["error"]["code"] == "insufficient_scope"
    status, _ = await gut.admin_json("POST", f"/workspaces/acme/keys/{gut.admin_key['id']}/revoke")
    status, error = await as_key(gut, gut.admin_token, "GET", "/workspaces/acme/keys")
    assert status == 401 and error["error"]["code"] == "unauthorized"
    assert "revoked" in error["error"]["message"] and error["error"]["request_id"]
    wrong = gut.admin_token[:-8] + ("A" if gut.admin_token[-8] != "A" else "B") + \
        gut.admin_token[-7:]
    for bad in (wrong, "kg_live_" + "x" * 50, "kg_live_short", "kg_"):
        status, error = await as_key(gut, bad, "GET", "/workspaces/acme/keys")
        assert status == 401 and error["error"]["code"] == "unauthorized", (bad, error)
        assert bad not in error["error"]["message"]
    status, error = await as_key(gut, "not-the-operator-token", "GET", "/workspaces")
    assert status == 401 and error["error"]["message"] == "The operator token is not valid."


async def test_wrong_keys_on_the_admin_listener_meet_the_failure_throttle(gut):
    statuses = []
    for i in range(22):  # per_ip is 20 in the test config: well-formed tokens, wrong secrets
        forged = _with_checksum(gut.admin_token[:20] + f"{i:032d}")
        status, body = await as_key(gut, forged, "GET", "/workspaces")
        statuses.append((status, body["error"]["code"]))
    assert statuses[0] == (401, "unauthorized")
    assert statuses[-1] == (429, "too_many_failures")


def _with_checksum(without: str) -> str:
    import zlib
    alphabet = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
    n, digits = zlib.crc32(without.encode("ascii")), ""
    while n:
        n, r = divmod(n, 62)
        digits = alphabet[r] + digits
    return without + digits.rjust(6, "0")


async def test_a_workspace_admin_keys_ip_allow_list_holds_on_the_admin_api_too(gut):
    """SPEC: a key bound to addresses is 403 ``ip_not_allowed`` from elsewhere. The admin API
    checked a ``keys:admin`` key's state and scopes but not its allow-list, so a leaked admin
    key bound to the office network still managed the workspace's keys from anywhere."""
    token = gut.admin_token
    admin_id = gut.admin_key["id"]
    status, _ = await gut.admin_json("PATCH", f"/workspaces/acme/keys/{admin_id}",
                                     {"allowed_ips": ["10.0.0.0/8"]})
    assert status == 200
    for method, path, body in (("GET", "/workspaces/acme/keys", None),
                               ("POST", "/workspaces/acme/keys",
                                {"name": "from-elsewhere", "scopes": ["people:read"]})):
        status, answer = await as_key(gut, token, method, path, body)
        assert (status, answer["error"]["code"]) == (403, "ip_not_allowed"), (path, answer)
    # the same key from an allowed address (this test's client is 127.0.0.1) manages again
    await gut.admin_json("PATCH", f"/workspaces/acme/keys/{admin_id}",
                         {"allowed_ips": ["127.0.0.0/8"]})
    status, listing = await as_key(gut, token, "GET", "/workspaces/acme/keys")
    assert status == 200 and "from-elsewhere" not in [k["name"] for k in listing["items"]]


async def test_a_workspace_admin_key_used_on_the_admin_api_is_stamped_last_used(gut):
    """The console signs in with a keys:admin key and uses it only on the admin API: it
    listed as never used, and `keys list --unused 90d` offered it for revocation. Its calls
    now stamp last_used_at, and count no usage."""
    status, body = await as_key(gut, gut.admin_token, "GET",
                                f"/workspaces/acme/keys/{gut.admin_key['id']}")
    assert status == 200
    status, body = await as_key(gut, gut.admin_token, "GET", "/workspaces/acme/keys")
    assert status == 200
    status, body = await gut.admin_json("GET", f"/workspaces/acme/keys/{gut.admin_key['id']}")
    assert status == 200 and body["last_used_at"] is not None
    assert await gut.used("acme") == 0


async def test_a_workspace_admin_keys_refused_admin_call_stamps_nothing(gut):
    """Only a keys:admin key's allowed calls stamp last_used_at: one the admin API refuses as
    out of its reach (another workspace: 404; an operator-only route: 403) is not a use."""
    key_path = f"/workspaces/acme/keys/{gut.admin_key['id']}"
    status, body = await gut.admin_json("GET", key_path)
    assert status == 200 and body["last_used_at"] is None
    status, _ = await as_key(gut, gut.admin_token, "GET", "/workspaces/acme/audit")
    assert status == 403
    status, _ = await as_key(gut, gut.admin_token, "GET", "/workspaces/other/keys")
    assert status == 404
    status, body = await gut.admin_json("GET", key_path)
    assert status == 200 and body["last_used_at"] is None


def test_the_page_takes_a_token_for_a_key_exactly_when_the_admin_api_does():
    """The page asks the API whether a token is a key only when the API may take it as one
    (its shape: any other token the API checks as the operator's alone); the admin API
    decides by its own pattern. They are one pattern, so they cannot disagree. (A token of
    that shape may still be the operator's: test_console_browser's
    test_an_operator_token_shaped_exactly_like_a_key_signs_in_as_the_operator.)"""
    from importlib import resources
    from gateway.admin.middleware import _TOKEN_SHAPE
    script = (resources.files("gateway.admin") / "console" / "app.js").read_text()
    found = re.search(r"function looksLikeKey\(token\) \{\s*return /\^(.+?)\$/\.test\(token\);",
                      script)
    assert found and found.group(1) == _TOKEN_SHAPE.pattern, found


async def test_a_workspace_admin_keys_admin_api_calls_are_bounded_as_its_self_service_calls(gut):
    """The same key, the same operations: on the proxy listener (``/_keygate/v1/keys``) a key's
    calls are bounded to 20 a second, so no key calls the listing (it reads every key of the
    workspace) or creates and rotates (an argon2 hash each) as fast as it likes. On the admin
    listener, where the console signs workspace admins in, the same key was not bounded at
    all: 60 listings at once all answered. Now both listeners take from the one log of the
    key's own calls (429 ``rate_limited`` with ``Retry-After``, never its RateLimit fields),
    and counting no usage; another key, and the operator, are not held by it."""
    import asyncio

    async def listing(token: str) -> tuple[int, dict, dict]:
        async with gut.admin.get("/admin/v1/workspaces/acme/keys",
                                 headers={"Authorization": f"Bearer {token}"}) as r:
            return r.status, await r.json(), dict(r.headers)

    got = await asyncio.gather(*(listing(gut.admin_token) for _ in range(60)))
    statuses = [s for s, _, _ in got]
    assert 19 <= statuses.count(200) <= 40, statuses
    refused = [(b, h) for s, b, h in got if s == 429]
    assert refused, statuses
    for body, headers in refused:
        assert body["error"]["code"] == "rate_limited", body
        assert "20 calls a second" in body["error"]["message"]
        assert headers["Retry-After"] == "1" and "RateLimit" not in headers
    # the proxy listener's self-service spends from the same log
    async with gut.proxy.get("/_keygate/v1/keys",
                             headers={"Authorization": f"Bearer {gut.admin_token}"}) as r:
        assert r.status == 429
    other, _ = await gut.key("acme", name="other-admin", scopes=["keys:admin"])
    assert (await listing(other))[0] == 200
    assert (await gut.admin_json("GET", "/workspaces/acme/keys"))[0] == 200
    assert await gut.used("acme") == 0


@pytest.mark.parametrize("method,path,body", [
    ("POST", "/workspaces/acme/keys", {"name": "ci", "description": "{token}"}),
    ("POST", "/workspaces/acme/keys", {"name": "{token}"}),
    ("POST", "/workspaces/acme/keys", {"name": "ci", "meta": {"note": "admin: {token}"}}),
    ("PATCH", "/workspaces/acme/keys/{key}", {"description": "pasted {token} here"}),
    ("PATCH", "/workspaces/acme", {"name": "{token}"}),
    ("POST", "/workspaces", {"id": "gamma", "name": "{token}"}),
])
async def test_the_operator_token_pasted_into_a_stored_field_is_400_and_never_stored(
        gut, method, path, body):
    """The console's operator signs in by pasting the operator token; pasted again into the
    next form (a key's name or description, meta, a workspace's name), it was stored and
    listed to every keys:admin key of the workspace: a tenant then held the token of every
    workspace. Refused, echoed nowhere, nothing written."""
    from harness import ADMIN_TOKEN

    key_id = gut.admin_key["id"]
    before = await gut.admin_json("GET", "/workspaces/acme/audit")
    raw = json.loads(json.dumps(body).replace("{token}", ADMIN_TOKEN))
    status, answer = await gut.admin_json(method, path.replace("{key}", key_id), raw)
    assert (status, answer["error"]["code"]) == (400, "bad_request"), answer
    assert "operator token" in answer["error"]["message"]
    assert ADMIN_TOKEN not in json.dumps(answer)
    assert await gut.admin_json("GET", "/workspaces/acme/audit") == before
    status, listing = await gut.admin_json("GET", "/workspaces/acme/keys")
    assert ADMIN_TOKEN not in json.dumps(listing)
    status, listing = await gut.admin_json("GET", "/workspaces")
    assert ADMIN_TOKEN not in json.dumps(listing) and len(listing["items"]) == 2


@pytest.mark.parametrize("method,path,body", [
    ("POST", "/workspaces/acme/keys", {"name": "pasted {token}", "scopes": ["people:read"]}),
    ("POST", "/workspaces/acme/keys",
     {"name": "ci", "description": "pasted {token}", "scopes": ["people:read"]}),
    ("POST", "/workspaces/acme/keys",
     {"name": "ci", "scopes": ["people:read"], "meta": {"{token}": "a name within meta"}}),
    ("PATCH", "/workspaces/acme", {"name": "{token}"}),
])
async def test_the_operator_token_written_with_a_json_escape_is_refused_too(
        gut, method, path, body):
    """The check looked for the token in the raw body bytes, while the API acts on the decoded
    JSON: the same token with a character written as a JSON escape (``\\u0074`` for ``t``, as
    an encoder that escapes writes one: ``json.dumps`` of a token holding ``"``, ``\\`` or
    non-ASCII; ``/`` as ``\\/``) was stored in the clear and listed to the workspace's
    ``keys:admin`` keys. Every text of the decoded body is checked, meta's names too."""
    from harness import ADMIN_TOKEN
    escaped = "\\u%04x" % ord(ADMIN_TOKEN[0]) + ADMIN_TOKEN[1:-1] \
        + "\\u%04x" % ord(ADMIN_TOKEN[-1])
    raw = json.dumps(body).replace("{token}", escaped).encode()
    assert ADMIN_TOKEN.encode() not in raw and ADMIN_TOKEN in json.dumps(json.loads(raw))
    before = await gut.admin_json("GET", "/workspaces/acme/audit")
    async with gut.admin.request(method, "/admin/v1" + path, data=raw,
                                 headers={"Content-Type": "application/json"}) as r:
        answer, status = await r.json(), r.status
    for listing in ("/workspaces/acme/keys", "/workspaces"):
        assert ADMIN_TOKEN not in json.dumps((await gut.admin_json("GET", listing))[1])
    assert (status, answer["error"]["code"]) == (400, "bad_request"), answer
    assert "operator token" in answer["error"]["message"]
    assert ADMIN_TOKEN not in json.dumps(answer)
    assert await gut.admin_json("GET", "/workspaces/acme/audit") == before


@pytest.mark.parametrize("invisible", ["\u200b", "\u00ad", "\ufeff", "\U000e0041", "\U000e0100"])
async def test_the_operator_token_split_by_an_invisible_character_is_refused_too(
        gut, invisible):
    """Pasted from rich text with a zero-width space, a soft hyphen or a BOM inside, the
    operator token read as itself in every listing but was looked for contiguous only."""
    from harness import ADMIN_TOKEN
    pasted = ADMIN_TOKEN[:10] + invisible + ADMIN_TOKEN[10:]
    status, answer = await gut.admin_json("POST", "/workspaces/acme/keys",
                                          {"name": "ci", "description": f"pasted {pasted}"})
    assert (status, answer["error"]["code"]) == (400, "bad_request"), answer
    assert "operator token" in answer["error"]["message"]
    status, listing = await gut.admin_json("GET", "/workspaces/acme/keys")
    assert ADMIN_TOKEN[10:] not in json.dumps(listing)


async def test_the_operator_token_as_a_role_name_is_refused(gut):
    """PUT /roles/{name}: the name is text the admin API stores and lists to the workspace's
    keys:admin keys (GET /roles is theirs), but only the decoded body was searched for the
    operator token, never the path. A lowercase operator token of at most 63 characters
    (this suite's, a uuid4, `openssl rand -hex 16`) is a valid role name. Refused as in a
    body (400, nothing stored)."""
    from harness import ADMIN_TOKEN
    status, answer = await gut.admin_json("PUT", f"/workspaces/acme/roles/{ADMIN_TOKEN}",
                                          {"scopes": ["people:read"]})
    assert (status, answer["error"]["code"]) == (400, "bad_request"), answer
    assert "operator token" in answer["error"]["message"]
    assert ADMIN_TOKEN not in json.dumps(answer)
    status, roles = await gut.admin_json("GET", "/workspaces/acme/roles")
    assert status == 200 and ADMIN_TOKEN not in json.dumps(roles)
    # percent-encoded in the path, it is the same name
    encoded = "".join(f"%{b:02X}" if c in "ot" else c for c, b in
                      zip(ADMIN_TOKEN, ADMIN_TOKEN.encode()))
    status, answer = await gut.admin_json("PUT", f"/workspaces/acme/roles/{encoded}",
                                          {"scopes": ["people:read"]})
    assert status == 400 and "operator token" in answer["error"]["message"], answer
    # a role name that is no operator token is stored as ever
    status, answer = await gut.admin_json("PUT", f"/workspaces/acme/roles/{ADMIN_TOKEN[:-1]}",
                                          {"scopes": ["people:read"]})
    assert status == 200, answer


async def test_a_workspace_key_is_never_told_a_text_holds_the_operator_token(gut):
    """Only the operator's own bodies are checked: a keys:admin key that could learn "this
    holds the operator token" from a 400 would test guesses through key names, where no
    operator-token throttle counts them."""
    status, body = await as_key(gut, gut.admin_token, "POST", "/workspaces/acme/keys",
                                {"name": "guess test-operator-token-0123456789"})
    assert status == 201, body
