"""Run an app with uvicorn on a background thread of this process (tests, benchmarks, notebooks).

The socket is bound before the thread starts, so port 0 picks a free port and `url` is known at
once; leaving the `with` block shuts the server down (the scheduler stops with the app).

The socket is made with its protocol named (IPPROTO_TCP): asyncio turns Nagle's algorithm off
only on connections whose socket says so, and `socket.create_server` leaves it 0. With Nagle on,
every response written as headers then body (each SSE chunk too) waited ~40 ms for the client's
delayed acknowledgement: a 1 ms request took 44 ms. `uvicorn.run(host=, port=)` binds through
asyncio and was never affected.
"""

from __future__ import annotations

import socket
import threading
import time
from types import TracebackType

import uvicorn
from fastapi import FastAPI

from ktinject.errors import KtinjectError

START_TIMEOUT_S = 60.0


class BackgroundServer:
    def __init__(self, app: FastAPI, *, host: str = "127.0.0.1", port: int = 0) -> None:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
        )[0]
        self.socket = socket.socket(family, kind, proto)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.socket.bind(address)
        self.socket.listen()
        self.host, self.port = self.socket.getsockname()[:2]
        config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.socket]}, daemon=True
        )

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __enter__(self) -> BackgroundServer:
        self.thread.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise KtinjectError(f"The server on {self.url} did not start; see its log.")
            time.sleep(0.01)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.server.should_exit = True
        self.thread.join()
        self.socket.close()
