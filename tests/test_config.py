"""Config loading: every problem names the file, the line, the field and what is wrong."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from gateway.config import (Config, RateLimit, Route, check_config, load_config,
                            parse_rate_limit)
from gateway.errors import ConfigError

EXAMPLE = Path(__file__).resolve().parent.parent / "config.example.yaml"


def write(tmp_path: Path, text: str, name: str = "config.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    return path


def problems_of(tmp_path: Path, text: str) -> list[str]:
    """Problems of a config, with the tmp dir stripped so lines read ``config.yaml:N: ...``."""
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert check_config(path) == info.value.problems
    return [p.replace(str(tmp_path) + "/", "") for p in info.value.problems]


UPSTREAM = """
upstreams:
  crm: {url: "http://127.0.0.1:9000"}
"""


def with_upstream(text: str) -> str:
    """A config with upstream ``crm`` (lines 1-2) and then ``text`` from line 3."""
    return UPSTREAM.lstrip("\n") + textwrap.dedent(text).lstrip("\n")


# --- reading the file ------------------------------------------------------------------------

def test_missing_file_is_one_problem_naming_the_path(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.problems == [f"cannot read {path}: No such file or directory"]


def test_yaml_syntax_error_is_one_problem_with_file_and_line(tmp_path: Path) -> None:
    problems = problems_of(tmp_path, """
        server:
          port: 8080
        routes: [
          - path: /x
    """)
    assert len(problems) == 1
    assert problems[0].startswith("config.yaml:4: invalid YAML: ")


GOOD_FILE = """\
store: {redis_url: "redis://127.0.0.1:9/0"}
upstreams: {api: "http://127.0.0.1:9/"}
routes:
  - {path: /x, upstream: api, public: true}
# owner: ops team
"""


def _config_check(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gateway", "config", "check", str(path)],
                          capture_output=True, text=True, timeout=60, cwd=str(path.parent),
                          stdin=subprocess.DEVNULL)


@pytest.mark.parametrize("char, shown", [("\x7f", "U+007F"), ("\x00", "U+0000"),
                                         ("\x1b", "U+001B"), ("\x08", "U+0008")],
                         ids=["DEL", "NUL", "ESC", "BS"])
def test_a_control_character_is_reported_at_its_own_line(tmp_path: Path, char: str,
                                                         shown: str) -> None:
    """A character YAML does not allow (a DEL, NUL or ESC pasted from a terminal into a
    comment or a value), here on line 6 of 6, was `config.yaml:1: invalid YAML: unacceptable
    character #x007f: special characters are not allowed\\n  in "<unicode string>", position
    170`: always line 1, in PyYAML's words, with a character offset (PyYAML's ReaderError is
    no MarkedYAMLError: it carries a position, not a mark). It is its own line and column,
    said plainly, in `config check` and in a serve or reload refusal alike (one loader)."""
    path = tmp_path / "config.yaml"
    path.write_text(GOOD_FILE + f"# paste{char} here\n")
    expected = (f"{path}:6: invalid YAML: character {shown} (a control character) is not "
                "allowed in a YAML file (column 8)")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.problems == [expected]
    done = _config_check(path)
    assert (done.returncode, done.stdout, done.stderr) == (1, "", expected + "\n")


def test_a_latin_1_byte_is_reported_at_its_own_line(tmp_path: Path) -> None:
    """A file saved in Latin-1/cp1252 (an editor on Windows, a "Société" in a comment on line
    6 of 6) was `cannot read config.yaml: not UTF-8 text (bad byte at offset 170)`: no line,
    where every other problem is `file:line: field: what`. The line is the newlines before
    the byte, plus one; the column, the characters before it on its line."""
    path = tmp_path / "config.yaml"
    path.write_bytes(GOOD_FILE.encode() + "# Soci\xe9t\xe9\n".encode("latin-1"))
    expected = (f"{path}:6: cannot read the file: not UTF-8 text (byte 0xe9, column 7); "
                "save it as UTF-8")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.problems == [expected]
    done = _config_check(path)
    assert (done.returncode, done.stdout, done.stderr) == (1, "", expected + "\n")
    # a byte order mark is not counted: the offsets are the text's after it
    path.write_bytes(b"\xef\xbb\xbf" + GOOD_FILE.encode() + b"# a\xff\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.problems == [f"{path}:6: cannot read the file: not UTF-8 text "
                                   "(byte 0xff, column 4); save it as UTF-8"]


def test_empty_file_gives_all_defaults(tmp_path: Path) -> None:
    path = write(tmp_path, "# nothing configured yet\n")
    config = load_config(path)
    assert config == Config(source=str(path))
    assert config.keys.headers == ("X-Api-Key",)
    assert dict(config.plans) == {"default": config.plans["default"]}
    assert config.plans["default"].monthly_requests is None
    assert config.default_plan == "default"
    assert check_config(path) == []


def test_no_path_gives_all_defaults() -> None:
    assert load_config(None) == Config()


def test_top_level_must_be_a_mapping(tmp_path: Path) -> None:
    assert problems_of(tmp_path, "- a\n- b\n") == [
        "config.yaml:1: top level: expected a mapping, got a list"]


# --- types, ranges, unknown keys ---------------------------------------------------------------

def test_string_where_an_int_is_needed(tmp_path: Path) -> None:
    assert problems_of(tmp_path, """
        server:
          host: 0.0.0.0
          port: "8080"
    """) == ["config.yaml:3: server.port: expected an integer, got a string ('8080')"]


def test_boolean_is_not_a_port(tmp_path: Path) -> None:
    assert problems_of(tmp_path, "admin:\n  port: true\n") == [
        "config.yaml:2: admin.port: expected an integer, got a boolean (true)"]
    # a plain yes is text, as YAML 1.2 and the JSON schema read it
    assert problems_of(tmp_path, "admin:\n  port: yes\n") == [
        "config.yaml:2: admin.port: expected an integer, got a string ('yes')"]


def test_out_of_range_values(tmp_path: Path) -> None:
    assert problems_of(tmp_path, """
        server:
          port: 70000
          workers: 0
          max_body_bytes: -5
        store:
          on_store_error: maybe
          redis_url: http://localhost:6379
          timeout: 0
    """) == [
        "config.yaml:2: server.port: must be between 1 and 65535, got 70000",
        "config.yaml:3: server.workers: must be between 1 and 1024, got 0",
        "config.yaml:4: server.max_body_bytes: must be at least 1, got -5",
        "config.yaml:6: store.on_store_error: must be one of closed, open, got 'maybe'",
        "config.yaml:7: store.redis_url: must be embedded or a URL with scheme redis://, "
        "rediss://, unix://, redis+cluster://, redis+sentinel://, got scheme 'http'",
        "config.yaml:8: store.timeout: must be greater than 0, got 0",
    ]


def test_a_failure_window_the_store_cannot_expire_is_refused(tmp_path: Path) -> None:
    # Redis refuses an EXPIRE this long ('invalid expire time'): every failed verification
    # answered 503 store_unavailable instead of 401, and no failure was ever counted
    assert problems_of(tmp_path, """
        keys:
          failures: {window_seconds: 100000000000000000000}
    """) == ["config.yaml:2: keys.failures.window_seconds: must be between 1 and 3153600000, "
             "got 100000000000000000000"]
    path = write(tmp_path, "keys:\n  failures: {window_seconds: 3153600000}\n")
    assert load_config(path).keys.failures.window_seconds == 100 * 365 * 86400


def test_a_timeout_beyond_a_day_is_refused(tmp_path: Path) -> None:
    # Seconds that no timer or store expiry can hold: with store.timeout 1e300 every counting
    # call on Sentinel or Cluster carried a marker TTL of 1e304 ms, which Redis refuses, so
    # every keyed request answered 503. A day is beyond any sane wait for a head, a body, an
    # idle connection, an upstream or the store.
    assert problems_of(tmp_path, """
        server:
          timeouts: {header: 86401, body: 1.0e+300, idle: 86400}
        store:
          timeout: 1.0e+300
        upstreams:
          api: {url: "http://127.0.0.1:9", timeout: 100000}
        routes:
          - {path: /x, upstream: api}
    """) == [
        "config.yaml:2: server.timeouts.header: must be at most 86400 (a day), got 86401",
        "config.yaml:2: server.timeouts.body: must be at most 86400 (a day), got 1e+300",
        "config.yaml:4: store.timeout: must be at most 86400 (a day), got 1e+300",
        "config.yaml:6: upstreams.api.timeout: must be at most 86400 (a day), got 100000"]
    path = write(tmp_path, "server:\n  timeouts: {idle: 86400}\n")
    assert load_config(path).server.timeouts.idle == 86400


def test_numbers_yaml_versions_read_differently_are_problems_not_guesses(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # YAML 1.1 (PyYAML) reads 0777 as octal 511 and 1:30 as 90 (base 60); YAML 1.2 (most
    # editors, yq, the schema's validators) reads 777 and the text '1:30': they loaded silently
    monkeypatch.setenv("ADMIN_PORT", "09000")
    assert problems_of(tmp_path, """
        server:
          port: 0777
          timeouts: {header: 1:30, body: -0:30.5}
        admin:
          port: ${ADMIN_PORT}
        keys:
          prefix: 0123
        plans:
          p: {monthly_requests: 1:00:00}
    """) == [
        "config.yaml:2: server.port: '0777' is octal (511) in YAML 1.1 but 777 in YAML 1.2; "
        "write it without the leading 0 (quote it for text)",
        "config.yaml:3: server.timeouts.header: '1:30' is base 60 (90) in YAML 1.1 but text "
        "in YAML 1.2; write 90 (quote it for text)",
        "config.yaml:3: server.timeouts.body: '-0:30.5' is base 60 (-30.5) in YAML 1.1 but "
        "text in YAML 1.2; write -30.5 (quote it for text)",
        "config.yaml:5: admin.port: the value from ${ADMIN_PORT} is invalid: expected an "
        "integer",  # the value itself is not repeated: one from the environment may be secret
        "config.yaml:7: keys.prefix: '0123' is octal (83) in YAML 1.1 but 123 in YAML 1.2; "
        "write it without the leading 0 (quote it for text)",
        "config.yaml:9: plans.p.monthly_requests: '1:00:00' is base 60 (3600) in YAML 1.1 but "
        "text in YAML 1.2; write 3600 (quote it for text)",
    ]
    config = load_config(write(tmp_path, """
        server: {port: 0x1F90, timeouts: {header: 0.5}}
        admin: {port: 9_001}
        keys: {prefix: "0123"}
    """))
    assert (config.server.port, config.admin.port, config.keys.prefix) == (8080, 9001, "0123")
    assert config.server.timeouts.header == 0.5


def test_a_number_with_thousands_of_digits_is_too_large_in_keygate_words(tmp_path: Path
                                                                          ) -> None:
    """Past Python's limit on digits (4300), int() raises with its own hint ("use
    sys.set_int_max_str_digits() to increase the limit"), which the problems passed on."""
    huge = "9" * 5000
    assert problems_of(tmp_path, f"server:\n  port: {huge}\n"
                                 f"plans:\n  p: {{rate_limit: '{huge}/s'}}\n") == [
        "config.yaml:2: server.port: cannot read this value: a number of more than 4300 digits "
        "is too large",
        "config.yaml:4: plans.p.rate_limit: a rate limit needs between 1 and 1000000000 "
        "requests, got a number of 5000 digits"]


