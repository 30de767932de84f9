"""SPEC's proxy table read as an order ("first failure wins") for requests that fail more than
one row at once: each answer is the earliest row's, exactly. Real listeners, real Redis, the
echo upstream (``gut.upstream``), whose record says what it received."""

from __future__ import annotations

import pytest

from harness import Clock, bearer, gateway_under_test, make_config, tampered

REALM = 'Bearer realm="keygate"'


@pytest.fixture
async def gut(redis_url, upstream, monkeypatch):
    """conftest's gateway, on a clock that only moves when a test moves it (a rate window
    never ends between two requests of a test)."""
    config = make_config(str(upstream.make_url("")))
    async with gateway_under_test(config, redis_url, monkeypatch, clock=Clock()) as g:
        g.upstream = upstream
        yield g


async def answer(g, method: str, path: str, headers) -> tuple[int, str | None, dict]:
    async with g.proxy.request(method, path, headers=headers) as r:
        body = await r.json() if r.content_type == "application/json" else None
        code = body["error"]["code"] if body and "error" in body else None
        if code is not None:
            assert body["error"]["request_id"] == r.headers["X-Request-Id"]
        return r.status, code, dict(r.headers)


def over_the_limit(g) -> dict[str, str]:
    """A request head declaring a body over ``server.max_body_bytes`` (never sent: keygate
    answers before it reads a body)."""
    return {"Content-Length": str(g.gw.config.server.max_body_bytes + 1)}


# --- rate limit and quotas come before body_too_large -------------------------------------------

@pytest.mark.parametrize("plan,code", [("tiny", "quota_exceeded"), ("limited", "rate_limited")])
async def test_an_over_long_body_from_a_key_out_of_its_limits_is_the_429_not_413(gut, plan,
                                                                                 code):
    """The table puts rate_limited and quota_exceeded above body_too_large: a key whose month
    or rate is used up gets the 429 (and its Retry-After, its RateLimit fields) for an
    over-long body as for any other request; a 413 would tell it to send a smaller body,
    which would then be refused all the same."""
    await gut.workspace("w", plan=plan)       # tiny: 3 a month; limited: 3/s
    token, _ = await gut.key("w", scopes=["people:read", "people:write"])
    for _ in range(3):
        status, _, _ = await answer(gut, "GET", "/people/1", bearer(token))
        assert status == 200
    forwarded = len(gut.upstream.requests)
    status, got, headers = await answer(gut, "POST", "/people/1",
                                        {**bearer(token), **over_the_limit(gut)})
    assert (status, got) == (429, code)
    assert int(headers["Retry-After"]) >= 1
    assert "RateLimit-Policy" in headers and "RateLimit" in headers
    assert len(gut.upstream.requests) == forwarded
    assert await gut.used("w") == 3


async def test_an_over_long_body_within_the_limits_is_413_and_uses_no_rate(gut):
    """Judging the limits for an over-long body must not spend them: two 413s, then the
    key's whole rate (3/s) is still there."""
    await gut.workspace("w", plan="limited")
    token, _ = await gut.key("w", scopes=["people:read", "people:write"])
    for _ in range(2):
        status, got, _ = await answer(gut, "POST", "/people/1",
                                      {**bearer(token), **over_the_limit(gut)})
        assert (status, got) == (413, "body_too_large")
    assert [(await answer(gut, "GET", "/people/1", bearer(token)))[0]
            for _ in range(4)] == [200, 200, 200, 429]
    assert await gut.used("w") == 3


# --- malformed_key comes before ambiguous_key ---------------------------------------------------

@pytest.mark.parametrize("sent", [
    lambda t: [("Authorization", f"Bearer {tampered(t)}"), ("X-Api-Key", t)],
    lambda t: [("Authorization", f"Bearer {t}"), ("X-Api-Key", "kg_live_garbage")],
    lambda t: [("X-Api-Key", t), ("X-Api-Key", tampered(t))],
    lambda t: [("Authorization", f"Bearer {t}"), ("Authorization", "Bearer nonsense")],
], ids=["typo-in-authorization", "garbage-in-x-api-key", "repeated-with-a-typo",
        "repeated-authorization-with-garbage"])
async def test_a_malformed_token_beside_a_good_one_is_malformed_key_not_ambiguous(gut, sent):
    """The table's malformed_key row (a token that fails format or checksum) is above
    ambiguous_key: a request carrying a malformed token is malformed, whatever else it
    carries, with malformed_key's RFC 6750 challenge; it never reaches the upstream."""
    await gut.workspace("w")
    token, _ = await gut.key("w")
    status, got, headers = await answer(gut, "GET", "/people/1", sent(token))
    assert (status, got) == (401, "malformed_key")
    assert headers["WWW-Authenticate"] == REALM + ', error="invalid_token"'
    assert gut.upstream.requests == []


async def test_two_well_formed_tokens_that_differ_are_still_ambiguous(gut):
    await gut.workspace("w")
    a, _ = await gut.key("w", name="a")
    b, _ = await gut.key("w", name="b")
    for sent in ([("Authorization", f"Bearer {a}"), ("X-Api-Key", b)],
                 [("X-Api-Key", a), ("X-Api-Key", a)]):
        status, got, headers = await answer(gut, "GET", "/people/1", sent)
        assert (status, got) == (400, "ambiguous_key")
        assert headers["WWW-Authenticate"] == REALM + ', error="invalid_request"'


@pytest.mark.parametrize("headers", [{"X-Api-Key": ""}, {"X-Api-Key": "   "}])
async def test_an_empty_key_header_is_no_key_sent(gut, headers):
    """A client whose key variable is unset sends the header empty: that is no credential
    (401 missing_key, the realm without an error attribute), not a malformed one."""
    status, code, got = await answer(gut, "GET", "/people/1", headers)
    assert (status, code) == (401, "missing_key")
    assert got["WWW-Authenticate"] == REALM


async def test_an_empty_key_header_beside_a_bearer_token_is_not_a_second_credential(gut):
    await gut.workspace("w")
    token, _ = await gut.key("w", scopes=["people:read"])
    status, code, _ = await answer(gut, "GET", "/people/1", {**bearer(token), "X-Api-Key": ""})
    assert (status, code) == (200, None)
    assert all(k.lower() != "x-api-key" for k, _ in gut.upstream.requests[-1]["headers"])
