"""``keygate demo``: the whole product in one command, no config file.

Starts the embedded store under ``./.keygate-demo``, a small CRM-like upstream in-process, the
gateway in front of it, creates a workspace on the starter plan and two keys (read-only and
read-write) through the admin API, and prints the tokens, curl lines to try and the export
line that points the CLI at this demo's admin API. Ctrl-C stops everything.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import secrets
import shlex
import shutil
import signal
import socket
import sys

from aiohttp import ClientSession, web

from .config import (AdminConfig, Config, Plan, RateLimit, Route, ServerConfig, StoreConfig,
                     Upstream)

DEMO_DIR = ".keygate-demo"
RUNS_LOCK = "demo.lock"             # in DEMO_DIR: held shared by every running demo
PROVISION_LOCK = "demo-keys.lock"   # in DEMO_DIR: one run at a time makes its keys
WORKSPACE = "demo"

PEOPLE = {1: {"id": 1, "name": "Ada Lovelace", "email": "ada@example.com", "company_id": 1},
          2: {"id": 2, "name": "Grace Hopper", "email": "grace@example.com", "company_id": 2}}
COMPANIES = {1: {"id": 1, "name": "Analytical Engines Ltd"},
             2: {"id": 2, "name": "Compiler Works Inc"}}


def sample_upstream() -> web.Application:
    """A tiny CRM: it trusts the identity headers keygate injects, as a real upstream would."""

    def who(request: web.Request) -> dict:
        return {"workspace": request.headers.get("X-Workspace-Id"),
                "key_id": request.headers.get("X-Api-Key-Id"),
                "scopes": request.headers.get("X-Api-Scopes", "").split()}

    async def list_people(request: web.Request) -> web.Response:
        return web.json_response({"items": list(PEOPLE.values()), "caller": who(request)})

    async def get_person(request: web.Request) -> web.Response:
        person = PEOPLE.get(int(request.match_info["id"])) if request.match_info["id"].isdigit() else None
        if person is None:
            return web.json_response({"error": "no such person"}, status=404)
        return web.json_response({**person, "caller": who(request)})

    async def create_person(request: web.Request) -> web.Response:
        try:
            body = await request.json()
        except ValueError:
            body = {}
        if not isinstance(body, dict):
            return web.json_response({"error": "the body must be a JSON object, e.g. "
                                               '{"name": "Grace"}'}, status=400)
        person = {"id": max(PEOPLE) + 1, "name": str(body.get("name", "Unnamed"))}
        PEOPLE[person["id"]] = person
        return web.json_response({**person, "caller": who(request)}, status=201)

    async def list_companies(request: web.Request) -> web.Response:
        return web.json_response({"items": list(COMPANIES.values()), "caller": who(request)})

    async def health(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    app = web.Application()
    app.router.add_get("/people", list_people)
    app.router.add_post("/people", create_person)
    app.router.add_get("/people/{id}", get_person)
    app.router.add_get("/companies", list_companies)
    app.router.add_get("/health", health)
    return app


def _port_or_free(host: str, preferred: int) -> int:
    """``preferred`` (the port the docs name) when it is free, else any free port: a second
    demo or another server on 8080 must not stop this one."""
    with socket.socket() as s:
        # As the listeners bind (asyncio's SO_REUSEADDR): a port whose connections are in
        # TIME_WAIT after the last demo stopped is free, not taken.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, preferred))
            return preferred
        except OSError:
            s.bind((host, 0))
            return s.getsockname()[1]


def demo_config(upstream_port: int, proxy_port: int, admin_port: int, data_dir: str) -> Config:
    read = ("people:read", "companies:read", "interactions:read")
    write = ("people:write", "companies:write", "interactions:write")
    return Config(
        server=ServerConfig(host="127.0.0.1", port=proxy_port, access_log="text"),
        admin=AdminConfig(host="127.0.0.1", port=admin_port),
        store=StoreConfig(redis_url="embedded", data_dir=data_dir),
        plans={"starter": Plan("starter", 1000, 5, RateLimit(10, 1)),
               "pro": Plan("pro", 10000, 20, RateLimit(20, 1))},
        default_plan="starter",
        roles={"reader": read, "editor": read + write, "admin": ("ALL", "keys:admin")},
        upstreams={"crm": Upstream("crm", f"http://127.0.0.1:{upstream_port}", 10.0)},
        routes=(
            Route("/health", "crm", ("GET",), (), True),
            Route("/people", "crm", ("GET",), ("people:read",)),
            Route("/people/*", "crm", ("GET",), ("people:read",)),
            Route("/people", "crm", ("POST",), ("people:write",)),
            Route("/companies/**", "crm", ("GET",), ("companies:read",)),
            Route("/companies", "crm", ("GET",), ("companies:read",)),
        ),
        source="<demo>")


async def _admin(session: ClientSession, method: str, path: str, body: dict | None = None):
    async with session.request(method, path, json=body) as r:
        return r.status, await r.json()


def _error(body: object) -> str:
    """The admin API's error message out of its JSON body (the body itself if it has none)."""
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        return str(body["error"].get("message") or body["error"])
    return str(body)


