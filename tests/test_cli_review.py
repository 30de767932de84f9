"""The defects an adversarial review of the ``keygate`` CLI found (rv-cli), each pinned: the
console script run as a real subprocess against a real admin API
(``gateway.admin.create_admin_app`` on a loopback port, on a real redis-server), or against
an HTTP server answering a fixed body where the answer's shape is the point.

Each docstring says what the CLI did before its fix and what it does now.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

TOKEN = "rv-cli-operator-token-0123456789abcdef"
KEYGATE = str(Path(sys.executable).with_name("keygate"))


def _environ(url: str | None, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KEYGATE_")}
    env["KEYGATE_ADMIN_TOKEN"] = TOKEN
    if url:
        env["KEYGATE_ADMIN_URL"] = url
    env.update(extra)
    return env


def _run(argv: list[str], env: dict[str, str], **kw) -> subprocess.CompletedProcess:
    kw.setdefault("stdout", subprocess.PIPE)
    return subprocess.run([KEYGATE, *argv], env=env, stdin=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, timeout=60, **kw)


async def keygate(argv: list[str], env: dict[str, str], **kw) -> subprocess.CompletedProcess:
    """The console script in a thread: the admin API it talks to runs on this test's loop."""
    return await asyncio.to_thread(_run, argv, env, **kw)


@pytest.fixture
async def admin(redis_url, monkeypatch):
    """A real admin API on a loopback port, on a real redis-server; its URL."""
    import dataclasses

    from aiohttp import web

    from gateway import admin as admin_api
    from gateway.config import Argon2Config, Config, Plan
    from gateway.store import Store

    monkeypatch.setenv("KEYGATE_ADMIN_TOKEN", TOKEN)  # the admin app reads it here
    config = Config(plans={"free": Plan("free")}, default_plan="free",
                    roles={"reader": ("people:read",)})
    config = dataclasses.replace(config, keys=dataclasses.replace(
        config.keys, argon2=Argon2Config(1, 8, 1)))
    store = await Store.connect(redis_url, config)
    runner = web.AppRunner(admin_api.create_admin_app(config, store))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()
        await store.close()


async def _workspace_with_key(url: str) -> str:
    env = _environ(url)
    done = await keygate(["workspaces", "create", "acme", "--name", "Acme"], env)
    assert done.returncode == 0, done.stderr
    done = await keygate(["keys", "create", "-w", "acme", "--name", "ci", "--role", "reader",
                          "--json"], env)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)["key"]["id"]


async def _keys(url: str) -> list[dict]:
    done = await keygate(["keys", "list", "-w", "acme", "--json"], _environ(url))
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)["items"]


# --- 1. an admin URL that urllib cannot encode ends in a traceback --------------------------------

def _bad_urls(port: int) -> list[str]:
    return [f"http://127.0.0.1:{port}/ä",                # a path prefix that is not ASCII
            f"http://ｌｏｃａｌｈｏｓｔ:{port}",            # fullwidth letters in the host
            f"http://{'a' * 64}.example:{port}",         # a DNS label over 63 characters
            f"http://a..b:{port}"]                       # an empty DNS label


@pytest.mark.parametrize("which", range(4))
@pytest.mark.parametrize("how", ["--admin-url", "KEYGATE_ADMIN_URL"])
async def test_an_admin_url_urllib_cannot_encode_is_one_line_not_a_traceback(admin, which, how):
    """docs/cli.md: exit 1 when the API "could not be reached" (message on stderr), 2 on bad
    usage; admin_url() lets through any printable URL, and a non-ASCII path prefix
    (UnicodeEncodeError in http.client's request line), a non-ASCII host (UnicodeEncodeError on
    the Host header) or a host with an empty or over-long label (UnicodeError from the idna
    codec in getaddrinfo) escape AdminClient._send, which catches OSError/URLError/
    HTTPException only: a Python traceback, exit 1 from the interpreter."""
    port = int(admin.rsplit(":", 1)[1])
    url = _bad_urls(port)[which]
    if how == "--admin-url":
        done = await keygate(["--admin-url", url, "workspaces", "list"], _environ(None))
    else:
        done = await keygate(["workspaces", "list"], _environ(url))
    err = done.stderr.decode("utf-8", "replace")
    assert "Traceback" not in err, err
    assert done.returncode in (1, 2)
    assert err.startswith(("keygate", "usage")), err



