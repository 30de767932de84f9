"""``GET /admin/v1/openapi.json``: served without auth, covers every route the admin app
registers, and every answer a live gateway gives (real Redis, real sockets) fits it —
checked by schemathesis, a property-based API tester, driven from the document alone."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import sys
import time
from pathlib import Path

import pytest

from gateway.admin.openapi import document

from harness import ADMIN_TOKEN, gateway_under_test, make_config

METHODS = ("get", "put", "post", "delete", "patch", "head", "options")


def documented_operations(doc: dict) -> set[tuple[str, str]]:
    return {(method.upper(), path) for path, item in doc["paths"].items()
            for method in item if method in METHODS}


async def test_the_document_is_served_without_auth_and_is_openapi_3_1(redis_url, upstream,
                                                                     monkeypatch):
    async with gateway_under_test(make_config(str(upstream.make_url(""))), redis_url,
                                  monkeypatch) as g:
        async with g.admin.get("/admin/v1/openapi.json", headers={"Authorization": ""}) as r:
            assert r.status == 200
            assert r.content_type == "application/json"
            assert r.headers["X-Request-Id"]
            doc = await r.json()
    assert doc["openapi"] == "3.1.0"
    assert doc == document()
    from gateway import __version__
    assert doc["info"]["version"] == __version__


async def test_every_admin_route_is_documented_and_nothing_else(redis_url, upstream, monkeypatch):
    """A route added to the admin app without a line in gateway/admin/openapi.py fails here."""
    async with gateway_under_test(make_config(str(upstream.make_url(""))), redis_url,
                                  monkeypatch) as g:
        served = set()
        for route in g.gw.admin_app.router.routes():
            info = route.resource.get_info()
            path = info.get("path") or info.get("formatter")
            if route.method in ("HEAD", "*") or path.startswith("/console"):
                continue  # (the console is the page that uses this API, not part of it)
            served.add((route.method, path))
    doc = document()
    admin = {(m, p) for m, p in documented_operations(doc) if not p.startswith("/_keygate/")}
    assert served == admin


def test_every_self_service_endpoint_is_documented():
    from gateway.admin import SELF_SERVICE_PREFIX
    ops = documented_operations(document())
    for method, path in [("GET", "/_keygate/v1/usage"), ("GET", SELF_SERVICE_PREFIX),
                         ("POST", SELF_SERVICE_PREFIX), ("GET", SELF_SERVICE_PREFIX + "/{key}"),
                         ("PATCH", SELF_SERVICE_PREFIX + "/{key}"),
                         ("POST", SELF_SERVICE_PREFIX + "/{key}/revoke"),
                         ("POST", SELF_SERVICE_PREFIX + "/{key}/rotate")]:
        assert (method, path) in ops


def test_a_keys_rate_limit_is_described_as_held_within_its_workspaces():
    """The key's `rate_limit` had no description (the object) or only its pattern (create,
    update), so a client generated from the document read it as the key's rate; the gateway
    holds it within the workspace's rate in force."""
    schemas = document()["components"]["schemas"]
    for name in ("Key", "KeyCreate", "KeyPatch"):
        text = schemas[name]["properties"]["rate_limit"].get("description", "")
        assert "held within its workspace's rate" in text and "both windows" in text, name
    assert "held within" in schemas["Limits"]["properties"]["rate_limit"]["description"]


def test_every_schema_reference_resolves():
    doc = document()
    text = repr(doc)
    for name in re.findall(r"#/components/schemas/(\w+)", text):
        assert name in doc["components"]["schemas"], name
    for name in re.findall(r"#/components/headers/([\w-]+)", text):
        assert name in doc["components"]["headers"], name


# --- schemathesis against live listeners ---------------------------------------------------------

ST = shutil.which("st", path=str(Path(sys.executable).parent)) or shutil.which("st")
CHECKS = ("not_a_server_error,status_code_conformance,content_type_conformance,"
          "response_headers_conformance,response_schema_conformance,negative_data_rejection")
# the admin listener's too: a method a path does not take is 405 with an Allow that is right,
# a call without the token is 401, a deleted key reads 404 and a created one can be read. (Not
# on the proxy listener: verify takes any method, and reads its X-Forwarded-* headers first.)
ADMIN_CHECKS = CHECKS + (",unsupported_method,allow_header_conformance,missing_required_header,"
                         "use_after_free,ensure_resource_availability")


def unicode_tables_for(cwd: Path) -> None:
    """Hand a run of ``st`` in ``cwd`` the Unicode tables hypothesis keeps under
    .hypothesis/unicode_data (which characters UTF-8 encodes, and their categories), made once
    by this process (kept in its own .hypothesis/ from run to run). Each run in a fresh ``cwd``
    made them anew from all 1.1M code points: ~8 s of CPU, a third of a run's, on a loaded
    machine. Only these tables are shared: the runs' example databases stay their own."""
    from hypothesis.configuration import storage_directory
    from hypothesis.internal.charmap import charmap, intervals_from_codec
    charmap()
    intervals_from_codec("utf-8")  # schemathesis draws its strings within UTF-8
    shutil.copytree(storage_directory("unicode_data").path, cwd / ".hypothesis" / "unicode_data")


