"""Loopback TCP relays in front of real redis-server ports, for tests that need to see or cut
what passes between keygate and Redis (TLS in front of a plain server, connections closed under
a command). Each relay serves from an event loop of its own, in a thread: the fixtures wait on
Redis synchronously while a Sentinel or a cluster reaches the nodes through the relay."""

from __future__ import annotations

import asyncio
import socket
import threading
from typing import Any


class ThreadedRelay:
    """The listeners, the loop thread and the tasks; a subclass serves each connection
    (``_accept``) and pumps bytes (``pump``)."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.listeners: list[socket.socket] = []
        self.tasks: set[asyncio.Task] = set()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def listen(self, port: int | None, backlog: int, accept: Any) -> int:
        """A listener on ``port`` (or a free one) whose connections ``accept(listener)``, a
        coroutine run on the relay's loop, takes. Returns its port."""
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", port or 0))
        listener.listen(backlog)
        listener.setblocking(False)
        self.listeners.append(listener)
        self.loop.call_soon_threadsafe(self._spawn, accept(listener))
        return listener.getsockname()[1]

    def _spawn(self, coro: Any) -> asyncio.Task:
        task = self.loop.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    @staticmethod
    async def pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                   errors: tuple[type[BaseException], ...] = (OSError, ConnectionError),
                   cut: Any = None) -> None:
        """Copy ``reader`` to ``writer`` until either ends; with ``cut``, a chunk for which
        ``cut(data)`` is true is not passed on and ends the copy."""
        try:
            while data := await reader.read(65536):
                if cut is not None and cut(data):
                    return
                writer.write(data)
                await writer.drain()
        except errors:
            pass
        finally:
            writer.close()

    @staticmethod
    async def cancel_all(tasks: set[asyncio.Task]) -> None:
        """Cancel ``tasks`` until every one has ended. Once is not enough on Python 3.11: a
        cancellation that lands as the future a ``wait_for`` (or a handshake's timeout) waits
        on completes is swallowed, and the task goes on relaying; the caller then waited its
        full ten seconds and failed."""
        while pending := [task for task in tasks if not task.done()]:
            for task in pending:
                task.cancel()
            await asyncio.wait(pending, timeout=0.1)

    def close(self) -> None:
        async def stop() -> None:
            await self.cancel_all(self.tasks)
            for listener in self.listeners:
                listener.close()
        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
