"""Input of the admin API and self-service, checked field by field (pure: no store, no HTTP).

Every refusal is a 400 ``bad_request`` that names the field or query parameter, so a caller can
fix the request without reading the source. The store trusts what these return.
"""

from __future__ import annotations

import re
from typing import Any, Iterator, Mapping

from ..accesslog import holds_token
from ..config import Config, KeysConfig, parse_rate_limit
from ..errors import BadRequest, shown
from ..models import (LIMIT_FIELDS, MAX_AUDIT_LIMIT, MAX_COUNT, MAX_META_DEPTH, MAX_SCOPES,
                      MAX_SECONDS, ROLE_NAME_HINT, ROLE_NAME_RE,
                      UNSAFE_TEXT_CLASS, meta_json, parse_rfc3339, rfc3339, well_formed_scope,
                      whole_second)
from ..store import WORKSPACE_ID_RE
from ..strictjson import NotUtf8, OutOfRange, RepeatedName, TooDeep, strict_json
from ..trust import allowed_network

MAX_NAME = 200
MAX_DESCRIPTION = 2000
MAX_ALLOWED_IPS = 100
MAX_MONTHLY = MAX_COUNT
DAILY_DEFAULT, DAILY_MAX = 30, 90
AUDIT_DEFAULT, AUDIT_MAX = 100, MAX_AUDIT_LIMIT


def parse_body(raw: bytes, allowed: tuple[str, ...], keys: KeysConfig | None = None,
               operator_token: str = "", prefixes: tuple[str, ...] = ()) -> dict[str, Any]:
    """A JSON object whose fields are all in ``allowed`` (an empty body is ``{}``), read by
    :func:`strict_json`. With ``keys`` (the config's), no text anywhere in it may hold a
    key's token of its prefix and environments (:func:`refuse_tokens`); with
    ``operator_token`` (an operator's call only: :func:`refuse_operator_token`), nothing in
    it may hold that. ``prefixes``: key prefixes besides the config's whose tokens are
    refused too (those recorded in the store: ``Store.key_prefixes_known``)."""
    if not raw.strip():
        return {}
    try:
        data = strict_json(raw, max_depth=MAX_META_DEPTH + 1)  # a body holding meta: +1
    except NotUtf8:
        raise BadRequest("The request body is not UTF-8; send the JSON encoded as UTF-8 "
                         "(RFC 8259), not UTF-16, UTF-32 or Latin-1.") from None
    except TooDeep:
        raise BadRequest(f"The request body's JSON is nested more than {MAX_META_DEPTH} "
                         "levels deep (the most a field such as 'meta' may hold).") from None
    except RepeatedName as exc:
        raise BadRequest(f"The request body gives '{shown(exc.name)}' more than once in one "
                         "object; give each field once.") from None
    except OutOfRange as exc:
        raise BadRequest(f"The request body holds a number out of range ({exc.shown}); "
                         "no field takes one that large.") from None
    except (ValueError, RecursionError):
        raise BadRequest("The request body is not valid JSON.") from None
    if not isinstance(data, dict):
        raise BadRequest("The request body must be a JSON object.")
    if operator_token:  # before the names are echoed in "Unknown field"
        refuse_operator_token(data, operator_token)
    unknown = [f for f in data if f not in allowed]
    if unknown:
        takes = f"accepts: {', '.join(allowed)}" if allowed else "takes no fields"
        raise BadRequest(f"Unknown field '{shown(unknown[0])}'; this endpoint {takes}.")
    if keys is not None:
        known = tuple(dict.fromkeys((keys.prefix, *prefixes)))
        refuse_tokens(data, known[0] if len(known) == 1 else known, keys.environments)
    return data


def _texts(data: Mapping[str, Any]) -> Iterator[tuple[str, str]]:
    """(the top-level field, a text) for every text of a body as decoded: the fields' names,
    string values, list items, and names and values within ``meta``, at any depth."""
    for field, value in data.items():
        yield field, field
        pending = [value]
        while pending:  # no recursion: the body's depth is bounded, but not by this stack
            item = pending.pop()
            if isinstance(item, str):
                yield field, item
            elif isinstance(item, dict):
                pending.extend(item)
                pending.extend(item.values())
            elif isinstance(item, list):
                pending.extend(item)


