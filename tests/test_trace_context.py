"""W3C Trace Context through the gateway: continued when valid, replaced otherwise, logged."""

from __future__ import annotations

import json
import re

import pytest

from gateway.tracing import parse_traceparent
from tests.harness import gateway_under_test, make_config

TRACEPARENT = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"


def received(upstream, name: str) -> list[str]:
    return [v for k, v in upstream.requests[-1]["headers"] if k.lower() == name]


async def forward(upstream, redis_url, monkeypatch, headers, path="/health"):
    config = make_config(str(upstream.make_url("")))
    async with gateway_under_test(config, redis_url, monkeypatch) as gw:
        async with gw.proxy.get(path, headers=headers) as r:
            assert r.status == 200
    [value] = received(upstream, "traceparent")
    m = TRACEPARENT.fullmatch(value)
    assert m, value
    return m.groups()


@pytest.mark.parametrize("flags", ["01", "00"])
async def test_a_valid_traceparent_is_continued_with_keygates_own_span(
        upstream, redis_url, monkeypatch, flags):
    trace_id, span_id, sent_flags = await forward(
        upstream, redis_url, monkeypatch,
        [("traceparent", f"00-{TRACE_ID}-{PARENT}-{flags}"),
         ("tracestate", "congo=t61rcWkgMzE,rojo=00f067aa0ba902b7"), ("tracestate", "b=2")])
    assert trace_id == TRACE_ID
    assert span_id != PARENT and span_id != "0" * 16
    assert sent_flags == flags
    assert received(upstream, "tracestate") == ["congo=t61rcWkgMzE,rojo=00f067aa0ba902b7", "b=2"]


async def test_a_later_version_is_continued_as_version_00(upstream, redis_url, monkeypatch):
    trace_id, _, flags = await forward(upstream, redis_url, monkeypatch, {
        "traceparent": f"cc-{TRACE_ID}-{PARENT}-09-whatever-comes-next"})
    assert (trace_id, flags) == (TRACE_ID, "01")  # only the flags W3C defines are kept


@pytest.mark.parametrize("bad", [
    None, "", "garbage", f"00-{TRACE_ID}-{PARENT}", f"00-{TRACE_ID.upper()}-{PARENT}-01",
    f"00-{'0' * 32}-{PARENT}-01", f"00-{TRACE_ID}-{'0' * 16}-01", f"ff-{TRACE_ID}-{PARENT}-01",
    f"00-{TRACE_ID}-{PARENT}-01-extra", f"00-{TRACE_ID}-{PARENT}-0g", f"00-{TRACE_ID}-{PARENT.upper()}-01",
    f"00_{TRACE_ID}_{PARENT}_01", f"00-{TRACE_ID[:-1]}x-{PARENT}-01",
    "00-kg_live_aaaaaaaaaaaaaaaaaaaaaaaa-aaaaaaaaaaaaaaaa-01",
])
async def test_a_missing_or_malformed_traceparent_is_replaced(upstream, redis_url, monkeypatch,
                                                             bad):
    headers = {"tracestate": "congo=t61rcWkgMzE"}
    if bad is not None:
        headers["traceparent"] = bad
    trace_id, span_id, flags = await forward(upstream, redis_url, monkeypatch, headers)
    assert trace_id != TRACE_ID and trace_id != "0" * 32 and span_id != "0" * 16
    assert received(upstream, "tracestate") == []  # it belonged to a trace not continued
    assert flags == "01"


async def test_a_repeated_traceparent_is_replaced(upstream, redis_url, monkeypatch):
    trace_id, _, _ = await forward(upstream, redis_url, monkeypatch, [
        ("traceparent", f"00-{TRACE_ID}-{PARENT}-01"),
        ("traceparent", f"00-{'1' * 32}-{PARENT}-01")])
    assert trace_id not in (TRACE_ID, "1" * 32)


