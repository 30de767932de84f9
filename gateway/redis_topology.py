"""redis-py clients for the Redis topologies: Sentinel (``_SentinelMaster``, which follows a
failover for pooled connections too, and ``_ConfirmingSentinelMaster``, the admin store's, which
confirms that a write ran on the node the Sentinels name as the master) and Cluster
(``_cluster_class``: connections handed out most recently released first, TRYAGAIN waited out
within the store timeout, the slots re-read without closing connections in use, a node's
other connections kept when one of its commands fails).

``topology_client`` builds one from a ``redis+sentinel://`` or ``redis+cluster://`` URL (the
URL forms, their options and their checks are ``gateway.redis_urls``').
"""

from __future__ import annotations

import contextlib
import contextvars
import inspect
from typing import Any

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.sentinel import SentinelConnectionPool
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from .redis_urls import (CLUSTER_NODE_CONNECTIONS, NO_SETINFO, POOL_CONNECTIONS, _given, _retry,
                         fresh_tls, parse_topology_url)


class _BlockingSentinelPool(SentinelConnectionPool, BlockingConnectionPool):
    """The Sentinel-following pool, waiting for a free connection instead of raising."""

    def __init__(self, service_name: str, sentinel_manager: Any, **kwargs: Any) -> None:
        kwargs.setdefault("max_connections", POOL_CONNECTIONS)
        kwargs["timeout"] = None
        super().__init__(service_name, sentinel_manager, **kwargs)



# Whether the store call this task runs (``track_writes``) has written any of its commands to
# a connection: [False] until one of the connections below hands a command's bytes to its
# socket (a connection's own handshake, AUTH and HELLO, is not the call's). None: no call
# tracked. A call whose commands were never written ran nothing on Redis, whatever redis-py
# raised (the connection could not be made, no Sentinel named a master, no node owns the
# slot): it can be made again later without running twice.
_COMMAND_WRITTEN: contextvars.ContextVar[list[bool] | None] = contextvars.ContextVar(
    "keygate_command_written", default=None)


# Set by a Cluster command's attempt (``_Cluster._execute_command``): a list whose one item
# ``_WriteTracking`` sets True when a connection could not be made (a connection error, not a
# timeout). None: not looked at.
_CONNECT_FAILED: contextvars.ContextVar[list[bool] | None] = contextvars.ContextVar(
    "keygate_connect_failed", default=None)


@contextlib.contextmanager
def track_writes() -> Any:
    """Yields a list whose one item says whether the commands run in the block were written
    to a connection (``_WriteTracking``): False at the end means none left keygate."""
    written = [False]
    token = _COMMAND_WRITTEN.set(written)
    try:
        yield written
    finally:
        _COMMAND_WRITTEN.reset(token)


class _WriteTracking:
    """A redis-py connection that records, for the call ``track_writes`` follows, that a
    command was written: before its bytes go to the socket (``send_packed_command``, the one
    place redis-py writes a command), once the connection is made. Partly written counts as
    written. The connection's own handshake (AUTH, HELLO, CLIENT SETINFO, SELECT, sent while
    it connects) does not count: a connection that fails there never wrote the call's command.
    Nothing is recorded outside ``track_writes`` (one ContextVar read per command)."""
    _handshaking = False

    async def connect_check_health(self, *args: Any, **kwargs: Any) -> Any:
        self._handshaking = True
        try:
            return await super().connect_check_health(*args, **kwargs)  # type: ignore[misc]
        except RedisConnectionError:
            failed = _CONNECT_FAILED.get()
            if failed is not None:
                failed[0] = True
            raise
        finally:
            self._handshaking = False

    async def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        if self.is_connected and self._reader.at_eof():  # type: ignore[attr-defined]
            # The server closed this connection (a pooled one, idle since: the node stopped
            # or restarted, CLIENT KILL, its idle timeout). Redis closes a connection whole,
            # so nothing written to it now is read: it is made again first, as the Sentinel
            # pool does for the connections it hands out, instead of writing the command into
            # it and failing (a Cluster node's pool hands them out unchecked).
            await self.disconnect()  # type: ignore[attr-defined]
        if not self.is_connected:  # type: ignore[attr-defined]
            # as redis-py's own first step: a connection that cannot be made wrote nothing
            await self.connect_check_health(check_health=False)
        written = _COMMAND_WRITTEN.get()
        if written is not None and not written[0] and not self._handshaking \
                and not _routing_command(command):
            written[0] = True
        await super().send_packed_command(command, check_health)  # type: ignore[misc]


# Commands redis-py sends on its own, in the task of the call it runs, to route it: a Cluster
# client reads the slots (CLUSTER SLOTS) and the command table (COMMAND) again after a
# connection error, before the call's next attempt. They are not the call's: no keygate call
# is one of them.
_ROUTING_VERBS = (b"CLUSTER", b"COMMAND")


def _routing_command(command: Any) -> bool:
    """Whether packed ``command`` (RESP: ``*N``, ``$len``, the verb, ...) is one of
    ``_ROUTING_VERBS``. Anything it cannot read is not (it counts as the call's)."""
    first = command if isinstance(command, (bytes, str)) else next(iter(command), b"")
    if isinstance(first, str):
        first = first.encode()
    parts = bytes(first[:48]).split(b"\r\n", 3)
    return len(parts) > 3 and parts[2].upper() in _ROUTING_VERBS


def _tracking(connection_class: type) -> type:
    """``connection_class`` with ``_WriteTracking``."""
    tracked = _TRACKING.get(connection_class)
    if tracked is None:  # a TLS one also reads its certificate files again when they changed
        tracked = type(f"Tracked{connection_class.__name__}",
                       (_WriteTracking, fresh_tls(connection_class)), {})
        _TRACKING[connection_class] = tracked
    return tracked


_TRACKING: dict[type, type] = {}


