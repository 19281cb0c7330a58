"""The QMP session, on QEMU's own :mod:`qemu.qmp` library.

One connection per QEMU process, kept open for its life; commands get one reply per id;
events come from a listener (never polling). Errors become :class:`~vmkit.errors.QemuError`
carrying QEMU's own description.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import AsyncIterator
from typing import Any

from qemu.qmp import EventListener, ExecuteError, QMPClient, QMPError, Runstate

from vmkit.errors import QemuError

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 30.0


class Monitor:
    def __init__(self, name: str) -> None:
        self._client = QMPClient(name)
        self._client.logger.setLevel(logging.WARNING)
        self.greeting: dict[str, Any] = {}

    async def connect(self, sock: socket.socket, timeout: float = DEFAULT_TIMEOUT) -> None:
        try:
            await asyncio.wait_for(self._client.connect(sock), timeout)
        except (QMPError, OSError, TimeoutError) as exc:
            raise QemuError(f"could not open the QMP session: {exc}") from exc
        greeting = self._client.greeting
        if greeting is not None:
            self.greeting = greeting._asdict()

    @property
    def qemu_version(self) -> str:
        v = self.greeting.get("QMP", {}).get("version", {}).get("qemu", {})
        return f"{v.get('major', '?')}.{v.get('minor', '?')}.{v.get('micro', '?')}"

    async def execute(self, command: str, arguments: dict[str, Any] | None = None,
                      timeout: float = DEFAULT_TIMEOUT) -> Any:
        try:
            return await asyncio.wait_for(self._client.execute(command, arguments), timeout)
        except ExecuteError as exc:
            raise QemuError(f"QEMU refused {command}: {exc.error.error.desc}") from exc
        except TimeoutError as exc:
            raise QemuError(f"QEMU did not answer {command} within {timeout:.0f} s") from exc
        except (QMPError, OSError, EOFError) as exc:
            raise QemuError(f"QMP {command} failed: {exc}") from exc

    def send_fd(self, fd: int) -> None:
        """Pass a file descriptor to QEMU (for ``getfd``)."""
        self._client.send_fd_scm(fd)

    async def events(self) -> AsyncIterator[dict[str, Any]]:
        """Every QMP event, in order, until the session ends."""
        listener = EventListener()
        with self._client.listen(listener):
            while True:
                disconnected = asyncio.ensure_future(self._client.runstate_changed())
                get = asyncio.ensure_future(listener.get())
                try:
                    done, _ = await asyncio.wait({disconnected, get}, return_when=asyncio.FIRST_COMPLETED)
                finally:  # also when the consumer is cancelled: no task is left pending
                    disconnected.cancel()
                    if not get.done():
                        get.cancel()
                if get in done:
                    yield dict(get.result())
                    continue
                if self._client.runstate != Runstate.RUNNING:
                    for event in listener.clear():  # what arrived before the session ended
                        yield dict(event)
                    return

    async def close(self) -> None:
        try:
            await self._client.disconnect()
        except (QMPError, OSError, EOFError) as exc:
            log.debug("QMP disconnect: %s", exc)
