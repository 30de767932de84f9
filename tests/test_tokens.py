"""Token format, checksum and hashing — pure, no sockets."""

from __future__ import annotations

import zlib

import pytest

from gateway.tokens import (ALPHABET, MalformedHash, MalformedToken, SecretHasher, base62,
                            checksum, looks_like_token, make_token, parse_token)

ENVS = ("live", "test")
ID, SECRET = "A" * 12, "b" * 32
VECTOR = "kg_live_" + ID + SECRET + "2q8Plq"


def test_checksum_is_crc32_in_base62_most_significant_first():
    head = "kg_live_" + ID + SECRET
    n = zlib.crc32(head.encode())
    assert n == 2602640826
    digits = []
    while n:
        n, r = divmod(n, 62)
        digits.append(ALPHABET[r])
    assert checksum(head) == "".join(reversed(digits)).rjust(6, "0") == "2q8Plq"


def test_base62_pads_with_zeros():
    assert base62(0, 6) == "000000"
    assert base62(61, 2) == "0z"
    assert base62(62, 2) == "10"


def test_fixed_vector_parses_into_its_parts():
    parsed = parse_token(VECTOR, "kg", ENVS)
    assert (parsed.prefix, parsed.environment, parsed.key_id, parsed.secret) == \
        ("kg", "live", ID, SECRET)


def test_made_tokens_have_the_documented_shape_and_parse_back():
    token, parts = make_token("kg", "test")
    assert token.startswith("kg_test_") and len(token) == len("kg_test_") + 50
    assert parse_token(token, "kg", ENVS) == parts
    assert SECRET not in repr(parts) and parts.secret not in repr(parts)


def test_tokens_are_random():
    assert len({make_token("kg", "live")[0] for _ in range(200)}) == 200


@pytest.mark.parametrize("text", [
    "", "kg", "kg_live_", VECTOR[:-1], VECTOR + "x",
    VECTOR[:-1] + ("r" if VECTOR[-1] != "r" else "s"),          # checksum typo
    VECTOR.replace("AAAA", "AAAB", 1),                          # body typo
    "xx" + VECTOR[2:],                                          # other prefix
    VECTOR.replace("_live_", "_prod_"),                         # unknown env (checksum breaks too)
    "kg-live-" + VECTOR[8:],                                    # wrong separators
    VECTOR.replace("A", "é", 1),                                # non-ASCII
    VECTOR[:20] + "!" + VECTOR[21:],                            # non-base62
    "Bearer " + VECTOR,
    VECTOR * 4,                                                 # over-long
])
def test_malformed_tokens_are_refused_without_the_store(text):
    with pytest.raises(MalformedToken):
        parse_token(text, "kg", ENVS)


def test_environment_not_accepted_here_is_malformed_even_with_a_good_checksum():
    token, _ = make_token("kg", "staging")
    assert looks_like_token(token, "kg")
    with pytest.raises(MalformedToken, match="environment"):
        parse_token(token, "kg", ENVS)


def test_looks_like_token_finds_keys_of_any_environment_only_with_valid_checksum():
    assert looks_like_token(VECTOR, "kg")
    assert not looks_like_token(VECTOR[:-1] + "0", "kg")
    assert not looks_like_token("kg_live_hello", "kg")


def test_argon2id_hash_verifies_only_the_right_secret():
    hasher = SecretHasher(time_cost=1, memory_cost=8, parallelism=1)
    encoded = hasher.hash(SECRET)
    assert encoded.startswith("$argon2id$") and SECRET not in encoded
    assert hasher.verify(encoded, SECRET)
    assert not hasher.verify(encoded, "c" * 32)
    with pytest.raises(MalformedHash):  # a damaged record: no answer about the secret
        hasher.verify("not a hash", SECRET)
    with pytest.raises(MalformedHash):
        hasher.verify(encoded.rsplit("$", 1)[0] + "$", SECRET)
