"""Test-only, never installed: a ``keygate`` child whose PYTHONPATH starts with this folder
imports it as ``sitecustomize`` before anything else, and its import of ``gateway.workers``
(aiohttp, redis, prometheus-client... everything ``serve`` runs on) then takes
``KEYGATE_TEST_SLOW_START`` seconds more, as a cold start on a small VM or a busy node takes;
``KEYGATE_TEST_SLOW_START_MARK``, if set, names a file made when that import begins. Nothing in
keygate reads the variables."""

import importlib.abc
import os
import sys
import time

_delay = float(os.environ.get("KEYGATE_TEST_SLOW_START") or 0)
if _delay:
    class _SlowStart(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):  # noqa: ANN001
            if name == "gateway.workers":
                mark = os.environ.get("KEYGATE_TEST_SLOW_START_MARK")
                if mark:
                    open(mark, "w").close()
                time.sleep(_delay)
            return None  # found as usual, by the finders after this one

    sys.meta_path.insert(0, _SlowStart())
