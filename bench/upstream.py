#!/usr/bin/env python3
"""Benchmark upstream: an aiohttp low-level ``web.Server`` answering every request with the same
200-byte JSON record (the shape of ``/work/shared/probes``' upstream).

    python bench/upstream.py --port 9000 [--uvloop]
"""
from __future__ import annotations

import argparse
import asyncio

from aiohttp import web

BODY = (b'{"id":1,"name":"Ada Lovelace","email":"ada@example.com","company":"Analytical Engines Ltd",'
        b'"tags":["vip","beta"],"created_at":"2026-01-01T00:00:00Z","notes":"the 200 byte sample record"}')


async def handle(request: web.BaseRequest) -> web.Response:
    return web.Response(body=BODY, content_type="application/json")


async def main(host: str, port: int) -> None:
    runner = web.ServerRunner(web.Server(handle, access_log=None), handle_signals=True)
    await runner.setup()
    await web.TCPSite(runner, host, port, backlog=1024).start()
    print(f"upstream listening on {host}:{port}", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--uvloop", action="store_true", help="run on uvloop (as keygate does)")
    a = ap.parse_args()
    if a.uvloop:
        import uvloop
        uvloop.install()
    try:
        asyncio.run(main(a.host, a.port))
    except KeyboardInterrupt:
        pass