@pytest.mark.parametrize("url", ["http://127.0.0.1:1/ä", "http://ｌｏｃａｌｈｏｓｔ:1",
                                 f"http://{'a' * 64}.example:1", "http://a..b:1"])
def test_a_url_urllib_cannot_send_is_cannot_reach_in_the_client(url):
    """admin_url() refuses the URLs above before a client is made; the client itself, handed
    one it does not know of, says it cannot reach the API (a CliError: one line, exit 1),
    never a UnicodeError or ValueError traceback."""
    from gateway.cli.client import AdminClient, CliError

    client = AdminClient(url, TOKEN, 5.0, None, "KEYGATE_ADMIN_TOKEN")
    with pytest.raises(CliError, match="cannot reach the admin API"):
        client.request("GET", "/workspaces")

# --- 2. the token of a new key, and the old key, lost to a pipe with no reader --------------------

async def test_keys_rotate_into_a_pipe_with_no_reader_sends_nothing(admin):
    """docs/cli.md, keys create: "With stdout closed (>&-) nothing is sent and it exits 1: the
    token would be written nowhere (keys rotate too)". A pipe whose reader has already gone
    (`keygate keys rotate ... | tee x` where tee failed to open x, `| true`) is the same: the
    token can be written nowhere. The CLI checks only for a closed descriptor
    (cli/__init__.py _stdout_open), sends the rotation, and the old key is revoked (grace 0)
    while the new token is lost: the integration is locked out. Linux reports a pipe with no
    reader as POLLERR on its write end, so it can be detected before anything is sent."""
    old = await _workspace_with_key(admin)
    read, write = os.pipe()
    os.close(read)  # the reader is gone before the command runs
    try:
        done = await keygate(["keys", "rotate", "-w", "acme", old], _environ(admin),
                             stdout=write)
    finally:
        os.close(write)
    assert done.returncode == 1
    assert b"nothing was sent" in done.stderr, done.stderr
    statuses = {k["id"]: k["status"] for k in await _keys(admin)}
    assert statuses[old] == "active", (statuses, done.stderr)
    assert len(statuses) == 1, statuses  # no new key whose token nobody has


async def test_keys_create_into_a_pipe_with_no_reader_sends_nothing(admin):
    """Same as above for keys create: a key is made whose token is written nowhere (it takes
    one of the workspace's max_keys and has to be found and revoked by hand)."""
    await _workspace_with_key(admin)
    read, write = os.pipe()
    os.close(read)
    try:
        done = await keygate(["keys", "create", "-w", "acme", "--name", "lost", "--role",
                              "reader"], _environ(admin), stdout=write)
    finally:
        os.close(write)
    assert done.returncode == 1
    assert b"nothing was sent" in done.stderr, done.stderr
    names = [k["name"] for k in await _keys(admin)]
    assert names == ["ci"], (names, done.stderr)


# --- 3. an output that cannot be written (disk full, I/O error) ends in a traceback ---------------

@pytest.mark.parametrize("json_flag", [[], ["--json"]])
async def test_an_output_write_error_is_one_line_not_a_traceback(admin, json_flag):
    """`keygate keys list > file` on a full disk (here /dev/full: ENOSPC) ends in an OSError
    traceback: main() catches BrokenPipeError only (cli/__init__.py, `except BrokenPipeError`),
    not the other OSErrors a write to stdout raises (ENOSPC, EIO, EDQUOT). Expected: one
    `keygate:` line on stderr and exit 1, as for a closed pipe."""
    await _workspace_with_key(admin)
    with open("/dev/full", "wb") as full:
        done = await keygate(["keys", "list", "-w", "acme", *json_flag], _environ(admin),
                             stdout=full)
    err = done.stderr.decode("utf-8", "replace")
    assert "Traceback" not in err, err
    assert done.returncode == 1
    assert err.startswith("keygate: "), err
    assert "could not be written" in err, err