def refuse_tokens(data: Mapping[str, Any], prefix: str | tuple[str, ...],
                  environments: tuple[str, ...]) -> None:
    """400 naming the field when any text of ``data`` (a value, an item, a name within
    ``meta``) holds a key's token, its checksum right or not (``accesslog.holds_token``: the
    prefix at a word's start and a configured environment; not the logs' broader
    ``holds_key``, which refused a ``pkg_sha256_<hex digest>`` label). Everything the admin
    API takes as text is kept and shown again: in listings to every ``keys:admin`` key of the
    workspace, in the audit after the key is gone, and a scope is forwarded upstream in the
    identity headers on every request. A token pasted there by mistake (the console's Copy,
    then the next form) would be stored in the clear."""
    for field, text in _texts(data):
        if holds_token(text, prefix, environments) or \
                _INVISIBLE.search(text) is not None and \
                holds_token(_without_invisible(text), prefix, environments):
            raise BadRequest(f"The field '{field}' holds an API key's token; a token is "
                             "a secret that keygate never stores. Remove it (nothing "
                             "was stored).")


OPERATOR_TOKEN_SEARCHED = 16
"""An operator token this long or longer is looked for in the operator's request bodies (a
shorter one, already warned weak at start, could match ordinary text such as a scope)."""


def refuse_operator_token(data: Mapping[str, Any], operator_token: str) -> None:
    """400 when a text of an operator's request body (:func:`_texts`: as decoded, so a JSON
    escape such as ``\\u0074`` or ``\\/`` hides nothing) holds the operator token: signed in
    to the console by pasting it, the operator may paste it again into the next form, and what
    the admin API stores (a key's name, description or meta, a workspace's name) is listed to
    the workspace's ``keys:admin`` keys. Only the operator's bodies (the caller passes the
    token for those alone): a workspace key told "this holds the operator token" could test
    guesses through key names, counted by no throttle. The message names no field (the token
    may be one's name)."""
    token = operator_token.strip()
    if len(token) < OPERATOR_TOKEN_SEARCHED:
        return
    if any(token in text or _INVISIBLE.search(text) is not None and
           token in _without_invisible(text) for _, text in _texts(data)):
        raise BadRequest("The request body holds the operator token; nothing was stored. "
                         "Remove it: what the admin API stores is shown to the workspace's "
                         "admins.")


def refuse_operator_token_in_path(segment: str, operator_token: str) -> None:
    """400 when a path segment an endpoint stores (``PUT /workspaces/{ws}/roles/{name}``: the
    role's name, listed to the workspace's ``keys:admin`` keys) holds the operator token, as
    :func:`refuse_operator_token` refuses it in a body: a lowercase operator token (a uuid4,
    ``openssl rand -hex 16``) is a valid role name. The operator's calls only, the same
    length rule; ``segment`` as decoded from the path."""
    token = operator_token.strip()
    if len(token) < OPERATOR_TOKEN_SEARCHED:
        return
    if token in segment or _INVISIBLE.search(segment) is not None and \
            token in _without_invisible(segment):
        raise BadRequest("The request path holds the operator token; nothing was stored. "
                         "Remove it: what the admin API stores is shown to the workspace's "
                         "admins.")


def check_query(query: Mapping[str, str], allowed: tuple[str, ...] = ()) -> None:
    """Refuse query parameters an endpoint does not take: a typo such as ``?state=active``
    must not silently answer as if no filter had been asked for."""
    unknown = [p for p in query if p not in allowed]
    if unknown:
        takes = f"it takes: {', '.join(allowed)}" if allowed else "it takes none"
        raise BadRequest(f"Unknown query parameter '{shown(unknown[0])}'; {takes}.")
    getall = getattr(query, "getall", None)  # aiohttp's multidict holds every value
    repeated = next((p for p in query if getall is not None and len(getall(p)) > 1), None)
    if repeated is not None:  # else the first value would win, silently
        raise BadRequest(f"The query parameter '{shown(repeated)}' is given more than once; "
                         "give it once.")


