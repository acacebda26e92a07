"""The server's home directory: database, blob store, PKI, secret, and the two ready client configs.

The first start creates everything; later starts reuse it and only refresh the server address in the configs.
"""

from __future__ import annotations

import os
import secrets
import socket
import tomllib
from pathlib import Path

import sqlalchemy as sa

from xwhep.core.uri import new_uid
from xwhep.fsutil import write_atomic
from xwhep.server.auth import hash_password
from xwhep.server.config import ServerConfig
from xwhep.server.db import schema as s
from xwhep.server.db.engine import Database
from xwhep.server.pki import ServerPki, load_or_init_server_pki
from xwhep.server.services.common import now

ADMIN_LOGIN = "admin"
WORKER_LOGIN = "worker"


def secret(home: Path) -> bytes:
    """The token-signing secret (created once, readable by the server's user only)."""
    path = home / "secret"
    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(secrets.token_bytes(32))
    return path.read_bytes()


def pki(cfg: ServerConfig) -> ServerPki:
    names = {"localhost", socket.gethostname()}
    ips = {"127.0.0.1", "::1"}
    if cfg.host not in ("0.0.0.0", "::", ""):
        try:
            socket.inet_pton(socket.AF_INET6 if ":" in cfg.host else socket.AF_INET, cfg.host)
            ips.add(cfg.host)
        except OSError:
            names.add(cfg.host)
    return load_or_init_server_pki(cfg.home, sorted(names), sorted(ips))


def _toml_str(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def write_client_conf(path: Path, server: str, ca: Path | None, login: str, password: str) -> None:
    """A client config a person could have written by hand (TOML), readable by its owner only."""
    lines = [f"server = {_toml_str(server)}"]
    if ca is not None:
        lines.append(f"ca = {_toml_str(str(ca))}")
    lines += [f"login = {_toml_str(login)}", f"password = {_toml_str(password)}"]
    write_atomic(path, "\n".join(lines) + "\n", 0o600)


def _ensure_user(conn: sa.Connection, login: str, level: str) -> str | None:
    """Create ``login`` with a random password if missing; return the password (None if it existed)."""
    if conn.execute(sa.select(s.users.c.uid).where(s.users.c.login == login)).first():
        return None
    password = secrets.token_urlsafe(18)
    t = now()
    uid = new_uid()
    conn.execute(s.users.insert().values(uid=uid, owner=uid, access_rights=0x700, created=t, modified=t,
                                         login=login, password_hash=hash_password(password), level=level))
    conn.execute(s.events.insert().values(time=t, actor=None, action="user.create", object=uid,
                                          detail=f"{login} {level} (server initialization)"))
    return password


def initialize(cfg: ServerConfig, url: str) -> tuple[Database, ServerPki | None]:
    """Create or reuse the home directory; write admin.conf and worker.conf pointing at ``url``."""
    cfg.home.mkdir(parents=True, exist_ok=True)
    os.chmod(cfg.home, 0o700)
    db = Database(cfg.database_url)
    db.migrate()
    material = None if cfg.insecure else pki(cfg)
    ca = material.ca_pem if material else None
    for login, level, name in ((ADMIN_LOGIN, "SUPER_USER", "admin.conf"), (WORKER_LOGIN, "WORKER_USER", "worker.conf")):
        password = db.run_sync(_ensure_user, login, level)
        path = cfg.home / name
        if password is None:
            if not path.exists():
                continue  # the account exists but its config was removed: an admin resets the password
            password = tomllib.loads(path.read_text()).get("password", "")
        write_client_conf(path, url, ca, login, password)
    return db, material
