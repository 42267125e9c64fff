"""A local TCP proxy that can hold its connections half-open (tests and bench/faults.py).

``FaultProxy(target_port).start()`` listens on 127.0.0.1 and forwards every
connection to the target. ``freeze()`` stops forwarding on the connections open
now, in both directions, *without closing them*: each end's socket stays open
and sees nothing, exactly what a client sees when the broker's host loses power
or a NAT box drops its mapping (no FIN, no RST). New connections after a freeze
are forwarded normally (the broker itself is fine), unless ``block_new`` is set.
``cut()`` closes everything at once (a reset).
"""

from __future__ import annotations

import selectors
import socket
import threading


class FaultProxy:
    def __init__(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self._listen = socket.socket()
        self._listen.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listen.bind(("127.0.0.1", 0))
        self._listen.listen(64)
        self.port = self._listen.getsockname()[1]
        self._lock = threading.Lock()
        self._pairs: list[tuple[socket.socket, socket.socket, threading.Event]] = []
        self._stop = threading.Event()
        self.block_new = False
        self.accepted = 0

    def start(self) -> FaultProxy:
        threading.Thread(target=self._accept, name="faultproxy", daemon=True).start()
        return self

    def _accept(self) -> None:
        self._listen.settimeout(0.2)
        while not self._stop.is_set():
            try:
                client, _ = self._listen.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            if self.block_new:
                client.close()
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            frozen = threading.Event()
            with self._lock:
                self._pairs.append((client, upstream, frozen))
                self.accepted += 1
            threading.Thread(target=self._pump, args=(client, upstream, frozen),
                             daemon=True).start()

    def _pump(self, a: socket.socket, b: socket.socket, frozen: threading.Event) -> None:
        sel = selectors.DefaultSelector()
        sel.register(a, selectors.EVENT_READ, b)
        sel.register(b, selectors.EVENT_READ, a)
        try:
            while not self._stop.is_set():
                if frozen.is_set():  # half-open: hold both sockets, move nothing
                    if self._stop.wait(0.2):
                        break
                    continue
                for key, _ in sel.select(0.2):
                    if frozen.is_set():
                        break
                    try:
                        data = key.fileobj.recv(65536)
                    except OSError:
                        data = b""
                    if not data:
                        return
                    key.data.sendall(data)
        except OSError:
            pass
        finally:
            sel.close()
            if not frozen.is_set():
                a.close()
                b.close()

    def freeze(self) -> int:
        """Hold every open connection half-open; how many."""
        with self._lock:
            for _, _, frozen in self._pairs:
                frozen.set()
            return len(self._pairs)

    def cut(self) -> None:
        with self._lock:
            pairs, self._pairs = self._pairs, []
        for a, b, _ in pairs:
            for s in (a, b):
                try:
                    s.close()
                except OSError:
                    pass

    def stop(self) -> None:
        self._stop.set()
        self._listen.close()
        self.cut()
