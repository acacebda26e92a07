"""Tunnel addresses and port lists, shared by the server (relay checks), the worker (sandbox bridges) and the
client (``xwproxy``). Pure: no I/O.

Two kinds of address can be named in a work's ``forward_addresses`` (``"ADDRESS,PORT;ADDRESS,PORT"``: inside the
job, ``localhost:PORT`` reaches ADDRESS):

* a **server proxy**, ``xwproxy:<token>``, registered by ``xwproxy --xwlistenport P`` on a client: it reaches the
  client's own port P;
* a **work's listen port**, ``xw://<server>/<uid>:<port>`` (or ``<uid>:<port>``), as the work's ``tunnels``
  attribute shows it once RUNNING: it reaches port ``port`` inside that work's sandbox (job ↔ job).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from xwhep.core.uri import BadUri, make_uri, to_uid

PROXY_PREFIX = "xwproxy:"
_PROXY = re.compile(r"^xwproxy:[A-Za-z0-9_-]{8,64}$")


class BadAddress(ValueError):
    """Not a tunnel address, port or port list."""


@dataclass(frozen=True)
class Target:
    """What a forward address names: a server proxy (``proxy`` set) or a work's listen port."""

    proxy: str | None = None
    work: str | None = None
    port: int | None = None


def port_number(text: str | int) -> int:
    """A TCP port 1-65535."""
    try:
        port = int(str(text).strip())
    except ValueError:
        raise BadAddress(f"{text!r} is not a port number") from None
    if not 1 <= port <= 65535:
        raise BadAddress(f"port {port} is out of range 1-65535")
    return port


def parse_ports(value: str | None) -> list[int]:
    """``"8080,8081"`` → ``[8080, 8081]`` (empty for None or ``""``)."""
    if not value:
        return []
    return [port_number(p) for p in value.split(",") if p.strip()]


def parse_forwards(value: str | None) -> list[tuple[str, int]]:
    """``"ADDR,PORT;ADDR2,PORT2"`` → ``[(ADDR, PORT), …]``; a job-local port may appear only once."""
    out: list[tuple[str, int]] = []
    if not value:
        return out
    for pair in value.split(";"):
        if not pair.strip():
            continue
        address, sep, port = pair.rpartition(",")
        if not sep or not address.strip():
            raise BadAddress(f"{pair!r} is not ADDRESS,PORT")
        out.append((address.strip(), port_number(port)))
    ports = [p for _, p in out]
    if len(set(ports)) != len(ports):
        raise BadAddress("a job-local port appears twice in the forward addresses")
    return out


def parse_target(address: str) -> Target:
    """The target of a forward address (see the module docstring)."""
    text = address.strip()
    if text.startswith(PROXY_PREFIX):
        if not _PROXY.match(text):
            raise BadAddress(f"malformed server proxy address {address!r}")
        return Target(proxy=text)
    ref, sep, port = text.rpartition(":")
    if not sep:
        raise BadAddress(f"{address!r} is neither xwproxy:<token> nor xw://<server>/<uid>:<port>")
    try:
        uid = to_uid(ref)
    except BadUri:
        raise BadAddress(f"{address!r} is neither xwproxy:<token> nor xw://<server>/<uid>:<port>") from None
    return Target(work=uid, port=port_number(port))


def work_address(server: str, uid: str, port: int | str) -> str:
    """``xw://server/uid:port``: how a work's listen port is named (its ``tunnels`` attribute)."""
    return f"{make_uri(server, uid)}:{port}"
