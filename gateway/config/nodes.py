"""A generic reader of a composed YAML node tree that keeps every value's line number.

Nothing here knows keygate's schema: it turns nodes into Python values (after ``${ENV}``
expansion), walks mappings and lists, and records each problem as
``<file>:<line>: <field path>: <what is wrong>``. Problems are collected rather than raised, so
one run reports them all; a value that failed is returned as ``BAD`` and its caller moves on.
"""

from __future__ import annotations

import difflib
import os
import re
from typing import Any

import yaml

Node = yaml.Node

ENV_REF_RE = re.compile(r"\$\$|\$\{([^}]*)\}")
ENV_BODY_RE = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)(?:(:?-)(.*))?", re.DOTALL)

YAML_TAG_PREFIX = "tag:yaml.org,2002:"
NULL_TAG = "tag:yaml.org,2002:null"
MAP_TAG = "tag:yaml.org,2002:map"
INT_TAG = "tag:yaml.org,2002:int"
FLOAT_TAG = "tag:yaml.org,2002:float"
BOOL_TAG = "tag:yaml.org,2002:bool"
SEQ_TAG = "tag:yaml.org,2002:seq"
MERGE_TAG = "tag:yaml.org,2002:merge"
_TAG_NAMES = {
    "tag:yaml.org,2002:str": "a string",
    "tag:yaml.org,2002:int": "an integer",
    "tag:yaml.org,2002:float": "a number",
    "tag:yaml.org,2002:bool": "a boolean",
    NULL_TAG: "null",
    "tag:yaml.org,2002:timestamp": "a date",
    "tag:yaml.org,2002:binary": "binary data",
}


class _BadMerge(ValueError):
    """A merge key whose value cannot be merged (at ``node``)."""

    def __init__(self, node: Node, message: str) -> None:
        super().__init__(message)
        self.node = node


class _Bad:
    """Marks a value that failed validation (its problem is already recorded)."""

    def __repr__(self) -> str:
        return "<bad>"


BAD: Any = _Bad()


