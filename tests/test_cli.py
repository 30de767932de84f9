"""The ``keygate`` CLI: argument handling offline, and every admin verb against a real admin API
(``gateway.admin.create_admin_app`` on a loopback port, on a real redis-server).

The CLI is synchronous (urllib), so live tests run ``main`` in a thread: calling it on the
test's event loop would block the very server it talks to.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import json
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import free_port
from gateway.cli import main, parse_duration, parse_expiry

ADMIN_TOKEN = "test-operator-token-0123456789"


# --- argument parsing (pure) --------------------------------------------------------------------

@pytest.mark.parametrize("text, seconds", [("30d", 30 * 86400), ("24h", 86400), ("90m", 5400),
                                           ("3600s", 3600), ("2w", 14 * 86400), ("0", 0)])
def test_durations_convert_to_seconds(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["30", "1.5h", "h", "-5m", "10y", ""])
def test_duration_without_a_known_unit_is_refused(text):
    with pytest.raises(ValueError):
        parse_duration(text)


def test_expires_duration_becomes_expires_in():
    assert parse_expiry("30d") == {"expires_in": 30 * 86400}


def test_expires_bare_date_is_midnight_utc():
    assert parse_expiry("2027-01-31") == {"expires_at": "2027-01-31T00:00:00Z"}


def test_expires_datetime_with_offset_is_normalised_to_utc():
    assert parse_expiry("2027-01-31T12:00:00+02:00") == {"expires_at": "2027-01-31T10:00:00Z"}
    assert parse_expiry("2027-01-31T12:00:00Z") == {"expires_at": "2027-01-31T12:00:00Z"}


@pytest.mark.parametrize("text", ["2027-01-31T12:00:00", "2027-02-30", "tomorrow", "0d"])
def test_expires_refuses_zoneless_invalid_or_empty_values(text):
    with pytest.raises(ValueError):
        parse_expiry(text)


@pytest.mark.parametrize("text", ["0001-01-01T00:00:00+00:01", "9999-12-31T23:59:59-00:01"])
def test_expires_outside_years_1_to_9999_utc_says_so(text):
    with pytest.raises(ValueError, match="outside the years 0001 to 9999 in UTC"):
        parse_expiry(text)


def test_role_and_scope_together_is_bad_usage(capsys):
    code = main(["keys", "create", "--workspace", "acme", "--name", "ci",
                 "--role", "reader", "--scope", "people:read"])
    assert code == 2
    assert "not allowed with argument" in capsys.readouterr().err


def test_keys_create_needs_a_role_or_scopes(capsys):
    assert main(["keys", "create", "--workspace", "acme", "--name", "ci"]) == 2
    assert "--role" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [
    [],
    ["frobnicate"],
    ["keys", "list"],                                            # --workspace missing
    ["keys", "list", "--workspace", "acme", "--status", "gone"],
    ["keys", "create", "--workspace", "a", "--name", "n", "--role", "r", "--expires", "soon"],
    # ISO 8601 forms that are not RFC 3339, which the admin API refuses: a week date, the
    # basic format, hours only, a ',' fraction, an offset without ':'
    *(["keys", "create", "--workspace", "a", "--name", "n", "--role", "r", "--expires", when]
      for when in ("2027-W01-1T00:00:00Z", "20270131T000000Z", "2027-01-31T12Z",
                   "2027-01-31T12:00:00,5Z", "2027-01-31T12:00:00+0100")),
    # --meta as the admin API reads it: no name twice (Python keeps the last, other readers
    # the first), no NaN or Infinity (not JSON: the API refuses it as "not valid JSON")
    *(["keys", "create", "--workspace", "a", "--name", "n", "--role", "r", "--meta", meta]
      for meta in ('{"tier": "gold", "tier": "free"}', '{"score": NaN}', '{"n": 1e999}')),
    ["keys", "rotate", "--workspace", "a", "k1", "--grace", "1 day"],
    ["workspaces", "create", "acme"],                            # --name missing
    ["workspaces", "set-plan", "acme"],                          # plan missing
    ["serve", "--workers", "0"],
    ["usage", "--workspace", "acme", "--admin-url", "ftp://example.com"],
])
def test_bad_usage_exits_2(argv, capsys):
    assert main(argv) == 2
    assert "usage:" in capsys.readouterr().err


def test_help_exits_0(capsys):
    assert main(["--help"]) == 0
    assert "workspaces" in capsys.readouterr().out


def every_command() -> list[list[str]]:
    """Every command path the parser knows, found by walking it (so a new one is covered)."""
    import argparse
    from gateway.cli import build_parser

    found: list[list[str]] = []

    def walk(parser: argparse.ArgumentParser, path: list[str]) -> None:
        found.append(path)
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    walk(sub, path + [name])
    walk(build_parser(), [])
    return found


def test_the_command_walk_finds_the_commands_the_readme_names():
    names = {" ".join(path) for path in every_command()}
    for command in ("serve", "demo", "config check", "workspaces create", "workspaces list",
                    "workspaces show", "workspaces set-plan", "keys create", "keys list",
                    "keys show", "keys update", "keys revoke", "keys rotate", "usage",
                    "roles list", "roles set", "roles delete", "audit"):
        assert command in names


@pytest.mark.parametrize("path", every_command(), ids=lambda p: " ".join(p) or "keygate")
@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_every_command_answers_help(path, flag, capsys):
    """Every leaf used to crash on --help (KeyError: 'default' from %(default)s with
    SUPPRESS), printing a traceback instead of its usage."""
    assert main([*path, flag]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("usage: keygate"), out
    assert err == ""


@pytest.mark.parametrize("path", every_command(), ids=lambda p: " ".join(p) or "keygate")
def test_every_commands_help_says_what_it_does_and_what_each_argument_is(path):
    """`keygate keys usage --help`, `keys delete --help` and `workspaces limits --help` printed
    a usage line and no sentence saying what the command does, and arguments such as `ID`,
    `--name`, `--status` or `--sort` were listed with no word about them: an operator had to
    guess or read docs/cli.md. Every command's --help now opens with what it does, and every
    argument says what it is."""
    import argparse
    from gateway.cli import build_parser
    parser = build_parser()
    for name in path:
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = sub.choices[name]
    assert parser.description, f"keygate {' '.join(path)} --help says nothing of what it does"
    bare = [action.option_strings or [action.metavar or action.dest]
            for action in parser._actions
            if not isinstance(action, argparse._SubParsersAction) and not action.help]
    assert bare == [], f"keygate {' '.join(path)} --help: arguments without a word: {bare}"


@pytest.mark.parametrize("path, usage", [(["serve"], "[--workers N]"),
                                         (["keys", "usage"], "[--days N]"),
                                         (["usage"], "[--days N]")])
def test_help_names_the_arguments_as_docs_cli_md_and_the_spec_do(path, usage, capsys):
    """`keygate serve --help` said `--workers WORKERS` and `usage --help` `--days DAYS`, while
    the SPEC, docs/cli.md and the options' own help text ("the last N days") say N."""
    assert main([*path, "--help"]) == 0
    out = capsys.readouterr().out
    assert usage in " ".join(out.split()), out


