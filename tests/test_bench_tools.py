"""bench/run.py's check of ``--workers 2`` (target w), on synthetic prometheus-client
multiprocess files, and bench/faults.py's verdict on a row: no server, no timing (the
benchmarks themselves are never tests)."""

from __future__ import annotations

import sys
from pathlib import Path

from prometheus_client.mmap_dict import MmapedDict, mmap_key

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import run  # noqa: E402


def write_worker(directory: Path, pid: int, *, ok: int, misses: int, hits: int,
                 answers: dict[str, int]) -> None:
    d = MmapedDict(str(directory / f"counter_{pid}.db"))
    for status_class, n in answers.items():
        d.write_value(mmap_key("keygate_requests", "keygate_requests_total",
                               ["route", "method", "status_class"], ["/people/**", "GET", status_class],
                               "h"), n, 0)
    for result, n in (("hit", hits), ("miss", misses)):
        d.write_value(mmap_key("keygate_key_cache", "keygate_key_cache_total", ["result"], [result],
                               "h"), n, 0)
    d.write_value(mmap_key("keygate_argon2_verifications", "keygate_argon2_verifications_total",
                           ["result"], ["ok"], "h"), ok, 0)
    d.close()


def target(directory: Path) -> run.Target:
    return run.Target("w", "http://127.0.0.1:1/people/1", [100, 101, 102], "t",
                      spread=True, metrics_dir=directory)


def test_every_worker_verified_once_and_served_from_its_cache(tmp_path):
    write_worker(tmp_path, 101, ok=1, misses=5, hits=995, answers={"2xx": 1000})
    write_worker(tmp_path, 102, ok=1, misses=1, hits=499, answers={"2xx": 500})
    check = run.check_workers(target(tmp_path), max_conns=64)
    assert check["ok"], check["problems"]
    assert check["workers"]["101"] == {"argon2_ok": 1, "cache_hit": 995, "cache_miss": 5,
                                       "requests_2xx": 1000}


def test_a_silent_worker_a_non_2xx_and_a_second_verify_are_reported(tmp_path):
    write_worker(tmp_path, 101, ok=2, misses=2, hits=998, answers={"2xx": 990, "5xx": 10})
    check = run.check_workers(target(tmp_path), max_conns=8)   # 102 left no file: answered nothing
    assert not check["ok"]
    text = " ".join(check["problems"])
    assert "worker 102 answered no 200" in text
    assert "worker 101 answered non-2xx" in text
    assert "worker 101 verified the key 2 times" in text


def test_ratios_also_pair_the_rounds_so_a_noisy_round_shows():
    """Each round runs every target once, close together in time; on a shared machine the
    ratio of two medians can pair a fast round of one with a slow round of the other. The
    summary also gives each round's own ratio and their median."""
    def r(target: str, rnd: int, rps: float) -> dict:
        return {"target": target, "connections": 8, "round": rnd, "rps": rps, "p50_ms": 1.0,
                "p99_ms": 2.0, "server_cpu_us_per_req": 1e6 / rps, "server_core_busy": 0.9,
                "helper_core_busy": 0.5, "other_on_server_core": 0.0, "errors_total": 0}
    # the machine slows down round by round; c is 2% ahead of b in every round
    runs = [r("b", 0, 7400), r("c", 0, 7548), r("b", 1, 6600), r("c", 1, 6732),
            r("c", 2, 5814), r("b", 2, 5700)]
    cb = run.summarize(runs, [8])["ratios"]["c/b@8"]
    assert cb["throughput_rounds"] == [1.02, 1.02, 1.02]
    assert cb["throughput_round_median"] == 1.02
    runs[1] = r("c", 0, 5920)  # one bad round for c
    cb = run.summarize(runs, [8])["ratios"]["c/b@8"]
    assert cb["throughput_rounds"] == [0.8, 1.02, 1.02]
    assert cb["throughput_round_median"] == 1.02


