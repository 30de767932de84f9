#!/usr/bin/env python3
"""Bare aiohttp pass-through proxy: the floor any Python/aiohttp proxy pays per request.

    python bench/bare_proxy.py --port 9001 --upstream http://127.0.0.1:9000 [--uvloop]

An aiohttp low-level ``web.Server`` plus one ``ClientSession`` keep-alive pool. Every request is
forwarded as sent (method, path + query, headers less hop-by-hop and Host, body streamed), and
the upstream's status, headers and body are streamed back. No auth, no limits, no logging: what
keygate does on top of this is what the benchmark's c/b ratio prices.
"""
from __future__ import annotations

import argparse
import asyncio

from aiohttp import ClientSession, ClientTimeout, TCPConnector, web
from multidict import CIMultiDict
from yarl import URL

HOP_BY_HOP = frozenset(h.lower() for h in (
    "Connection", "Keep-Alive", "Proxy-Authenticate", "Proxy-Authorization", "TE", "Trailer",
    "Transfer-Encoding", "Upgrade", "Host", "Content-Length"))


class BareProxy:
    def __init__(self, upstream: str) -> None:
        self.upstream = upstream.rstrip("/")
        self.session: ClientSession | None = None

    async def start(self) -> None:
        self.session = ClientSession(
            connector=TCPConnector(limit=0, keepalive_timeout=60),
            timeout=ClientTimeout(total=30), auto_decompress=False, skip_auto_headers=("User-Agent",))

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        assert self.session is not None
        headers = CIMultiDict((k, v) for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP)
        body = request.content if request.body_exists else None
        url = URL(self.upstream + request.raw_path, encoded=True)
        async with self.session.request(request.method, url, headers=headers, data=body,
                                        allow_redirects=False) as up:
            out = web.StreamResponse(status=up.status, reason=up.reason)
            for k, v in up.headers.items():
                if k.lower() not in HOP_BY_HOP:
                    out.headers.add(k, v)
            if up.content_length is not None:
                out.content_length = up.content_length
            await out.prepare(request)
            async for chunk in up.content.iter_any():
                await out.write(chunk)
            await out.write_eof()
            return out


async def main(host: str, port: int, upstream: str) -> None:
    proxy = BareProxy(upstream)
    await proxy.start()
    runner = web.ServerRunner(web.Server(proxy.handle, access_log=None), handle_signals=True)
    await runner.setup()
    await web.TCPSite(runner, host, port, backlog=1024).start()
    print(f"bare proxy listening on {host}:{port} -> {upstream}", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()
        await proxy.close()


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--upstream", required=True, help="e.g. http://127.0.0.1:9000")
    ap.add_argument("--uvloop", action="store_true", help="run on uvloop (as keygate does)")
    a = ap.parse_args()
    if a.uvloop:
        import uvloop
        uvloop.install()
    try:
        asyncio.run(main(a.host, a.port, a.upstream))
    except KeyboardInterrupt:
        pass
