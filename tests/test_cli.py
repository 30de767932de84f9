"""The ``keygate`` CLI: argument handling offline, and every admin verb against a real admin API
(``gateway.admin.create_admin_app`` on a loopback port, on a real redis-server).

The CLI is synchronous (urllib), so live tests run ``main`` in a thread: calling it on the
test's event loop would block the very server it talks to.
"""

from __future__ import annotations

import asyncio
import io
import json
import socket
import subprocess
import sys

import pytest

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


def test_unreachable_admin_api_is_one_line_and_exit_1(capsys, monkeypatch):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("KEYGATE_ADMIN_TOKEN", ADMIN_TOKEN)
    code = main(["keys", "list", "--workspace", "acme", "--admin-url", f"http://127.0.0.1:{port}"])
    out, err = capsys.readouterr()
    assert code == 1
    assert out == ""
    assert err.startswith(f"keygate: cannot reach the admin API at http://127.0.0.1:{port}: ")
    assert err.count("\n") == 1
    assert ADMIN_TOKEN not in err


def test_admin_url_comes_from_the_environment(capsys, monkeypatch):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("KEYGATE_ADMIN_URL", f"http://127.0.0.1:{port}")
    assert main(["workspaces", "list"]) == 1
    assert f"127.0.0.1:{port}" in capsys.readouterr().err


def test_admin_url_before_the_verb_is_honoured(capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
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


def test_config_check_defaults_to_keygate_config_env(tmp_path, capsys, monkeypatch):
    path = tmp_path / "from-env.yaml"
    path.write_text(GOOD_CONFIG)
    monkeypatch.setenv("KEYGATE_CONFIG", str(path))
    assert main(["config", "check"]) == 0
    assert capsys.readouterr().out == f"ok: {path}\n"


def test_python_dash_m_gateway_runs_the_cli(tmp_path):
    path = tmp_path / "keygate.yaml"
    path.write_text(GOOD_CONFIG)
    done = subprocess.run([sys.executable, "-m", "gateway", "config", "check", str(path)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"ok: {path}\n"