async def _provision(admin_url: str, token: str, revoke_earlier: bool) -> dict[str, str]:
    """The demo workspace and two fresh keys; ``revoke_earlier``: the active demo keys, those
    of earlier runs, are revoked first (never while another run is using its own)."""
    headers = {"Authorization": f"Bearer {token}"}
    async with ClientSession(admin_url, headers=headers) as s:
        status, body = await _admin(s, "POST", "/admin/v1/workspaces",
                                    {"id": WORKSPACE, "name": "Demo Inc", "plan": "starter"})
        if status not in (201, 409):
            raise RuntimeError(f"could not create the demo workspace: {_error(body)}")
        if revoke_earlier:
            _, listing = await _admin(s, "GET",
                                      f"/admin/v1/workspaces/{WORKSPACE}/keys?status=active")
            for key in listing.get("items", []):
                await _admin(s, "POST",
                             f"/admin/v1/workspaces/{WORKSPACE}/keys/{key['id']}/revoke")
        tokens = {}
        for name, role in (("read-only", "reader"), ("read-write", "editor")):
            status, body = await _admin(s, "POST", f"/admin/v1/workspaces/{WORKSPACE}/keys",
                                        {"name": name, "role": role})
            if status != 201:
                raise RuntimeError(f"could not create the demo key {name}: {_error(body)}")
            tokens[name] = body["token"]
        return tokens


