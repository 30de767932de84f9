#!/usr/bin/env python3
"""The auth service a Python shop would put behind nginx ``auth_request`` instead of keygate.

    python bench/nginx_verifier.py --port 9002 --hashes-file FILE [--uvloop]

An aiohttp low-level ``web.Server``: for each subrequest it takes ``Authorization: Bearer <t>``,
looks ``sha256(t)`` up in an in-memory dict (loaded from FILE: one ``<sha256 hex> <workspace>``
per line) and answers 204 with ``X-Workspace-Id`` (nginx copies it to the upstream request) or
401. Deliberately the simplest thing that works: no store round trip, no scopes, no limits, so
keygate's c/e ratio compares it against a *lower* bound of what that setup costs.
"""
from __future__ import annotations

import argparse
import asyncio
import hashlib

from aiohttp import web


class Verifier:
    def __init__(self, hashes: dict[bytes, str]) -> None:
        self.hashes = hashes

    async def handle(self, request: web.BaseRequest) -> web.Response:
        auth = request.headers.get("Authorization", "")
        scheme, _, token = auth.partition(" ")
        if scheme.lower() == "bearer" and token:
            digest = hashlib.sha256(token.strip().encode()).digest()
            workspace = self.hashes.get(digest)
            # Looked up by digest: lookup timing can leak digest bytes, never token bytes.
            if workspace is not None:
                return web.Response(status=204, headers={"X-Workspace-Id": workspace})
        return web.Response(status=401, headers={"WWW-Authenticate": 'Bearer realm="bench"'})


def load_hashes(path: str) -> dict[bytes, str]:
    hashes: dict[bytes, str] = {}
    with open(path) as f:
        for line in f:
            if line.strip():
                hexdigest, _, workspace = line.strip().partition(" ")
                hashes[bytes.fromhex(hexdigest)] = workspace or "default"
    return hashes


async def main(host: str, port: int, hashes_file: str) -> None:
    verifier = Verifier(load_hashes(hashes_file))
    runner = web.ServerRunner(web.Server(verifier.handle, access_log=None), handle_signals=True)
    await runner.setup()
    await web.TCPSite(runner, host, port, backlog=1024).start()
    print(f"verifier listening on {host}:{port} ({len(verifier.hashes)} keys)", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--hashes-file", required=True)
    ap.add_argument("--uvloop", action="store_true")
    a = ap.parse_args()
    if a.uvloop:
        import uvloop
        uvloop.install()
    try:
        asyncio.run(main(a.host, a.port, a.hashes_file))
    except KeyboardInterrupt:
        pass
