"""Client configuration: a small TOML file a person can write by hand.

::

    server = "https://host:4330"
    ca = "path/to/ca.pem"        # the CA that signed the server's certificate
    login = "alice"
    password = "…"
    on_behalf_of = "bob"          # optional, for a MANDATED_USER: act for the user who mandated it

Found at ``--xwconfig FILE``, else ``$XW_CONFIG``, else ``~/.xwhep/client.conf``.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A missing or unreadable client configuration."""


@dataclass
class ClientConfig:
    server: str
    ca: str | None = None
    login: str | None = None
    password: str | None = None
    token: str | None = None
    cert: str | None = None
    key: str | None = None
    on_behalf_of: str | None = None  # a MANDATED_USER's mandator (login, uid or URI)
    path: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def default_path() -> Path:
    return Path.home() / ".xwhep" / "client.conf"


def find(explicit: str | os.PathLike[str] | None = None) -> Path:
    """The config file to use: explicit, else $XW_CONFIG, else ~/.xwhep/client.conf."""
    if explicit:
        return Path(explicit).expanduser()
    env = os.environ.get("XW_CONFIG")
    if env:
        return Path(env).expanduser()
    return default_path()


def load(explicit: str | os.PathLike[str] | None = None) -> ClientConfig:
    """Read and check a client config; relative ``ca``/``cert``/``key`` paths are relative to the file."""
    path = find(explicit)
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"no client config at {path} (use --xwconfig FILE or set XW_CONFIG)") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"client config {path} is not valid TOML: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"cannot read client config {path}: {exc.strerror}") from None
    server = data.get("server")
    if not isinstance(server, str) or not server.startswith(("http://", "https://")):
        raise ConfigError(f"client config {path}: 'server' must be an http(s):// URL")
    known = {"server", "ca", "login", "password", "token", "cert", "key", "on_behalf_of"}
    behalf = data.get("on_behalf_of")
    if behalf is not None and (not isinstance(behalf, str) or not behalf.strip()):
        raise ConfigError(f"client config {path}: 'on_behalf_of' must be a login, uid or URI")

    def rel(key: str) -> str | None:
        value = data.get(key)
        if value is None:
            return None
        p = Path(str(value)).expanduser()
        return str(p if p.is_absolute() else (path.parent / p))

    return ClientConfig(server=server.rstrip("/"), ca=rel("ca"), login=data.get("login"), password=data.get("password"),
                        token=data.get("token"), cert=rel("cert"), key=rel("key"), on_behalf_of=behalf, path=path,
                        extra={k: v for k, v in data.items() if k not in known})
