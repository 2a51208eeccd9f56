"""A TCP proxy in front of a real server (MLflow, Redis) that can go down (port closed) and come
back, or slow every chunk down: a real outage and a real slow network, for tests and the
lifecycle simulation."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from types import TracebackType
from typing import Self


class FaultyProxy:
    """``127.0.0.1:port`` -> ``target``; ``down()`` stops listening (connection refused) and cuts
    open connections, ``up()`` listens again on the same port; ``delay_seconds`` slows each
    client-to-server chunk (each HTTP request), ``reply_delay_seconds`` each server-to-client
    one (the request has had its effect; its answer is late). A chunk held back when ``down()``
    is called is dropped, never delivered: a kill test cuts the proxy, then kills the client.

    The port is the kernel's pick (bind to port 0) and stays bound while the proxy is down, by a
    socket that does not listen (a connection to it is refused): no other process can take it
    between ``down()`` and ``up()``."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.delay_seconds = 0.0
        self.reply_delay_seconds = 0.0
        self.connections = 0
        self._listener: socket.socket | None = None
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        held = self._bind(0)
        self.port: int = held.getsockname()[1]
        self._held: socket.socket | None = held

    @staticmethod
    def _bind(port: int) -> socket.socket:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))
        return sock

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def up(self) -> Self:
        listener, self._held = self._held or self._bind(self.port), None
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()
        return self

    def down(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            # On Linux, close() alone does not wake a blocked accept(): the port would stay open.
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()
            # Hold the port at once (the window is this line, not the whole outage).
            self._held = self._bind(self.port)
        with self._lock:
            for sock in self._sockets:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()
            self._sockets.clear()

    def __enter__(self) -> Self:
        return self.up()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.down()
        self.close()

    def close(self) -> None:
        """Give the port back (after ``down()``)."""
        held, self._held = self._held, None
        if held is not None:
            held.close()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target)
            except OSError:
                client.close()
                continue
            with self._lock:
                self.connections += 1
                self._sockets += [client, upstream]
            threading.Thread(target=self._pipe, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, False), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket, to_server: bool) -> None:
        try:
            while True:
                data = source.recv(65536)
                if not data:
                    break
                delay = self.delay_seconds if to_server else self.reply_delay_seconds
                if delay:
                    time.sleep(delay)
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
