"""Which local process opened each intercepted connection (pid, name, exe, cmdline, user, tool,
parent chain), contributed to the record as `process`.

The question is asked the moment the connection is accepted (`client_connected`), while the
client surely still exists, and answered by the root supervisor (llmtap.proclookup) over the
socketpair it made before forking this worker. Nothing waits for the answer: it lands in the
flows of that connection when it comes (well before their responses, in practice).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from llmtap.flow import Process, fields
from mitmproxy import connection, http

log = logging.getLogger(__name__)

MAX_MESSAGE = 64 * 1024
KEEP = 4096  # answers (and waiting flows) kept, per client connection, oldest dropped first


class Attribution:
    def __init__(self, channel: socket.socket | None = None,
                 resolve: Callable[[dict[str, Any]], Process | None] | None = None) -> None:
        self.channel = channel  # the worker's end of the supervisor's lookup service
        # Where there is no supervisor (Windows): the same question answered in this process,
        # on a worker thread (llmtap.platform.windows.attribution).
        self.resolve = resolve
        self.asked = 0
        self.answered = 0
        self.unanswered = 0  # the request could not be sent (the service is gone or busy)
        self._answers: OrderedDict[str, Process | None] = OrderedDict()
        self._waiting: dict[str, list[http.HTTPFlow]] = {}
        self._pending: OrderedDict[str, asyncio.Future[Process | None]] = OrderedDict()
        self._reader_fd = -1

    def running(self) -> None:
        if self.channel is None:
            return
        self.channel.setblocking(False)
        loop = asyncio.get_running_loop()
        self._reader_fd = self.channel.fileno()
        loop.add_reader(self._reader_fd, self._receive)

    def client_connected(self, client: connection.Client) -> None:
        if (self.channel is None and self.resolve is None) or not client.peername:
            return
        ip, port = client.peername[0], client.peername[1]
        question: dict[str, Any] = {"id": client.id, "ip": ip, "port": port}
        # What the client's socket is connected to (in transparent mode, the original
        # destination) lets the supervisor look the socket up by its exact addresses.
        if client.sockname and client.sockname[0]:
            question |= {"remote_ip": client.sockname[0], "remote_port": client.sockname[1]}
        if not self._ask(question):
            return
        with contextlib.suppress(RuntimeError):  # no loop (unit tests): nobody will wait
            self._pending[client.id] = asyncio.get_running_loop().create_future()
            while len(self._pending) > KEEP:
                self._pending.popitem(last=False)

    def _ask(self, question: dict[str, Any]) -> bool:
        if self.resolve is not None:
            return self._ask_in_process(question)
        assert self.channel is not None
        try:
            self.channel.send(json.dumps(question).encode())
            self.asked += 1
        except OSError:  # BlockingIOError too: never wait on the proxy's loop
            self.unanswered += 1
            return False
        return True

    def _ask_in_process(self, question: dict[str, Any]) -> bool:
        resolve, client_id = self.resolve, str(question["id"])
        assert resolve is not None
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop (unit tests): answered at once
            self.asked += 1
            self._answer(client_id, resolve(question))
            return False

        def done(answer: asyncio.Future[Process | None]) -> None:
            failed = answer.cancelled() or answer.exception() is not None
            self._answer(client_id, None if failed else answer.result())

        self.asked += 1
        loop.run_in_executor(None, resolve, question).add_done_callback(done)
        return True

    def _receive(self) -> None:
        assert self.channel is not None
        while True:
            try:
                message = self.channel.recv(MAX_MESSAGE)
            except BlockingIOError:
                return
            except OSError:
                self._stop_reading()
                return
            if not message:
                self._stop_reading()  # the supervisor is gone
                return
            with contextlib.suppress(ValueError, AttributeError):
                reply = json.loads(message)
                self._answer(str(reply.get("id")), reply.get("process"))

    def _stop_reading(self) -> None:
        if self._reader_fd >= 0:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(self._reader_fd)
            self._reader_fd = -1

    def _answer(self, client_id: str, process: Process | None) -> None:
        self.answered += 1
        self._answers[client_id] = process
        while len(self._answers) > KEEP:
            self._answers.popitem(last=False)
        for flow in self._waiting.pop(client_id, []):
            fields(flow)["process"] = process
        future = self._pending.pop(client_id, None)
        if future is not None and not future.done():
            future.set_result(process)

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        client_id = flow.client_conn.id
        if client_id in self._answers:
            fields(flow)["process"] = self._answers[client_id]
        elif self.channel is not None or self.resolve is not None:
            self._waiting.setdefault(client_id, []).append(flow)
            while len(self._waiting) > KEEP:
                self._waiting.pop(next(iter(self._waiting)))

    def client_disconnected(self, client: connection.Client) -> None:
        self._waiting.pop(client.id, None)

    def pending(self, flow: http.HTTPFlow) -> asyncio.Future[Process | None] | None:
        """The answer still to come for this flow's connection (the recorder waits for it,
        off the hot path), or None when it is known or will never come."""
        future = self._pending.get(flow.client_conn.id)
        return future if future is not None and not future.done() else None

    def process_of(self, flow: http.HTTPFlow) -> Process | None:
        """What is known so far (for the live view)."""
        return self._answers.get(flow.client_conn.id)

    def done(self) -> None:
        self._stop_reading()