def test_help_as_a_subprocess_has_no_traceback():
    done = subprocess.run([sys.executable, "-m", "gateway", "keys", "create", "--help"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "--workspace" in done.stdout and "Traceback" not in done.stderr


def test_ctrl_c_at_the_revoke_question_is_exit_130_without_a_traceback():
    """docs/cli.md and `keygate --help` list every exit code: Ctrl-C is 130 (the shell's
    convention for SIGINT), one empty line and no traceback, and the key is not revoked."""
    port = free_port()  # nobody there: the question comes before any call
    proc = subprocess.Popen([sys.executable, "-m", "gateway", "--admin-url",
                             f"http://127.0.0.1:{port}", "keys", "revoke", "-w", "acme",
                             "k0000000000a"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env={**os.environ,
                                                         "KEYGATE_ADMIN_TOKEN": "t" * 40},
                            # SIGINT as a terminal leaves it: a test run started in the
                            # background by a shell (`pytest &`) has SIGINT and SIGQUIT ignored,
                            # and the CLI would inherit that
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        asked = b""
        while b"[y/N]" not in asked:
            chunk = proc.stderr.read1(4096)
            assert chunk, asked
            asked += chunk
        # the signal can reach the CLI at all: inherited blocked or ignored from the test
        # process (a test that left SIGINT so in this worker), the CLI would read end of input
        # once stdin closes and exit 2, which is not the CLI's doing
        status = dict(line.split(":\t", 1) for line in
                      Path(f"/proc/{proc.pid}/status").read_text().splitlines() if ":\t" in line)
        sigint = 1 << (signal.SIGINT - 1)
        assert not int(status["SigBlk"], 16) & sigint, f"SIGINT blocked in the CLI: {status}"
        assert not int(status["SigIgn"], 16) & sigint, f"SIGINT ignored in the CLI: {status}"
        assert int(status["SigCgt"], 16) & sigint, f"SIGINT not caught by the CLI: {status}"
        started = time.monotonic()
        # stdin kept open until it ends: closed at once (communicate), the question could
        # read end of input before the signal was handled. A SIGINT that lands between the
        # prompt and the read is only noted (no read to interrupt), as a terminal's second
        # Ctrl-C would find it: sent again until the CLI ends
        for _ in range(30):
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=1)
                break
            except subprocess.TimeoutExpired:
                pass
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, (f"after {time.monotonic() - started:.1f}s: ".encode()
                                    + asked + err).decode()
    assert b"Traceback" not in err and b"revoked key" not in out, err


def test_unreachable_admin_api_is_one_line_and_exit_1(capsys, monkeypatch):
    port = free_port()  # a port nobody listens on
    monkeypatch.setenv("KEYGATE_ADMIN_TOKEN", ADMIN_TOKEN)
    code = main(["keys", "list", "--workspace", "acme", "--admin-url", f"http://127.0.0.1:{port}"])
    out, err = capsys.readouterr()
    assert code == 1
    assert out == ""
    assert err.startswith(f"keygate: cannot reach the admin API at http://127.0.0.1:{port}: ")
    assert err.count("\n") == 1
    assert ADMIN_TOKEN not in err
    # and what to do: nothing said whether to start something or point elsewhere
    assert "keygate serve" in err and "--admin-url" in err and "KEYGATE_ADMIN_URL" in err, err


@pytest.mark.parametrize("argv, env, names", [
    (["--admin-url", "http://127.0.0.1:abc"], {}, "--admin-url"),
    (["--admin-url", "http://127.0.0.1:99999"], {}, "--admin-url"),
    (["--admin-url", "http://127.0.0.1:1 x"], {}, "--admin-url"),
    ([], {"KEYGATE_ADMIN_URL": "http://127.0.0.1:abc"}, "KEYGATE_ADMIN_URL"),
    (["--timeout", "-1"], {}, "--timeout"),
    (["--timeout", "nan"], {}, "--timeout"),
    (["--timeout", "inf"], {}, "--timeout"),
    (["--timeout", "0"], {}, "--timeout"),
    (["--admin-url", "http://ops:s3cr3t-pw@127.0.0.1:1"], {}, "--admin-url"),
    ([], {"KEYGATE_ADMIN_URL": "http://ops:s3cr3t-pw@127.0.0.1:1"}, "KEYGATE_ADMIN_URL"),
    (["--admin-url", "http://127.0.0.1:1/?x=1"], {}, "--admin-url"),
    (["--admin-url", "http://127.0.0.1:1/#top"], {}, "--admin-url"),
], ids=["nonnumeric-port", "port-out-of-range", "blank-in-port", "env-port", "timeout-negative",
        "timeout-nan", "timeout-inf", "timeout-zero", "userinfo", "env-userinfo", "query",
        "fragment"])
def test_a_bad_admin_url_or_timeout_is_bad_usage_never_a_traceback(argv, env, names):
    """SPEC: exit 2 on bad usage, never a traceback. An admin URL whose port is not a port
    passed the scheme-and-host check and ended in http.client's InvalidURL traceback; a
    --timeout of -1, nan or inf in socket.settimeout's ValueError/OverflowError traceback (0
    made the socket non-blocking: 'Operation now in progress'). A URL with `user:password@`
    was taken whole as a host name ("Name or service not known") and its password printed
    back; one with a query or fragment had the API path appended after it (404 "No such admin
    endpoint")."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("KEYGATE_ADMIN_URL")}
    environ.update(env, KEYGATE_ADMIN_TOKEN=ADMIN_TOKEN)
    done = subprocess.run([sys.executable, "-m", "gateway", *argv, "workspaces", "list"],
                          capture_output=True, text=True, timeout=60, env=environ)
    assert "Traceback" not in done.stderr, done.stderr
    assert done.returncode == 2, done.stderr
    assert names in done.stderr and done.stdout == ""
    assert ADMIN_TOKEN not in done.stderr and "s3cr3t-pw" not in done.stderr


def test_admin_url_comes_from_the_environment(capsys, monkeypatch):
    port = free_port()
    monkeypatch.setenv("KEYGATE_ADMIN_URL", f"http://127.0.0.1:{port}")
    assert main(["workspaces", "list"]) == 1
    assert f"127.0.0.1:{port}" in capsys.readouterr().err


def test_admin_url_before_the_verb_is_honoured(capsys):
    port = free_port()
    assert main(["--admin-url", f"http://127.0.0.1:{port}", "workspaces", "list"]) == 1
    assert f"127.0.0.1:{port}" in capsys.readouterr().err


# --- config check -------------------------------------------------------------------------------

GOOD_CONFIG = """\
upstreams:
  crm: {url: "http://127.0.0.1:9000", timeout: 5}
routes:
  - {path: "/people/**", methods: [GET], upstream: crm, scopes: ["people:read"]}
"""


def test_config_check_accepts_a_good_file(tmp_path, capsys):
    path = tmp_path / "keygate.yaml"
    path.write_text(GOOD_CONFIG)
    assert main(["config", "check", str(path)]) == 0
    assert capsys.readouterr().out == f"ok: {path}\n"


def test_config_check_names_file_line_and_field_of_each_problem(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("server:\n  port: lots\nplans:\n  pro: {rate_limit: fast}\n")
    assert main(["config", "check", str(path)]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) >= 2
    assert any(str(path) in line and ":2" in line and "port" in line for line in lines)
    assert any("rate_limit" in line for line in lines)


def test_config_check_reports_a_missing_file(tmp_path, capsys):
    assert main(["config", "check", str(tmp_path / "nope.yaml")]) == 1
    assert "nope.yaml" in capsys.readouterr().err


def test_config_check_defaults_to_config_yaml_in_the_current_directory(tmp_path, capsys,
                                                                     monkeypatch):
    monkeypatch.delenv("KEYGATE_CONFIG", raising=False)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "config.yaml").write_text(GOOD_CONFIG)
    assert main(["config", "check"]) == 0
    assert capsys.readouterr().out == "ok: config.yaml\n"


def test_serve_and_config_check_without_a_config_say_which_file_is_missing(tmp_path, capsys,
                                                                          monkeypatch):
    """serve used to run on built-in defaults (no routes) when ./config.yaml was absent."""
    monkeypatch.delenv("KEYGATE_CONFIG", raising=False)
    monkeypatch.chdir(tmp_path)
    for argv, how in ((["serve"], "keygate serve --config PATH"),
                      (["config", "check"], "keygate config check PATH")):
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert str(tmp_path / "config.yaml") in err and "does not exist" in err
        # config check takes the file as its argument (docs/cli.md): `config check --config
        # PATH`, which the message told it to run, was exit 2 "unrecognized arguments"
        assert how in err, err


def test_serve_reads_config_yaml_in_the_current_directory(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("KEYGATE_CONFIG", raising=False)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "config.yaml").write_text("server:\n  port: lots\n")
    assert main(["serve"]) == 1
    assert "config.yaml:2: server.port" in capsys.readouterr().err


@pytest.mark.parametrize("text", ["", "# nothing yet\n", "server:\n  port: 8080\n",
                                  "upstreams:\n  crm: http://127.0.0.1:9000\nroutes: []\n"])
def test_a_config_with_no_routes_is_refused_by_check_and_serve(tmp_path, capsys, text):
    path = tmp_path / "empty.yaml"
    path.write_text(text)
    for argv in (["config", "check", str(path)], ["serve", "--config", str(path)]):
        assert main(argv) == 1
        out, err = capsys.readouterr()
        assert out == ""
        line = 3 if "routes:" in text else 1  # file:line: field: what
        assert f"{path}:{line}: routes: no routes are defined" in err


def test_config_check_defaults_to_keygate_config_env(tmp_path, capsys, monkeypatch):
    path = tmp_path / "from-env.yaml"
    path.write_text(GOOD_CONFIG)
    monkeypatch.setenv("KEYGATE_CONFIG", str(path))
    assert main(["config", "check"]) == 0
    assert capsys.readouterr().out == f"ok: {path}\n"


async def test_config_check_reports_a_plan_and_a_role_the_store_still_uses(tmp_path, redis_url,
                                                                          capsys):
    """A file that lacks a plan workspaces are on (they would fall back to default_plan) or a
    configured role keys are bound to (they would have no scopes) passed `config check`; the
    reload that followed changed limits and scopes without a word. Both are now problems,
    asked of the file's store in one bounded call."""
    import dataclasses

    from gateway.config import Argon2Config, Config, Plan
    from gateway.store import Store

    config = Config(plans={"free": Plan("free"), "enterprise": Plan("enterprise")},
                    default_plan="free", roles={"reader": ("people:read",)})
    config = dataclasses.replace(config, keys=dataclasses.replace(
        config.keys, argon2=Argon2Config(1, 8, 1)))
    store = await Store.connect(redis_url, config)
    try:
        await store.create_workspace("acme", "Acme", "enterprise")
        await store.create_workspace("small", "Small", "free")
        await store.create_key("acme", name="k", environment="live", role="reader")
    finally:
        await store.close()
    path = tmp_path / "keygate.yaml"
    path.write_text(f"store: {{redis_url: '{redis_url}'}}\n"
                    "plans: {free: {}}\ndefault_plan: free\n" + GOOD_CONFIG)
    code = await asyncio.to_thread(main, ["config", "check", str(path)])
    assert code == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert f"{path}:2: plans: plan 'enterprise'" in err and "1 workspace (acme)" in err
    assert f"{path}:1: roles: role 'reader'" in err and "1 key " in err
    path.write_text(f"store: {{redis_url: '{redis_url}'}}\nplans: {{free: {{}}, enterprise: "
                    "{}}\ndefault_plan: free\nroles: {reader: [people:read]}\n" + GOOD_CONFIG)
    assert await asyncio.to_thread(main, ["config", "check", str(path)]) == 0


def test_config_check_notes_a_store_it_cannot_ask_and_passes(tmp_path, capsys):
    path = tmp_path / "keygate.yaml"
    path.write_text("store: {redis_url: 'redis://127.0.0.1:1/0', timeout: 0.5}\n" + GOOD_CONFIG)
    assert main(["config", "check", str(path)]) == 0
    out, err = capsys.readouterr()
    assert out == f"ok: {path}\n"
    assert "note:" in err and "not checked" in err


def test_config_check_notes_an_embedded_store_it_cannot_look_at_and_passes(tmp_path, capsys,
                                                                          monkeypatch):
    """`config check` looks for the embedded store's socket in store.data_dir, which keygate
    creates mode 700 for the user that serves: checked by any other user, looking raised and
    the valid file got a traceback instead of `ok`. A store it cannot look at is a note like
    one that is not running. (A path the OS will not take is too long for the store's socket,
    a problem of its own: the test below.)"""
    import errno
    import pathlib
    data_dir = tmp_path / "data"
    exists = pathlib.Path.exists  # root reads any directory: the OS's answer to another user

    def denied(self, *args, **kwargs):
        if self.name == "redis.sock":
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return exists(self, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "exists", denied)
    path = tmp_path / "keygate.yaml"
    path.write_text(f"store: {{redis_url: embedded, data_dir: '{data_dir}'}}\n" + GOOD_CONFIG)
    assert main(["config", "check", str(path)]) == 0
    out, err = capsys.readouterr()
    assert out == f"ok: {path}\n"
    assert "note:" in err and "not checked" in err and "Traceback" not in err


@pytest.mark.parametrize("relative", [False, True])
def test_config_check_refuses_the_data_dir_serve_refuses(tmp_path, relative):
    """An embedded store whose store.data_dir is too long for its unix socket passed `config
    check` (ok, and a note that the store is not running), and the same file stopped `keygate
    serve` at once. The length is the file's (a relative data_dir is read from the current
    directory, as serve reads it): both refuse it now, with one message, `file:line: field:`."""
    deep = tmp_path / ("d" * 60) / ("e" * 40)
    deep.mkdir(parents=True)
    data_dir = "data" if relative else str(deep / "data")
    assert len(str(deep / "data" / "redis.sock")) > 103  # MAX_SOCKET_PATH
    path = tmp_path / "keygate.yaml"
    path.write_text(f"store:\n  data_dir: '{data_dir}'\n" + GOOD_CONFIG)
    said = []
    for argv in (["config", "check", str(path)], ["serve", "--config", str(path)]):
        done = subprocess.run([sys.executable, "-m", "gateway", *argv], capture_output=True,
                              text=True, timeout=60, cwd=str(deep))
        assert (done.returncode, done.stdout) == (1, ""), (argv, done)
        said.append(done.stderr)
    length = len(str(deep / "data" / "redis.sock"))
    expected = (f"{path}:2: store.data_dir: '{deep / 'data'}' is too long for a unix socket "
                f"({length} bytes for redis.sock, limit 103); choose a shorter store.data_dir\n")
    if relative:
        expected = (f"{path}:2: store.data_dir: 'data' is relative, read from the current "
                    f"directory ('{deep}'), as serve reads it from the directory it runs in: "
                    f"'{deep / 'data'}' is too long for a unix socket ({length} bytes for "
                    "redis.sock, limit 103); choose a shorter or an absolute store.data_dir, "
                    "or check the file from the directory serve runs in\n")
    assert said == [expected, expected]
    assert not (deep / "data").exists()  # nothing made on the way
    # any other store: data_dir is not used, and not a problem
    path.write_text(f"store:\n  redis_url: 'redis://127.0.0.1:1/0'\n  timeout: 0.5\n"
                    f"  data_dir: '{data_dir}'\n" + GOOD_CONFIG)
    done = subprocess.run([sys.executable, "-m", "gateway", "config", "check", str(path)],
                          capture_output=True, text=True, timeout=60, cwd=str(deep))
    assert done.returncode == 0, done


def test_a_relative_data_dir_says_which_directory_it_was_read_from(tmp_path):
    """config.example.yaml's store.data_dir is relative (.keygate-data): checked from a deep CI
    checkout, its socket path was too long and the problem named only the absolute path, while
    serve in the image (WORKDIR /var/lib/keygate) starts fine with the same file. The problem
    says the path was read from the current directory (named), that serve reads it from its
    own, and what to do; from a short directory the same file passes."""
    example = Path(__file__).resolve().parent.parent / "config.example.yaml"
    deep = tmp_path / ("c" * 50) / ("i" * 50)
    deep.mkdir(parents=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("KEYGATE_")}
    done = subprocess.run([sys.executable, "-m", "gateway", "config", "check", str(example)],
                          capture_output=True, text=True, timeout=60, cwd=str(deep), env=env)
    line = next(n for n, text in enumerate(example.read_text().splitlines(), 1)
                if text.strip().startswith("data_dir:"))
    socket = deep / ".keygate-data" / "redis.sock"
    assert (done.returncode, done.stdout) == (1, ""), done
    assert done.stderr == (
        f"{example}:{line}: store.data_dir: '.keygate-data' is relative, read from the current "
        f"directory ('{deep}'), as serve reads it from the directory it runs in: "
        f"'{socket.parent}' is too long for a unix socket ({len(str(socket))} bytes for "
        "redis.sock, limit 103); choose a shorter or an absolute store.data_dir, or check the "
        "file from the directory serve runs in\n")
    done = subprocess.run([sys.executable, "-m", "gateway", "config", "check", str(example)],
                          capture_output=True, text=True, timeout=60, cwd=str(tmp_path), env=env)
    assert (done.returncode, done.stdout) == (0, f"ok: {example}\n"), done


def test_a_relative_data_dir_from_a_directory_that_is_gone_is_a_problem(tmp_path,
                                                                        monkeypatch):
    """A relative data_dir is read from the current directory: one removed under the process
    (a CI step that deleted its scratch directory) made os.getcwd raise inside the loader, a
    traceback. It is a problem on store.data_dir."""
    from gateway.config import load_config
    from gateway.errors import ConfigError
    path = tmp_path / "keygate.yaml"
    path.write_text(GOOD_CONFIG + "store: {data_dir: data}\n")
    gone = tmp_path / "gone"
    gone.mkdir()
    monkeypatch.chdir(gone)
    gone.rmdir()
    with pytest.raises(ConfigError) as raised:
        load_config(str(path))
    assert raised.value.problems == [
        f"{path}:5: store.data_dir: 'data' is relative, read from the current directory, which "
        "no longer exists; choose an absolute store.data_dir, or run from an existing directory"]


@pytest.mark.parametrize("written, shown, why", [
    ("\\ud800", "\\ud800", "U+D800, which no file name in this file system's encoding "
                             f"({sys.getfilesystemencoding()}) can hold"),
    ("\\0", "\\x00", "a NUL character, which no path can hold"),
])
def test_a_data_dir_no_path_can_be_is_a_problem_not_a_traceback(tmp_path, written, shown, why):
    """store.data_dir is measured at load (the embedded store's socket path, os.fsencode of
    it). A data_dir holding a lone surrogate (YAML "\\ud800") made the loader itself die with
    UnicodeEncodeError: `config check` and `serve` printed a traceback instead of a file:line
    problem. One holding a NUL ("\\0") passed `config check`, and serve could not make it.
    Both are a problem on store.data_dir now, said with the character escaped."""
    path = tmp_path / "keygate.yaml"
    path.write_text(GOOD_CONFIG + f'store: {{data_dir: "/tmp/x{written}y"}}\n')
    expected = (f"{path}:5: store.data_dir: '/tmp/x{shown}y' cannot be a directory: it holds "
                f"{why}\n")
    for argv in (["config", "check", str(path)], ["serve", "--config", str(path)]):
        done = subprocess.run([sys.executable, "-m", "gateway", *argv], capture_output=True,
                              text=True, timeout=60, cwd=str(tmp_path),
                              env={**os.environ, "PYTHONIOENCODING": "utf-8"})
        assert (done.returncode, done.stdout, done.stderr) == (1, "", expected), argv
    from gateway.config import load_config
    from gateway.errors import ConfigError
    with pytest.raises(ConfigError) as raised:
        load_config(str(path))
    assert raised.value.problems == [expected.rstrip("\n")]


def test_python_dash_m_gateway_runs_the_cli(tmp_path):
    path = tmp_path / "keygate.yaml"
    path.write_text(GOOD_CONFIG)
    done = subprocess.run([sys.executable, "-m", "gateway", "config", "check", str(path)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"ok: {path}\n"


# --- live: every admin verb against a real admin API on real Redis --------------------------------

TOKEN_SHAPE = r"kg_(live|test)_[0-9A-Za-z]{50}"


@pytest.fixture
async def admin_url(redis_url, monkeypatch, request):
    """A real admin API on a loopback port; the CLI finds it through the environment.
    Parametrized indirectly, its parameter is the config's ``keys.environments``."""
    import dataclasses

    from aiohttp import web

    from gateway.config import Argon2Config, Config, Plan
    from gateway import admin
    from gateway.store import Store

    monkeypatch.setenv("KEYGATE_ADMIN_TOKEN", ADMIN_TOKEN)
    config = Config(plans={"free": Plan("free", monthly_requests=1000, max_keys=2),
                           "pro": Plan("pro")},
                    default_plan="free", roles={"reader": ("people:read",)})
    config = dataclasses.replace(config, keys=dataclasses.replace(
        config.keys, argon2=Argon2Config(1, 8, 1),
        environments=getattr(request, "param", config.keys.environments)))
    store = await Store.connect(redis_url, config)
    runner = web.AppRunner(admin.create_admin_app(config, store))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    url = f"http://127.0.0.1:{port}"
    monkeypatch.setenv("KEYGATE_ADMIN_URL", url)
    try:
        yield url
    finally:
        await runner.cleanup()
        await store.close()


class Run:
    def __init__(self, code: int, out: str, err: str) -> None:
        self.code, self.out, self.err = code, out, err

    def json(self):
        return json.loads(self.out)


@pytest.fixture
def keygate(capsys, monkeypatch):
    """``await keygate("keys", "list", ..., stdin="y\\n")`` → Run(code, out, err)."""
    async def run(*argv: str, stdin: str = "") -> Run:
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
        capsys.readouterr()
        code = await asyncio.to_thread(main, list(argv))
        out, err = capsys.readouterr()
        return Run(code, out, err)
    return run


async def make_workspace(keygate, ws: str = "acme", plan: str | None = None) -> None:
    argv = ["workspaces", "create", ws, "--name", ws.title() + " Corp"]
    if plan:
        argv += ["--plan", plan]
    assert (await keygate(*argv)).code == 0


async def make_key(keygate, ws: str = "acme", *extra: str) -> dict:
    run = await keygate("keys", "create", "--workspace", ws, "--name", "ci", "--json", *extra)
    assert run.code == 0, run.err
    return run.json()


async def test_workspaces_create_prints_the_workspace(admin_url, keygate):
    run = await keygate("workspaces", "create", "acme", "--name", "Acme Corp")
    assert run.code == 0, run.err
    assert "acme" in run.out and "Acme Corp" in run.out and "free" in run.out


async def test_workspaces_create_json_and_plan(admin_url, keygate):
    run = await keygate("workspaces", "create", "acme", "--name", "Acme", "--plan", "pro", "--json")
    assert run.code == 0, run.err
    body = run.json()
    assert (body["id"], body["name"], body["plan"]) == ("acme", "Acme", "pro")
    assert body["created_at"].endswith("Z")


async def test_workspaces_create_taken_id_is_a_conflict(admin_url, keygate):
    await make_workspace(keygate)
    run = await keygate("workspaces", "create", "acme", "--name", "Again")
    assert run.code == 1
    assert run.out == ""
    assert run.err.startswith("keygate: ") and run.err.rstrip().endswith("(conflict)")


async def test_workspaces_create_unknown_plan_is_a_bad_request(admin_url, keygate):
    run = await keygate("workspaces", "create", "acme", "--name", "Acme", "--plan", "platinum")
    assert run.code == 1
    assert "(bad_request)" in run.err


async def test_workspaces_create_bad_slug_is_a_bad_request(admin_url, keygate):
    run = await keygate("workspaces", "create", "Not A Slug", "--name", "x")
    assert run.code == 1
    assert "(bad_request)" in run.err


async def test_workspaces_list_table_and_json(admin_url, keygate):
    await make_workspace(keygate, "acme")
    await make_workspace(keygate, "globex", plan="pro")
    run = await keygate("workspaces", "list")
    assert run.code == 0, run.err
    header, *rows = run.out.strip().splitlines()
    assert header.split() == ["ID", "NAME", "PLAN", "CREATED"]
    assert sorted(row.split()[0] for row in rows) == ["acme", "globex"]
    assert any(row.split()[0] == "globex" and " pro " in row and "UTC" in row for row in rows)
    listed = (await keygate("workspaces", "list", "--json")).json()["items"]
    assert sorted(w["id"] for w in listed) == ["acme", "globex"]


async def test_workspaces_set_plan(admin_url, keygate):
    await make_workspace(keygate)
    run = await keygate("workspaces", "set-plan", "acme", "pro")
    assert run.code == 0, run.err
    assert "pro" in run.out
    listed = (await keygate("workspaces", "list", "--json")).json()["items"]
    assert listed[0]["plan"] == "pro"


async def test_workspaces_set_plan_unknown_workspace_is_not_found(admin_url, keygate):
    run = await keygate("workspaces", "set-plan", "nobody", "pro")
    assert run.code == 1
    assert "(not_found)" in run.err


async def test_workspaces_set_plan_unknown_plan_is_a_bad_request(admin_url, keygate):
    await make_workspace(keygate)
    run = await keygate("workspaces", "set-plan", "acme", "platinum")
    assert run.code == 1
    assert "(bad_request)" in run.err


async def test_wrong_admin_token_is_unauthorized_and_never_printed(admin_url, keygate, monkeypatch):
    monkeypatch.setenv("KEYGATE_ADMIN_TOKEN", "wrong-token-abcdef")
    run = await keygate("workspaces", "list")
    assert run.code == 1
    assert "(unauthorized)" in run.err
    assert "wrong-token-abcdef" not in run.err + run.out


async def test_a_wrong_admin_token_says_where_the_token_came_from(admin_url, keygate,
                                                                  monkeypatch):
    """A stale or mistyped KEYGATE_ADMIN_TOKEN got "The operator token is not valid." and
    nothing else: not which variable the token was read from, nor what to put there. The
    CLI now says both, naming the admin URL it asked (never the token)."""
    monkeypatch.setenv("KEYGATE_ADMIN_TOKEN", "wrong-token-abcdef")
    run = await keygate("workspaces", "list")
    assert run.code == 1
    hint = run.err.splitlines()[-1]
    assert "KEYGATE_ADMIN_TOKEN" in hint and os.environ["KEYGATE_ADMIN_URL"] in hint, run.err
    assert "wrong-token-abcdef" not in run.err + run.out
    run = await keygate("workspaces", "list", "--json")
    assert run.code == 1 and run.json()["error"]["code"] == "unauthorized"


async def test_the_proxy_listener_given_as_the_admin_url_is_named_as_such(redis_url, upstream,
                                                                          keygate, monkeypatch):
    """KEYGATE_ADMIN_URL pointed at the proxy listener (8080 for 8081, an easy slip) got
    "No route matches GET /admin/v1/workspaces. (no_route)": true of the proxy, and no help to
    someone who does not know which listener they reached. The admin listener never answers
    ``no_route``; the CLI now says the URL is the proxy listener and where the admin API is."""
    from harness import ADMIN_TOKEN, gateway_under_test, make_config
    monkeypatch.setenv("KEYGATE_ADMIN_TOKEN", ADMIN_TOKEN)
    async with gateway_under_test(make_config(str(upstream.make_url(""))), redis_url,
                                  monkeypatch) as g:
        proxy = str(g.proxy_server.make_url("")).rstrip("/")
        run = await keygate("--admin-url", proxy, "workspaces", "list")
        assert run.code == 1 and "(no_route)" in run.err
        hint = run.err.splitlines()[-1]
        assert proxy in hint and "proxy listener" in hint and "admin.port" in hint, run.err
        run = await keygate("--admin-url", proxy, "workspaces", "list", "--json")
        assert run.code == 1 and run.json()["error"]["code"] == "no_route"
    assert upstream.requests == []


async def test_missing_admin_token_hints_at_the_variable(admin_url, keygate, monkeypatch):
    monkeypatch.delenv("KEYGATE_ADMIN_TOKEN")
    run = await keygate("workspaces", "list")
    assert run.code == 1
    assert "KEYGATE_ADMIN_TOKEN" in run.err


async def test_keys_create_prints_the_token_once_with_a_warning(admin_url, keygate):
    import re
    await make_workspace(keygate)
    run = await keygate("keys", "create", "--workspace", "acme", "--name", "ci", "--role", "reader")
    assert run.code == 0, run.err
    token = run.out.strip()
    assert re.fullmatch(TOKEN_SHAPE, token)
    assert token.startswith("kg_live_")
    assert "cannot be shown again" in run.err
    assert token not in run.err
    listed = (await keygate("keys", "list", "--workspace", "acme", "--json")).json()["items"]
    assert listed[0]["id"] == token[8:20]
    assert listed[0]["role"] == "reader" and listed[0]["scopes"] == ["people:read"]


async def test_keys_create_json_holds_key_and_token(admin_url, keygate):
    await make_workspace(keygate)
    answer = await make_key(keygate, "acme", "--scope", "people:read", "people:write",
                            "--description", "nightly sync", "--env", "test",
                            "--rate-limit", "10/s")
    key = answer["key"]
    assert answer["token"].startswith("kg_test_")
    assert key["role"] is None
    assert sorted(key["scopes"]) == ["people:read", "people:write"]
    assert key["description"] == "nightly sync"
    assert key["environment"] == "test"
    assert key["rate_limit"] == "10/s"
    assert key["status"] == "active"


@pytest.mark.parametrize("admin_url", [("test", "live")], indirect=True)
async def test_keys_create_help_says_the_default_environment_is_the_gateways_first(
        admin_url, keygate):
    """`keys create --help` said "--env ENV  token environment, e.g. test (default: live)";
    a key created without --env is in the gateway's first `keys.environments`
    (docs/configuration.md), a `kg_test_` key with `[test, live]`."""
    await make_workspace(keygate)
    key = await make_key(keygate, "acme", "--scope", "people:read")
    assert key["token"].startswith("kg_test_"), key
    run = await keygate("keys", "create", "--help")
    assert run.code == 0, run.err
    help_text = " ".join(run.out.split())
    said = re.search(r"--env ENV ([^\[].*?)(?: --|$)", help_text).group(1)
    assert "live" not in said and "first environment" in said, said


async def test_keys_create_scope_can_repeat(admin_url, keygate):
    await make_workspace(keygate)
    key = (await make_key(keygate, "acme", "--scope", "a:read", "--scope", "b:read"))["key"]
    assert sorted(key["scopes"]) == ["a:read", "b:read"]


async def test_keys_create_expires_duration_and_date(admin_url, keygate):
    import time
    from gateway.models import parse_rfc3339
    await make_workspace(keygate, plan="pro")
    key = (await make_key(keygate, "acme", "--role", "reader", "--expires", "30d"))["key"]
    assert abs(parse_rfc3339(key["expires_at"]) - (time.time() + 30 * 86400)) < 120
    key = (await make_key(keygate, "acme", "--role", "reader", "--expires", "2099-01-31"))["key"]
    assert key["expires_at"] == "2099-01-31T00:00:00Z"


async def test_keys_create_in_unknown_workspace_is_not_found(admin_url, keygate):
    run = await keygate("keys", "create", "--workspace", "nobody", "--name", "x", "--role", "reader")
    assert run.code == 1
    assert "(not_found)" in run.err
    assert run.out == ""


async def test_keys_create_unknown_role_is_a_bad_request(admin_url, keygate):
    await make_workspace(keygate)
    run = await keygate("keys", "create", "--workspace", "acme", "--name", "x", "--role", "wizard")
    assert run.code == 1
    assert "(bad_request)" in run.err


async def test_keys_create_bad_rate_limit_is_bad_usage(admin_url, keygate):
    await make_workspace(keygate)
    run = await keygate("keys", "create", "--workspace", "acme", "--name", "x", "--role", "reader",
                        "--rate-limit", "fast")
    assert run.code == 2  # a malformed option, as --expires 1y is: no call made
    assert "argument --rate-limit: a rate limit looks like '5/s'" in run.err, run.err
    run = await keygate("--json", "keys", "list", "--workspace", "acme")
    assert run.json()["items"] == []


async def test_keys_create_over_the_plan_limit_is_refused(admin_url, keygate):
    await make_workspace(keygate)  # plan free: max_keys 2
    await make_key(keygate, "acme", "--role", "reader")
    await make_key(keygate, "acme", "--role", "reader")
    run = await keygate("keys", "create", "--workspace", "acme", "--name", "x", "--role", "reader")
    assert run.code == 1
    assert "(key_limit_reached)" in run.err


async def test_keys_list_table(admin_url, keygate):
    await make_workspace(keygate)
    role_key = (await make_key(keygate, "acme", "--role", "reader"))
    scoped = (await make_key(keygate, "acme", "--scope", "people:write", "--expires", "2099-01-31"))
    run = await keygate("keys", "list", "--workspace", "acme")
    assert run.code == 0, run.err
    lines = run.out.strip().splitlines()
    assert lines[0].split() == ["ID", "NAME", "ROLE/SCOPES", "CREATED", "LAST", "USED", "EXPIRES",
                                "STATUS"]
    by_id = {line.split()[0]: line for line in lines[1:]}
    assert set(by_id) == {role_key["key"]["id"], scoped["key"]["id"]}
    role_line = by_id[role_key["key"]["id"]]
    assert "role:reader" in role_line and role_line.rstrip().endswith("active")
    assert role_line.count(" - ") >= 2  # never used, never expires
    assert "people:write" in by_id[scoped["key"]["id"]]
    assert "2099-01-31 00:00 UTC" in by_id[scoped["key"]["id"]]
    for answer in (role_key, scoped):
        assert answer["token"] not in run.out


async def test_keys_list_json_never_holds_tokens(admin_url, keygate):
    await make_workspace(keygate)
    answer = await make_key(keygate, "acme", "--role", "reader")
    run = await keygate("keys", "list", "--workspace", "acme", "--json")
    assert run.code == 0
    assert answer["token"] not in run.out
    assert [k["id"] for k in run.json()["items"]] == [answer["key"]["id"]]


async def test_keys_list_status_filter(admin_url, keygate):
    await make_workspace(keygate)
    keep = (await make_key(keygate, "acme", "--role", "reader"))["key"]["id"]
    gone = (await make_key(keygate, "acme", "--role", "reader"))["key"]["id"]
    assert (await keygate("keys", "revoke", "--workspace", "acme", gone, "--yes")).code == 0
    active = (await keygate("keys", "list", "--workspace", "acme", "--status", "active", "--json"))
    revoked = (await keygate("keys", "list", "--workspace", "acme", "--status", "revoked", "--json"))
    assert [k["id"] for k in active.json()["items"]] == [keep]
    assert [k["id"] for k in revoked.json()["items"]] == [gone]


async def test_keys_list_unknown_workspace_is_not_found(admin_url, keygate):
    run = await keygate("keys", "list", "--workspace", "nobody")
    assert run.code == 1
    assert "(not_found)" in run.err


async def key_status(keygate, ws: str, key_id: str) -> str:
    listed = (await keygate("keys", "list", "--workspace", ws, "--json")).json()["items"]
    return {k["id"]: k["status"] for k in listed}[key_id]


async def test_keys_revoke_with_yes(admin_url, keygate):
    await make_workspace(keygate)
    key_id = (await make_key(keygate, "acme", "--role", "reader"))["key"]["id"]
    run = await keygate("keys", "revoke", "--workspace", "acme", key_id, "--yes")
    assert run.code == 0, run.err
    assert key_id in run.out
    assert await key_status(keygate, "acme", key_id) == "revoked"


@pytest.mark.parametrize("answer", ["y", "Y", "yes", "Yes", "YES"])
async def test_keys_revoke_asks_and_y_or_yes_confirms_as_docs_cli_md_says(admin_url, keygate,
                                                                         answer):
    """`y` or `yes`, in any case, confirms (what people type); docs/cli.md said "any answer
    but `y` ... leaves the key alone", so someone answering `yes` by that doc expected to keep
    a key that was then revoked for good. The doc names the answers that confirm."""
    doc = " ".join((Path(__file__).resolve().parent.parent / "docs" / "cli.md").read_text()
                   .split("### `keygate keys revoke`", 1)[1].split("###", 1)[0].split())
    assert "any answer but `y` or `yes` (in any case)" in doc, doc
    await make_workspace(keygate)
    key_id = (await make_key(keygate, "acme", "--role", "reader"))["key"]["id"]
    run = await keygate("keys", "revoke", "--workspace", "acme", key_id, stdin=answer + "\n")
    assert run.code == 0, run.err
    assert f"Revoke key {key_id} of workspace acme? This cannot be undone. [y/N]" in run.err
    assert await key_status(keygate, "acme", key_id) == "revoked"


@pytest.mark.parametrize("answer", ["n\n", "\n", "nope\n", "yess\n", "ye\n", "y es\n"])
async def test_keys_revoke_declined_is_not_an_api_error(admin_url, keygate, answer):
    """Saying no is not an API error (1), nor a success a script could act on (0): exit 2."""
    await make_workspace(keygate)
    key_id = (await make_key(keygate, "acme", "--role", "reader"))["key"]["id"]
    run = await keygate("keys", "revoke", "--workspace", "acme", key_id, stdin=answer)
    assert run.code == 2
    assert "aborted" in run.err and "not revoked" in run.err
    assert await key_status(keygate, "acme", key_id) == "active"


async def test_keys_revoke_without_an_answer_is_bad_usage(admin_url, keygate):
    """A script that forgot --yes (stdin at end of input) is told to pass it: exit 2."""
    await make_workspace(keygate)
    key_id = (await make_key(keygate, "acme", "--role", "reader"))["key"]["id"]
    run = await keygate("keys", "revoke", "--workspace", "acme", key_id, stdin="")
    assert run.code == 2
    assert "--yes" in run.err
    assert await key_status(keygate, "acme", key_id) == "active"


async def test_keys_revoke_unknown_key_is_not_found(admin_url, keygate):
    await make_workspace(keygate)
    run = await keygate("keys", "revoke", "--workspace", "acme", "AAAAAAAAAAAA", "--yes")
    assert run.code == 1
    assert "(not_found)" in run.err


async def test_keys_rotate_prints_a_new_token_and_revokes_the_old_key(admin_url, keygate):
    import re
    await make_workspace(keygate, plan="pro")
    old = await make_key(keygate, "acme", "--role", "reader")
    run = await keygate("keys", "rotate", "--workspace", "acme", old["key"]["id"])
    assert run.code == 0, run.err
    token = run.out.strip()
    assert re.fullmatch(TOKEN_SHAPE, token) and token != old["token"]
    assert "cannot be shown again" in run.err and token not in run.err
    assert await key_status(keygate, "acme", old["key"]["id"]) == "revoked"
    assert await key_status(keygate, "acme", token[8:20]) == "active"


async def test_keys_rotate_with_grace_keeps_the_old_key_for_a_while(admin_url, keygate):
    import time
    from gateway.models import parse_rfc3339
    await make_workspace(keygate, plan="pro")
    old_id = (await make_key(keygate, "acme", "--role", "reader"))["key"]["id"]
    run = await keygate("keys", "rotate", "--workspace", "acme", old_id, "--grace", "24h", "--json")
    assert run.code == 0, run.err
    new = run.json()
    assert new["key"]["role"] == "reader" and new["key"]["name"] == "ci"
    listed = {k["id"]: k for k in
              (await keygate("keys", "list", "--workspace", "acme", "--json")).json()["items"]}
    assert listed[old_id]["status"] == "active"
    assert abs(parse_rfc3339(listed[old_id]["expires_at"]) - (time.time() + 86400)) < 120


async def test_keys_rotate_says_when_the_old_key_stops_working(admin_url, keygate):
    """The grace never takes the old key past its own expiry: a key expiring in 1h rotated
    with --grace 24h stops in 1h, yet the CLI said it "keeps working for 86400s"."""
    await make_workspace(keygate, plan="pro")
    old = (await make_key(keygate, "acme", "--role", "reader", "--expires", "1h"))["key"]
    run = await keygate("keys", "rotate", "--workspace", "acme", old["id"], "--grace", "24h")
    assert run.code == 0, run.err
    shown = (await keygate("keys", "show", "--workspace", "acme", old["id"], "--json")).json()
    assert shown["expires_at"] == old["expires_at"]  # not a day from now
    from gateway.cli.output import human_time
    assert f"keeps working until {human_time(old['expires_at'])}" in run.err, run.err
    assert "86400" not in run.err


@pytest.mark.parametrize("encoding", ["ascii", "latin-1"])
async def test_names_the_terminal_cannot_show_are_escaped_not_a_traceback(admin_url, keygate,
                                                                         encoding):
    """A workspace or key name outside the terminal's character set (a Latin-1 terminal, a
    Windows console, PYTHONIOENCODING) ended `workspaces list` in a UnicodeEncodeError
    traceback, exit 1; after a create, with the change made."""
    assert (await keygate("workspaces", "create", "nihon", "--name", "日本 Ünïcode")).code == 0
    environ = dict(os.environ, PYTHONIOENCODING=encoding, KEYGATE_ADMIN_URL=admin_url,
                   KEYGATE_ADMIN_TOKEN=ADMIN_TOKEN)
    for argv in (["workspaces", "list"], ["workspaces", "show", "nihon"],
                 ["workspaces", "create", "other", "--name", "Ω"]):
        done = await asyncio.to_thread(
            subprocess.run, [sys.executable, "-m", "gateway", *argv], capture_output=True,
            timeout=60, env=environ)
        assert b"Traceback" not in done.stderr, done.stderr
        assert done.returncode == 0, done.stderr
        assert b"nihon" in done.stdout or b"other" in done.stdout


async def test_output_closed_early_is_one_line_not_a_traceback(admin_url, keygate):
    """`keygate keys list ... | head` with more output than the pipe holds: the reader has
    gone when the CLI writes. That was a BrokenPipeError traceback (and a second one at exit,
    "Exception ignored ... BrokenPipeError"); now one line on stderr and exit 1."""
    await make_workspace(keygate)
    environ = dict(os.environ, KEYGATE_ADMIN_URL=admin_url, KEYGATE_ADMIN_TOKEN=ADMIN_TOKEN)
    for argv in (["workspaces", "list"], ["workspaces", "list", "--json"]):
        read_end, write_end = os.pipe()
        os.close(read_end)  # the reader is gone before anything is written
        try:
            done = await asyncio.to_thread(
                subprocess.run, [sys.executable, "-m", "gateway", *argv], stdout=write_end,
                stderr=subprocess.PIPE, timeout=60, env=environ)
        finally:
            os.close(write_end)
        assert b"Traceback" not in done.stderr and b"Exception ignored" not in done.stderr, \
            done.stderr
        assert done.returncode == 1
        assert done.stderr.decode().strip().startswith("keygate: ")


async def test_keys_rotate_unknown_key_is_not_found(admin_url, keygate):
    await make_workspace(keygate)
    run = await keygate("keys", "rotate", "--workspace", "acme", "AAAAAAAAAAAA")
    assert run.code == 1
    assert "(not_found)" in run.err
    assert run.out == ""


async def test_usage_line(admin_url, keygate):
    import re
    await make_workspace(keygate)
    run = await keygate("usage", "--workspace", "acme")
    assert run.code == 0, run.err
    assert re.fullmatch(r"acme  \d{4}-\d{2}  used 0 / 1000  \(1000 remaining, resets "
                        r"\d{4}-\d{2}-01T00:00:00Z\)\n", run.out)


async def test_usage_unlimited_and_json(admin_url, keygate):
    await make_workspace(keygate, plan="pro")
    run = await keygate("usage", "--workspace", "acme")
    assert run.code == 0, run.err
    assert "used 0 / unlimited" in run.out
    body = (await keygate("usage", "--workspace", "acme", "--json")).json()
    assert body["workspace"] == "acme" and body["limit"] is None and body["remaining"] is None


async def test_usage_unknown_workspace_is_not_found(admin_url, keygate):
    run = await keygate("usage", "--workspace", "nobody")
    assert run.code == 1
    assert "(not_found)" in run.err


# --- transport edges: timeouts, redirects, non-JSON errors, proxies -------------------------------


async def test_json_option_before_the_verb_is_honoured(admin_url, keygate):
    await make_workspace(keygate)
    run = await keygate("--json", "workspaces", "list")
    assert run.code == 0, run.err
    assert [w["id"] for w in run.json()["items"]] == ["acme"]


async def test_environment_proxy_is_not_used_for_the_admin_api(admin_url, keygate, monkeypatch):
    for name in ("http_proxy", "HTTP_PROXY"):
        monkeypatch.setenv(name, f"http://127.0.0.1:{free_port()}")
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    assert (await keygate("workspaces", "list")).code == 0


async def test_silent_admin_api_times_out_with_exit_1(keygate, monkeypatch):
    monkeypatch.setenv("KEYGATE_ADMIN_TOKEN", ADMIN_TOKEN)
    with socket.socket() as listener:  # accepts connections (backlog) but never answers
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        url = f"http://127.0.0.1:{listener.getsockname()[1]}"
        run = await keygate("workspaces", "list", "--admin-url", url, "--timeout", "0.3")
    assert run.code == 1
    assert run.err == f"keygate: the admin API at {url} did not answer within 0.3s\n"


async def test_redirect_is_refused_and_the_token_not_forwarded(aiohttp_server, keygate, monkeypatch):
    from aiohttp import web
    seen_auth: list[str | None] = []

    async def elsewhere(request: web.Request) -> web.Response:
        seen_auth.append(request.headers.get("Authorization"))
        return web.json_response({"items": []})

    async def redirect(request: web.Request) -> web.Response:
        raise web.HTTPTemporaryRedirect("/elsewhere")

    app = web.Application()
    app.router.add_get("/admin/v1/workspaces", redirect)
    app.router.add_get("/elsewhere", elsewhere)
    server = await aiohttp_server(app)
    monkeypatch.setenv("KEYGATE_ADMIN_TOKEN", ADMIN_TOKEN)
    run = await keygate("workspaces", "list", "--admin-url", str(server.make_url("")))
    assert run.code == 1
    assert "redirect" in run.err
    assert seen_auth == []


async def test_non_json_error_answer_is_reported_with_its_status(aiohttp_server, keygate):
    from aiohttp import web

    async def broken(request: web.Request) -> web.Response:
        return web.Response(status=502, text="<html>bad gateway</html>")

    app = web.Application()
    app.router.add_get("/admin/v1/workspaces", broken)
    server = await aiohttp_server(app)
    run = await keygate("workspaces", "list", "--admin-url", str(server.make_url("")))
    assert run.code == 1
    assert run.err.startswith("keygate: the admin API at ")
    assert "HTTP 502" in run.err and "<html>" not in run.err


async def test_an_error_answer_never_writes_terminal_controls(aiohttp_server, keygate):
    """The API's error message and code were printed as they came: an admin URL that is not
    keygate's (a typo, a hostile host) could send ESC sequences that retitle the terminal, hide
    text or, on some emulators, write to the clipboard. Controls are shown escaped."""
    from aiohttp import web

    async def hostile(request: web.Request) -> web.Response:
        return web.json_response({"error": {"code": "bad\x1b[2J", "message":
                                            "nope\x1b]52;c;cHduZWQ=\x07\r\x9b31m"}},
                                 status=400)

    async def listing(request: web.Request) -> web.Response:
        return web.json_response({"id": "acme", "name": "Acme\x1b]0;owned\x07", "plan": "free",
                                  "created_at": "2026-01-01T00:00:00Z"})

    app = web.Application()
    app.router.add_get("/admin/v1/workspaces", hostile)
    app.router.add_get("/admin/v1/workspaces/acme", listing)
    server = await aiohttp_server(app)
    run = await keygate("workspaces", "list", "--admin-url", str(server.make_url("")))
    assert run.code == 1
    assert not any(c in run.err for c in "\x1b\x07\r\x9b"), repr(run.err)
    assert "nope" in run.err and "\\x1b" in run.err
    run = await keygate("workspaces", "show", "acme", "--admin-url", str(server.make_url("")))
    assert run.code == 0, run.err
    assert "Acme" in run.out and not any(c in run.out for c in "\x1b\x07"), repr(run.out)


ESC = "\x1b]0;owned\x07\x1b[2J"


def _hostile_keys_app(token: str):
    """An admin URL that is not keygate's, answering keys create/rotate with ESC sequences in
    the key's id, name, workspace and expires_at, and ``token`` as the token."""
    from aiohttp import web
    key = {"id": "abcdefabcdef" + ESC, "workspace": "acme" + ESC, "name": "ci" + ESC,
           "expires_at": "soon" + ESC, "rate_limit": "10/s" + ESC}

    async def created(request: web.Request) -> web.Response:
        return web.json_response({"key": key, "token": token}, status=201)

    async def read(request: web.Request) -> web.Response:
        return web.json_response(key)

    app = web.Application()
    app.router.add_post("/admin/v1/workspaces/acme/keys", created)
    app.router.add_post("/admin/v1/workspaces/acme/keys/abcdefabcdef/rotate", created)
    app.router.add_get("/admin/v1/workspaces/acme/keys/abcdefabcdef", read)
    return app


ROTATE = ("keys", "rotate", "--workspace", "acme", "abcdefabcdef", "--grace", "1h")
CREATE = ("keys", "create", "--workspace", "acme", "--name", "ci", "--scope", "a:b")


async def test_created_and_rotated_key_lines_never_write_terminal_controls(
        aiohttp_server, keygate, monkeypatch):
    """print_new_token wrote the key's id, name and workspace (stderr) as the API sent them,
    and `keys rotate --grace` the old key's expires_at (human_time returns an unparsable
    value as is): only show() and ApiError were escaped, so a hostile --admin-url still
    retitled or cleared the terminal through `keys create` and `keys rotate`, the commands
    an operator runs most. Every value the API sent is escaped in human output."""
    monkeypatch.setenv("KEYGATE_ADMIN_TOKEN", "x" * 32)
    server = await aiohttp_server(_hostile_keys_app("kg_live_" + "A" * 44))
    url = str(server.make_url(""))
    for argv in (CREATE, ROTATE):
        run = await keygate(*argv, "--admin-url", url)
        assert run.code == 0, run.err
        assert not any(c in run.err + run.out for c in "\x1b\x07"), (argv, run.err, run.out)
        assert run.out == "kg_live_" + "A" * 44 + "\n"
        assert "\\x1b" in run.err and "(ci\\x1b]0;owned" in run.err, run.err
    assert "keeps working until soon\\x1b" in run.err, run.err


async def test_a_token_holding_a_control_character_is_never_printed(
        aiohttp_server, keygate, monkeypatch):
    """The token itself is not escaped but refused: a keygate token never holds a control
    (or invisible) character, and an escaped one stored in a secret manager is a wrong
    token. Exit 1, a clear message, nothing on stdout."""
    monkeypatch.setenv("KEYGATE_ADMIN_TOKEN", "x" * 32)
    for token in ("kg_live_x" + ESC, "kg_live_x\u200b" + "A" * 43, "kg_live_x\n"):
        server = await aiohttp_server(_hostile_keys_app(token))
        for argv in (CREATE, ROTATE):
            run = await keygate(*argv, "--admin-url", str(server.make_url("")))
            assert run.code == 1 and run.out == "", (argv, run)
            assert not any(c in run.err for c in "\x1b\x07\u200b"), run.err
            assert "answered with a token holding a control or invisible character, which a " \
                "keygate token never holds; it is not printed" in run.err, run.err
            assert "only time the token is shown" not in run.err


def test_serve_refuses_to_start_on_a_bad_config(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("server:\n  port: lots\n")
    assert main(["serve", "--config", str(path)]) == 1
    assert "server.port" in capsys.readouterr().err


def test_serve_reads_keygate_config_from_the_environment(tmp_path, capsys, monkeypatch):
    path = tmp_path / "env-bad.yaml"
    path.write_text("admin:\n  port: -1\n")
    monkeypatch.setenv("KEYGATE_CONFIG", str(path))
    assert main(["serve"]) == 1
    assert "env-bad.yaml" in capsys.readouterr().err


@pytest.mark.parametrize("token", ["op-secret-XYZ\r", "op-secret-XYZ\nevil: 1", "op-secret-XYZ\u2019"])
def test_an_unsendable_operator_token_is_never_printed(token, capsys, monkeypatch):
    """http.client refuses a header value with CR/LF with ValueError('Invalid header value
    'Bearer <token>''): the traceback printed the operator token (a token file saved with CRLF
    leaves a '\\r' in $(cat file))."""
    from gateway.cli import main
    monkeypatch.setenv("KEYGATE_ADMIN_TOKEN", token)
    try:
        code = main(["workspaces", "list", "--admin-url", "http://127.0.0.1:9"])
    except Exception as exc:  # an escaping exception is printed with its message
        code, text = None, repr(exc)
    else:
        text = ""
    captured = capsys.readouterr()
    assert "op-secret-XYZ" not in captured.err + captured.out + text
    assert code == 1


# --- show / update / roles / audit / --json bodies / --config ----------------------------------

async def test_workspaces_show(admin_url, keygate):
    await make_workspace(keygate, "acme", plan="pro")
    run = await keygate("workspaces", "show", "acme")
    assert run.code == 0, run.err
    fields = dict(line.split(None, 1) for line in run.out.strip().splitlines())
    assert fields["id"] == "acme" and fields["plan"] == "pro" and fields["name"] == "Acme Corp"
    assert (await keygate("workspaces", "show", "acme", "--json")).json()["plan"] == "pro"
    missing = await keygate("workspaces", "show", "nobody")
    assert missing.code == 1 and "(not_found)" in missing.err


async def test_workspaces_rename(admin_url, keygate):
    await make_workspace(keygate)
    assert (await keygate("workspaces", "rename", "acme", "--name", "Acme 2")).code == 0
    assert (await keygate("workspaces", "show", "acme", "--json")).json()["name"] == "Acme 2"


async def test_keys_show_never_prints_the_token(admin_url, keygate):
    await make_workspace(keygate)
    answer = await make_key(keygate, "acme", "--role", "reader", "--description", "nightly")
    key_id = answer["key"]["id"]
    run = await keygate("keys", "show", "--workspace", "acme", key_id)
    assert run.code == 0, run.err
    assert answer["token"] not in run.out + run.err
    fields = dict(line.split(None, 1) for line in run.out.strip().splitlines())
    assert fields["id"] == key_id and fields["role"] == "reader"
    assert fields["description"] == "nightly" and fields["status"] == "active"
    assert fields["scopes"] == "people:read" and fields["expires_at"] == "-"
    body = (await keygate("keys", "show", "--workspace", "acme", key_id, "--json")).json()
    assert body == answer["key"]


async def test_keys_update_rebinds_renames_and_dates_a_key(admin_url, keygate):
    await make_workspace(keygate)
    key_id = (await make_key(keygate, "acme", "--role", "reader"))["key"]["id"]
    run = await keygate("keys", "update", "--workspace", "acme", key_id, "--name", "renamed",
                        "--scope", "people:write", "--scope", "companies:read",
                        "--expires", "2099-01-31", "--json")
    assert run.code == 0, run.err
    key = run.json()
    assert key["name"] == "renamed" and key["role"] is None
    assert key["scopes"] == ["people:write", "companies:read"]
    assert key["expires_at"] == "2099-01-31T00:00:00Z"
    cleared = (await keygate("keys", "update", "--workspace", "acme", key_id, "--no-expiry",
                             "--json")).json()
    assert cleared["expires_at"] is None
    relative = (await keygate("keys", "update", "--workspace", "acme", key_id, "--expires", "1d",
                              "--json")).json()
    assert relative["expires_at"] is not None


async def test_keys_update_expires_duration_counts_from_the_servers_clock(admin_url, keygate):
    """``keys update --expires 30d`` re-dated the key 30 days from the CLI machine's own
    clock (PATCH takes ``expires_at`` only): a laptop whose clock was 10 days behind set the
    key to expire 10 days early. It now counts from the admin API's clock (``keys create``
    sends ``expires_in``, which the API counts itself). The CLI runs as its own process here,
    with a wall clock 10 days behind (tests/clock_skew)."""
    import time
    from gateway.models import parse_rfc3339
    from served import skewed_clock
    await make_workspace(keygate)
    key_id = (await make_key(keygate, "acme", "--role", "reader"))["key"]["id"]
    env = {**os.environ, **skewed_clock(-10 * 86400)}
    for argv in (["keys", "update", "--workspace", "acme", key_id, "--expires", "30d"],
                 ["keys", "create", "--workspace", "acme", "--name", "skewed", "--role",
                  "reader", "--expires", "30d"]):
        done = await asyncio.to_thread(
            subprocess.run, [sys.executable, "-m", "gateway", *argv, "--json"],
            env=env, capture_output=True, timeout=60)
        assert done.returncode == 0, done.stderr
        answer = json.loads(done.stdout)
        expires_at = parse_rfc3339(answer.get("key", answer)["expires_at"])
        assert abs(expires_at - (time.time() + 30 * 86400)) < 120, (argv, answer)


async def test_keys_update_with_nothing_to_change_is_bad_usage(admin_url, keygate):
    run = await keygate("keys", "update", "--workspace", "acme", "AAAAAAAAAAAA")
    assert run.code == 2
    assert "nothing to change" in run.err


async def test_roles_set_list_and_delete(admin_url, keygate):
    await make_workspace(keygate)
    run = await keygate("roles", "set", "--workspace", "acme", "auditor", "--scope", "audit:read")
    assert run.code == 0, run.err
    listed = await keygate("roles", "list", "--workspace", "acme")
    header, *rows = listed.out.strip().splitlines()
    assert header.split() == ["NAME", "SOURCE", "SCOPES"]
    by_name = {row.split()[0]: row.split()[1:] for row in rows}
    assert by_name["auditor"] == ["workspace", "audit:read"]
    assert by_name["reader"] == ["config", "people:read"]
    body = (await keygate("roles", "list", "--workspace", "acme", "--json")).json()
    assert {r["name"] for r in body["items"]} == {"auditor", "reader"}
    assert (await keygate("roles", "delete", "--workspace", "acme", "auditor")).code == 0
    body = (await keygate("roles", "list", "--workspace", "acme", "--json")).json()
    assert {r["name"] for r in body["items"]} == {"reader"}


async def test_roles_delete_of_a_role_keys_use_says_why_and_what_to_do(admin_url, keygate):
    """The API refuses to delete a role keys still use (409); the CLI passes its message on:
    exit 1, how many keys and what to do on stderr, the error body with --json."""
    await make_workspace(keygate)
    assert (await keygate("roles", "set", "--workspace", "acme", "auditor", "--scope",
                          "audit:read")).code == 0
    key_id = (await make_key(keygate, "acme", "--role", "auditor"))["key"]["id"]
    run = await keygate("roles", "delete", "--workspace", "acme", "auditor")
    assert run.code == 1 and run.out == ""
    assert "(conflict)" in run.err and "1 key " in run.err and "re-role" in run.err
    as_json = await keygate("roles", "delete", "--workspace", "acme", "auditor", "--json")
    assert as_json.code == 1 and as_json.json()["error"]["code"] == "conflict"
    assert (await keygate("keys", "update", "--workspace", "acme", key_id, "--role",
                          "reader")).code == 0
    assert (await keygate("roles", "delete", "--workspace", "acme", "auditor")).code == 0

async def test_audit_lists_lifecycle_events_newest_first(admin_url, keygate):
    await make_workspace(keygate)
    key_id = (await make_key(keygate, "acme", "--role", "reader"))["key"]["id"]
    assert (await keygate("keys", "revoke", "--workspace", "acme", key_id, "--yes")).code == 0
    run = await keygate("audit", "--workspace", "acme")
    assert run.code == 0, run.err
    header, *rows = run.out.strip().splitlines()
    assert header.split() == ["AT", "ACTOR", "ACTION", "TARGET", "DETAILS"]
    assert "operator" in rows[0] and key_id in rows[0]
    body = (await keygate("audit", "--workspace", "acme", "--limit", "1", "--json")).json()
    assert len(body["items"]) == 1 and body["items"][0]["target"] == key_id


async def test_the_audit_docs_and_help_name_every_kind_of_event_it_lists(admin_url, keygate):
    """docs/cli.md said `keygate audit` lists "key and role lifecycle events" and its --help
    "key lifecycle events", while it also lists the workspace's own (its creation, a plan or
    limits change): an operator looking for who moved a workspace to another plan was told
    the audit does not hold it."""
    from pathlib import Path
    await make_workspace(keygate)
    assert (await keygate("workspaces", "set-plan", "acme", "pro")).code == 0
    assert (await keygate("roles", "set", "--workspace", "acme", "ops", "--scope",
                          "people:read")).code == 0
    await make_key(keygate, "acme", "--role", "ops")
    body = (await keygate("audit", "--workspace", "acme", "--json")).json()
    kinds = {item["action"].split(".")[0] for item in body["items"]}
    assert kinds == {"workspace", "role", "key"}, kinds
    docs = (Path(__file__).resolve().parent.parent / "docs" / "cli.md").read_text()
    section = " ".join(docs.split("### `keygate audit`", 1)[1].split("\n#", 1)[0].split())
    run = await keygate("audit", "--help")
    described = " ".join(run.out.split("\n\n")[1].split())  # the line under the usage
    # the workspace's own events are its creation and its plan, limits or name changes
    for word in ("key", "role", "plan"):
        assert word in section, (word, section)
        assert word in described, (word, described)


async def test_json_listings_are_the_api_body_as_is(admin_url, keygate):
    import urllib.request
    await make_workspace(keygate)
    await make_key(keygate, "acme", "--role", "reader")
    run = await keygate("keys", "list", "--workspace", "acme", "--json")
    request = urllib.request.Request(admin_url + "/admin/v1/workspaces/acme/keys",
                                     headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    api = await asyncio.to_thread(lambda: urllib.request.urlopen(request).read())
    assert json.loads(run.out) == json.loads(api)
    assert list(run.json()) == ["items"]


async def test_json_errors_print_the_error_body_on_stdout_and_exit_1(admin_url, keygate):
    run = await keygate("keys", "list", "--workspace", "nobody", "--json")
    assert run.code == 1
    error = run.json()["error"]
    assert error["code"] == "not_found" and error["request_id"]
    assert "(not_found)" in run.err


async def test_config_gives_the_admin_url_and_token(admin_url, keygate, tmp_path, monkeypatch):
    """--config PATH: the admin listener's address and the token from its token_env."""
    port = int(admin_url.rsplit(":", 1)[1])
    path = tmp_path / "gw.yaml"
    path.write_text(GOOD_CONFIG + f"admin:\n  host: 0.0.0.0\n  port: {port}\n"
                                  "  token_env: MY_OPERATOR_TOKEN\n")
    monkeypatch.delenv("KEYGATE_ADMIN_URL")
    monkeypatch.delenv("KEYGATE_ADMIN_TOKEN")
    monkeypatch.setenv("MY_OPERATOR_TOKEN", ADMIN_TOKEN)
    await make_workspace_with(keygate, "--config", str(path))
    run = await keygate("workspaces", "list", "--config", str(path), "--json")
    assert run.code == 0, run.err
    assert [w["id"] for w in run.json()["items"]] == ["acme"]
    before = await keygate("--config", str(path), "workspaces", "list")  # before the verb too
    assert before.code == 0, before.err


async def make_workspace_with(keygate, *options: str) -> None:
    run = await keygate("workspaces", "create", "acme", "--name", "Acme", *options)
    assert run.code == 0, run.err


def test_a_bad_config_for_the_admin_url_is_exit_1_naming_the_problem(tmp_path, capsys):
    path = tmp_path / "gw.yaml"
    path.write_text("admin:\n  port: nope\n")
    assert main(["workspaces", "list", "--config", str(path)]) == 1
    assert "admin.port" in capsys.readouterr().err


def test_an_admin_problem_in_a_file_with_others_names_its_own_line(tmp_path, capsys):
    """With problems elsewhere in the file the CLI read the admin section from a copy of it
    written out alone, and named that copy's line: `gw.yaml:2: admin.port` for a port on
    line 5. The section is read where it is, so the line is the file's."""
    path = tmp_path / "gw.yaml"
    path.write_text("routes: nope\nstore: {redis_url: '${UNSET_FOR_THIS_TEST}'}\n\n"
                    "admin:\n  port: nope\n")
    assert main(["workspaces", "list", "--config", str(path)]) == 1
    err = capsys.readouterr().err
    assert f"{path}:5: admin.port: " in err, err
    assert "routes" not in err and "UNSET_FOR_THIS_TEST" not in err, err


def test_a_duplicate_key_outside_admin_does_not_refuse_the_config(tmp_path, capsys):
    """docs/cli.md, `--config PATH`: only its `admin` section is read and has to be valid (a
    file a reload is about to refuse must still find the admin listener). Two top-level
    `routes:` blocks (an editor's copy-paste: the very file an operator is fixing) made every
    remote command refuse the file, `FILE:3: routes: duplicate key`, exit 1, and never reach
    the admin API: the top level was read with every key's duplicates recorded. Only a
    duplicate `admin` is a problem there now."""
    port = free_port()  # nobody listens: reaching the admin API is "cannot reach"
    path = tmp_path / "gw.yaml"
    path.write_text(f"admin: {{host: 127.0.0.1, port: {port}}}\nroutes: []\nroutes: []\n"
                    "[a, b]: c\n")
    assert main(["--config", str(path), "workspaces", "list"]) == 1
    err = capsys.readouterr().err
    assert "duplicate key" not in err and "routes" not in err, err
    assert "cannot reach the admin API" in err and f"127.0.0.1:{port}" in err, err
    path.write_text(f"admin: {{host: 127.0.0.1, port: {port}}}\nroutes: []\n"
                    "admin: {host: 127.0.0.1, port: 9}\n")
    assert main(["--config", str(path), "workspaces", "list"]) == 1
    assert capsys.readouterr().err == (
        f"keygate: {path}:3: admin: duplicate key (first given on line 1)\n")


def test_the_cli_reference_describes_every_command_and_option():
    """docs/cli.md has a section per command, naming each of its options."""
    import argparse
    from pathlib import Path
    from gateway.cli import build_parser
    text = (Path(__file__).resolve().parent.parent / "docs" / "cli.md").read_text()
    parser = build_parser()

    def walk(p: argparse.ArgumentParser, path: list[str]):
        subs = [a for a in p._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs and path:
            yield path, p
        for action in subs:
            for name, sub in action.choices.items():
                yield from walk(sub, path + [name])

    shared = {"--admin-url", "--config", "--timeout", "--json", "--help", "-h"}
    for path, sub in walk(parser, []):
        heading = f"### `keygate {' '.join(path)}`"
        assert heading in text, heading
        section = text.split(heading, 1)[1].split("\n### ", 1)[0].split("\n## ", 1)[0]
        for action in sub._actions:
            for option in action.option_strings:
                if option.startswith("--") and option not in shared:
                    assert option in section, (path, option)
    for option in shared - {"--help", "-h"}:
        assert f"`{option}" in text


async def test_reload_through_the_cli_with_the_servers_own_config(tmp_path, redis_url,
                                                                  keygate, monkeypatch):
    """keygate reload --config FILE: the URL and token come from the file the gateway runs
    with; a file with problems changes nothing, and the problems are printed one per line."""
    import yaml
    from served import ADMIN_TOKEN as SERVE_TOKEN, Served, write_config
    config, pport, aport = write_config(tmp_path, redis_url=redis_url)
    monkeypatch.delenv("KEYGATE_ADMIN_URL", raising=False)
    monkeypatch.setenv("KEYGATE_ADMIN_TOKEN", SERVE_TOKEN)
    gw = Served(config, pport, aport)
    try:
        await gw.ready()
        run = await keygate("reload", "--config", str(config))
        assert run.code == 0, run.err
        assert run.out.startswith(f"reloaded {config}")
        doc = yaml.safe_load(config.read_text())
        doc["routes"][0]["upstream"] = "nowhere"
        config.write_text(yaml.safe_dump(doc))
        run = await keygate("reload", "--config", str(config))
        assert run.code == 1
        assert "routes[0].upstream: unknown upstream 'nowhere'" in run.err
        assert "(bad_request)" in run.err
        run = await keygate("reload", "--admin-url", gw.admin, "--json")
        assert run.code == 1 and run.json()["error"]["problems"]
    finally:
        assert gw.terminate() == 0
        gw.close()


async def test_reload_after_an_edit_of_the_admin_listener_needs_the_running_url(
        tmp_path, redis_url, keygate, monkeypatch):
    """docs/operations.md's reload step, `keygate reload --config FILE`, takes the admin URL
    from the edited file. An edit that moves the admin listener (a restart setting) sent the
    CLI to the new port, where nothing listens yet: the documented step failed and the guide
    did not say what to do. The guide now says to name the running listener with
    --admin-url, which reloads and names admin.port as needing a restart."""
    import yaml
    from pathlib import Path

    from conftest import free_port
    from served import ADMIN_TOKEN as SERVE_TOKEN, Served, write_config
    config, pport, aport = write_config(tmp_path, redis_url=redis_url)
    monkeypatch.delenv("KEYGATE_ADMIN_URL", raising=False)
    monkeypatch.setenv("KEYGATE_ADMIN_TOKEN", SERVE_TOKEN)
    gw = Served(config, pport, aport)
    try:
        await gw.ready()
        doc = yaml.safe_load(config.read_text())
        doc["admin"]["port"] = free_port()
        config.write_text(yaml.safe_dump(doc))
        run = await keygate("reload", "--config", str(config))
        assert run.code == 1 and "cannot reach the admin API" in run.err
        run = await keygate("reload", "--admin-url", gw.admin, "--json")
        assert run.code == 0, run.err
        assert run.json()["restart_required"] == ["admin.port"]
    finally:
        assert gw.terminate() == 0
        gw.close()
    guide = (Path(__file__).resolve().parent.parent / "docs" / "operations.md").read_text()
    section = " ".join(guide.split("## Changing the config", 1)[1].split("\n## ", 1)[0].split())
    assert "--admin-url" in section, section


def _readme_commands(heading: str, at_least: int, page: str = "README.md") -> list[str]:
    """The ``keygate ...`` lines of a page's sh block under ``## heading`` or ``### heading``
    (comments cut)."""
    import re
    from pathlib import Path
    readme = (Path(__file__).resolve().parent.parent / page).read_text()
    block = re.search(rf"##+ {heading}\n.*?```sh\n(.*?)```", readme, re.S).group(1)
    lines = [line.split("#", 1)[0].strip() for line in block.splitlines()]
    lines = [line for line in lines if line.startswith("keygate ")]
    assert len(lines) >= at_least, block
    return lines


@contextlib.asynccontextmanager
async def _admin_on_the_example_config(redis_url, monkeypatch):
    """An admin API running config.example.yaml (the config README's "Serving" section
    starts), with the CLI's environment pointed at it."""
    from pathlib import Path

    from aiohttp import web

    from gateway import admin
    from gateway.config import load_config
    from gateway.store import Store

    monkeypatch.setenv("KEYGATE_ADMIN_TOKEN", ADMIN_TOKEN)
    config = load_config(str(Path(__file__).resolve().parent.parent / "config.example.yaml"))
    store = await Store.connect(redis_url, config)
    runner = web.AppRunner(admin.create_admin_app(config, store))
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    monkeypatch.setenv("KEYGATE_ADMIN_URL", f"http://127.0.0.1:{runner.addresses[0][1]}")
    try:
        yield
    finally:
        await runner.cleanup()
        await store.close()


async def test_the_readmes_managing_keys_commands_work_against_the_example_config(
        redis_url, keygate, monkeypatch):
    """README's "Managing keys" block, line by line, against an admin API running
    config.example.yaml (the config its "Serving" section starts): each command succeeds."""
    import shlex
    lines = _readme_commands("Managing keys", 8)
    key_id = None
    async with _admin_on_the_example_config(redis_url, monkeypatch):
        for line in lines:
            argv = shlex.split(line)[1:]
            if "<id>" in argv:
                argv[argv.index("<id>")] = key_id
            run = await keygate(*argv, stdin="y\n")
            assert run.code == 0, (line, run.out, run.err)
            if argv[:2] == ["keys", "create"]:
                listing = await keygate("keys", "list", "--workspace", "acme", "--json")
                key_id = listing.json()["items"][0]["id"]


async def test_the_readmes_key_controls_commands_work_against_the_example_config(
        redis_url, keygate, monkeypatch):
    """README's "Key controls" block, line by line, against an admin API running
    config.example.yaml: each command succeeds as written (`[--daily --days 14]` taken with
    its options; the key is revoked before `keys delete`, which takes revoked keys only)."""
    import shlex
    lines = _readme_commands("Key controls", 9)
    async with _admin_on_the_example_config(redis_url, monkeypatch):
        assert (await keygate("workspaces", "create", "acme", "--name", "Acme", "--plan",
                              "pro")).code == 0
        created = await keygate("keys", "create", "--workspace", "acme", "--name", "sync",
                                "--role", "reader", "--json")
        key_id = created.json()["key"]["id"]
        for line in lines:
            argv = shlex.split(line.replace("[", "").replace("]", ""))[1:]
            argv = [key_id if arg == "<id>" else arg for arg in argv]
            if argv[:2] == ["keys", "delete"]:
                assert (await keygate("keys", "revoke", "--workspace", "acme", key_id,
                                      "--yes")).code == 0
            run = await keygate(*argv)
            assert run.code == 0, (line, run.out, run.err)


async def test_the_operations_guides_leaked_key_commands_end_the_key(
        redis_url, keygate, monkeypatch):
    """docs/operations.md's "A leaked key or operator token" block, line by line: each command
    succeeds as written, and afterwards the key is revoked and its owner has a new one."""
    import shlex
    lines = _readme_commands("A leaked key or operator token", 4, page="docs/operations.md")
    async with _admin_on_the_example_config(redis_url, monkeypatch):
        assert (await keygate("workspaces", "create", "acme", "--name", "Acme")).code == 0
        created = await keygate("keys", "create", "--workspace", "acme", "--name", "sync",
                                "--role", "reader", "--json")
        key_id = created.json()["key"]["id"]
        for line in lines:
            argv = [key_id if arg == "<id>" else arg for arg in shlex.split(line)[1:]]
            run = await keygate(*argv)
            assert run.code == 0, (line, run.out, run.err)
        listing = (await keygate("keys", "list", "--workspace", "acme", "--json")).json()
        status = {k["id"]: k["status"] for k in listing["items"]}
        assert status.pop(key_id) == "revoked"
        assert list(status.values()) == ["active"]      # the rotated-in replacement


async def test_an_address_over_the_failure_limit_is_told_when_to_try_again(
        redis_url, upstream, monkeypatch, keygate):
    """Past 20 wrong operator tokens from one address the admin API answers that address 429
    ``too_many_failures``, the right token too, with ``Retry-After``: the CLI printed the
    message only, and nothing said when the right token would work again."""
    from harness import gateway_under_test, make_config
    async with gateway_under_test(make_config(str(upstream.make_url(""))), redis_url,
                                  monkeypatch) as g:
        monkeypatch.setenv("KEYGATE_ADMIN_URL", str(g.admin_server.make_url("")).rstrip("/"))
        monkeypatch.setenv("KEYGATE_ADMIN_TOKEN", "an-old-operator-token")
        for _ in range(20):
            assert "not the operator token" in (await keygate("workspaces", "list")).err
        monkeypatch.setenv("KEYGATE_ADMIN_TOKEN", ADMIN_TOKEN)
        run = await keygate("workspaces", "list")
    assert run.code == 1 and "(too_many_failures)" in run.err, run.err
    found = re.search(r"try again in (\d+) seconds?", run.err)
    assert found and 1 <= int(found.group(1)) <= 60, run.err
    assert "not the operator token" not in run.err and ADMIN_TOKEN not in run.err


# --- config check: methods that fall through to a public route (HTTP verb tampering) ---------

def verb_config(*routes: str, cors: bool = False) -> str:
    """A config whose routes are ``routes`` (flow mappings), one a line from line 4 on."""
    text = "upstreams:\n  crm: {url: \"http://127.0.0.1:9000\", timeout: 5}\nroutes:\n"
    text += "".join(f"  - {{{route}, upstream: crm}}\n" for route in routes)
    if cors:
        text += "cors:\n  allow_origins: [\"https://app.example\"]\n"
    return text


ADMIN_GET_POST = "path: /admin/**, methods: [GET, POST], scopes: [admin]"
PUBLIC_ALL = "path: /**, public: true"


def check_warnings(tmp_path, capsys, text: str) -> list[str]:
    """`config check` on ``text``: it must pass (exit 0, ``ok: FILE``); its warning lines."""
    path = tmp_path / "verbs.yaml"
    path.write_text(text)
    assert main(["config", "check", str(path)]) == 0
    out, err = capsys.readouterr()
    assert out == f"ok: {path}\n"
    return [line for line in err.splitlines() if "warning" in line]


def test_config_check_warns_of_methods_a_keyed_route_leaves_to_a_public_catch_all(
        tmp_path, capsys):
    """The verb-tampering shape: GET and POST on /admin/** need a key, a public /** for every
    method follows, so 'DELETE /admin/users' (PURGE, PATCH...) reaches the upstream without
    a key, where a handler that does not check the method serves it as a GET. Matching stays
    first-match (SPEC); `config check` says so, once, naming both routes, the methods and the
    fixes, and still passes the file."""
    [line] = check_warnings(tmp_path, capsys, verb_config(ADMIN_GET_POST, PUBLIC_ALL))
    prefix = f"{tmp_path / 'verbs.yaml'}:4: routes[0]: warning: "
    assert line.startswith(prefix), line
    assert "'/admin/**' needs a key only for GET, HEAD and POST" in line
    assert "PUT, PATCH, DELETE, TRACE and any other method (PURGE, PROPFIND...)" in line
    assert "routes[1] '/**' (line 5), a public route" in line
    assert "OPTIONS" not in line  # no cors section: preflights are the upstream's to answer
    assert "CONNECT" not in line  # refused 501 whatever the routes say
    assert ("list PUT, PATCH, DELETE and TRACE in routes[0].methods, give routes[1] "
            "explicit methods, or add a keyed route for '/admin/**' without methods after "
            "routes[0]") in line


def test_config_check_warns_of_a_public_glob_that_overlaps_a_keyed_one(tmp_path, capsys):
    """Not only a catch-all: '/*/users' public for every method overlaps '/admin/*' on
    /admin/users. A public route's explicit methods that the keyed route lacks are named."""
    [line] = check_warnings(tmp_path, capsys, verb_config(
        "path: /admin/*, methods: [GET], scopes: [admin]", "path: /*/users, public: true"))
    assert "routes[0]: warning: '/admin/*' needs a key only for GET and HEAD" in line
    assert "routes[1] '/*/users' (line 5)" in line
    [line] = check_warnings(tmp_path, capsys, verb_config(
        ADMIN_GET_POST, "path: /**, methods: [GET, DELETE], public: true"))
    assert "routes[0]: warning: '/admin/**' needs a key only for GET, HEAD and POST; DELETE on "\
        "its paths falls through to routes[1] '/**' (line 5), a public route" in line
    assert "any other method" not in line
    assert "list DELETE in routes[0].methods, remove DELETE from routes[1].methods, or add a "\
        "keyed route for '/admin/**' without methods after routes[0]" in line
    # every method keygate knows listed: only the others (PURGE...) fall through, and no
    # 'methods' entry can name them
    [line] = check_warnings(tmp_path, capsys, verb_config(
        "path: /admin/**, methods: [GET, POST, PUT, PATCH, DELETE, OPTIONS, TRACE], "
        "scopes: [admin]", PUBLIC_ALL))
    assert "; any method 'methods' cannot name (PURGE, PROPFIND...) on its paths falls "\
        "through" in line
    assert "in routes[0].methods" not in line
    assert "give routes[1] explicit methods, or add a keyed route" in line


def test_config_check_warns_once_per_pair_in_file_order(tmp_path, capsys):
    lines = check_warnings(tmp_path, capsys, verb_config(
        ADMIN_GET_POST, "path: /billing/**, methods: [GET], scopes: [billing]",
        "path: /admin/**, methods: [DELETE], public: true", PUBLIC_ALL))
    assert [line.split(": warning: ")[0].rsplit(": ", 1)[1] for line in lines] == \
        ["routes[0]", "routes[1]"], lines
    # the public DELETE written for /admin/** itself is the operator's word: not warned, and
    # DELETE does not reach the catch-all
    assert "routes[2] '/admin/**'" not in " ".join(lines)
    assert "DELETE" not in lines[0].split(";")[1].split("fall")[0], lines[0]
    assert "'/billing/**' needs a key only for GET and HEAD" in lines[1]


@pytest.mark.parametrize("routes", [
    # a keyed route without methods takes every method
    ("path: /admin/**, scopes: [admin]", PUBLIC_ALL),
    # a public route whose methods the keyed route takes
    (ADMIN_GET_POST, "path: /**, methods: [GET, HEAD, POST], public: true"),
    # a public route on other paths
    (ADMIN_GET_POST, "path: /docs/**, public: true"),
    (ADMIN_GET_POST, "path: /administrators/**, public: true"),
    ("path: /admin/*, methods: [GET], scopes: [admin]", "path: /*/users/*, public: true"),
    # the fix: a keyed route for the same glob without methods, between them
    (ADMIN_GET_POST, "path: /admin/**, scopes: [admin]", PUBLIC_ALL),
    # keyed writes, public reads: GET on those paths needs no key anyway
    ("path: /articles/**, methods: [POST, PUT, DELETE], scopes: [editor]", PUBLIC_ALL),
    # a keyed catch-all is no way around a key
    (ADMIN_GET_POST, "path: /**, scopes: [basic]"),
    # a public route before the keyed one
    (PUBLIC_ALL, ADMIN_GET_POST),
    # OPTIONS alone, without a cors section: the upstream's CORS preflights (no key)
    ("path: /admin/**, methods: [GET, POST, PUT, PATCH, DELETE, TRACE], "
     "scopes: [admin]", "path: /**, methods: [GET, OPTIONS, CONNECT], public: true"),
])
def test_config_check_does_not_warn_where_nothing_falls_through(tmp_path, capsys, routes):
    assert check_warnings(tmp_path, capsys, verb_config(*routes)) == []


def test_with_a_cors_section_options_falling_through_is_warned_too(tmp_path, capsys):
    """With keygate's cors section keygate answers the preflights itself: an OPTIONS that
    reaches a public route on a keyed path is one it did not answer, as any other method."""
    routes = ("path: /admin/**, methods: [GET, POST, PUT, PATCH, DELETE, TRACE], "
              "scopes: [admin]", "path: /**, methods: [GET, OPTIONS], public: true")
    [line] = check_warnings(tmp_path, capsys, verb_config(*routes, cors=True))
    assert "; OPTIONS on its paths falls through to routes[1] '/**'" in line
    [line] = check_warnings(tmp_path, capsys, verb_config(ADMIN_GET_POST, PUBLIC_ALL, cors=True))
    assert "PUT, PATCH, DELETE, OPTIONS, TRACE and any other method" in line


def test_the_verb_warning_in_the_configuration_docs_is_the_one_config_check_prints(
        tmp_path, capsys, monkeypatch):
    """docs/configuration.md shows the warning for its example routes: the very line."""
    from pathlib import Path
    docs = (Path(__file__).resolve().parent.parent / "docs" / "configuration.md").read_text()
    shown = next(line for line in docs.splitlines()
                 if line.startswith("config.yaml:4: routes[0]: warning: "))
    monkeypatch.chdir(tmp_path)
    Path("config.yaml").write_text(
        "upstreams:\n  crm: {url: \"http://127.0.0.1:9000\", timeout: 5}\nroutes:\n"
        "  - {path: \"/admin/**\", methods: [GET, POST], upstream: crm, scopes: [admin]}\n"
        "  - {path: \"/**\", upstream: crm, public: true}        # every method\n")
    assert main(["config", "check", "config.yaml"]) == 0
    assert shown in capsys.readouterr().err.splitlines()


# --- the console script as a subprocess, against an admin URL that is not keygate's (a typo,
# another service on :8081, a slow proxy, a gateway cut off mid-answer) or a real admin API -------

SCRIPT_TOKEN = "script-operator-token-0123456789abcdef"
KEYGATE_SCRIPT = str(Path(sys.executable).with_name("keygate"))


async def run_script(*argv: str, env: dict | None = None, limit: float = 30.0):
    """(exit code, stdout, stderr, seconds) of the ``keygate`` console script run with
    ``argv``; killed after ``limit`` seconds (exit code None then)."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("KEYGATE_")}
    environ.update({"KEYGATE_ADMIN_TOKEN": SCRIPT_TOKEN, **(env or {})})
    started = time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        KEYGATE_SCRIPT, *argv, env=environ, stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), limit)
        code = proc.returncode
    except asyncio.TimeoutError:
        proc.kill()
        out, err = await proc.communicate()
        code = None
    return code, out.decode("utf-8", "replace"), err.decode("utf-8", "replace"), \
        time.monotonic() - started


async def run_script_with_closed(fd: int, *argv: str, env: dict) -> tuple[int, str, str]:
    """``keygate argv`` with file descriptor ``fd`` (0: stdin, 1: stdout) closed, as
    ``keygate ... <&-`` / ``>&-`` (a daemon or CI runner that closed it) leaves it."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("KEYGATE_")}
    environ.update({"KEYGATE_ADMIN_TOKEN": SCRIPT_TOKEN, **env})

    def run() -> subprocess.CompletedProcess:
        return subprocess.run([KEYGATE_SCRIPT, *argv], env=environ,
                              stdout=None if fd == 1 else subprocess.PIPE,
                              stderr=subprocess.PIPE,
                              stdin=None if fd == 0 else subprocess.DEVNULL,
                              preexec_fn=lambda: os.close(fd), timeout=60)
    done = await asyncio.to_thread(run)
    return done.returncode, (done.stdout or b"").decode(), done.stderr.decode()


async def serve_answer(aiohttp_server, handler, path: str = "/{tail:.*}",
                       method: str = "*") -> str:
    """The URL of an HTTP server on loopback whose ``handler`` answers ``method path``."""
    from aiohttp import web
    app = web.Application()
    app.router.add_route(method, path, handler)
    server = await aiohttp_server(app)
    return str(server.make_url(""))


@pytest.fixture
async def script_admin_url(redis_url, monkeypatch):
    """A real admin API on a loopback port and a real redis-server, for the console script
    (whose token is ``SCRIPT_TOKEN``)."""
    import dataclasses

    from aiohttp import web

    from gateway import admin
    from gateway.config import Argon2Config, Config, Plan
    from gateway.store import Store

    monkeypatch.setenv("KEYGATE_ADMIN_TOKEN", SCRIPT_TOKEN)
    config = Config(plans={"free": Plan("free")}, default_plan="free")
    config = dataclasses.replace(config, keys=dataclasses.replace(
        config.keys, argon2=Argon2Config(1, 8, 1)))
    store = await Store.connect(redis_url, config)
    runner = web.AppRunner(admin.create_admin_app(config, store))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()
        await store.close()


async def test_timeout_bounds_the_whole_answer_not_each_read(aiohttp_server):
    """docs/cli.md: ``--timeout SECONDS``: how long to wait for an answer. A server (or a
    stalled proxy) sending its answer a byte every half second kept the command waiting for
    ever: urllib's timeout is per socket read, and each byte restarted it."""
    from aiohttp import web

    async def trickle(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        resp.content_length = 10000
        await resp.prepare(request)
        try:
            for _ in range(10000):
                await resp.write(b" ")
                await asyncio.sleep(0.5)
        except (ConnectionError, asyncio.CancelledError):
            pass
        return resp

    url = await serve_answer(aiohttp_server, trickle, "/admin/v1/workspaces", "GET")
    code, out, err, took = await run_script("--timeout", "1", "--admin-url", url, "workspaces",
                                            "list", limit=15)
    assert code is not None, f"--timeout 1 did not end the command: still waiting after {took:.0f}s"
    assert code == 1 and "did not answer within 1s" in err, (code, err)
    assert took < 8


NOT_HTTP = {
    # --admin-url with the wrong port: an SSH (or SMTP...) server greets first
    "an SSH server": b"SSH-2.0-OpenSSH_9.6\r\n",
    # a gateway that stops (restart, OOM kill) or a proxy that cuts the answer halfway
    "an answer cut short": b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                           b"Content-Length: 100\r\n\r\n{\"items\":",
    "a chunked answer cut short": b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                                  b"Transfer-Encoding: chunked\r\n\r\n5\r\n{\"ite",
    "too many header lines": b"HTTP/1.1 200 OK\r\n" + b"X-A: b\r\n" * 200 + b"\r\n{}",
    "an error answer cut short": b"HTTP/1.1 400 Bad Request\r\nContent-Length: 100\r\n\r\n{",
}


@pytest.mark.parametrize("case", NOT_HTTP, ids=list(NOT_HTTP))
@pytest.mark.parametrize("argv", [["workspaces", "list"],
                                  ["keys", "create", "-w", "acme", "--name", "ci", "--scope",
                                   "a"]], ids=["read", "key-create"])
async def test_an_answer_that_is_not_http_or_cut_short_is_one_line_exit_1(case, argv):
    """http.client's own errors (BadStatusLine, IncompleteRead, HTTPException: no OSError)
    ended the command in a traceback. A key create whose answer was cut may have made the
    key: it says what a timeout says (check with keygate keys list)."""
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(NOT_HTTP[case])
            await writer.drain()
        finally:
            writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        code, out, err, _ = await run_script("--admin-url", f"http://127.0.0.1:{port}", *argv)
    assert "Traceback" not in err, err[-400:]
    assert code == 1 and err.startswith("keygate: ") and len(err.splitlines()) == 1, (code, err)
    assert ("keygate keys list --workspace acme" in err) == (argv[0] == "keys"), err


@pytest.mark.parametrize("status", [200, 400])
async def test_a_deeply_nested_json_answer_is_one_line_not_a_traceback(aiohttp_server, status):
    """A body of 100000 nested brackets is valid JSON that json.loads cannot read
    (RecursionError, no ValueError): a success answer and an error answer alike ended the
    command in a traceback."""
    from aiohttp import web

    async def answer(request: web.Request) -> web.Response:
        return web.Response(body=b"[" * 100000 + b"]" * 100000, status=status,
                            content_type="application/json")

    url = await serve_answer(aiohttp_server, answer)
    code, out, err, _ = await run_script("--admin-url", url, "workspaces", "list")
    assert "Traceback" not in err and "RecursionError" not in err, err[-300:]
    assert code == 1 and err.startswith("keygate: ") and len(err.splitlines()) == 1, err[-300:]


SHAPES = {
    "a JSON list": b"[1, 2]",
    "a JSON string": b'"hello"',
    "items null": b'{"items": null}',
    "items of numbers": b'{"items": [1]}',
}


@pytest.mark.parametrize("json_flag", [[], ["--json"]], ids=["table", "json"])
@pytest.mark.parametrize("shape", SHAPES, ids=list(SHAPES))
@pytest.mark.parametrize("argv", [["workspaces", "list"], ["keys", "list", "-w", "acme"],
                                  ["roles", "list", "-w", "acme"], ["audit", "-w", "acme"],
                                  ["usage", "-w", "acme", "--daily"]],
                         ids=lambda a: "-".join(a[:2]))
async def test_a_json_answer_of_another_shape_is_one_line_exit_1(aiohttp_server, shape, argv,
                                                                 json_flag, capsys,
                                                                 monkeypatch):
    """An admin URL that is not keygate's (another JSON service, a proxy's JSON error page
    with status 200) answers valid JSON of another shape: list, audit and the rest crashed
    with AttributeError or TypeError tracebacks; it is one line and exit 1, as for a body
    that is not JSON.

    Each verb runs once as the console script (the first shape, as a table); its other
    shapes and formats call the script's entry point, ``main``, in this process (an
    exception out of it, the traceback, fails the test as well): 35 fewer interpreters
    started, ~0.2 s of CPU each."""
    from aiohttp import web

    async def answer(request: web.Request) -> web.Response:
        return web.Response(body=SHAPES[shape], content_type="application/json")

    url = await serve_answer(aiohttp_server, answer)
    if shape == next(iter(SHAPES)) and not json_flag:
        code, out, err, _ = await run_script("--admin-url", url, *argv, *json_flag)
    else:  # the environment run_script gives the script
        for name in [n for n in os.environ if n.startswith("KEYGATE_")]:
            monkeypatch.delenv(name)
        monkeypatch.setenv("KEYGATE_ADMIN_TOKEN", SCRIPT_TOKEN)
        capsys.readouterr()
        code = await asyncio.to_thread(main, ["--admin-url", url, *argv, *json_flag])
        out, err = capsys.readouterr()
    assert "Traceback" not in err, err
    assert code == 1 and err.startswith("keygate: ") and len(err.splitlines()) == 1, (code, err)
    if argv[0] != "usage" or "items" in shape:
        assert "answered 200 with" in err, err


@pytest.mark.parametrize("body", [b"[]", b'{"key": [], "token": "kg_test_x"}'])
async def test_a_key_create_answered_with_another_shape_is_one_line_exit_1(aiohttp_server,
                                                                          body):
    """A ``keys create`` answered with a JSON list crashed in print_new_token
    (``answer.get``)."""
    from aiohttp import web

    async def answer(request: web.Request) -> web.Response:
        return web.Response(body=body, status=201, content_type="application/json")

    url = await serve_answer(aiohttp_server, answer)
    code, out, err, _ = await run_script("--admin-url", url, "keys", "create", "-w", "acme",
                                         "--name", "ci", "--scope", "a")
    assert "Traceback" not in err, err
    assert code == 1 and err.startswith("keygate: "), (code, err)
    assert out == ""


@pytest.mark.parametrize("verb", ["create", "rotate"])
async def test_a_new_token_with_stdout_closed_is_exit_1_before_anything_is_sent(
        script_admin_url, verb):
    """docs/cli.md: ``keys create`` prints the token on stdout, once. With stdout closed
    (``>&-``: sys.stdout is None, and print() writes nothing, silently) the key was made, its
    token written nowhere, and the command exited 0. It is refused before anything is sent:
    exit 1, and no key was made (or rotated)."""
    env = {"KEYGATE_ADMIN_URL": script_admin_url}
    code, _, err, _ = await run_script("workspaces", "create", "acme", "--name", "Acme", env=env)
    assert code == 0, err
    code, out, err, _ = await run_script("keys", "create", "-w", "acme", "--name", "ci",
                                         "--scope", "people:read", "--json", env=env)
    key_id = json.loads(out)["key"]["id"]
    argv = (["keys", "create", "-w", "acme", "--name", "ci2", "--scope", "people:read"]
            if verb == "create" else ["keys", "rotate", "-w", "acme", key_id])
    code, _, err = await run_script_with_closed(1, *argv, env=env)
    assert code == 1, f"exit {code} with the token written nowhere; stderr: {err!r}"
    assert "output was closed" in err and "created key" not in err, err
    code, out, err, _ = await run_script("keys", "list", "-w", "acme", "--json", env=env)
    assert [k["id"] for k in json.loads(out)["items"]] == [key_id]


async def test_revoke_with_stdin_closed_is_not_confirmed_exit_2(script_admin_url):
    """docs/cli.md: ``keys revoke`` without ``--yes`` asks; no answer (end of input) leaves
    the key alone and exits 2. With stdin closed (``<&-``) sys.stdin is None and the command
    ended in ``AttributeError: 'NoneType' object has no attribute 'readline'``, exit 1."""
    env = {"KEYGATE_ADMIN_URL": script_admin_url}
    code, _, err, _ = await run_script("workspaces", "create", "acme", "--name", "Acme", env=env)
    assert code == 0, err
    code, out, err, _ = await run_script("keys", "create", "-w", "acme", "--name", "ci",
                                         "--scope", "people:read", "--json", env=env)
    assert code == 0, err
    key_id = json.loads(out)["key"]["id"]
    code, _, err = await run_script_with_closed(0, "keys", "revoke", "-w", "acme", key_id,
                                                env=env)
    assert "Traceback" not in err, err
    assert code == 2 and "was not revoked" in err, (code, err)
    code, out, err, _ = await run_script("keys", "show", "-w", "acme", key_id, "--json", env=env)
    assert json.loads(out)["status"] == "active"


async def test_reload_problems_never_write_terminal_controls(aiohttp_server):
    """``keygate reload`` printed an error answer's ``problems`` raw, where every other line
    printed from an answer goes through ``printable``: a hostile answer cleared the screen,
    retitled the terminal or set the clipboard (OSC 52)."""
    from aiohttp import web

    async def reload(request: web.Request) -> web.Response:
        return web.json_response({"error": {
            "code": "bad_request", "message": "The config file has 1 problem.",
            "problems": ["config.yaml:1: x\x1b]52;c;cHduZWQ=\x07\x1b[2J\x9b31m\r\ny",
                         7]}}, status=400)

    url = await serve_answer(aiohttp_server, reload, "/admin/v1/reload", "POST")
    code, out, err, _ = await run_script("--admin-url", url, "reload")
    assert code == 1
    assert err.splitlines()[:2] == ["config.yaml:1: x\\x1b]52;c;cHduZWQ=\\x07\\x1b[2J\\x9b31m"
                                    "\\x0d\\x0ay", "7"], err


@pytest.mark.parametrize("json_out", [False, True], ids=["text", "json"])
async def test_a_reload_some_worker_has_not_confirmed_fails_naming_it(aiohttp_server, json_out):
    """Under `serve --workers N` a reload call answers 200 once the worker that took it has
    reloaded, with ``not_confirmed`` naming the workers that had not re-read the file 10 s
    later (tests/test_reload.py). `keygate reload` printed "reloaded FILE" and exited 0 all
    the same: the operator was told the change was live while those workers served the old
    config. It now says which workers may still serve it, and exits 1."""
    from aiohttp import web

    async def reload(request: web.Request) -> web.Response:
        return web.json_response({"result": "ok", "config": "/etc/keygate.yaml",
                                  "reloaded_at": "2026-12-07T10:00:00Z",
                                  "restart_required": [],
                                  "not_confirmed": ["worker 2 (pid 4242)\x1b[2J"]})

    url = await serve_answer(aiohttp_server, reload, "/admin/v1/reload", "POST")
    code, out, err, _ = await run_script("--admin-url", url, "reload",
                                         *(["--json"] if json_out else []))
    assert code == 1, (out, err)
    if json_out:
        assert json.loads(out)["not_confirmed"] == ["worker 2 (pid 4242)\x1b[2J"]
    else:
        assert out.startswith("reloaded /etc/keygate.yaml"), out
    assert "worker 2 (pid 4242)\\x1b[2J had not re-read the file" in err, err
    assert "\x1b" not in err, err


async def test_listings_never_print_bidi_overrides_or_line_separators(aiohttp_server):
    """A name holding U+202E (RIGHT-TO-LEFT OVERRIDE), an isolate or U+2028 makes a table
    line read other than it is. The admin API refuses them in names (gateway/admin/validate.py
    UNSAFE_TEXT_CLASS), but the CLI's ``printable`` escaped C0, DEL and C1 only: an answer
    from an admin URL that is not keygate's reached the terminal with its overrides."""
    from aiohttp import web

    async def listing(request: web.Request) -> web.Response:
        return web.json_response({"items": [
            {"id": "acme", "name": "Acme \u202eevitca\u202c \u2066x\u2069\u2028y",
             "plan": "free", "created_at": "2026-01-01T00:00:00Z"}]})

    url = await serve_answer(aiohttp_server, listing, "/admin/v1/workspaces", "GET")
    code, out, err, _ = await run_script("--admin-url", url, "workspaces", "list")
    assert code == 0, err
    assert "Acme \\u202eevitca\\u202c \\u2066x\\u2069\\u2028y" in out, ascii(out)


def test_printable_escapes_what_the_admin_api_refuses_in_text():
    from gateway.admin.validate import UNSAFE_TEXT_CLASS
    from gateway.cli.client import printable
    unsafe = [chr(c) for c in range(0x3000) if re.fullmatch(f"[{UNSAFE_TEXT_CLASS}]", chr(c))]
    assert len(unsafe) > 70  # C0, DEL, C1, and the separators and bidi controls
    assert all(printable(c).startswith("\\") for c in unsafe)
    assert printable("Bücher 株式会社 \u200d") == "Bücher 株式会社 \u200d"


async def test_a_newline_in_a_value_is_shown_escaped_never_as_a_line_of_its_own(
        aiohttp_server):
    """``show`` split the text on newlines *before* escaping each line, so a newline inside a
    value was kept: a key name ``ci\\nk_FAKE ... active`` printed a second, forged row in
    ``keys list`` (and a forged ``status`` line in ``keys show``)."""
    from aiohttp import web

    forged = "k_FAKE        deploy  ALL          2026-01-01 00:00 UTC  -          -        active"
    key = {"id": "k_1", "name": "ci\n" + forged, "scopes": ["a\nb"], "status": "revoked",
           "created_at": "2026-01-01T00:00:00Z\nx", "workspace": "acme", "role": None}

    async def listing(request: web.Request) -> web.Response:
        return web.json_response({"items": [key]})

    async def one(request: web.Request) -> web.Response:
        return web.json_response({**key, "description": "x\nstatus       active"})

    from aiohttp import web as _web
    app = _web.Application()
    app.router.add_get("/admin/v1/workspaces/acme/keys", listing)
    app.router.add_get("/admin/v1/workspaces/acme/keys/k_1", one)
    server = await aiohttp_server(app)
    url = str(server.make_url(""))
    code, out, err, _ = await run_script("--admin-url", url, "keys", "list", "-w", "acme")
    assert code == 0, err
    assert len(out.splitlines()) == 2, out  # the header and the one key
    assert "ci\\x0ak_FAKE" in out and "a\\x0ab" in out, out
    code, out, err, _ = await run_script("--admin-url", url, "keys", "show", "-w", "acme", "k_1")
    assert code == 0, err
    assert [line.split()[0] for line in out.splitlines()].count("status") == 1, out
    assert len(out.splitlines()) == len(key) + 1, out  # its fields and the description


def terminal_columns(text: str) -> int:
    """Terminal columns ``text`` takes (East Asian wide and fullwidth characters take two)."""
    import unicodedata
    return sum(2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in text)


async def test_tables_align_wide_names_by_the_columns_they_take(script_admin_url):
    """``keygate workspaces list`` is a table. Names are Unicode text the API takes (a
    Japanese company's name): the table padded by len(), so every column after a wide name
    started further right than its header."""
    env = {"KEYGATE_ADMIN_URL": script_admin_url}
    for ws, name in (("jp", "株式会社テスト"), ("us", "Acme Corporation Inc"),
                     ("de", "Bücher Gmbh")):
        code, _, err, _ = await run_script("workspaces", "create", ws, "--name", name, env=env)
        assert code == 0, err
    code, out, err, _ = await run_script("workspaces", "list", env=env)
    assert code == 0, err
    lines = out.splitlines()
    header = lines[0]
    plan_at = terminal_columns(header[:header.index("PLAN")])
    starts = {terminal_columns(line[:line.index("free")]) for line in lines[1:]}
    assert starts == {plan_at}, out


def test_a_table_pads_combining_marks_and_wide_characters_by_display_width():
    from gateway.cli.output import format_table
    table = format_table(["NAME", "X"], [["e\u0301te\u0301", "1"], ["漢字", "2"], ["ab", "3"]])
    assert [terminal_columns(line[:-1]) - line.count("\u0301") for line in
            table.splitlines()[1:]] == [6, 6, 6]


async def test_a_bracketed_admin_host_is_a_config_problem_naming_the_file(tmp_path):
    """docs/configuration.md writes hosts unbracketed (`::1`). `admin.host: "[::1]"` passed
    `config check`, serve could not listen on it, and the CLI made it http://[[::1]]:PORT and
    blamed KEYGATE_ADMIN_URL, a variable not even set."""
    config = tmp_path / "admin.yaml"
    config.write_text('admin: {host: "[::1]", port: 18091}\n')
    code, out, err, _ = await run_script("--config", str(config), "workspaces", "list")
    assert code == 1, err
    assert "KEYGATE_ADMIN_URL" not in err, err
    assert f"{config}:1: admin.host: '[::1]'" in err and "'::1'" in err, err
    code, out, err, _ = await run_script("config", "check", str(config))
    assert code == 1 and "admin.host" in err, err


def test_an_admin_url_that_is_not_one_names_where_it_came_from(tmp_path, monkeypatch, capsys):
    """Any admin URL but --admin-url's (checked by argparse) was blamed on KEYGATE_ADMIN_URL,
    one made from a --config file's admin.host too."""
    monkeypatch.setenv("KEYGATE_ADMIN_URL", "http://[::1:8081")
    assert main(["workspaces", "list"]) == 2
    assert "keygate: error: KEYGATE_ADMIN_URL: " in capsys.readouterr().err
    config = tmp_path / "admin.yaml"
    config.write_text('admin: {host: "ops@127.0.0.1", port: 18091}\n')
    monkeypatch.delenv("KEYGATE_ADMIN_URL")
    assert main(["workspaces", "list", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert f"keygate: error: the admin listener of {config}: " in err, err


async def test_an_unsendable_token_names_the_variable_it_came_from(tmp_path):
    """docs/cli.md: with --config the operator token is the config's ``token_env`` variable.
    A token there with a line break (from an env file) was refused as "KEYGATE_ADMIN_TOKEN
    holds characters that cannot be sent", naming a variable not even set."""
    config = tmp_path / "admin.yaml"
    config.write_text("admin: {host: 127.0.0.1, port: 9, token_env: REVIEW_OPERATOR_TOKEN}\n")
    code, out, err, _ = await run_script(
        "--config", str(config), "workspaces", "list",
        env={"KEYGATE_ADMIN_TOKEN": "", "REVIEW_OPERATOR_TOKEN": SCRIPT_TOKEN + "\nX"})
    assert code == 1, err
    assert err.startswith("keygate: REVIEW_OPERATOR_TOKEN holds characters"), err
    assert SCRIPT_TOKEN not in err
    code, out, err, _ = await run_script(
        "--admin-url", "http://127.0.0.1:9", "workspaces", "list",
        env={"KEYGATE_ADMIN_TOKEN": SCRIPT_TOKEN + "\nX"})
    assert code == 1 and err.startswith("keygate: KEYGATE_ADMIN_TOKEN holds characters"), err
