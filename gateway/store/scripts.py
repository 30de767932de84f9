"""The Lua scripts of ``gateway/store/lua/``, read from the installed package.

Every script keygate runs on Redis is a file there (none is written inline in Python), so
each can be read, linted and reviewed on its own. A line ``-- include: _NAME.lua`` is
replaced by that file's text when the script is loaded (Redis scripts cannot call one
another): a helper several scripts share is written once.
"""

from __future__ import annotations

import functools
import hashlib
import re
from importlib import resources
from typing import NamedTuple


class Script(NamedTuple):
    name: str   # file name without ".lua"
    text: str
    sha: str    # SHA-1 of the text, as EVALSHA names it


_INCLUDE = re.compile(r"^-- include: (_\w+)\.lua$", re.M)


def _read(name: str) -> str:
    return resources.files(__package__).joinpath("lua", f"{name}.lua").read_text()


@functools.cache  # package data, read once a process: each Store made read its 18 again
def load(name: str) -> Script:
    text = _INCLUDE.sub(lambda m: _read(m.group(1)).rstrip("\n"), _read(name))
    return Script(name, text, hashlib.sha1(text.encode()).hexdigest())
