"""HTTPS on keygate's own listeners: ``server.tls`` / ``admin.tls``, checked at load, swapped
on reload. Certificates come from a throwaway CA made with the openssl CLI (skipped without)."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import ssl
import time
import warnings
from pathlib import Path

import aiohttp
import pytest

from conftest import free_port
from gateway.app import running_gateway, start_listeners, stop_listeners
from gateway.config import load_config
from harness import ADMIN_TOKEN, eventually, keygate_at_a_terminal, openssl

EC = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")


def issue(d: Path, ca: Path, ca_key: Path, name: str, cn: str = "localhost") -> tuple[Path, Path]:
    """A server certificate for localhost / 127.0.0.1 signed by the CA: (cert, key)."""
    openssl("req", "-new", *EC, "-subj", f"/CN={cn}",
             "-keyout", str(d / f"{name}.key"), "-out", str(d / f"{name}.csr"))
    (d / "ext.cnf").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n"
                               "extendedKeyUsage=serverAuth\n")
    openssl("x509", "-req", "-in", str(d / f"{name}.csr"), "-CA", str(ca), "-CAkey",
             str(ca_key), "-CAcreateserial", "-days", "1", "-extfile", str(d / "ext.cnf"),
             "-out", str(d / f"{name}.pem"))
    return d / f"{name}.pem", d / f"{name}.key"


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, Path]:
    if shutil.which("openssl") is None:
        pytest.skip("openssl CLI not available")
    d = tmp_path_factory.mktemp("listener-pki")
    openssl("req", "-x509", *EC, "-days", "2", "-subj", "/CN=keygate listener test CA",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign",
             "-keyout", str(d / "ca.key"), "-out", str(d / "ca.pem"))
    first = issue(d, d / "ca.pem", d / "ca.key", "first", "first.localhost")
    second = issue(d, d / "ca.pem", d / "ca.key", "second", "second.localhost")
    return {"dir": d, "ca": d / "ca.pem", "ca_key": d / "ca.key", "cert": first[0],
            "key": first[1], "cert2": second[0], "key2": second[1]}


def problems(path: Path) -> list[str]:
    from gateway.errors import ConfigError
    with pytest.raises(ConfigError) as info:
        load_config(path)
    return [p.replace(str(path.parent) + "/", "") for p in info.value.problems]


def test_tls_problems_name_file_line_and_field(tmp_path, pki):
    path = tmp_path / "config.yaml"
    path.write_text(f"server:\n  tls:\n    cert_file: {tmp_path}/nope.pem\n"
                    f"    key_file: {pki['key']}\n"
                    f"admin:\n  tls:\n    cert_file: {pki['cert']}\n")
    assert problems(path) == [
        "config.yaml:3: server.tls.cert_file: cannot read 'nope.pem': "
        "No such file or directory",
        "config.yaml:7: admin.tls.key_file: required (a PEM file)"]


def test_a_key_that_does_not_match_the_certificate_is_a_problem(tmp_path, pki):
    path = tmp_path / "config.yaml"
    path.write_text(f"server:\n  tls: {{cert_file: {pki['cert']}, key_file: {pki['key2']}}}\n")
    [problem] = problems(path)
    assert problem.startswith("config.yaml:2: server.tls.key_file: ")
    assert "does not match the certificate" in problem


@pytest.mark.parametrize("what", ["directory", "not_pem", "swapped"])
def test_unreadable_or_garbage_files_are_problems_not_tracebacks(tmp_path, pki, what):
    cert, key = pki["cert"], pki["key"]
    if what == "directory":
        cert = tmp_path
    elif what == "not_pem":
        cert = tmp_path / "garbage.pem"
        cert.write_text("-----BEGIN CERTIFICATE-----\nnot base64\n")
    else:
        cert, key = key, cert
    path = tmp_path / "config.yaml"
    path.write_text(f"admin:\n  tls:\n    cert_file: {cert}\n    key_file: {key}\n")
    [problem] = problems(path)
    assert problem.startswith(("config.yaml:2: admin.tls", "config.yaml:3: admin.tls",
                               "config.yaml:4: admin.tls")), problem
    assert "Traceback" not in problem


@pytest.mark.parametrize("kind", ["fifo", "device"])
def test_a_file_that_is_not_a_regular_file_is_a_problem_not_a_hang(tmp_path, pki, kind):
    """A FIFO (or a device, /dev/zero) named as a TLS file: opening a FIFO waits for a writer
    and OpenSSL reads /dev/zero for ever, so `config check`, serve and every reload hung.
    Each is a problem naming its field, at once. The store URL's ssl_* files included."""
    import subprocess
    import sys
    if kind == "fifo":
        special = tmp_path / "cert.pipe"
        os.mkfifo(special)
    else:
        special = Path("/dev/zero")
    path = tmp_path / "config.yaml"
    path.write_text(f"server:\n  tls: {{cert_file: {special}, key_file: {pki['key']}}}\n"
                    f"admin:\n  tls: {{cert_file: {pki['cert']}, key_file: {special}}}\n"
                    f"store:\n  redis_url: 'rediss://127.0.0.1:6379/0?ssl_ca_certs={special}'\n"
                    f"upstreams: {{api: {{url: 'https://127.0.0.1:9', ca_file: {special}}}}}\n"
                    "routes: [{path: /x, upstream: api}]\n")
    try:
        done = subprocess.run([sys.executable, "-m", "gateway", "config", "check", str(path)],
                              capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"config check hung on a {kind} named as a TLS file") from None
    assert done.returncode == 1, done
    lines = done.stdout.splitlines() + done.stderr.splitlines()
    for field in ("server.tls.cert_file", "admin.tls.key_file", "store.redis_url",
                  "upstreams.api.ca_file"):
        assert any(f": {field}: " in line for line in lines), (field, lines)
    assert "not a regular file" in done.stdout + done.stderr or kind == "device", lines
    assert "Traceback" not in done.stderr


