"""``xw admin backup`` / ``xw admin restore``: the database, the blobs and the home's keys in one archive.

A backup is a tar file (gzip when its name ends in ``.gz``), written as ``FILE.part`` and renamed when complete:

- ``manifest.json`` first: format, version, database kind, and the sha256 and size of every other member;
- ``database/xwhep.db`` (SQLite's online backup API: a consistent copy while the server runs) or
  ``database/xwhep.pgdump`` (``pg_dump --format=custom``, taken in a snapshot exported by a transaction that
  also lists the blobs the dump refers to, so that the two agree);
- ``blobs/ab/<sha256>``: every blob an AVAILABLE data of that snapshot points at (a blob is immutable and named
  by its content: its name is its checksum);
- ``home/…``: the secret (tokens), the PKI (the CA workers trust), server.toml, the client configs and the
  metrics token. The archive is as sensitive as the home itself: it is written readable by its owner only.

A restore refuses a home a server runs on, and a home (or PostgreSQL database) that already holds data unless
``force``; it unpacks into a temporary directory inside the home, verifies every member's size and sha256
against the manifest (and every blob against its name), and only then moves everything into place. The server
started on the restored home brings the schema up to date (Alembic) as at any start.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import sqlite3
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from xwhep import __version__

FORMAT = 1
HOME_FILES = ("secret", "server.toml", "admin.conf", "worker.conf", "metrics.token")
HOME_DIRS = ("pki",)
_BLOB = re.compile(r"^blobs/([0-9a-f]{2})/([0-9a-f]{64})$")
_HOME = re.compile(r"^home/(?:[A-Za-z0-9_.-]+|pki/[A-Za-z0-9_.-]+)$")
_DB = ("database/xwhep.db", "database/xwhep.pgdump")
CHUNK = 1 << 20


class BackupError(Exception):
    """A backup or restore that cannot be done; the message says why, in one line."""


@dataclass
class Report:
    """What a backup or restore did."""

    path: Path
    database: str
    blobs: int = 0
    blob_bytes: int = 0
    missing: list[str] = field(default_factory=list)  # blobs deleted while the backup ran
    seconds: float = 0.0


# -- backup ------------------------------------------------------------------------------------------------------

def backup(home: Path, dest: Path, db_url: str | None = None) -> Report:
    """Write a backup of the server home ``home`` (its database: SQLite in it, or ``db_url``) to ``dest``."""
    t0 = time.monotonic()
    home = home.resolve()
    if not (home / "secret").exists():
        raise BackupError(f"{home} is not a server home (no secret in it)")
    kind = "sqlite" if db_url is None or db_url.startswith("sqlite") else "postgresql"
    part = dest.with_name(dest.name + ".part")
    with tempfile.TemporaryDirectory(prefix="xw-backup-", dir=dest.parent) as tmpdir:
        tmp = Path(tmpdir)
        if kind == "sqlite":
            db_file = tmp / "xwhep.db"
            shas = _sqlite_snapshot(_sqlite_path(home, db_url), db_file)
        else:
            assert db_url is not None
            db_file = tmp / "xwhep.pgdump"
            shas = _pg_snapshot(db_url, db_file)
        report = Report(dest, kind)
        members: dict[str, dict[str, Any]] = {}
        fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as raw, tarfile.open(fileobj=raw, mode="w:gz" if dest.suffix == ".gz" else "w",
                                                      format=tarfile.PAX_FORMAT) as tar:
            staged: list[tuple[str, Path]] = [(f"database/{db_file.name}", db_file)]
            for name in HOME_FILES:
                if (home / name).is_file():
                    staged.append((f"home/{name}", home / name))
            for d in HOME_DIRS:
                for item in sorted((home / d).glob("*")) if (home / d).is_dir() else []:
                    if item.is_file():
                        staged.append((f"home/{d}/{item.name}", item))
            for name, path in staged:  # small files: hashed first, then added (the manifest must come first)
                members[name] = {"sha256": _sha256(path), "size": path.stat().st_size}
            blobs: dict[str, int] = {}
            for sha in sorted(shas):
                path = home / "blobs" / sha[:2] / sha
                try:
                    blobs[sha] = path.stat().st_size
                except FileNotFoundError:
                    report.missing.append(sha)
            manifest = {"format": FORMAT, "version": __version__, "created": datetime.now(UTC).isoformat(),
                        "database": kind, "members": members, "blobs": blobs}
            _add_bytes(tar, "manifest.json", json.dumps(manifest, indent=1).encode())
            for name, path in staged:
                tar.add(path, arcname=name, recursive=False)
            for sha, size in blobs.items():
                path = home / "blobs" / sha[:2] / sha
                try:
                    with open(path, "rb") as f:
                        info = tar.gettarinfo(arcname=f"blobs/{sha[:2]}/{sha}", fileobj=f)
                        hashing = _Hashing(f)
                        tar.addfile(info, hashing)
                except FileNotFoundError:  # deleted since it was listed: its data was deleted after the snapshot
                    report.missing.append(sha)
                    continue
                if hashing.hexdigest() != sha or info.size != size:
                    raise BackupError(f"blob {sha} in {home / 'blobs'} is corrupted (its content does not match "
                                      "its name); nothing written")
                report.blobs += 1
                report.blob_bytes += size
            if report.missing:  # the manifest lists them; a restore accepts their absence
                _add_bytes(tar, "missing.json", json.dumps(sorted(report.missing)).encode())
            raw.flush()
            os.fsync(raw.fileno())
        os.replace(part, dest)
    report.seconds = time.monotonic() - t0
    return report


def _sqlite_path(home: Path, db_url: str | None) -> Path:
    if db_url is None:
        return home / "xwhep.db"
    return Path(db_url.split(":///", 1)[1])


def _sqlite_snapshot(src: Path, dest: Path) -> set[str]:
    """A consistent copy of the live database (the online backup API copies it page by page, starting again if
    a writer changed it meanwhile), and the blobs its AVAILABLE data point at."""
    if not src.exists():
        raise BackupError(f"no database at {src}")
    source = sqlite3.connect(f"file:{src}?mode=ro", uri=True, timeout=30)
    target = sqlite3.connect(dest)
    try:
        source.backup(target, pages=4096)
        ok = target.execute("PRAGMA integrity_check").fetchone()[0]
        if ok != "ok":
            raise BackupError(f"the copy of {src} fails its integrity check: {ok}")
        return {r[0] for r in target.execute(
            "SELECT DISTINCT sha256 FROM datas WHERE status = 'AVAILABLE' AND sha256 IS NOT NULL")}
    finally:
        target.close()
        source.close()


def libpq_url(db_url: str) -> str:
    """A SQLAlchemy URL (``postgresql+psycopg://``) as libpq and the pg_* tools take it."""
    return re.sub(r"^postgres(?:ql)?(?:\+\w+)?://", "postgresql://", db_url)


def pg_tool(name: str) -> str:
    """``pg_dump``/``pg_restore``: on PATH, else the newest Debian PostgreSQL's."""
    found = shutil.which(name)
    if found:
        return found
    for bindir in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (bindir / name).exists():
            return str(bindir / name)
    raise BackupError(f"{name} not found (install the PostgreSQL client tools, e.g. apt-get install "
                      "postgresql-client)")


def _pg_snapshot(db_url: str, dest: Path) -> set[str]:
    """``pg_dump`` in a snapshot exported by a transaction that lists the blobs in that same snapshot."""
    import psycopg

    try:
        conn = psycopg.connect(libpq_url(db_url))
    except psycopg.Error as exc:
        raise BackupError(f"cannot connect to {_safe(db_url)}: {str(exc).strip().splitlines()[0]}") from None
    try:
        conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        snapshot = conn.execute("SELECT pg_export_snapshot()").fetchone()[0]  # type: ignore[index]
        shas = {r[0] for r in conn.execute(
            "SELECT DISTINCT sha256 FROM datas WHERE status = 'AVAILABLE' AND sha256 IS NOT NULL")}
        run = subprocess.run([pg_tool("pg_dump"), "--format=custom", "--no-owner", "--no-privileges",
                              f"--snapshot={snapshot}", f"--file={dest}", f"--dbname={libpq_url(db_url)}"],
                             capture_output=True, text=True, timeout=24 * 3600, check=False)
        if run.returncode != 0:
            raise BackupError(f"pg_dump failed: {run.stderr.strip()[-500:]}")
        return shas
    finally:
        conn.close()


class _Hashing:
    """A file object that hashes what is read from it (tar reads each blob once)."""

    def __init__(self, f: IO[bytes]) -> None:
        self.f = f
        self.h = hashlib.sha256()

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        self.h.update(data)
        return data

    def hexdigest(self) -> str:
        return self.h.hexdigest()


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    import io

    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = int(time.time())
    info.mode = 0o600
    tar.addfile(info, io.BytesIO(data))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _safe(url: str) -> str:
    return re.sub(r"://([^:/@]+):[^@]*@", r"://\1:***@", url)


# -- restore -----------------------------------------------------------------------------------------------------

def server_running(home: Path) -> str | None:
    """Why a server is (probably) running on ``home``; None if none is. HOME/server.lock, when servers take it, is
    asked first (a lock held is a server); else the pid of HOME/server.json, if alive and an xwhep server."""
    lock = home / "server.lock"
    if lock.exists():
        with open(lock, "a+") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return f"a server holds {lock}"
            fcntl.flock(f, fcntl.LOCK_UN)
    info = home / "server.json"
    if info.exists():
        with contextlib.suppress(ValueError, OSError):
            pid = int(json.loads(info.read_text()).get("pid") or 0)
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ") if pid else b""
            if b"xwhep" in cmdline and str(home).encode() in cmdline:
                return f"server process {pid} runs on it (server.json)"
    return None


def restore(archive: Path, home: Path, db_url: str | None = None, force: bool = False,
            progress: Callable[[str], None] | None = None) -> Report:
    """Restore ``archive`` into ``home`` (and ``db_url`` for a PostgreSQL backup); see the module's doc."""
    t0 = time.monotonic()
    home = home.resolve()
    why = server_running(home) if home.exists() else None
    if why:
        raise BackupError(f"{home}: {why}; stop it before restoring")
    if not archive.is_file():
        raise BackupError(f"no backup at {archive}")
    home.mkdir(parents=True, exist_ok=True)
    os.chmod(home, 0o700)
    with tarfile.open(archive, "r:*") as tar:
        first = tar.next()
        if first is None or first.name != "manifest.json":
            raise BackupError(f"{archive} is not an xwhep backup (no manifest first)")
        manifest = json.loads(_read_member(tar, first))
        if manifest.get("format") != FORMAT:
            raise BackupError(f"{archive}: backup format {manifest.get('format')} (this version reads {FORMAT})")
        kind = manifest["database"]
        if kind == "postgresql" and (db_url is None or db_url.startswith("sqlite")):
            raise BackupError("this backup holds a PostgreSQL database: give the database to restore it into (--db)")
        if kind == "sqlite" and db_url is not None and not db_url.startswith("sqlite"):
            raise BackupError("this backup holds a SQLite database: restore it without --db")
        _check_target(home, kind, db_url, force)
        report = Report(archive, kind)
        with tempfile.TemporaryDirectory(prefix=".restore-", dir=home) as tmpdir:
            tmp = Path(tmpdir)
            seen = _unpack(tar, manifest, tmp, report)
            missing = set(manifest["members"]) - seen
            if missing:
                raise BackupError(f"{archive} is incomplete: {', '.join(sorted(missing))} missing; nothing restored")
            absent = set(manifest["blobs"]) - {p.name for p in (tmp / "blobs").glob("*/*")}
            declared = set(json.loads((tmp / "missing.json").read_text())) if (tmp / "missing.json").exists() \
                else set()
            if absent - declared:
                raise BackupError(f"{archive} is incomplete: {len(absent - declared)} blob(s) missing; nothing "
                                  "restored")
            report.missing = sorted(declared)
            if progress:
                progress(f"verified {report.blobs} blobs ({report.blob_bytes} bytes) and the database")
            _move_into_place(tmp, home, kind, db_url, force)
    report.seconds = time.monotonic() - t0
    return report


def _check_target(home: Path, kind: str, db_url: str | None, force: bool) -> None:
    if force:
        return
    held = [p.name for p in (home / "xwhep.db", home / "secret") if p.exists()]
    if (home / "blobs").is_dir() and any((home / "blobs").glob("*/*")):
        held.append("blobs")
    if held:
        raise BackupError(f"{home} already holds {', '.join(held)}: restore into a new home, or --force to replace "
                          "them")
    if kind == "postgresql":
        import psycopg

        assert db_url is not None
        try:
            with psycopg.connect(libpq_url(db_url)) as conn:
                n = conn.execute("SELECT count(*) FROM information_schema.tables "
                                 "WHERE table_schema = 'public'").fetchone()[0]  # type: ignore[index]
        except psycopg.Error as exc:
            raise BackupError(f"cannot connect to {_safe(db_url)}: {str(exc).strip().splitlines()[0]}") from None
        if n:
            raise BackupError(f"database {_safe(db_url)} is not empty ({n} tables): restore into an empty one, or "
                              "--force to replace its contents")


def _unpack(tar: tarfile.TarFile, manifest: dict[str, Any], tmp: Path, report: Report) -> set[str]:
    """Extract and verify every member (names checked: nothing lands outside ``tmp``)."""
    seen: set[str] = set()
    for member in _members(tar):
        name = member.name
        blob = _BLOB.match(name)
        if blob:
            expected_size = manifest["blobs"].get(blob.group(2))
            expected = (blob.group(2), expected_size)
        elif name in manifest["members"] and (name in _DB or _HOME.match(name)):
            expected = (manifest["members"][name]["sha256"], manifest["members"][name]["size"])
        elif name == "missing.json":
            expected = None
        else:
            raise BackupError(f"unexpected member {name!r} in the backup; nothing restored")
        if not member.isfile():
            raise BackupError(f"member {name!r} is not a regular file; nothing restored")
        target = tmp / name
        target.parent.mkdir(parents=True, exist_ok=True)
        src = tar.extractfile(member)
        assert src is not None
        h = hashlib.sha256()
        size = 0
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as out:
            while chunk := src.read(CHUNK):
                h.update(chunk)
                out.write(chunk)
                size += len(chunk)
        if expected is not None and (h.hexdigest(), size) != expected:
            raise BackupError(f"{name}: checksum or size differs from the manifest (the backup is damaged); "
                              "nothing restored")
        if blob:
            report.blobs += 1
            report.blob_bytes += size
        seen.add(name)
    return seen


def _members(tar: tarfile.TarFile) -> Iterator[tarfile.TarInfo]:
    while (member := tar.next()) is not None:
        yield member


def _read_member(tar: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    f = tar.extractfile(member)
    if f is None or member.size > 64 << 20:
        raise BackupError("the backup's manifest is unreadable")
    return f.read()


def _move_into_place(tmp: Path, home: Path, kind: str, db_url: str | None, force: bool) -> None:
    if kind == "postgresql":  # first: one transaction that either lands whole or leaves the home untouched
        assert db_url is not None
        cmd = [pg_tool("pg_restore"), "--no-owner", "--no-privileges", "--exit-on-error", "--single-transaction",
               f"--dbname={libpq_url(db_url)}", str(tmp / "database" / "xwhep.pgdump")]
        if force:
            cmd[1:1] = ["--clean", "--if-exists"]
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=24 * 3600, check=False)
        if run.returncode != 0:
            raise BackupError(f"pg_restore failed: {run.stderr.strip()[-500:]}")
    for f in sorted((tmp / "blobs").glob("*/*")):
        dest = home / "blobs" / f.parent.name / f.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(f, dest)
    (home / "blobs" / "tmp").mkdir(parents=True, exist_ok=True)
    for f in sorted((tmp / "home").rglob("*")):
        if f.is_file():
            dest = home / f.relative_to(tmp / "home")
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.chmod(dest.parent, 0o700)
            os.replace(f, dest)
    if kind == "sqlite":
        db = Path(db_url.split(":///", 1)[1]) if db_url else home / "xwhep.db"
        for stale in (db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")):
            stale.unlink(missing_ok=True)
        os.replace(tmp / "database" / "xwhep.db", db)