def test_redis_url_problems_never_echo_the_password(tmp_path: Path) -> None:
    problems = problems_of(tmp_path, "store:\n  redis_url: 'redis://:s3cret@:notaport/0'\n")
    assert len(problems) == 1 and "s3cret" not in problems[0]
    assert problems[0].startswith("config.yaml:2: store.redis_url: ")


def test_unknown_top_level_key_suggests_the_close_match(tmp_path: Path) -> None:
    assert problems_of(tmp_path, "servers:\n  port: 8080\n") == [
        "config.yaml:1: servers: unknown key 'servers' (did you mean 'server'?)"]


def test_unknown_nested_key_suggests_the_close_match(tmp_path: Path) -> None:
    assert problems_of(tmp_path, with_upstream("""
        routes:
          - path: /people/**
            upstream: crm
            scope: [people:read]
    """)) == ["config.yaml:6: routes[0].scope: unknown key 'scope' (did you mean 'scopes'?)"]


def test_unknown_key_without_a_close_match_lists_the_allowed_ones(tmp_path: Path) -> None:
    assert problems_of(tmp_path, "admin:\n  zzz: 1\n") == [
        "config.yaml:2: admin.zzz: unknown key 'zzz' (allowed: host, port, token_env, tls)"]


def test_unknown_route_key_lists_the_route_keys_in_their_documented_order(tmp_path: Path) -> None:
    # SPEC and the docs name a route's keys as path, methods, upstream, scopes, public; the hint
    # listed them so before the config package (not in the Route dataclass's field order).
    assert problems_of(tmp_path, with_upstream("""
        routes:
          - path: /people/**
            upstream: crm
            zzz: 1
    """)) == ["config.yaml:6: routes[0].zzz: unknown key 'zzz' "
              "(allowed: path, methods, upstream, scopes, public, websocket)"]


def test_duplicate_key_is_an_error(tmp_path: Path) -> None:
    assert problems_of(tmp_path, "server:\n  port: 1\n  port: 2\n") == [
        "config.yaml:3: server.port: duplicate key (first given on line 2)"]


def test_control_characters_from_the_file_are_escaped_in_problems(tmp_path: Path) -> None:
    # a newline in a key or value split its problem over lines (a templated file could forge
    # a problem line of its own in the log); an ESC reached the terminal
    problems = problems_of(tmp_path, r"""
        server:
          "port\nconfig.yaml:9: server.port: forged": 1
          log_level: "loud\e[31m"
        default_plan: "x\u2028y"
    """)
    assert problems == [
        "config.yaml:2: server.port\\nconfig.yaml:9: server.port: forged: unknown key "
        "'port\\nconfig.yaml:9: server.port: forged' (allowed: host, port, workers, "
        "max_body_bytes, trusted_proxies, log_level, access_log, metrics_workspace_labels, "
        "timeouts, max_connections, tls, websocket_recheck)",
        "config.yaml:3: server.log_level: must be one of debug, info, warning, error, got "
        "'loud\\x1b[31m'",
        "config.yaml:4: default_plan: unknown plan 'x\\u2028y' (known: default)",
    ]


def test_all_problems_are_reported_at_once_in_line_order(tmp_path: Path) -> None:
    problems = problems_of(tmp_path, """
        default_plan: gold
        server:
          port: 0
        keys:
          prefix: KG
    """)
    assert [p.split(":")[1] for p in problems] == ["1", "3", "5"]


# --- cross references --------------------------------------------------------------------------

def test_route_upstream_must_exist(tmp_path: Path) -> None:
    assert problems_of(tmp_path, with_upstream("""
        routes:
          - path: /people/**
            upstream: crm
          - path: /companies/**
            upstream: crm
          - path: /deals/**
            upstream: sales
    """)) == ["config.yaml:9: routes[2].upstream: unknown upstream 'sales' (known: crm)"]


def test_route_upstream_typo_gets_a_suggestion(tmp_path: Path) -> None:
    assert problems_of(tmp_path, UPSTREAM + "routes:\n  - {path: /x, upstream: crm2}\n") == [
        "config.yaml:4: routes[0].upstream: unknown upstream 'crm2' (did you mean 'crm'?) "
        "(known: crm)"]


def test_a_route_without_upstream_is_a_verify_only_route(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, UPSTREAM + "routes:\n  - path: /people/**\n"
                                                    "    scopes: [people:read]\n"))
    assert config.routes[0].upstream is None


def test_a_route_naming_an_unknown_upstream_is_still_a_problem(tmp_path: Path) -> None:
    assert problems_of(tmp_path, UPSTREAM + "routes:\n  - path: /health\n    upstream: crn\n"
                       ) == ["config.yaml:5: routes[0].upstream: unknown upstream 'crn' "
                             "(did you mean 'crm'?) (known: crm)"]


def test_default_plan_must_be_a_plan(tmp_path: Path) -> None:
    assert problems_of(tmp_path, """
        plans:
          starter: {monthly_requests: 1000}
          pro: {monthly_requests: 10000}
        default_plan: prox
    """) == ["config.yaml:4: default_plan: unknown plan 'prox' (did you mean 'pro'?) "
             "(known: starter, pro)"]


def test_default_plan_defaults_to_the_first_plan_listed(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, """
        plans:
          pro: {monthly_requests: 10000, rate_limit: 20/s}
          starter: {monthly_requests: 1000}
          unlimited:
    """))
    assert config.default_plan == "pro"
    assert list(config.plans) == ["pro", "starter", "unlimited"]
    assert config.plans["unlimited"].monthly_requests is None


def test_plan_values_are_non_negative_ints_or_null(tmp_path: Path) -> None:
    assert problems_of(tmp_path, """
        plans:
          free: {monthly_requests: -1, max_keys: "5"}
          big: {monthly_requests: null, max_keys: null}
    """) == [
        "config.yaml:2: plans.free.monthly_requests: must be at least 0, got -1",
        "config.yaml:2: plans.free.max_keys: expected an integer or null (unlimited), "
        "got a string ('5')",
    ]


# --- rate limits, scopes, globs, methods, headers ---------------------------------------------

def test_bad_rate_limit_names_the_plan_field(tmp_path: Path) -> None:
    assert problems_of(tmp_path, """
        plans:
          starter:
            rate_limit: 5/h
          pro:
            rate_limit: 0/s
    """) == [
        "config.yaml:3: plans.starter.rate_limit: a rate limit looks like '5/s' or '300/m' "
        "(requests per second or per minute), got '5/h'",
        "config.yaml:5: plans.pro.rate_limit: a rate limit needs between 1 and 1000000000 "
        "requests, got '0/s'",
    ]


def test_parse_rate_limit() -> None:
    assert parse_rate_limit("5/s") == RateLimit(5, 1)
    assert parse_rate_limit("300/m") == RateLimit(300, 60)
    assert str(parse_rate_limit("300/m")) == "300/m"
    for bad in ("5", "5/h", "-1/s", "0/m", "x/s", "", "5/s/s"):
        with pytest.raises(ValueError, match="rate limit"):
            parse_rate_limit(bad)


def test_bad_role_scope(tmp_path: Path) -> None:
    assert problems_of(tmp_path, """
        roles:
          reader: [people:read, "people read", ALL]
          writer: people:write
    """) == [
        "config.yaml:2: roles.reader[1]: 'people read' is not a valid scope "
        "(like 'people:read', or ALL)",
        "config.yaml:3: roles.writer: expected a list, got a string",
    ]


def test_role_names_are_slugs(tmp_path: Path) -> None:
    """SPEC: role names are slugs, in the config as in the admin API."""
    assert problems_of(tmp_path, """
        roles:
          read_only: [people:read]
          Writer: [people:write]
          read-only: [people:read]
    """) == [
        "config.yaml:2: roles.read_only: 'read_only' is not a valid role name (a slug: "
        "lowercase letters, digits and '-', starting with a letter or digit, at most 63 "
        "characters)",
        "config.yaml:3: roles.Writer: 'Writer' is not a valid role name (a slug: lowercase "
        "letters, digits and '-', starting with a letter or digit, at most 63 characters)",
    ]


def test_bad_route_scope(tmp_path: Path) -> None:
    assert problems_of(tmp_path, with_upstream("""
        routes:
          - path: /people/**
            upstream: crm
            scopes: ["people::read"]
    """)) == ["config.yaml:6: routes[0].scopes[0]: 'people::read' is not a valid scope "
             "(like 'people:read', or ALL)"]


@pytest.mark.parametrize("glob, message", [
    ("/people/*x", "'/people/*x': '*' and '**' must be a whole segment (got '*x')"),
    ("/a/**/b", "'/a/**/b': '**' may only be the last segment"),
    ("people/**", "'people/**' must start with /"),
    ("/a//b", "'/a//b' has an empty segment (//)"),
    ("/a/../b", "'/a/../b' has a '..' segment; requests with dot-segments are refused, "
                "so it never matches"),
    ("/people;v=1/*", "'/people;v=1/*' contains a character not allowed in a route path "
                      "(space, control, non-ASCII, ?, #, ; or \\; percent-encode non-ASCII)"),
    ("/_keygate/v1/x", "'/_keygate/v1/x' is under /_keygate/, which keygate reserves for "
                       "itself"),
    ("/_KEYGATE/**", "'/_KEYGATE/**' is /_keygate/ as a case-insensitive or Windows server "
                     "reads it; requests with it are refused, so it never matches"),
    ("/_keygate%20/**", "'/_keygate%20/**' is /_keygate/ as a case-insensitive or Windows "
                        "server reads it; requests with it are refused, so it never matches"),
])
def test_bad_route_glob(tmp_path: Path, glob: str, message: str) -> None:
    assert problems_of(tmp_path, UPSTREAM + f"routes:\n  - path: '{glob}'\n    upstream: crm\n"
                       ) == [f"config.yaml:4: routes[0].path: {message}"]


def test_globs_that_differ_only_by_case_are_a_problem_where_their_methods_meet(
        tmp_path: Path) -> None:
    """Route globs are case-sensitive, but a path another route matches case-insensitively is
    refused (bad_path, for case-insensitive upstreams): the later of '/admin/**' and
    '/Admin/**' would be refused for every request a method of both makes, so it never
    matches. Reported at load rather than as 400s in production."""
    assert problems_of(tmp_path, with_upstream("""
        routes:
          - {path: /admin/**, upstream: crm, scopes: [admin]}
          - {path: /people/*, upstream: crm}
          - {path: /Admin/**, upstream: crm, public: true}
          - {path: /caf%c3%a9/x, upstream: crm}
          - {path: /CAF%C3%A9/x, upstream: crm, methods: [HEAD]}
    """)) == [
        "config.yaml:6: routes[2].path: '/Admin/**' differs from routes[0].path '/admin/**' "
        "only by case; a path another route matches case-insensitively is refused "
        "(bad_path), so for the methods both take it never matches (write them in one "
        "case, or give them methods that do not overlap)",
        "config.yaml:8: routes[4].path: '/CAF%C3%A9/x' differs from routes[3].path "
        "'/caf%c3%a9/x' only by case; a path another route matches case-insensitively is "
        "refused (bad_path), so for the methods both take it never matches (write them in "
        "one case, or give them methods that do not overlap)"]
    # the same glob twice (as before), an escape's hex case only, or methods that do not meet
    config = load_config(write(tmp_path, with_upstream("""
        routes:
          - {path: /admin/**, upstream: crm, methods: [GET]}
          - {path: /Admin/**, upstream: crm, methods: [POST, DELETE]}
          - {path: /admin/**, upstream: crm, methods: [GET, PUT]}
          - {path: /caf%C3%A9, upstream: crm}
          - {path: /caf%c3%a9, upstream: crm}
          - {path: /People, upstream: crm, methods: [HEAD]}
          - {path: /people, upstream: crm, methods: [POST]}
    """)))
    assert len(config.routes) == 7




