"""Percent-decoding of request text (a query, a header value) in a few C-level passes. Pure.

``urllib.parse.unquote`` walks the escapes in Python and raises and catches a ``KeyError`` for
every '%' not followed by two hex digits: an 8 KiB query of '%' signs took ~9 ms to decode,
and the key-in-URL screen, the access log's masking and the ``_method`` read each decode up to
three times, on the event loop, before any key is asked for. These give urllib's results for
the same text in time linear in it, whatever it holds (~0.1 ms for those 8 KiB).
"""

from __future__ import annotations

import re
from itertools import chain
from urllib.parse import unquote

_ESCAPE = re.compile(r"%([0-9A-Fa-f]{2})")


# every hex digit as 'h', every other byte as it is: a text dense in '%' signs holds an
# escape only if this holds "%hh"
_HEX_AS_H = bytes(ord("h") if chr(i) in "0123456789abcdefABCDEF" else i for i in range(256))


def unquote_latin1(text: str) -> str:
    """``urllib.parse.unquote(text, encoding="latin-1")``: each well-formed escape as the
    character of its byte; a '%' without two hex digits after it, and everything else, as
    it is."""
    if "%" not in text:
        return text
    if len(text) > 256 and text.count("%") * 8 > len(text) and \
            b"%hh" not in text.encode("latin-1", "ignore").translate(_HEX_AS_H):
        # '%' signs and no escape (a hostile query of '%'s, or one decoded already): the
        # regex tries a match at every '%' (~5x the check); dropped characters (not latin-1)
        # can only join a '%' to hex digits, never part one from them
        return text
    parts = _ESCAPE.split(text)  # text, hex, text, hex, ..., text
    if len(parts) == 1:
        return text
    texts = parts[0::2]
    chars = bytes.fromhex("".join(parts[1::2])).decode("latin-1")
    return "".join(chain.from_iterable(zip(texts, chars))) + texts[-1]


def unquote_plus(text: str) -> str:
    """``urllib.parse.unquote_plus(text)`` (UTF-8, invalid sequences replaced)."""
    return unquote_utf8(text.replace("+", " "))


def unquote_utf8(text: str) -> str:
    """``urllib.parse.unquote(text)`` (UTF-8, invalid sequences replaced)."""
    if "%" not in text:
        return text
    if not text.isascii():  # (a request line's query is ASCII: llhttp refuses other bytes)
        return unquote(text)
    # ASCII text: the escapes' bytes among the text's, read as UTF-8 as one byte string
    return unquote_latin1(text).encode("latin-1").decode("utf-8", "replace")