def test_a_local_commands_output_write_error_is_one_line_not_a_traceback(tmp_path):
    """`keygate config check > file` on a full disk: its "ok:" line was written at the
    interpreter's exit, whose flush failed with "Exception ignored" and a traceback (exit
    120). The output is flushed in main(): one `keygate:` line, exit 1."""
    config = tmp_path / "keygate.yaml"
    config.write_text('upstreams:\n  crm: {url: "http://127.0.0.1:9000", timeout: 5}\n'
                      'routes:\n  - {path: "/people/**", methods: [GET], upstream: crm, '
                      'scopes: ["people:read"]}\n')
    with open("/dev/full", "wb") as full:
        done = _run(["config", "check", str(config)], _environ(None), stdout=full,
                    cwd=tmp_path)
    err = done.stderr.decode("utf-8", "replace")
    assert done.returncode == 1, err
    assert "Traceback" not in err, err  # (a note says the store was not asked)
    assert err.splitlines()[-1] == ("keygate: the output could not be written (No space "
                                    "left on device)"), err


async def test_a_new_token_that_cannot_be_written_says_which_key_to_revoke(admin):
    """`keygate keys create ... > token.txt` on a full disk: the key is made, the token's write
    fails with ENOSPC, and the command ends in a traceback (output.py print_new_token's
    print(token) is not guarded; main() catches BrokenPipeError only). The operator is left with
    a working key nobody holds. Expected: exit 1 and a line saying the key (by id) was made but
    its token was not written, so it should be revoked (as print_new_token already says for a
    token it will not print)."""
    await _workspace_with_key(admin)
    with open("/dev/full", "wb") as full:
        done = await keygate(["keys", "create", "-w", "acme", "--name", "lost", "--role",
                              "reader"], _environ(admin), stdout=full)
    err = done.stderr.decode("utf-8", "replace")
    new = [k for k in await _keys(admin) if k["name"] == "lost"]
    assert "Traceback" not in err, err
    assert done.returncode == 1
    if new:  # made: the message has to say which key to revoke
        assert new[0]["id"] in err and "revoke" in err.lower(), err




@pytest.mark.parametrize("json_flag", [[], ["--json"]])
async def test_a_rotated_token_that_cannot_be_written_says_which_key_to_revoke(admin,
                                                                               json_flag):
    """The same for keys rotate (with --json too): the new key is named, to be revoked."""
    old = await _workspace_with_key(admin)
    with open("/dev/full", "wb") as full:
        done = await keygate(["keys", "rotate", "-w", "acme", old, "--grace", "1h",
                              *json_flag], _environ(admin), stdout=full)
    err = done.stderr.decode("utf-8", "replace")
    new = [k["id"] for k in await _keys(admin) if k["id"] != old]
    assert done.returncode == 1, err
    assert len(new) == 1, new
    assert "Traceback" not in err, err
    assert (f"key {new[0]} of workspace acme was made, but its token could not be written "
            f"(No space left on device)") in err, err
    assert f"keygate keys revoke --workspace acme {new[0]}" in err, err
# --- 4. a password in a URL without '//' is repeated in the error ---------------------------------

@pytest.mark.parametrize("url", ["admin:s3cretpw@127.0.0.1:8081",
                                 "http:/admin:s3cretpw@127.0.0.1:8081",
                                 "http:admin:s3cretpw@127.0.0.1:8081",
                                 "http://admin:s3cretpw@[::1:8081",
                                 "http://admin:s3cretpw@127.0.0.1\uff0f:8081"])
@pytest.mark.parametrize("how", ["--admin-url", "KEYGATE_ADMIN_URL"])
async def test_an_admin_url_error_never_repeats_a_password(url, how):
    """cli/connection.py admin_url(): "ValueError, whose message never repeats a password".
    It masks what precedes an '@' only when urlsplit found a netloc; a URL with the '//'
    missing (`admin:pw@host:8081`, `http:/admin:pw@host`) has none, and the error
    "'admin:s3cretpw@127.0.0.1:8081' is not an http(s) URL" prints the password on stderr
    (a CI log). So did urlsplit's own ValueError ("Invalid IPv6 URL", a netloc holding a
    character NFKC turns into '/'), whose message holds the netloc."""
    if how == "--admin-url":
        done = await keygate(["--admin-url", url, "workspaces", "list"], _environ(None))
    else:
        done = await keygate(["workspaces", "list"], _environ(url))
    err = done.stderr.decode("utf-8", "replace")
    assert done.returncode == 2, err
    assert "s3cretpw" not in err, err