async def schemathesis(schema_url: str, base_url: str, token: str, *options: str,
                       cwd: Path, timeout: float = 150, checks: str = CHECKS) -> tuple[int, str]:
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    unicode_tables_for(cwd)
    proc = await asyncio.create_subprocess_exec(
        ST, "run", schema_url, "--url", base_url, "-H", f"Authorization: Bearer {token}",
        "--checks", checks, "--max-examples", "12", "--seed", "1", "--workers", "1",
        "--phases", "examples,coverage,fuzzing,stateful", "--request-timeout", "10",
        "--suppress-health-check", "all", "--no-color", *options,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, env=env,
        cwd=cwd)  # its cache directory stays out of the source tree
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    except asyncio.TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    text = out.decode(errors="replace")
    Path(os.environ.get("KEYGATE_ST_LOG", "/dev/null")).write_text(text)
    return proc.returncode, text


pytestmark_st = pytest.mark.skipif(ST is None, reason="schemathesis is not installed")


@pytestmark_st
async def test_schemathesis_finds_no_server_error_and_no_answer_outside_the_document(
        redis_url, upstream, monkeypatch, tmp_path):
    config = make_config(str(upstream.make_url("")))
    async with gateway_under_test(config, redis_url, monkeypatch) as g:
        await g.workspace("acme")
        await g.key("acme", role="reader")
        base = str(g.admin_server.make_url("")).rstrip("/")
        started = time.monotonic()
        code, out = await schemathesis(base + "/admin/v1/openapi.json", base, ADMIN_TOKEN,
                                       "--exclude-path-regex", "^/_keygate/", cwd=tmp_path,
                                       checks=ADMIN_CHECKS)
        elapsed = time.monotonic() - started
    assert code == 0, out
    assert re.search(r"\b[1-9]\d* passed", out) or "passed" in out, out
    assert elapsed < 120, f"the schemathesis run took {elapsed:.0f}s"


@pytestmark_st
async def test_schemathesis_as_a_workspace_admin_on_the_admin_listener(redis_url, upstream,
                                                                     monkeypatch, tmp_path):
    """The admin API called with a `keys:admin` key instead of the operator token: its own
    workspace's key routes with the self-service rules, 404 for other workspaces, 403 for
    the operator's routes. Every answer must still be one the document gives (the run above
    uses the operator token only). The workspace is pinned to its own, so the run reaches the
    handlers instead of 404s."""
    config = make_config(str(upstream.make_url("")))
    async with gateway_under_test(config, redis_url, monkeypatch) as g:
        await g.workspace("acme", plan="unlimited")
        token, _ = await g.key("acme", role="admin")
        await g.key("acme", role="reader")
        # (keys come from the listing and the creations, through the document's links)
        (tmp_path / "schemathesis.toml").write_text(
            '[parameters]\n"path.ws" = "acme"\n"path.name" = "reader"\n')
        base = str(g.admin_server.make_url("")).rstrip("/")
        started = time.monotonic()
        code, out = await schemathesis(base + "/admin/v1/openapi.json", base, token,
                                       # a revoke, rotate, delete or edit (disabled, an
                                       # expiry, an address list) of the acting key itself
                                       # (its id is in every listing) ends the run's
                                       # credentials, and every later call answered 401
                                       # when the stateful phase happened to reach it (the
                                       # keys' ids, and so which one a link picks, differ
                                       # from run to run); the operator's run covers all four
                                       "--exclude-path-regex", "^/_keygate/|/(revoke|rotate)$",
                                       "--exclude-method", "DELETE",
                                       "--exclude-name",
                                       "PATCH /admin/v1/workspaces/{ws}/keys/{key}",
                                       "--max-examples", "6", cwd=tmp_path,
                                       checks=ADMIN_CHECKS)
        elapsed = time.monotonic() - started
    assert code == 0, out
    # the key's calls were judged, not refused: only the operator's routes answer 403
    assert "401 Unauthorized (" not in out, out
    assert elapsed < 90, f"the schemathesis run took {elapsed:.0f}s"