def test_a_glob_an_earlier_one_covers_case_insensitively_is_a_problem_too(
        tmp_path: Path) -> None:
    """Not only a twin: every path '/reports/public/*' matches, '/Reports/**' (earlier)
    matches case-insensitively, so each is refused bad_path and the later route never matches
    for the methods both take. It loaded, and answered 400 to all its traffic."""
    assert problems_of(tmp_path, with_upstream("""
        routes:
          - {path: /Reports/**, upstream: crm, methods: [GET], scopes: [reports:read]}
          - {path: /reports/public/*, upstream: crm, public: true}
          - {path: /*/Stats, upstream: crm}
          - {path: /*/stats, upstream: crm, methods: [POST]}
    """)) == [
        "config.yaml:5: routes[1].path: every path '/reports/public/*' matches, routes[0].path "
        "'/Reports/**' matches case-insensitively; a path another route matches "
        "case-insensitively is refused (bad_path), so for the methods both take it never "
        "matches (write them in one case, or give them methods that do not overlap)",
        "config.yaml:7: routes[3].path: '/*/stats' differs from routes[2].path '/*/Stats' "
        "only by case; a path another route matches case-insensitively is refused "
        "(bad_path), so for the methods both take it never matches (write them in one case, "
        "or give them methods that do not overlap)"]
    # partly covered (/reports/a/b is still its), covered as written (plain shadowing, as
    # before), or no method in common: these load
    config = load_config(write(tmp_path, with_upstream("""
        routes:
          - {path: /Reports/*, upstream: crm}
          - {path: /reports/**, upstream: crm}
          - {path: /Admin/**, upstream: crm}
          - {path: /Admin/x, upstream: crm}
          - {path: /People/**, upstream: crm, methods: [POST]}
          - {path: /people/*, upstream: crm, methods: [GET]}
          - {path: /**, upstream: crm, public: true}
    """)))
    assert len(config.routes) == 7

def test_globs_are_compared_for_case_once_each_not_pairwise(tmp_path: Path,
                                                            monkeypatch) -> None:
    """Each route was compared with every earlier one (2000 routes: 2 million comparisons,
    +0.7 s on a 0.5 s load, reload and `keygate config check` alike): only globs that
    lower-case alike need comparing."""
    import gateway.config.routing as routing
    calls = []
    real = routing.case_twin
    monkeypatch.setattr(routing, "case_twin", lambda *a: calls.append(a) or real(*a))
    routes = "".join(f"  - {{path: /svc{i}/items/**, upstream: crm, methods: [GET]}}\n"
                     for i in range(300))
    config = load_config(write(tmp_path, UPSTREAM + "routes:\n" + routes +
                               "  - {path: /SVC7/items/**, upstream: crm, methods: [POST]}\n"
                               "  - {path: /**, upstream: crm, public: true}\n"))
    assert len(config.routes) == 302
    assert len(calls) <= 2
    assert problems_of(tmp_path, UPSTREAM + "routes:\n" + routes +
                       "  - {path: /SVC7/items/**, upstream: crm}\n") == [
        "config.yaml:304: routes[300].path: '/SVC7/items/**' differs from routes[7].path "
        "'/svc7/items/**' only by case; a path another route matches case-insensitively is "
        "refused (bad_path), so for the methods both take it never matches (write them in "
        "one case, or give them methods that do not overlap)"]

def test_verb_warning_analysis_is_not_quadratic_in_the_routes(tmp_path: Path,
                                                              monkeypatch) -> None:
    """Multi-tenant shape: keyed '/*/api/rN/**' [GET] and public '/*/pages/pN'. No pair
    overlaps (no warning), yet fall_throughs met every keyed route with every public one
    (a keyed glob starting with '*' took all publics as candidates): 2500 + 2500 routes spent
    3.9 s of a 5.0 s load in it. The public globs are indexed: counted, not timed, as the
    case check above."""
    import gateway.routes as routes_module
    calls = []
    real = routes_module._meet
    monkeypatch.setattr(routes_module, "_meet", lambda a, b: calls.append(1) or real(a, b))
    n = 600
    routes = "".join(f"  - {{path: '/*/api/r{i}/**', methods: [GET], upstream: crm, "
                     f"scopes: [r{i}]}}\n" for i in range(n))
    routes += "".join(f"  - {{path: '/*/pages/p{i}', upstream: crm, public: true}}\n"
                      for i in range(n))
    config = load_config(write(tmp_path, UPSTREAM + "routes:\n" + routes))
    assert config.warnings == ()
    assert len(calls) <= 20 * 2 * n, f"{len(calls)} glob meets for {2 * n} routes"


def test_verb_warnings_are_capped_and_the_check_stops_on_a_budget(tmp_path: Path,
                                                                  monkeypatch) -> None:
    """Where every pair does overlap (keyed '/tN/**' [GET] routes, then public '/tN/x' ones
    and a public catch-all), a warning per pair was millions of lines (gigabytes of stderr)
    and the check took minutes: the first 20 are shown, then one line counting the rest; and
    the check stops after its budget of comparisons and says so, once."""
    import gateway.routes as routes_module
    n = 300
    keyed = "".join(f"  - {{path: '/t{i}/**', methods: [GET], upstream: crm, scopes: [r]}}\n"
                    for i in range(n))
    publics = "".join(f"  - {{path: '/t{i}/x', upstream: crm, public: true}}\n"
                      for i in range(n))
    text = UPSTREAM + "routes:\n" + keyed + publics + \
        "  - {path: /**, upstream: crm, public: true}\n"
    warnings = [str(w) for w in load_config(write(tmp_path, text)).warnings]
    assert len(warnings) == 21, warnings[-3:]
    assert all(": routes[" in w and "needs a key only for GET and HEAD" in w
               for w in warnings[:20])
    assert warnings[20].endswith(": routes: warning: and 580 more such pairs of a keyed "
                                 "route and a later public route it leaves methods to (only "
                                 "the first 20 are shown); close the ones above and run "
                                 "keygate config check again"), warnings[20]
    # a small budget: cut short, said once, at the keyed route it stopped at
    calls = []
    real = routes_module._meet
    monkeypatch.setattr(routes_module, "_meet", lambda a, b: calls.append(1) or real(a, b))
    monkeypatch.setattr(routes_module, "FALL_THROUGH_BUDGET", 1000)
    warnings = [str(w) for w in load_config(write(tmp_path, text)).warnings]
    assert len(calls) <= 1000
    cut = [w for w in warnings if "stopped here" in w]
    assert len(cut) == 1 and warnings[-1] == cut[0], warnings[-2:]
    at = int(cut[0].split(": routes[")[1].split("]")[0])
    assert 0 < at < n
    assert cut[0].startswith(f"{tmp_path / 'config.yaml'}:{at + 4}: routes[{at}]: warning: the "
                             "check for methods a keyed route leaves to a later public route "
                             "(HTTP verb tampering) stopped here, after 1000 glob comparisons"), cut
    assert f"for {2 * n + 1} routes of this shape" in cut[0]


def _served(config, method: str, path: str):
    """The route ``config``'s matcher gives ``method path``, or its error's code."""
    from gateway.errors import BadRequest
    from gateway.routes import RouteTable
    try:
        return RouteTable(config.routes).match(method, path)
    except BadRequest as exc:
        return exc.code


@pytest.mark.parametrize("public,sent,reading", [
    # a case-insensitive upstream's reading
    ("/API/**", "/API/reports/1", "; the paths compared case-insensitively, as many "
                                  "upstreams compare them"),
    # a trailing-slash-dropping upstream's reading
    ("/api/reports/*/", "/api/reports/1/", "; its paths read without their trailing slash, "
                                           "as many upstreams read them"),
    ("/API/reports/*/", "/API/reports/1/", "; its paths read without their trailing slash "
                                           "and compared case-insensitively, as many "
                                           "upstreams read them"),
])
def test_a_reading_the_matcher_guards_for_get_is_warned_for_other_methods(
        tmp_path: Path, public: str, sent: str, reading: str) -> None:
    """The matcher treats '/API/reports/1' and '/api/reports/1/' as the keyed
    '/api/reports/*' (GET there is refused bad_path: 'matches another route than as sent'),
    but DELETE on the same path is forwarded by the public route without a key, and config
    check said nothing: the overlap analysis compared globs only as written."""
    config = load_config(write(tmp_path, UPSTREAM + "routes:\n"
                               "  - {path: '/api/reports/*', methods: [GET], upstream: crm, "
                               "scopes: [reports:read]}\n"
                               f"  - {{path: '{public}', upstream: crm, public: true}}\n"))
    assert _served(config, "GET", sent) == "bad_path"        # the matcher's own model
    assert _served(config, "DELETE", sent).public            # forwarded without a key
    [warning] = [str(w) for w in config.warnings]
    assert ("routes[0]: warning: '/api/reports/*' needs a key only for GET and HEAD; POST, "
            "PUT, PATCH, DELETE, TRACE and any other method (PURGE, PROPFIND...) on its paths "
            f"fall through to routes[1] '{public}' (line 5{reading}), a public route") \
        in warning, warning


@pytest.mark.parametrize("between,public,sent", [
    ("/api/reports/*", "/API/**", "/API/reports/1"),
    ("/Api/reports/**", "/API/**", "/API/reports/1"),     # case-insensitively
    ("/api/reports/*", "/api/reports/*/", "/api/reports/1/"),
])
def test_a_reading_closed_by_a_keyed_route_for_every_method_is_not_warned(
        tmp_path: Path, between: str, public: str, sent: str) -> None:
    """A keyed route for every method on those paths, as written or case-insensitively,
    between them: the matcher keys or refuses DELETE '/API/reports/1' and '/api/reports/1/'
    too, so nothing falls through."""
    config = load_config(write(tmp_path, UPSTREAM + "routes:\n"
                               "  - {path: '/api/reports/*', methods: [GET], upstream: crm, "
                               "scopes: [reports:read]}\n"
                               f"  - {{path: '{between}', upstream: crm, scopes: [w]}}\n"
                               f"  - {{path: '{public}', upstream: crm, public: true}}\n"))
    assert config.warnings == ()
    served = _served(config, "DELETE", sent)
    assert served == "bad_path" or not served.public, served