def topology_client(url: str, *, timeout: float, decode_responses: bool,
                    confirm_writes: bool = False) -> Any:
    """A redis-py asyncio client for a Sentinel or Cluster URL: a ``Redis`` on the current
    master (Sentinel) or a ``RedisCluster``. It connects lazily (the first command) and is
    closed with ``await client.aclose()``, which for Sentinel also closes the connections to
    the Sentinels. Raises ``ValueError`` on a bad URL.

    ``confirm_writes`` (the admin store's client): on Sentinel, the client can confirm that
    the writes of an operation ran on the node the Sentinels name as the master
    (``_ConfirmingSentinelMaster``); the per-request client does not (its class is unchanged)."""
    target = parse_topology_url(url)
    # driver_info=None: no CLIENT SETINFO in each connection's handshake (redis_urls.NO_SETINFO)
    options: dict[str, Any] = dict(decode_responses=decode_responses, socket_timeout=timeout,
                                   socket_connect_timeout=timeout, **NO_SETINFO,
                                   **_given(username=target.username, password=target.password))
    if target.kind == "cluster":
        from redis.asyncio.cluster import ClusterNode
        cls = _cluster_class()
        taken = inspect.signature(cls.__init__).parameters
        tls = {name: value for name, value in target.ssl.items() if name in taken}
        # require_full_coverage=False: a layout with a slot no node serves is taken as it is.
        # Whether the rest of the cluster serves then is the nodes' own choice
        # (cluster-require-full-coverage); redis-py's default refused the whole layout, and
        # every command of every workspace re-read the slots and failed with "All slots are
        # not covered" (503 for ~11% of the healthy slots' requests at 150 in flight).
        cluster = cls(startup_nodes=[ClusterNode(h, p) for h, p in target.nodes],
                      ssl=target.tls, max_connections=CLUSTER_NODE_CONNECTIONS,
                      require_full_coverage=False, **tls, **options)
        if rest := {name: value for name, value in target.ssl.items() if name not in taken}:
            # TLS options RedisCluster does not take as arguments (ssl_ca_path, ssl_password in
            # redis-py 8.1) but every node's SSLConnection does: given to the connection
            # arguments of the seed nodes and of the nodes discovered later, as redis-py adds
            # its own later connection arguments
            cluster.nodes_manager.connection_kwargs.update(rest)
            for node in cluster.nodes_manager.startup_nodes.values():
                node.connection_kwargs.update(rest)
        cluster.try_again_for = timeout
        # every node's connections record the writes (the seed nodes are made already; the
        # nodes found later are made with these arguments, which NodesManager shares)
        tracked = _tracking(cluster.connection_kwargs["connection_class"])
        cluster.connection_kwargs["connection_class"] = tracked
        for node in cluster.nodes_manager.startup_nodes.values():
            node.connection_class = tracked
        return cluster
    from redis.asyncio.sentinel import Sentinel
    # redis-py's default (10 retries with backoff) would hold a request for seconds against a
    # dead node. A few immediate retries, within the store timeout (``_retry``), are what a
    # failover and a server closing connections in rounds need: the first attempt fails on the
    # old master's dead connection, the retry reconnects via the Sentinels to the new one. A
    # timeout is not retried (the command may have run; Retry's default errors include
    # timeouts, and a refund that timed out ran twice when the master caught up).
    options["retry"] = _retry(timeout)
    # The Sentinels' clients likewise: every master connection made asks them for the master,
    # on a pooled connection the Sentinel may have closed (CLIENT KILL, a restart). Without a
    # retry that question failed, the Sentinel counted as not answering and, none left, a new
    # master connection raised MasterNotFoundError: 503 store_unavailable on a healthy group
    # (9-16 of ~2000 requests with keygate's connections killed at the Sentinel and the master).
    # A Sentinel that does not answer (a timeout) is still not retried: the next one is asked.
    sentinel_options: dict[str, Any] = dict(socket_timeout=timeout,
                                            socket_connect_timeout=timeout,
                                            retry=_retry(timeout), **NO_SETINFO,
                                            **_given(username=target.sentinel_username,
                                                     password=target.sentinel_password))
    if target.tls:  # the same TLS options for the Sentinels and for the data nodes
        sentinel_options.update(ssl=True, **target.ssl)
        options.update(ssl=True, **target.ssl)
    # the master's connections record the writes (_WriteTracking); redis-py's pool picks the
    # SSL class from ``ssl`` only when it is not given one
    from redis.asyncio.sentinel import SentinelManagedConnection, SentinelManagedSSLConnection
    options["connection_class"] = _tracking(SentinelManagedSSLConnection if options.pop(
        "ssl", False) else SentinelManagedConnection)
    sentinel = Sentinel(list(target.nodes), sentinel_kwargs=sentinel_options)
    for each in sentinel.sentinels:  # the Sentinels' own connections (``FreshTLS``)
        each.connection_pool.connection_class = fresh_tls(each.connection_pool.connection_class)
    client = sentinel.master_for(target.service, db=target.db,
                                 redis_class=_ConfirmingSentinelMaster if confirm_writes
                                 else _SentinelMaster,
                                 connection_pool_class=_BlockingSentinelPool, **options)
    client._sentinel = sentinel
    return client


_CLUSTER: Any = None
_IN_COMMAND: Any = None  # a ContextVar: set while the cluster client runs a command
# The instant (time.monotonic()) after which the command this task sends can no longer do its
# work: the authorize script's deadline, for a counting call (``TopologyClient``). A command
# answered TRYAGAIN is not sent again past it (a copy run then answers only "late").
TRY_AGAIN_UNTIL: contextvars.ContextVar[float | None] = contextvars.ContextVar(
    "keygate_try_again_until", default=None)


