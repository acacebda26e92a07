"""xwfwd: the tunnel forwarder that runs *inside* a job's sandbox, as the parent of the job.

    python3 -I -S /xw/sockets/xwfwd.py --sockets /xw/sockets [--listen 8080,8081] [--forward 1234] -- JOB ARGV…

The sandbox keeps its own network namespace with only ``lo``: the job reaches nothing outside. This script is the
only bridge, and only through Unix sockets the *worker* listens on (the worker never connects into the sandbox,
so nothing the job puts in the socket directory can redirect it):

* listen port P: it keeps a few idle connections to ``listen-P.sock``; when the worker writes ``C`` on one (a
  client opened a stream), it connects to ``127.0.0.1:P`` (then ``[::1]:P``) and answers ``F`` with that
  connection attached (``SCM_RIGHTS``: the worker then reads and writes the job's connection itself), or
  answers ``R`` and closes when nothing listens there;
* forward port P: it listens on ``127.0.0.1:P`` (and ``[::1]:P``); each connection of the job is passed, as
  ``F`` with the connection attached, on a new connection to ``fwd-P.sock``; the worker answers ``K`` (the
  stream to the forward address is open) or ``R`` and a reason line (printed on the job's stderr).

Handing the connections over takes this process off the data path (it was a hop of its own: two more copies
per byte). The worker only ever gets connected TCP sockets of the sandbox's own namespace, which give it no
access to anything the job could not reach itself. Where ``socket.send_fds`` is missing (Python < 3.9), it
answers ``K`` instead and relays with ``splice(2)`` (one blocking thread per direction; half-closes passed on).

The job is started once the forward ports listen, with the same stdin/stdout/stderr and environment. When it
exits, streams in flight get a short grace period, then this script exits with the job's status (128+N for
signal N); the sandbox's pid namespace then kills anything left. Standard library only: it runs on whatever
``python3`` the worker's system has.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import queue
import selectors
import socket
import subprocess
import sys
import threading
import time

CHUNK = 1 << 20
POOL = 4  # idle connections kept per listen port: new streams never wait for a connect
GRACE = 1.0  # seconds streams in flight may still flush after the job exited
HAND_OVER = hasattr(socket, "send_fds")  # pass the job's connections to the worker (else relay them here)

_active = 0
_active_lock = threading.Lock()
_refill: queue.Queue[tuple[str, int]] = queue.Queue()
_threads = concurrent.futures.ThreadPoolExecutor(max_workers=512, thread_name_prefix="xwfwd")


def log(msg: str) -> None:
    print(f"xwfwd: {msg}", file=sys.stderr, flush=True)


def _spawn(target: object, *args: object) -> None:
    threading.Thread(target=target, args=args, daemon=True).start()  # type: ignore[arg-type]


def _pipe() -> tuple[int, int]:
    r, w = os.pipe()
    with contextlib.suppress(OSError, AttributeError):  # a bigger pipe: fewer system calls per MiB
        import fcntl

        fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, CHUNK)
    return r, w


def _copy(src: socket.socket, dst: socket.socket) -> None:
    """src → dst until EOF (then half-close dst); raises OSError on a failure."""
    if hasattr(os, "splice"):
        r, w = _pipe()
        try:
            while True:
                n = os.splice(src.fileno(), w, CHUNK)
                if n == 0:
                    break
                while n:
                    n -= os.splice(r, dst.fileno(), n)
        finally:
            os.close(r)
            os.close(w)
    else:  # no splice(2): copy through a buffer
        buf = memoryview(bytearray(CHUNK))
        while True:
            n = src.recv_into(buf)
            if n == 0:
                break
            dst.sendall(buf[:n])
    dst.shutdown(socket.SHUT_WR)


def _kill(*socks: socket.socket) -> None:
    for s in socks:
        with contextlib.suppress(OSError):
            s.shutdown(socket.SHUT_RDWR)


def bridge(a: socket.socket, b: socket.socket) -> None:
    """Relay both ways until both ended; an error on either side resets both."""
    global _active
    with _active_lock:
        _active += 1

    def one(src: socket.socket, dst: socket.socket) -> None:
        try:
            _copy(src, dst)
        except OSError:
            _kill(a, b)

    # the other direction runs on a pooled thread: starting a thread costs a context switch on the first bytes
    other = _threads.submit(one, b, a)
    one(a, b)
    other.result()
    for s in (a, b):
        s.close()
    with _active_lock:
        _active -= 1


# -- listen ports: the worker asks, we connect to the job's port ---------------------------------------------------

def pool(sockets: str, port: int) -> None:
    path = f"{sockets}/listen-{port}.sock"
    delay = 0.02
    while True:
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            conn.connect(path)
        except OSError:  # the worker is not (or no longer) listening: try again, slower and slower
            conn.close()
            time.sleep(delay)
            delay = min(delay * 2, 2.0)
            continue
        delay = 0.02
        try:
            order = conn.recv(1)
        except OSError:
            order = b""
        if order != b"C":
            conn.close()
            continue
        # this thread serves the stream; the keeper starts its replacement (a thread start is not free: keep it
        # off the stream's first bytes)
        _refill.put((sockets, port))
        serve_listen(port, conn)
        return


def keeper() -> None:
    """Start pool threads for the listen ports whose idle connections were used."""
    while True:
        sockets, port = _refill.get()
        _spawn(pool, sockets, port)


def serve_listen(port: int, conn: socket.socket) -> None:
    for host in ("127.0.0.1", "::1"):
        try:
            job = socket.create_connection((host, port), timeout=5)
            job.settimeout(None)
            break
        except OSError:
            continue
    else:
        with contextlib.suppress(OSError):
            conn.sendall(b"R")
        conn.close()
        return
    job.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if HAND_OVER:
        with contextlib.suppress(OSError):
            socket.send_fds(conn, [b"F"], [job.fileno()])
        job.close()  # the worker holds the connection now
        conn.close()
        return
    try:
        conn.sendall(b"K")
    except OSError:
        conn.close()
        job.close()
        return
    bridge(conn, job)


# -- forward ports: the job connects, the worker opens the stream --------------------------------------------------

def listen_forward(port: int) -> list[socket.socket]:
    servers = []
    for host, family in (("127.0.0.1", socket.AF_INET), ("::1", socket.AF_INET6)):
        try:
            servers.append(socket.create_server((host, port), family=family, backlog=128))
        except OSError as exc:
            if host == "127.0.0.1":
                raise OSError(f"cannot listen on 127.0.0.1:{port} inside the job: {exc.strerror}") from None
    return servers


def accept_forward(sockets: str, port: int, server: socket.socket) -> None:
    while True:
        try:
            job, _ = server.accept()
        except OSError:
            return
        _spawn(serve_forward, sockets, port, job)


def serve_forward(sockets: str, port: int, job: socket.socket) -> None:
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(f"{sockets}/fwd-{port}.sock")
    except OSError as exc:
        log(f"localhost:{port}: the worker is not reachable: {exc}")
        conn.close()
        _kill(job)
        job.close()
        return
    job.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        if HAND_OVER:
            socket.send_fds(conn, [b"F"], [job.fileno()])
        else:
            conn.sendall(b"B")  # relayed by this process (see the module's docstring)
    except OSError as exc:
        log(f"localhost:{port}: the worker is not reachable: {exc}")
        _kill(job, conn)
        job.close()
        conn.close()
        return
    # The worker answers first (K, or R and a reason); whatever the job sent meanwhile waits in its socket.
    try:
        verdict = conn.recv(1)
    except OSError:
        verdict = b""
    if verdict != b"K":
        reason = b""
        if verdict == b"R":
            with contextlib.suppress(OSError):
                conn.settimeout(5)
                while not reason.endswith(b"\n"):
                    part = conn.recv(512)
                    if not part:
                        break
                    reason += part
        text = reason.decode(errors="replace").strip() or "the worker closed the stream"
        log(f"localhost:{port}: refused: {text}")
        _kill(job, conn)
        job.close()
        conn.close()
        return
    if HAND_OVER:
        job.close()  # the worker holds the connection now
        _handed.watch(conn, port)  # kept until the stream ends: the worker says there why it failed, if it did
        return
    bridge(job, conn)


class Handed:
    """The connections to the worker of streams it took over: one thread watches them all. When a stream fails
    after it was set up (e.g. nothing listened behind a server proxy), the worker writes ``R`` and the reason
    before closing; the reason goes to the job's stderr. The job's exit waits (GRACE at most) until they closed,
    so that a reason sent as the job ends is not lost."""

    def __init__(self) -> None:
        self.selector = selectors.DefaultSelector()
        self.wake_r, self.wake_w = socket.socketpair()
        self.selector.register(self.wake_r, selectors.EVENT_READ)
        self.pending: queue.Queue[tuple[socket.socket, int]] = queue.Queue()
        self.count = 0
        self.started = False
        self.lock = threading.Lock()

    def watch(self, conn: socket.socket, port: int) -> None:
        with self.lock:
            self.count += 1
            if not self.started:
                self.started = True
                _spawn(self.run)
        self.pending.put((conn, port))
        with contextlib.suppress(OSError):
            self.wake_w.send(b"x")

    def run(self) -> None:
        buffers: dict[socket.socket, bytes] = {}
        while True:
            for key, _ in self.selector.select():
                if key.fileobj is self.wake_r:
                    with contextlib.suppress(OSError):
                        self.wake_r.recv(4096)
                    while not self.pending.empty():
                        conn, port = self.pending.get_nowait()
                        conn.setblocking(False)
                        buffers[conn] = b""
                        self.selector.register(conn, selectors.EVENT_READ, port)
                    continue
                conn = key.fileobj  # type: ignore[assignment]
                try:
                    data = conn.recv(4096)
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError:
                    data = b""
                if data and len(buffers[conn]) < 4096:
                    buffers[conn] += data
                    continue
                text = buffers.pop(conn)
                if text.startswith(b"R"):
                    reason = text[1:].decode(errors="replace").strip() or "the stream failed"
                    log(f"localhost:{key.data}: {reason}")
                self.selector.unregister(conn)
                conn.close()
                with self.lock:
                    self.count -= 1


_handed = Handed()


# -- the job ---------------------------------------------------------------------------------------------------------

def run(sockets: str, listen: list[int], forward: list[int], argv: list[str]) -> int:
    servers: list[tuple[int, socket.socket]] = []
    try:
        for port in forward:
            servers += [(port, s) for s in listen_forward(port)]
    except OSError as exc:
        log(str(exc))
        return 126
    for port, server in servers:
        _spawn(accept_forward, sockets, port, server)
    for port in listen:
        for _ in range(POOL):
            _spawn(pool, sockets, port)
    if listen:
        _spawn(keeper)
    try:
        proc = subprocess.Popen(argv)  # same stdio and environment; our own sockets are not inherited
    except OSError as exc:
        log(f"cannot run {argv[0]}: {exc.strerror or exc}")
        return 127
    rc = proc.wait()
    for _, server in servers:
        with contextlib.suppress(OSError):
            server.close()
    deadline = time.monotonic() + GRACE
    while (_active or _handed.count) and time.monotonic() < deadline:
        time.sleep(0.02)
    return rc if rc >= 0 else 128 - rc


def parse(argv: list[str]) -> tuple[str, list[int], list[int], list[str]]:
    if "--" not in argv:
        raise SystemExit("usage: xwfwd.py --sockets DIR [--listen P,…] [--forward P,…] -- COMMAND…")
    i = argv.index("--")
    opts, command = argv[:i], argv[i + 1:]
    values: dict[str, str] = {}
    for j in range(0, len(opts) - 1, 2):
        values[opts[j].lstrip("-")] = opts[j + 1]

    def ports(key: str) -> list[int]:
        return [int(p) for p in values.get(key, "").split(",") if p]

    if not command:
        raise SystemExit("xwfwd: no command to run")
    return values.get("sockets", "/xw/sockets"), ports("listen"), ports("forward"), command


def main() -> None:
    sockets, listen, forward, command = parse(sys.argv[1:])
    rc = run(sockets, listen, forward, command)
    sys.stdout.flush()
    os._exit(rc)  # at once: daemon threads block in accept/recv, and there is nothing to tear down


if __name__ == "__main__":
    main()