# --- 5. UTF-8 arguments refused as "not UTF-8 text" under an ASCII locale -------------------------

async def test_utf8_arguments_under_an_ascii_locale_are_sent_not_refused(admin):
    """cli/parser.py _utf8(): a value holding a lone surrogate is refused as "not UTF-8 text
    (typed in a terminal set to another encoding?)". Under an ASCII locale without Python's
    UTF-8 mode (LC_ALL=C with PYTHONUTF8=0: a cron job, a minimal container, a service unit),
    Python decodes argv as ASCII with surrogateescape, so *every* non-ASCII argument is
    surrogates, valid UTF-8 bytes included: `keygate workspaces rename acme --name Café` is
    refused (exit 2) with a message that says the bytes 'Caf\\xc3\\xa9' are not UTF-8, which
    they are. Expected: the argument's own bytes (os.fsencode) are decoded as UTF-8 and sent;
    only bytes that are not UTF-8 are bad usage."""
    await _workspace_with_key(admin)
    env = _environ(admin, LC_ALL="C", LANG="C", PYTHONUTF8="0", PYTHONCOERCECLOCALE="0")
    done = await keygate(["workspaces", "rename", "acme", "--name", "Café"], env)
    assert done.returncode == 0, done.stderr.decode("utf-8", "replace")
    shown = await keygate(["workspaces", "show", "acme", "--json"], _environ(admin))
    assert json.loads(shown.stdout)["name"] == "Café"



@pytest.mark.parametrize("utf8_mode", ["0", "1"])
async def test_bytes_that_are_not_utf8_are_still_refused_under_any_locale(admin, utf8_mode):
    """Only what really is not UTF-8 is bad usage: a Latin-1 'é' (0xe9) is refused under an
    ASCII locale and in UTF-8 mode alike, saying which bytes, and nothing is sent."""
    await _workspace_with_key(admin)
    env = _environ(admin, LC_ALL="C", LANG="C", PYTHONUTF8=utf8_mode,
                   PYTHONCOERCECLOCALE="0")
    done = await keygate([b"workspaces", b"rename", b"acme", b"--name", b"Caf\xe9"], env)
    err = done.stderr.decode("utf-8", "replace")
    assert done.returncode == 2, err
    assert "'Caf\\xe9' is not UTF-8 text" in err, err
    shown = await keygate(["workspaces", "show", "acme", "--json"], _environ(admin))
    assert json.loads(shown.stdout)["name"] == "Acme"

# --- 6. `workspaces create --plan ""` silently creates the workspace on the default plan ---------

async def test_workspaces_create_with_an_empty_plan_is_refused_not_dropped(admin):
    """`keygate workspaces create acme --name Acme --plan "$PLAN"` with PLAN unset: the empty
    plan is dropped (cli/workspaces.py cmd_workspaces_create, `if args.plan:`), and the
    workspace is created on the default plan, exit 0: a customer meant for `pro` silently gets
    `free`'s limits. Every other empty name is refused: `workspaces set-plan ID ""` is bad usage
    ("must not be empty", parsing.identifier, whose docstring gives this very case: "an unset
    shell variable"), `keys create --env ""` / `--role ""` are sent and refused by the API.
    Expected: a non-zero exit and no workspace made."""
    done = await keygate(["workspaces", "create", "acme", "--name", "Acme", "--plan", ""],
                         _environ(admin))
    assert done.returncode == 2, done.stdout
    assert b"--plan" in done.stderr and b"must not be empty" in done.stderr, done.stderr
    shown = await keygate(["workspaces", "show", "acme"], _environ(admin))
    assert shown.returncode == 1, shown.stdout  # not_found: nothing was made


