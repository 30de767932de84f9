"""Where argon2 runs: a bounded thread pool that only takes CPU the event loop gives it.

One argon2id run is ~20 ms of CPU at the shipped cost. Its threads run in Linux's idle
scheduling class (``SCHED_IDLE``): they get a CPU only when nothing else wants it, and a
waking event loop takes its CPU back from them at once. Measured (``bench/burst.py``, keygate
pinned to one saturated core): argon2 threads at a nice value 10 above the loop got ~10% of
the core as whole scheduler ticks, 4 ms during which the loop could not run, and a cached
key's p99 went from 2.5 to ~6 ms during bursts of new keys.

An idle-class thread alone would starve first requests whenever the loop keeps its core busy.
So while a run is in progress, the loop checks every ``DONATE_EVERY`` seconds how much CPU the
pool's threads got since the last check; when it is less than ``SHARE`` of that time, the loop
sleeps ``DONATE_SLICE`` seconds, handing its core over. argon2 then gets at least ~10% of the
loop's core however busy it is, in slices of 0.5 ms, the only pauses cached requests see.
On a machine with a free core argon2 runs there at full speed and the loop never sleeps.

A lent slice can go to another process instead: one busy at normal priority on the same CPU
outweighs the idle class 1024 to 3, and argon2 would never run. When ``WASTED_SLICES`` lent
slices in a row gave argon2 (almost) nothing, the pool's threads leave the idle class for a
nice value ``ARGON2_NICE`` above the loop's (whole ticks again, but never starved) until no
run is in progress; the first time, a warning says so. Without ``CAP_SYS_NICE`` (the shipped
image runs as an unprivileged user) a thread may enter the idle class but never leave it, nor
lower its nice value again: the first time leaving it fails, the pool starts as many threads
again at nice +``ARGON2_NICE`` and keeps them (they never enter the idle class). While the pool
is escalated, runs go there: new ones, those still queued for the idle threads, and those
running on them (an idle-class run beside a busy process gets ~0.3% of a CPU: its 20 ms took
seconds), run again; the first copy to finish answers, and one left behind on an idle thread
finishes when it can. A run has at most one copy on each set of threads, so at most twice the
pool's threads run argon2 at once, each holding ``memory_cost`` (without ``CAP_SYS_NICE``
only, after a first escalation). The pool's threads are daemons: neither its shutdown nor the
interpreter's exit waits for a run left in progress. The idle class also shares the GIL:
an idle-class thread that holds it when it is preempted keeps the loop waiting until it runs
again. The pool's threads hold it only between runs, tens of microseconds each, and on a
crowded CPU they leave the idle class after the first few milliseconds of a burst.

Where the idle class cannot be set (not Linux, a sandbox that forbids it), the threads run at
a nice value ``ARGON2_NICE`` above the loop's and the loop never sleeps for them.

No scheduling class helps against a CPU limit (a cgroup's CFS quota: Kubernetes'
``limits.cpu``, ``docker --cpus``): it counts the CPU of every thread of the group, and once
the group has used its quota for the period (100 ms) all of them wait, the loop too, until the
next one. Measured on two CPUs with a limit of 1.2, a 128 MiB ``memory_cost`` and a loop that
never rests: argon2 at full speed on the free core kept the group throttled 0.7 s in every
second of a run, and the loop stood still for a third of it, in stalls of up to 40 ms (none
between runs). Under a quota of Q CPUs, the pool's threads are therefore
kept to ``floor(Q)`` CPUs (at least one) that include the one the loop runs on, re-checked with
the lending: the loop and argon2 together never ask for more CPU than the limit allows, and
argon2 gets what the loop leaves or lends, as on one core. :func:`argon2_threads` counts no
more threads than those CPUs. The limit is read again at a reload and, at most every
``LIMIT_EVERY`` seconds, as a burst starts (a pod resized in place has it changed under the
running process): the threads and their CPUs follow it. A limit below one CPU (Kubernetes'
``500m``) is not kept to: an idle-class thread takes the whole CPU whenever the loop rests, so
a burst of verifications still uses up the quota and the loop, woken by a request, waits for
the next period with the threads. The pool warns once when the limit is below one CPU.

The idle class weighs 3 in the scheduler, a thread at nice 0 1024: argon2 beside a loop at
nice 0 gets ~0.3% of the core on its weight, in whole ticks. A gateway started at a high nice
value loses most of the difference (nice 19 weighs 15: argon2 gets ~17% in whole ticks again).

Each argon2 run mallocs ``memory_cost`` KiB (19 MiB by default) and frees it. Left to itself,
glibc keeps that memory for the life of the process in every thread that ran argon2: a thread
has its own malloc arena, the first free raises glibc's mmap threshold above the run's size,
and ``malloc_trim`` never shrinks a thread's arena. ``keygate serve`` went from 56 to 115 MB
RSS after its first four verifications. :func:`one_malloc_arena` (called by ``serve`` before
any thread starts) has every thread allocate from the main arena, which
:func:`release_freed_memory` can return to the system; the gateway calls it every
``RELEASE_EVERY`` seconds. Runs in a burst still reuse the memory the previous run freed.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import logging
import os
import queue
import re
import threading
import time
from concurrent.futures import Future, InvalidStateError
from typing import Any, Callable, TypeVar

log = logging.getLogger("keygate.auth")

T = TypeVar("T")

DONATE_EVERY = 0.0045  # seconds of loop time between checks while a run is in progress
DONATE_SLICE = 0.0005  # seconds the loop sleeps when argon2 got too little CPU
WASTED_SLICES = 3      # lent slices in a row another process took: leave the idle class
SHARE = DONATE_SLICE / (DONATE_EVERY + DONATE_SLICE)  # the least argon2 gets: ~10%
ARGON2_NICE = 10       # the fallback: added to the process's nice value for the threads
RELEASE_EVERY = 10.0   # seconds between returns of freed memory to the system
LIMIT_EVERY = 10.0     # seconds at least between re-reads of the CPU limit as bursts start
_M_ARENA_MAX = -8      # glibc's mallopt() parameter number


def argon2_threads() -> int:
    """Threads of the pool: one per CPU this process may run on, at least 1, at most 4 (each
    run takes ``memory_cost`` KiB, and beyond the CPUs more threads only queue inside the
    kernel). The CPUs it may run on, not the machine's: a gateway pinned to one CPU (taskset,
    a cpuset container) with a thread per machine CPU ran two argon2 threads beside its event
    loop. Under a CPU limit, no more than the CPUs the pool keeps its threads to
    (:func:`quota_cpus`)."""
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        usable = os.cpu_count() or 1
    return _threads_for(usable, quota_cpus())


def _threads_for(usable: int, quota: float | None) -> int:
    if quota is not None:
        usable = min(usable, int(quota))
    return max(1, min(4, usable))


def quota_cpus() -> float | None:
    """The CPUs a second the cgroup's CFS bandwidth limit allows this process (cgroup v2
    ``cpu.max``, v1 ``cpu.cfs_quota_us`` over ``cpu.cfs_period_us``; the smallest along its
    cgroup's path up to the hierarchy's mount). None without a limit, or where it cannot be
    read (not Linux, no cgroup file system mounted)."""
    try:  # paths as the file system's encoding reads them (a mount point need not be UTF-8)
        with open("/proc/self/cgroup", errors="surrogateescape") as f:
            cgroup = f.read()
        with open("/proc/self/mountinfo", errors="surrogateescape") as f:
            mountinfo = f.read()
    except OSError:
        return None
    return quota_from(cgroup, mountinfo)


def quota_from(cgroup: str, mountinfo: str) -> float | None:
    """:func:`quota_cpus` from the text of ``/proc/self/cgroup`` and ``/proc/self/mountinfo``
    (the cgroup files are read where they name)."""
    # (split as the kernel writes them: a line a path, fields by single spaces; a vertical
    # tab or form feed is not escaped, and is part of a path)
    memberships = [line.split(":", 2) for line in cgroup.split("\n")]
    limits = []
    for line in mountinfo.split("\n"):
        fields = line.split(" ")
        if "-" not in fields or len(fields) < fields.index("-") + 4:
            continue
        dash = fields.index("-")
        fstype, options = fields[dash + 1], fields[dash + 3].split(",")
        root, point = _unescape(fields[3]), _unescape(fields[4])
        if fstype == "cgroup2":
            path = next((m[2] for m in memberships if len(m) == 3 and m[0] == "0"), None)
            files = ("cpu.max",)
        elif fstype == "cgroup" and "cpu" in options:
            path = next((m[2] for m in memberships
                         if len(m) == 3 and "cpu" in m[1].split(",")), None)
            files = ("cpu.cfs_quota_us", "cpu.cfs_period_us")
        else:
            continue
        if path is None or not (path + "/").startswith(root.rstrip("/") + "/"):
            continue  # this process's cgroup is not under this mount (another namespace)
        rel = path[len(root.rstrip("/")):].strip("/")
        parts = rel.split("/") if rel else []
        for depth in range(len(parts), -1, -1):
            where = os.path.join(point, *parts[:depth])
            try:
                values = [_words(os.path.join(where, name)) for name in files]
            except OSError:
                continue
            try:
                if fstype == "cgroup2":  # "max 100000" or "150000 100000"
                    quota, period = values[0][0], values[0][1]
                else:
                    quota, period = values[0][0], values[1][0]
                if quota not in ("max", "-1") and int(period) > 0:
                    limits.append(int(quota) / int(period))
            except (IndexError, ValueError):
                continue
    return min(limits) if limits else None


_MOUNTINFO_ESCAPES = {"\\040": " ", "\\011": "\t", "\\012": "\n", "\\134": "\\"}
_MOUNTINFO_ESCAPED = re.compile(r"\\(?:040|011|012|134)")


def _unescape(field: str) -> str:
    """A mount's root or mount point as the kernel writes it in mountinfo (``seq_path``: a
    space, tab, newline or backslash as ``\\ooo``), back to the path."""
    if "\\" not in field:
        return field
    return _MOUNTINFO_ESCAPED.sub(lambda m: _MOUNTINFO_ESCAPES[m.group()], field)


def _words(path: str) -> list[str]:
    with open(path) as f:
        return f.read().split()


def _idle_class() -> bool:
    """Put the calling thread in the idle scheduling class (Linux; no privilege is needed to
    lower one's own priority). False where that cannot be done."""
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))  # 0: this thread
        return True
    except (AttributeError, OSError) as exc:
        log.debug("argon2 threads cannot use the idle scheduling class: %s", exc)
        return False