class TryAgainAtOnce:
    """Set (``TRY_AGAIN_AT_ONCE``) around a command that would rather hear ``TRYAGAIN`` at
    once than be sent again every ``TRY_AGAIN_PAUSE`` for the store timeout: an admin write
    whose marker (lua/_once.lua) is a key that never exists before the call, so that for as
    long as its slot migrates, the old owner and the new one answer it ``TRYAGAIN`` (a
    multi-key command, some keys missing). ``unsure`` tells whether the command may have run
    all the same: an attempt of it failed otherwise than by an answer of Redis (a connection
    closed or timed out: redis-py sent it again), so that its ``TRYAGAIN`` may be a copy's."""

    __slots__ = ("unsure",)

    def __init__(self) -> None:
        self.unsure = False


TRY_AGAIN_AT_ONCE: contextvars.ContextVar[TryAgainAtOnce | None] = contextvars.ContextVar(
    "keygate_try_again_at_once", default=None)


def _cluster_class() -> Any:
    """redis-py's ``RedisCluster``, with its nodes' connections handed out most recently
    released first, and never while being closed.

    An ASK redirection (a slot being migrated) is followed by sending ``ASKING`` and then the
    command to the new owner, each through the node's pool; ``ASKING`` holds for the next
    command *on its connection* only. redis-py's node pool hands out the connection released
    longest ago, so with more than one idle connection (any load) the command went out on
    another connection without ``ASKING``: the new owner answered MOVED back to the old one,
    which answered ASK again, until redis-py gave up ("TTL exhausted") and a healthy cluster was
    reported unavailable. Handing out the most recently released connection gives the command
    the very connection ``ASKING`` was sent on (nothing runs in between: both are in one task,
    with no await between the release and the next acquire). The nodes also take their idle
    connections out of the free list while closing them (see ``disconnect_free_connections``),
    and keep them all when one command fails on the node (see
    ``update_active_connections_for_reconnect``).
    Nodes are made by redis-py's NodesManager, so each node this client sends a command to is
    given the subclass's behaviour as it is used (its layout is the same: the subclass adds no
    slots)."""
    global _CLUSTER, _IN_COMMAND
    if _CLUSTER is not None:
        return _CLUSTER
    import contextvars
    _IN_COMMAND = contextvars.ContextVar("keygate_cluster_command", default=False)
    _GIVE_UP_AT = contextvars.ContextVar("keygate_cluster_give_up_at", default=None)
    # True while redis-py's ``RedisCluster._execute_command`` runs (``_Cluster``): there, a
    # node is told to recycle its connections only by its handler of a command's
    # ConnectionError or TimeoutError (see ``_RecentFirstNode``).
    _ON_NODE = contextvars.ContextVar("keygate_cluster_on_node", default=False)
    from redis.asyncio.cluster import ClusterNode, RedisCluster

    import asyncio
    import time

    from redis.exceptions import (RedisClusterException, ResponseError, SlotNotCoveredError,
                                  TryAgainError)

    class _TryAgain(Exception):
        """TRYAGAIN, carried past redis-py's redirection loop (which re-raises other
        exceptions as they are)."""

    class _RecentFirstNode(ClusterNode):
        __slots__ = ()

        def acquire_connection(self) -> Any:
            if self._free:
                return self._free.pop()
            return super().acquire_connection()

        # redis-py 8.1.0 answers a command's ConnectionError or TimeoutError (a reply or a
        # connect past the store timeout, a connection closed under it) by closing every
        # idle connection of the node it was sent to and marking every busy one to be closed
        # once released: "stale state" such as READONLY, which keygate never sets (it reads
        # from primaries only). The failed connection closes itself; the others are no less
        # sound for it. Under load one late reply from a healthy primary (the loop slow to
        # read it) had every connection to it made again, a connect and AUTH on the way of
        # each of its workspace's requests to the store deadline; those connects came late
        # too, and each closed them all again: of 64 connections to the other workspace's
        # primary when a primary was killed at 150 in flight, 1 was kept and 76 made again,
        # and its requests were answered 503. So after a command's error the node's other
        # connections are kept: one to a node that died is at its end and is made again
        # before its next command (``_WriteTracking``), one to a node that stopped answering
        # fails at its own command's timeout. A node dropped from the layout
        # (``NodesManager.set_nodes``) still has its connections closed.
        def update_active_connections_for_reconnect(self) -> None:
            if not _ON_NODE.get():
                super().update_active_connections_for_reconnect()

        async def disconnect_free_connections(self) -> None:
            if _ON_NODE.get():  # a command's error (above)
                return
            # redis-py closes the idle connections (after one failed) while they stay in the
            # free list: a command that took one meanwhile found its writer gone (AttributeError,
            # not retried: a 503 from a healthy node). They leave the list while being closed,
            # and come back to be reconnected on their next use.
            idle = list(self._free)
            self._free.clear()
            try:
                await asyncio.gather(*(c.disconnect() for c in idle), return_exceptions=True)
            finally:
                self._free.extend(idle)

        async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
            try:
                return await super().execute_command(*args, **kwargs)
            except TryAgainError as exc:
                if not _IN_COMMAND.get():
                    raise
                # out of redis-py's redirection loop, which sends it again at most 16 times
                # (~0.4 s): the client's own command waits for the slot (see _Cluster)
                raise _TryAgain(str(exc)) from None

    def recent_first(node: Any) -> Any:
        if node is not None and type(node) is ClusterNode:
            node.__class__ = _RecentFirstNode
        return node

    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import TimeoutError as RedisTimeoutError

    def _closed_under(exc: BaseException) -> bool:
        """Whether a read of the slots failed on connections that failed (closed, reset,
        refused), so that a read made again on fresh ones may succeed. redis-py asks every
        node it knows in turn and, none answering, raises RedisClusterException ("Redis
        Cluster cannot be connected") from the last node's error: a connection error there
        is one. A timeout is not (a node that does not answer is not waited for again)."""
        if isinstance(exc, RedisClusterException):
            exc = exc.__cause__  # type: ignore[assignment]
        return isinstance(exc, RedisConnectionError) and not isinstance(exc, RedisTimeoutError)

    class _GaveUp(RedisConnectionError):
        """A command's retries ended by the store timeout: a connection error that redis-py's
        retry loop does not retry (``ERRORS_ALLOW_RETRY`` is matched by exact type)."""

    from redis.asyncio.cluster import NodesManager

    class _NodesManager(NodesManager):
        __slots__ = ()

        def get_node_from_slot(self, slot: int, *args: Any, **kwargs: Any) -> Any:
            # redis-py 8 keeps the slots in a dict and looks a slot up by index: a slot no
            # node serves raised KeyError (a 500 on the admin path, never retried) instead of
            # its SlotNotCoveredError
            if slot not in self.slots_cache:
                raise SlotNotCoveredError(f'Slot "{slot}" not covered by the cluster.')
            # the node a MOVED redirection sends a command to is looked up here
            return recent_first(super().get_node_from_slot(slot, *args, **kwargs))

        def set_nodes(self, old: Any, new: Any, remove_old: bool = False) -> None:
            # redis-py marks every connection of every node it keeps for reconnection at each
            # read of the slots, in case a node's role changed (a replica's READONLY state).
            # keygate reads from primaries only, and a node that keeps its role keeps its
            # connections: with a primary dead, each read (every ~0.1 s until the promotion)
            # re-made every connection to every healthy node, 74 of 76 to the other
            # workspace's primary during one failover, each a connect and AUTH more on a
            # command of a healthy workspace. A node whose role changed is still recycled.
            same = [(c, c.should_reconnect()) for name, node in new.items()
                    if (kept := old.get(name)) is not None
                    and kept.server_type == node.server_type
                    for c in kept._connections]
            super().set_nodes(old, new, remove_old)
            for connection, marked in same:
                if not marked:
                    connection.reset_should_reconnect()

    class _Cluster(RedisCluster):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            if type(self.nodes_manager) is NodesManager:  # the same layout, one method more
                self.nodes_manager.__class__ = _NodesManager
            # The URL's seeds, kept among the nodes the slots are read from (``initialize``)
            self._seeds = dict(self.nodes_manager.startup_nodes)
            # Node name -> when a connection to it last failed to be made, or when an attempt
            # to see if it answers again began since (``_execute_command``).
            self._refusing: dict[str, float] = {}

        # A timeout is not retried (README: the command may have run). redis-py retries it
        # (10 times by default, each after re-reading the slots): a node that stopped answering
        # held a request for ~11 store timeouts before its 503, and every copy of a command that
        # timed out ran when the node woke (a refund taken back several times). Connection
        # errors, CLUSTERDOWN and an uncovered slot are still retried: a failover needs that.
        ERRORS_ALLOW_RETRY = tuple(e for e in RedisCluster.ERRORS_ALLOW_RETRY
                                   if not issubclass(e, RedisTimeoutError))

        # Seconds a command answered TRYAGAIN is sent again for (topology_client: the store
        # timeout). TRYAGAIN is a multi-key command (every keygate script) in a slot being
        # migrated whose keys are not all on one node; Redis did not run it. redis-py sends it
        # again at most 16 times, 8 of them at once, ~0.4 s in all, then raises "TTL
        # exhausted": a workspace got 503 for as long as a reshard of its slot took beyond
        # that. It is now sent again every TRY_AGAIN_PAUSE until the slot is stable (MOVED/ASK
        # then route it) or the store timeout has passed since the command was first sent.
        try_again_for = 0.0
        TRY_AGAIN_PAUSE = 0.05

        # Times the slots are read again when a connection is closed under the read.
        INITIALIZE_ATTEMPTS = 3

        # Seconds between two reads of the slots asked for by commands that failed on a
        # connection (``initialize``).
        REREAD_GAP = 0.1
        _reads = 0  # reads of the slots begun (numbered from 1)
        _read_done = 0  # the number of the last one ended
        _read_error: Exception | None = None  # what it raised
        _read_end = -1e9  # when it ended (time.monotonic())

        async def initialize(self, additional_startup_nodes_info: Any = None,
                             last_failed_node_name: Any = None) -> Any:
            """redis-py 8.1.0's, with these changes. After a connection error, a command's
            retry first reads the slots (CLUSTER SLOTS, COMMAND) again, and redis-py does that
            before its retry loop's ``try``: a connection closed under that read (``CLIENT
            KILL`` of every client, a node restarting) was the command's error, never retried,
            and answered 503 on a healthy cluster. Such a read is now made again, up to
            ``INITIALIZE_ATTEMPTS`` times, also when every node's connection failed under it
            (redis-py then raises RedisClusterException, "Redis Cluster cannot be connected",
            which the retry once missed: a kill round landing under the read answered 503 to
            every command waiting for it, 3 to 15 per storm of kills at 12 in flight). A read
            that fails no longer closes every node's connections, which other commands were
            using (they failed in turn).

            And only the commands that failed on a connection wait for a read. redis-py has
            every command wait, before its first attempt, for any read asked for: with a
            primary dead, each of its slots' commands failed, asked for a read, and the
            commands of every other workspace queued behind one read after another (one every
            ~20 ms until the replica's promotion, each ~10 ms of this loop's CPU), up to
            ~0.5 s at 150 in flight: answered late, 503 from a healthy primary. A command
            that did not fail on a connection (``last_failed_node_name`` None: its first
            attempt, or a retry after CLUSTERDOWN or an uncovered slot, which ask for reads of
            their own, ``_reread``) now goes on with the slots known, and the read is made in
            the background (one at a time). A command that failed on a connection waits for
            a read begun after it asked, and has its outcome (one read serves all those queued
            during the last, and a read that failed fails them all: no queue of reads one
            after another while the cluster is unreachable), for no longer than its store
            timeout (``_read``).
            Reads are at most one per ``REREAD_GAP`` once the slots are known."""
            if not self._initialize:
                return self
            if last_failed_node_name is None and self.nodes_manager.slots_cache:
                if self._reading is None:
                    self._reading = asyncio.get_running_loop().create_task(
                        self._read_in_background(), context=contextvars.Context())
                return self
            return await self._read(additional_startup_nodes_info, last_failed_node_name)

        _reading: Any = None  # the read made in the background (``initialize``), if any

        async def _read_in_background(self) -> None:
            try:
                await self._read(None, None)
            except Exception:  # not any command's error: the next one that fails asks again
                pass
            finally:
                self._reading = None

        # The read of the slots claimed and not yet ended (``_read``): its task, which ends
        # once the read's outcome is recorded. Nothing else is awaited by those waiting for it.
        _read_task: Any = None

        async def _read(self, additional_startup_nodes_info: Any,
                        last_failed_node_name: Any) -> Any:
            """The outcome of a read of the slots begun after this call: a read's number is
            taken when it begins (after its pause, ``REREAD_GAP``), so a call made while one
            runs waits for the next, and a call made while one pauses is served by it. The
            read runs in a task of its own, one at a time; every call waiting for it awaits
            that task, and all are woken at once when it ends. They once queued on a lock
            instead, to find the read done and leave one per turn of the event loop: with a
            primary dead and 150 requests in flight, ~10 ms a turn under that load, a command
            waited 1.15 s on average for a read long over (1.7 s at most, 0.5 s for the store
            timeout; 3 reads in 2.5 s). A command waits no longer than its give-up time (the
            store timeout since it began): past it, it fails as ``_GaveUp`` at once, the read
            going on for the others."""
            asked = self._reads
            give_up_at = _GIVE_UP_AT.get()
            while self._read_done <= asked:  # no read begun since this call asked has ended
                left = None if give_up_at is None else give_up_at - time.monotonic()
                if left is not None and left <= 0:
                    raise _GaveUp(f"no answer from the cluster within the store timeout "
                                  f"({self.try_again_for:g} s), its slots being read")
                task = self._read_task
                if task is None:
                    task = self._read_task = asyncio.get_running_loop().create_task(
                        self._read_once(additional_startup_nodes_info, last_failed_node_name),
                        context=contextvars.Context())
                await asyncio.wait((task,), timeout=left)
                if task.cancelled() and self._read_done <= asked:  # the client closing
                    raise RedisConnectionError("the read of the cluster's slots was stopped")
            if self._read_error is not None:  # its outcome
                raise self._read_error.with_traceback(None)
            return self

        async def _read_once(self, additional_startup_nodes_info: Any,
                             last_failed_node_name: Any) -> None:
            """One read of the slots (``_read``), its outcome recorded for all who wait."""
            try:
                if self.nodes_manager.slots_cache:
                    pause = self._read_end + self.REREAD_GAP - time.monotonic()
                    if pause > 0:
                        await asyncio.sleep(pause)
                self._reads += 1
                number, self._read_error = self._reads, None
                try:
                    await self._read_attempts(additional_startup_nodes_info,
                                              last_failed_node_name)
                except Exception as exc:
                    self._read_error = exc
                except BaseException:  # cancelled (the client closing): no layout read
                    self._read_error = RedisConnectionError(
                        "the read of the cluster's slots was stopped")
                    raise
                finally:
                    self._read_done, self._read_end = number, time.monotonic()
            finally:
                self._read_task = None

        async def _read_attempts(self, additional_startup_nodes_info: Any,
                                 last_failed_node_name: Any) -> None:
            for attempt in range(self.INITIALIZE_ATTEMPTS):
                if not self._initialize:
                    break
                try:
                    await self.nodes_manager.initialize(
                        additional_startup_nodes_info=additional_startup_nodes_info,
                        last_failed_node_name=last_failed_node_name)
                    # redis-py reads the slots from the nodes it found last time only
                    # (dynamic_startup_nodes), the URL's seeds dropped when the cluster does
                    # not name them: a cluster rebuilt on other addresses behind stable seeds
                    # (a DNS name, a balancer, a redeploy) was never found again, every
                    # request 503 until keygate restarted. They are read from as well.
                    for name, seed in self._seeds.items():
                        self.nodes_manager.startup_nodes.setdefault(name, seed)
                    if not self.commands_parser.commands:
                        # the command table once (COMMAND: ~240 entries to parse, ~10 ms
                        # of this loop's CPU each time the slots were read again)
                        await self.commands_parser.initialize(
                            self.nodes_manager.default_node)
                    self._initialize = False
                except (RedisConnectionError, RedisClusterException) as exc:
                    if attempt == self.INITIALIZE_ATTEMPTS - 1 or not _closed_under(exc):
                        raise
                    await asyncio.sleep(0.01 * 2 ** attempt)

        async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
            """redis-py's, given up on once the store timeout has passed since it began: a
            connection refused (a primary dead until its replica is promoted) is retried 10
            times, each retry after a read of the slots (at most one per ``REREAD_GAP``),
            and a request waited ~1.2 s for its 503 with a 0.5 s store timeout, ~2.7 s with
            150 in flight, whatever the timeout. One ContextVar set and reset per command."""
            if self.try_again_for <= 0:
                return await super().execute_command(*args, **kwargs)
            token = _GIVE_UP_AT.set(time.monotonic() + self.try_again_for)
            try:
                return await super().execute_command(*args, **kwargs)
            finally:
                _GIVE_UP_AT.reset(token)

        async def _execute_command(self, target_node: Any, *args: Any, **kwargs: Any) -> Any:
            give_up_at = _GIVE_UP_AT.get()
            if give_up_at is not None and time.monotonic() >= give_up_at:
                # an attempt after the store timeout (a retry): the command fails as it is,
                # with an error redis-py does not retry (its check is by exact type)
                raise _GaveUp(f"no answer from the cluster within the store timeout "
                              f"({self.try_again_for:g} s), connections failing")
            # A node no connection could be made to (a primary dead, connections refused) is
            # tried by one attempt after each read of the slots, and the others fail at once,
            # nothing sent, to wait for the next read (``_read``). Each read woke every command
            # that waited for it, and each tried the dead node again: ~150 connects refused
            # per read at 150 in flight, several reads a second, the loop's CPU taken from the
            # healthy workspaces (their answers 2.5-6 times fewer, their 503s in the failover
            # test under load). A node that answers again is used from the first attempt that
            # connects; a failover's new primary is another node, tried at once.
            name = target_node.name
            refused = self._refusing.get(name)
            if refused is not None and refused > self._read_end:
                self._initialize = True
                exc = RedisConnectionError(f"no connection to {name} since the cluster's "
                                           f"slots were last read")
                exc.last_failed_node_name = name  # type: ignore[attr-defined]
                raise exc
            if refused is not None:  # this attempt is the one that sees if it answers again
                self._refusing[name] = time.monotonic()
            failed = [False]
            token, on_node = _IN_COMMAND.set(True), _ON_NODE.set(True)
            connecting = _CONNECT_FAILED.set(failed)
            until = time.monotonic() + self.try_again_for
            if give_up_at is not None and give_up_at < until:
                until = give_up_at
            deadline = TRY_AGAIN_UNTIL.get()
            if deadline is not None and deadline < until:  # past it, a copy is only "late"
                until = deadline
            try:
                while True:
                    try:
                        answer = await super()._execute_command(recent_first(target_node),
                                                                *args, **kwargs)
                        if refused is not None:
                            self._refusing.pop(name, None)
                        return answer
                    except _TryAgain as exc:
                        if (time.monotonic() + self.TRY_AGAIN_PAUSE > until
                                or TRY_AGAIN_AT_ONCE.get() is not None):
                            raise TryAgainError(str(exc)) from None
                        await asyncio.sleep(self.TRY_AGAIN_PAUSE)
                        if time.monotonic() >= until:  # the pause overran (a loaded machine)
                            raise TryAgainError(str(exc)) from None
                    except Exception as exc:
                        # not an answer of Redis (a connection closed, a timeout): the
                        # command may have run, and redis-py may send it again. Only
                        # looked at on an error: nothing on a command that succeeds.
                        if not isinstance(exc, ResponseError):
                            at_once = TRY_AGAIN_AT_ONCE.get()
                            if at_once is not None:
                                at_once.unsure = True
                            if failed[0]:  # a connection to a node could not be made
                                failed_on = getattr(exc, "last_failed_node_name", None)
                                if failed_on is not None:
                                    self._refusing[failed_on] = time.monotonic()
                            elif refused is not None:
                                self._refusing.pop(name, None)
                        raise
            finally:
                _CONNECT_FAILED.reset(connecting)
                _ON_NODE.reset(on_node)
                _IN_COMMAND.reset(token)

        # Seconds between two re-reads of the slots asked for by a command's error (CLUSTERDOWN,
        # an uncovered slot, every fifth MOVED): see ``_reread``.
        REREAD_AFTER = 0.5
        _reread_at = -1e9

        def _reread(self) -> bool:
            """Whether the slots may be read again now: at most once per REREAD_AFTER. A slot
            no node serves fails every call of its workspace, and each call asked for a
            re-read: the slots were read again without a pause, and every other workspace's
            commands waited for each read. A layout that changed is learnt within
            REREAD_AFTER all the same (a failover takes the nodes seconds)."""
            now = time.monotonic()
            if now - self._reread_at < self.REREAD_AFTER:
                return False
            self._reread_at = now
            return True

        async def _determine_nodes(self, *args: Any, **kwargs: Any) -> Any:
            try:
                return await super()._determine_nodes(*args, **kwargs)
            except SlotNotCoveredError:
                # no node serves the slot in the layout known: read it again (before the
                # command's retry), so that a slot assigned again is served again
                if self._reread():
                    self._initialize = True
                raise

        async def aclose(self) -> None:
            if not _IN_COMMAND.get():  # closing the client
                from .closing import CLOSE_STEP_TIMEOUT, stop
                reading, self._reading = self._reading, None
                if reading is not None:
                    await stop(reading, CLOSE_STEP_TIMEOUT, "the Cluster slots' reading")
                if self._read_task is not None:  # a read commands wait for (``_read``)
                    await stop(self._read_task, CLOSE_STEP_TIMEOUT,
                               "the Cluster slots' reading")
                await super().aclose()
                return
            if not self._reread():  # read moments ago (``_reread``)
                return
            # redis-py closes the whole client to have the slots read again (every fifth MOVED,
            # CLUSTERDOWN, an uncovered slot): that cut every node's connections, in use ones
            # too, and the commands other requests had in flight on healthy nodes failed
            # (AttributeError, not retried: 503). The slots are read again all the same (before
            # the next command), and the connections are kept: the node answered on them. (They
            # were then re-made as they were released: during a failover's CLUSTERDOWN, every
            # connection to every healthy node, each a connect and AUTH more on a healthy
            # workspace's command.) A node whose role the read finds changed has its
            # connections re-made (``_NodesManager.set_nodes``).
            self._initialize = True

        def get_node(self, host: Any = None, port: Any = None,
                     node_name: Any = None) -> Any:
            # the ASK path looks its target up here
            return recent_first(super().get_node(host, port, node_name))

        def pipeline(self, transaction: Any = None, shard_hint: Any = None) -> Any:
            pipe = super().pipeline(transaction, shard_hint)
            if type(pipe._execution_strategy) is PipelineStrategy:  # one method more
                pipe._execution_strategy.__class__ = _PipelineStrategy
            return pipe

    from redis.asyncio.cluster import PipelineStrategy

    class _PipelineStrategy(PipelineStrategy):
        """redis-py 8.1.0's ``execute`` of a (non-transaction) Cluster pipeline, with
        the command's rules (``_Cluster``). redis-py sent the whole pipeline again after any
        of ``RedisCluster.ERRORS_ALLOW_RETRY``, timeouts included, up to 10 times, each after
        closing every connection of the client, in use or not: with one node paused, a
        workspace listing (a pipeline across the nodes) was 503 only after ~9 store timeouts,
        every copy ran when the node woke, and each retry cut the connections other admin calls
        were using, on healthy nodes (503 for them too). Now a timeout is not retried; a
        connection error, CLUSTERDOWN and an uncovered slot are, as long as the store timeout
        has not passed since the pipeline began; and the slots are read again before the
        retry, the connections kept (``_Cluster.aclose`` within a command)."""

        async def execute(self, raise_on_error: bool = True,
                          allow_redirections: bool = True) -> Any:
            if not self._command_queue:
                return []
            client = self._pipe.cluster_client
            give_up_at = time.monotonic() + client.try_again_for
            token = _IN_COMMAND.set(True)
            try:
                retry_attempts = client.retry.get_retries()
                while True:
                    try:
                        if client._initialize:
                            await client.initialize()
                        return await self._execute(client, self._command_queue,
                                                   raise_on_error=raise_on_error,
                                                   allow_redirections=allow_redirections)
                    except type(client).ERRORS_ALLOW_RETRY:
                        if retry_attempts <= 0 or time.monotonic() + 0.25 >= give_up_at:
                            raise
                        retry_attempts -= 1
                        await client.aclose()  # within a command: the slots read again
                        await asyncio.sleep(0.25)
            finally:
                _IN_COMMAND.reset(token)
                await self.reset()

    _CLUSTER = _Cluster
    return _CLUSTER


