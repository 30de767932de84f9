"""``keygate serve`` as a child process, for the tests that drive the real command: a config
file on free loopback ports, the process itself, and the admin calls they make to it."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml
from aiohttp import ClientSession, ClientTimeout

from conftest import free_port

ADMIN_TOKEN = "serve-test-operator-token-0123456789"
TIMEOUT = ClientTimeout(total=15)


def write_config(tmp_path: Path, *, redis_url: str = "embedded", data_dir: str | None = None,
                 upstream_url: str = "http://127.0.0.1:9", plan: dict | None = None,
                 name: str = "keygate.yaml", store_timeout: float | None = None,
                 **server: Any) -> tuple[Path, int, int]:
    """A config file for one gateway on free loopback ports: (path, proxy port, admin port).
    ``store_timeout``: store.timeout (else the shipped one)."""
    proxy_port, admin_port = free_port(), free_port()
    store: dict[str, Any] = {"redis_url": redis_url}
    if data_dir is not None:
        store["data_dir"] = data_dir
    if store_timeout is not None:
        store["timeout"] = store_timeout
    doc = {
        "server": {"host": "127.0.0.1", "port": proxy_port, "access_log": "off", **server},
        "admin": {"host": "127.0.0.1", "port": admin_port},
        "store": store,
        # cheap argon2 parameters: the tests are about the process, not the hash
        "keys": {"argon2": {"time_cost": 1, "memory_cost": 8, "parallelism": 1}},
        "plans": {"starter": plan or {"monthly_requests": 1000, "max_keys": 5,
                                      "rate_limit": None}},
        "default_plan": "starter",
        "upstreams": {"api": {"url": upstream_url, "timeout": 10}},
        "routes": [{"path": "/health", "methods": ["GET"], "upstream": "api", "public": True},
                   {"path": "/people/**", "methods": ["GET"], "upstream": "api",
                    "scopes": ["people:read"]}],
    }
    path = tmp_path / name
    path.write_text(yaml.safe_dump(doc))
    return path, proxy_port, admin_port


def short_data_dir() -> str:
    """A data_dir whose unix socket path stays well under the sun_path limit."""
    return tempfile.mkdtemp(prefix="kgs-", dir="/tmp")


def env() -> dict[str, str]:
    e = dict(os.environ)
    e["KEYGATE_ADMIN_TOKEN"] = ADMIN_TOKEN
    e.pop("PROMETHEUS_MULTIPROC_DIR", None)
    return e


def skewed_clock(seconds: float) -> dict[str, str]:
    """``Served``'s ``environ`` for a process whose wall clock reads ``seconds`` off (a host
    whose clock is wrong): see tests/clock_skew/sitecustomize.py."""
    path = [str(Path(__file__).parent / "clock_skew"), os.environ.get("PYTHONPATH", "")]
    return {"PYTHONPATH": os.pathsep.join(p for p in path if p),
            "KEYGATE_TEST_CLOCK_SKEW": str(seconds)}


def children_of(pid: int) -> set[int]:
    """Direct children of a process (Linux /proc)."""
    found: set[int] = set()
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found |= {int(c) for c in (task / "children").read_text().split()}
        except OSError:
            pass
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


class Served:
    """One ``keygate serve`` process."""

    def __init__(self, config: Path, proxy_port: int, admin_port: int, *args: str,
                 environ: dict[str, str] | None = None) -> None:
        """``environ``: variables set on top of ``env()``."""
        self.config, self.proxy_port, self.admin_port = config, proxy_port, admin_port
        self.stderr_path = config.with_suffix(f".{time.monotonic_ns()}.stderr")
        self._stderr = open(self.stderr_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gateway", "serve", "--config", str(config), *args],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=self._stderr,
            env={**env(), **(environ or {})}, cwd=str(config.parent))

    @property
    def proxy(self) -> str:
        return f"http://127.0.0.1:{self.proxy_port}"

    @property
    def admin(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    async def ready(self, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        async with ClientSession(timeout=ClientTimeout(total=2)) as s:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise AssertionError(f"keygate serve exited {self.proc.returncode}: "
                                         f"{self.stderr()}")
                try:
                    async with s.get(self.admin + "/readyz") as r:
                        if r.status == 200:  # the proxy port, without counting a request:
                            _, writer = await asyncio.open_connection("127.0.0.1",
                                                                      self.proxy_port)
                            writer.close()
                            return
                except OSError:
                    pass
                await asyncio.sleep(0.1)
        raise AssertionError(f"keygate serve not ready in {timeout}s: {self.stderr()}")

    def terminate(self, timeout: float = 20) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._stderr.close()


def embedded_pid(data_dir: str) -> int:
    return int(Path(data_dir, "redis.pid").read_text().strip())


async def key_in_aof(data_dir: str, token: str, ws: str = "acme", timeout: float = 15) -> None:
    """Wait until the key ``token`` names is whole in the embedded server's AOF, so a SIGKILL or
    a copy of the data_dir keeps it. The key's index (``kg:keyid:``) is written by its own
    command *before* the key's script, and appendfsync everysec may hold a write back up to
    2 s while a slow fsync runs, so the index alone says nothing about the key: wait for the
    script's record and the EXEC that closes its MULTI block."""
    key_id = token[len("kg_live_"):-38]
    record = f"kg:key:{{{ws}}}:{key_id}".encode()
    aof = Path(data_dir, "appendonly.aof")
    deadline = time.monotonic() + timeout
    while True:
        data = aof.read_bytes()
        at = data.rfind(record)
        if at >= 0 and b"\r\nEXEC\r\n" in data[at:]:
            return
        assert time.monotonic() < deadline, f"{record!r} never reached the AOF whole"
        await asyncio.sleep(0.05)


def embedded_started(data_dir: str) -> bool:
    """The embedded redis-server has written its pid (it creates the file, then writes it)."""
    try:
        return Path(data_dir, "redis.pid").read_text().strip() != ""
    except OSError:
        return False


async def admin_json(s: ClientSession, base: str, method: str, path: str,
                     body: Any = None) -> tuple[int, Any]:
    async with s.request(method, base + "/admin/v1" + path, json=body,
                         headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as r:
        return r.status, await r.json()


async def new_key(s: ClientSession, base: str, ws: str = "acme", plan: str = "starter") -> str:
    status, body = await admin_json(s, base, "POST", "/workspaces",
                                    {"id": ws, "name": ws.title(), "plan": plan})
    assert status == 201, body
    status, body = await admin_json(s, base, "POST", f"/workspaces/{ws}/keys",
                                    {"name": "it", "scopes": ["people:read"]})
    assert status == 201, body
    return body["token"]