def encrypted_key(tmp_path: Path, pki) -> Path:
    """The first certificate's key, encrypted with a pass phrase."""
    key = tmp_path / "encrypted.key"
    openssl("pkey", "-in", str(pki["key"]), "-aes256", "-passout", "pass:renewal",
            "-out", str(key))
    return key


def test_an_encrypted_key_is_a_problem_not_a_pass_phrase_prompt(tmp_path, pki):
    """A key encrypted with a pass phrase: OpenSSL's own prompt asked for it on the terminal,
    so ``keygate config check`` (and serve, and every reload: in the event loop) waited there
    for ever; without a terminal the problem read 'cannot load the certificate: [Errno 22]
    Invalid argument', naming neither the key nor what is wrong with it."""
    path = tmp_path / "config.yaml"
    path.write_text(f"server:\n  tls:\n    cert_file: {pki['cert']}\n"
                    f"    key_file: {encrypted_key(tmp_path, pki)}\n"
                    "upstreams: {api: {url: 'http://127.0.0.1:9'}}\n"
                    "routes: [{path: /x, upstream: api}]\n")
    [problem] = problems(path)
    assert problem.startswith("config.yaml:4: server.tls.key_file: "), problem
    assert "encrypted" in problem
    # at a terminal (a pseudo-terminal this check is the session of): answered, not prompted
    code, shown = keygate_at_a_terminal("config", "check", str(path))
    assert code == 1, f"keygate config check waited at a pass phrase prompt: {shown!r}"
    assert b"Enter PEM pass phrase" not in shown and b"server.tls.key_file" in shown, shown


def client_context(pki) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(pki["ca"]))


def served_certificate_cn(port: int, pki) -> str:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with client_context(pki).wrap_socket(raw, server_hostname="localhost") as tls:
            subject = dict(x[0] for x in tls.getpeercert()["subject"])
            return subject["commonName"]


def write_config(path: Path, upstream: str, proxy_port: int, admin_port: int,
                 cert: Path, key: Path, extra: str = "") -> None:
    path.write_text(f"""
server: {{host: 127.0.0.1, port: {proxy_port}, tls: {{cert_file: {cert}, key_file: {key}}}}}
admin: {{host: 127.0.0.1, port: {admin_port}, tls: {{cert_file: {cert}, key_file: {key}}}}}
keys: {{argon2: {{time_cost: 1, memory_cost: 8, parallelism: 1}}}}
upstreams: {{api: {{url: "{upstream}"}}}}
routes:
  - {{path: /people/**, upstream: api, scopes: [people:read]}}
{extra}""")


