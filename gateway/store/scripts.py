"""The Lua scripts of ``gateway/store/lua/``, read from the installed package.

Every script keygate runs on Redis is a file there (none is written inline in Python), so
each can be read, linted and reviewed on its own. Scripts cannot include one another.
"""

from __future__ import annotations

import hashlib
from importlib import resources
from typing import NamedTuple


class Script(NamedTuple):
    name: str   # file name without ".lua"
    text: str
    sha: str    # SHA-1 of the text, as EVALSHA names it


def load(name: str) -> Script:
    text = resources.files(__package__).joinpath("lua", f"{name}.lua").read_text()
    return Script(name, text, hashlib.sha1(text.encode()).hexdigest())
