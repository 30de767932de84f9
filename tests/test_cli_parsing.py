"""The seams inside ``gateway.cli``: option values, request bodies from options, the command
tree the command modules add to, and the ``--daily`` table."""

from __future__ import annotations

import argparse

import pytest

from gateway.cli.output import days_table
from gateway.cli.parsing import (CommandTree, argtype, count_or_none, days, given, json_object,
                                 rate_or_none)


def test_given_keeps_the_options_that_were_given_in_order():
    assert given(name="n", description=None, enabled=False, meta={}) == {
        "name": "n", "enabled": False, "meta": {}}
    assert list(given(b=1, a=2)) == ["b", "a"]


@pytest.mark.parametrize("text, value", [("5000", 5000), (" 7 ", 7), ("none", None),
                                         ("Unlimited", None), ("null", None)])
def test_count_or_none(text, value):
    assert count_or_none(text) == value


@pytest.mark.parametrize("fn, text", [(count_or_none, "-1"), (count_or_none, "٣"),
                                      (days, "30w"), (json_object, "[1]"), (json_object, "{")])
def test_bad_values_are_argparse_usage_errors_with_their_own_message(fn, text):
    with pytest.raises(ValueError) as raised:
        fn(text)
    with pytest.raises(argparse.ArgumentTypeError) as usage:
        argtype(fn, "VALUE")(text)
    assert str(usage.value) == str(raised.value)


def test_rate_or_none_and_days():
    assert rate_or_none(" 10/s ") == "10/s" and rate_or_none("NONE") is None
    assert days("30d") == days("30") == 30


def test_a_command_is_remote_by_default_and_may_leave_its_description_out():
    parser = argparse.ArgumentParser(prog="k")
    admin = argparse.ArgumentParser(add_help=False)
    admin.add_argument("--json", action="store_true", default=argparse.SUPPRESS)
    tree = CommandTree(parser.add_subparsers(dest="verb", required=True), [admin])
    group = tree.group("things", "manage things")
    tree.command(group, "list", "list things", "remote-handler")
    tree.command(group, "quiet", "a quiet one", "quiet-handler", described=False)
    tree.command(None, "run", "run locally", "local-handler", local=True)

    args = parser.parse_args(["things", "list", "--json"])
    assert (args.handler, args.local, args.json) == ("remote-handler", False, True)
    args = parser.parse_args(["run"])
    assert (args.handler, args.local) == ("local-handler", True)
    with pytest.raises(SystemExit):
        parser.parse_args(["run", "--json"])  # a local command takes no admin options
    things = parser._subparsers._group_actions[0].choices["things"]
    subs = things._subparsers._group_actions[0].choices
    assert subs["list"].description == "list things" and subs["quiet"].description is None


def test_days_table_right_aligns_the_counts():
    assert days_table([{"date": "2026-11-01", "requests": 5},
                       {"date": "2026-11-02", "requests": 123456789}]).splitlines() == [
        "DATE         REQUESTS",
        "2026-11-01          5",
        "2026-11-02  123456789"]
    assert days_table([]) == "DATE        REQUESTS"


@pytest.mark.parametrize("argv", [["serve", "--workers", "abc"], ["serve", "--workers", "2.5"],
                                  ["audit", "--workspace", "acme", "--limit", "many"]])
def test_a_count_that_is_not_a_number_is_said_for_people(argv, capsys):
    """`keygate serve --workers abc` is bad usage (2) in words, not Python's
    "invalid literal for int() with base 10"."""
    from gateway.cli import main
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "int()" not in err and "base 10" not in err, err
    assert f"'{argv[-1]}' is not a whole number" in err, err


HUGE = "9" * 5000  # past Python's 4300-digit limit on reading an int


@pytest.mark.parametrize("argv", [
    ["serve", "--workers", HUGE], ["audit", "--workspace", "acme", "--limit", HUGE],
    ["keys", "create", "--workspace", "acme", "--name", "n", "--scope", "a:b",
     "--expires", f"{HUGE}d"],
    ["keys", "rotate", "--workspace", "acme", "--grace", f"{HUGE}s", "k"],
    ["keys", "list", "--workspace", "acme", "--unused", f"{HUGE}d"],
    ["usage", "--workspace", "acme", "--days", HUGE],
    ["keys", "create", "--workspace", "acme", "--name", "n", "--scope", "a:b",
     "--monthly-requests", HUGE]], ids=lambda argv: " ".join(argv[:2]) + " " + argv[-2][:12])