def https_config_with_a_1s_header_timeout(tmp_path: Path, upstream,
                                          pki) -> tuple[Path, tuple[int, int]]:
    """A config file for HTTPS listeners on free ports (proxy, admin) with
    server.timeouts.header 1 s; the file and the ports."""
    path = tmp_path / "config.yaml"
    ports = free_port(), free_port()
    write_config(path, str(upstream.make_url("")), *ports, pki["cert"], pki["key"])
    text = path.read_text().replace("tls: {cert_file", "timeouts: {header: 1}, tls: {cert_file", 1)
    path.write_text(text)
    return path, ports


@pytest.fixture
async def https_gateway(tmp_path, pki, upstream, redis_url, monkeypatch):
    monkeypatch.setenv("KEYGATE_ADMIN_TOKEN", ADMIN_TOKEN)
    cert, key = tmp_path / "tls.pem", tmp_path / "tls.key"
    shutil.copy(pki["cert"], cert)
    shutil.copy(pki["key"], key)
    path = tmp_path / "config.yaml"
    ports = free_port(), free_port()
    write_config(path, str(upstream.make_url("")), *ports, cert, key)
    async with running_gateway(load_config(path), redis_url, config_path=str(path)) as gw:
        runners = await start_listeners(gw)
        try:
            yield gw, ports, cert, key
        finally:
            await stop_listeners(runners)


async def test_https_listeners_forward_with_x_forwarded_proto_https(https_gateway, pki,
                                                                    upstream):
    gw, (proxy_port, admin_port), _, _ = https_gateway
    ctx = client_context(pki)
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as s:
        admin = f"https://localhost:{admin_port}/admin/v1"
        async with s.post(f"{admin}/workspaces", json={"id": "acme", "name": "Acme"},
                          ssl=ctx) as r:
            assert r.status == 201
        async with s.post(f"{admin}/workspaces/acme/keys",
                          json={"name": "k", "scopes": ["people:read"]}, ssl=ctx) as r:
            token = (await r.json())["token"]
    async with aiohttp.ClientSession() as s:
        async with s.get(f"https://localhost:{proxy_port}/people/1",
                         headers={"X-Api-Key": token, "X-Forwarded-Proto": "http"},
                         ssl=ctx) as r:
            assert r.status == 200
            headers = dict((k.lower(), v) for k, v in (await r.json())["headers"])
    assert headers["x-forwarded-proto"] == "https"


async def test_plain_http_and_old_tls_are_refused_on_an_https_listener(https_gateway, pki):
    _, (proxy_port, _), _, _ = https_gateway
    async with aiohttp.ClientSession() as s:
        with pytest.raises(aiohttp.ClientError):
            async with s.get(f"http://127.0.0.1:{proxy_port}/people/1") as r:
                await r.read()
    for version in ("TLSv1", "TLSv1_1"):
        old = client_context(pki)
        with warnings.catch_warnings():  # TLS 1.0 and 1.1 are deprecated: that is the point
            warnings.simplefilter("ignore", DeprecationWarning)
            old.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
            old.maximum_version = getattr(ssl.TLSVersion, version)
        # the client's own OpenSSL refuses to offer them at its default security level (it
        # failed before sending a ClientHello, whatever the listener took): the server must
        # be the one that says no
        old.set_ciphers("DEFAULT:@SECLEVEL=0")

        def handshake() -> None:  # off the event loop: the listener runs on it
            with socket.create_connection(("127.0.0.1", proxy_port), timeout=5) as raw:
                old.wrap_socket(raw, server_hostname="localhost").close()
        with pytest.raises((ssl.SSLError, ConnectionError)):  # an alert, or the socket closed
            await asyncio.get_running_loop().run_in_executor(None, handshake)


async def test_reload_swaps_the_certificate_for_new_connections_only(https_gateway, pki):
    gw, (proxy_port, admin_port), cert, key = https_gateway
    loop = asyncio.get_running_loop()
    assert await loop.run_in_executor(None, served_certificate_cn, proxy_port,
                                      pki) == "first.localhost"
    ctx = client_context(pki)
    connections = []
    trace = aiohttp.TraceConfig()
    trace.on_connection_create_end.append(lambda *_: connections.append(1) or asyncio.sleep(0))
    async with aiohttp.ClientSession(trace_configs=[trace]) as s:  # keep-alive across reload
        async with s.get(f"https://localhost:{proxy_port}/nowhere", ssl=ctx) as r:
            assert r.status == 404
        shutil.copy(pki["cert2"], cert)  # a renewal, as certbot or cert-manager does it
        shutil.copy(pki["key2"], key)
        result = await gw.reloader.reload()
        assert result.restart_required == ()
        async with s.get(f"https://localhost:{proxy_port}/nowhere", ssl=ctx) as r:
            assert r.status == 404
    assert len(connections) == 1  # the open connection was neither dropped nor re-made
    for port in (proxy_port, admin_port):
        assert await loop.run_in_executor(None, served_certificate_cn, port,
                                          pki) == "second.localhost"