async def test_each_request_gets_its_own_trace_and_span(upstream, redis_url, monkeypatch):
    config = make_config(str(upstream.make_url("")))
    async with gateway_under_test(config, redis_url, monkeypatch) as gw:
        for _ in range(20):
            async with gw.proxy.get("/health", headers={
                    "traceparent": f"00-{TRACE_ID}-{PARENT}-01"}) as r:
                assert r.status == 200
            async with gw.proxy.get("/health") as r:
                assert r.status == 200
    parents = [v for rec in upstream.requests for k, v in rec["headers"] if k == "traceparent"]
    assert len(parents) == 40 and len(set(parents)) == 40
    assert len({p.split("-")[1] for p in parents[1::2]}) == 20


async def test_access_log_carries_the_trace_id_also_for_refused_requests(
        upstream, redis_url, monkeypatch, capfd):
    config = make_config(str(upstream.make_url("")))
    async with gateway_under_test(config, redis_url, monkeypatch) as gw:
        await gw.workspace("acme")
        token, _ = await gw.key("acme")
        gw.logs(capfd)
        async with gw.proxy.get("/people/1", headers={
                "Authorization": f"Bearer {token}",
                "traceparent": f"00-{TRACE_ID}-{PARENT}-01"}) as r:
            assert r.status == 200
        async with gw.proxy.get("/people/1") as r:  # 401, never forwarded
            assert r.status == 401
        _, err = gw.logs(capfd)
    lines = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    assert len(lines) == 2, err
    assert lines[0]["trace_id"] == TRACE_ID
    assert re.fullmatch(r"[0-9a-f]{32}", lines[1]["trace_id"])
    assert lines[1]["trace_id"] != TRACE_ID


async def test_text_access_log_ends_with_the_trace_id(upstream, redis_url, monkeypatch, capfd):
    import dataclasses
    config = make_config(str(upstream.make_url("")))
    config = dataclasses.replace(config, server=dataclasses.replace(config.server,
                                                                    access_log="text"))
    async with gateway_under_test(config, redis_url, monkeypatch) as gw:
        gw.logs(capfd)
        async with gw.proxy.get("/health", headers={
                "traceparent": f"00-{TRACE_ID}-{PARENT}-01"}) as r:
            assert r.status == 200
        _, err = gw.logs(capfd)
    [line] = [line for line in err.splitlines() if " GET /health " in line]
    assert line.endswith(f" trace={TRACE_ID}")


def test_parse_traceparent():
    assert parse_traceparent(f"00-{TRACE_ID}-{PARENT}-01") == (TRACE_ID, PARENT, "01")
    assert parse_traceparent(f"00-{TRACE_ID}-{PARENT}-ff") == (TRACE_ID, PARENT, "03")
    assert parse_traceparent(f"01-{TRACE_ID}-{PARENT}-00-x") == (TRACE_ID, PARENT, "00")
    assert parse_traceparent(f"01-{TRACE_ID}-{PARENT}-00x") is None


HEX = "0123456789abcdef"


def reference_parse(value: str):
    """W3C Trace Context §3.2, written out field by field."""
    fields = value.split("-")
    if len(fields) < 4:
        return None
    version, trace_id, parent_id, flags = fields[:4]
    ok = (len(version) == 2 and all(c in HEX for c in version) and version != "ff"
          and len(trace_id) == 32 and all(c in HEX for c in trace_id) and set(trace_id) != {"0"}
          and len(parent_id) == 16 and all(c in HEX for c in parent_id)
          and set(parent_id) != {"0"} and len(flags) == 2 and all(c in HEX for c in flags))
    if not ok or (version == "00" and len(fields) != 4):
        return None
    return trace_id, parent_id, "%02x" % (int(flags, 16) & 3)


from hypothesis import given, strategies as st  # noqa: E402


@given(st.one_of(
    st.tuples(st.sampled_from(["00", "01", "cc", "ff", "0", "0g"]),
              st.text(alphabet=HEX, min_size=31, max_size=33) | st.just("0" * 32),
              st.text(alphabet=HEX, min_size=15, max_size=17) | st.just("0" * 16),
              st.sampled_from(["00", "01", "02", "03", "ff", "0", "1g"]),
              st.sampled_from(["", "-x", "-", "x"])).map(lambda t: "-".join(t[:4]) + t[4]),
    st.text(max_size=80)))
def test_parse_traceparent_agrees_with_the_spec_reading(value):
    assert parse_traceparent(value) == reference_parse(value)