def test_a_number_with_thousands_of_digits_is_too_large_in_keygate_words(argv, capsys):
    """A number past Python's limit on digits (4300) took Python's own hint to the user:
    "Exceeds the limit (4300 digits) for integer string conversion ... use
    sys.set_int_max_str_digits() to increase the limit" (or called it not a whole number and
    printed all its digits back). It is bad usage that says the number is too large."""
    from gateway.cli import main
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "set_int_max_str_digits" not in err and "Exceeds the limit" not in err, err[-300:]
    assert "too large" in err and "9" * 100 not in err, err[-300:]


def test_serve_refuses_more_workers_than_the_config_allows(capsys, tmp_path, monkeypatch):
    """`server.workers` is 1 to 1024 in the config; `--workers`, which overrides it, took any
    number: a slip (`--workers 100000`) forked processes until the host ran out of memory."""
    from gateway.cli import main
    monkeypatch.chdir(tmp_path)
    assert main(["serve", "--workers", "1025"]) == 2
    err = capsys.readouterr().err
    assert "1024" in err and "Traceback" not in err, err


def _leaf_parsers(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _leaf_parsers(sub, path + (name,))
            return
    yield path, parser


def test_every_command_that_takes_a_workspace_takes_its_short_form_too():
    """`keygate keys usage -w acme ID` and `keygate keys delete -w acme ID` work like every
    other command's `-w` (they answered exit 2, "--workspace is required")."""
    from gateway.cli.parser import build_parser
    taking = {}
    for path, leaf in _leaf_parsers(build_parser()):
        for action in leaf._actions:
            if "--workspace" in action.option_strings:
                taking[" ".join(path)] = action.option_strings
    assert {"keys usage", "keys delete", "keys list", "usage"} <= set(taking)
    missing = sorted(cmd for cmd, flags in taking.items() if "-w" not in flags)
    assert missing == [], missing


def _documented_placeholders() -> list[tuple[str, str, str]]:
    """(command, option, placeholder) for each `--option VALUE` of docs/cli.md whose VALUE is
    a placeholder (it holds a capital: `N`, `30d|DATE`, `N/s|N/m|none`), not an example
    (`--env test`, `--grace 24h`): from each command's synopsis, and from the table of the
    options every admin command takes (under the command `keys list`, which takes them)."""
    import re
    from pathlib import Path
    text = (Path(__file__).resolve().parent.parent / "docs" / "cli.md").read_text()
    found = []
    for span in re.findall(r"`(keygate [^`]*)`", text):
        span = " ".join(span.split())
        command = " ".join(re.match(r"keygate ((?:[a-z][a-z-]* ?)*)", span).group(1).split())
        for option, value in re.findall(r"(--[a-z][a-z-]*) ([^\s\[\]()]+)", span):
            if re.search(r"[A-Z]", value) and not value.startswith("-"):
                found.append((command, option, value))
    table = text.split("## Connecting to the admin API", 1)[1].split("\n## ", 1)[0]
    for option, value in re.findall(r"^\| `(--[a-z-]+) ([^`]+)` \|", table, re.M):
        found.append(("keys list", option, value))
    return found


def test_every_placeholder_of_docs_cli_md_is_the_one_help_shows():
    """docs/cli.md writes `--admin-url URL`, `--timeout SECONDS`, `--description TEXT`,
    `--expires 30d|DATE`, `audit --limit N` and `workspaces limits --max-keys N|none`, while
    --help showed `ADMIN_URL`, `TIMEOUT`, `DESCRIPTION`, `EXPIRES`, `LIMIT` and `VALUE|none`:
    the two references to one option disagreed on what it takes."""
    from gateway.cli.parser import build_parser
    leaves = dict(_leaf_parsers(build_parser()))
    documented = _documented_placeholders()
    assert len(documented) > 30
    wrong = []
    for command, option, value in documented:
        leaf = leaves[tuple(command.split())]
        action = next(a for a in leaf._actions if option in a.option_strings)
        shown = action.metavar or action.dest.upper()
        if shown != value:
            wrong.append((command, option, value, shown))
    assert wrong == [], wrong


@pytest.mark.parametrize("argv, said", [
    (["keys", "create", "-w", "acme", "--name", "n", "--scope", "a:b", "--rate-limit", "5/x"],
     "a rate limit looks like '5/s'"),
    (["keys", "update", "-w", "acme", "k", "--rate-limit", "fast"], "a rate limit looks like"),
    (["keys", "update", "-w", "acme", "k", "--rate-limit", "0/s"], "between 1 and"),
    (["workspaces", "limits", "acme", "--rate-limit", "5 per second"], "a rate limit looks like"),
    (["keys", "create", "-w", "acme", "--name", "n", "--scope", "a:b", "--monthly-requests",
      "1000000000000001"], "at most 1000000000000000"),
    (["workspaces", "limits", "acme", "--max-keys", "1000000000000001"],
     "at most 1000000000000000"),
    (["audit", "-w", "acme", "--limit", "1001"], "from 1 to 1000"),
    (["keys", "list", "-w", "acme", "--unused", "36501d"], "from 0 to 36500")])
def test_a_value_the_api_can_never_take_is_bad_usage_not_an_api_error(argv, said, capsys,
                                                                       monkeypatch):
    """A malformed rate (`--rate-limit 5/x`), a count over the API's 10^15, `audit --limit
    1001` or `--unused 36501d` went to the admin API and came back as exit 1 with the API's
    400 (or, with no gateway, "cannot reach the admin API"), while `--days 91` or `--expires
    1y` are bad usage, exit 2 with the usage line: the same kind of mistake, told two ways."""
    from gateway.cli import main
    from conftest import free_port
    monkeypatch.setenv("KEYGATE_ADMIN_TOKEN", "t")
    monkeypatch.setenv("KEYGATE_ADMIN_URL", f"http://127.0.0.1:{free_port()}")  # nobody there
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: keygate ") and said in err, err
    assert "cannot reach" not in err and "Traceback" not in err, err


@pytest.mark.parametrize("argv", [
    ["keys", "show", "-w", "acme", ""], ["keys", "revoke", "-w", "acme", "--yes", ""],
    ["keys", "delete", "-w", "acme", " "], ["keys", "list", "-w", ""],
    ["usage", "--workspace", ""], ["workspaces", "show", ""],
    ["workspaces", "set-plan", "acme", ""], ["roles", "delete", "-w", "acme", ""],
    ["keys", "update", "-w", "acme", "", "--name", "n"]])
def test_an_empty_id_is_bad_usage_not_no_such_endpoint(argv, capsys, monkeypatch):
    """`keygate keys show -w acme "$KEY"` with KEY unset asked for `/workspaces/acme/keys/`
    and printed `No such admin endpoint. (not_found)`, exit 1: it read as a gateway of the
    wrong version, not as the empty argument it was."""
    from gateway.cli import main
    from conftest import free_port
    monkeypatch.setenv("KEYGATE_ADMIN_TOKEN", "t")
    monkeypatch.setenv("KEYGATE_ADMIN_URL", f"http://127.0.0.1:{free_port()}")  # nobody there
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: keygate ") and "must not be empty" in err, err


def _documented_command_lines() -> list[tuple[str, str]]:
    """(where, command line) for every `keygate ...` line of a ```sh block in README.md and
    docs/, and of the command comments in deploy/ and the Dockerfile (`#   keygate ...`)."""
    import re
    from pathlib import Path
    root = Path(__file__).resolve().parent.parent
    found = []
    for page in [root / "README.md", *sorted((root / "docs").glob("*.md"))]:
        in_block = False
        for number, line in enumerate(page.read_text().splitlines(), 1):
            if line.startswith("```"):
                in_block = line.startswith("```sh")
            elif in_block and re.match(r"(\.venv/bin/)?keygate ", line):
                found.append((f"{page.name}:{number}", line))
    for path in [root / "Dockerfile", *sorted((root / "deploy").rglob("*.y*ml"))]:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            command = re.match(r"\s*#\s{2,}(keygate [a-z].*)", line)
            if command and re.match(r"keygate (serve|demo|config|workspaces|keys|roles|usage|"
                                    r"reload|audit)\b", command.group(1)):
                found.append((f"{path.name}:{number}", command.group(1)))
    return found


def test_every_command_line_the_docs_show_is_one_the_cli_takes():
    """The README, docs/ and the deploy files show `keygate ...` lines to paste; each must parse
    as written (a `<id>` stands for a key id; `[...]` optional parts are taken as given), or
    an operator following them meets a usage error instead of the documented behaviour."""
    import shlex
    from gateway.cli.parser import build_parser
    lines = _documented_command_lines()
    assert len(lines) > 25
    wrong = []
    for where, line in lines:
        words = shlex.split(line.split(" #", 1)[0].replace("[", "").replace("]", ""))[1:]
        words = ["k0000000000a" if w == "<id>" else w for w in words]
        if words[:1] == ["serve"] and "N" in words:
            words[words.index("N")] = "2"
        try:
            build_parser().parse_args(words)
        except SystemExit as exc:
            wrong.append((where, line, exc.code))
    assert wrong == []


@pytest.mark.parametrize("argv", [
    ["keys", "show", "-w", "acme", "caf\udce9"],
    ["keys", "rotate", "-w", "caf\udce9", "k0000000000a"],
    ["keys", "delete", "-w", "acme", "caf\udce9"],
    ["workspaces", "limits", "caf\udce9"],
    ["roles", "delete", "-w", "acme", "caf\udce9"],
    ["usage", "-w", "caf\udce9"],
    ["workspaces", "create", "acme", "--name", "caf\udce9"],
    ["keys", "create", "-w", "acme", "--name", "n", "--scope", "people:r\udce9ad"],
    ["keys", "update", "-w", "acme", "k0000000000a", "--description", "caf\udce9"]])
def test_an_argument_that_is_not_utf_8_is_bad_usage_not_a_traceback(argv, capsys, monkeypatch):
    """A byte that is not UTF-8 on the command line (`keygate keys show -w acme $'caf\\xe9'`,
    a name typed in a Latin-1 terminal) reaches Python as a lone surrogate: as a key or
    workspace id it ended the command in a UnicodeEncodeError traceback from urllib's quote,
    and as a name or scope it went to the admin API and came back as exit 1, "not valid
    Unicode text (it holds a lone surrogate)". It is bad usage, exit 2, saying which bytes."""
    from gateway.cli import main
    from conftest import free_port
    monkeypatch.setenv("KEYGATE_ADMIN_TOKEN", "t")
    monkeypatch.setenv("KEYGATE_ADMIN_URL", f"http://127.0.0.1:{free_port()}")  # nobody there
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: keygate ") and "\\xe9" in err, err
    assert "not UTF-8" in err and "cannot reach" not in err, err


def test_a_config_path_that_is_not_utf_8_is_still_a_path(tmp_path, capsys):
    """File names are bytes: `config check` and `--config` take one that is not UTF-8 as the
    file it names (only what is sent to the admin API has to be UTF-8 text)."""
    from gateway.cli import main
    path = tmp_path / "caf\udce9.yaml"
    path.write_text("routes: []\n")
    assert main(["config", "check", str(path)]) == 1
    assert "routes" in capsys.readouterr().err


@pytest.mark.parametrize("argv, said", [
    (["keys", "rotate", "-w", "acme", "k", "--grace", "99999999w"], "more than a century"),
    (["keys", "create", "-w", "acme", "--name", "x", "--scope", "a", "--expires", "999999999d"],
     "more than a century"),
    (["keys", "update", "-w", "acme", "k", "--expires", "36501d"], "more than a century"),
    (["keys", "create", "-w", "acme", "--name", "x", "--scope", "a", "--expires", "9999-01-01"],
     "more than a century"),
    (["keys", "create", "-w", "acme", "--name", "x", "--scope", "a", "--allow-ip", "300.1.1.1"],
     "not an IP address or CIDR"),
    (["keys", "update", "-w", "acme", "k", "--allow-ip", "10.0.0.0/8", "fe80::1%eth0"],
     "not an IP address or CIDR"),
    (["keys", "create", "-w", "acme", "--name", "x", "--scope", "a", "--meta",
      '{"a": "' + "a" * 5000 + '"}'], "at most 4096"),
    (["keys", "update", "-w", "acme", "k", "--meta", "[" * 40 + "]" * 40], "JSON object"),
    (["keys", "update", "-w", "acme", "k", "--meta", '{"a":' * 40 + "1" + "}" * 40],
     "nested more than 32"),
    (["keys", "create", "-w", "acme", "--name", "x", "--scope", "BAD!"], "malformed scope"),
    (["keys", "update", "-w", "acme", "k", "--scope", "a", "x" * 129], "malformed scope"),
    (["roles", "set", "-w", "acme", "reader", "--scope", "people read"], "malformed scope")])
def test_a_value_past_the_admin_apis_fixed_rules_is_bad_usage(argv, said, capsys, monkeypatch):
    """docs/cli.md: 2 is bad usage (a missing or invalid option), 1 the API refused. A grace
    or expiry past the API's century, an --allow-ip that is no address, a --meta over 4 KiB
    or a malformed --scope went to the admin API and came back as its 400, exit 1. Checked
    with the API's own rules (gateway.models, gateway.trust), they are bad usage."""
    from gateway.cli import main
    from conftest import free_port
    monkeypatch.setenv("KEYGATE_ADMIN_TOKEN", "t")
    monkeypatch.setenv("KEYGATE_ADMIN_URL", f"http://127.0.0.1:{free_port()}")  # nobody there
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: keygate ") and said in err, err
    assert "cannot reach" not in err and "Traceback" not in err, err


def test_the_bounds_themselves_are_taken():
    from gateway.cli.parsing import allowed_ip, json_object, parse_duration, parse_expiry, scope
    from gateway.models import MAX_SECONDS
    assert parse_duration(f"{MAX_SECONDS}s") == MAX_SECONDS
    assert parse_expiry("36500d") == {"expires_in": MAX_SECONDS}
    assert allowed_ip("::ffff:10.0.0.0/104") == "::ffff:10.0.0.0/104"  # sent as written
    assert scope("people:read") == "people:read" and scope("a" * 128) == "a" * 128
    assert json_object('{"a": "' + "a" * 4000 + '"}')


@pytest.mark.parametrize("argv", [
    ["keys", "update", "-w", "acme", "k", "--any"],        # was --any-ip: lifts the allow-list
    ["keys", "update", "-w", "acme", "k", "--no"],         # was --no-expiry
    ["keys", "update", "-w", "acme", "k", "--dis"],        # was --disable
    ["keys", "create", "-w", "acme", "--name", "n", "--sc", "a"],
    ["keys", "list", "-w", "acme", "--js"],
    ["--admin", "http://127.0.0.1:1", "workspaces", "list"]])
def test_an_abbreviated_option_is_bad_usage_not_the_option_it_begins(argv, capsys, monkeypatch):
    """argparse took any unambiguous prefix of a long option: `--any` was `--any-ip` (lifting
    a key's IP allow-list), `--no` `--no-expiry`. A typo, or a flag a later version adds with
    the same start, silently did something else."""
    from gateway.cli import main
    from conftest import free_port
    monkeypatch.setenv("KEYGATE_ADMIN_TOKEN", "t")
    monkeypatch.setenv("KEYGATE_ADMIN_URL", f"http://127.0.0.1:{free_port()}")  # nobody there
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: keygate") and "cannot reach" not in err, err


@pytest.mark.parametrize("argv", [
    ["keys", "--json", "list", "-w", "acme"],
    ["keys", "--timeout", "5", "--admin-url", "URL", "list", "-w", "acme", "--json"],
    ["--json", "keys", "list", "-w", "acme"],
    ["keys", "list", "-w", "acme", "--json", "--admin-url", "URL"]])
def test_the_admin_options_go_before_or_after_the_command_name(argv, capsys, monkeypatch):
    """docs/cli.md: every admin command takes the admin options "before or after the command
    name"; between the group and its verb (`keygate keys --json list`) they were refused."""
    from gateway.cli import main
    from conftest import free_port
    url = f"http://127.0.0.1:{free_port()}"  # nobody there: the option was honoured
    monkeypatch.setenv("KEYGATE_ADMIN_TOKEN", "t")
    monkeypatch.setenv("KEYGATE_ADMIN_URL", "http://127.0.0.1:1")
    argv = [url if a == "URL" else a for a in argv]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "cannot reach" in err, err
    if "URL" in argv or url in argv:
        assert url in err, err


def test_every_parser_refuses_abbreviations():
    from gateway.cli import build_parser
    parser = build_parser()
    seen = []

    def walk(p):
        seen.append(p)
        assert p.allow_abbrev is False, p.prog
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    walk(sub)
    walk(parser)
    assert len(seen) > 25