# what str.strip() removes besides those, and what shows as nothing (Unicode's default-ignorable
# code points of the BMP: zero-width space and joiners, word joiner, soft hyphen, variation
# selectors, BOM, Hangul fillers; and the Braille blank): a name of these alone is empty. Within
# a visible name they stay (a Persian word's ZWNJ, an emoji's ZWJ). BMP only: the OpenAPI
# document's patterns write them as \uXXXX, which every regex dialect reads alike.
BLANK_CLASS = (r" \u00a0\u00ad\u034f\u115f\u1160\u1680\u17b4\u17b5\u180b-\u180f\u2000-\u200d"
               r"\u202f\u205f-\u2065\u206a-\u206f\u2800\u3000\u3164\ufe00-\ufe0f\ufeff\uffa0"
               r"\ufff0-\ufffb")
# Beyond the BMP, what shows as nothing too: Unicode's default-ignorable code points there
# (shorthand format controls, musical beam and slur marks, and U+E0000-E0FFF: the tag
# characters of "ASCII smuggling", the supplementary variation selectors, and the unassigned
# rest of that range, ignorable by definition). A name of these alone is empty as well (a flag
# such as England's keeps its tags after a visible character). Checked here, not in the
# OpenAPI document's patterns: a JSON Schema pattern reads astral characters as UTF-16
# surrogate pairs in some dialects and as code points in others.
BLANK_BEYOND_BMP = "\U0001bca0-\U0001bca3\U0001d173-\U0001d17a\U000e0000-\U000e0fff"
_UNSAFE_TEXT = re.compile(f"[{UNSAFE_TEXT_CLASS}]")
_VISIBLE = re.compile(f"[^{UNSAFE_TEXT_CLASS}{BLANK_CLASS}{BLANK_BEYOND_BMP}]")
# what shows as nothing or is no character at all: a token or the operator token with one
# inside (pasted from rich text: a zero-width space, a soft hyphen, a word joiner, a BOM; a tag
# character) still reads as the secret, so it is looked for without them. Not the visible
# blanks among them (a space, a no-break space: str.isspace()), which would join ordinary
# words into a token.
_INVISIBLE = re.compile(f"[{UNSAFE_TEXT_CLASS}{BLANK_CLASS}{BLANK_BEYOND_BMP}]")


def _without_invisible(text: str) -> str:
    """``text`` without its invisible characters (``_INVISIBLE`` but not a space)."""
    return _INVISIBLE.sub(lambda m: m.group() if m.group().isspace() else "", text)


def parse_text(data: Mapping[str, Any], field: str, max_len: int, *, required: bool = False,
               nonempty: bool = True) -> str | None:
    """A text field (name, description): None when absent and not ``required``."""
    if field not in data:
        if required:
            raise BadRequest(f"The field '{field}' is required.")
        return None
    value = data[field]
    if not isinstance(value, str):
        raise BadRequest(f"The field '{field}' must be a string.")
    if nonempty and _VISIBLE.search(value) is None:
        raise BadRequest(f"The field '{field}' must not be empty.")
    if len(value) > max_len:
        raise BadRequest(f"The field '{field}' is too long ({len(value)} characters; "
                         f"at most {max_len}).")
    if _UNSAFE_TEXT.search(value):
        # C1 controls too (U+009B is a terminal CSI), and the bidi overrides that make a
        # listing read other than it is: text fields reach `keygate keys list` and the console
        raise BadRequest(f"The field '{field}' must not contain control characters "
                         "(newlines, tabs, escapes, bidirectional overrides, ...).")
    try:  # JSON can carry lone surrogates ("\ud800"), which no store can hold as UTF-8
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise BadRequest(f"The field '{field}' is not valid Unicode text (it holds a lone "
                         "surrogate).") from None
    return value


