"""A key listing's page: filters, order and keyset cursors (pure)."""

from __future__ import annotations

import base64
import json
from typing import Mapping, TypeVar

from ..errors import BadRequest
from ..models import MAX_UNUSED_DAYS, KeyRecord
from ..store import STATUSES
from ..store.records import KeySummary
from ..strictjson import strict_json
from .validate import query_int

LIST_PARAMS = ("status", "unused_days", "sort", "limit", "cursor")
LIST_MAX = 1000
SORTS = ("created", "last_used", "name")
K = TypeVar("K", KeyRecord, KeySummary)


def select_keys(keys: list[K], query: Mapping[str, str],
                now: float) -> tuple[list[K], str | None]:
    """A listing's page (of ``KeyRecord``s, or the ``KeySummary``s a listing reads first):
    ``status``, ``unused_days`` (never used, or last used more than N days
    ago), ``sort`` (created|last_used|name, ascending), ``limit`` and ``cursor`` (keyset: the
    page continues after the last key of the previous one, so keys created or deleted between
    pages neither repeat nor vanish). Returns (page, next cursor or None)."""
    status = query.get("status")
    if status is not None and status not in STATUSES:
        raise BadRequest(f"The query parameter 'status' must be one of {', '.join(STATUSES)}.")
    sort = query.get("sort", "created")
    if sort not in SORTS:
        raise BadRequest(f"The query parameter 'sort' must be one of {', '.join(SORTS)}.")
    limit = query_int(query, "limit", 1, LIST_MAX)
    keys = sorted(matching(keys, query, now), key=lambda k: _sort_key(k, sort))
    if "cursor" in query:
        after = _after(query["cursor"], sort)
        keys = [k for k in keys if _sort_key(k, sort) > after]
    if limit is None or len(keys) <= limit:
        return keys, None
    page = keys[:limit]
    return page, _cursor(sort, _sort_key(page[-1], sort))


def matching(keys: list[K], query: Mapping[str, str], now: float) -> list[K]:
    """``keys`` (in their order) that meet the listing's filters, ``status`` and
    ``unused_days`` (a query ``select_keys`` accepted): a page chosen on summaries is filtered
    again on the records read for it, which may be newer."""
    status = query.get("status")
    unused = query_int(query, "unused_days", 0, MAX_UNUSED_DAYS)
    if status is not None:
        keys = [k for k in keys if k.status(now) == status]
    if unused is not None:
        cutoff = now - unused * 86400
        keys = [k for k in keys if k.last_used_at is None or k.last_used_at < cutoff]
    return keys


def _sort_key(key: KeyRecord | KeySummary, sort: str) -> tuple:
    if sort == "name":
        return (key.name, key.id)
    if sort == "last_used":  # least recently used first; never used before all
        return (-1.0 if key.last_used_at is None else key.last_used_at, key.id)
    return (key.created_at, key.id)


def _cursor(sort: str, sort_key: tuple) -> str:
    raw = json.dumps([sort, *sort_key], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _after(text: str, sort: str) -> tuple:
    """The sort key a ``cursor`` continues after (400 if it is not one of ours for ``sort``)."""
    try:
        # validate=True: characters outside the alphabet are refused, not skipped (a cursor
        # garbled in a copy was read as the one it was garbled from)
        raw = base64.b64decode(text + "=" * (-len(text) % 4), altchars=b"-_", validate=True)
        if base64.urlsafe_b64encode(raw).decode().rstrip("=") != text:
            raise ValueError  # not as _cursor writes one (stray bits in the last character)
        data = strict_json(raw)  # a NaN sort key compares below every key: an empty page
        if not (isinstance(data, list) and len(data) == 3 and data[0] == sort
                and isinstance(data[2], str)
                and isinstance(data[1], str if sort == "name" else (int, float))
                and not isinstance(data[1], bool)):
            raise ValueError
    except (ValueError, TypeError, RecursionError):
        raise BadRequest("The query parameter 'cursor' is not a cursor this listing gave "
                         "(with the same 'sort').") from None
    return (data[1], data[2])