def test_the_store_cost_of_a_request_is_reported_for_the_targets_that_call_it(capsys):
    """Redis's CPU per request, from the redis-server process's CPU over the window: the
    capacity figure of the one store every replica shares. Printed for keygate's targets, not
    for the upstream or the bare proxy (which never call it)."""
    def measured(target: str, store_s: float) -> dict:
        res = {"target": target, "connections": 8, "round": 0, "requests": 20000, "ok": 20000,
               "rps": 10000.0, "p50_ms": 1.0, "p99_ms": 2.0, "seconds": 2.0,
               "cpu_s": {"server": 2.0, "helpers": 1.0, "store": store_s}}
        run.derive(res, None)
        return res
    runs = [measured("b", 0.0), measured("c", 0.5), measured("l", 0.8)]
    assert [r["store_cpu_us_per_req"] for r in runs] == [0.0, 25.0, 40.0]
    run.print_table(run.summarize(runs, [8]), [8], "-", "wrk", None, {})
    out = capsys.readouterr().out.split("store: ", 1)[1]
    assert "c@8" in out and "25.0 us/req" in out and "~40,000 req/s per Redis core" in out
    assert "l@8" in out and "40.0 us/req" in out and "b@8" not in out


def test_the_fault_harness_allows_only_the_counts_a_killed_primary_can_take_with_it():
    """Redis replicates asynchronously: a count a Cluster primary answered just before SIGKILL
    may never reach the replica promoted in its place. The harness allows that many lost
    counts (the 200s answered in the replication window before the kill) and no more; every
    other scenario allows none."""
    import faults
    row = faults.Row("Cluster primary killed, replica promoted", counts_lost=1, counts_in_flight=2)
    assert row.failures() == []
    row.counts_lost = 3
    assert row.failures() == ["counts lost: 3 (more than the 2 answered in the replication "
                              "window before the kill)"]
    assert faults.Row("SIGSTOP", counts_lost=1).failures() == ["counts lost: 1"]
    assert faults.Row("SIGSTOP", counts_lost=0).failures() == []


# --- the commands the docs give for bench/ -----------------------------------------------------

ROOT = Path(__file__).resolve().parent.parent
BENCH_DOCS = [ROOT / "README.md", ROOT / "bench" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def bench_arguments(script: str) -> dict[str, object]:
    """``--option`` → its default, read from the script's ``add_argument`` calls (its source, not
    by running it)."""
    import ast
    found: dict[str, object] = {}
    for node in ast.walk(ast.parse((ROOT / "bench" / script).read_text())):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "add_argument":
            default = next((k.value for k in node.keywords if k.arg == "default"), None)
            for arg in node.args:
                if isinstance(arg, ast.Constant) and str(arg.value).startswith("--"):
                    found[arg.value] = (ast.literal_eval(default)
                                        if isinstance(default, ast.Constant) else None)
    return found


def bench_command_lines() -> list[tuple[str, str, str, str]]:
    """(page:line, script, options, comment) of each `bench/X.py ...` command in a shell block."""
    import re
    found = []
    for page in BENCH_DOCS:
        in_block = False
        for number, line in enumerate(page.read_text().splitlines(), 1):
            if line.startswith("```"):
                in_block = line.startswith("```sh")
                continue
            command = re.search(r"bench/([a-z_]+\.py)([^#]*)(?:#(.*))?$", line) if in_block else None
            if command:
                found.append((f"{page.relative_to(ROOT)}:{number}", command.group(1),
                              command.group(2), command.group(3) or ""))
    return found


def test_every_bench_command_in_the_docs_takes_the_options_it_is_given():
    import re
    lines = bench_command_lines()
    assert len(lines) > 15
    wrong = [(where, option) for where, script, options, _ in lines
             for option in re.findall(r"(--[a-z][a-z0-9-]*)", options)
             if option not in bench_arguments(script)]
    assert wrong == []


def test_the_bench_readme_says_what_a_bare_run_py_measures():
    """bench/README.md's first command, `bench/run.py` with no option, said "all targets" while
    run.py's default set is a,b,c,w,l,d,e (u, p, q and v are opt-in, as the target table says):
    someone expecting the u or q rows from a bare run got neither."""
    import re
    defaults = bench_arguments("run.py")
    bare = [c for where, script, options, c in bench_command_lines()
            if where.startswith("bench/README.md") and script == "run.py" and not options.strip()]
    assert bare, "bench/README.md no longer shows a bare bench/run.py"
    comment = bare[0]
    assert "all targets" not in comment
    assert defaults["--targets"] in comment, comment
    assert f"{defaults['--warmup']:g} s warm-up" in comment
    assert f"{defaults['--duration']:g} s per run" in comment
    assert re.search(" and ".join(defaults["--connections"].split(",")) + " connections", comment)