API_THEN_WEB = """
upstreams:
  api: {url: "http://api.internal:9001"}
  web: {url: "%s"}
routes:
  - {path: /api/**, methods: [GET], upstream: api, scopes: [read]}
  - {path: /api/**, methods: [POST, PUT, PATCH, DELETE], upstream: api, scopes: [write]}
  - {path: /**, upstream: %s, public: true}
"""


def test_a_public_catch_all_for_another_upstream_is_not_verb_tampering(tmp_path: Path) -> None:
    """The most common shape with a public catch-all: an API behind keys and a public web
    front end (another upstream, another host) for everything else. PURGE/TRACE
    '/api/users' reach the front end, never the API's handlers, yet config check and serve
    warned of verb tampering on every such file."""
    config = load_config(write(tmp_path, API_THEN_WEB % ("http://web.internal:9002", "web")))
    assert [str(w) for w in config.warnings] == []


@pytest.mark.parametrize("web_url,upstream", [
    ("http://web.internal:9002", "api"),         # the same upstream
    ("HTTP://API.internal:9001/site", "web"),    # another name for the same server
])
def test_the_verb_warning_names_what_every_keyed_route_on_those_paths_keys(
        tmp_path: Path, web_url: str, upstream: str) -> None:
    """Where the catch-all does reach the API's server, the warning said '/api/**' needs a
    key only for GET and HEAD, though routes[1] keys every write: it names the methods the
    keyed routes on those paths take together, and only those that fall through."""
    config = load_config(write(tmp_path, API_THEN_WEB % (web_url, upstream)))
    [warning] = [str(w) for w in config.warnings]
    assert ("routes[0]: warning: '/api/**' needs a key only for GET, HEAD, POST, PUT, PATCH "
            "and DELETE; TRACE and any other method (PURGE, PROPFIND...) on its paths fall "
            "through to routes[2] '/**' (line 7), a public route") in warning, warning


@pytest.mark.parametrize("public_upstream,warned", [
    (None, True),       # verify-only both: the proxy asking /verify forwards both
    ("crm", False),     # the keyed paths are the external proxy's, the public route keygate's
])
def test_verify_only_routes_are_compared_with_each_other(tmp_path: Path, public_upstream,
                                                         warned) -> None:
    upstream = f", upstream: {public_upstream}" if public_upstream else ""
    config = load_config(write(tmp_path, UPSTREAM + "routes:\n"
                               "  - {path: /admin/**, methods: [GET], scopes: [admin]}\n"
                               f"  - {{path: /**, public: true{upstream}}}\n"))
    assert bool(config.warnings) == warned, config.warnings


def test_route_methods_are_upper_cased_http_methods(tmp_path: Path) -> None:
    path = write(tmp_path, UPSTREAM + "routes:\n  - {path: /x/*, upstream: crm, "
                                      "methods: [get, Post, GET]}\n")
    assert load_config(path).routes == (Route("/x/*", "crm", ("GET", "POST")),)
    assert problems_of(tmp_path, UPSTREAM + "routes:\n  - {path: /x, upstream: crm, "
                                            "methods: [GET, FETCH]}\n") == [
        "config.yaml:4: routes[0].methods[1]: 'FETCH' is not an HTTP method "
        "(GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS, TRACE, CONNECT)"]


def test_public_route_cannot_require_scopes(tmp_path: Path) -> None:
    assert problems_of(tmp_path, UPSTREAM + "routes:\n  - {path: /x, upstream: crm, "
                                            "public: true, scopes: [a:b]}\n") == [
        "config.yaml:4: routes[0].scopes: a public route cannot require scopes "
        "(no key is checked)"]


def test_a_websocket_route_is_read_and_must_be_able_to_tunnel(tmp_path: Path) -> None:
    path = write(tmp_path, UPSTREAM + "routes:\n  - {path: /ws/*, upstream: crm, "
                                      "websocket: true}\n")
    assert load_config(path).routes == (Route("/ws/*", "crm", websocket=True),)
    assert problems_of(tmp_path, UPSTREAM + "routes:\n"
                       "  - {path: /a, upstream: crm, methods: [POST], websocket: true}\n"
                       "  - {path: /b, websocket: true}\n"
                       "  - {path: /c, upstream: crm, websocket: 'sure'}\n") == [
        "config.yaml:4: routes[0].websocket: a WebSocket handshake is a GET, which this "
        "route's methods leave out (add GET to methods)",
        "config.yaml:5: routes[1].websocket: a route without an upstream tunnels nothing "
        "(add upstream)",
        "config.yaml:6: routes[2].websocket: expected true or false, got a string ('sure')"]


def test_upstream_url_must_be_http_with_a_host(tmp_path: Path) -> None:
    assert problems_of(tmp_path, """
        upstreams:
          crm: {url: "ftp://x"}
          billing: {timeout: 5}
    """) == [
        "config.yaml:2: upstreams.crm.url: 'ftp://x' must be an http:// or https:// URL "
        "with a host, e.g. http://127.0.0.1:9000",
        "config.yaml:3: upstreams.billing.url: required (e.g. http://127.0.0.1:9000)",
    ]


def test_upstream_url_is_refused_at_load_where_it_could_not_be_forwarded_to(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # each was accepted: the user:password was dropped without a word (the upstream saw no
    # credentials) and echoed in every other problem with the URL; '[::1]x' made the gateway
    # fail to start with a traceback after 'config check' said ok; a host with a space, or
    # port 0, answered every request 502
    monkeypatch.setenv("CRM_PASSWORD", "hunter2-not-for-logs")
    problems = problems_of(tmp_path, """
        upstreams:
          crm: {url: "https://svc:${CRM_PASSWORD}@crm.internal"}
          billing: "http://svc:${CRM_PASSWORD}@billing.internal/?v=1"
          files: "ftp://svc:${CRM_PASSWORD}@files.internal/"
          old: "http://svc:${CRM_PASSWORD}@[::1/"
          v6: "http://[::1]x/"
          spaced: "http://crm internal/"
          zero: "http://crm.internal:0/"
          ok6: "http://[::1]:9000/base"
          idn: "http://éx.example/"
    """)
    assert problems == [
        "config.yaml:2: upstreams.crm.url: the value from ${CRM_PASSWORD} is invalid: must "
        "not carry a user name or password "
        "(user:password@ before the host): keygate sends none to an upstream",
        "config.yaml:3: upstreams.billing: the value from ${CRM_PASSWORD} is invalid: must "
        "not carry a user name or password "
        "(user:password@ before the host): keygate sends none to an upstream",
        "config.yaml:4: upstreams.files: the value from ${CRM_PASSWORD} is invalid",
        "config.yaml:5: upstreams.old: the value from ${CRM_PASSWORD} is invalid",
        "config.yaml:6: upstreams.v6: 'http://[::1]x/' is not a valid URL (bad host or port)",
        "config.yaml:7: upstreams.spaced: 'http://crm internal/' is not a valid URL (bad host "
        "or port)",
        "config.yaml:8: upstreams.zero: 'http://crm.internal:0/' is not a valid URL (bad host "
        "or port)",
    ]


# A CA certificate (public part only) for the ca_file checks that need a valid PEM bundle.
TEST_CA_PEM = """\
-----BEGIN CERTIFICATE-----
MIIBlzCCAT2gAwIBAgIUY3XyKrzNLjmq2mMohn05meuOcvQwCgYIKoZIzj0EAwIw
ITEfMB0GA1UEAwwWa2V5Z2F0ZSBjb25maWctdGVzdCBDQTAeFw0yNjExMjUxNDA3
MzNaFw0zNjExMjIxNDA3MzNaMCExHzAdBgNVBAMMFmtleWdhdGUgY29uZmlnLXRl
c3QgQ0EwWTATBgcqhkjOPQIBBggqhkjOPQMBBwNCAASJKcAmpo+Twe4dvsWeL/mn
c6GtX4MSR9Bx/bmjFnpAGcb5+oAyh6DtsXbKuLBisasZIqX1lcyn3DfboNmyRr+h
o1MwUTAdBgNVHQ4EFgQU7CGoEvrwwuSxRV2yamDue+ktF+UwHwYDVR0jBBgwFoAU
7CGoEvrwwuSxRV2yamDue+ktF+UwDwYDVR0TAQH/BAUwAwEB/zAKBggqhkjOPQQD
AgNIADBFAiEAqWYRn9h+ndp32wBeAgvrer18wSkuEVGtHPZODDBxvHwCICgDoj8z
J4R8PgRWbUZjgFsNfG5vdN+8OLvIf15ePIPL
-----END CERTIFICATE-----
"""


def test_upstream_ca_file_loads_and_expands_env(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "ca.pem").write_text(TEST_CA_PEM)
    monkeypatch.setenv("KG_TEST_CA_DIR", str(tmp_path))
    config = load_config(write(tmp_path, """
        upstreams:
          crm: {url: "https://crm.internal:8443", ca_file: "${KG_TEST_CA_DIR}/ca.pem"}
          plain: {url: "https://api.example.com"}
          nulled: {url: "https://api.example.com", ca_file: null}
    """))
    assert config.upstreams["crm"].ca_file == str(tmp_path / "ca.pem")
    assert config.upstreams["crm"].timeout == 30.0
    assert config.upstreams["plain"].ca_file is None
    assert config.upstreams["nulled"].ca_file is None


def test_upstream_ca_file_problems(tmp_path: Path) -> None:
    (tmp_path / "ca.pem").write_text(TEST_CA_PEM)
    (tmp_path / "notes.txt").write_text("not a certificate\n")
    (tmp_path / "cut.pem").write_text("\n".join(TEST_CA_PEM.splitlines()[:5])
                                      + "\n-----END CERTIFICATE-----\n")
    (tmp_path / "dir").mkdir()
    problems = problems_of(tmp_path, f"""
        upstreams:
          a: {{url: "https://a", ca_file: "{tmp_path}/missing.pem"}}
          b: {{url: "https://b", ca_file: "{tmp_path}/notes.txt"}}
          c: {{url: "https://c", ca_file: "{tmp_path}/cut.pem"}}
          d: {{url: "http://d", ca_file: "{tmp_path}/ca.pem"}}
          e: {{url: "https://e", ca_file: 5}}
          f: {{url: "https://f", ca_file: "{tmp_path}/dir"}}
    """)
    assert [p.replace(str(tmp_path) + "/", "") for p in problems] == [
        "config.yaml:2: upstreams.a.ca_file: cannot read 'missing.pem': "
        "No such file or directory",
        "config.yaml:3: upstreams.b.ca_file: 'notes.txt' is not a PEM bundle of CA "
        "certificates (no certificate found in it)",
        "config.yaml:4: upstreams.c.ca_file: 'cut.pem' is not a PEM bundle of CA "
        "certificates (a damaged PEM block)",
        "config.yaml:5: upstreams.d.ca_file: only applies to an https:// url, and this "
        "upstream's url is http:// (use https:// or remove ca_file)",
        "config.yaml:6: upstreams.e.ca_file: expected a string, got an integer (5)",
        "config.yaml:7: upstreams.f.ca_file: 'dir' is not a regular file (a directory)",
    ]


def test_key_settings_are_validated(tmp_path: Path) -> None:
    assert problems_of(tmp_path, """
        keys:
          prefix: KG_
          environments: [live, Prod]
          headers: [Authorization, "X Key"]
    """) == [
        "config.yaml:2: keys.prefix: 'KG_' is not a valid key prefix (1-10 of a-z, 0-9)",
        "config.yaml:3: keys.environments[1]: 'Prod' is not a valid environment name "
        "(1-16 of a-z, 0-9)",
        "config.yaml:4: keys.headers[0]: Authorization is always read as 'Bearer <key>'; "
        "list only other headers here",
        "config.yaml:4: keys.headers[1]: 'X Key' is not a valid HTTP header name",
    ]


def test_identity_headers_must_be_distinct(tmp_path: Path) -> None:
    assert problems_of(tmp_path, """
        identity_headers:
          workspace: X-Tenant
          plan: x_tenant
    """) == ["config.yaml:3: identity_headers.plan: 'x_tenant' is already used for "
             "identity_headers.workspace"]


def test_cors_problems_name_the_field(tmp_path: Path) -> None:
    assert problems_of(tmp_path, """
        cors:
          allow_origins:
            - https://app.example/
            - "null"
            - https://*.example.com
            - app.example
            - https://user@app.example
            - https://app.example:99999
            - HTTPS://App.Example:443
            - https://app.example
          allow_headers: [Idempotency-Key, "*", "bad header"]
          expose_headers: [X-Total, x-total]
          max_age: 100000
          allow_credentials: "sure"
    """) == [
        "config.yaml:3: cors.allow_origins[0]: 'https://app.example/': an origin has no path; "
        "write it without the trailing '/'",
        "config.yaml:4: cors.allow_origins[1]: 'null' is the origin of sandboxed frames and "
        "file: pages, which any site can produce; it cannot be allowed",
        "config.yaml:5: cors.allow_origins[2]: 'https://*.example.com': wildcards are not "
        "supported; list each origin",
        "config.yaml:6: cors.allow_origins[3]: 'app.example' is not an origin "
        "(scheme://host[:port])",
        "config.yaml:7: cors.allow_origins[4]: 'https://user@app.example' is not an origin "
        "(scheme://host[:port], no path, query or user)",
        "config.yaml:8: cors.allow_origins[5]: 'https://app.example:99999' has an invalid port",
        "config.yaml:10: cors.allow_origins[7]: 'https://app.example' is listed twice",
        "config.yaml:11: cors.allow_headers[1]: list header names: '*' is not supported (it "
        "never covers Authorization, and means nothing with credentials)",
        "config.yaml:11: cors.allow_headers[2]: 'bad header' is not a valid HTTP header name",
        "config.yaml:12: cors.expose_headers: lists the same header twice",
        "config.yaml:13: cors.max_age: must be between 0 and 86400, got 100000",
        "config.yaml:14: cors.allow_credentials: expected true or false, got a string ('sure')",
    ]


def test_cors_refuses_credentials_for_any_origin_and_needs_origins(tmp_path: Path) -> None:
    assert problems_of(tmp_path, """
        cors:
          allow_origins: "*"
          allow_credentials: true
    """) == ["config.yaml:3: cors.allow_credentials: cannot be true with allow_origins: '*' "
             "(browsers refuse credentials for any origin); list the origins instead"]
    assert problems_of(tmp_path, """
        cors: {max_age: 5}
    """) == ["config.yaml:1: cors.allow_origins: required ('*' or a list of origins such as "
             "https://app.example)"]
    assert problems_of(tmp_path, """
        cors: {allow_origins: https://app.example}
    """) == ["config.yaml:1: cors.allow_origins: expected '*' or a list of origins, got "
             "'https://app.example' (write a single origin as a one-item list)"]
    assert problems_of(tmp_path, """
        cors: {allow_origins: []}
    """) == ["config.yaml:1: cors.allow_origins: list at least one origin (or leave cors out)"]


def test_cors_origins_are_kept_as_browsers_send_them(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, with_upstream("""
        routes: [{path: /x, upstream: crm}]
        cors:
          allow_origins: ["HTTPS://App.Example:443", "http://localhost:3000",
                          "http://[::1]:80", "capacitor://localhost",
                          "http://Web_App:3000"]
    """)))
    # a name with '_' (a Compose service, say) is one browsers send as is
    assert config.cors.allow_origins == ("https://app.example", "http://localhost:3000",
                                         "http://[::1]", "capacitor://localhost",
                                         "http://web_app:3000")
    assert (config.cors.max_age, config.cors.allow_credentials) == (600, False)
    assert load_config(write(tmp_path, UPSTREAM)).cors is None


