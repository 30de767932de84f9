"""gateway.verify_queue: bounds, fairness across addresses, cancellation (pure asyncio)."""

from __future__ import annotations

import asyncio
import os

import pytest

from gateway.errors import ServiceUnavailable
from gateway.verify_queue import VerifyQueue


async def _hold(queue: VerifyQueue, ip: str, order: list[str], release: asyncio.Event) -> None:
    async with queue.turn(ip):
        order.append(ip)
        await release.wait()


async def test_turns_are_bounded_and_the_rest_wait():
    queue, order, release = VerifyQueue(2, 10, 100), [], asyncio.Event()
    tasks = [asyncio.ensure_future(_hold(queue, "a", order, release)) for _ in range(5)]
    await asyncio.sleep(0.01)
    assert order == ["a", "a"] and queue.busy == 2 and queue.queued == 5
    release.set()
    await asyncio.gather(*tasks)
    assert order == ["a"] * 5 and queue.busy == 0 and queue.queued == 0


async def test_a_full_queue_for_one_address_refuses_it_but_not_others():
    queue, order, release = VerifyQueue(1, 3, 100), [], asyncio.Event()
    tasks = [asyncio.ensure_future(_hold(queue, "a", order, release)) for _ in range(3)]
    await asyncio.sleep(0.01)
    with pytest.raises(ServiceUnavailable) as refused:
        async with queue.turn("a"):
            pass
    assert refused.value.code == "overloaded" and refused.value.headers == {"Retry-After": "1"}
    other = asyncio.ensure_future(_hold(queue, "b", order, release))
    await asyncio.sleep(0.01)
    release.set()
    await asyncio.gather(*tasks, other)
    assert sorted(order) == ["a", "a", "a", "b"]


async def test_the_total_bound_refuses_every_address():
    queue, release = VerifyQueue(1, 10, 4), asyncio.Event()
    tasks = [asyncio.ensure_future(_hold(queue, ip, [], release)) for ip in "abcd"]
    await asyncio.sleep(0.01)
    with pytest.raises(ServiceUnavailable):
        async with queue.turn("e"):
            pass
    release.set()
    await asyncio.gather(*tasks)


async def test_turns_go_round_robin_across_addresses():
    """One address with a long queue does not make another wait behind all of it."""
    queue, order = VerifyQueue(1, 100, 1000), []

    async def quick(ip: str) -> None:
        async with queue.turn(ip):
            order.append(ip)
            await asyncio.sleep(0)
    tasks = [asyncio.ensure_future(quick("flood")) for _ in range(20)]
    await asyncio.sleep(0)
    tasks.append(asyncio.ensure_future(quick("other")))
    await asyncio.gather(*tasks)
    assert order.index("other") < 5, order  # FIFO would make it the 21st


async def test_a_cancelled_waiter_leaves_nothing_behind():
    queue, order, release = VerifyQueue(1, 10, 100), [], asyncio.Event()
    first = asyncio.ensure_future(_hold(queue, "a", order, release))
    waiting = asyncio.ensure_future(_hold(queue, "b", order, release))
    await asyncio.sleep(0.01)
    waiting.cancel()
    await asyncio.gather(waiting, return_exceptions=True)
    assert queue.queued == 1 and not queue._waiters and not queue._ring
    release.set()
    await first
    assert queue.busy == 0 and queue.queued == 0 and order == ["a"]


def test_a_reload_moves_the_queue_bounds_and_the_per_key_limit():
    import dataclasses
    from gateway.auth import Authenticator
    from gateway.config import Config, FailureLimits, KeysConfig, VerifyQueueLimits
    auth = Authenticator(Config(), store=None, requests=None)
    try:
        assert (auth.queue.per_ip, auth.queue.total, auth._per_key_limit) == (256, 4096, None)
        keys = KeysConfig(failures=FailureLimits(per_key=7),
                          verify_queue=VerifyQueueLimits(per_ip=8, total=9))
        auth.reconfigure(dataclasses.replace(Config(), keys=keys))
        assert (auth.queue.per_ip, auth.queue.total, auth._per_key_limit) == (8, 9, 7)
    finally:
        auth.close()


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="CPU affinity is Linux's")
def test_the_argon2_pool_has_a_thread_per_cpu_the_process_may_use_not_per_machine_cpu():
    """A gateway pinned to one CPU (taskset, a cpuset container) gets one argon2 thread: every
    extra thread would take its own share of the event loop's only CPU during a cold burst."""
    import subprocess
    import sys

    one = sorted(os.sched_getaffinity(0))[:1]
    probe = "from gateway.argon2_pool import argon2_threads; print(argon2_threads())"
    pinned = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                            preexec_fn=lambda: os.sched_setaffinity(0, one), check=True)
    free = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          check=True)
    assert pinned.stdout.strip() == "1"
    assert free.stdout.strip() == str(max(1, min(4, len(os.sched_getaffinity(0)))))
