"""Test-only, never installed: a ``keygate`` child (``serve``, or a CLI command) whose
PYTHONPATH starts with this folder (``served.skewed_clock``) imports it as ``sitecustomize``
before anything else, and its wall clock (``time.time``, ``time.time_ns``, and
``datetime.datetime.now`` / ``utcnow``, which CPython reads from the system clock itself) then
reads ``KEYGATE_TEST_CLOCK_SKEW`` seconds off, as on a host whose clock is that far off. Its
monotonic clock is left as it is, as a wrong wall clock leaves it. Nothing in keygate reads the
variable."""

import datetime
import os
import time

_skew = float(os.environ.get("KEYGATE_TEST_CLOCK_SKEW") or 0)
if _skew:
    _time, _time_ns = time.time, time.time_ns
    time.time = lambda: _time() + _skew
    time.time_ns = lambda: _time_ns() + int(_skew * 1e9)

    class _SkewedDatetime(datetime.datetime):
        """``datetime`` whose ``now`` and ``utcnow`` read the skewed clock (imported after
        this, ``from datetime import datetime`` finds it)."""

        @classmethod
        def now(cls, tz=None):
            return super().now(tz) + datetime.timedelta(seconds=_skew)

        @classmethod
        def utcnow(cls):
            return super().utcnow() + datetime.timedelta(seconds=_skew)

    datetime.datetime = _SkewedDatetime