# --- 7. JSON of keygate's shape whose fields are of another type: tracebacks ----------------------

FIELD_SHAPES = {
    "workspaces list, created_at a number": (
        ["workspaces", "list"], b'{"items": [{"id": "a", "created_at": 5}]}'),
    "keys list, scopes a number": (
        ["keys", "list", "-w", "acme"], b'{"items": [{"id": "a", "scopes": 5}]}'),
    "keys list, created_at a number": (
        ["keys", "list", "-w", "acme"], b'{"items": [{"id": "a", "created_at": 5}]}'),
    "audit, at a number": (["audit", "-w", "acme"], b'{"items": [{"at": 5}]}'),
    "roles list, scopes numbers": (
        ["roles", "list", "-w", "acme"], b'{"items": [{"name": "r", "scopes": [1, 2]}]}'),
    "workspaces limits, limits a list": (
        ["workspaces", "limits", "acme"], b'{"id": "acme", "limits": [1]}'),
    "reload, restart_required a number": (["reload"], b'{"restart_required": 5}'),
    "roles set, scopes a number": (
        ["roles", "set", "-w", "acme", "r", "--scope", "a:b"], b'{"name": "r", "scopes": 5}'),
    "workspaces limits, custom_limits a number": (
        ["workspaces", "limits", "acme"], b'{"id": "acme", "limits": {}, "custom_limits": 5}'),
    "usage --daily, requests a list": (
        ["usage", "-w", "acme", "--daily"], b'{"items": [{"date": 5, "requests": [1]}]}'),
}


@pytest.mark.parametrize("case", FIELD_SHAPES, ids=list(FIELD_SHAPES))
async def test_an_answer_whose_fields_have_another_type_is_one_line_not_a_traceback(
        aiohttp_server, case):
    """tests/test_cli.py test_a_json_answer_of_another_shape_is_one_line_exit_1 made a JSON
    answer of another *top-level* shape (an admin URL that is not keygate's, a proxy's JSON
    page, another version) one line and exit 1 instead of a traceback. One level down the same
    crash remains: the table and line builders assume each field's type (output.py human_time
    calls value.replace on any truthy value; keys.py _key_access maps over `scopes`; roles.py
    joins `scopes` as strings; key_controls.py cmd_workspaces_limits calls .get on `limits`;
    server.py cmd_reload maps over `restart_required`), so a number where a string or list is
    expected ends in an AttributeError/TypeError traceback. Expected: one `keygate:` line,
    exit 1 (or the value shown as it came)."""
    from aiohttp import web

    argv, body = FIELD_SHAPES[case]

    async def answer(request: web.Request) -> web.Response:
        return web.Response(body=body, content_type="application/json")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", answer)
    server = await aiohttp_server(app)
    url = str(server.make_url("")).rstrip("/")
    done = await keygate(["--admin-url", url, *argv], _environ(None))
    err = done.stderr.decode("utf-8", "replace")
    assert "Traceback" not in err, err
    assert done.returncode in (0, 1), err


# --- 8. an id with '../' reaches another workspace behind a path-prefix reverse proxy ------------