# How often a Sentinel client asks the Sentinels which node is the master (one SENTINEL MASTERS
# per client and interval, in the background: nothing per command).
MASTER_CHECK_INTERVAL = 0.5


class _SentinelMaster(Redis):
    """The master of a Sentinel-monitored group; closing it also closes the Sentinel clients.

    redis-py asks the Sentinels for the master only when it opens a connection. After a failover
    the pooled connections still lead to the old master, and the old master takes writes until
    the Sentinels demote it, seconds later (a stalled one: only once it wakes), when its data is
    thrown away: keys created, revocations and counts made there were answered as done and then
    lost. So the client asks the Sentinels every ``MASTER_CHECK_INTERVAL`` in the background;
    idle connections to any other node are dropped and busy ones are closed as they are
    released, so every later command goes to the new master."""
    _sentinel: Any = None
    _watch: Any = None
    # Called (no arguments) when the check finds the Sentinels naming another master than at
    # its last answer: the per-request store then counts again there what the old one took.
    on_new_master: Any = None
    _master_seen: tuple[str, int] | None = None

    async def execute_command(self, *args: Any, **options: Any) -> Any:
        if self._watch is None:
            import asyncio
            self._watch = asyncio.ensure_future(self._follow_master())
        return await super().execute_command(*args, **options)

    async def _follow_master(self) -> None:
        import asyncio
        pool = self.connection_pool
        # Until cancelled, or no longer the client's check: a cancellation that redis-py's
        # ``asyncio.wait_for`` swallowed (``gateway.closing``) ends the loop at its next round
        # all the same, since ``aclose`` has let go of it
        while self._watch is asyncio.current_task():
            await asyncio.sleep(MASTER_CHECK_INTERVAL)
            try:
                master = await pool.get_master_address()
            except Exception:  # no Sentinel answers, or none knows a master: commands say so
                continue
            if master != self._master_seen:
                if self._master_seen is not None and self.on_new_master is not None:
                    self.on_new_master()
                self._master_seen = master
            await self._move_off_all_but(master)

    async def _move_off_all_but(self, master: tuple[str, int]) -> None:
        """Drop the idle connections to any node but ``master``; close the busy ones as they
        are released."""
        import asyncio
        pool = self.connection_pool
        # No await from here to the gather: a connection is handed out synchronously, so none
        # changes hands while this looks. (Comparing with the address the pool knew would
        # miss a change a new connection learned first: redis-py then closes only the idle
        # connections, and the busy ones went back to the pool still on the old master.)
        stale = [c for c in pool._available_connections
                 if c.is_connected and (c.host, c.port) != master]
        if stale:
            pool._available_connections[:] = [c for c in pool._available_connections
                                              if c not in stale]
        for c in pool._in_use_connections:
            if c.is_connected and (c.host, c.port) != master:
                c.mark_for_reconnect()  # closed as it is released
        if stale:
            await asyncio.gather(*(c.disconnect() for c in stale), return_exceptions=True)

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        """Each step bounded (``gateway.closing``): a step that does not end in time is logged
        and left, and the next one is taken. The master check was once waited for without a
        bound, and a cancellation redis-py swallowed (it arrived as the check's question to the
        Sentinel had just been written) kept it running: the close, and the gateway's stop,
        hung for ever."""
        from .closing import CLOSE_STEP_TIMEOUT, bounded, stop
        watch, self._watch = self._watch, None
        if watch is not None:
            await stop(watch, CLOSE_STEP_TIMEOUT, "the Sentinel client's master check")
        try:
            await bounded(super().aclose(close_connection_pool), CLOSE_STEP_TIMEOUT,
                          "closing the connections to the Sentinel master")
        finally:
            if self._sentinel is not None:
                await bounded(self._sentinel.aclose(), CLOSE_STEP_TIMEOUT,
                              "closing the connections to the Sentinels")


