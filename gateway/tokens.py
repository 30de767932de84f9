"""Token format, checksum and secret hashing. Pure: no I/O.

A token is ``<prefix>_<env>_<body>``; the body is 50 base62 characters: a 12-char key id,
a 32-char secret and a 6-char checksum, ``zlib.crc32`` of everything before it in base62
(``0-9A-Za-z``, most significant digit first, left-padded with ``0``).

The checksum lets the gateway refuse typos and garbage without touching the store, and lets
secret scanners find leaked keys with few false positives. The secret has 32*log2(62) ≈ 190
bits of entropy; only its argon2id hash is ever stored.
"""

from __future__ import annotations

import re
import secrets
import zlib
from dataclasses import dataclass

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
ID_LEN, SECRET_LEN, CHECKSUM_LEN = 12, 32, 6
BODY_LEN = ID_LEN + SECRET_LEN + CHECKSUM_LEN

_BODY_RE = re.compile(r"[0-9A-Za-z]{%d}" % BODY_LEN)
KEY_ID_RE = re.compile(r"[0-9A-Za-z]{%d}" % ID_LEN)


def base62(n: int, width: int) -> str:
    digits = []
    while n:
        n, r = divmod(n, 62)
        digits.append(ALPHABET[r])
    return "".join(reversed(digits)).rjust(width, "0")


def checksum(head: str) -> str:
    """Checksum of the token text before it (``kg_live_`` + id + secret)."""
    return base62(zlib.crc32(head.encode("ascii")), CHECKSUM_LEN)


def random_base62(n: int) -> str:
    return "".join(secrets.choice(ALPHABET) for _ in range(n))


@dataclass(frozen=True)
class ParsedToken:
    prefix: str
    environment: str
    key_id: str
    secret: str

    def __repr__(self) -> str:  # never print the secret by accident
        return f"ParsedToken({self.prefix}_{self.environment}_{self.key_id}…)"


def make_token(prefix: str, environment: str, key_id: str | None = None) -> tuple[str, ParsedToken]:
    """A fresh token and its parts. ``key_id`` is random unless given."""
    key_id = key_id or random_base62(ID_LEN)
    secret = random_base62(SECRET_LEN)
    head = f"{prefix}_{environment}_{key_id}{secret}"
    return head + checksum(head), ParsedToken(prefix, environment, key_id, secret)


class MalformedToken(ValueError):
    """The text is not a well-formed token of this gateway (shape, checksum or environment)."""


def parse_token(text: str, prefix: str, environments: tuple[str, ...] | frozenset[str]) -> ParsedToken:
    """Validate shape, prefix, environment and checksum; raise MalformedToken otherwise."""
    if len(text) > 200 or not text.isascii():
        raise MalformedToken("not a keygate token")
    pfx, sep, rest = text.partition("_")
    env, sep2, body = rest.partition("_")
    if not (sep and sep2) or pfx != prefix or not _BODY_RE.fullmatch(body):
        raise MalformedToken("not a keygate token")
    head = text[:-CHECKSUM_LEN]
    if not secrets.compare_digest(checksum(head), body[-CHECKSUM_LEN:]):
        raise MalformedToken("the key's checksum does not match; it was mistyped or truncated")
    if env not in environments:
        raise MalformedToken(f"keys of environment '{env}' are not accepted here")
    return ParsedToken(pfx, env, body[:ID_LEN], body[ID_LEN:ID_LEN + SECRET_LEN])


def alternation(prefix: str | tuple[str, ...]) -> str:
    """A regex of ``prefix``, or of any of several prefixes (one alternation)."""
    if isinstance(prefix, str):
        return re.escape(prefix)
    return "(?:%s)" % "|".join(map(re.escape, prefix))


def marked(text: str, prefix: str | tuple[str, ...]) -> bool:
    """Whether ``text`` holds ``<prefix>_`` of the prefix or of any of several: what every
    key begins with, so text without it (nor an escape to decode) holds none."""
    if isinstance(prefix, str):
        return prefix + "_" in text
    return any(p + "_" in text for p in prefix)


def looks_like_token(text: str, prefix: str | tuple[str, ...]) -> bool:
    """True when ``text`` is shaped like a token of ``prefix`` (or of one of several) with a
    valid checksum, any env.

    Used to refuse and mask keys sent in URLs: a leaked key is a leaked key whatever its env.
    """
    pfx, sep, rest = text.partition("_")
    env, sep2, body = rest.partition("_")
    if not (sep and sep2) or (pfx != prefix if isinstance(prefix, str) else
                              pfx not in prefix) or not env or not _BODY_RE.fullmatch(body):
        return False
    return secrets.compare_digest(checksum(text[:-CHECKSUM_LEN]), body[-CHECKSUM_LEN:])


_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
_ALNUM_RUN = re.compile(r"[A-Za-z0-9]{32,}")
_HEX_RUN = re.compile(r"[0-9a-fA-F]+")


def adoptable_request_id(value: str | None, secret: str = "") -> bool:
    """Whether a client's ``X-Request-Id`` may be adopted (echoed, logged, forwarded).

    At most 128 of ``A-Za-z0-9._:-``, and nothing that can hold a key: no run of 32 or more
    letters and digits unless it is hex (a key's secret is 32 base62 characters, and its key id
    is public; UUIDs, trace ids and hashes are hex). A token itself never passes (``_``). Nor
    does one holding ``secret`` (the operator token: ``token_urlsafe(32)`` without a ``_``
    passes the shape, its runs between ``-`` short)."""
    if value is None or not _REQUEST_ID.fullmatch(value):
        return False
    if secret and secret in value:
        return False
    return all(_HEX_RUN.fullmatch(run) for run in _ALNUM_RUN.findall(value))


class SecretHasher:
    """argon2id over the secret only. ``verify`` is CPU-heavy: call it off the event loop."""

    def __init__(self, time_cost: int = 2, memory_cost: int = 19456, parallelism: int = 1) -> None:
        self._ph = PasswordHasher(time_cost=time_cost, memory_cost=memory_cost,
                                  parallelism=parallelism)

    def hash(self, secret: str) -> str:
        return self._ph.hash(secret)

    def verify(self, encoded_hash: str, secret: str) -> bool:
        """True for the right secret, False for a wrong one (argon2's mismatch: nothing else
        is). ``Argon2CouldNotRun``: the run itself failed (its ``memory_cost`` or a thread
        could not be had): no answer about the secret. ``MalformedHash``: the stored hash
        cannot be read (or names parameters argon2 refuses)."""
        try:
            return self._ph.verify(encoded_hash, secret)
        except VerifyMismatchError:
            return False
        except InvalidHashError as exc:
            raise MalformedHash(str(exc) or "not an argon2 hash") from exc
        except VerificationError as exc:
            if str(exc) in _COULD_NOT_RUN:
                raise Argon2CouldNotRun(str(exc)) from exc
            raise MalformedHash(str(exc)) from exc


# libargon2's messages (argon2.low_level.error_to_str) for a run that could not be made,
# whatever the hash: ARGON2_MEMORY_ALLOCATION_ERROR and ARGON2_THREAD_FAIL. Every other
# error but the mismatch is about the hash's encoding or the parameters it names.
_COULD_NOT_RUN = frozenset({"Memory allocation error", "Threading failure"})


class Argon2CouldNotRun(RuntimeError):
    """argon2 could not run (memory or a thread could not be had): a failure of the server,
    not of the secret."""


class MalformedHash(ValueError):
    """A stored hash argon2 cannot read."""