async def test_an_id_with_dot_segments_never_reaches_another_workspace_behind_a_proxy(
        admin, tmp_path):
    """docs/cli.md: `--admin-url` takes "a path prefix ... for a listener behind a reverse
    proxy". The CLI puts ids into the path with seg() = quote(value, safe="") ("an id with '/'
    or '?' in it stays one segment", client.py seg) and refuses only empty ids
    (parsing.identifier). A reverse proxy decodes %2F and removes dot segments before passing
    the request on (nginx does, with `proxy_pass` and a URI), so
    `keygate keys revoke -w acme ../../other/keys/VICTIM --yes` is
    `POST .../workspaces/acme/keys/..%2F..%2Fother%2Fkeys%2FVICTIM/revoke` →
    `POST /admin/v1/workspaces/other/keys/VICTIM/revoke`: a key of *another* workspace is
    revoked, exit 0 (a support script revoking "$ID" from a ticket is a confused deputy).
    Here a real nginx (`location /kg/ { proxy_pass http://ADMIN/; }`) stands in front of a real
    admin API. Expected: an id holding '/' (or being '.'/'..': no keygate id, slug or key id,
    is one) is bad usage, exit 2, and nothing is sent."""
    import shutil

    from conftest import free_port
    from test_nginx_verify import nginx_main, running_nginx

    nginx = shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if Path(p).exists()), None)
    if nginx is None:
        pytest.skip("nginx is not installed")
    await _workspace_with_key(admin)
    direct = _environ(admin)
    assert (await keygate(["workspaces", "create", "other", "--name", "Other"], direct)
            ).returncode == 0
    made = await keygate(["keys", "create", "-w", "other", "--name", "victim", "--role",
                          "reader", "--json"], direct)
    victim = json.loads(made.stdout)["key"]["id"]
    port = free_port()
    conf = nginx_main(tmp_path, f"""server {{
        listen 127.0.0.1:{port};
        location /kg/ {{ proxy_pass {admin}/; }}
    }}""", worker_connections=64)
    async with running_nginx(conf, port, nginx):
        via = _environ(f"http://127.0.0.1:{port}/kg")
        listed = await keygate(["workspaces", "list"], via)  # the proxy works
        assert listed.returncode == 0, listed.stderr
        done = await keygate(["keys", "revoke", "-w", "acme", f"../../other/keys/{victim}",
                              "--yes"], via)
        shown = await keygate(["keys", "show", "-w", "other", victim, "--json"], direct)
        assert json.loads(shown.stdout)["status"] == "active", done.stdout
        assert done.returncode == 2, done.stderr


@pytest.mark.parametrize("where, bad", [("key", ".."), ("key", "a\\b"), ("workspace", "."),
                                        ("workspace", "../other"), ("role", "a/b"),
                                        ("plan", "..\\free")])
async def test_an_id_that_is_a_path_is_bad_usage_and_nothing_is_sent(admin, where, bad):
    """No workspace id (a slug), key id (base62), role (a slug) or plan name (a letter or
    digit first) holds '/' or '\\\\' or is '.' or '..' (SPEC), so such an id is bad usage
    wherever it goes into a path: exit 2, before anything is sent (sent, the API would answer
    404, exit 1)."""
    await _workspace_with_key(admin)
    argv = {"key": ["keys", "show", "-w", "acme", bad],
            "workspace": ["keys", "list", "-w", bad],
            "role": ["roles", "delete", "-w", "acme", bad],
            "plan": ["workspaces", "set-plan", "acme", bad]}[where]
    done = await keygate(argv, _environ(admin))
    err = done.stderr.decode("utf-8", "replace")
    assert done.returncode == 2, err
    assert "is not an id or name" in err and "Traceback" not in err, err
    shown = await keygate(["workspaces", "show", "acme", "--json"], _environ(admin))
    assert json.loads(shown.stdout)["plan"] == "free"


async def test_revoke_names_the_workspace_the_answer_names(aiohttp_server):
    """What was revoked is what the API answered: the key's own workspace, not the argument
    (which, before ids that are paths were refused, a proxy could turn into another)."""
    from aiohttp import web

    async def answer(request: web.Request) -> web.Response:
        return web.json_response({"id": "K1", "workspace": "other", "status": "revoked"})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", answer)
    server = await aiohttp_server(app)
    url = str(server.make_url("")).rstrip("/")
    done = await keygate(["--admin-url", url, "keys", "revoke", "-w", "acme", "K1", "--yes"],
                         _environ(None))
    assert done.returncode == 0, done.stderr
    assert done.stdout.decode() == "revoked key K1 of workspace other\n"
# --- 9. the revoke prompt writes an id's terminal controls raw -----------------------------------

