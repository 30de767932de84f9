"""What a new config may not drop: the plans workspaces are on and the configured roles keys
are bound to. Both live in the store, so this is the one config check that asks it.

A workspace whose plan the config no longer has falls back to ``default_plan`` and its limits
(``Config.plan_of``) while its object still names the old plan; a key bound to a configured
role the config no longer has (and its workspace does not define) acts with no scopes: 403 on
every route. Neither says anything. So a reload that would do either is refused, and
``keygate config check`` reports it, as problems (``file:line: field: what``).

The store call is bounded (``IN_USE_TIMEOUT``): a store that is down or slow raises
:class:`StoreError`, and the caller says what could not be checked and goes ahead: a reload
must never wait on the store (it may be the very fix under way).
"""

from __future__ import annotations

from typing import Any

from .closing import bounded
from .config.loader import top_level_line
from .config.nodes import one_line
from .errors import StoreError
from .settings import Config

IN_USE_TIMEOUT = 5.0   # seconds for the whole check (a few pipelined reads)
EXAMPLES = 5           # workspace ids a problem names


def dropped(new: Config, old: Config | None) -> tuple[list[str], list[str] | None]:
    """(plans, roles) a reload from ``old`` to ``new`` drops; ``old`` None (``config check``,
    nothing to compare with): no plan list (every plan in use is checked) and roles None
    (every role keys use)."""
    if old is None:
        return [], None
    return ([p for p in old.plans if p not in new.plans],
            [r for r in old.roles if r not in new.roles])


def _examples(ids: list[str]) -> str:
    shown = ", ".join(ids[:EXAMPLES])
    return shown + (f", … {len(ids) - EXAMPLES} more" if len(ids) > EXAMPLES else "")


def _n(count: int, what: str) -> str:
    return f"{count} {what}{'' if count == 1 else 's'}"


async def in_use_problems(store: Any, new: Config, old: Config | None = None, *,
                          timeout: float = IN_USE_TIMEOUT) -> list[str]:
    """The problems of ``new`` against what the store uses: a plan workspaces are on, or a
    configured role keys are bound to, that ``new`` lacks (with ``old``: only those ``old``
    had, i.e. that this change drops; nothing is asked of the store when it drops none).
    Raises :class:`StoreError` when the store does not answer within ``timeout``."""
    plans_dropped, roles_dropped = dropped(new, old)
    if old is not None and not plans_dropped and not roles_dropped:
        return []
    answer: list[Any] = []

    async def ask() -> None:
        answer.append(await store.config_names_in_use(roles_dropped))

    if not await bounded(ask(), timeout, None):
        raise StoreError(f"the store did not answer within {timeout:g} s")
    plans, roles = answer[0]
    problems = []
    for plan in sorted(plans):
        if plan in new.plans or (old is not None and plan not in plans_dropped):
            continue
        ids = plans[plan]
        problems.append(one_line(
            f"{new.source}:{top_level_line(new.source, 'plans')}: plans: plan '{plan}' is not "
            f"in this file, but {_n(len(ids), 'workspace')} ({_examples(ids)}) "
            f"{'is' if len(ids) == 1 else 'are'} on it and would fall back to default_plan "
            f"'{new.default_plan}' and its limits; move them to another plan first (keygate "
            "workspaces set-plan ID PLAN), or keep the plan"))
    for role in sorted(roles):
        if role in new.roles:
            continue
        per_ws = roles[role]
        keys = sum(per_ws.values())
        ids = sorted(per_ws)
        problems.append(one_line(
            f"{new.source}:{top_level_line(new.source, 'roles')}: roles: role '{role}' is not "
            f"in this file, but {_n(keys, 'key')} (not revoked or expired) in "
            f"{_n(len(ids), 'workspace')} ({_examples(ids)}) {'is' if keys == 1 else 'are'} "
            "bound to it and would be left with no scopes; re-role them first (keygate keys "
            "update --workspace WS ID --role ROLE | --scope S), or keep the role"))
    return problems


def not_checked(new: Config, old: Config | None) -> str:
    """What a check the store could not answer left unchecked, for the warning."""
    plans_dropped, roles_dropped = dropped(new, old)
    if old is None:
        return "the plans workspaces are on and the roles keys use"
    parts = []
    if plans_dropped:
        parts.append("plans " + ", ".join(f"'{p}'" for p in plans_dropped))
    if roles_dropped:
        parts.append("roles " + ", ".join(f"'{r}'" for r in roles_dropped))
    return "whether anything still uses the " + " and the ".join(parts) + " this file drops"
