"""Typed field readers and dataclass-shaped sections, on top of the generic node reader.

A section is read into a settings dataclass: the keys a file may give are that dataclass's
fields (in their declared order, which is also the order "allowed: ..." hints list them unless
a section names its documented order), each
read by the reader given for it. A field without a reader (``Plan.name``, ``Upstream.name``) is
not a key of the file; its value comes from elsewhere (``fixed``).
"""

from __future__ import annotations

import dataclasses
import os
import re
import stat
from typing import Any, Callable, Mapping, Sequence

from ..settings import ConfigWarning
from .nodes import (BAD, YAML11_BOOLEANS, YAML11_WORDS, Node, NodeReader, describe_value,
                    one_line, suggest)

FieldReader = Callable[[Node, str], Any]
ENV_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# The longest timeout taken: seconds beyond it no timer or store expiry needs to hold (the
# store's marker TTLs are ten times its timeout, and Redis refuses an expiry past ~2^63 ms)
MAX_TIMEOUT = 86400


def _file_kind(mode: int) -> str:
    for test, kind in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return kind
    return "not a file"


class SchemaReader(NodeReader):
    """Strings, integers, numbers, booleans, lists and sections, each checked as it is read."""

    def string(self, node: Node, path: str, *, pattern: re.Pattern[str] | None = None,
               what: str = "", choices: tuple[str, ...] | None = None,
               nullable: bool = False) -> Any:
        """A non-empty string; with ``choices`` an enum, with ``pattern`` a syntax."""
        value = self.scalar(node, path)
        if value is BAD:
            return BAD
        if value is None and nullable:
            return None
        if not isinstance(value, str):
            return self.fail(node, path, f"expected a string, got {describe_value(value)}")
        if choices is not None and value not in choices:
            return self.fail(node, path, f"must be one of {', '.join(choices)}, got "
                                         f"'{value}'{suggest(value, choices)}")
        if not value:
            return self.fail(node, path, "must not be empty")
        if pattern is not None and not pattern.fullmatch(value):
            return self.fail(node, path, f"'{value}' is not {what}")
        return value

    def text(self, node: Node, path: str) -> Any:
        return self.string(node, path)

    def readable_file(self, node: Node, path: str, name: str) -> bool:
        """Whether ``name`` is a regular file this process can open, else a problem. Only a
        regular file: a FIFO named here made the open wait for a writer, and a device
        (/dev/zero) had OpenSSL read it for ever; config check, serve and reloads hung."""
        try:
            info = os.stat(name)
            if not stat.S_ISREG(info.st_mode):
                self.fail(node, path, f"'{name}' is not a regular file "
                                      f"({_file_kind(info.st_mode)})")
                return False
            # O_NONBLOCK: should a FIFO take its place since, the open does not wait
            with open(os.open(name, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC), "rb") as fh:
                if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
                    self.fail(node, path, f"'{name}' is not a regular file")
                    return False
        except OSError as exc:
            self.fail(node, path, f"cannot read '{name}': {exc.strerror or exc}")
            return False
        return True

    def env_name(self, node: Node, path: str) -> Any:
        """The name of an environment variable (that holds a secret the file should not). A
        value that is not a name is never repeated: it is most likely the secret itself
        (``${KEYGATE_ADMIN_TOKEN}`` written where the variable's name belongs), and problems go
        to the terminal, the log and a reload's answer."""
        value = self.string(node, path)
        if value is BAD or ENV_NAME_RE.fullmatch(value):
            return value
        return self.fail(node, path, "must be the name of the environment variable that holds "
                                     "the secret (letters, digits and _), not the secret itself")

    def integer(self, node: Node, path: str, *, minimum: int | None = None,
                maximum: int | None = None, nullable: bool = False) -> Any:
        value = self.scalar(node, path)
        if value is BAD:
            return BAD
        if value is None and nullable:
            return None
        if isinstance(value, float) and value.is_integer():
            value = int(value)  # 60.0: an integer to JSON Schema (the published schema's type)
        if isinstance(value, bool) or not isinstance(value, int):
            extra = " or null (unlimited)" if nullable else ""
            return self.fail(node, path, f"expected an integer{extra}, got "
                                         f"{describe_value(value)}")
        return self.in_range(node, path, value, minimum, maximum)

    def in_range(self, node: Node, path: str, value: int, minimum: int | None,
                 maximum: int | None) -> Any:
        if minimum is not None and maximum is not None and not minimum <= value <= maximum:
            return self.fail(node, path, f"must be between {minimum} and {maximum}, got {value}")
        if minimum is not None and value < minimum:
            return self.fail(node, path, f"must be at least {minimum}, got {value}")
        if maximum is not None and value > maximum:
            return self.fail(node, path, f"must be at most {maximum}, got {value}")
        return value

    def number(self, node: Node, path: str, *, minimum: float | None = None,
               positive: bool = False, maximum: float | None = None) -> Any:
        """A finite number of seconds, as a float."""
        value = self.scalar(node, path)
        if value is BAD:
            return BAD
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return self.fail(node, path, f"expected a number of seconds, got "
                                         f"{describe_value(value)}")
        if value != value or value in (float("inf"), float("-inf")):
            return self.fail(node, path, f"must be a finite number, got {value}")
        if positive and value <= 0:
            return self.fail(node, path, f"must be greater than 0, got {value}")
        if minimum is not None and value < minimum:
            return self.fail(node, path, f"must be at least {minimum}, got {value}")
        if maximum is not None and value > maximum:
            day = " (a day)" if maximum == MAX_TIMEOUT else ""
            return self.fail(node, path, f"must be at most {maximum:g}{day}, got {value:g}")
        return float(value)

    def seconds(self, node: Node, path: str) -> Any:
        """A timeout: above 0, at most a day (MAX_TIMEOUT)."""
        return self.number(node, path, positive=True, maximum=MAX_TIMEOUT)

    def ratio(self, node: Node, path: str) -> Any:
        """A number from 0 to 1, as a float."""
        value = self.scalar(node, path)
        if value is BAD:
            return BAD
        if isinstance(value, bool) or not isinstance(value, (int, float)) or \
                not 0 <= value <= 1:
            return self.fail(node, path, f"expected a number from 0 to 1, got "
                                         f"{describe_value(value)}")
        return float(value)

    def boolean(self, node: Node, path: str) -> Any:
        value = self.scalar(node, path)
        if value is BAD:
            return BAD
        if isinstance(value, str) and value in YAML11_WORDS:
            # yes/no/on/off where a boolean is expected: YAML 1.1's boolean, which files
            # written for keygate have always meant (public: yes was true), so it is still
            # taken, as YAML 1.2 readers that know the target is a boolean take it, and as the
            # JSON schema takes it (quoted or not: to YAML 1.2 both are the text); a warning
            # says to write true or false, the one spelling every reader agrees on.
            # (a quoted word is text to YAML 1.1 too: the warning says which it is)
            meant = YAML11_BOOLEANS[value.lower()]
            written = "true" if meant else "false"
            line = node.start_mark.line + 1
            why = ("YAML 1.1's boolean word, text to YAML 1.2 tools" if node.style is None
                   else "quoted, it is text in YAML 1.1 and 1.2; taken as YAML 1.1's boolean "
                        "word")
            self.warnings.append(ConfigWarning(one_line(
                f"{self.source}:{line}: {path}: warning: '{value}' is read as {written} "
                f"({why}); write {written}"),
                ("yaml11-boolean", path, value)))
            return meant
        if not isinstance(value, bool):
            return self.fail(node, path, f"expected true or false, got {describe_value(value)}")
        return value

    def string_list(self, node: Node, path: str, item: FieldReader) -> Any:
        """A list read item by item (``path[i]``); ``BAD`` when any item is."""
        items = self.sequence(node, path)
        if items is None:
            return BAD
        values = [item(child, f"{path}[{i}]") for i, child in enumerate(items)]
        return BAD if any(v is BAD for v in values) else values

    def section(self, node: Node | None, where: str, cls: type,
                readers: Mapping[str, FieldReader],
                required: Mapping[str, str] | None = None,
                order: Sequence[str] | None = None, **fixed: Any) -> Any:
        """A mapping read into the dataclass ``cls``; bad or absent fields keep defaults.

        The keys allowed are ``cls``'s fields that have a reader. ``required`` maps a key that
        must be given to a hint shown when it is missing; ``fixed`` are constructor arguments
        not read from the file (or placeholders a required key's value replaces). ``order``:
        the order "allowed: ..." hints list the keys in, where the documented order is not the
        dataclass's (a route's keys: path, methods, upstream, scopes, public).
        """
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = set(readers) - set(names)
        if unknown:
            raise TypeError(f"{cls.__name__} has no field {', '.join(sorted(unknown))}")
        allowed = tuple(n for n in names if n in readers)
        if order is not None:
            if sorted(order) != sorted(allowed):
                raise TypeError(f"order {order!r} does not list the keys of {cls.__name__}")
            allowed = tuple(order)
        entries = self.mapping(node, where, allowed)
        if entries is None:
            return cls(**fixed)
        given = {key for key, _, _ in entries}
        for key, hint in (required or {}).items():
            if key not in given:
                self.fail(node, f"{where}.{key}", f"required {hint}".rstrip())
        kwargs = dict(fixed)
        for key, _key_node, value_node in entries:
            value = readers[key](value_node, f"{where}.{key}")
            if value is not BAD:
                kwargs[key] = value
        return cls(**kwargs)
