"""How long a full garbage collection stalls the event loop, with and without the start-up heap
frozen (``gateway.workers.settle_heap``, which ``keygate serve`` runs once listening).

    .venv/bin/python bench/gc_pause.py [--keys N]   # ~15 s for 100k keys

Each case runs in a fresh process: import the gateway, optionally freeze what start-up built,
fill a real ``Authenticator``'s cache with N verified keys the way the cold path does
(``bench/memory.py --in-process``), then time ``gc.collect()`` (best of 3). CPython's collector
is not incremental: a full collection walks every tracked object while the loop waits.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

CASE = r"""
import gc, json, sys, time
sys.path.insert(0, sys.argv[1]); sys.path.insert(0, sys.argv[2])
from gateway.auth import Authenticator, token_digest
from gateway.models import KeyRecord, Workspace
from gateway.tokens import SecretHasher, make_token
from gateway.workers import settle_heap
from harness import make_config
keys, freeze = int(sys.argv[3]), sys.argv[4] == "1"

def full_collection_ms():
    best = None
    for _ in range(3):
        started = time.perf_counter(); gc.collect()
        took = (time.perf_counter() - started) * 1000
        best = took if best is None else min(best, took)
    return best

config = make_config("http://127.0.0.1:9")
auth = Authenticator(config, store=None, requests=None)
stored_hash = SecretHasher().hash("x" * 32)
frozen = settle_heap() if freeze else 0
at_rest = full_collection_ms()
for i in range(keys):
    token, parsed = make_token("kg", "live")
    ws_id = f"ws-{i // 10}"
    ws = Workspace(ws_id, f"Workspace {i // 10}", "starter", 1764806400.0, 3)
    key = KeyRecord(parsed.key_id, ws_id, f"integration {i}", "", "live", None,
                    ("people:read", "companies:read"), stored_hash, token[:20], time.time(),
                    None, None, time.time(), None, 7)
    auth._remember(auth.entry(key, ws, list(key.scopes), token_digest(token),
                              time.monotonic() + 300))
print(json.dumps({"frozen": frozen, "tracked": len(gc.get_objects()), "at_rest_ms": at_rest,
                  "with_keys_ms": full_collection_ms()}))
auth.close()
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keys", type=int, default=100_000)
    args = ap.parse_args()
    for freeze in ("0", "1"):
        out = subprocess.run([sys.executable, "-c", CASE, str(HERE.parent), str(HERE.parent / "tests"),
                              str(args.keys), freeze], capture_output=True, text=True, check=True)
        r = json.loads(out.stdout)
        label = "start-up heap frozen" if freeze == "1" else "nothing frozen      "
        print(f"{label}: full collection {r['at_rest_ms']:.1f} ms at rest, "
              f"{r['with_keys_ms']:.1f} ms with {args.keys} cached keys "
              f"({r['frozen']} objects frozen, {r['tracked']} tracked)")


if __name__ == "__main__":
    main()