@pytest.mark.parametrize("answer", [b"n\n", b""])
async def test_the_revoke_prompt_never_writes_terminal_controls(admin, answer):
    """Everything the CLI shows from the API goes through printable() (client.py), so no
    terminal escape sequence gets through; but the revoke confirmation, its "aborted" line and
    the "no answer" usage error print the ID and workspace as given (keys.py cmd_keys_revoke,
    _confirm; the same in cmd_keys_rotate's "the old key ... is revoked"), unescaped. An id
    taken from untrusted text (a ticket, a web form: `keygate keys revoke -w "$WS" "$ID"`)
    holding `ESC ] 0 ; ... BEL` retitles the operator's terminal, `ESC ] 52` writes its
    clipboard, `ESC [ 2 J` wipes what it showed. Expected: shown escaped (\\x1b), as the API's
    own answers are."""
    await _workspace_with_key(admin)
    hostile = "\x1b]0;PWNED\x07\x1b[2J"

    def run() -> subprocess.CompletedProcess:
        return subprocess.run([KEYGATE, "keys", "revoke", "-w", "acme", hostile],
                              env=_environ(admin), input=answer, capture_output=True,
                              timeout=60)
    done = await asyncio.to_thread(run)
    assert done.returncode == 2
    assert b"\x1b" not in done.stderr and b"\x07" not in done.stderr, done.stderr



async def test_rotates_old_key_line_never_writes_terminal_controls(aiohttp_server):
    """keys rotate's "the old key ID is revoked" line printed the ID as given."""
    from aiohttp import web

    hostile = "\x1b]0;PWNED\x07\x1b[2J"

    async def answer(request: web.Request) -> web.Response:
        return web.json_response({"key": {"id": "NEW", "name": "n", "workspace": "acme"},
                                  "token": "kg_live_" + "a" * 50}, status=201)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", answer)
    server = await aiohttp_server(app)
    url = str(server.make_url("")).rstrip("/")
    done = await keygate(["--admin-url", url, "keys", "rotate", "-w", "acme", hostile],
                         _environ(None))
    assert done.returncode == 0, done.stderr
    assert b"the old key \\x1b]0;PWNED\\x07\\x1b[2J is revoked" in done.stderr, done.stderr
    assert b"\x1b" not in done.stderr and b"\x07" not in done.stderr, done.stderr

# --- 10. with stderr closed, every stderr line goes to stdout -------------------------------------

@pytest.mark.parametrize("json_flag", [[], ["--json"]])
async def test_with_stderr_closed_stdout_stays_the_token_or_the_json(admin, json_flag):
    """docs/cli.md, keys create: "Prints the token on stdout, once; a line saying it cannot be
    shown again goes to stderr ... With --json, stdout is {"key": {...}, "token": "..."}", so
    `TOKEN=$(keygate keys create ...)` captures just the token. With stderr closed (`2>&-`, a
    daemon or CI runner that closed it: the CLI handles a closed stdout and stdin already),
    Python's sys.stderr is None and every `print(..., file=sys.stderr)` writes to *stdout*
    (print's file=None is sys.stdout): stdout becomes "keygate: created key ...", the token,
    and the warning, three lines a script stores as the token; with --json, the JSON is
    followed by the warning and is no longer JSON. Expected: stderr's lines dropped (or
    nowhere), stdout the token alone / the body alone."""
    await _workspace_with_key(admin)

    def run() -> subprocess.CompletedProcess:
        return subprocess.run([KEYGATE, "keys", "create", "-w", "acme", "--name", "s",
                               "--role", "reader", *json_flag],
                              env=_environ(admin), stdin=subprocess.DEVNULL,
                              stdout=subprocess.PIPE, preexec_fn=lambda: os.close(2),
                              timeout=60)
    done = await asyncio.to_thread(run)
    assert done.returncode == 0
    out = done.stdout.decode()
    if json_flag:
        json.loads(out)  # the API's body alone
    else:
        assert out.startswith("kg_") and len(out.splitlines()) == 1, out


# --- argparse's usage errors echo values as given ----------------------------------------------

HOSTILE = "\x1b]0;PWNED\x07\x1b[2J"


