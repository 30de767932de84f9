"""Closing the store clients never hangs: each step of a shutdown is bounded, and what could
not be closed in time is logged and left. Real redis-server processes (a Sentinel group),
loopback only, every process stopped at the end."""

from __future__ import annotations

import asyncio
import time

from redis.asyncio.connection import AbstractConnection

from test_redis_topologies import sentinel_group  # noqa: F401 - the fixture


def _close_as_the_sentinel_query_is_written(monkeypatch, sentinel_port: int, close) -> list:
    """Start ``close()`` (as a task) from the step in which the next SENTINEL MASTERS query -
    the master check ``_SentinelMaster`` makes every ``MASTER_CHECK_INTERVAL`` - has been
    written to the Sentinel's socket, before the task that sent it resumes. Returns a list
    that receives the close task.

    That is when the close cancels the check: redis-py writes a command under
    ``asyncio.wait_for`` (its socket timeout), and on Python < 3.12 ``wait_for`` swallows a
    cancellation that arrives once the write it waits for is done (it returns the write's
    result instead). The cancelled check then went on: its loop asks again every 0.5 s, and
    the close waited for it to end, forever."""
    closing: list[asyncio.Task] = []
    write = AbstractConnection._send_packed_command

    async def written_then_closed(conn, command) -> None:
        await write(conn, command)
        sent = b"".join(bytes(c) for c in command).upper()
        if not closing and int(conn.port) == sentinel_port and b"MASTERS" in sent:
            closing.append(asyncio.ensure_future(close()))

    monkeypatch.setattr(AbstractConnection, "_send_packed_command", written_then_closed)
    return closing


async def _started(closing: list, within: float = 5.0) -> asyncio.Task:
    deadline = time.monotonic() + within
    while not closing:
        assert time.monotonic() < deadline, "the master check never asked the Sentinel"
        await asyncio.sleep(0.01)
    return closing[0]


async def _closes_in_time(closing: list, watch: asyncio.Task, caplog, which: str,
                          wait: float) -> None:
    """The close started as the check's question was written ends within 2 s (waited for up to
    ``wait``), stops the master check, and logs nothing about a step left unfinished."""
    try:
        close = await _started(closing)
        started = time.monotonic()
        done, _ = await asyncio.wait({close}, timeout=wait)
        assert close in done, f"{which} close did not end"
        close.result()
        assert time.monotonic() - started < 2
        assert watch.done(), "the master check went on after the close"
        assert not [r for r in caplog.records if "shutdown:" in r.getMessage()]
    finally:
        watch.cancel()
        for task in closing:
            await asyncio.wait({task}, timeout=5)


async def test_the_request_store_closes_while_its_master_check_is_asking_the_sentinel(
        sentinel_group, monkeypatch, caplog) -> None:  # noqa: F811
    """The per-request store's Sentinel client is closed at the instant its background master
    check has just written its question to the Sentinel (a gateway stopping at any moment hits
    that instant now and then: one test run in ~100 hung in its teardown). The close ends
    within its bound, and the check stops too."""
    from gateway.store.request import RequestStore
    store = RequestStore(sentinel_group["url"], timeout=2.0)
    client = store._resp
    await store.key_workspace("k-none")  # connected: the master check runs from now on
    watch = client.redis._watch
    while client._measuring is not None:  # the first clock reading (a TIME) is done
        await asyncio.sleep(0.01)
    closing = _close_as_the_sentinel_query_is_written(
        monkeypatch, sentinel_group["sentinel"], store.close)
    await _closes_in_time(closing, watch, caplog, "the request store's", wait=8)


async def test_the_admin_store_closes_while_its_master_check_is_asking_the_sentinel(
        sentinel_group, monkeypatch, caplog) -> None:  # noqa: F811
    """As for the per-request store, with the admin store's Sentinel client (the one that
    confirms its writes on the master)."""
    from gateway.store import Store
    from harness import make_config
    store = await Store.connect(sentinel_group["url"], make_config("http://127.0.0.1:9"))
    assert await store.ping()  # connected: the master check runs from now on
    watch = store.redis._watch
    closing = _close_as_the_sentinel_query_is_written(
        monkeypatch, sentinel_group["sentinel"], store.close)
    await _closes_in_time(closing, watch, caplog, "the admin store's", wait=12)


async def test_a_store_close_that_does_not_end_is_logged_and_the_stop_goes_on(
        redis_url, upstream, monkeypatch, caplog) -> None:
    """A gateway's stop waits a bounded time for each store client to close: one that does
    not end (whatever the cause) is logged, left, and the next is closed all the same."""
    from gateway import app
    from gateway.store import Store
    from harness import gateway_under_test, make_config
    monkeypatch.setattr(app, "STORE_CLOSE_TIMEOUT", 0.5)
    never = asyncio.get_running_loop().create_future()

    async def hangs(self) -> None:
        await never

    closed = []
    close_admin = Store.close

    async def admin_closed(self) -> None:
        await close_admin(self)
        closed.append(self)

    config = make_config(str(upstream.make_url("")))
    started = None
    async with gateway_under_test(config, redis_url, monkeypatch) as gut:
        await gut.workspace("acme")
        monkeypatch.setattr(type(gut.gw.requests), "close", hangs)
        monkeypatch.setattr(Store, "close", admin_closed)
        started = time.monotonic()
    assert time.monotonic() - started < 3
    assert closed == [gut.gw.store]
    assert [r.getMessage() for r in caplog.records if "shutdown:" in r.getMessage()] == \
        ["shutdown: closing the per-request store did not end within 0.5 s; left unfinished"]
    assert never.cancelled()  # the close left behind was cancelled, not left waiting


async def test_stop_cancels_again_a_task_that_went_on_after_a_cancellation(caplog) -> None:
    """``gateway.closing.stop`` on a task that goes on after its first cancellation (what a
    swallowed one looks like): cancelled again, it ends; one that never ends is logged and
    left after the bound."""
    from gateway.closing import stop
    rounds = []

    async def goes_on_once() -> None:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            rounds.append("swallowed")
        await asyncio.sleep(10)

    task = asyncio.ensure_future(goes_on_once())
    await asyncio.sleep(0)
    assert await stop(task, 1.0, "a task") and task.cancelled() and rounds == ["swallowed"]

    stubborn = [True]

    async def never_ends() -> None:
        while stubborn[0]:
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                pass

    task = asyncio.ensure_future(never_ends())
    await asyncio.sleep(0)
    started = time.monotonic()
    assert not await stop(task, 0.3, "a stubborn task")
    assert 0.3 <= time.monotonic() - started < 1 and not task.done()
    assert [r.getMessage() for r in caplog.records] == \
        ["shutdown: a stubborn task did not stop within 0.3 s; left running"]
    stubborn[0] = False  # the test ends it
    task.cancel()
    await asyncio.wait({task}, timeout=1)
    assert task.done()
