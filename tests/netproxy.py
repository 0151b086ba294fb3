"""A loopback TCP proxy that a test can cut (connection refused) or make hold responses.

Used in front of moto's S3 server: ``down()`` is an S3 outage (the port refuses connections),
``hold()`` lets requests reach the server but keeps the answers back, which is the window
between an object being stored and the agent learning it was (kill -9 goes there).
``drop_replies()`` forwards every request but throws each answer away and cuts the
connection: the store did the work, the client saw a reset (an ambiguous failure).
"""

from __future__ import annotations

import contextlib
import socket
import threading


class Proxy:
    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self._listener: socket.socket | None = None
        self.port = 0
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._release = threading.Event()
        self._release.set()
        self._drop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.up()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def up(self) -> None:
        lst = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        lst.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        lst.bind(("127.0.0.1", self.port))
        lst.listen(64)
        self.port = lst.getsockname()[1]
        self._listener = lst
        t = threading.Thread(target=self._accept, args=(lst,), daemon=True, name="proxy-accept")
        t.start()
        self._threads.append(t)

    def down(self) -> None:
        """Refuse new connections and cut the open ones."""
        lst, self._listener = self._listener, None
        if lst is not None:
            with contextlib.suppress(OSError):
                lst.shutdown(socket.SHUT_RDWR)
            lst.close()
        with self._lock:
            conns, self._conns = self._conns, set()
        for c in conns:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)
            c.close()

    def hold(self) -> None:
        self._release.clear()

    def release(self) -> None:
        self._release.set()

    def drop_replies(self, on: bool = True) -> None:
        if on:
            self._drop.set()
        else:
            self._drop.clear()

    def close(self) -> None:
        self.release()
        self.down()
        for t in self._threads:
            t.join(timeout=5)

    def _accept(self, lst: socket.socket) -> None:
        while True:
            try:
                client, _ = lst.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.upstream, timeout=5)
            except OSError:
                client.close()
                continue
            server.settimeout(None)
            with self._lock:
                self._conns.update((client, server))
            for src, dst, gated in ((client, server, False), (server, client, True)):
                t = threading.Thread(target=self._pump, args=(src, dst, gated), daemon=True)
                t.start()

    def _pump(self, src: socket.socket, dst: socket.socket, gated: bool) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if gated and self._drop.is_set() and not data.startswith(b"HTTP/1.1 100 "):
                    break  # the answer is lost (an interim 100 Continue is not the answer)
                if gated:
                    while not self._release.wait(0.05):
                        if src.fileno() < 0:
                            return
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()
                with self._lock:
                    self._conns.discard(s)