@pytest.mark.parametrize("argv, env, shown", [
    (["keys", "rotate", "-w", "acme", "K", "--grace", HOSTILE], {},
     "'\\x1b]0;PWNED\\x07\\x1b[2J' is not a duration"),
    (["workspaces", "list", HOSTILE], {}, "unrecognized arguments: \\x1b]0;PWNED\\x07\\x1b[2J"),
    (["keys", "create", "-w", "acme", "--name", "n", "--role", "r", "--expires", HOSTILE], {},
     "'\\x1b]0;PWNED\\x07\\x1b[2J' is neither a duration"),
    (["workspaces", "list"], {"KEYGATE_ADMIN_URL": HOSTILE},
     "KEYGATE_ADMIN_URL: '\\x1b]0;PWNED\\x07\\x1b[2J' is not an http(s) URL"),
], ids=["parse_duration", "unrecognized", "parse_expiry", "admin-url-env"])
def test_a_usage_error_never_writes_terminal_controls(argv, env, shown):
    """argparse's errors echo the value refused ("'{text}' is not a duration",
    "unrecognized arguments: ...") and main() the admin URL, as given: a value from untrusted
    text retitled or wiped the terminal. Shown escaped, as every other line."""
    done = _run(argv, _environ(None, **env))
    err = done.stderr.decode("utf-8", "replace")
    assert done.returncode == 2, err
    assert "\x1b" not in err and "\x07" not in err, err
    assert shown in err, err


# --- a config path holding terminal controls ---------------------------------------------------

HOSTILE_NAME = "evil\x1b]0;PWNED\x07\x1b[2J\nfake.yaml:1: ok"
SHOWN_NAME = "evil\\x1b]0;PWNED\\x07\\x1b[2J\\nfake.yaml:1: ok"


@pytest.mark.parametrize("what", ["missing", "directory", "not-utf8"])
@pytest.mark.parametrize("command", ["config-check", "serve"])
def test_a_config_path_holding_terminal_controls_is_shown_escaped(tmp_path, what, command):
    """docs/cli.md: control characters are shown escaped wherever the CLI writes them to a
    terminal, the names given to it included, and `keygate --config PATH workspaces list`
    escaped such a PATH, as `config check` did for a problem *in* such a file. But a file
    `config check` or `serve` could not read (missing, a directory, not UTF-8) was reported
    with the path's raw bytes: the escape sequence retitled and wiped the terminal, and the
    newline forged a line of its own ("fake.yaml:1: ok: No such file ...") into the problem
    list or the log. Every config path keygate prints is escaped now."""
    path = tmp_path / HOSTILE_NAME
    if what == "directory":
        path.mkdir()
    elif what == "not-utf8":
        path.write_bytes(b"\xff\xfe routes: []\n")
    argv = ["config", "check", HOSTILE_NAME] if command == "config-check" else \
        ["serve", "--config", HOSTILE_NAME]
    done = _run(argv, _environ(None), cwd=str(tmp_path))
    err = done.stderr.decode("utf-8", "replace")
    assert (done.returncode, done.stdout) == (1, b""), err
    assert "cannot read" in err and SHOWN_NAME in err, err
    assert "\x1b" not in err and "\x07" not in err, repr(err)
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, repr(err)  # the newline in the name is not a line of its own


def test_config_check_says_ok_with_such_a_path_escaped(tmp_path):
    """The `ok: PATH` of a valid file is the path as printed, escaped too."""
    (tmp_path / HOSTILE_NAME).write_text(
        "store: {redis_url: 'redis://127.0.0.1:1/0', timeout: 0.5}\n"
        "upstreams: {api: 'http://127.0.0.1:9/'}\n"
        "routes: [{path: /x, upstream: api, public: true}]\n")
    done = _run(["config", "check", HOSTILE_NAME], _environ(None), cwd=str(tmp_path))
    assert done.returncode == 0, done.stderr
    assert done.stdout.decode() == f"ok: {SHOWN_NAME}\n"


def test_remote_config_escapes_the_same_path(tmp_path):
    """The remote commands' --config reader escaped it already: it still does."""
    done = _run(["--config", HOSTILE_NAME, "workspaces", "list"], _environ(None),
                cwd=str(tmp_path))
    err = done.stderr.decode("utf-8", "replace")
    assert done.returncode == 1, err
    assert "\x1b" not in err and "evil\\x1b]0;PWNED\\x07" in err, repr(err)
