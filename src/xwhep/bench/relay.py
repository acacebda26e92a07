"""Benchmark 5, relay: a stream through the server's relay vs ``ssh -L`` on the same machine, same run.

The relay path is the real one: a client socket → ``xwproxy`` (loopback) → the server (TLS WebSocket) → a real
worker process (TLS WebSocket) → the forwarder inside the job's bubblewrap sandbox (Unix socket) → the service in
the job. The ``ssh -L`` path: a client socket → ``ssh -N -L`` → a throwaway ``sshd`` on loopback (default
cipher, key login) → the same service program running on the host's loopback.

* ``relay_ratio_vs_ssh``: bulk throughput of the relay / that of ``ssh -L``, the smaller of upload (client →
  service) and download (service → client); best of ``repeat`` transfers of ``size`` MiB each way, each tunnel,
  the two tunnels taking turns transfer by transfer (both are up during the whole measurement);
* ``relay_connect_p50_ms``: the *added* connect latency, p50 of (connect + a 1-byte echo) through the relay
  minus p50 of the same straight to the service on loopback. The same through ``ssh -L`` is in the details.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil

from xwhep.bench.common import Result, Server, Settings, percentile, rnd

KEYS = ["relay_ratio_vs_ssh", "relay_connect_p50_ms"]
MiB = 1 << 20
PORT_IN_JOB = 7000

SERVICE = r"""#!/usr/bin/python3
# service PORT: per connection one command line: SINK n (read n bytes, answer ok) | GEN n (send n bytes) | ECHO
import socket, sys, threading
BLOCK = bytes(1 << 20)
def line(c):
    buf = b""
    while not buf.endswith(b"\n"):
        b = c.recv(1)
        if not b:
            return None
        buf += b
    return buf.split()
def serve(c):
    with c:
        cmd = line(c)
        if not cmd:
            return
        if cmd[0] == b"SINK":
            left, view = int(cmd[1]), memoryview(bytearray(1 << 20))
            while left:
                n = c.recv_into(view, min(left, 1 << 20))
                if not n:
                    return
                left -= n
            c.sendall(b"ok\n")
        elif cmd[0] == b"GEN":
            left = int(cmd[1])
            while left:
                k = min(left, 1 << 20)
                c.sendall(BLOCK[:k])
                left -= k
        elif cmd[0] == b"ECHO":
            while True:
                b = c.recv(65536)
                if not b:
                    return
                c.sendall(b)
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(sys.argv[1])))
s.listen(128)
print("listening", flush=True)
while True:
    conn, _ = s.accept()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    threading.Thread(target=serve, args=(conn,), daemon=True).start()