@pytestmark_st
@pytest.mark.parametrize("cors", [False, True], ids=["without-cors", "with-cors"])
async def test_schemathesis_on_the_self_service_endpoints_of_the_proxy_listener(
        redis_url, upstream, monkeypatch, tmp_path, cors):
    # with `cors` the document's example Origin is allowed: its preflights are answered 204
    from gateway.settings import CorsConfig
    config = make_config(str(upstream.make_url("")), cors=CorsConfig(
        allow_origins=("https://app.example",)) if cors else None)
    async with gateway_under_test(config, redis_url, monkeypatch) as g:
        await g.workspace("acme", plan="unlimited")
        token, _ = await g.key("acme", role="admin")
        admin_base = str(g.admin_server.make_url("")).rstrip("/")
        proxy_base = str(g.proxy_server.make_url("")).rstrip("/")
        code, out = await schemathesis(admin_base + "/admin/v1/openapi.json", proxy_base, token,
                                       "--include-path-regex", "^/_keygate/",
                                       # a revoke or rotate of the acting key itself (its id
                                       # is in every listing) would end the run's credentials;
                                       # both run the admin API's code, tested above
                                       "--exclude-path-regex", "/(revoke|rotate)$",
                                       # with CORS the same operations, with an Origin: half
                                       # the examples (a run takes ~25 s of a loaded suite)
                                       *(("--max-examples", "6") if cors else ()),
                                       cwd=tmp_path)
    assert code == 0, out


async def test_a_request_body_is_documented_required_exactly_when_the_api_requires_one(
        redis_url, upstream, monkeypatch):
    """Every body was documented ``required: false``, so a client generated from the document
    (and schemathesis) sent ``PUT .../roles/{name}``, ``POST /workspaces`` or a PATCH with no
    body, which the API refuses with 400 (a field is required, or nothing to change). Each
    documented operation that takes a body is sent here without one, on both listeners."""
    doc = document()
    async with gateway_under_test(make_config(str(upstream.make_url(""))), redis_url,
                                  monkeypatch) as g:
        await g.workspace("acme", plan="unlimited")
        token, _ = await g.key("acme", role="admin")
        status, _ = await g.admin_json("PUT", "/workspaces/acme/roles/ops",
                                       {"scopes": ["people:read"]})
        assert status == 200
        mismatched = []
        for path, item in doc["paths"].items():
            for method, operation in item.items():
                if method not in METHODS or "requestBody" not in operation:
                    continue
                _, key = await g.key("acme")  # a key of its own for each call
                url = path.replace("{ws}", "acme").replace("{key}", key["id"]) \
                    .replace("{name}", "ops")
                if path.startswith("/_keygate/"):
                    request = g.proxy.request(method.upper(), url,
                                              headers={"Authorization": f"Bearer {token}"})
                else:
                    request = g.admin.request(method.upper(), url)
                async with request as r:
                    refused = r.status == 400
                    answer = (r.status, await r.text())
                if refused != operation["requestBody"].get("required", False):
                    mismatched.append((method.upper(), path, answer))
    assert not mismatched, [(m, p, status) for m, p, (status, _) in mismatched]


def codes_in(value) -> set[str]:
    if isinstance(value, dict):
        found = set()
        for key, item in value.items():
            if key == "code" and isinstance(item, dict) and "enum" in item:
                found |= set(item["enum"])
            found |= codes_in(item)
        return found
    if isinstance(value, list):
        return set().union(*(codes_in(v) for v in value)) if value else set()
    return set()


def test_every_error_code_the_api_answers_is_in_the_error_table():
    table = (Path(__file__).resolve().parent.parent / "docs" / "errors.md").read_text()
    codes = codes_in(document())
    import gateway.errors as errors
    codes |= {cls.code for cls in vars(errors).values()
              if isinstance(cls, type) and issubclass(cls, errors.GatewayError)}
    # the proxy's codes, raised by name across the pipeline (subpackages included: the
    # admin listener's shutting_down, the store's key_limit_reached)
    source = "\n".join(p.read_text() for p in
                       (Path(errors.__file__).parent).rglob("*.py"))
    codes |= set(re.findall(r'code="([a-z_]+)"', source))
    assert codes
    missing = sorted(c for c in codes if f"`{c}`" not in table)
    assert not missing, missing


def raised_statuses_and_codes() -> set[tuple[int, str]]:
    """(status, code) of every error class and of every ``SomeError(..., code="x")`` made in
    gateway/ with a literal code (a status set elsewhere, such as aiohttp's, is left out)."""
    import ast

    import gateway.errors as errors
    classes = {c.__name__: c for c in vars(errors).values()
               if isinstance(c, type) and issubclass(c, errors.GatewayError)}
    found = {(c.status, c.code) for c in classes.values()}
    for path in Path(errors.__file__).parent.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            name = getattr(node, "func", None)
            name = getattr(name, "id", None) or getattr(name, "attr", None)
            if not isinstance(node, ast.Call) or name not in classes:
                continue
            given = {k.arg: k.value for k in node.keywords}
            code, status = given.get("code"), given.get("status")
            if (code is None or isinstance(code, ast.Constant)) and status is None:
                found.add((classes[name].status,
                           classes[name].code if code is None else code.value))
    return found