# (as listed, what Chromium 156's `new URL(s).origin` gives: what it sends as Origin)
BROWSER_ORIGINS = (
    ("https://Bücher.example", "https://xn--bcher-kva.example"),   # IDNA, as browsers send it
    ("https://faß.example", "https://xn--fa-hia.example"),         # UTS 46, non-transitional
    ("https://日本.example:8443", "https://xn--wgv71a.example:8443"),
    ("http://[0:0:0:0:0:0:0:1]:8080", "http://[::1]:8080"),        # IPv6, compressed
    ("http://[::FFFF:1.2.3.4]", "http://[::ffff:102:304]"),
    ("http://[1:0:0:2:0:0:0:3]", "http://[1:0:0:2::3]"),           # the longest run of zeros
    ("http://127.1:3000", "http://127.0.0.1:3000"),                # IPv4 in any form browsers take
    ("http://0x7f.0.0.2", "http://127.0.0.2"),
    ("http://0177.0.0.3", "http://127.0.0.3"),
    ("http://2130706436", "http://127.0.0.4"),
    ("http://1.2.3.4.", "http://1.2.3.4"),
)


def test_cors_origins_are_compared_as_browsers_serialise_hosts(tmp_path: Path) -> None:
    """An origin listed with a Unicode name was refused as "not an origin", and one listed
    with an IPv6 or IPv4 address spelt another way than browsers serialise it
    (``[0:0:0:0:0:0:0:1]``, ``127.1``) was taken as written, so the ``Origin`` a browser sent
    never matched it and the page could read nothing, with no word why. Each is now kept as
    a browser sends it; a numeric host no browser takes is a problem."""
    items = ", ".join(f'"{listed}"' for listed, _ in BROWSER_ORIGINS)
    config = load_config(write(tmp_path, with_upstream(f"""
        routes: [{{path: /x, upstream: crm}}]
        cors:
          allow_origins: [{items}]
    """)))
    assert config.cors.allow_origins == tuple(sent for _, sent in BROWSER_ORIGINS)
    assert problems_of(tmp_path, """
        cors:
          allow_origins: ["http://256.1.1.1", "https://example.123", "http://[1::2::3]",
                          "https://b\\u200Dcher.example", "http://127.0.0.1", "http://127.1",
                          "http://[fe80::1%25eth0]"]
    """) == [
        "config.yaml:2: cors.allow_origins[0]: 'http://256.1.1.1' is not an IPv4 address "
        "browsers take",
        "config.yaml:2: cors.allow_origins[1]: 'https://example.123' is not an IPv4 address "
        "browsers take",
        "config.yaml:2: cors.allow_origins[2]: 'http://[1::2::3]' is not an origin "
        "(scheme://host[:port])",
        "config.yaml:3: cors.allow_origins[3]: 'https://b\\u200dcher.example' is not an origin "
        "(scheme://host[:port]): its name is not a valid domain name (Joiner U+200D not "
        "allowed at position 2 in 'b\\u200dcher'); list it as browsers send it, IDNA-encoded "
        "(xn--...)",
        "config.yaml:3: cors.allow_origins[5]: 'http://127.0.0.1' is listed twice",
        "config.yaml:4: cors.allow_origins[6]: 'http://[fe80::1%25eth0]' is not an origin "
        "(scheme://host[:port])",
    ]