"""

SSHD_CONFIG = """HostKey {d}/host_key
AuthorizedKeysFile {d}/authorized_keys
PasswordAuthentication no
KbdInteractiveAuthentication no
PubkeyAuthentication yes
PermitRootLogin prohibit-password
UsePAM no
StrictModes no
PidFile none
ListenAddress 127.0.0.1
AllowTcpForwarding yes
"""


class Skipped(Exception):
    pass


# -- the client side: transfers and round trips over plain sockets --------------------------------------------------

def _line(s: socket.socket) -> bytes:
    buf = b""
    while not buf.endswith(b"\n"):
        b = s.recv(1)
        if not b:
            raise ConnectionError("closed before the answer")
        buf += b
    return buf


def upload(port: int, size: int) -> float:
    """Seconds to send ``size`` bytes to the service (until it acknowledged them all)."""
    block = bytes(MiB)
    with socket.create_connection(("127.0.0.1", port), timeout=120) as s:
        t = time.perf_counter()
        s.sendall(f"SINK {size}\n".encode())
        left = size
        while left:
            k = min(left, MiB)
            s.sendall(block[:k])
            left -= k
        if _line(s) != b"ok\n":
            raise ConnectionError("no acknowledgement")
        return time.perf_counter() - t


def download(port: int, size: int) -> float:
    """Seconds to receive ``size`` bytes from the service."""
    view = memoryview(bytearray(MiB))
    with socket.create_connection(("127.0.0.1", port), timeout=120) as s:
        t = time.perf_counter()
        s.sendall(f"GEN {size}\n".encode())
        left = size
        while left:
            n = s.recv_into(view, min(left, MiB))
            if not n:
                raise ConnectionError(f"download cut {left} bytes short")
            left -= n
        return time.perf_counter() - t


def connect_rtt(port: int) -> float:
    """Milliseconds for a new connection and one 1-byte echo."""
    t = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.sendall(b"ECHO\nx")
        if s.recv(1) != b"x":
            raise ConnectionError("no echo")
        dt = time.perf_counter() - t
    return dt * 1000.0


def _until(pred: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _answers(port: int) -> bool:
    try:
        return connect_rtt(port) > 0
    except OSError:
        return False


def _listens(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- the tunnels ----------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def _proc(cmd: list[str], **kw: Any) -> Iterator[subprocess.Popen[str]]:
    proc = subprocess.Popen(cmd, text=True, start_new_session=True, **kw)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


@contextlib.contextmanager
def ssh_tunnel(tmp: Path, target: int, procs: dict[str, int] | None = None) -> Iterator[int]:
    """``ssh -N -L`` to ``target`` through a throwaway sshd on loopback; yields the local port. ``procs`` gets the
    pids to account CPU to (``ssh``, ``sshd``)."""
    for tool in ("ssh", "ssh-keygen"):
        if shutil.which(tool) is None:
            raise Skipped(f"{tool} is not installed")
    sshd = shutil.which("sshd") or "/usr/sbin/sshd"
    if not os.path.exists(sshd):
        raise Skipped("sshd is not installed (apt: openssh-server)")
    d = tmp / "ssh"
    d.mkdir()
    for name in ("host_key", "user_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / name)], check=True)
    (d / "authorized_keys").write_text((d / "user_key.pub").read_text())
    (d / "sshd_config").write_text(SSHD_CONFIG.format(d=d))
    if os.geteuid() == 0:
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege separation directory
    sshd_port, local = _free_port(), _free_port()
    user = os.environ.get("USER") or ("root" if os.geteuid() == 0 else os.getlogin())
    with _proc([sshd, "-D", "-e", "-f", str(d / "sshd_config"), "-p", str(sshd_port)],
               stderr=subprocess.DEVNULL) as daemon:
        _until(lambda: daemon.poll() is not None or _listens(sshd_port), 30, "the throwaway sshd")
        if daemon.poll() is not None:
            raise Skipped(f"the throwaway sshd did not start (rc {daemon.returncode})")
        with _proc(["ssh", "-N", "-L", f"127.0.0.1:{local}:127.0.0.1:{target}", "-p", str(sshd_port), "-i",
                    str(d / "user_key"), "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no", "-o",
                    "UserKnownHostsFile=/dev/null", "-o", "ExitOnForwardFailure=yes", f"{user}@127.0.0.1"],
                   stderr=subprocess.DEVNULL) as ssh:
            _until(lambda: ssh.poll() is not None or _answers(local), 30, "the ssh -L tunnel")
            if ssh.poll() is not None:
                raise Skipped("ssh -L could not be set up (sshd refused the throwaway key?)")
            if procs is not None:
                procs.update(ssh=ssh.pid, sshd=daemon.pid)
            yield local


@contextlib.contextmanager
def relay_tunnel(tmp: Path, service: Path, procs: dict[str, int] | None = None) -> Iterator[int]:
    """A server, a worker accepting incoming connections, the service as a job, ``xwproxy`` to it; yields the
    local port of ``xwproxy``. ``procs`` gets the pids to account CPU to (server, worker, xwproxy)."""
    if shutil.which("bwrap") is None:
        raise Skipped("bubblewrap is not installed")
    from xwhep.client import Client

    bindir = Path(sys.executable).parent
    srv = Server(home=tmp / "server", args=["--alive-period", "1", "--alive-timeout", "30"])
    srv.start()
    admin_conf = srv.home / "admin.conf"
    client = Client.from_config(admin_conf)
    try:
        wdir = tmp / "worker"
        wdir.mkdir()
        conf = wdir / "worker.conf"
        conf.write_text((srv.home / "worker.conf").read_text()
                        + "\n[worker]\nincoming_connections = true\nlong_poll_s = 2.0\n")
        conf.chmod(0o600)
        with _proc([sys.executable, "-m", "xwhep.worker", "--config", str(conf), "--workdir", str(wdir / "w"),
                    "--pool", "1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) as worker:
            _until(lambda: _relay_hosts(client) >= 1, 60, "the worker's control channel")
            client.put_app("relaybench", binaries={"linux/x86_64": service})
            uid = client.submit("relaybench", args=[str(PORT_IN_JOB)], listen_ports=str(PORT_IN_JOB))["uid"]
            _until(lambda: client.work(uid)["status"] == "RUNNING", 60, "the service job to run")
            with _proc([str(bindir / "xwproxy"), uid, "--xwlistenport", "0", "--xwconfig", str(admin_conf)],
                       stdout=subprocess.PIPE, stderr=subprocess.DEVNULL) as proxy:
                assert proxy.stdout is not None
                line = proxy.stdout.readline()
                if not line:
                    raise RuntimeError("xwproxy did not start")
                port = int(line.split()[0].rsplit(":", 1)[1])
                _until(lambda: _answers(port), 60, "the service in the job")
                if procs is not None:
                    procs.update(server=srv.pid, worker=worker.pid, xwproxy=proxy.pid)
                yield port
            client.cancel(uid)
    finally:
        client.close()
        srv.stop()


def _relay_hosts(client: Any) -> int:
    try:
        r = client.http.get(client.base + "/relay", headers=client._auth_header())
        return int(r.json()["hosts"]) if r.status_code == 200 else 0
    except Exception:
        return 0


# -- the benchmark --------------------------------------------------------------------------------------------------

def _cpu_seconds(procs: dict[str, int]) -> dict[str, float]:
    """CPU seconds (user + system, all threads) of each named process; ``sshd`` with its per-session children;
    for the worker, its forwarder (in the sandbox) apart, and not the job's service (the ssh side runs the same
    service outside any tunnel, not counted either)."""
    def cpu(procs: list[psutil.Process]) -> float:
        total = 0.0
        for q in procs:
            with contextlib.suppress(psutil.Error):
                t = q.cpu_times()
                total += t.user + t.system
        return total

    out: dict[str, float] = {}
    for name, pid in procs.items():
        try:
            p = psutil.Process(pid)
            children = p.children(recursive=True)
        except psutil.Error:
            continue
        if name == "sshd":
            out[name] = cpu([p, *children])
        elif name == "worker":  # the sandbox apart: the forwarder, and the service the ssh side runs outside
            out[name] = cpu([p])
            out["forwarder"] = cpu([c for c in children if "xwfwd" in " ".join(_cmdline(c))])
        else:
            out[name] = cpu([p])
    return out


def _cmdline(p: psutil.Process) -> list[str]:
    try:
        return p.cmdline()
    except psutil.Error:
        return []


def _cpu_per_mib(before: dict[str, float], after: dict[str, float], mib: float) -> dict[str, float]:
    return {k: rnd((after[k] - before[k]) * 1000.0 / mib, 2) for k in after if k in before}


def _throughput(tunnels: dict[str, tuple[int, dict[str, int]]], size: int, repeat: int) -> dict[str, dict[str, Any]]:
    """Best rates up and down through each tunnel (name → (port, processes)), and the CPU per MiB moved of its
    processes (``cpu_ms_per_mib``). The tunnels take turns, transfer by transfer, the first one changing every
    round: on a shared machine, a load that comes and goes weighs on both alike instead of on whichever ran
    during it."""
    mib = size / MiB
    times: dict[str, dict[str, list[float]]] = {n: {"upload": [], "download": []} for n in tunnels}
    cpu: dict[str, dict[str, float]] = {n: {} for n in tunnels}
    names = list(tunnels)
    for r in range(repeat):
        order = names if r % 2 == 0 else names[::-1]
        for direction, transfer in (("upload", upload), ("download", download)):
            for name in order:
                port, procs = tunnels[name]
                before = _cpu_seconds(procs)
                times[name][direction].append(transfer(port, size))
                for k, v in _cpu_per_mib(before, _cpu_seconds(procs), 1.0).items():
                    cpu[name][k] = cpu[name].get(k, 0.0) + v  # CPU ms per transfer, summed
    out: dict[str, dict[str, Any]] = {}
    for name in names:
        t = times[name]
        out[name] = {"upload_mib_per_s": mib / min(t["upload"]), "download_mib_per_s": mib / min(t["download"]),
                     "upload_all_mib_per_s": [rnd(mib / x) for x in t["upload"]],
                     "download_all_mib_per_s": [rnd(mib / x) for x in t["download"]],
                     "cpu_ms_per_mib": {k: rnd(v / (2 * repeat * mib), 2) for k, v in cpu[name].items()}}
    return out


def _latency(port: int, n: int) -> list[float]:
    for _ in range(min(5, n)):  # warm-up: first connections pay for imports, caches, dialing ahead
        connect_rtt(port)
    out = []
    for _ in range(n):
        out.append(connect_rtt(port))
        time.sleep(0.02)  # connections one by one, as a person's tools open them
    return out


def measure(settings: Settings, tmp: Path) -> dict[str, Any]:
    size = (16 if settings.smoke else min(512, settings.transfer_mib)) * MiB
    repeat = 1 if settings.smoke else 5
    samples = 20 if settings.smoke else 200
    service = tmp / "service.py"
    service.write_text(SERVICE)
    service.chmod(0o755)
    out: dict[str, Any] = {"size_mib": size // MiB, "repeat": repeat, "latency_samples": samples}
    python = "/usr/bin/python3" if os.access("/usr/bin/python3", os.X_OK) else sys.executable
    direct_port = _free_port()
    with _proc([python, str(service), str(direct_port)], stdout=subprocess.DEVNULL):
        _until(lambda: _answers(direct_port), 30, "the service on loopback")
        direct = _latency(direct_port, samples)
        ssh_procs: dict[str, int] = {}
        relay_procs: dict[str, int] = {}
        with ssh_tunnel(tmp, direct_port, ssh_procs) as ssh_port, \
                relay_tunnel(tmp, service, relay_procs) as relay_port:
            rates = _throughput({"ssh": (ssh_port, ssh_procs), "relay": (relay_port, relay_procs)}, size, repeat)
            ssh, relay = rates["ssh"], rates["relay"]
            ssh_lat = _latency(ssh_port, samples)
            relay_lat = _latency(relay_port, samples)
    for name, rates_ in (("ssh", ssh), ("relay", relay)):
        for k, v in rates_.items():
            out[f"{name}_{k}"] = v if isinstance(v, dict | list) else rnd(v)
    for name, latencies in (("direct", direct), ("ssh", ssh_lat), ("relay", relay_lat)):
        out[f"{name}_connect_p50_ms"] = rnd(percentile(latencies, 50), 2)
        out[f"{name}_connect_p99_ms"] = rnd(percentile(latencies, 99), 2)
    for name, rates_ in (("ssh", ssh), ("relay", relay)):  # the steadier measure on a shared machine
        out[f"{name}_cpu_ms_per_mib_total"] = rnd(sum(rates_["cpu_ms_per_mib"].values()), 2)
    out["ratio_upload"] = rnd(relay["upload_mib_per_s"] / ssh["upload_mib_per_s"], 3)
    out["ratio_download"] = rnd(relay["download_mib_per_s"] / ssh["download_mib_per_s"], 3)
    out["added_connect_p50_ms"] = rnd((percentile(relay_lat, 50) or 0) - (percentile(direct, 50) or 0), 2)
    out["ssh_added_connect_p50_ms"] = rnd((percentile(ssh_lat, 50) or 0) - (percentile(direct, 50) or 0), 2)
    with contextlib.suppress(Exception):
        out["ssh_cipher"] = _ssh_cipher()
    return out


def _ssh_cipher() -> str:
    """The cipher ``ssh`` picks by default against this machine's sshd (the first of its list)."""
    cfg = subprocess.run(["ssh", "-G", "127.0.0.1"], capture_output=True, text=True, timeout=10).stdout
    for line in cfg.splitlines():
        if line.startswith("ciphers "):
            return line.split()[1].split(",")[0]
    return "?"