def _lower_nice(tid: int | None = None) -> None:
    """Thread ``tid`` (the calling one by default) at a nice value ``ARGON2_NICE`` above the
    calling thread's (a pool thread's own, or the event loop's when it moves them)."""
    try:
        base = os.getpriority(os.PRIO_PROCESS, 0)  # 0: the calling thread
        os.setpriority(os.PRIO_PROCESS, tid or threading.get_native_id(),
                       min(19, base + ARGON2_NICE))
    except (AttributeError, OSError) as exc:  # not Linux, or a sandbox that forbids it
        log.debug("argon2 threads keep the default priority: %s", exc)


def _thread_clock(tid: int) -> int:
    """The clock id of thread ``tid``'s CPU time (Linux's MAKE_THREAD_CPUCLOCK, what glibc's
    and musl's ``pthread_getcpuclockid`` return). Reading it once the thread has ended fails
    with EINVAL."""
    return (~tid << 3) | 6  # CPUCLOCK_PERTHREAD_MASK | CPUCLOCK_SCHED


_warned_quota = False


def _cpus(quota: float | None) -> str:
    return "none" if quota is None else f"{quota:.2f} CPUs"


def _warn_quota_below_one_cpu(quota: float) -> None:
    global _warned_quota
    if not _warned_quota:
        _warned_quota = True
        log.warning("the CPU limit (%.2f CPUs) is below one CPU: argon2 verifications can use "
                    "it up and the kernel then stops the event loop with them until the next "
                    "100 ms period; give the gateway a limit of at least one CPU", quota)


