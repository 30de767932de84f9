"""Resident memory of the verified-key cache: 100k cached keys (issue target: <= 100 MB RSS).

    .venv/bin/python bench/memory.py [--keys 100000]

Fills a real ``Authenticator``'s cache the way the cold path does (``entry`` + ``_remember``
from fresh stored-key and workspace records, as the store returns them: name, scopes, argon2id
hash string, revisions; 100 keys per workspace), and prints the process's RSS before and after,
read from /proc. Nothing else runs, so the difference is the cache.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keys", type=int, default=100_000)
    n = ap.parse_args().keys

    from gateway.auth import Authenticator, token_digest
    from gateway.models import KeyRecord, Workspace
    from gateway.tokens import SecretHasher, make_token
    from harness import make_config

    config = make_config("http://127.0.0.1:9")
    auth = Authenticator(config, store=None, requests=None)
    sample_hash = SecretHasher().hash("x" * 32)      # a real argon2id string, as stored
    gc.collect()
    before = rss_mb()
    started = time.perf_counter()
    for i in range(n):
        token, parsed = make_token("kg", "live")
        ws_id = f"ws-{i // 100}"
        # fresh objects for every key, as the store returns them
        ws = Workspace(ws_id, f"Workspace {i // 100}", "starter", 1764806400.0, 3)
        key = KeyRecord(parsed.key_id, ws_id, f"integration {i}", "", "live", None,
                        ("people:read", "companies:read"), sample_hash, token[:20],
                        time.time(), None, None, time.time(), None, 7)
        auth._remember(auth.entry(key, ws, list(key.scopes), token_digest(token),
                                  time.monotonic() + 300))
    gc.collect()
    after = rss_mb()
    print(f"cached keys: {len(auth.cache)} (built in {time.perf_counter() - started:.1f} s)")
    print(f"RSS before {before:.1f} MB, after {after:.1f} MB: "
          f"{after - before:.1f} MB for the cache, {(after - before) * 2**20 / n:.0f} B/key")
    auth.close()


if __name__ == "__main__":
    main()