def _lock(path: str, how: int) -> int:
    """``path`` opened and flock'ed ``how``; closing the descriptor releases it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0),
                 0o600)
    try:
        fcntl.flock(fd, how)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _join_runs(data_dir: str) -> tuple[int, int, bool]:
    """Count this run among the demos using ``data_dir``: (the provisioning lock, to release
    once its keys are made; the run lock, held until it stops; whether it is the only run).

    Each run holds RUNS_LOCK shared for its whole life; a run that can take it exclusive
    finds no other, so the active demo keys are earlier runs' and may be revoked. Runs
    provision one at a time (PROVISION_LOCK), so none starts between that check and the
    shared lock that counts it, nor makes keys while another revokes."""
    provisioning = _lock(os.path.join(data_dir, PROVISION_LOCK), fcntl.LOCK_EX)
    try:
        runs = os.path.join(data_dir, RUNS_LOCK)
        try:
            os.close(_lock(runs, fcntl.LOCK_EX | fcntl.LOCK_NB))
            alone = True
        except BlockingIOError:
            alone = False
        return provisioning, _lock(runs, fcntl.LOCK_SH), alone
    except BaseException:
        os.close(provisioning)
        raise


def _cli() -> str:
    """How to run this keygate from another terminal: ``keygate`` when that name on PATH is
    this installation's command, else its full path. The README runs ``.venv/bin/keygate
    demo`` without activating the venv, where a bare ``keygate`` is "command not found"."""
    script = os.path.join(os.path.dirname(os.path.abspath(sys.executable)), "keygate")
    on_path = shutil.which("keygate")
    if on_path and os.path.exists(script):
        with contextlib.suppress(OSError):
            if os.path.samefile(on_path, script):
                return "keygate"
    if os.path.exists(script):
        return shlex.quote(script)
    return f"{shlex.quote(sys.executable)} -m gateway"


def _banner(proxy: str, admin: str, admin_token: str, tokens: dict[str, str],
            generated_admin_token: bool) -> str:
    ro, rw = tokens["read-only"], tokens["read-write"]
    cli = _cli()
    lines = [
        "",
        "keygate demo is running (Ctrl-C to stop)",
        f"  proxy  {proxy}   ->  sample CRM upstream",
        f"  admin  {admin}",
        "",
        "Two keys for workspace 'demo' (starter plan: 1000 requests/month, 10/s).",
        "They are shown once; keygate stores only their argon2id hashes.",
        f"  read-only   RO={ro}",
        f"  read-write  RW={rw}",
        "",
        "Paste this first:",
        f"  export RO={ro} RW={rw}",
        "",
        "Then try:",
        f"  curl -s -H \"Authorization: Bearer $RO\" {proxy}/people/1          # 200, identity injected",
        f"  curl -s -X POST -H \"Authorization: Bearer $RO\" -d '{{\"name\":\"Alan\"}}' {proxy}/people   # 403 insufficient_scope",
        f"  curl -s -X POST -H \"Authorization: Bearer $RW\" -d '{{\"name\":\"Alan\"}}' {proxy}/people   # 201",
        f"  curl -s {proxy}/people/1                                          # 401 missing_key",
        f"  curl -s -H \"Authorization: Bearer $RO\" {proxy}/_keygate/v1/usage   # month-to-date usage",
        f"  curl -s -H \"Authorization: Bearer $KEYGATE_ADMIN_TOKEN\" {admin}/admin/v1/workspaces/demo/keys",
        f"  {cli} keys list --workspace demo      # the CLI talks to this demo's admin API",
        f"  {cli} usage --workspace demo",
        "",
        "The admin token is " + ("generated for this run (set KEYGATE_ADMIN_TOKEN to choose "
                                 "it); paste this for the admin lines and the CLI:"
                                 if generated_admin_token else
                                 "your KEYGATE_ADMIN_TOKEN; paste this for the admin lines "
                                 "and the CLI:"),
        # quoted for the shell: a token of one's own may hold blanks, `$`, `;`, quotes
        f"  export KEYGATE_ADMIN_URL={admin} KEYGATE_ADMIN_TOKEN={shlex.quote(admin_token)}",
    ]
    return "\n".join(lines)


async def _run(data_dir: str) -> int:
    from .app import ListenError, running_gateway, start_listeners, stop_listeners
    from .store.embedded import (MAX_SOCKET_PATH, SOCKET_NAME, EmbeddedError, EmbeddedRedis,
                                 data_dir_trust_problem)

    # The store's unix socket lives in ./.keygate-demo and a socket path has a length limit.
    # The embedded store's own message names store.data_dir, which the demo has none of.
    length = len(os.fsencode(os.path.join(data_dir, SOCKET_NAME)))
    if length > MAX_SOCKET_PATH:
        print(f"keygate: the demo keeps its store's socket in {os.path.join(data_dir, SOCKET_NAME)}"
              f", {length} bytes, longer than a unix socket path may be ({MAX_SOCKET_PATH}): "
              f"run keygate demo from a directory with a shorter path than "
              f"{os.path.dirname(data_dir)}", file=sys.stderr)
        return 1

    # Nor does the store's own message for a folder it cannot make or write to fit the demo
    # (run from a read-only or someone else's directory, or with a file of that name there).
    try:
        os.makedirs(data_dir, mode=0o700, exist_ok=True)
        # one another user made first in a shared directory (/tmp): theirs to read and plant
        # a store of their own in, never the demo's keys' home
        if untrusted := data_dir_trust_problem(data_dir):
            print(f"keygate: the demo keeps its store in {data_dir}, which {untrusted}; or "
                  "run keygate demo from another directory", file=sys.stderr)
            return 1
        problem = None if os.access(data_dir, os.W_OK | os.X_OK) else "not writable"
    except OSError as exc:
        problem = exc.strerror or str(exc)
    if problem is not None:
        print(f"keygate: the demo keeps its store in {data_dir}, which cannot be made or "
              f"written to ({problem}): run keygate demo from another directory, one you "
              "can write to", file=sys.stderr)
        return 1

    # The admin API reads its operator token from the variable admin.token_env names
    # (KEYGATE_ADMIN_TOKEN): setting it here is how a generated token reaches it.
    generated = not os.environ.get("KEYGATE_ADMIN_TOKEN")
    if generated:
        os.environ["KEYGATE_ADMIN_TOKEN"] = secrets.token_urlsafe(24)
    admin_token = os.environ["KEYGATE_ADMIN_TOKEN"]

    upstream_runner = web.AppRunner(sample_upstream(), access_log=None)
    await upstream_runner.setup()
    upstream_site = web.TCPSite(upstream_runner, "127.0.0.1", 0)
    await upstream_site.start()
    upstream_port = upstream_runner.addresses[0][1]
    config = demo_config(upstream_port, _port_or_free("127.0.0.1", 8080),
                         _port_or_free("127.0.0.1", 8081), data_dir)
    embedded = EmbeddedRedis(data_dir)
    try:
        store_url = await asyncio.to_thread(embedded.start)
    except EmbeddedError as exc:
        print(f"keygate: {exc}", file=sys.stderr)
        await upstream_runner.cleanup()
        return 1
    embedded.watch()  # restarts the store if it dies while the demo runs
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    run_locks: list[int] = []  # this run's place among the demos on data_dir (_join_runs)
    try:
        async with running_gateway(config, store_url) as gw:
            await gw.learn_key_prefixes()  # (the demo's own store: answers at once)
            try:
                runners = await start_listeners(gw)
            except ListenError as exc:
                print(f"keygate: {exc}", file=sys.stderr)
                return 1
            try:
                proxy = f"http://127.0.0.1:{config.server.port}"
                admin = f"http://127.0.0.1:{config.admin.port}"
                try:
                    provisioning, run_lock, alone = await asyncio.to_thread(_join_runs,
                                                                            data_dir)
                except OSError as exc:  # a lock file there of another user's
                    print(f"keygate: cannot use {exc.filename or data_dir}: "
                          f"{exc.strerror or exc}", file=sys.stderr)
                    return 1
                run_locks.append(run_lock)
                try:
                    tokens = await _provision(admin, admin_token, revoke_earlier=alone)
                except RuntimeError as exc:  # the key limit, with other demos running
                    print(f"keygate: {exc}", file=sys.stderr)
                    return 1
                finally:
                    os.close(provisioning)
                print(_banner(proxy, admin, admin_token, tokens, generated), flush=True)
                await stop.wait()
                print("\nstopping keygate demo", file=sys.stderr)
            finally:
                await stop_listeners(runners)
    finally:
        for fd in run_locks:
            os.close(fd)
        await upstream_runner.cleanup()
        await asyncio.to_thread(embedded.stop)
    return 0


def run_demo(data_dir: str = DEMO_DIR) -> int:
    import logging
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from .workers import run_event_loop
    return run_event_loop(_run(os.path.abspath(data_dir)))


if __name__ == "__main__":
    sys.exit(run_demo())