# The nodes (host, port) the commands of the admin operation under way ran on: a set while
# ``_ConfirmingSentinelMaster.writes_confirmed`` runs in this task, else None.
_RAN_ON: contextvars.ContextVar[set[tuple[str, int]] | None] = contextvars.ContextVar(
    "keygate_admin_ran_on", default=None)


class MasterNotConfirmed(RedisError):
    """An operation's writes ran on a node the Sentinels do not (or not all) name as the master,
    or no Sentinel answered: they may be thrown away with that node. The store answers 503
    ("the change could not be confirmed")."""


class _ConfirmingSentinelMaster(_SentinelMaster):
    """The admin store's Sentinel client: an operation run in ``writes_confirmed()`` succeeds
    only if, after its last command, the Sentinels still name the node its commands ran on as
    the master.

    The background check (``_SentinelMaster``) moves connections off a demoted master only up
    to ``MASTER_CHECK_INTERVAL`` after the Sentinels promote another node, and a command already
    in a stalled master's socket buffer runs there when it wakes, whatever the client does: the
    old master takes it (it is demoted only seconds later) and answers OK, then its data is
    thrown away. A key answered 201 was then unknown, a revocation answered 200 undone.

    So the node each command ran on is recorded (redis-py's ``_send_command_parse_response``,
    overridden: the one place the borrowed connection, so the node that answered, is known; a
    command sent again after a connection error is recorded where it finally ran), and once the
    operation is done every Sentinel is asked ``SENTINEL GET-MASTER-ADDR-BY-NAME`` and
    ``SENTINEL MASTER``. Confirmed only if at least one Sentinel answers, every one that answers
    names that one node, and none sees it down or is failing it over (``s_down``, ``o_down``,
    ``failover_in_progress``: the leader of a failover goes on naming the old master until the
    replica it promoted reports itself master, and a write may run on the old master meanwhile).

    The race: the write runs on node N at t1, the Sentinels are asked at t2 > t1. A write that
    ran on N after another node was promoted is refused, since from the promotion on the leading
    Sentinel either shows the failover under way or names the new master (so would every other
    Sentinel that answers once it has learnt the new configuration; one that has not, answering
    alone while the others are unreachable, is what can still confirm wrongly). A write that ran
    before the promotion is the replicas' business: lost if it had not reached the promoted
    replica (``min-replicas-to-write``), refused though it holds if the promotion came between
    t1 and t2 (503 says "could not be confirmed"; admin writes can be repeated). A refusal
    because a Sentinel names another node moves the idle connections there at once."""

    async def _send_command_parse_response(self, conn: Any, command_name: Any, *args: Any,
                                           **options: Any) -> Any:
        reply = await super()._send_command_parse_response(conn, command_name, *args, **options)
        nodes = _RAN_ON.get()
        if nodes is not None:
            nodes.add((conn.host, int(conn.port)))
        return reply

    @contextlib.asynccontextmanager
    async def writes_confirmed(self) -> Any:
        """Run the block's commands, then raise ``MasterNotConfirmed`` unless the Sentinels
        confirm the node they ran on as the master. Not confirmed when the block raises (the
        operation failed anyway). Nested: the outer block confirms the inner one's commands."""
        if _RAN_ON.get() is not None:
            yield
            return
        nodes: set[tuple[str, int]] = set()
        token = _RAN_ON.set(nodes)
        try:
            yield
        finally:
            _RAN_ON.reset(token)
        await self.confirm_master(nodes)

    async def confirm_master(self, nodes: set[tuple[str, int]]) -> None:
        if not nodes:
            return
        node, *others = sorted(nodes)
        for other in others:  # one node named in two forms (IP, hostname) is one node
            if not await _same_node(other, node):
                raise MasterNotConfirmed(f"an operation's commands ran on {len(nodes)} nodes "
                                         "(a failover while it ran)")
        import asyncio

        from redis.utils import str_if_bytes
        service = self.connection_pool.service_name

        async def ask(sentinel: Any) -> tuple[Any, Any]:
            # GET-MASTER-ADDR-BY-NAME names the promoted node as soon as a failover has promoted
            # it; MASTER's address changes only once the failover is over, and its flags tell
            # a failover under way (the old master then still named by address)
            try:
                return (await sentinel.sentinel_get_master_addr_by_name(service),
                        await sentinel.sentinel_master(service))
            except RedisConnectionError:
                # A pooled connection the Sentinel closed (CLIENT KILL, a restart, its idle
                # timeout) fails its first command, and the Sentinel clients do not retry:
                # asked once more, on a connection made again (a timeout is not a
                # ConnectionError: a Sentinel that does not answer is not waited for twice)
                return (await sentinel.sentinel_get_master_addr_by_name(service),
                        await sentinel.sentinel_master(service))

        answers = await asyncio.gather(*(ask(s) for s in self._sentinel.sentinels),
                                       return_exceptions=True)
        answers = [a for a in answers if isinstance(a, tuple) and a[0] and isinstance(a[1], dict)]
        if not answers:
            raise MasterNotConfirmed("no Sentinel answered which node is the master")
        for addr, state in answers:
            named = (str_if_bytes(addr[0]), int(addr[1]))
            if not await _same_node(named, node):
                await self._move_off_all_but(named)  # the later writes go there at once
                raise MasterNotConfirmed(f"the write ran on {node[0]}:{node[1]}, which a "
                                         f"Sentinel no longer names as the master "
                                         f"({named[0]}:{named[1]} is)")
            flags = state.get("flags", "")
            flags = set(flags.split(",")) if isinstance(flags, str) else set(flags)
            if flags & {"s_down", "o_down", "failover_in_progress"}:
                raise MasterNotConfirmed(f"the write ran on {node[0]}:{node[1]}, which a "
                                         f"Sentinel sees down or is failing over "
                                         f"({','.join(sorted(flags))})")


async def _same_node(a: tuple[str, int], b: tuple[str, int]) -> bool:
    """Whether two (host, port) name one node. Sentinels of one group may name the master in
    different forms (one given its IP, another its hostname with ``announce-hostnames yes``,
    until a failover makes them agree): the same port and a resolved address in common is the
    same node. Resolved only when the forms differ (never for a different port)."""
    if a == b:
        return True
    if a[1] != b[1]:
        return False
    import asyncio
    import socket
    loop = asyncio.get_running_loop()
    try:
        found = await asyncio.gather(*(loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
                                       for host, port in (a, b)))
    except (OSError, UnicodeError):
        return False
    first, second = ({info[4][0] for info in infos} for infos in found)
    return bool(first & second)
