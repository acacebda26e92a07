"""A throwaway real PostgreSQL server for the test session (see shared RECIPES: PostgreSQL 15).

``start()`` runs ``initdb`` into a fresh temporary directory and ``pg_ctl start`` on a free port of 127.0.0.1
(Unix socket in that directory too, ``fsync=off``: the data dies with the session anyway), creates the database
``xwhep_test`` and hands back a :class:`PgServer`; ``stop()`` kills it and removes the directory.

initdb refuses to run as root, so as root everything runs as the ``postgres`` user (via ``runuser``) in a
directory owned by it; as another user it runs as that user.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import pwd
import re
import shutil
import socket
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import psycopg
from psycopg import sql

TEST_DB = "xwhep_test"
SUPERUSER = "postgres"
_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


class PostgresUnavailable(RuntimeError):
    """The PostgreSQL server binaries (or, as root, the ``postgres`` user) are not on this machine."""


def find_bindir() -> Path:
    """The directory holding ``initdb`` and ``pg_ctl``: ``$XWHEP_PG_BINDIR``, the newest
    ``/usr/lib/postgresql/*/bin`` (Debian), or wherever ``pg_ctl`` is on ``PATH``."""
    override = os.environ.get("XWHEP_PG_BINDIR")
    candidates: list[Path] = [Path(override)] if override else []

    def version(p: Path) -> tuple[int, ...]:
        return tuple(int(x) for x in re.findall(r"\d+", p.parent.name)) or (0,)

    candidates += sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=version, reverse=True)
    on_path = shutil.which("pg_ctl")
    if on_path:
        candidates.append(Path(on_path).resolve().parent)
    for d in candidates:
        if (d / "initdb").is_file() and (d / "pg_ctl").is_file():
            return d
    raise PostgresUnavailable(
        "PostgreSQL server binaries not found (looked in $XWHEP_PG_BINDIR, /usr/lib/postgresql/*/bin, PATH): "
        "install them with `apt-get install postgresql` (.ci/run does)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _conninfo(url: str, dbname: str) -> str:
    """A libpq URI for ``dbname`` on the server of an SQLAlchemy ``postgresql+psycopg://`` URL."""
    parts = urlsplit(url)
    return f"postgresql://{parts.netloc}/{dbname}"


def _check_name(name: str) -> None:
    if not _NAME.match(name):
        raise ValueError(f"database name {name!r}: use lowercase letters, digits and _ (at most 63)")


def create_database(url_base: str, name: str) -> str:
    """Create the empty database ``name`` on the server of ``url_base``; return its SQLAlchemy URL."""
    _check_name(name)
    with psycopg.connect(_conninfo(url_base, "postgres"), autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return f"{url_base.rstrip('/')}/{name}"


def drop_database(url_base: str, name: str) -> None:
    """Drop ``name`` if it exists, closing whatever connections a test left open to it."""
    _check_name(name)
    with psycopg.connect(_conninfo(url_base, "postgres"), autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@dataclass
class PgServer:
    """One running server: ``url_base`` has no database (feed it to :func:`create_database`); ``url`` is
    ``xwhep_test``."""

    root: Path
    bindir: Path
    port: int
    _as_postgres: bool = field(repr=False, default=False)
    _stopped: bool = field(repr=False, default=False)

    @property
    def url_base(self) -> str:
        return f"postgresql+psycopg://{SUPERUSER}@127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"{self.url_base}/{TEST_DB}"

    @property
    def log(self) -> Path:
        return self.root / "log"

    def stop(self) -> None:
        """Stop the server (immediate: nothing in it is worth a checkpoint) and remove its directory."""
        if self._stopped:
            return
        self._stopped = True
        with contextlib.suppress(subprocess.SubprocessError, OSError):
            _run(self, [str(self.bindir / "pg_ctl"), "-D", str(self.root / "data"), "-m", "immediate", "-w",
                        "-t", "30", "stop"], timeout=60)
        shutil.rmtree(self.root, ignore_errors=True)


def _run(server: PgServer, argv: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    if server._as_postgres:
        argv = ["runuser", "-u", SUPERUSER, "--", *argv]
    # PG* variables of the caller (PGDATA, PGPORT...) must not steer this private server
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["LC_ALL"] = "C"
    return subprocess.run(argv, cwd=server.root, env=env, stdin=subprocess.DEVNULL, capture_output=True,
                          text=True, timeout=timeout, check=False)


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def start(attempts: int = 3) -> PgServer:
    """Start a fresh server with the database ``xwhep_test``; raise :class:`PostgresUnavailable` when
    PostgreSQL is not installed, ``RuntimeError`` with the server's log when it does not start."""
    bindir = find_bindir()
    as_postgres = os.geteuid() == 0
    owner = None
    if as_postgres:
        try:
            owner = pwd.getpwnam(SUPERUSER)
        except KeyError:
            raise PostgresUnavailable(f"running as root but there is no {SUPERUSER!r} user to run initdb") from None
    # /tmp, not $TMPDIR: as root, TMPDIR may sit under a directory the postgres user cannot enter
    root = Path(tempfile.mkdtemp(prefix="xwhep-pg-", dir="/tmp" if as_postgres else None))
    if owner is not None:
        os.chown(root, owner.pw_uid, owner.pw_gid)
    server = PgServer(root=root, bindir=bindir, port=0, _as_postgres=as_postgres)
    atexit.register(server.stop)  # in case the session ends without running its finalizers
    try:
        res = _run(server, [str(bindir / "initdb"), "-D", str(root / "data"), "-A", "trust", "-U", SUPERUSER,
                            "--no-sync", "--encoding=UTF8", "--locale=C"], timeout=120)
        if res.returncode != 0:
            raise RuntimeError(f"initdb failed ({res.returncode}):\n{res.stdout}\n{res.stderr}")
        for _ in range(attempts):
            # the port is free when picked but may be taken before postgres binds it: try another one
            server.port = _free_port()
            opts = (f"-p {server.port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off "
                    "-c synchronous_commit=off -c full_page_writes=off -c max_connections=200")
            res = _run(server, [str(bindir / "pg_ctl"), "-D", str(root / "data"), "-l", str(server.log), "-w",
                                "-t", "60", "-o", opts, "start"], timeout=120)
            if res.returncode == 0:
                break
        else:
            raise RuntimeError(f"pg_ctl start failed ({res.returncode}):\n{res.stdout}\n{res.stderr}\n"
                               f"server log:\n{_tail(server.log)}")
        create_database(server.url_base, TEST_DB)
    except BaseException:
        server.stop()
        raise
    return server