def one_line(text: str) -> str:
    """A problem as one printable line: the keys and values it quotes from the file have their
    control characters (a newline, an ESC, U+2028) escaped, so that no file can split its
    problem in two, forge one of its own in the log, or reach the terminal's escapes."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii")
                   for c in text)


def _yaml11_only(text: str, value: Any) -> str:
    """Why a plain number YAML 1.1 (PyYAML) reads one way and YAML 1.2 (editors, yq, the
    JSON schema's validators) another must not be guessed at: octal ``0777``, base 60
    ``1:30``. Empty for any other number."""
    digits = text.lstrip("+-").replace("_", "")
    if ":" in digits:
        shown = f"{value:g}" if isinstance(value, float) else str(value)
        return (f"'{text}' is base 60 ({shown}) in YAML 1.1 but text in YAML 1.2; write "
                f"{shown} (quote it for text)")
    if len(digits) > 1 and digits.startswith("0") and digits.isdigit():
        decimal = int(text.replace("_", ""))
        return (f"'{text}' is octal ({value}) in YAML 1.1 but {decimal} in YAML 1.2; write it "
                "without the leading 0 (quote it for text)")
    return ""


# Plain words YAML 1.1 (PyYAML) reads as booleans and YAML 1.2 (editors, yq, the JSON schema's
# validators) as text, in the spellings PyYAML resolves: keygate reads them as YAML 1.2 does.
# Where text is expected they are that text (`access_log: off`, as the reference writes it);
# where a boolean is, the boolean YAML 1.1 meant, with a warning to write true/false.
YAML11_BOOLEANS = {"yes": True, "on": True, "no": False, "off": False}
# the spellings PyYAML resolves (and the JSON schema lists): yes, Yes, YES and so on
YAML11_WORDS = frozenset(w for word in YAML11_BOOLEANS for w in (word, word.title(), word.upper()))


def yaml11_boolean(node: Node) -> bool:
    """Whether ``node`` is a plain ``yes``/``no``/``on``/``off``: a boolean to YAML 1.1 only."""
    return node.tag == BOOL_TAG and node.style is None and node.value.lower() in YAML11_BOOLEANS


def _env_problem(message: str, names: list[str], texts: list[str]) -> str:
    """A problem with a value that came from the environment, without that value: "the value
    from ${NAME} is invalid", then the reason when it can be told without it. The readers'
    messages put the value after ", got ..." (dropped here); what remains has each of the
    variables' texts replaced by its reference, and is dropped when it still quotes something
    (``'0777' is octal (511)``: a form of the value no replacement finds)."""
    refs = " and ".join(f"${{{name}}}" for name in dict.fromkeys(names))
    reason = message.split(", got ", 1)[0]
    for text in sorted((t for t in texts if t), key=len, reverse=True):  # whole words only:
        reason = re.sub(rf"(?<!\w){re.escape(text)}(?!\w)", refs, reason)  # 0 is not in 1024
    # anything left of a value long enough to be a secret, or of a URL's user or passwords,
    # or quoted (but for the name of an option of the URL): no reason at all
    if _quotes_more_than_option_names(reason, texts) \
            or any(len(t) >= 4 and t in reason for t in texts) \
            or any(re.search(rf"(?<!\w){re.escape(part)}(?!\w)", reason)
                   for t in texts for part in _url_secrets(t)):
        return f"the value from {refs} is invalid"
    return f"the value from {refs} is invalid: {reason}"


def _url_options(text: str) -> set[str]:
    """The names of a URL's query options (``?ssl_ca_certs=...&db=1``: ssl_ca_certs, db)."""
    query = text.partition("?")[2].partition("#")[0]
    return {item.partition("=")[0] for item in query.split("&") if "=" in item}


def _url_secrets(text: str) -> set[str]:
    """What a URL holds that a message must not show: its user and password, and the values
    of its password options (percent-encoded or not)."""
    from urllib.parse import unquote
    parts: set[str] = set()
    head = text.partition("?")[0]
    if "://" in head and "@" in head.partition("://")[2].partition("/")[0]:
        userinfo = head.partition("://")[2].partition("/")[0].rpartition("@")[0]
        parts.update(userinfo.split(":", 1))
    query = text.partition("?")[2].partition("#")[0]
    parts.update(value for name, _, value in (item.partition("=") for item in query.split("&"))
                 if "password" in name.lower())
    return {form for part in parts if part for form in (part, unquote(part))}


def _quotes_more_than_option_names(reason: str, texts: list[str]) -> bool:
    """Whether ``reason`` quotes anything but the names of the values' URL options ("unknown
    TLS option 'ssl_ca_cert'", "Invalid value for 'db' in connection URL."): a form of the
    value, say (``'0777' is octal (511)``). An apostrophe within a word (redis-py's) quotes
    nothing."""
    bare = re.sub(r"(?<=\w)'(?=\w)", "", reason)
    quoted = re.findall(r"'([^']*)'", bare)
    if "'" in re.sub(r"'[^']*'", "", bare):
        return True     # a quote left open
    names = set().union(*(_url_options(t) for t in texts)) if texts else set()
    return any(not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", q) or q not in names
               for q in quoted)


def suggest(word: str, choices: Any) -> str:
    """`` (did you mean 'x'?)`` for the closest choice, or nothing."""
    close = difflib.get_close_matches(word, [str(c) for c in choices], n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def known(choices: Any) -> str:
    names = ", ".join(str(c) for c in choices)
    return f"(known: {names})" if names else "(none defined)"


def is_null(node: Node | None) -> bool:
    """Absent, or ``key:`` with nothing after it."""
    return node is None or (isinstance(node, yaml.ScalarNode) and node.tag == NULL_TAG)


def describe_value(value: Any) -> str:
    """A constructed value as a message shows it: its kind, and a short form of it."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"a boolean ({'true' if value else 'false'})"
    if isinstance(value, int):
        return f"an integer ({value})"
    if isinstance(value, float):
        return f"a number ({value})"
    if isinstance(value, str):
        shown = value if len(value) <= 40 else value[:37] + "..."
        return f"a string ('{shown}')"
    return f"a {type(value).__name__}"


def child(node: Node | None, key: str) -> Node | None:
    """The value node under ``key`` of a mapping node (to point a cross-field problem at)."""
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.value == key:
                return value_node
    return None


class NodeReader:
    """Values out of nodes, with every problem recorded against the node's line."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.problems: list[tuple[int, int, str]] = []
        self.warnings: list = []  # ConfigWarning: valid shapes config check points out
        self._constructor = yaml.constructor.SafeConstructor()
        self._flattened: dict[int, dict[str, tuple[Node, Node]]] = {}  # see _all_keys
        self._resolver = yaml.resolver.Resolver()
        # id of a scalar node whose value came (in part) from the environment -> the names of
        # the variables and the texts that are theirs (see _env_problem)
        self._from_env: dict[int, tuple[list[str], list[str]]] = {}

    # --- bookkeeping --------------------------------------------------------------------------

    def fail(self, node: Node | None, path: str, message: str) -> Any:
        line = node.start_mark.line + 1 if node is not None else 1
        if node is not None and (env := self._from_env.get(id(node))) is not None:
            message = _env_problem(message, *env)
        self.problems.append((line, len(self.problems), one_line(
            f"{self.source}:{line}: {path or 'top level'}: {message}")))
        return BAD

    def sorted_problems(self) -> list[str]:
        """In file order; problems on one line in the order they were found."""
        return [text for _, _, text in sorted(self.problems)]

    # --- shapes -------------------------------------------------------------------------------

    @staticmethod
    def describe(node: Node) -> str:
        if isinstance(node, yaml.MappingNode):
            return "a mapping"
        if isinstance(node, yaml.SequenceNode):
            return "a list"
        if yaml11_boolean(node):
            return "a string"
        return _TAG_NAMES.get(node.tag, f"a value tagged {node.tag}")

    def scalar(self, node: Node, path: str) -> Any:
        """The Python value of a scalar node, after ``${ENV}`` expansion."""
        if not isinstance(node, yaml.ScalarNode):
            return self.fail(node, path, f"expected a single value, got {self.describe(node)}")
        if node.tag not in _TAG_NAMES:
            return self.foreign_tag(node, path)
        original = node
        taken: list[tuple[str, str]] = []
        if "$" in node.value and node.tag == "tag:yaml.org,2002:str":
            expanded = self.expand(node, path, taken)
            if expanded is BAD:
                return BAD
            if taken:  # a problem with this value must not repeat it: it may be a secret
                self._from_env[id(original)] = ([name for name, _ in taken],
                                                 [expanded, *(text for _, text in taken)])
            if expanded != node.value:
                # An unquoted ``port: ${PORT}`` should become an int, as if the value had been
                # written there; a quoted one stays a string.
                tag = (self._resolver.resolve(yaml.ScalarNode, expanded, (True, False))
                       if node.style is None else node.tag)
                node = yaml.ScalarNode(tag, expanded, node.start_mark, node.end_mark, node.style)
        if yaml11_boolean(node):
            return node.value  # text, as YAML 1.2 and the JSON schema read it (see above)
        try:
            value = self._constructor.construct_object(node)
        except (yaml.YAMLError, ValueError, TypeError) as exc:
            # PyYAML's own message quotes the file's line under it: the first line says it
            what = getattr(exc, "problem", None) or str(exc)
            if node.tag == INT_TAG and sum(c.isdigit() for c in node.value) > 4300:
                what = "a number of more than 4300 digits is too large"  # not Python's words
            return self.fail(original, path, f"cannot read this value: {what.splitlines()[0]}")
        if taken and not isinstance(value, str):  # as messages show it: 0x1F90 is 8080
            self._from_env[id(original)][1].append(str(value))
        if node.tag in (INT_TAG, FLOAT_TAG) and node.style is None:
            ambiguous = _yaml11_only(node.value, value)
            if ambiguous:
                return self.fail(original, path, ambiguous)
        return value

    def foreign_tag(self, node: Node, path: str) -> Any:
        """A tag YAML's plain types do not have (``!!python/object``, ``!!omap``, ``!custom``):
        never constructed, and a problem rather than ignored."""
        tag = node.tag
        if tag.startswith(YAML_TAG_PREFIX):
            tag = "!!" + tag[len(YAML_TAG_PREFIX):]
        return self.fail(node, path, f"the tag '{tag}' is not allowed (keygate reads plain "
                                     "YAML values)")

    def expand(self, node: Node, path: str, taken: list[tuple[str, str]] | None = None) -> Any:
        """``${VAR}`` (a problem when unset, empty or blank), ``${VAR:-default}`` (unset or
        empty), ``${VAR-default}`` (unset), ``$$`` = ``$``.
        ``taken``: (name, value) of each variable whose value was put in is added to it."""
        failed = False

        def substitute(match: re.Match[str]) -> str:
            nonlocal failed
            if match.group(0) == "$$":
                return "$"
            body = ENV_BODY_RE.fullmatch(match.group(1))
            if body is None:
                failed = True
                self.fail(node, path, f"bad environment reference '{match.group(0)}' "
                                      "(use ${NAME} or ${NAME:-default})")
                return ""
            name, operator, default = body.groups()
            if default is not None and "${" in default:  # '${A:-${B}}' ends at the first '}'
                failed = True
                self.fail(node, path, f"bad environment reference '${{{name}{operator}${{...' "
                                      "(a fallback cannot hold another ${...}; use ${NAME} or "
                                      "${NAME:-default})")
                return ""
            value = os.environ.get(name)
            if operator == ":-" and not value:
                return default
            if operator == "-" and value is None:
                return default
            if value is None:
                failed = True
                self.fail(node, path, f"environment variable {name} is not set "
                                      f"(set it, or write ${{{name}:-default}})")
                return ""
            if operator is None and not value.strip():  # a Secret's key left blank: said,
                failed = True                            # not read as null (${NAME-} allows it)
                self.fail(node, path, f"environment variable {name} is empty "
                                      f"(set it, or write ${{{name}:-default}})")
                return ""
            if taken is not None and value:
                taken.append((name, value))
            return value

        result = ENV_REF_RE.sub(substitute, node.value)
        return BAD if failed else result

    def mapping(self, node: Node | None, path: str,
                allowed: tuple[str, ...] | None = None) -> list[tuple[str, Node, Node]] | None:
        """(key, key node, value node) in file order; unknown and duplicate keys reported.

        ``None`` (absent or ``key:`` with nothing after it) is returned as an empty list; a
        node that is not a mapping is reported and returned as ``None``.
        """
        if is_null(node):
            return []
        if not isinstance(node, yaml.MappingNode):
            self.fail(node, path, f"expected a mapping, got {self.describe(node)}")
            return None
        if node.tag != MAP_TAG:
            self.foreign_tag(node, path)
            return None
        explicit = [(k, v) for k, v in node.value if k.tag != MERGE_TAG]
        try:
            merged = self._merged(node, set())
        except _BadMerge as exc:
            self.fail(exc.node, path, f"bad merge key: {exc}")
            return None
        explicit_keys = {k.value for k, _ in explicit if isinstance(k, yaml.ScalarNode)}
        entries: dict[str, tuple[str, Node, Node]] = {}
        for key, (key_node, value_node) in merged.items():  # explicit keys win over merged
            if key not in explicit_keys:
                entries[key] = (key, key_node, value_node)
        seen: dict[str, Node] = {}
        for key_node, value_node in explicit:
            sub = f"{path}.{key_node.value}" if path else str(key_node.value)
            if not isinstance(key_node, yaml.ScalarNode):
                self.fail(key_node, path, f"a key must be a plain name, got "
                                          f"{self.describe(key_node)}")
                continue
            key = key_node.value
            if key in seen:
                self.fail(key_node, sub, f"duplicate key (first given on line "
                                         f"{seen[key].start_mark.line + 1})")
                continue
            seen[key] = key_node
            entries[key] = (key, key_node, value_node)
        result = []
        for key, key_node, value_node in entries.values():
            if allowed is not None and key not in allowed:
                if not path and key.startswith("x-"):
                    continue  # top-level x-* keys hold YAML anchors, as in docker compose
                sub = f"{path}.{key}" if path else key
                hint = suggest(key, allowed) or f" (allowed: {', '.join(allowed)})"
                self.fail(key_node, sub, f"unknown key '{key}'{hint}")
                continue
            result.append((key, key_node, value_node))
        return result

    def _merged(self, node: Node, active: set[int]) -> dict[str, tuple[Node, Node]]:
        """The keys YAML merge keys (``<<: *defaults``, ``<<: [*a, *b]``) bring into the
        mapping ``node``: of the mappings listed, an earlier one's key wins (YAML's rule). The
        tree is not changed (an anchored mapping reads the same at each of its uses), and each
        mapping is flattened once (``<<`` chains cost what their anchors do, not more)."""
        merged: dict[str, tuple[Node, Node]] = {}
        for key_node, value_node in node.value:
            if key_node.tag != MERGE_TAG:
                continue
            if isinstance(value_node, yaml.MappingNode):
                sources = [value_node]
            elif isinstance(value_node, yaml.SequenceNode):
                sources = value_node.value
            else:
                raise _BadMerge(value_node, "expected a mapping or list of mappings for "
                                            f"merging, but found {self.describe(value_node)}")
            for source in sources:
                if not isinstance(source, yaml.MappingNode):
                    raise _BadMerge(source, "expected a mapping for merging, but found "
                                            f"{self.describe(source)}")
                for key, pair in self._all_keys(source, active).items():
                    merged.setdefault(key, pair)
        return merged

    def _all_keys(self, node: Node, active: set[int]) -> dict[str, tuple[Node, Node]]:
        """Every key of a mapping merged into another: its own (a key given twice is a
        problem, as in any mapping read), then those it merges in itself."""
        done = self._flattened.get(id(node))
        if done is not None:
            return done
        if id(node) in active:
            raise _BadMerge(node, "a mapping merges itself")
        active.add(id(node))
        own: dict[str, tuple[Node, Node]] = {}
        for key_node, value_node in node.value:
            if key_node.tag == MERGE_TAG or not isinstance(key_node, yaml.ScalarNode):
                continue
            first = own.get(key_node.value)
            if first is not None:  # read nowhere else when it sits under an x- key
                raise _BadMerge(key_node, f"'{key_node.value}' is given twice in a merged "
                                          f"mapping (first on line {first[0].start_mark.line + 1})")
            own[key_node.value] = (key_node, value_node)
        keys = {**own, **{k: p for k, p in self._merged(node, active).items() if k not in own}}
        active.discard(id(node))
        self._flattened[id(node)] = keys
        return keys

    def sequence(self, node: Node, path: str) -> list[Node] | None:
        if not isinstance(node, yaml.SequenceNode):
            self.fail(node, path, f"expected a list, got {self.describe(node)}")
            return None
        if node.tag != SEQ_TAG:
            self.foreign_tag(node, path)
            return None
        return list(node.value)