def run(settings: Settings) -> Result:
    res = Result("relay")
    with tempfile.TemporaryDirectory(prefix="xwbench-relay-", dir=settings.workdir) as d:
        try:
            out = measure(settings, Path(d))
        except Skipped as exc:
            return res.skip(KEYS, str(exc))
        except Exception as exc:
            return res.skip(KEYS, f"failed: {type(exc).__name__}: {str(exc)[:300]}")
    res.details.update(out)
    res.values["relay_ratio_vs_ssh"] = min(out["ratio_upload"], out["ratio_download"])
    res.values["relay_connect_p50_ms"] = out["added_connect_p50_ms"]
    print(f"  relay {out['size_mib']} MiB: upload {out['relay_upload_mib_per_s']} MiB/s vs ssh -L "
          f"{out['ssh_upload_mib_per_s']} ({out['ratio_upload']}x); download {out['relay_download_mib_per_s']} "
          f"vs {out['ssh_download_mib_per_s']} ({out['ratio_download']}x); connect+echo p50 relay "
          f"{out['relay_connect_p50_ms']} ms, ssh -L {out['ssh_connect_p50_ms']} ms, direct "
          f"{out['direct_connect_p50_ms']} ms (added by the relay: {out['added_connect_p50_ms']} ms)", flush=True)
    print(f"  CPU ms/MiB (up and down): relay {out.get('relay_cpu_ms_per_mib')} = "
          f"{out.get('relay_cpu_ms_per_mib_total')}, ssh -L {out.get('ssh_cpu_ms_per_mib')} = "
          f"{out.get('ssh_cpu_ms_per_mib_total')}", flush=True)
    return res
