"""Response schemas: what the API answers, for the OpenAPI document (``response_model=`` of the routes).

The routes return :class:`~xwhep.server.api.deps.FastJSON` responses built from plain dicts, so FastAPI neither
validates nor re-serializes through these models (the hot paths keep orjson's speed); the document still says
what comes back, and the Schemathesis test checks every answer against it.

The object models are derived from the tables (``db/schema.py``) the way ``services.common.render`` renders a row:
times as ISO 8601 text, access rights as ``0x755``, ``grp`` as ``group``, the ``xw://`` URI added, the internal
``id`` and the password hash left out — so a new column shows up in the document without anyone remembering it.
Objects allow more properties than listed (some answers add computed ones, e.g. a host's ``running``).
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from pydantic import BaseModel, ConfigDict, Field, create_model

from xwhep.server.db import schema as s
from xwhep.server.services.common import _HIDDEN, _TIME_FIELDS


class Out(BaseModel):
    model_config = ConfigDict(extra="allow")


def _column_type(name: str, col: sa.Column[Any]) -> Any:
    if name in _TIME_FIELDS:
        return str  # ISO 8601
    if name == "access_rights":
        return str  # 0x755
    t = col.type
    if isinstance(t, sa.Boolean):
        return bool
    if isinstance(t, sa.Integer):
        return int
    if isinstance(t, sa.Float):
        return float
    if isinstance(t, sa.String):  # Text and the uid columns too
        return str
    return Any  # JSON columns


def _object(name: str, table: sa.Table, doc: str, **extra: Any) -> type[Out]:
    fields: dict[str, Any] = {}
    for col in table.columns:
        key = col.name
        if key in _HIDDEN or key == "id":
            continue
        key = "group" if key == "grp" else key
        typ = _column_type(col.name, col)
        # a rendered row always carries every column; NOT NULL ones are never null (times of NOT NULL columns too)
        fields[key] = (typ | None if col.nullable and typ is not Any else typ, ...)
    if "uid" in fields:
        fields["uri"] = (str, Field(..., description="xw://server/uid"))
    fields.update(extra)
    model: type[Out] = create_model(name, __base__=Out, __doc__=doc, **fields)
    return model


User = _object("User", s.users, "A user account (never its password).")
UserGroup = _object("UserGroup", s.usergroups, "A group of users.")
App = _object("App", s.apps, "An application: binaries per OS/CPU, a shared app, a VM disk or a container image.")
Data = _object("Data", s.datas, "A data: a blob's metadata; its bytes are at /datas/{uid}/content.")
Task = _object("Task", s.tasks, "One attempt of a work on a host.")
Host = _object("Host", s.hosts, "A registered worker.",
               running=(int | None, None), alive_period=(float | None, None))
HostRegistered = _object("HostRegistered", s.hosts, "A registered worker, with its own credentials: ``key`` (a new "
                         "host only; shown once) and a ``token`` bound to the host for every other host call.",
                         running=(int | None, None), alive_period=(float | None, None), key=(str | None, None),
                         token=(str, ...), expires_in=(int, ...))
Session = _object("Session", s.sessions, "A temporary bag of works.")
Group = _object("Group", s.groups, "A lasting bag of works.")
Event = _object("Event", s.events, "One entry of the append-only event log.")
Mandate = _object("Mandate", s.mandates, "A user's mandate to a MANDATED_USER.",
                  mandator_login=(str | None, None), mandatary_login=(str | None, None),
                  expires=(str | None, Field(..., description="ISO 8601; null: until revoked")))
Work = _object("Work", s.works, "A work (a job).", app_name=(str | None, None),
               result_sha256=(str | None, None), result_size=(int | None, None), result_status=(str | None, None),
               tunnels=(list[str] | None, None))


class Submitted(Out):
    """A submitted work: where it is and its first status."""

    uid: str
    uri: str
    status: str


class SubmittedBag(Out):
    works: list[Submitted]


class WorkPage(Out):
    """One page of works, oldest first; ``next`` is the ``after`` of the next page (null: this was the last)."""

    items: list[Work]  # type: ignore[valid-type]
    next: int | None


class Requirement(Out):
    name: str
    satisfied_by: int
    of: int
    example_failure: Any = None


class Why(Out):
    """Why a work is pending: per requirement, how many registered hosts satisfy it."""

    uid: str
    status: str
    reason: str | None
    retries: int
    max_retries: int
    hosts: int
    hosts_alive: int
    matching_alive: int
    pending_ahead: int
    requirements: list[Requirement]


class Statuses(Out):
    works: dict[str, str]


class BagCounts(Out):
    """The works of a group or with a label: how many in each status, and whether all are final."""

    counts: dict[str, int]
    total: int
    final: bool


class Deleted(Out):
    deleted: str


class Updated(Out):
    updated: str


class Revoked(Out):
    revoked: str


class HostToken(Out):
    """A bearer token bound to one host (``POST /auth/host``)."""

    token: str
    expires_in: int
    host: str
    user: str
    level: str


class Token(Out):
    """A short-lived bearer token for ``Authorization: Bearer …``."""

    token: str
    expires_in: int
    user: str
    level: str


class X509Token(Token):
    login: str
    dn: str
    registered: bool


class Nonce(Out):
    nonce: str
    expires_in: float


class Health(Out):
    status: str
    uptime: float


class Version(Out):
    version: str
    api: str


class AnyObject(Out):
    """Any object, with its kind."""

    kind: str
    uid: str
    uri: str


class Chmodded(Out):
    kind: str
    uid: str
    access_rights: str


class Issuers(Out):
    issuers: list[dict[str, Any]]


class Assignments(Out):
    """Works handed to a host (each with what the worker needs to run it)."""

    works: list[dict[str, Any]]


class ReportOutcomes(Out):
    """Per report: ``done``, ``upload`` (send the result's bytes to data ``result``) or ``stale``."""

    reports: list[dict[str, Any]]


class AliveReply(Out):
    tasks: dict[str, str]
    ack: list[str]
    resend: dict[str, Any]
    report: list[str]
    alive_period: float


class SyncReply(AliveReply):
    reports: list[dict[str, Any]]
    works: list[dict[str, Any]]


class RelayStats(Out):
    hosts: int
    proxies: int
    pending: int
    streams: int
    raw_streams: int
    spares: int
    raw_port: int


class Dropped(Out):
    dropped: int


class Tickets(Out):
    port: int | None
    tickets: list[dict[str, str]]
    ttl: float


class Error(BaseModel):
    """Every error: what went wrong, and the request field it is about (null when none)."""

    error: str
    field: str | None
    details: list[dict[str, Any]] | None = None


# -- summaries (api/stats.py) --------------------------------------------------------------------------------------

class HostsSeen(Out):
    registered: int
    alive: int
    cores_alive: int


class Stats(Out):
    """The caller's works by status, its bags' progress and the hosts it sees."""

    time: str
    works: dict[str, int]
    total: int
    bags: list[dict[str, Any]]
    hosts: HostsSeen


class StatsHistory(Out):
    """Works by status over a window (epoch seconds), and per bucket how many reached each final status."""

    start: float
    step: float
    times: list[float]
    status: dict[str, list[int]]
    finished: dict[str, list[int]]
    now: float


class HostRecord(Out):
    """What a host did: its tasks by status, the time they ran, its latest tasks."""

    host: Host  # type: ignore[valid-type]
    tasks: dict[str, int]
    done: int
    failed: int
    interrupted: int
    run_seconds: float
    recent: list[Task]  # type: ignore[valid-type]
    time: str


class WorkLogs(Out):
    """The end of a work's captured stdout and stderr (``stdout``/``stderr``: name, text, size, truncated), the
    names in its result, or a ``note`` saying why there is nothing."""


class TunnelStats(Out):
    """The caller's server proxies connected now and its works' relayed streams (administrators: the relay's
    counters too)."""

    proxies: list[dict[str, Any]]
    works: list[dict[str, Any]]