def test_the_error_table_gives_each_code_the_status_it_is_answered_with():
    """docs/errors.md's rows are `| status | `code` | ...`: a code answered with one status
    and documented with another sends a client's retry logic the wrong way."""
    table = (Path(__file__).resolve().parent.parent / "docs" / "errors.md").read_text()
    rows = {(int(status), code)
            for status, code in re.findall(r"^\| (\d{3}) \| `([a-z_]+)` \|", table, re.M)}
    documented = {code for _, code in rows}
    raised = raised_statuses_and_codes()
    assert len(raised) > 20
    assert sorted(r for r in raised if r[1] in documented and r not in rows) == []


# --- answers the gateway gives that the document must hold ---------------------------------------

def documented_codes(doc: dict, method: str, path: str, status: int) -> list[str]:
    """The error codes the document allows for ``method path`` answering ``status``."""
    responses = doc["paths"][path][method.lower()]["responses"]
    if str(status) not in responses:
        return []
    schema = responses[str(status)]["content"]["application/json"]["schema"]
    return schema["allOf"][1]["properties"]["error"]["properties"]["code"]["enum"]


async def test_a_workspace_keys_ip_refusal_and_a_stalled_body_are_in_the_document(
        redis_url, upstream, monkeypatch):
    """SPEC: the document describes every error and status code exactly as served. A
    ``keys:admin`` key used from outside its ``allowed_ips`` is answered 403 ``ip_not_allowed``
    on the admin listener (only ``insufficient_scope`` was described there), and a body that
    stalls is 408 ``request_timeout`` on the admin API and self-service (no 408 anywhere)."""
    from gateway.config import ServerConfig, Timeouts

    from harness import ADMIN_TOKEN, closed_within

    doc = document()
    config = make_config(str(upstream.make_url("")), server=ServerConfig(
        host="127.0.0.1", timeouts=Timeouts(header=5.0, body=1.0, idle=30.0)))
    async with gateway_under_test(config, redis_url, monkeypatch) as g:
        await g.workspace("acme")
        token, key = await g.key("acme", scopes=["keys:admin", "people:read"])

        async def stalled(port: int, path: str, bearer: str) -> tuple[int, str]:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            try:
                writer.write(f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                             f"{bearer}\r\nContent-Type: application/json\r\n"
                             f"Content-Length: 100\r\n\r\n{{\"name\": ".encode())
                _, got = await closed_within(reader, 5.0)
            finally:
                writer.close()
            head, _, body = got.partition(b"\r\n\r\n")
            return int(head.split()[1]), json.loads(body)["error"]["code"]

        served = [("POST", "/admin/v1/workspaces", await stalled(
                       g.admin_server.port, "/admin/v1/workspaces", ADMIN_TOKEN)),
                  ("POST", "/_keygate/v1/keys", await stalled(
                      g.proxy_server.port, "/_keygate/v1/keys", token))]
        status, _ = await g.admin_json("PATCH", f"/workspaces/acme/keys/{key['id']}",
                                       {"allowed_ips": ["10.0.0.0/8"]})
        assert status == 200
        for method, path in (("GET", "/admin/v1/workspaces/{ws}/keys"),
                             ("POST", "/admin/v1/workspaces/{ws}/keys")):
            async with g.admin.request(method, path.replace("{ws}", "acme"),
                                       json={"name": "n"} if method == "POST" else None,
                                       headers={"Authorization": f"Bearer {token}"}) as r:
                served.append((method, path, (r.status, (await r.json())["error"]["code"])))
    assert [s for _, _, s in served] == [(408, "request_timeout")] * 2 + \
        [(403, "ip_not_allowed")] * 2
    undescribed = [(m, p, s) for m, p, s in served
                   if s[1] not in documented_codes(doc, m, p, s[0])]
    assert not undescribed, undescribed


