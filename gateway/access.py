"""SPEC's access check on an authenticated key: which refusal, if any, a request gets.

    expired → revoked → disabled → not from an allowed address → scope

Pure (no store, no clock of its own): every path that admits a key — the proxy, the
verify-only endpoint ``/_keygate/v1/verify``, ``/_keygate/v1/usage``, the self-service key
endpoints, a fail-open decision while the store is down — asks this one function, so their
order cannot drift apart.
"""

from __future__ import annotations

from typing import Iterable

from . import errors
from .auth import CachedKey


def refusal(key: CachedKey, scopes: Iterable[str], *, now: float,
            blocked: bool) -> errors.GatewayError | None:
    """The error to answer for ``key`` at ``now`` on a route needing ``scopes`` (None: no
    refusal). ``blocked``: the client address is outside the key's IP allow-list (decided by
    the caller, from the client address exactly as the failure throttle computes it)."""
    if key.expires_at is not None and key.expires_at <= now:
        return errors.invalid_token("expired_key", "This API key has expired.")
    if key.revoked_at is not None:  # expired once, then extended: revoked all the same
        return errors.invalid_token("revoked_key", "This API key has been revoked.")
    if not key.enabled:
        return errors.invalid_token("disabled_key", "This API key is disabled.")
    if blocked:
        return errors.Forbidden("This API key may not be used from this address.",
                                code="ip_not_allowed")
    for scope in scopes:  # the first one missing (a loop: no generator per request)
        if not key.has_scope(scope):
            return errors.insufficient_scope(scope)
    return None
