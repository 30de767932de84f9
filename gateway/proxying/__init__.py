"""The proxy's HTTP edge: what is forwarded and how.

- ``headers``: request and response header hygiene (pure);
- ``forward``: ``Forwarder``, one allowed request to its upstream and its answer back;
- ``upstream`` / ``connection``: the lean HTTP/1.1 upstream client (pool; one connection);
- ``server``: the listeners' low-level aiohttp server (JSON parser errors, edge limits).
- ``response``: ``WholeResponse``, an answer whose body is all here, written in one step.
- ``vanish``: the socket options that end a connection whose peer's machine vanished.

Named ``proxying`` rather than ``http``: a folder holding ``http/`` on ``sys.path`` (a shell
in ``gateway/``, a tool pointed at it) would shadow the standard library's ``http``, which
aiohttp imports.
"""