class _Threads:
    """``size`` daemon threads running the calls submitted, in order: ``ThreadPoolExecutor``'s
    part the pool uses, with two differences. Its threads are daemons: the interpreter's exit
    does not wait for a run in progress (``keygate serve`` stopped, the pool shut down, then
    waited out an idle-class run beside a busy process: 69 s measured). And ``tids`` holds the
    native ids of the threads alive: a thread takes its id out, under ``lock``, before it ends,
    so whoever holds ``lock`` may move every thread in ``tids`` without reaching a thread the
    kernel has since given the same id (another of this process's, the embedded
    redis-server)."""

    def __init__(self, size: int, started: Callable[[], None]) -> None:
        self._size, self._started = size, started
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._count = 0                   # threads started and not told to end (by resize)
        self._alive = 0                   # threads started and not ended: under lock
        self.tids: set[int] = set()
        self.lock = threading.Lock()
        self._closed = False

    def submit(self, fn: Callable[..., T], *args: Any) -> Future:
        """Called on the event loop's thread only (it counts the threads started)."""
        if self._closed:  # as ThreadPoolExecutor: no thread would ever run it
            raise RuntimeError("cannot run argon2 after the pool's shutdown")
        job: Future = Future()
        self._queue.put((job, fn, args))
        if self._count < self._size:
            self._start()
        return job

    def _start(self) -> None:
        self._count += 1
        with self.lock:
            self._alive += 1
        threading.Thread(target=self._work, name=f"argon2_{self._count - 1}",
                         daemon=True).start()

    def resize(self, size: int) -> None:
        """``size`` threads from now on (loop thread only, as ``submit``). Fewer: as many
        threads as were too many end once the calls queued before now have started (an end
        marker each, behind them); more: started now for the calls waiting, else as calls
        come."""
        if self._closed:
            return
        for _ in range(self._count - size):
            self._queue.put(None)
        self._size, self._count = size, min(self._count, size)
        while self._count < self._size and not self._queue.empty():
            self._start()

    def _work(self) -> None:
        tid = threading.get_native_id()
        with self.lock:
            self.tids.add(tid)
        try:
            self._started()
            while (item := self._queue.get()) is not None:
                job, fn, args = item
                del item
                if job.set_running_or_notify_cancel():
                    try:
                        job.set_result(fn(*args))
                    except BaseException as exc:
                        job.set_exception(exc)
                del job, fn, args
        finally:
            with self.lock:
                self.tids.discard(tid)
                self._alive -= 1

    def shutdown(self) -> None:
        """Drop the calls still queued (cancelled) and end the threads once their run is over.
        Waits for nothing.

        An end marker for every thread alive, not for ``size``: the drain takes the markers a
        shrink queued too, and a shrink then a grow leaves more threads alive than ``size``
        until they have taken theirs. A thread ending meanwhile leaves a marker no one takes:
        harmless, nothing is queued after the shutdown."""
        self._closed = True
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                item[0].cancel()
        with self.lock:
            alive = self._alive
        for _ in range(alive):
            self._queue.put(None)


