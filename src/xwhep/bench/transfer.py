"""Benchmark 4, transfer: upload and download of one large data vs a raw loopback baseline, same run.

The data (1 GiB in the full run) is written from ``os.urandom`` chunks, never held in memory. xwhep: the SDK
(``httpx``, HTTPS, 1 MiB chunks) uploads it with ``PUT /datas/{uid}/content`` to a real server process, which
hashes it on the way and commits it as a blob; then streams it back with ``GET …/content`` into a file (what a
worker's stage-in does; the SDK's extra read-back to verify the checksum is not counted).

The baseline is the fairest equivalent without HTTP or the middleware: another Python process on loopback
serving one TLS socket with the *same certificate* (same TLS version and cipher, recorded), blocking
``sendall``/``recv_into`` with the same 1 MiB chunks, file to file on the same filesystem, the receiver
answering once the last byte is written. It does not hash; a second baseline upload that does
(``raw_upload_sha256``, like the server) is recorded to show what the checksum costs. Best of ``repeat`` runs.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import ssl
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from xwhep.bench.common import Result, Server, Settings, rnd

KEYS = ["upload_ratio_vs_raw", "download_ratio_vs_raw"]
CHUNK = 1024 * 1024


def make_file(path: Path, size: int) -> str:
    """Write ``size`` random bytes to ``path`` in 1 MiB chunks; return the sha256."""
    h = hashlib.sha256()
    with open(path, "wb") as f:
        left = size
        while left:
            chunk = os.urandom(min(CHUNK, left))
            h.update(chunk)
            f.write(chunk)
            left -= len(chunk)
    return h.hexdigest()


# -- the raw baseline server (its own process) ----------------------------------------------------------------------

def _recv_exact(conn: ssl.SSLSocket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        part = conn.recv(n - len(buf))
        if not part:
            raise ConnectionError("peer closed")
        buf += part
    return bytes(buf)


def raw_server(cert: str, key: str, directory: str) -> None:
    """Serve one connection at a time: ``U``/``H`` + size: receive to a file (``H`` hashes too); ``D``: send it."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    target = Path(directory) / "raw.bin"
    with socket.create_server(("127.0.0.1", 0)) as srv:
        print(f"port {srv.getsockname()[1]}", flush=True)
        view = memoryview(bytearray(CHUNK))
        while True:
            raw, _ = srv.accept()
            try:
                with ctx.wrap_socket(raw, server_side=True) as conn:
                    if _serve_one(conn, target, view):
                        return
            except (OSError, ConnectionError) as exc:
                print(f"raw server: {exc}", file=sys.stderr, flush=True)


def _serve_one(conn: ssl.SSLSocket, target: Path, view: memoryview) -> bool:
    """One exchange; True when asked to quit."""
    op = _recv_exact(conn, 1)
    if op in (b"U", b"H"):
        (size,) = struct.unpack("!Q", _recv_exact(conn, 8))
        h = hashlib.sha256() if op == b"H" else None
        with open(target, "wb") as f:
            left = size
            while left:
                n = conn.recv_into(view, min(CHUNK, left))
                if not n:
                    raise ConnectionError("upload cut")
                f.write(view[:n])
                if h is not None:
                    h.update(view[:n])
                left -= n
        conn.sendall(b"K")
    elif op == b"D":
        size = target.stat().st_size
        conn.sendall(struct.pack("!Q", size))
        with open(target, "rb") as f:
            while chunk := f.read(CHUNK):
                conn.sendall(chunk)
    return op == b"Q"


class RawClient:
    def __init__(self, port: int, ca: str) -> None:
        self.port = port
        self.ctx = ssl.create_default_context(cafile=ca)
        self.cipher: Any = None

    def _connect(self) -> ssl.SSLSocket:
        sock = socket.create_connection(("127.0.0.1", self.port))
        conn = self.ctx.wrap_socket(sock, server_hostname="127.0.0.1")
        self.cipher = (conn.version(), conn.cipher()[0] if conn.cipher() else None)
        return conn

    def upload(self, path: Path, hashed: bool = False) -> None:
        size = path.stat().st_size
        with self._connect() as conn, open(path, "rb") as f:
            conn.sendall((b"H" if hashed else b"U") + struct.pack("!Q", size))
            while chunk := f.read(CHUNK):
                conn.sendall(chunk)
            if conn.recv(1) != b"K":
                raise ConnectionError("no acknowledgement")

    def download(self, dest: Path) -> int:
        with self._connect() as conn, open(dest, "wb") as f:
            conn.sendall(b"D")
            (size,) = struct.unpack("!Q", _recv_exact(conn, 8))
            buf = bytearray(CHUNK)
            view = memoryview(buf)
            left = size
            while left:
                n = conn.recv_into(view, min(CHUNK, left))
                if not n:
                    raise ConnectionError("download cut")
                f.write(view[:n])
                left -= n
        return size

    def quit(self) -> None:
        with contextlib.suppress(OSError), self._connect() as conn:
            conn.sendall(b"Q")