async def test_a_renewal_that_left_the_old_key_is_refused_and_changes_nothing(https_gateway,
                                                                              pki):
    gw, (proxy_port, _), cert, _ = https_gateway
    shutil.copy(pki["cert2"], cert)  # new certificate, old key: a half-done renewal
    from gateway.errors import ConfigError
    with pytest.raises(ConfigError) as info:
        await gw.reloader.reload()
    assert any("server.tls.key_file" in p and "does not match" in p
               for p in info.value.problems)
    assert await asyncio.get_running_loop().run_in_executor(
        None, served_certificate_cn, proxy_port, pki) == "first.localhost"
    assert gw.metrics.registry.get_sample_value("keygate_config_reloads_total",
                                                {"result": "error"}) == 1


async def test_a_connection_that_never_finishes_its_tls_handshake_is_closed_at_the_header_timeout(
        tmp_path, pki, upstream, redis_url, monkeypatch):
    """SPEC: a connection that has not sent a whole request head within server.timeouts.header
    is closed. On an HTTPS listener the head timeout started only once the handshake was done,
    and the handshake had asyncio's own 60 s: a client that opens TCP and never sends a
    ClientHello (or dribbles it) held its socket six times as long as the SPEC allows, outside
    server.max_connections too (a connection counts once its handshake is done)."""
    monkeypatch.setenv("KEYGATE_ADMIN_TOKEN", ADMIN_TOKEN)
    path, ports = https_config_with_a_1s_header_timeout(tmp_path, upstream, pki)
    async with running_gateway(load_config(path), redis_url, config_path=str(path)) as gw:
        runners = await start_listeners(gw)
        try:
            loop = asyncio.get_running_loop()
            silent = [await asyncio.open_connection("127.0.0.1", port) for port in ports]
            started = loop.time()

            async def closed(reader) -> float:
                try:
                    while await reader.read(1024):
                        pass
                except ConnectionError:
                    pass
                return loop.time() - started

            took = await asyncio.wait_for(
                asyncio.gather(*(closed(r) for r, _ in silent)), 20)
            for _, w in silent:
                w.close()
            assert max(took) < 5.0, f"closed after {took} s; the header timeout is 1 s"
        finally:
            await stop_listeners(runners)


async def creates_and_lists_through(capsys, monkeypatch, path) -> None:
    """``keygate --config PATH`` creates a workspace and lists it (the option before and
    after the command) against the listener the config names."""
    code, out, err = await cli_with_config(capsys, monkeypatch, "--config", str(path),
                                           "workspaces", "create", "acme", "--name", "Acme")
    assert code == 0, err
    code, out, err = await cli_with_config(capsys, monkeypatch, "workspaces", "list",
                                           "--config", str(path), "--json")
    assert code == 0, err
    assert [w["id"] for w in json.loads(out)["items"]] == ["acme"]


async def cli_with_config(capsys, monkeypatch, *argv: str) -> tuple[int, str, str]:
    """``keygate ARGV`` (in a thread: the listeners run on this loop), its admin URL and token
    from nowhere but the ``--config`` file."""
    from gateway.cli import main
    monkeypatch.delenv("KEYGATE_ADMIN_URL", raising=False)
    capsys.readouterr()
    code = await asyncio.to_thread(main, list(argv))
    out, err = capsys.readouterr()
    return code, out, err


async def test_the_cli_with_config_reaches_an_https_admin_listener_on_its_own_certificate(
        https_gateway, capsys, monkeypatch):
    """SPEC: the admin URL and token come from the config's admin section with --config. With
    ``admin.tls`` the CLI made the https URL, then refused the listener's certificate (a
    private CA's, or a self-signed one: the usual for a private listener) against the system
    CAs, so no `keygate --config FILE` command ever worked there. It trusts the certificate
    the config names, the one the listener serves."""
    _, _, cert, _ = https_gateway
    path = cert.parent / "config.yaml"
    await creates_and_lists_through(capsys, monkeypatch, path)