class Argon2Pool:
    """``await pool.run(fn, *args)`` runs ``fn`` (an argon2 hash or verify) on one of the
    pool's threads, lending them the event loop's CPU when they starve (module docstring).
    ``idle_class`` tells whether the threads run in the idle class (None until one starts)."""

    def __init__(self, threads: int | None = None) -> None:
        self._size = threads or argon2_threads()
        self._sized = threads is None     # the size follows the CPU limit (reread_cpu_limit)
        # told the new size when a re-read of the CPU limit changed it (the verify queue's)
        self.on_resize: Callable[[int], None] | None = None
        self.idle_class: bool | None = None
        self.donated = 0                  # slices the loop gave away (a diagnosis)
        self.escalated = False            # out of the idle class until the runs end
        self.escalations = 0              # times it was (a diagnosis)
        self._wasted = 0                  # consecutive lent slices argon2 did not get
        self._idle = _Threads(self._size, self._idle_thread_started)
        # Started the first time the idle threads may not leave their class (no CAP_SYS_NICE),
        # at nice +ARGON2_NICE, and kept: it runs the runs while the pool is escalated.
        self._niced: _Threads | None = None
        self._jobs: set[Future] = set()   # runs submitted and not finished
        # each caller's run not answered yet: its function, arguments and its copy on the
        # idle threads and on the niced ones (a run has at most one on each)
        self._runs: dict[Future, list] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._seen = 0.0                  # argon2's CPU seconds at the last check (_cpu)
        self._checked = 0.0               # loop.time() of the last check
        # Under a CPU limit (module docstring): how many CPUs argon2 may use, the loop's
        # among them, and the CPUs the threads are kept to now. Read again at a reload
        # (reread_cpu_limit) and as a burst starts, at most every LIMIT_EVERY seconds: a
        # pod resized in place has its limit changed under the running process.
        self.confined: frozenset[int] | None = None
        self.quota, self._usable, self._width = self._limit()
        self._limit_read = time.monotonic()
        if self.quota is not None and self.quota < 1:
            _warn_quota_below_one_cpu(self.quota)

    @property
    def size(self) -> int:
        """Threads of the pool (of each set of them)."""
        return self._size

    @staticmethod
    def _limit() -> tuple[float | None, list[int], int]:
        """(the CPU limit, the CPUs this thread may run on, how many of them argon2 may use)."""
        quota = quota_cpus()
        try:
            usable = sorted(os.sched_getaffinity(0))
        except (AttributeError, OSError):  # not Linux
            usable = []
        return quota, usable, max(1, int(quota)) if quota is not None else len(usable)

    def reread_cpu_limit(self) -> bool:
        """Read the CPU limit again (a reload; a pod resized in place changes it under the
        process), and follow a change: the threads kept to the CPUs the new limit allows,
        or to every CPU once it allows them all, and as many threads as :func:`argon2_threads`
        counts now (unless the pool was made with a number of its own). On the loop's
        thread. Returns whether anything changed."""
        self._limit_read = time.monotonic()
        quota, usable, width = self._limit()
        if (quota, usable, width) == (self.quota, self._usable, self._width):
            return False
        before = self.quota
        self.quota, self._usable, self._width = quota, usable, width
        size = _threads_for(len(usable) or os.cpu_count() or 1, quota) if self._sized \
            else self._size
        # the old confinement dropped before any thread is started: a new thread reads the
        # CPUs it keeps to under its group's lock (_keep_confined), and the sweep below or
        # _confine, under the same lock, reaches every thread whose id is in tids by then
        was, self.confined = self.confined, None
        if resized := size != self._size:
            self._size = size
            for threads in self._groups():
                threads.resize(size)
        if width >= len(usable):
            if was is not None:  # confined before: every CPU again
                for threads in self._groups():
                    with threads.lock:  # no thread leaves meanwhile: no id is another's
                        for tid in threads.tids:
                            self._set_affinity(tid, frozenset(usable))
        else:  # kept to the new number of CPUs (now, should a burst be running)
            self._confine()
        log.info("the CPU limit is now %s (was %s): argon2 keeps to %d of %d CPUs, %d thread%s",
                 _cpus(quota), _cpus(before), min(width, len(usable)), len(usable), size,
                 "" if size == 1 else "s")
        if quota is not None and quota < 1:
            _warn_quota_below_one_cpu(quota)
        if resized and self.on_resize is not None:
            self.on_resize(size)
        return True

    @property
    def _threads(self) -> set[int]:
        """The native ids of the pool's threads alive now."""
        return self._idle.tids | (self._niced.tids if self._niced is not None else set())

    def _groups(self) -> list[_Threads]:
        return [self._idle] if self._niced is None else [self._idle, self._niced]

    def _idle_thread_started(self) -> None:
        if self.escalated and self._niced is None:  # its siblings are out of the idle class
            _lower_nice()
        else:
            idle = _idle_class()
            if not idle:
                _lower_nice()
            self.idle_class = idle
        self._keep_confined(self._idle)

    def _niced_thread_started(self) -> None:
        _lower_nice()
        assert self._niced is not None  # made before any of its threads starts
        self._keep_confined(self._niced)

    def _keep_confined(self, threads: _Threads) -> None:
        """A thread starting (its id already in ``threads.tids``) keeps to the CPUs the pool
        keeps to now. Read and set under ``threads.lock``, the lock every sweep of the threads'
        CPUs takes (:meth:`_confine`, :meth:`reread_cpu_limit`), after ``confined`` is set:
        a sweep either comes after and reaches this thread, or came before and this reads what
        it set. Read outside the lock, a value read before a sweep was applied after it: a
        thread started as a lifted limit was followed stayed on the old limit's CPUs."""
        with threads.lock:
            if self.confined is not None:
                self._set_affinity(0, self.confined)  # 0: this thread

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        run: Future = Future()  # the caller's: answered by the first copy to finish
        self._runs[run] = entry = [fn, args, None, None]
        run.add_done_callback(self._answered)
        self._submit(run, entry, niced=self.escalated and self._niced is not None)
        if self._timer is None:  # a burst starts
            loop = asyncio.get_running_loop()
            if time.monotonic() - self._limit_read >= LIMIT_EVERY:  # ~70 µs
                self.reread_cpu_limit()
            self._confine()
            self._seen, self._checked = self._cpu(), loop.time()
            self._timer = loop.call_later(DONATE_EVERY, self._check, loop)
        return await asyncio.wrap_future(run)

    def _submit(self, run: Future, entry: list, *, niced: bool) -> None:
        threads = self._niced if niced else self._idle
        assert threads is not None
        job = threads.submit(entry[0], *entry[1])
        entry[3 if niced else 2] = job
        self._jobs.add(job)
        job.add_done_callback(self._jobs.discard)  # set.discard is atomic under the GIL
        job.add_done_callback(lambda job: self._answer(run, job))
        if run.done():  # answered (on a pool thread) as this copy was made: not needed
            job.cancel()
            self._jobs.discard(job)

    @staticmethod
    def _answer(run: Future, job: Future) -> None:
        if job.cancelled():  # a queued copy no longer needed, or the caller's cancel
            return
        try:
            if (exc := job.exception()) is not None:
                run.set_exception(exc)
            else:
                run.set_result(job.result())
        except InvalidStateError:  # another copy answered first, or the caller cancelled
            pass

    def _answered(self, run: Future) -> None:
        """The caller has its answer, or has cancelled: the copies still queued are dropped.
        A copy still running for an answered run is no longer a run in progress (no CPU is
        lent for it); one for a cancelled run still is, as before (it holds a thread)."""
        _, _, *copies = self._runs.pop(run)
        for job in copies:
            if job is not None:
                job.cancel()
                if not run.cancelled():
                    self._jobs.discard(job)

    def _confine(self) -> None:
        """Under a CPU limit of fewer CPUs than the process may use: keep the threads to
        ``floor(limit)`` of them, the one the loop runs on among them (the caller is the
        loop). Followed at every check, should the loop have moved."""
        if self._width >= len(self._usable) or (getcpu := getattr(_LIBC, "sched_getcpu",
                                                                   None)) is None:
            return
        here = getcpu()
        if here < 0 or (self.confined is not None and here in self.confined):
            return
        others = [cpu for cpu in self._usable if cpu != here]
        self.confined = frozenset([here, *others[:self._width - 1]])
        for threads in self._groups():
            with threads.lock:  # no thread leaves meanwhile: no id is another's by now
                for tid in threads.tids:
                    self._set_affinity(tid, self.confined)

    @staticmethod
    def _set_affinity(tid: int, cpus: frozenset[int]) -> None:
        try:
            os.sched_setaffinity(tid, cpus)
        except OSError as exc:  # the thread has ended, or a sandbox forbids it
            log.debug("argon2 thread %d keeps its CPUs: %s", tid, exc)

    def _cpu(self) -> float:
        """CPU seconds argon2 has had: the process's, less every other Python thread's (the
        event loop's, the access log's writer...). Not the pool threads' own clocks: with
        ``keys.argon2.parallelism`` above 1 (the config's, or a key hashed under it) libargon2
        fills the lanes in threads it starts itself while the pool's thread waits for them,
        and the loop saw ~5% of argon2's CPU and lent its core at every check, argon2 at full
        speed on a free core or not. Threads Python did not start (those lanes, libuv's)
        count as argon2's."""
        others, pool_threads = 0.0, self._threads
        for thread in threading.enumerate():
            tid = thread.native_id
            if tid is None or tid in pool_threads:  # None: not started yet
                continue
            try:  # the thread's CPU clock by its id, not by pthread_t: one that has just
                others += time.clock_gettime(_thread_clock(tid))  # ended is an error, not UB
            except (AttributeError, OSError):  # it has ended; or no such clock (not Linux)
                pass
        return time.process_time() - others

    def _check(self, loop: asyncio.AbstractEventLoop) -> None:
        """While runs are in progress (a run cancelled by its caller still runs): lend the
        loop's CPU when the threads got less than ``SHARE`` of the time since the last check;
        move them out of the idle class when the slices lent go to another process."""
        if not self._jobs:
            self._timer = None
            if self.escalated:
                self._set_class(idle=True)
            return
        try:
            self._confine()
            now = loop.time()
            cpu = self._cpu()
            if self.idle_class and not self.escalated and \
                    cpu - self._seen < SHARE * (now - self._checked):
                time.sleep(DONATE_SLICE)
                self.donated += 1
                lent, cpu, now = cpu, self._cpu(), loop.time()
                # A busy neighbour on this CPU (another process at normal priority) takes
                # the slice instead of the idle class: argon2 would never run.
                self._wasted = self._wasted + 1 if cpu - lent < DONATE_SLICE / 4 else 0
                if self._wasted >= WASTED_SLICES:
                    self._set_class(idle=False)
            self._seen, self._checked = cpu, now
        finally:
            self._timer = loop.call_later(DONATE_EVERY, self._check, loop)

    def _set_class(self, *, idle: bool) -> None:
        """Every pool thread into the idle class, or out of it at nice +``ARGON2_NICE`` (the
        threads libargon2 starts for a run's lanes inherit it from theirs). The first time a
        thread may not leave the idle class (no ``CAP_SYS_NICE``), the pool starts threads at
        nice +``ARGON2_NICE`` (as many as the idle ones, once: it keeps them), and from then
        on runs there while escalated (:meth:`_take_over`); they never enter the idle class."""
        self.escalated, self._wasted = not idle, 0
        if self._niced is None:
            stuck = False
            with self._idle.lock:  # no thread leaves meanwhile: no id is another's by now
                for tid in self._idle.tids:
                    try:
                        if idle:
                            os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0))
                        else:
                            _lower_nice(tid)
                            os.sched_setscheduler(tid, os.SCHED_OTHER, os.sched_param(0))
                    except OSError as exc:  # a sandbox forbids it
                        stuck = stuck or exc.errno == errno.EPERM
                        log.debug("argon2 thread %d keeps its scheduling class: %s", tid, exc)
            if stuck and not idle:
                self._niced = _Threads(self._size, self._niced_thread_started)
                log.info("argon2 threads may not leave the idle scheduling class (no "
                         "CAP_SYS_NICE): %d more threads at nice +%d run the verifications "
                         "while the idle class is left", self._size, ARGON2_NICE)
        if not idle:
            if self._niced is not None:
                self._take_over()
            self.escalations += 1  # said once at warning level: it tells of a crowded host
            log.log(logging.WARNING if self.escalations == 1 else logging.INFO,
                    "argon2 threads leave the idle scheduling class until this burst of "
                    "verifications ends: another process takes the CPU the event loop lends")

    def _take_over(self) -> None:
        """Escalated, where the idle threads may not leave their class: every run not yet
        answered goes to the niced threads. A run still queued on the idle threads moves
        there; one running on an idle thread (it may not leave the idle class, and beside a
        busy process it gets ~0.3% of a CPU: 20 ms of argon2 took seconds) is run there too,
        and the first copy to finish answers. A run has at most one copy on each set of
        threads, so at most ``2 × threads`` runs are ever in progress, each holding
        ``memory_cost``: a copy left behind on an idle thread finishes when it can and
        answers no one."""
        for run, entry in list(self._runs.items()):
            if run.done() or entry[3] is not None:  # answered, or already on the niced threads
                continue
            if entry[2] is not None:
                entry[2].cancel()  # dropped if still queued; running, it goes on
            self._submit(run, entry, niced=True)

    def shutdown(self) -> None:
        """Drops the runs still queued; one in progress finishes on its daemon thread, or
        ends with the process: neither this nor the interpreter's exit waits for it."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for threads in self._groups():
            threads.shutdown()


# --- argon2's memory ----------------------------------------------------------------------------

def _c_library() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(None)  # the C library this process runs on
    except (OSError, TypeError):  # TypeError: Windows wants a name
        return None


_LIBC = _c_library()


def one_malloc_arena() -> None:
    """Every thread started after this allocates from glibc's main arena (see the module
    docstring). Elsewhere a no-op."""
    if (mallopt := getattr(_LIBC, "mallopt", None)) is not None:
        mallopt(_M_ARENA_MAX, 1)


def release_freed_memory() -> None:
    """Return the memory freed inside the main malloc arena to the system (glibc's
    ``malloc_trim``; well under a millisecond when there is little to return, ~2 ms after an
    argon2 run). Elsewhere a no-op."""
    if (trim := getattr(_LIBC, "malloc_trim", None)) is not None:
        trim(0)


async def release_freed_memory_every(seconds: float = RELEASE_EVERY) -> None:
    """Runs until cancelled (a task of the gateway's lifecycle). The trim runs on the default
    executor's thread, not the event loop's: it walks the heap (~2 ms after an argon2 run),
    and a foreign call through ctypes does not hold the GIL, so requests go on meanwhile."""
    loop = asyncio.get_running_loop()
    while True:
        await asyncio.sleep(seconds)
        await loop.run_in_executor(None, release_freed_memory)
