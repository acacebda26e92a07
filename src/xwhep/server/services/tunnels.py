"""Who may open which relay stream, decided in one transaction that also writes the event (opened or refused).

* a client → a work's listen port: the caller may EXECUTE the work (owner, group per rights, admin), the port is
  one of the work's listen ports, the work is RUNNING, and its worker's control channel is connected;
* a job → one of its forward addresses: the address is in the work's ``forward_addresses``; a server proxy must
  belong to the work's owner; a work's listen port is checked as above *for the work's owner* (job ↔ job).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from xwhep.core.model import UsageLevel, WorkStatus
from xwhep.core.rights import Action
from xwhep.core.tunnels import BadAddress, parse_forwards, parse_ports, parse_target
from xwhep.server.auth import Identity
from xwhep.server.db import schema as s
from xwhep.server.errors import ApiError
from xwhep.server.services import common as c


@dataclass
class Verdict:
    """The answer: ``ok``, or the HTTP status and message of the refusal; where the stream goes."""

    ok: bool
    status: int = 200
    message: str = ""
    host: str | None = None  # the worker running the target work
    task: str | None = None
    work: str | None = None  # the target work
    port: int | None = None
    proxy: str | None = None  # the target server proxy
    events: list[dict[str, Any]] = field(default_factory=list)  # of an accepted stream: written by the caller


def _settle(conn: Connection, v: Verdict, events: list[dict[str, Any]]) -> Verdict:
    """A refusal's events are written now, in the deciding transaction; an accepted stream's are handed back, to
    be written once the stream is set up (off the path of its first bytes, batched with others)."""
    if v.ok:
        v.events = events
    else:
        c.events(conn, events)
    return v


def _work_port(conn: Connection, ident: Identity, uid: str, port: int,
               connected: Callable[[str], bool]) -> Verdict:
    row = c.load_checked(conn, ident, "work", uid, Action.EXECUTE)
    ports = parse_ports(row["listen_ports"])
    if port not in ports:
        listed = ", ".join(map(str, ports)) or "none"
        raise ApiError(404, f"work {uid} does not listen on port {port} (its listen ports: {listed})")
    if row["status"] != WorkStatus.RUNNING or not row["host"] or not row["task"]:
        raise ApiError(409, f"work {uid} is {row['status']}, not RUNNING: its ports open while it runs")
    if not connected(row["host"]):
        raise ApiError(503, f"the worker running work {uid} is not connected to the relay (yet): try again")
    return Verdict(True, host=row["host"], task=row["task"], work=uid, port=port)


def check_work_port(conn: Connection, ident: Identity, uid: str, port: int,
                    connected: Callable[[str], bool]) -> Verdict:
    """A client's stream to ``uid``'s ``port``; the event is written either way."""
    try:
        v = _work_port(conn, ident, uid, port, connected)
    except ApiError as exc:
        v = Verdict(False, exc.status, exc.message, work=uid, port=port)
    return _settle(conn, v, [{"actor": ident.uid, "action": "tunnel.open" if v.ok else "tunnel.refuse", "object": uid,
                              "target": str(port), "detail": f"client {ident.login} to port {port}"
                              + ("" if v.ok else f": {v.message}")}])


def _identity_of(conn: Connection, user: str) -> Identity:
    row = conn.execute(sa.select(s.users.c.uid, s.users.c.login, s.users.c.level, s.users.c.usergroup)
                       .where(s.users.c.uid == user)).first()
    if row is None:
        raise ApiError(403, "the work's owner no longer exists")
    return Identity(row[0], row[1], UsageLevel[row[2]], row[3])


def check_forward(conn: Connection, host: str, task: str, address: str, connected: Callable[[str], bool],
                  proxy_owner: Callable[[str], str | None]) -> Verdict:
    """A job's stream (task ``task`` on ``host``) to ``address``; events on the job's work (and on the target
    work for job ↔ job)."""
    w = conn.execute(sa.select(s.works.c.uid, s.works.c.owner, s.works.c.forward_addresses, s.works.c.host,
                               s.works.c.status).where(s.works.c.task == task)).mappings().first()
    if w is None or w["host"] != host or w["status"] != WorkStatus.RUNNING:
        v = Verdict(False, 404, f"task {task} is not running on this host")
        c.event(conn, None, "tunnel.refuse", None, detail=f"host {host} task {task} to {address}: {v.message}")
        return v
    actor: Any = w["owner"]
    target_event: tuple[str, str] | None = None
    try:
        try:
            named = [a for a, _ in parse_forwards(w["forward_addresses"])]
            target = parse_target(address)
        except BadAddress as exc:
            raise ApiError(400, f"forward address {address!r}: {exc}") from None
        if address not in named:
            raise ApiError(403, f"{address} is not among the forward addresses of work {w['uid']}")
        if target.proxy is not None:
            owner = proxy_owner(target.proxy)
            if owner is None:
                raise ApiError(503, f"server proxy {target.proxy} is not connected (is xwproxy running?)")
            if owner != w["owner"]:
                raise ApiError(403, f"server proxy {target.proxy} belongs to another user")
            v = Verdict(True, proxy=target.proxy)
        else:
            assert target.work is not None and target.port is not None
            ident = _identity_of(conn, w["owner"])
            try:
                v = _work_port(conn, ident, target.work, target.port, connected)
            finally:
                target_event = (target.work, f"work {w['uid']} to port {target.port}")
    except ApiError as exc:
        v = Verdict(False, exc.status, exc.message)
    action = "tunnel.open" if v.ok else "tunnel.refuse"
    suffix = "" if v.ok else f": {v.message}"
    events = [{"actor": actor, "action": action, "object": w["uid"], "detail": f"job to {address}{suffix}"}]
    if target_event is not None:
        events.append({"actor": actor, "action": action, "object": target_event[0],
                       "detail": target_event[1] + suffix})
    return _settle(conn, v, events)
