"""Usage periods, the limits in force and the IETF RateLimit fields
(draft-ietf-httpapi-ratelimit-headers-11).

The decisions themselves are made atomically in Redis (``gateway/store/lua/authorize.lua``);
this module holds the pure parts around them: the calendar month and UTC day an instant
counts in, which limits apply, the headers.
"""

from __future__ import annotations

import dataclasses
import math
import time
from datetime import datetime, timezone
from typing import NamedTuple

from multidict import istr

from .config import Config, Plan, RateLimit

COUNTER_GRACE = 40 * 86400  # month counters outlive their month, for usage reports


class Month(NamedTuple):
    period: str          # "YYYY-MM"
    start: float         # epoch seconds, first instant of the month (UTC)
    resets_at: float     # first instant of next month (UTC)

    @property
    def seconds(self) -> int:
        return int(self.resets_at - self.start)

    def seconds_left(self, now: float) -> int:
        left = math.ceil(self.resets_at - now)  # not max(): 3.11 parses its arguments as
        return left if left > 1 else 1          # keywords (~150 instructions a call)

    def counter_ttl(self, now: float) -> int:
        return self.seconds_left(now) + COUNTER_GRACE


def month_of(now: float) -> Month:
    """The UTC calendar month ``now`` (epoch seconds) falls in: the one place that rule is
    written."""
    dt = datetime.fromtimestamp(now, timezone.utc)
    start = datetime(dt.year, dt.month, 1, tzinfo=timezone.utc)
    nxt = datetime(dt.year + (dt.month == 12), dt.month % 12 + 1, 1, tzinfo=timezone.utc)
    return Month(f"{dt.year:04d}-{dt.month:02d}", start.timestamp(), nxt.timestamp())


def month_period(now: float) -> tuple[str, float]:
    """("YYYY-MM", first instant of the next month) of ``now``, UTC."""
    month = month_of(now)
    return month.period, month.resets_at


def utc_day(now: float) -> str:
    """"YYYY-MM-DD" of ``now`` (epoch seconds), UTC."""
    return time.strftime("%Y-%m-%d", time.gmtime(now))


class MonthCache:
    """``month_of`` costs a datetime round trip; the answer only changes once a month."""

    def __init__(self) -> None:
        self._month = month_of(0)
        self._day = (0.0, 0.0, "")  # start, end, "YYYY-MM-DD" (UTC)

    def get(self, now: float) -> Month:
        m = self._month
        if not (m.start <= now < m.resets_at):
            m = self._month = month_of(now)
        return m

    def day(self, now: float) -> str:
        """"YYYY-MM-DD" of ``now`` (UTC), for the day counters; recomputed once a day."""
        start, end, text = self._day
        if not (start <= now < end):
            start = now - now % 86400  # UTC days are 86400 s apart (no leap seconds in epoch)
            text = utc_day(start)
            self._day = (start, start + 86400, text)
        return text


def effective_plan(config: Config, workspace) -> Plan:
    """The limits in force for ``workspace`` (a ``models.Workspace``): its plan's, with the
    workspace's own overrides (a custom deal) on top."""
    plan = config.plan_of(workspace.plan)
    overrides = workspace.overrides
    if not overrides:
        return plan
    from .config import parse_rate_limit
    changes: dict = {}
    for name, value in overrides:
        if name == "rate_limit":
            changes[name] = parse_rate_limit(value) if value else None
        elif name in ("monthly_requests", "max_keys"):
            changes[name] = value
    return dataclasses.replace(plan, **changes)


def limits_json(plan: Plan) -> dict:
    """``{"monthly_requests", "max_keys", "rate_limit"}`` of a plan (null = unlimited)."""
    return {"monthly_requests": plan.monthly_requests, "max_keys": plan.max_keys,
            "rate_limit": None if plan.rate_limit is None else str(plan.rate_limit)}


def key_rate_limit(config: Config, plan: Plan | None, key_rate: str | None) -> RateLimit | None:
    """The rate limit in force for a key: its own, held within its workspace's (``plan``, the
    workspace's own limits included) in both windows (``RateLimit.within``), or the
    workspace's when it has none. A key given a big rate under a big plan never keeps it past
    a downgrade: the cached key is derived again when the workspace changes (its rev)."""
    bound = plan.rate_limit if plan else None
    if key_rate:
        from .config import parse_rate_limit
        own = parse_rate_limit(key_rate)
        return own if bound is None else own.within(bound)
    return bound


# RateLimit-Policy values by (rate N, rate period, monthly limit, key cap, month's period: a
# string, whose hash is kept, where the Month tuple's two floats were hashed on every request):
# the same for every request of a key in a month, so formatted once (callgrind: the headers of a key with a
# rate limit and a quota took 22k instructions a request, 12.7k with this)
_POLICIES: dict[tuple, str] = {}
# The field names as multidict's case-insensitive keys: a str name is made one per assignment
# into the response's headers
RATELIMIT, RATELIMIT_POLICY = istr("RateLimit"), istr("RateLimit-Policy")
_POLICIES_MAX = 1024


def ratelimit_headers(rate: RateLimit | None, rate_remaining: int, rate_reset_ms: int,
                      monthly_limit: int | None, month_used: int, month: Month,
                      now: float, key_limit: int | None = None,
                      key_used: int = 0) -> dict[str, str]:
    """RateLimit-Policy and RateLimit, one item per limit that applies."""
    if rate is None:
        if monthly_limit is None and key_limit is None:
            return {}
        memo = (0, 0, monthly_limit, key_limit, month.period)
    else:
        memo = (rate.requests, rate.period_seconds, monthly_limit, key_limit, month.period,
                rate.burst)
    policy = _POLICIES.get(memo)
    if policy is None:
        policy = _policy(rate, monthly_limit, key_limit, month)
        if len(_POLICIES) >= _POLICIES_MAX:
            _POLICIES.clear()
        _POLICIES[memo] = policy
    values = []
    if rate is not None:
        values.append(f'"rate";r={rate_remaining if rate_remaining > 0 else 0};'
                      f't={math.ceil(rate_reset_ms / 1000) if rate_reset_ms > 0 else 0}')
    if monthly_limit is not None or key_limit is not None:
        left = month.seconds_left(now)
        if monthly_limit is not None:
            remaining = monthly_limit - month_used
            values.append(f'"monthly";r={remaining if remaining > 0 else 0};t={left}')
        if key_limit is not None:  # the key's own monthly cap, on top of the workspace's
            remaining = key_limit - key_used
            values.append(f'"key-monthly";r={remaining if remaining > 0 else 0};t={left}')
    return {RATELIMIT_POLICY: policy, RATELIMIT: ", ".join(values)}


def _policy(rate: RateLimit | None, monthly_limit: int | None, key_limit: int | None,
            month: Month) -> str:
    policies = []
    if rate is not None:
        policies.append(f'"rate";q={rate.requests};w={rate.period_seconds}')
        if rate.burst:  # a per-minute rate with a cap per second besides ("rate"'s r= counts
            # what is left before either is full)
            policies.append(f'"rate-burst";q={rate.burst};w=1')
    if monthly_limit is not None:
        policies.append(f'"monthly";q={monthly_limit};w={month.seconds}')
    if key_limit is not None:
        policies.append(f'"key-monthly";q={key_limit};w={month.seconds}')
    return ", ".join(policies)
