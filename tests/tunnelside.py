"""The worker's side of a job's listen-port tunnel, without a server: what xwhep.worker.tunnel does when a stream
arrives for (task, port), for tests that reach a port inside a job (native or VM) through the real forwarder.

``JobPort(sockdir, port).connect()`` waits for one of the forwarder's idle connections on ``listen-PORT.sock``,
tells it ``C`` and returns the job's own TCP connection handed back with ``F`` (or raises ``ConnectionRefusedError``
on ``R``). ``TcpBridge`` puts a 127.0.0.1 TCP port in front of it, for clients such as ``ssh``.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from pathlib import Path

from xwhep.worker.tunnel import _unix_listener


class JobPort:
    def __init__(self, sockdir: Path, port: int) -> None:
        self.listener = _unix_listener(sockdir, f"listen-{port}.sock")
        self.listener.setblocking(True)
        self.port = port

    def connect(self, timeout: float = 30.0) -> socket.socket:
        """The job's connection to its port (through the forwarder's next idle connection)."""
        self.listener.settimeout(timeout)
        conn, _ = self.listener.accept()
        with conn:
            conn.settimeout(timeout)
            conn.sendall(b"C")
            data, fds, _, _ = socket.recv_fds(conn, 1, 4)
        if data == b"F" and fds:
            for extra in fds[1:]:
                socket.socket(fileno=extra).close()
            return socket.socket(fileno=fds[0])
        for fd in fds:
            socket.socket(fileno=fd).close()
        raise ConnectionRefusedError(f"the forwarder answered {data!r} for port {self.port}")

    def close(self) -> None:
        self.listener.close()


def _pump(src: socket.socket, dst: socket.socket) -> None:
    try:
        while data := src.recv(65536):
            dst.sendall(data)
        dst.shutdown(socket.SHUT_WR)
    except OSError:
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_RDWR)


class TcpBridge:
    """127.0.0.1:``port`` → the job's port, one forwarder connection per client connection."""

    def __init__(self, job_port: JobPort) -> None:
        self.job_port = job_port
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            threading.Thread(target=self._one, args=(client,), daemon=True).start()

    def _one(self, client: socket.socket) -> None:
        try:
            job = self.job_port.connect()
        except OSError:
            client.close()
            return
        t = threading.Thread(target=_pump, args=(job, client), daemon=True)
        t.start()
        _pump(client, job)
        t.join()
        job.close()
        client.close()

    def close(self) -> None:
        self.server.close()
        self.job_port.close()