async def test_an_unmet_expectation_is_answered_417_as_the_document_says(redis_url, upstream,
                                                                        monkeypatch):
    """docs/errors.md: the admin listener answers an `Expect` other than `100-continue` 417
    `bad_request`, on every call (before the caller is authenticated, a probe's too); the
    document listed no 417 at all. The proxy listener's `/_keygate/` endpoints do not answer
    417 (they ignore such an `Expect`), so the document gives them none."""
    doc = document()
    async with gateway_under_test(make_config(str(upstream.make_url(""))), redis_url,
                                  monkeypatch) as g:
        await g.workspace("acme")
        token, key = await g.key("acme", scopes=["keys:admin", "people:read"])

        async def expecting(port: int, method: str, path: str, bearer: str) -> tuple[int, str]:
            url = re.sub(r"\{[^}]+\}", lambda m: {"{ws}": "acme", "{key}": key["id"],
                                                  "{name}": "reader"}.get(m.group(0), "x"),
                         path)
            body = b"{}" if method in ("POST", "PUT", "PATCH", "DELETE") else b""
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            try:
                writer.write(f"{method} {url} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                             f"{bearer}\r\nExpect: something\r\nContent-Type: application/json"
                             f"\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
                             .encode() + body)
                got = await asyncio.wait_for(reader.read(), 5)
            finally:
                writer.close()
            head, _, answer = got.partition(b"\r\n\r\n")
            status = int(head.split()[1])
            code = json.loads(answer)["error"]["code"] if status == 417 else ""
            return status, code

        admin, proxy = [], []
        for method, path in sorted(documented_operations(doc)):
            if path.startswith("/_keygate/"):
                proxy.append((method, path, await expecting(g.proxy_server.port, method, path,
                                                            token)))
            else:
                admin.append((method, path, await expecting(g.admin_server.port, method, path,
                                                            ADMIN_TOKEN)))
    assert admin and {s for _, _, s in admin} == {(417, "bad_request")}, admin
    undescribed = [(m, p) for m, p, s in admin
                   if "bad_request" not in documented_codes(doc, m, p, 417)]
    assert not undescribed, undescribed
    assert proxy and not [s for _, _, s in proxy if s[0] == 417], proxy
    assert not [(m, p) for m, p in documented_operations(doc)
                if p.startswith("/_keygate/") and "417" in doc["paths"][p][m.lower()]
                ["responses"]]