def test_a_listener_host_with_spaces_or_control_characters_is_a_problem(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A host no listener can bind (`127.0.0.1\\n...`, often an env file's stray newline or
    carriage return): config check said ok, then serve failed on it with a message the
    newline split in two (a forged line in the log)."""
    monkeypatch.setenv("KG_TEST_HOST", "127.0.0.1\r")
    assert problems_of(tmp_path, with_upstream("""
        server:
          host: ${KG_TEST_HOST}
        admin:
          host: "local host"
        routes:
          - {path: /x, upstream: crm}
    """)) == [
        "config.yaml:4: server.host: the value from ${KG_TEST_HOST} is invalid",
        "config.yaml:6: admin.host: 'local host' is not a host name or IP address (it has a "
        "space or control character)"]


def test_trusted_proxies_are_ips_or_networks(tmp_path: Path) -> None:
    assert problems_of(tmp_path, "server:\n  trusted_proxies: [10.0.0.0/8, '::1', lb.local]\n"
                       ) == ["config.yaml:2: server.trusted_proxies[2]: 'lb.local' is not an "
                             "IP address or CIDR network (e.g. 10.0.0.0/8)"]


# --- environment expansion -------------------------------------------------------------------

def test_env_reference_expands_when_set(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                        ) -> None:
    monkeypatch.setenv("KG_TEST_CRM_URL", "http://10.1.2.3:9000")
    monkeypatch.setenv("KG_TEST_PORT", "9999")
    config = load_config(write(tmp_path, """
        server:
          port: ${KG_TEST_PORT}
        upstreams:
          crm: {url: "${KG_TEST_CRM_URL}"}
    """))
    assert config.upstreams["crm"].url == "http://10.1.2.3:9000"
    assert config.server.port == 9999  # an unquoted reference takes the type of its value


def test_env_reference_to_an_unset_variable_names_it(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KG_TEST_UNSET", raising=False)
    assert problems_of(tmp_path, "upstreams:\n  crm:\n    url: ${KG_TEST_UNSET}\n") == [
        "config.yaml:3: upstreams.crm.url: environment variable KG_TEST_UNSET is not set "
        "(set it, or write ${KG_TEST_UNSET:-default})"]


def test_a_bad_value_from_the_environment_is_never_repeated(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    """A value that came from ``${NAME}`` may be a secret (``port: ${ADMIN_TOKEN}``, a variable
    mixed up): problems go to the terminal, the log and a reload's answer, and used to quote
    up to 40 characters of it. They name the field and the variable instead, and keep the
    reason when it does not hold the value."""
    from gateway.cli import main
    secret = "tok-Zq8v2LxA9pK3mW7rT1yB6nC4dF0hJ5sG"
    monkeypatch.setenv("KG_TEST_SECRET", secret)
    monkeypatch.setenv("KG_TEST_PORT", "0x1F90")  # 8080, the proxy's port: a cross-field one
    monkeypatch.setenv("KG_TEST_OCTAL", "0777")
    path = write(tmp_path, with_upstream("""
        server:
          port: ${KG_TEST_SECRET}
          log_level: ${KG_TEST_SECRET}
          workers: ${KG_TEST_OCTAL}
          trusted_proxies: ["${KG_TEST_SECRET}"]
          timeouts:
            idle: x${KG_TEST_SECRET}
        admin:
          port: ${KG_TEST_PORT}
        routes:
          - {path: /x, upstream: "${KG_TEST_SECRET}"}
    """))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    problems = [p.replace(str(tmp_path) + "/", "") for p in info.value.problems]
    assert problems == [
        "config.yaml:4: server.port: the value from ${KG_TEST_SECRET} is invalid: expected "
        "an integer",
        "config.yaml:5: server.log_level: the value from ${KG_TEST_SECRET} is invalid: must "
        "be one of debug, info, warning, error",
        "config.yaml:6: server.workers: the value from ${KG_TEST_OCTAL} is invalid",
        "config.yaml:7: server.trusted_proxies[0]: the value from ${KG_TEST_SECRET} is "
        "invalid",
        "config.yaml:9: server.timeouts.idle: the value from ${KG_TEST_SECRET} is invalid: "
        "expected a number of seconds",
        "config.yaml:11: admin.port: the value from ${KG_TEST_PORT} is invalid: the admin "
        "listener cannot share port ${KG_TEST_PORT} with the proxy listener",
        "config.yaml:13: routes[0].upstream: the value from ${KG_TEST_SECRET} is invalid",
    ]
    for argv in (["config", "check", str(path)], ["serve", "--config", str(path)]):
        assert main(argv) == 1
        out = capsys.readouterr()
        shown = out.out + out.err
        assert "KG_TEST_SECRET" in shown
        assert not any(secret[i:i + 6] in shown for i in range(len(secret) - 5)), shown
        assert "0777" not in shown and "511" not in shown and "8080" not in shown


def test_env_reference_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KG_TEST_UNSET", raising=False)
    monkeypatch.setenv("KG_TEST_EMPTY", "")
    config = load_config(write(tmp_path, """
        store:
          redis_url: ${KG_TEST_UNSET:-redis://127.0.0.1:6379/0}
          data_dir: ${KG_TEST_EMPTY:-/var/lib/keygate}
        admin:
          token_env: KG_${KG_TEST_UNSET:-ADMIN}_TOKEN
    """))
    assert config.store.redis_url == "redis://127.0.0.1:6379/0"
    assert config.store.data_dir == "/var/lib/keygate"
    assert config.admin.token_env == "KG_ADMIN_TOKEN"


def test_a_reference_without_fallback_to_an_empty_variable_is_a_problem_naming_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # an empty KEYGATE_REDIS_URL (a Secret's key left blank) read "store.redis_url: expected
    # a string, got null", naming no variable; in part of a value it was taken as nothing.
    # ${NAME-} is how a value says empty will do.
    monkeypatch.setenv("KG_TEST_EMPTY", "")
    monkeypatch.setenv("KG_TEST_SPACE", " ")
    assert problems_of(tmp_path, """
        store:
          redis_url: ${KG_TEST_EMPTY}
          data_dir: /data/${KG_TEST_SPACE}/kg
    """) == [
        "config.yaml:2: store.redis_url: environment variable KG_TEST_EMPTY is empty (set "
        "it, or write ${KG_TEST_EMPTY:-default})",
        "config.yaml:3: store.data_dir: environment variable KG_TEST_SPACE is empty (set "
        "it, or write ${KG_TEST_SPACE:-default})",
    ]
    config = load_config(write(tmp_path, """
        store:
          data_dir: /data${KG_TEST_EMPTY-}/kg
    """))
    assert config.store.data_dir == "/data/kg"


def test_a_reference_in_a_fallback_is_a_problem_not_a_stray_brace(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # '${A:-${B}}' was read as '${A:-${B}' then '}': with A set, its value and a stray '}'
    # (host 'crm.internal}'); with A unset, the text '${B}' itself
    monkeypatch.setenv("KG_TEST_HOST", "crm.internal")
    monkeypatch.delenv("KG_TEST_UNSET", raising=False)
    assert problems_of(tmp_path, """
        server:
          host: ${KG_TEST_HOST:-${KG_TEST_FALLBACK}}
        store:
          data_dir: /data/${KG_TEST_UNSET-${HOME}}/kg
    """) == [
        "config.yaml:2: server.host: bad environment reference '${KG_TEST_HOST:-${...' (a "
        "fallback cannot hold another ${...}; use ${NAME} or ${NAME:-default})",
        "config.yaml:4: store.data_dir: bad environment reference '${KG_TEST_UNSET-${...' (a "
        "fallback cannot hold another ${...}; use ${NAME} or ${NAME:-default})",
    ]


def test_a_secret_given_where_its_variable_name_belongs_is_never_echoed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``admin.token_env`` and ``identity_signature.secret_env`` name the variable that holds
    a secret; ``${KEYGATE_ADMIN_TOKEN}`` there (the file's other values take ${...}) puts the
    secret itself in the field, and the problem quoted it: the operator token or the signing
    secret went to ``config check``'s output, to the log of a reload and to the reload's 400
    answer. The problem says what the field wants without repeating the value."""
    monkeypatch.setenv("KG_TEST_SECRET", "s3cret-VALUE/with+chars=")
    problems = problems_of(tmp_path, with_upstream("""
        admin:
          token_env: ${KG_TEST_SECRET}
        identity_signature:
          secret_env: ${KG_TEST_SECRET}
        routes:
          - {path: /x, upstream: crm, public: true}
    """))
    wants = ("must be the name of the environment variable that holds the secret (letters, "
             "digits and _), not the secret itself")
    given = "the value from ${KG_TEST_SECRET} is invalid"
    assert problems == [f"config.yaml:4: admin.token_env: {given}: {wants}",
                        f"config.yaml:6: identity_signature.secret_env: {given}: {wants}"]
    assert not any("s3cret" in p for p in problems)

def test_expanded_value_is_still_validated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                           ) -> None:
    monkeypatch.setenv("KG_TEST_PORT", "http")
    assert problems_of(tmp_path, "server:\n  port: ${KG_TEST_PORT}\n") == [
        "config.yaml:2: server.port: the value from ${KG_TEST_PORT} is invalid: expected an "
        "integer"]


# --- the shipped example ---------------------------------------------------------------------

def test_example_config_loads_clean(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CRM_URL", raising=False)
    monkeypatch.delenv("KEYGATE_REDIS_URL", raising=False)
    assert check_config(EXAMPLE) == []
    config = load_config(EXAMPLE)
    assert list(config.plans) == ["starter", "pro", "business", "enterprise"]
    assert config.default_plan == "starter"
    starter, enterprise = config.plans["starter"], config.plans["enterprise"]
    assert (starter.monthly_requests, starter.max_keys, starter.rate_limit) == (
        1000, 5, RateLimit(5, 1))
    assert (enterprise.monthly_requests, enterprise.max_keys, enterprise.rate_limit) == (
        None, None, RateLimit(200, 1))
    assert config.roles["reader"] == ("people:read", "companies:read", "interactions:read")
    assert config.roles["admin"] == ("ALL", "keys:admin")
    assert config.upstreams["crm"].url == "http://127.0.0.1:9000"
    assert config.store.redis_url == "embedded"
    route_scopes = {scope for route in config.routes for scope in route.scopes}
    assert route_scopes == {"people:read", "people:write", "companies:read", "companies:write",
                            "companies:remove", "interactions:read", "interactions:write"}
    assert config.routes[0] == Route("/health", "crm", ("GET",), (), True)
    assert Route("/companies/*", "crm", ("DELETE",), ("companies:remove",)) in config.routes
    assert all(route.upstream == "crm" for route in config.routes)


def test_example_config_follows_crm_url(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CRM_URL", "https://crm.internal:8443")
    assert load_config(EXAMPLE).upstreams["crm"].url == "https://crm.internal:8443"


# --- YAML conveniences -------------------------------------------------------------------------

def test_anchors_and_merge_keys_with_x_extension_keys(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, """
        x-small: &small {monthly_requests: 1000, max_keys: 5}
        plans:
          starter: {<<: *small, rate_limit: 5/s}
          trial: {<<: *small, max_keys: 1}
        upstreams:
          crm: http://127.0.0.1:9000
    """))
    assert config.plans["trial"].max_keys == 1
    assert config.plans["trial"].monthly_requests == 1000
    assert config.plans["starter"].rate_limit == RateLimit(5, 1)
    assert config.upstreams["crm"].url == "http://127.0.0.1:9000"


def test_an_anchored_mapping_with_a_merge_key_reads_the_same_each_time_it_is_used(
        tmp_path: Path) -> None:
    # the second use of 'pro' once read the keys merged in at its first use as keys given
    # twice, and refused a valid file with "duplicate key (first given on line 1)"
    config = load_config(write(tmp_path, """
        x-small: &small {monthly_requests: 1000, max_keys: 5}
        plans:
          pro: &pro
            <<: *small
            monthly_requests: 5000
          pro-annual: *pro
    """))
    assert config.plans["pro"].monthly_requests == 5000
    assert config.plans["pro-annual"].monthly_requests == 5000
    assert config.plans["pro-annual"].max_keys == 5


def test_of_the_mappings_a_merge_key_lists_the_earlier_wins_as_yaml_has_it(
        tmp_path: Path) -> None:
    # YAML's merge key: "keys in mapping nodes earlier in the sequence override keys
    # specified in later mapping nodes" (yaml.safe_load agrees); the later one used to win
    config = load_config(write(tmp_path, """
        x-big: &big {monthly_requests: 100000, max_keys: 50}
        x-small: &small {monthly_requests: 1000, max_keys: 5, rate_limit: 5/s}
        plans:
          pro: {<<: [*big, *small]}
          trial: {<<: [*small, *big], max_keys: 1}
    """))
    assert config.plans["pro"].monthly_requests == 100000
    assert config.plans["pro"].max_keys == 50
    assert config.plans["pro"].rate_limit == RateLimit(5, 1)
    assert config.plans["trial"].monthly_requests == 1000
    assert config.plans["trial"].max_keys == 1


def test_a_key_given_twice_in_a_mapping_only_merged_is_a_problem(tmp_path: Path) -> None:
    # an x- anchor is never read as a section itself: its duplicate went unnoticed, the last
    # one winning without a word
    assert problems_of(tmp_path, """
        x-defaults: &defaults
          monthly_requests: 1000
          max_keys: 5
          monthly_requests: 10
        plans:
          starter: {<<: *defaults}
    """) == ["config.yaml:4: plans.starter: bad merge key: 'monthly_requests' is given twice "
             "in a merged mapping (first on line 2)"]


@pytest.mark.parametrize("text, line", [
    ("server: " + "[" * 5000 + "]" * 5000 + "\n", 1),
    ("server:\n" + "".join("  " * i + f"k{i}:\n" for i in range(1, 2000)), 101),
    ("x-a0: &a0 {port: 1}\n" + "".join(f"x-a{i}: &a{i} {{<<: *a{i - 1}}}\n"
                                       for i in range(1, 1500)) + "server: *a1499\n", 1),
])
def test_nesting_too_deep_is_one_problem_not_a_traceback(tmp_path: Path, text: str,
                                                         line: int) -> None:
    """Said at once: a reload reads the file in a thread that holds the GIL, so the event
    loop serves nothing while it reads (5000 flow brackets cost ~11 s of CPU to refuse)."""
    import time
    path = tmp_path / "config.yaml"
    path.write_text(text)
    started = time.process_time()
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.problems == [f"{path}:{line}: top level: nested too deeply (more "
                                   "than 100 levels of mappings, lists or merge keys)"]
    assert time.process_time() - started < 1.0


def test_a_tag_other_than_yamls_own_is_one_line_problem_and_never_read(tmp_path: Path) -> None:
    # a python tag on a value was a three-line problem (PyYAML's message, with the file's line
    # quoted under it); on a section it was ignored without a word
    problems = problems_of(tmp_path, """
        server:
          host: !!python/name:os.system
          port: !!int "8080"
        admin: !!python/object:gateway.settings.AdminConfig {port: 9000}
        routes: !!omap [{path: /x}]
        keys:
          prefix: !secret kg
          headers: !!binary "not base64 !"
        store:
          data_dir: !!binary "not base64 !"
    """)
    assert problems[:-1] == [
        "config.yaml:2: server.host: the tag '!!python/name:os.system' is not allowed "
        "(keygate reads plain YAML values)",
        "config.yaml:4: admin: the tag '!!python/object:gateway.settings.AdminConfig' is not "
        "allowed (keygate reads plain YAML values)",
        "config.yaml:5: routes: the tag '!!omap' is not allowed (keygate reads plain YAML "
        "values)",
        "config.yaml:7: keys.prefix: the tag '!secret' is not allowed (keygate reads plain "
        "YAML values)",
        "config.yaml:8: keys.headers: expected a list, got binary data",
    ]
    assert problems[-1].startswith("config.yaml:10: store.data_dir: cannot read this value: "
                                   "failed to decode base64 data: ")
    assert all("\n" not in p for p in problems)


def test_wrong_shapes_are_problems_not_crashes(tmp_path: Path) -> None:
    assert problems_of(tmp_path, """
        plans: [starter, pro]
        routes: {path: /x}
        server:
          port: {value: 8080}
    """) == [
        "config.yaml:1: plans: expected a mapping, got a list",
        "config.yaml:2: routes: expected a list, got a mapping",
        "config.yaml:4: server.port: expected a single value, got a mapping",
    ]


def test_admin_listener_cannot_share_the_proxy_port(tmp_path: Path) -> None:
    assert problems_of(tmp_path, "admin:\n  port: 8080\n") == [
        "config.yaml:2: admin.port: the admin listener cannot share port 8080 with the proxy "
        "listener"]


@pytest.mark.parametrize("server, admin, shared", [
    ("localhost", "127.0.0.1", "localhost and 127.0.0.1 both bind 127.0.0.1"),
    ("127.0.0.1", "127.1", "127.0.0.1 and 127.1 both bind 127.0.0.1"),
    ("0", "127.0.0.1", "0 binds 0.0.0.0, every address"),
    ("127.0.0.1", "0x0", "0x0 binds 0.0.0.0, every address"),
])
def test_listeners_that_bind_one_address_cannot_share_a_port(tmp_path: Path, server: str,
                                                             admin: str, shared: str) -> None:
    """`server.host: localhost` and `admin.host: 127.0.0.1` on one port passed `config check`
    (only the same spelling, or a written wildcard, was compared), and serve then failed to
    bind the second listener. Each host is resolved as serve binds it (getaddrinfo, passive)."""
    assert problems_of(tmp_path, f"""
        server: {{host: '{server}', port: 8080}}
        admin: {{host: '{admin}', port: 8080}}
    """) == [f"config.yaml:2: admin.port: the admin listener cannot share port 8080 with the "
             f"proxy listener ({shared})"]


@pytest.mark.parametrize("server, admin", [("127.0.0.1", "127.0.0.2"), ("127.0.0.1", "::1"),
                                           ("localhost", "10.255.255.1")])
def test_listeners_on_distinct_addresses_may_share_a_port(tmp_path: Path, server: str,
                                                          admin: str) -> None:
    write(tmp_path, with_upstream(f"""
        server: {{host: '{server}', port: 8080}}
        admin: {{host: '{admin}', port: 8080}}
    """))
    load_config(tmp_path / "config.yaml")


@pytest.mark.parametrize("url, name", [
    ("redis://127.0.0.1:6379/0?bogus=1", "bogus"),
    ("redis://:pw@127.0.0.1/0?sokcet_timeout=1", "sokcet_timeout"),   # a typo of socket_timeout
    ("unix:///run/redis.sock?db=0&client_nmae=kg", "client_nmae"),
    # options only a TCP connection takes, on a socket (and the reverse): redis-py's socket
    # connection refuses them with a TypeError at the first command, as it does a typo
    ("unix:///run/redis.sock?socket_keepalive=true", "socket_keepalive"),
    ("unix:///run/redis.sock?socket_type=1", "socket_type"),
    ("unix:///run/redis.sock?host=10.0.0.1", "host"),
    ("redis://127.0.0.1:6379/0?path=/run/redis.sock", "path"),
])
def test_an_unknown_store_url_option_is_a_problem_naming_it(tmp_path: Path, url: str,
                                                            name: str) -> None:
    """redis-py hands every query option to its connection class, which raised TypeError at
    the first admin call; `config check` said ok."""
    problems = problems_of(tmp_path, f"store:\n  redis_url: '{url}'\n")
    assert len(problems) == 1 and problems[0].startswith("config.yaml:2: store.redis_url: ")
    assert f"unknown query parameter {name!r}" in problems[0] and "pw" not in problems[0]


@pytest.mark.parametrize("url, named", [
    ("redis://127.0.0.1:6379?protocol=9", "protocol of the URL must be 2 or 3"),
    ("rediss://127.0.0.1:6379?protocol=1", "protocol of the URL must be 2 or 3"),
    ("unix:///run/redis.sock?protocol=0", "protocol of the URL must be 2 or 3"),
    ("redis://127.0.0.1:6379?db=-1", "db of the URL must be a database number"),
    ("unix:///run/redis.sock?db=-1", "db of the URL must be a database number"),
    ("redis://127.0.0.1:6379/0?db=2147483648", "db of the URL must be a database number"),
    ("redis://127.0.0.1:6379/99999999999", "db of the URL must be a database number"),
    ("redis+sentinel://127.0.0.1:26379/mymaster/99999999999",
     "the database of a redis+sentinel:// URL must be a number from 0 to 2147483647"),
    ("redis+sentinel://127.0.0.1:26379/mymaster/\u00b2",
     "the database of a redis+sentinel:// URL must be a number"),
])
def test_a_store_url_protocol_or_database_no_client_can_use_is_a_problem(
        tmp_path: Path, url: str, named: str) -> None:
    """``?protocol=9`` passed `config check` and then every store call failed with redis-py's
    "protocol must be either 2 or 3"; ``?db=-1`` passed (though ``/-1`` in the path is
    refused) and Redis answered every SELECT "ERR DB index is out of range". Each is now a
    one-line problem naming the option, in every URL form that takes it."""
    problems = problems_of(tmp_path, f"store:\n  redis_url: '{url}'\n")
    assert len(problems) == 1 and problems[0].startswith("config.yaml:2: store.redis_url: "), \
        problems
    assert named in problems[0], problems


def test_store_url_protocols_and_databases_in_range_are_no_problem() -> None:
    from gateway.redis_urls import check_store_url
    for url in ("redis://127.0.0.1:6379?protocol=2", "redis://127.0.0.1:6379/0?protocol=3",
                "unix:///run/redis.sock?db=15&protocol=3", "redis://127.0.0.1:6379/2147483647",
                "redis+sentinel://127.0.0.1:26379/mymaster/15"):
        check_store_url(url)


def test_store_url_options_redis_py_takes_are_no_problem() -> None:
    """Every option accepted is one redis-py's connection takes (it builds one from the URL)."""
    from redis.asyncio import Redis

    from gateway.redis_urls import check_store_url
    for url in ("redis://127.0.0.1:6379/0?socket_timeout=1&socket_connect_timeout=2"
                "&client_name=kg&health_check_interval=5&socket_keepalive=true"
                "&retry_on_timeout=no&max_connections=10",
                "unix:///run/redis.sock?db=1&password=p&client_name=kg"):
        check_store_url(url)
        Redis.from_url(url).connection_pool.make_connection()


@pytest.mark.parametrize("base", ["redis://127.0.0.1:6379/0", "unix:///run/redis.sock"])
def test_every_store_url_option_accepted_makes_a_redis_py_connection(base: str) -> None:
    """No option passes `config check` that redis-py's connection then refuses (a TypeError
    at every admin call), for a TCP URL and a socket one alike."""
    from redis.asyncio import BlockingConnectionPool  # the pool keygate's client uses
    from redis.asyncio.connection import URL_QUERY_ARGUMENT_PARSERS

    from gateway.redis_urls import check_store_url
    values = {"socket_keepalive": "true", "retry_on_timeout": "no",
              "ssl_check_hostname": "false", "legacy_responses": "false", "protocol": "2"}
    accepted = 0
    for name in URL_QUERY_ARGUMENT_PARSERS:
        url = f"{base}?{name}={values.get(name, '5')}"
        try:
            check_store_url(url)
        except ValueError:
            continue
        accepted += 1
        BlockingConnectionPool.from_url(url).make_connection()
    assert accepted >= 8


def test_the_websocket_recheck_interval_is_seconds_from_1_to_an_hour(tmp_path: Path) -> None:
    """``server.websocket_recheck``: how often open tunnels' keys are checked (one store round
    trip per key each time). Below a second a few thousand keys make a store load of their
    own; beyond an hour a revoked key's tunnel outlives any sensible revocation."""
    assert load_config(write(tmp_path, "server: {}\n")).server.websocket_recheck == 10.0
    assert load_config(write(tmp_path, "server:\n  websocket_recheck: 2.5\n")
                       ).server.websocket_recheck == 2.5
    assert problems_of(tmp_path, """
        server:
          websocket_recheck: 0.5
    """) == ["config.yaml:2: server.websocket_recheck: must be at least 1, got 0.5"]
    assert problems_of(tmp_path, """
        server:
          port: 8080
          websocket_recheck: 3601
    """) == ["config.yaml:3: server.websocket_recheck: must be at most 3600, got 3601"]
    assert problems_of(tmp_path, """
        server:
          websocket_recheck: soon
    """) == ["config.yaml:2: server.websocket_recheck: expected a number of seconds, got a "
             "string ('soon')"]


def test_identity_and_signature_headers_cannot_be_headers_keygate_sets_or_http_reads(
        tmp_path: Path, monkeypatch) -> None:
    """Only the hyphen spellings of the headers keygate sets were refused, and not all of them:
    an identity header named ``Expect`` made every upstream answer 417; ``traceparent`` or
    ``tracestate`` was sent beside keygate's own (two traceparents: a broken trace);
    ``X_Request_Id`` or ``X_Forwarded_For`` reached a WSGI/CGI upstream as the same variable as
    keygate's ``X-Request-Id`` / ``X-Forwarded-For``."""
    monkeypatch.setenv("KG_SIGNING", "s3cret" * 6)
    assert problems_of(tmp_path, """
        identity_headers:
          workspace: Expect
          key_id: traceparent
          scopes: X_Request_Id
          plan: x_forwarded_for
        identity_signature:
          secret_env: KG_SIGNING
          header: TraceState
    """) == [
        "config.yaml:2: identity_headers.workspace: 'Expect' is a header keygate manages itself",
        "config.yaml:3: identity_headers.key_id: 'traceparent' is a header keygate manages "
        "itself",
        "config.yaml:4: identity_headers.scopes: 'X_Request_Id' is a header keygate manages "
        "itself",
        "config.yaml:5: identity_headers.plan: 'x_forwarded_for' is a header keygate manages "
        "itself",
        "config.yaml:8: identity_signature.header: 'TraceState' is already a header keygate "
        "sets, strips or reads",
    ]


@pytest.mark.parametrize("clash, line", [
    ("identity_headers:\n  workspace: X-Keygate-Signature\n", "identity_headers.workspace"),
    ("identity_headers:\n  plan: x_keygate_signature\n", "identity_headers.plan"),
    ("keys:\n  headers: [X-Keygate-Signature]\n", "keys.headers"),
])
def test_the_default_signature_header_is_compared_with_the_identity_and_key_headers(
        tmp_path: Path, monkeypatch, clash: str, line: str) -> None:
    """``identity_signature.header`` written out as ``X-Keygate-Signature`` beside an identity
    header of that name was refused; left at its default (the same name) it passed `config
    check` and serve, and the upstream got ``X-Keygate-Signature`` twice (the workspace id and
    the signature): every signature check failed. The default is the header keygate signs in,
    and is compared as a written one is."""
    monkeypatch.setenv("KG_SIGNING", "s3cret" * 6)
    text = clash + "identity_signature:\n  secret_env: KG_SIGNING\n"
    problems = problems_of(tmp_path, text)
    assert problems == [
        "config.yaml:4: identity_signature.header: 'X-Keygate-Signature' (the default) is "
        f"already a header keygate sets, strips or reads ({line}); set identity_signature."
        "header to another name"], problems
    written = problems_of(tmp_path, text + "  header: X-Keygate-Signature\n")
    assert written == ["config.yaml:5: identity_signature.header: 'X-Keygate-Signature' is "
                       "already a header keygate sets, strips or reads"]
    # another name for either one: no problem
    load_config(write(tmp_path, text + "  header: X-Signature\n"))
    load_config(write(tmp_path, "identity_signature:\n  secret_env: KG_SIGNING\n"))


def test_yaml_1_1_boolean_words_are_read_as_yaml_1_2_reads_them(tmp_path: Path,
                                                                 monkeypatch) -> None:
    """``server.access_log: off``, as docs/configuration.md, the README and the example config
    write it, was refused ("expected a string, got a boolean (false)"): PyYAML reads a plain
    ``off``, ``on``, ``yes`` or ``no`` as YAML 1.1's boolean, while the JSON schema's
    validators (YAML 1.2) read the word as text and passed the same file. Where text is
    expected the word is now the text written. Where a boolean is, it is still the boolean
    YAML 1.1 meant (``public: yes`` has always been true: refusing it would stop a running
    gateway's next start), with a warning to write true or false; the schema takes it too.
    The warning called a quoted 'off' "a boolean in YAML 1.1", which it is not (quoted, it is
    text to every YAML reader): it says which of the two it is."""
    config = load_config(write(tmp_path, with_upstream("""
        server:
          access_log: off
        keys:
          prefix: on
          environments: [live, no]
        scopes:
          people:read: Yes
        routes:
          - {path: /x, upstream: crm, public: true, websocket: false}
    """)))
    assert config.server.access_log == "off"
    assert (config.keys.prefix, config.keys.environments) == ("on", ("live", "no"))
    assert config.scopes == {"people:read": "Yes"}
    assert (config.routes[0].public, config.routes[0].websocket) == (True, False)
    assert config.warnings == ()
    monkeypatch.setenv("KG_TEST_LOG", "off")
    monkeypatch.setenv("KG_TEST_PUBLIC", "yes")
    assert load_config(write(tmp_path, "server:\n  access_log: ${KG_TEST_LOG}\n")
                       ).server.access_log == "off"
    booleans = """
        server:
          metrics_workspace_labels: on
        routes:
          - {path: /x, upstream: crm, public: yes}
          - {path: /y, upstream: crm, websocket: NO}
          - {path: /z, upstream: crm, public: 'yes'}
          - path: /v
            upstream: crm
            public: ${KG_TEST_PUBLIC}
          - {path: /w, upstream: crm, public: "${KG_TEST_PUBLIC}"}
        cors:
          allow_origins: ["https://app.example"]
          allow_credentials: off
    """
    config = load_config(write(tmp_path, with_upstream(booleans)))
    assert config.server.metrics_workspace_labels is True
    assert [r.public for r in config.routes] == [True, False, True, True, True]
    assert config.routes[1].websocket is False
    assert config.cors.allow_credentials is False
    assert [str(w).rsplit("/", 1)[-1] for w in config.warnings] == [
        "config.yaml:4: server.metrics_workspace_labels: warning: 'on' is read as true "
        "(YAML 1.1's boolean word, text to YAML 1.2 tools); write true",
        "config.yaml:6: routes[0].public: warning: 'yes' is read as true "
        "(YAML 1.1's boolean word, text to YAML 1.2 tools); write true",
        "config.yaml:7: routes[1].websocket: warning: 'NO' is read as false "
        "(YAML 1.1's boolean word, text to YAML 1.2 tools); write false",
        "config.yaml:8: routes[2].public: warning: 'yes' is read as true (quoted, it is text "
        "in YAML 1.1 and 1.2; taken as YAML 1.1's boolean word); write true",
        "config.yaml:11: routes[3].public: warning: 'yes' is read as true "
        "(YAML 1.1's boolean word, text to YAML 1.2 tools); write true",
        "config.yaml:12: routes[4].public: warning: 'yes' is read as true (quoted, it is text "
        "in YAML 1.1 and 1.2; taken as YAML 1.1's boolean word); write true",
        "config.yaml:15: cors.allow_credentials: warning: 'off' is read as false "
        "(YAML 1.1's boolean word, text to YAML 1.2 tools); write false",
    ]
    # other text is no boolean, and a word is no path
    assert problems_of(tmp_path, with_upstream("""
        server:
          access_log: Off
        routes:
          - {path: /x, upstream: crm, public: 'y'}
          - {path: off, upstream: crm}
    """)) == [
        "config.yaml:4: server.access_log: must be one of json, text, off, got 'Off' (did you "
        "mean 'off'?)",
        "config.yaml:6: routes[0].public: expected true or false, got a string ('y')",
        "config.yaml:7: routes[1].path: 'off' must start with /",
    ]


@pytest.mark.parametrize("name", [
    "X-HTTP-Method-Override", "x_http_method", "X-Method-Override",  # read as the method
    "X-Original-URL", "X_Rewrite_URL", "X-Original-URI", "SCRIPT_NAME",  # as the path
    "X-Original-Host", "X-Forwarded-Server",  # as the host
    "Proxy-Connection",  # hop-by-hop
])
def test_identity_headers_cannot_be_headers_upstreams_read_as_the_method_path_or_host(
        tmp_path: Path, monkeypatch, name: str) -> None:
    """An identity header named ``X-HTTP-Method-Override`` or ``X-Original-URL`` passed: the
    upstream then got ``X-HTTP-Method-Override: acme`` (Express, Symfony, ASP.NET perform the
    method named there) or ``X-Original-URL: acme`` (IIS URL Rewrite, old Symfony route by it)
    on every request, another method or path than the one keygate authorised. They are
    refused as the other headers keygate manages are, for the signature header too."""
    monkeypatch.setenv("KG_SIGNING", "s3cret" * 6)
    assert problems_of(tmp_path, f"""
        identity_headers:
          key_id: {name}
        identity_signature:
          secret_env: KG_SIGNING
          header: {name}
    """) == [
        f"config.yaml:2: identity_headers.key_id: '{name}' is a header keygate manages itself",
        f"config.yaml:5: identity_signature.header: '{name}' is already a header keygate "
        "sets, strips or reads"]


def test_every_header_the_proxy_treats_itself_is_reserved_from_identity_headers() -> None:
    """The reserved list is built from the lists the proxy's header rules use, so a header
    added there (a hop-by-hop one, a path or host override) cannot be left out here."""
    from gateway import overrides
    from gateway.config.access import RESERVED_HEADERS
    from gateway.models import header_key
    from gateway.models import SCHEME_OVERRIDE
    from gateway.proxying.headers import HOP_BY_HOP, HOST_OVERRIDE, PATH_OVERRIDE
    wanted = HOP_BY_HOP | PATH_OVERRIDE | HOST_OVERRIDE | SCHEME_OVERRIDE | {
        header_key(h) for h in overrides.HEADERS}
    assert wanted <= RESERVED_HEADERS, sorted(wanted - RESERVED_HEADERS)


def test_keys_are_not_read_from_headers_keygate_manages_or_http_frames_with(
        tmp_path: Path) -> None:
    """``keys.headers`` (where a key is read from, and which keygate strips before forwarding)
    took ``Host``, ``Content-Length``, ``Connection`` and ``X-Request-Id``: every request then
    lost its Host or its body's length on the way, or had its key in a header the HTTP parser
    or keygate itself owns. They are refused, in any spelling, as for identity headers."""
    assert problems_of(tmp_path, """
        keys:
          headers:
            - X-Api-Key
            - Host
            - content_length
            - Connection
            - X-Request-Id
            - X-HTTP-Method-Override
            - Authorization
    """) == [
        f"config.yaml:{line}: keys.headers[{i}]: '{name}' is a header keygate manages itself "
        "or HTTP gives a meaning; a key cannot be read from it"
        for i, line, name in ((1, 4, "Host"), (2, 5, "content_length"), (3, 6, "Connection"),
                              (4, 7, "X-Request-Id"), (5, 8, "X-HTTP-Method-Override"))
    ] + ["config.yaml:9: keys.headers[6]: Authorization is always read as 'Bearer <key>'; list "
         "only other headers here"]
    assert load_config(write(tmp_path, "keys:\n  headers: [X-Api-Key, X_Auth_Token]\n")
                       ).keys.headers == ("X-Api-Key", "X_Auth_Token")


def test_a_unix_socket_path_with_an_at_sign_is_a_valid_store_url():
    """``unix:///run/redis@6379/redis.sock`` (a per-instance runtime directory) is a valid
    redis-py URL: its path is the socket path, with no user info to misplace. It was refused
    as "an @ after its host"; an '@' in the path after a user info still is."""
    from redis.asyncio.connection import parse_url
    from gateway.redis_urls import check_store_url, redact
    url = "unix:///run/redis@6379/redis.sock"
    assert parse_url(url)["path"] == "/run/redis@6379/redis.sock"
    assert redact(url) == url
    check_store_url(url)
    check_store_url(url + "?db=2")
    with pytest.raises(ValueError):  # a password with an unencoded '/': refused
        check_store_url("unix://:pa/ss@/run/redis.sock?db=1")
    with pytest.raises(ValueError, match="percent-encode"):
        check_store_url("unix://user:pass@x/run/redis@6379/redis.sock")