def _timed(fn: Any, *args: Any) -> float:
    t = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t


def _measure(settings: Settings, tmp: Path) -> dict[str, Any]:
    from xwhep.client import Client

    size = settings.transfer_mib * CHUNK
    repeat = 1 if settings.smoke else 2
    src = tmp / "data.bin"
    t = time.perf_counter()
    sha = make_file(src, size)
    out: dict[str, Any] = {"size_mib": settings.transfer_mib, "repeat": repeat,
                           "create_s": rnd(time.perf_counter() - t, 2)}
    srv = Server(home=tmp / "server")
    raw_dir = tmp / "raw"
    raw_dir.mkdir()
    raw_proc = None
    client = None
    try:
        srv.start()
        pki = srv.home / "pki"
        raw_proc = subprocess.Popen([sys.executable, "-m", "xwhep.bench.transfer", "--raw-server",
                                     str(pki / "server.pem"), str(pki / "server.key"), str(raw_dir)],
                                    stdout=subprocess.PIPE, text=True, start_new_session=True)
        assert raw_proc.stdout is not None
        line = raw_proc.stdout.readline()
        if not line.startswith("port "):
            raise RuntimeError(f"raw baseline server did not start: {line!r}")
        raw = RawClient(int(line.split()[1]), str(srv.ca))
        client = Client.from_config(srv.home / "admin.conf", timeout=600.0)
        dest = tmp / "back.bin"
        times: dict[str, list[float]] = {k: [] for k in ("raw_upload", "raw_upload_sha256", "xw_upload",
                                                          "raw_download", "xw_download")}
        for i in range(repeat):
            times["raw_upload"].append(_timed(raw.upload, src))
            times["raw_upload_sha256"].append(_timed(raw.upload, src, True))
            data = client.create_data(f"bench-{i}.bin", size, sha)
            times["xw_upload"].append(_timed(client.upload, data["uid"], src))
            if client.data(data["uid"])["status"] != "AVAILABLE":
                raise RuntimeError("the uploaded data is not AVAILABLE")
            times["raw_download"].append(_timed(raw.download, dest))
            dest.unlink()

            def xw_download(uid: str = data["uid"]) -> None:
                with open(dest, "wb") as f:
                    client.download_to({"uid": uid}, f)  # type: ignore[union-attr]

            times["xw_download"].append(_timed(xw_download))
            if dest.stat().st_size != size:
                raise RuntimeError("downloaded size mismatch")
            dest.unlink()
            client.delete_data(data["uid"])  # the next round uploads the bytes again
        mib = size / CHUNK
        best = {k: min(v) for k, v in times.items()}
        out.update({f"{k}_mib_per_s": rnd(mib / v) for k, v in best.items()})
        out["tls"] = raw.cipher
        out["upload_ratio"] = rnd(best["raw_upload"] / best["xw_upload"], 3)
        out["download_ratio"] = rnd(best["raw_download"] / best["xw_download"], 3)
        out["upload_ratio_vs_raw_sha256"] = rnd(best["raw_upload_sha256"] / best["xw_upload"], 3)
        return out
    finally:
        if client is not None:
            client.close()
        if raw_proc is not None:
            raw_proc.kill()
            raw_proc.wait()
        srv.stop()


def run(settings: Settings) -> Result:
    res = Result("transfer")
    with tempfile.TemporaryDirectory(prefix="xwbench-transfer-", dir=settings.workdir) as d:
        try:
            out = _measure(settings, Path(d))
        except Exception as exc:
            return res.skip(KEYS, f"failed: {type(exc).__name__}: {str(exc)[:300]}")
    res.details.update(out)
    res.values["upload_ratio_vs_raw"] = out["upload_ratio"]
    res.values["download_ratio_vs_raw"] = out["download_ratio"]
    res.values["upload_mib_per_s"] = out["xw_upload_mib_per_s"]
    res.values["download_mib_per_s"] = out["xw_download_mib_per_s"]
    res.values["raw_upload_mib_per_s"] = out["raw_upload_mib_per_s"]
    res.values["raw_download_mib_per_s"] = out["raw_download_mib_per_s"]
    print(f"  transfer {out['size_mib']} MiB: upload {out['xw_upload_mib_per_s']} MiB/s vs raw "
          f"{out['raw_upload_mib_per_s']} ({out['upload_ratio']}x); download {out['xw_download_mib_per_s']} MiB/s "
          f"vs raw {out['raw_download_mib_per_s']} ({out['download_ratio']}x)", flush=True)
    return res


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--raw-server":
        raw_server(sys.argv[2], sys.argv[3], sys.argv[4])
    else:
        print("usage: python -m xwhep.bench.transfer --raw-server CERT KEY DIR", file=sys.stderr)
        raise SystemExit(2)