async def test_a_body_over_the_limit_on_a_get_or_delete_is_in_the_document(
        redis_url, upstream, monkeypatch):
    """Any authenticated admin call's declared body is read before its handler runs, so a GET
    or DELETE sent with a body over aiohttp's 1 MiB is 413 ``body_too_large``, as a POST's is;
    the document described 413 for calls that take a body only (and 408 for all of them)."""
    doc = document()
    big = b"x" * (1024 * 1024 + 1)
    async with gateway_under_test(make_config(str(upstream.make_url(""))), redis_url,
                                  monkeypatch) as g:
        await g.workspace("acme")
        _, key = await g.key("acme", scopes=["people:read"])
        served = []
        for method, path in (("GET", "/admin/v1/workspaces/{ws}/keys"),
                             ("GET", "/admin/v1/workspaces/{ws}/usage"),
                             ("DELETE", "/admin/v1/workspaces/{ws}/keys/{key}"),
                             ("DELETE", "/admin/v1/workspaces/{ws}/roles/{name}")):
            url = path.replace("{ws}", "acme").replace("{key}", key["id"]) \
                .replace("{name}", "reader")
            async with g.admin.request(method, url, data=big,
                                       headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as r:
                served.append((method, path, (r.status, (await r.json())["error"]["code"])))
    assert [s for _, _, s in served] == [(413, "body_too_large")] * 4
    undescribed = [(m, p, s) for m, p, s in served
                   if s[1] not in documented_codes(doc, m, p, s[0])]
    assert not undescribed, undescribed


async def test_an_operator_over_the_failure_limit_is_answered_as_the_document_says(
        redis_url, upstream, monkeypatch):
    """Wrong operator tokens past ``keys.failures.per_ip`` make every operator-token call of
    that client 429 ``too_many_failures`` with ``Retry-After``, on every authenticated admin
    route (the reload one too): each such answer, its header included, is in the document."""
    doc = document()
    async with gateway_under_test(make_config(str(upstream.make_url(""))), redis_url,
                                  monkeypatch) as g:
        for i in range(20):
            async with g.admin.get("/admin/v1/workspaces",
                                   headers={"Authorization": f"Bearer wrong-{i}"}) as r:
                assert r.status == 401
        served = []
        for method, path in (("GET", "/admin/v1/workspaces"), ("POST", "/admin/v1/reload"),
                             ("PUT", "/admin/v1/workspaces/{ws}/roles/{name}")):
            url = path.replace("{ws}", "acme").replace("{name}", "reader")
            async with g.admin.request(method, url) as r:  # the right token
                served.append((method, path, (r.status, (await r.json())["error"]["code"]),
                               r.headers.get("Retry-After", "")))
    assert [s for _, _, s, _ in served] == [(429, "too_many_failures")] * 3, served
    undescribed = [(m, p, s) for m, p, s, _ in served
                   if s[1] not in documented_codes(doc, m, p, s[0])]
    assert not undescribed, undescribed
    for method, path, _, retry_after in served:
        header = doc["paths"][path][method.lower()]["responses"]["429"]["headers"]["Retry-After"]
        assert header.get("required", True) and \
            re.fullmatch(header["schema"]["pattern"], retry_after), (path, header, retry_after)


@pytest.mark.parametrize("name", ["reader", "read-only", "Read.Only", "r_1", "9", "_x", ".x", "-x",
                                  "a b", "a" * 63, "a" * 64, ""])
def test_the_documented_role_name_is_the_one_the_api_takes(name):
    """The OpenAPI document's role-name pattern allowed a leading '_', '.' or '-', which the
    admin API refuses with 400: a client generated from the document sent names it could not
    have."""
    from gateway.admin.openapi_schemas import ROLE_NAME
    from gateway.admin.validate import parse_role_name
    from gateway.errors import BadRequest

    documented = (ROLE_NAME["minLength"] <= len(name) <= ROLE_NAME["maxLength"]
                  and re.search(ROLE_NAME["pattern"], name) is not None)
    try:
        parse_role_name(name)
        taken = True
    except BadRequest:
        taken = False
    assert documented == taken, (name, ROLE_NAME)


async def test_a_role_stored_under_an_old_name_fits_the_document(redis_url, upstream,
                                                                  monkeypatch):
    """A workspace role an earlier version stored under a name that is no slug (upper case,
    '_', '.') is still listed and deletable, so the document must describe it: the Role
    object's name and DELETE's path parameter took the slug pattern alone, and a client
    checking answers against the document (or a generated one checking its arguments)
    refused the listing and could not delete the role."""
    async with gateway_under_test(make_config(str(upstream.make_url(""))), redis_url,
                                  monkeypatch) as g:
        await g.workspace("acme")
        await g.gw.store.put_role("acme", "Read_Only.v1", ["people:read"])  # as stored before
        async with g.admin.get("/admin/v1/openapi.json") as r:
            doc = await r.json()
        status, listing = await g.admin_json("GET", "/workspaces/acme/roles")
        assert status == 200
        role = doc["components"]["schemas"]["Role"]["properties"]["name"]
        for item in listing["items"]:
            assert len(item["name"]) <= role["maxLength"], item
            assert re.search(role["pattern"], item["name"]), (item, role)
        item = doc["paths"]["/admin/v1/workspaces/{ws}/roles/{name}"]
        params = item.get("parameters", []) + item["delete"].get("parameters", [])
        name = [p for p in params if p["name"] == "name"][0]["schema"]
        assert re.search(name["pattern"], "Read_Only.v1"), name
        status, _ = await g.admin_json("DELETE", "/workspaces/acme/roles/Read_Only.v1")
        assert status == 200


async def test_deleting_a_role_the_workspace_does_not_define_is_documented(redis_url, upstream,
                                                                          monkeypatch):
    """DELETE of a role the workspace does not define, a configured one included (`roles
    list` shows it, `config`), is 404 `not_found`; docs/errors.md's not_found row named
    workspaces, keys and endpoints only, and `roles delete` in docs/cli.md said nothing of
    it, so an operator deleting a configured role read the 404 as a wrong workspace."""
    docs = Path(__file__).resolve().parent.parent / "docs"
    async with gateway_under_test(make_config(str(upstream.make_url(""))), redis_url,
                                  monkeypatch) as g:
        await g.workspace("acme")
        for name in ("reader", "nope"):  # a configured role, and none at all
            status, body = await g.admin_json("DELETE", f"/workspaces/acme/roles/{name}")
            assert (status, body["error"]["code"]) == (404, "not_found"), body
    row = re.search(r"^\| 404 \| `not_found` \|([^\n]*)", (docs / "errors.md").read_text(),
                    re.M).group(1)
    assert "role" in row, row
    section = (docs / "cli.md").read_text().split("### `keygate roles delete`", 1)[1]
    section = " ".join(section.split("\n#", 1)[0].split())
    assert "not_found" in section and "configured" in section, section


async def test_refusing_to_delete_a_role_keys_use_is_in_the_document(redis_url, upstream,
                                                                     monkeypatch):
    """DELETE of a workspace role that keys still use answers 409 ``conflict`` (the keys would
    be left with no scopes); the document described 404 for that call and no 409, so a client
    generated from it could not expect the refusal."""
    doc = document()
    async with gateway_under_test(make_config(str(upstream.make_url(""))), redis_url,
                                  monkeypatch) as g:
        await g.workspace("acme")
        status, _ = await g.admin_json("PUT", "/workspaces/acme/roles/ops",
                                       {"scopes": ["people:read"]})
        assert status == 200
        await g.key("acme", role="ops")
        status, body = await g.admin_json("DELETE", "/workspaces/acme/roles/ops")
    assert (status, body["error"]["code"]) == (409, "conflict")
    assert "conflict" in documented_codes(doc, "DELETE", "/admin/v1/workspaces/{ws}/roles/{name}",
                                          409)


APP = "https://app.example"
# each /_keygate/ endpoint keygate answers a preflight for, and a method it takes
PREFLIGHTED = {"/_keygate/v1/usage": "GET", "/_keygate/v1/keys": "POST",
               "/_keygate/v1/keys/{key}": "PATCH", "/_keygate/v1/keys/{key}/usage/daily": "GET",
               "/_keygate/v1/keys/{key}/revoke": "POST", "/_keygate/v1/keys/{key}/rotate": "POST"}


@pytest.mark.parametrize("cors", [True, False], ids=["with-cors", "without-cors"])
async def test_an_options_call_to_a_keygate_endpoint_is_answered_as_the_document_says(
        redis_url, upstream, monkeypatch, cors):
    """With a `cors` section keygate answers a browser's preflight to its `/_keygate/`
    endpoints itself: 204, no key asked for. The document described no OPTIONS there, so a
    client or checker built from it held that answer impossible. Every answer to an OPTIONS
    there (a preflight or not, with `cors` or without, with a key or not) is one the
    document gives for the path's `options` operation, with the headers it says it has."""
    from gateway.settings import CorsConfig
    doc = document()
    config = make_config(str(upstream.make_url("")),
                         cors=CorsConfig(allow_origins=(APP,)) if cors else None)
    async with gateway_under_test(config, redis_url, monkeypatch) as g:
        await g.workspace("acme")
        token, key = await g.key("acme", scopes=["keys:admin", "people:read"])
        for template, method in PREFLIGHTED.items():
            operation = doc["paths"][template].get("options")
            assert operation is not None, template
            assert operation["security"] == [] and "`cors`" in operation["description"]
            preflight = {"Origin": APP, "Access-Control-Request-Method": method}
            for path, headers in [
                    (template.replace("{key}", key_id), headers)
                    for key_id in (key["id"], "no-such-key")  # a preflight reads no key
                    for headers in (preflight, {**preflight, "Authorization": f"Bearer {token}"},
                                    {"Authorization": f"Bearer {token}"}, {})]:
                async with g.proxy.options(path, headers=headers) as r:
                    body = await r.read()
                    status = str(r.status)
                assert status in operation["responses"], (template, headers, status, body)
                if cors and "Origin" in headers:
                    assert r.status == 204, (template, body)
                documented = operation["responses"][status]
                for name, header in documented.get("headers", {}).items():
                    header = doc["components"]["headers"][name] if "$ref" in header else header
                    if header.get("required"):
                        assert name in r.headers, (template, status, name)
                if r.status >= 400:
                    code = json.loads(body)["error"]["code"]
                    assert code in documented_codes(doc, "OPTIONS", template, r.status), code
    assert "options" not in doc["paths"]["/_keygate/v1/verify"]  # a verify call, any method


# --- docs/api.md, the short version, against the document -----------------------------------------

API_MD = (Path(__file__).resolve().parent.parent / "docs" / "api.md").read_text()
SERVED_ROOTS = ("/admin/", "/_keygate/", "/healthz", "/readyz", "/metrics")


def api_md_operations() -> set[tuple[str, str, bool]]:
    """(method or "*", path, covers the paths below it) for every `METHOD /path` of
    docs/api.md; in its admin section a path is under /admin/v1, `PATCH …` is the path before,
    and `/x…` or `/x[/<...>]` stand for the paths below /x too."""
    found = set()
    for section in re.split(r"\n(?=## )", API_MD):
        prefix = "/admin/v1" if section.startswith("## Admin listener") else ""
        last = ("", False)
        for span in re.findall(r"`([^`\n]*)`", section):
            match = re.fullmatch(r"((?:[A-Z]+/)*[A-Z]+ )?(/[^ ]*|…)", span)
            if not match:
                continue
            methods, path = (match.group(1) or "*").strip(), match.group(2)
            if path == "…":
                path, below = last
            else:
                below = path.endswith("…") or "[/" in path
                path = re.split(r"[\[?…]", path)[0]
                if not path.startswith((*SERVED_ROOTS, "/console/")):
                    path = prefix + path
            last = (path, below)
            found |= {(method, path, below) for method in methods.split("/")}
    return found


def test_the_api_overview_names_every_operation_of_the_document_and_no_other():
    """docs/api.md is the short version of the document: each operation the document
    describes is named there, and each `METHOD /path` it names is in the document."""
    served = {(method.upper(), path.replace("{key}", "{id}"))
              for method, path in documented_operations(document())}
    named = api_md_operations()

    def covered(method: str, path: str) -> bool:
        return any(m in ("*", method) and (p == path or below and path.startswith(p))
                   for m, p, below in named)
    assert sorted(op for op in served if not covered(*op)) == [], "missing from docs/api.md"
    extra = sorted((m, p) for m, p, below in named if m != "*" and not below
                   and p.startswith(SERVED_ROOTS) and (m, p) not in served)
    assert extra == [], "in docs/api.md, not in the document"


@pytest.mark.parametrize("name, schema", [("Key object", "Key"),
                                          ("Workspace object", "Workspace"),
                                          ("Usage object", "Usage")])
def test_the_api_overview_lists_every_field_of_the_objects(name, schema):
    paragraph = API_MD.split(f"**{name}:**", 1)[1].split("**", 1)[0]
    listed = {field.strip() for span in re.findall(r"`([^`]*)`", paragraph)
              for field in span.split(",")}
    fields = set(document()["components"]["schemas"][schema]["properties"])
    assert sorted(fields - listed) == []


TEXT_VALUES = ["a", "Acme Corp", "é", "\U0001f600", "", " ", "   ", "\u00a0", "\u3000 \u2002",
               "\ufeff", "a\nb", "a\tb", "a\u0085b", "a\u202eb", "a\u2028b", "a\u200eb",
               "a\u2066b", "a\u061cb", " a ", "x" * 200, "x" * 201, "x" * 2000, "x" * 2001,
               "\u200b", "\u2060\u00ad", "\u3164", "\u2800 \u200b", "\ufe0f", "a\u200b",
               "\u0645\u06cc\u200c\u062e\u0648\u0627\u0647\u0645",
               "\U0001f468\u200d\U0001f469\u200d\U0001f467"]


@pytest.mark.parametrize("schema_name, field, max_len, nonempty", [
    ("WorkspaceCreate", "name", 200, True), ("WorkspacePatch", "name", 200, True),
    ("KeyCreate", "name", 200, True), ("KeyPatch", "name", 200, True),
    ("KeyCreate", "description", 2000, False), ("KeyPatch", "description", 2000, False)])
def test_a_text_field_is_documented_as_the_api_takes_it(schema_name, field, max_len, nonempty):
    """A name of blanks (`"   "`) or one holding a bidirectional override or a line separator
    (U+202E, U+2028), and a description holding a newline or a tab, fit the document (which
    excluded only C0/C1 controls from names and nothing from descriptions) and were refused
    with 400: a client generated from the document, or a tester, sent what it held valid."""
    import jsonschema
    from gateway.admin.validate import parse_text
    from gateway.errors import BadRequest

    schema = document()["components"]["schemas"][schema_name]["properties"][field]
    wrong = []
    for value in TEXT_VALUES:
        documented = jsonschema.Draft202012Validator(schema).is_valid(value)
        try:
            parse_text({field: value}, field, max_len, nonempty=nonempty)
            taken = True
        except BadRequest:
            taken = False
        if documented != taken:
            wrong.append((value[:12], documented, taken))
    assert wrong == [], wrong


@pytest.mark.parametrize("value", ["1/s", "5/m", " 5 / m ", "01/s", "1000000000/s",
                                   "0001000000000/m", "0/s", "00/m", "1000000001/s",
                                   "99999999999/s", "5/h", "5/S", "5", "/s", "-5/s", "5.0/s"])
def test_a_rate_is_documented_valid_exactly_when_the_api_takes_it(value):
    """The document's rate pattern took any digits, so `0/s` or `99999999999/s` fit it and
    were refused with 400 (a rate is 1 to 10^9 requests): a client generated from the
    document, or a tester, sent rates it held valid."""
    import jsonschema
    from gateway.models import parse_rate_limit

    schemas = document()["components"]["schemas"]
    try:
        parse_rate_limit(value)
        taken = True
    except ValueError:
        taken = False
    for schema in (schemas["KeyCreate"]["properties"]["rate_limit"],
                   schemas["KeyPatch"]["properties"]["rate_limit"],
                   schemas["WorkspacePatch"]["properties"]["limits"]["properties"]["rate_limit"]):
        assert jsonschema.Draft202012Validator(schema).is_valid(value) == taken, (value, schema)


def test_the_query_defaults_the_api_applies_are_in_the_document():
    """The audit listing's `limit` (100 when absent), the key listing's `sort` (created) and
    the daily listings' `days` (30) had no `default` in the document (days said it in words
    only), so a client generated from it could not show or rely on what leaving one out
    does; and the audit was described as "key and role" events, while it also lists the
    workspace's own (created, renamed, its plan or limits changed)."""
    from gateway.admin.validate import AUDIT_DEFAULT, DAILY_DEFAULT

    doc = document()

    def default(path: str, name: str, method: str = "get"):
        item = doc["paths"][path]
        params = item.get("parameters", []) + item[method].get("parameters", [])
        return next(p for p in params if p.get("name") == name)["schema"].get("default")

    audit = "/admin/v1/workspaces/{ws}/audit"
    assert default(audit, "limit") == AUDIT_DEFAULT
    assert default("/admin/v1/workspaces/{ws}/keys", "sort") == "created"
    assert default("/_keygate/v1/keys", "sort") == "created"
    for path in ("/admin/v1/workspaces/{ws}/usage/daily",
                 "/admin/v1/workspaces/{ws}/keys/{key}/usage/daily",
                 "/_keygate/v1/keys/{key}/usage/daily"):
        assert default(path, "days") == DAILY_DEFAULT, path
    assert "workspace" in doc["paths"][audit]["get"]["summary"].lower()
