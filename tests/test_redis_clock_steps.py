"""Redis's own clock stepped while keygate serves (an NTP step on Redis's host, or a failover
to a master whose clock is behind): the counting calls' deadlines must never come late.

Redis's clock is stepped here for real: the redis-server child runs with a small
LD_PRELOAD shim (compiled with the system's cc) that adds the microseconds written in a file
to CLOCK_REALTIME, gettimeofday and time, as an NTP step on Redis's host would (or a failover
to a master whose clock is behind). Nothing of keygate is patched.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import redis

from gateway.config import StoreConfig
from harness import eventually, gateway_under_test, make_config
from conftest import RedisServer, redis_server_binary

_SHIM = r"""
#define _GNU_SOURCE
#include <time.h>
#include <sys/time.h>
#include <fcntl.h>
#include <unistd.h>
#include <stdlib.h>
#include <sys/syscall.h>
static long long shift_us(void) {
  const char *p = getenv("CLOCK_SHIFT_FILE");
  if (!p) return 0;
  int fd = open(p, O_RDONLY); if (fd < 0) return 0;
  char buf[32]; ssize_t n = read(fd, buf, sizeof buf - 1); close(fd);
  if (n <= 0) return 0; buf[n] = 0; return atoll(buf);
}
int clock_gettime(clockid_t id, struct timespec *ts) {
  int r = syscall(SYS_clock_gettime, id, ts);
  if (r == 0 && (id == CLOCK_REALTIME || id == CLOCK_REALTIME_COARSE)) {
    long long ns = (long long)ts->tv_sec * 1000000000LL + ts->tv_nsec + shift_us() * 1000LL;
    ts->tv_sec = ns / 1000000000LL; ts->tv_nsec = ns % 1000000000LL;
  }
  return r;
}
int gettimeofday(struct timeval *tv, void *tz) {
  struct timespec ts; int r = clock_gettime(CLOCK_REALTIME, &ts);
  if (r == 0 && tv) { tv->tv_sec = ts.tv_sec; tv->tv_usec = ts.tv_nsec / 1000; }
  return r;
}
time_t time(time_t *t) {
  struct timespec ts; clock_gettime(CLOCK_REALTIME, &ts);
  if (t) *t = ts.tv_sec; return ts.tv_sec;
}
"""


class SteppedRedis(RedisServer):
    """A redis-server whose wall clock (TIME, the scripts' TIME) can be stepped."""

    def __init__(self, data_dir: str) -> None:
        super().__init__(data_dir)
        self.shift_file = Path(data_dir) / "clock-shift-us"
        self.shift_file.write_text("0")
        self.shim = Path(data_dir) / "shift.so"
        source = Path(data_dir) / "shift.c"
        source.write_text(_SHIM)
        subprocess.run([shutil.which("cc") or "gcc", "-shared", "-fPIC", "-O2", "-o",
                        str(self.shim), str(source)], check=True)

    def step(self, seconds: float) -> None:
        """Redis's clock jumps by ``seconds`` (negative: back), from now on."""
        now = int(self.shift_file.read_text())
        self.shift_file.write_text(str(now + int(seconds * 1e6)))

    def start(self) -> "SteppedRedis":
        env = dict(os.environ, LD_PRELOAD=str(self.shim), CLOCK_SHIFT_FILE=str(self.shift_file))
        self.proc = subprocess.Popen(
            [redis_server_binary(), "--port", str(self.port), "--bind", "127.0.0.1",
             "--save", "", "--appendonly", "no", "--dir", self.data_dir],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with redis.Redis(port=self.port, socket_timeout=0.5) as probe:
                    probe.ping()
                return self
            except redis.ConnectionError:
                time.sleep(0.05)
        raise RuntimeError("test redis-server did not start")


@pytest.fixture
def stepped_redis(tmp_path):
    if shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("no C compiler for the clock shim")
    server = SteppedRedis(str(tmp_path)).start()
    yield server
    server.stop()


def _offset_bounds(url: str) -> tuple[float, float]:
    """Where Redis's clock minus our monotonic clock truly lies, now (a tight reading)."""
    with redis.Redis.from_url(url) as r:
        sent = time.monotonic()
        seconds, micros = r.time()
        arrived = time.monotonic()
    return seconds + micros / 1e6 - arrived, seconds + micros / 1e6 - sent


async def _read_clock_while_redis_is_slow(resp, server, pause: float) -> None:
    """``resp`` reads Redis's clock (its watchdog's minute reading, or the TIME of a
    connection made again) while Redis is slow to answer for ``pause`` s: a fork for a save,
    a slow command, the minutes after a failover."""
    readings, read = [], resp._clock_read

    def counted(*args):
        read(*args)
        readings.append(resp.clock_offset)
    resp._clock_read = counted
    try:
        os.kill(server.proc.pid, signal.SIGSTOP)
        try:
            resp.measure_clock()
            await asyncio.sleep(pause)
        finally:
            os.kill(server.proc.pid, signal.SIGCONT)
        assert await eventually(lambda: readings)
    finally:
        del resp._clock_read


async def test_a_reading_after_redis_clock_stepped_back_corrects_the_offset(
        stepped_redis):
    """Redis's clock steps back 0.3 s (an NTP step on its host; or a failover to a master
    whose clock is 0.3 s behind). The offset read before is now 0.3 s too large: every
    deadline 0.3 s late. The next reading corrects it even if Redis is slow to answer it
    (paused 0.4 s): its bounds are [redis - arrived, redis - sent] = [true, true + 0.4], the
    stale offset inside them. Keeping an offset known already within a reading's bounds
    (once tried, against readings stretched by a stall of the loop) kept it 0.3 s too large
    until the next reading a minute later. The lower bound is taken: the offset never
    exceeds the true one."""
    from gateway.store.resp import RespClient
    from gateway.store.resp import CLOCK_READ_AGAIN_AFTER
    client = RespClient(stepped_redis.url, timeout=1)  # its watchdog looks every 0.25 s
    try:
        await client.call("PING")
        assert await eventually(lambda: client.clock_offset is not None)
        stepped_redis.step(-0.3)
        # 0.4 s: under CLOCK_READING_MAX_RTT (0.5), so not "loose": no reading again 1 s
        # later, the next is a minute away
        await _read_clock_while_redis_is_slow(client, stepped_redis, 0.4)
        await asyncio.sleep(CLOCK_READ_AGAIN_AFTER + 0.5)
        low, high = _offset_bounds(stepped_redis.url)
        assert client.clock_offset <= high + 0.005, \
            f"offset {client.clock_offset - high:.3f} s too large: every deadline that late"
    finally:
        await client.close()


async def test_after_redis_clock_stepped_back_a_call_run_after_its_503_counts_nothing(
        upstream, stepped_redis, monkeypatch):
    """The same, end to end. Store timeout 0.6 s: the deadline is 0.48 s after the call.
    Redis's clock stepped back 0.3 s and the reading after it came while Redis was slow: an
    offset kept 0.3 s too large put the script's deadline 0.78 s after the call, past the
    moment (0.6 s) the gateway gives up. A call Redis runs 0.7 s late is answered 503 and
    must count nothing (a request answered 503 is not counted, or is taken back); told it
    is in time, the script counted it, and only the retired connection's late "ok" had the
    ledger take the count back a moment later: a guard lost whenever the late reply is (the
    retired connection aborted under a burst of timeouts, aged out, reset, or a shutdown),
    and meanwhile the extra count stands (a key at its quota refused 429). The script
    itself must answer "late", counting nothing."""
    config = make_config(str(upstream.make_url("")), store=StoreConfig(timeout=0.6))
    async with gateway_under_test(config, stepped_redis.url, monkeypatch) as g:
        await g.workspace(plan="unlimited")
        token, _ = await g.key()
        async with g.proxy.get("/people", headers={"Authorization": f"Bearer {token}"}) as r:
            assert r.status == 200
        resp = g.gw.requests._resp
        assert await eventually(lambda: resp.clock_offset is not None)
        stepped_redis.step(-0.3)
        await _read_clock_while_redis_is_slow(resp, stepped_redis, 0.4)
        await asyncio.sleep(1.5)  # past CLOCK_READ_AGAIN_AFTER: no reading corrects it
        # what the script answers: the lean client's late replies (TimedOut.late)
        lates: list = []
        import gateway.store.request as request_mod
        counted = request_mod._counted

        def spy(late):
            late.add_done_callback(lambda f: lates.append(
                None if f.cancelled() or f.exception() else f.result()))
            return counted(late)
        monkeypatch.setattr(request_mod, "_counted", spy)
        os.kill(stepped_redis.proc.pid, signal.SIGSTOP)
        try:
            answered = asyncio.ensure_future(
                g.proxy.get("/people", headers={"Authorization": f"Bearer {token}"}))
            await asyncio.sleep(0.7)
        finally:
            os.kill(stepped_redis.proc.pid, signal.SIGCONT)
        async with await answered as r:
            assert r.status == 503
        assert await eventually(lambda: lates)
        reply = lates[0]
        assert reply is not None and reply[0] == b"late", \
            f"the script ran after the 503 and counted the request: {reply!r}"