async def test_the_cli_with_config_trusts_only_that_certificate_not_its_ca(
        https_gateway, pki, capsys, monkeypatch):
    """The certificate the config names is the one trusted, not whatever its CA signed: a
    listener serving another certificate (here one the same CA issued for the same names) is
    refused before the operator token is sent, and the message says which file was expected."""
    gw, (_, admin_port), cert, key = https_gateway
    path = cert.parent / "config.yaml"
    other = cert.parent / "other.yaml"
    other.write_text(path.read_text().replace(str(cert), str(pki["cert2"]))
                     .replace(str(key), str(pki["key2"])))
    code, out, err = await cli_with_config(capsys, monkeypatch, "--config", str(other),
                                           "workspaces", "list")
    assert code == 1 and out == ""
    assert "admin.tls.cert_file" in err and str(pki["cert2"]) in err, err
    assert ADMIN_TOKEN not in err
    # a renewal written as a full chain, not yet reloaded: the listener's certificate is
    # vouched for by the chain in the file, under the name the CLI reaches it by
    fullchain = cert.parent / "fullchain.pem"
    fullchain.write_text(pki["cert2"].read_text() + pki["ca"].read_text())
    other.write_text(other.read_text().replace(str(pki["cert2"]), str(fullchain)))
    code, out, err = await cli_with_config(capsys, monkeypatch, "--config", str(other),
                                           "workspaces", "list")
    assert code == 0, err


@pytest.mark.parametrize("key", ["missing", "directory"])
async def test_the_cli_with_config_needs_no_access_to_the_listeners_private_key(
        https_gateway, capsys, monkeypatch, key):
    """An operator's `keygate --config FILE workspaces list` runs as a user who may read the
    config and the certificate but not the listener's private key (the service account's).
    The CLI loaded the whole file, and with it checked admin.tls.key_file (readable, matching
    the certificate): every remote command failed with that key's problem, although the CLI
    needs only the listener's address, its token variable and the certificate it pins. It
    reads the admin section alone now, and of admin.tls only cert_file; serve and config check
    still refuse the same file, naming the key at its line.

    The key is a path that does not exist, or a directory: the suite runs as root, for whom a
    chmod 000 file is still readable, and both fail the same open a permission denial does."""
    import subprocess
    import sys
    _, _, cert, _ = https_gateway
    served = cert.parent / "config.yaml"
    unreadable = cert.parent / "key-of-the-service-account.key"
    if key == "directory":
        unreadable.mkdir()
    path = cert.parent / "operator.yaml"
    path.write_text(served.read_text().replace(str(cert.parent / "tls.key"), str(unreadable)))
    assert str(unreadable) in path.read_text()
    await creates_and_lists_through(capsys, monkeypatch, path)
    # the certificate is still the one pinned: a file naming another is refused as before
    other = cert.parent / "other.yaml"
    other.write_text(path.read_text().replace(str(cert), str(cert.parent.parent / "nope.pem")))
    code, out, err = await cli_with_config(capsys, monkeypatch, "--config", str(other),
                                           "workspaces", "list")
    assert code == 1 and "admin.tls.cert_file" in err, err
    # serve and config check refuse the file the CLI took, naming the key at its line
    line = next(n for n, text in enumerate(path.read_text().splitlines(), 1)
                if text.startswith("admin:"))
    for argv in (["config", "check", str(path)], ["serve", "--config", str(path)]):
        done = await asyncio.to_thread(
            subprocess.run, [sys.executable, "-m", "gateway", *argv], capture_output=True,
            text=True, timeout=30)
        assert done.returncode == 1, (argv, done)
        shown = done.stdout + done.stderr
        problem = f"{path}:{line}: admin.tls.key_file: "
        assert problem in shown and str(unreadable) in shown.split(problem, 1)[1], (argv, shown)


# --- a TLS client that vanishes mid-body ---------------------------------------------------------