def whole_number(value: Any) -> int | None:
    """``value`` as an int when it is a JSON integer, as JSON Schema has it (``60`` or
    ``60.0``: the OpenAPI document's ``integer``), else None (``1.5``, ``true``, ``"60"``)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, float):  # finite: strict_json refuses NaN and 1e999
        return int(value) if value.is_integer() else None
    return value if isinstance(value, int) else None


def parse_seconds(data: Mapping[str, Any], field: str, minimum: int) -> int | None:
    """A whole number of seconds from ``minimum`` to a century; None when absent."""
    if field not in data:
        return None
    value = whole_number(data[field])
    if value is None:
        raise BadRequest(f"The field '{field}' must be an integer number of seconds.")
    if not minimum <= value <= MAX_SECONDS:
        raise BadRequest(f"The field '{field}' must be between {minimum} and {MAX_SECONDS}.")
    return value


def parse_workspace_id(value: Any) -> str:
    if not isinstance(value, str) or not WORKSPACE_ID_RE.fullmatch(value):
        raise BadRequest("The field 'id' must be a slug: lowercase letters, digits and "
                         "'-', starting with a letter or digit, at most 63 characters.")
    return value


def parse_plan(data: Mapping[str, Any], config: Config) -> str | None:
    """The ``plan`` field, one of the configured plans; None when absent."""
    if "plan" not in data:
        return None
    plan = data["plan"]
    if not isinstance(plan, str) or plan not in config.plans:
        raise BadRequest(f"The field 'plan' must be one of the configured plans: "
                         f"{', '.join(sorted(config.plans))}.")
    return plan


def parse_scopes(value: Any, field: str = "scopes") -> tuple[str, ...]:
    if not isinstance(value, list):
        raise BadRequest(f"The field '{field}' must be a list of scope strings.")
    if len(value) > MAX_SCOPES:
        raise BadRequest(f"The field '{field}' holds more than {MAX_SCOPES} scopes.")
    scopes: list[str] = []
    for scope in value:
        if not well_formed_scope(scope):
            raise BadRequest(f"The field '{field}' holds a malformed scope {shown(scope) if isinstance(scope, str) else scope!r}; a scope "
                             "looks like 'people:read' (letters, digits, '_', '.', '-', "
                             "parts joined by ':').")
        if scope not in scopes:
            scopes.append(scope)
    return tuple(scopes)


def check_catalogue(scopes: tuple[str, ...], config: Config, field: str = "scopes") -> None:
    """With a scope catalogue configured, every scope must be in it (``ALL`` always is)."""
    if config.scopes is None:
        return
    unknown = [s for s in scopes if s != "ALL" and s not in config.scopes]
    if unknown:
        raise BadRequest(f"The field '{field}' names a scope that is not in the scope "
                         f"catalogue: {shown(unknown[0])!r} (GET /admin/v1/scopes lists them).")


def parse_role_name(value: Any, field: str = "role") -> str:
    if not isinstance(value, str) or not ROLE_NAME_RE.fullmatch(value):
        raise BadRequest(f"The field '{field}' must be a role name ({ROLE_NAME_HINT}).")
    return value


def parse_expires_at(value: Any, now: float, *, nullable: bool) -> float | None:
    if value is None:
        if nullable:
            return None
        raise BadRequest("The field 'expires_at' must be an RFC 3339 timestamp.")
    if not isinstance(value, str):
        raise BadRequest("The field 'expires_at' must be an RFC 3339 timestamp such as "
                         "'2027-01-31T00:00:00Z'.")
    try:
        when = whole_second(parse_rfc3339(value))
    except ValueError:
        raise BadRequest(f"The field 'expires_at' is not an RFC 3339 timestamp with a time "
                         f"zone (e.g. '2027-01-31T00:00:00Z'): {shown(value)!r}.") from None
    if when <= now:
        try:
            shown_when = rfc3339(when)
        except (ValueError, OverflowError):  # before 0001-01-01 in UTC (a year 1 with an offset)
            shown_when = "before 0001-01-01T00:00:00Z"
        raise BadRequest(f"The field 'expires_at' is in the past ({shown_when}).")
    if when > now + MAX_SECONDS:
        raise BadRequest("The field 'expires_at' is more than a century away.")
    return when


def parse_rate(value: Any) -> str | None:
    if value is None:
        return None
    try:
        return str(parse_rate_limit(value))
    except ValueError as exc:
        raise BadRequest(f"The field 'rate_limit' is invalid: {exc}.") from None


def rate_exceeds(rate: str, bound: str) -> bool:
    """Whether the rate limit ``rate`` admits more requests than ``bound`` in some window
    (``RateLimit.exceeds``)."""
    return parse_rate_limit(rate).exceeds(parse_rate_limit(bound))


def parse_monthly(value: Any, field: str = "monthly_requests") -> int | None:
    """A monthly request cap: a whole number ≥ 0, or null (none of its own)."""
    if value is None:
        return None
    value = whole_number(value)
    if value is None or not 0 <= value <= MAX_MONTHLY:
        raise BadRequest(f"The field '{field}' must be a whole number from 0 to "
                         f"{MAX_MONTHLY}, or null (no limit of its own).")
    return value


def parse_enabled(value: Any) -> bool:
    if not isinstance(value, bool):
        raise BadRequest("The field 'enabled' must be true or false.")
    return value


def parse_meta(value: Any) -> str:
    """A JSON object of at most 4 KiB (compact UTF-8 JSON) nested at most MAX_META_DEPTH
    deep, returned as that JSON text. 4 KiB of '[' nests ~900 deep, which the request's
    reader could take but a deeper call stack could not write back: every listing holding the
    key answered 500."""
    if not isinstance(value, dict):
        raise BadRequest("The field 'meta' must be a JSON object.")
    try:
        return meta_json(value)  # its depth and size (gateway.models, as the CLI checks them)
    except ValueError as exc:
        raise BadRequest(f"The field 'meta' {exc}.") from None


def parse_allowed_ips(value: Any) -> tuple[str, ...] | None:
    """A list of CIDRs (a bare address is a /32 or /128), or null for any address."""
    if value is None:
        return None
    if not isinstance(value, list) or not value:
        raise BadRequest("The field 'allowed_ips' must be a non-empty list of CIDRs such as "
                         "'203.0.113.0/24', or null for any address (to refuse every address, "
                         "disable the key: 'enabled': false).")
    if len(value) > MAX_ALLOWED_IPS:
        raise BadRequest(f"The field 'allowed_ips' holds more than {MAX_ALLOWED_IPS} entries.")
    networks: list[str] = []
    for item in value:
        try:
            net = allowed_network(item)
        except ValueError:
            raise BadRequest(f"The field 'allowed_ips' holds {shown(str(item))!r}, which is not "
                             "an IP address or CIDR like '203.0.113.0/24'.") from None
        if str(net) not in networks:
            networks.append(str(net))
    return tuple(networks)


def parse_limits(value: Any) -> dict[str, Any] | None:
    """PATCH workspace ``limits``: an object of the limits to override (a null value:
    unlimited; a field left out keeps its current override or the plan's), or null to drop
    every override."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise BadRequest("The field 'limits' must be an object with any of monthly_requests, "
                         "max_keys, rate_limit (null values mean unlimited), or null to go "
                         "back to the plan's limits.")
    unknown = [f for f in value if f not in LIMIT_FIELDS]
    if unknown:
        raise BadRequest(f"Unknown field 'limits.{shown(str(unknown[0]))}'; limits takes: "
                         f"{', '.join(LIMIT_FIELDS)}.")
    limits: dict[str, Any] = {}
    if "monthly_requests" in value:
        limits["monthly_requests"] = parse_monthly(value["monthly_requests"],
                                                   "limits.monthly_requests")
    if "max_keys" in value:
        limits["max_keys"] = parse_monthly(value["max_keys"], "limits.max_keys")
    if "rate_limit" in value:
        try:
            limits["rate_limit"] = parse_rate(value["rate_limit"])
        except BadRequest:
            raise BadRequest("The field 'limits.rate_limit' must be a rate like '5/s' or "
                             "'300/m', or null.") from None
    return limits


def query_int(query: Mapping[str, str], name: str, low: int, high: int, *,
              digits: int = 7) -> int | None:
    """An integer query parameter from ``low`` to ``high`` written in at most ``digits``
    digits; None when absent.

    ASCII digits only: ``str.isdigit()`` admits '²' (which ``int()`` refuses) and '٣'."""
    text = query.get(name)
    if text is None:
        return None
    if not re.fullmatch(f"[0-9]{{1,{digits}}}", text) or not low <= int(text) <= high:
        raise BadRequest(f"The query parameter '{name}' must be an integer from {low} to "
                         f"{high}.")
    return int(text)


def parse_days(query: Mapping[str, str]) -> int:
    """``days`` of a daily-usage listing."""
    days = query_int(query, "days", 1, DAILY_MAX, digits=3)
    return DAILY_DEFAULT if days is None else days


def parse_audit_limit(query: Mapping[str, str]) -> int:
    """``limit`` of the audit listing."""
    limit = query_int(query, "limit", 1, AUDIT_MAX, digits=6)
    return AUDIT_DEFAULT if limit is None else limit