@pytest.fixture
async def tls_raw_edge(tmp_path, pki, redis_url, monkeypatch):
    """An HTTPS proxy listener in front of test_edge_framing's raw upstream (every byte it got,
    and the requests llhttp finds in them), with a public POST route."""
    from test_edge_framing import RawUpstream
    up = await RawUpstream().start()
    monkeypatch.setenv("KEYGATE_ADMIN_TOKEN", ADMIN_TOKEN)
    path, port = tmp_path / "config.yaml", free_port()
    path.write_text(f"""
server: {{host: 127.0.0.1, port: {port}, tls: {{cert_file: {pki['cert']}, key_file: {pki['key']}}}}}
admin: {{host: 127.0.0.1, port: {free_port()}}}
upstreams: {{api: {{url: "http://127.0.0.1:{up.port}"}}}}
routes:
  - {{path: /public/**, upstream: api, public: true, methods: [POST]}}
""")
    try:
        async with running_gateway(load_config(path), redis_url, config_path=str(path)) as gw:
            runners = await start_listeners(gw)
            try:
                yield port, up
            finally:
                await stop_listeners(runners)
    finally:
        up.close()


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
async def test_a_body_cut_by_a_tcp_close_without_close_notify_never_reaches_upstream_whole(
        tls_raw_edge, pki, framing):
    """A TLS client sends half its body (past the prefetch: the upstream connection is open
    and streaming) and closes TCP without TLS close_notify (a truncation attack, or a client
    gone). The upstream must never see a complete request: not a Content-Length body made
    whole, not a chunked body ended with its last chunk."""
    port, up = tls_raw_edge
    half = b"a" * 150_000
    if framing == "chunked":
        head = b"Transfer-Encoding: chunked\r\n\r\n"
        sent = head + b"%x\r\n" % len(half) + half + b"\r\n"  # whole chunks, then gone
    else:
        sent = b"Content-Length: %d\r\n\r\n" % (2 * len(half)) + half

    def send_and_vanish() -> None:
        raw = socket.create_connection(("127.0.0.1", port), timeout=5)
        tls = client_context(pki).wrap_socket(raw, server_hostname="localhost")
        tls.sendall(b"POST /public/x HTTP/1.1\r\nHost: g\r\n" + sent)
        time.sleep(0.5)
        tls.close()  # Python's SSLSocket.close sends no close_notify: TCP FIN only

    await asyncio.get_running_loop().run_in_executor(None, send_and_vanish)
    assert await eventually(lambda: up.ended == 1), "the upstream connection was left open"
    assert up.requests == [] and up.errors == []
    got = bytes(up.raw[0])
    assert got.count(b"a") < 2 * len(half) and not got.endswith(b"0\r\n\r\n")



async def test_a_refusal_on_an_https_listener_lingers_and_ends_cleanly(https_gateway, pki):
    """The lingering close under TLS (asyncio has no TLS half-close: keygate reads on, then
    closes with close_notify): a client that sends more after a request keygate refuses and
    closes on gets the whole JSON 400, then the end of the stream, within the lingering
    bounds; a silent one is closed after the idle bound."""
    from gateway.proxying.server import LINGER_IDLE, LINGER_TIME
    _, (proxy_port, _), _, _ = https_gateway

    def exchange(late: bool) -> tuple[bytes, str, float]:
        with socket.create_connection(("127.0.0.1", proxy_port), timeout=5) as raw:
            with client_context(pki).wrap_socket(raw, server_hostname="localhost") as tls:
                tls.sendall(b"GET /people/1 HTTP/1.1\r\nHost: g\r\nX-Bad: y\nX: z\r\n\r\n")
                began = time.monotonic()
                if late:
                    time.sleep(0.1)
                    for _ in range(5):
                        tls.sendall(b"GET /people/2 HTTP/1.1\r\nHost: g\r\n\r\n" * 50)
                        time.sleep(0.02)
                got, end = bytearray(), "eof"
                try:
                    while chunk := tls.recv(65536):
                        got += chunk
                except ssl.SSLEOFError:
                    end = "eof"  # a TCP FIN without close_notify: no data lost
                except (ConnectionError, ssl.SSLError) as exc:
                    end = repr(exc)
                return bytes(got), end, time.monotonic() - began

    loop = asyncio.get_running_loop()
    for late in (True, False):
        got, end, took = await loop.run_in_executor(None, exchange, late)
        assert end == "eof", (late, end, got)
        assert got.startswith(b"HTTP/1.") and b" 400 " in got.split(b"\r\n")[0], got
        head, _, body = got.partition(b"\r\n\r\n")
        assert body.endswith(b"}") and b'"bad_request"' in body, got
        assert took <= LINGER_TIME + 1.0, (late, took)
        if not late:
            assert LINGER_IDLE - 0.2 <= took <= LINGER_IDLE + 1.0, took


async def refused_over_tls(pki, port: int) -> tuple[ssl.SSLSocket, bytes]:
    """An HTTPS connection to the proxy listener that sent a request with a bare-LF header line
    and read keygate's whole 400 (which keygate closes after): its TLS socket, left open (it
    holds the descriptor: the raw socket is detached by the wrap), and the bytes read."""
    loop = asyncio.get_running_loop()

    def connect() -> tuple[socket.socket, ssl.SSLSocket]:
        raw = socket.create_connection(("127.0.0.1", port), timeout=5)
        return raw, client_context(pki).wrap_socket(raw, server_hostname="localhost")

    raw, tls = await loop.run_in_executor(None, connect)
    try:
        tls.sendall(b"GET /people/1 HTTP/1.1\r\nHost: g\r\nX-Bad: y\nX: z\r\n\r\n")
        got = bytearray()
        while b"}" not in got:
            got += await loop.run_in_executor(None, tls.recv, 65536)
    except BaseException:
        tls.close()
        raise
    return tls, bytes(got)


async def test_a_stop_while_a_tls_connection_waits_for_close_notify_completes(
        tmp_path, pki, upstream, redis_url, monkeypatch):
    """A stop (SIGTERM) while an HTTPS connection keygate closed still waits for the client's
    close_notify: the stop closed it a second time, asyncio's TLS transport then drops its
    protocol, and the listener's shutdown failed on it (AttributeError) before the rest of
    the stop ran. The stop now completes, and the connection is gone."""
    from gateway.proxying.server import LINGER_IDLE
    monkeypatch.setenv("KEYGATE_ADMIN_TOKEN", ADMIN_TOKEN)
    path = tmp_path / "config.yaml"
    ports = free_port(), free_port()
    write_config(path, str(upstream.make_url("")), *ports, pki["cert"], pki["key"])
    async with running_gateway(load_config(path), redis_url, config_path=str(path)) as gw:
        runners = await start_listeners(gw)
        stopped = False
        try:
            tls, got = await refused_over_tls(pki, ports[0])
            try:
                await asyncio.sleep(LINGER_IDLE + 0.3)  # keygate has closed: close_notify sent
                handlers = list(gw.proxy_server.connections)
                assert handlers and all(h._kept is not None and h._kept.is_closing()
                                        for h in handlers)
                await asyncio.wait_for(stop_listeners(runners), 10)
                stopped = True
                assert await eventually(lambda: not gw.proxy_server.connections, 5)
            finally:
                tls.close()
        finally:
            if not stopped:
                await stop_listeners(runners)


async def test_a_tls_client_that_never_answers_close_notify_is_closed_within_the_header_timeout(
        tmp_path, pki, upstream, redis_url, monkeypatch):
    """After a refusal on an HTTPS listener keygate closes with close_notify, and asyncio then
    waited for the client's own close_notify for its default 30 s: a client that keeps the TCP
    connection open and never answers it (nor sends more) held its place under
    server.max_connections three times server.timeouts.header. The TLS shutdown now has the
    handshake's bound, server.timeouts.header (1 s here)."""
    from gateway.proxying.server import LINGER_IDLE
    monkeypatch.setenv("KEYGATE_ADMIN_TOKEN", ADMIN_TOKEN)
    path, ports = https_config_with_a_1s_header_timeout(tmp_path, upstream, pki)
    loop = asyncio.get_running_loop()
    async with running_gateway(load_config(path), redis_url, config_path=str(path)) as gw:
        runners = await start_listeners(gw)
        server = gw.proxy_server
        try:
            tls, got = await refused_over_tls(pki, ports[0])
            try:  # the whole 400 read; then nothing more is read, nor closed
                assert b" 400 " in got.split(b"\r\n")[0], got
                began = loop.time()
                gone = await eventually(lambda: not server.connections, 8)
                took = loop.time() - began
            finally:
                tls.close()
            assert gone and took <= LINGER_IDLE + 1 + 1.5, \
                f"still open {took:.1f} s after the refusal"
        finally:
            await stop_listeners(runners)
