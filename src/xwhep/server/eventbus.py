"""Live events: one reader of the event log fans committed events out to every open stream.

The bus reads the events table by id (``WHERE id > last``) once per wake-up, whatever the number of streams, and
renders each event once; each stream then takes the frames it may see. It is woken after commits made by this
process (``Database.on_commit``), at most every ``MIN_INTERVAL`` seconds, and reads every ``POLL`` seconds anyway
(events committed by other server processes on a shared PostgreSQL). It runs only while streams are open.

What a stream sees: administrators everything; others no security event (``access.denied``, ``auth.*``), their
own actions, and events on objects they may read now (the object's rights as in the database, looked up in one
query per batch and cached). Filters: ``object`` (an object's uid), ``action`` (a prefix), ``group``/``label``
(events on works of a group / with a label).

Bounded: ``MAX_STREAMS`` in all, ``MAX_STREAMS_PER_USER`` per user; a stream whose consumer lets more than
``MAX_QUEUED`` events wait is ended with the reason (the client resumes with ``Last-Event-ID``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter, OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

import orjson
from sqlalchemy.engine import Connection

from xwhep.core.rights import Action, Owned, can
from xwhep.server.auth import Identity
from xwhep.server.db import raw
from xwhep.server.db.engine import EventRow
from xwhep.server.errors import ApiError
from xwhep.server.services.common import iso

if TYPE_CHECKING:
    from xwhep.server.state import ServerState

log = logging.getLogger("xwhep.server")

MIN_INTERVAL = 0.1  # s between two reads of the event log (a burst of commits makes one read)
POLL = 1.0  # s between reads when nothing woke the bus (other server processes' events)
BATCH = 5000  # events per read
MAX_STREAMS = 1000
MAX_STREAMS_PER_USER = 8
MAX_QUEUED = 20_000  # events waiting for one stream's consumer before the stream is dropped
CATCHUP_MAX = 100_000  # events replayed for a Last-Event-ID at most (older ones: a gap event says so)
GAP_GRACE = 10.0  # s during which an id skipped on PostgreSQL (a transaction not yet committed) is looked for
INFO_CACHE = 200_000  # objects whose rights (and group, label) are remembered
SECURITY = ("access.", "auth.")

# event action prefix → the table of its object (others are seen by administrators and their actor only)
_TABLES = {"work": "works", "data": "datas", "app": "apps", "host": "hosts", "user": "users",
           "usergroup": "usergroups", "task": "tasks", "session": "sessions", "group": "groups",
           "mandate": "mandates"}
_READ = raw.Sql("SELECT id, time, actor, action, object, source, target, detail FROM events WHERE id > :after "
                "ORDER BY id LIMIT :n")
_READ_IDS = raw.Sql("SELECT id, time, actor, action, object, source, target, detail FROM events "
                    "WHERE id IN_LIST(:ids) ORDER BY id")
_LAST = raw.Sql("SELECT max(id) FROM events")
_INFO = {t: raw.Sql(f"SELECT uid, owner, access_rights{', grp, label' if t == 'works' else ''} FROM {t} "
                    "WHERE uid IN_LIST(:uids)") for t in set(_TABLES.values())}
_GROUPS = raw.Sql("SELECT uid, usergroup FROM users WHERE uid IN_LIST(:uids)")


@dataclass(frozen=True)
class Filters:
    """What a stream asks for (all given ones must hold)."""

    object: str | None = None
    action: str | None = None
    group: str | None = None
    label: str | None = None


@dataclass
class Info:
    """An object's owner and rights (and, for a work, its group and label)."""

    owner: str
    rights: int
    grp: str | None = None
    label: str | None = None


Event = tuple[int, str, str | None, str | None, bytes]
"""One committed event, rendered once for every stream: id, action, object, actor, and its frame (the id, event
and data lines, as sent). A tuple: the bus makes three per work."""
ID: Final = 0
ACTION: Final = 1
OBJECT: Final = 2
ACTOR: Final = 3
FRAME: Final = 4


@dataclass(eq=False)  # compared (and hashed) by identity: streams live in a set
class Stream:
    """One open stream: its caller, filters, and the frames waiting for its consumer."""

    ident: Identity
    filters: Filters
    start: int  # the last event id before the stream opened (live frames come after it)
    frames: list[bytes] = field(default_factory=list)  # runs of frames waiting for the consumer
    queued: int = 0  # events in them
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    ended: str | None = None  # why the server ended the stream

    @property
    def needs_info(self) -> bool:
        return not self.ident.is_admin or self.filters.group is not None or self.filters.label is not None

    @property
    def sees_all(self) -> bool:
        """An administrator's stream without filters: every event, no check per event."""
        return self.ident.is_admin and self.filters == Filters()

    def push(self, frames: bytes, count: int) -> bool:
        """Queue ``count`` events' frames; False if the consumer is too far behind (the stream is then ended)."""
        if self.queued + count > MAX_QUEUED:
            return False
        self.frames.append(frames)
        self.queued += count
        self.ready.set()
        return True

    def take(self) -> bytes:
        out, self.frames, self.queued = b"".join(self.frames), [], 0
        self.ready.clear()
        return out


class EventBus:
    """The in-process source of live events (see the module's doc)."""

    def __init__(self, st: ServerState) -> None:
        self.st = st
        self.streams: set[Stream] = set()
        self.per_user: Counter[str] = Counter()
        self.dropped: Counter[str] = Counter()  # streams ended by the server, by reason
        self.hi = 0  # the last event id read
        self.missing: dict[int, float] = {}  # PostgreSQL: ids skipped over, and until when they are looked for
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._infos: OrderedDict[str, Info | None] = OrderedDict()
        self._groups: dict[str, str | None] = {}  # user uid → its usergroup (the group rights bits)
        self._iso: tuple[float, str | None] = (-1.0, None)
        # SQLite (one server process): the events of each committed transaction come from the database's
        # listeners, with their ids, so nothing is read back; PostgreSQL: read by id (other processes write too)
        self.local = st.db.is_sqlite
        self._pending: list[EventRow] = []
        if self.local:
            st.db.listeners.append(self._committed)

    def _committed(self, rows: list[EventRow]) -> None:
        if self.streams:
            self._pending.extend(rows)

    @property
    def stream_count(self) -> int:
        return len(self.streams)

    def notify(self) -> None:
        """Events may have been committed (called on the event loop after commits): read soon."""
        if self.streams:
            self._wake.set()

    # -- streams ----------------------------------------------------------------------------------------------------
    async def open(self, ident: Identity, filters: Filters) -> Stream:
        """A new stream from now on; 429 past the limits."""
        if len(self.streams) >= MAX_STREAMS:
            raise ApiError(429, f"too many event streams on this server (at most {MAX_STREAMS}); retry later",
                           "streams", {"Retry-After": "10"})
        if self.per_user[ident.uid] >= MAX_STREAMS_PER_USER:
            raise ApiError(429, f"{ident.login} has {MAX_STREAMS_PER_USER} event streams open already (at most "
                                f"{MAX_STREAMS_PER_USER} per user): close one", "streams", {"Retry-After": "10"})
        if not self.streams:  # the bus was idle: start from the end of the log
            self.hi = int((await self.st.db.run(raw.tuples, _LAST, {}))[0][0] or 0)
            self.missing.clear()
            self._pending.clear()
        stream = Stream(ident, filters, self.hi)
        self.streams.add(stream)
        self.per_user[ident.uid] += 1
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._pump())
        return stream

    def close(self, stream: Stream) -> None:
        if stream in self.streams:
            self.streams.discard(stream)
            self.per_user[stream.ident.uid] -= 1
            if self.per_user[stream.ident.uid] <= 0:
                del self.per_user[stream.ident.uid]

    def shutdown(self) -> None:
        """The server is stopping: end every stream now (their clients reconnect to the next server)."""
        for stream in list(self.streams):
            self._drop(stream, "server stopping", "the server is stopping")

    def _drop(self, stream: Stream, reason: str, why: str) -> None:
        stream.ended = why
        stream.ready.set()
        self.dropped[reason] += 1
        self.close(stream)

    async def replay(self, stream: Stream, after: int) -> tuple[bytes, tuple[int, int] | None]:
        """The frames ``stream`` may see among events after ``after`` up to its start (Last-Event-ID), and the ids
        not replayed (after, through) when more than ``CATCHUP_MAX`` were missed (None if none)."""
        gap = None
        if stream.start - after > CATCHUP_MAX:
            gap = (after, stream.start - CATCHUP_MAX)
            after = gap[1]
        skip = set(self.missing)  # the bus delivers these itself if they turn up
        out: list[bytes] = []
        while after < stream.start:
            rows = await self.st.db.run(raw.tuples, _READ, {"after": after, "n": BATCH})
            rows = [r for r in rows if r[0] <= stream.start and r[0] not in skip]
            if not rows:
                break
            after = rows[-1][0]
            events = self._render(_as_event_rows(rows))
            await self._learn(events, [stream])
            out += [e[FRAME] for e in events if self._visible(stream, e)]
        return b"".join(out), gap

    # -- the reader -------------------------------------------------------------------------------------------------
    async def _pump(self) -> None:
        failures = 0
        while self.streams:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), POLL)
            self._wake.clear()
            began = time.monotonic()
            full = False
            try:
                full = await self._read()
                failures = 0
            except asyncio.CancelledError:
                raise
            except Exception:  # the database is busy or gone for a moment: keep the streams, try again later
                failures += 1
                log.exception("event streams: reading the event log failed")
                await asyncio.sleep(min(30.0, 0.5 * 2 ** min(failures, 6)))
            if not full:
                await asyncio.sleep(max(0.0, MIN_INTERVAL - (time.monotonic() - began)))

    async def _read(self) -> bool:
        """Read what is new and hand it out; True if a whole batch came (read again at once)."""
        if self.local:
            rows, self._pending = [r for r in self._pending if r[0] is not None and r[0] > self.hi], []
            if rows:
                await self._hand_out(self._render(rows))
                self.hi = int(rows[-1][0])  # type: ignore[arg-type]
            return False
        rows = _as_event_rows(await self.st.db.run(raw.tuples, _READ, {"after": self.hi, "n": BATCH}))
        late: list[Any] = []
        if self.missing:
            now = time.monotonic()
            for i in [i for i, until in self.missing.items() if until < now]:
                del self.missing[i]  # never committed (rolled back), or committed too late to be seen
            if self.missing:
                late = _as_event_rows(await self.st.db.run(raw.tuples, _READ_IDS, {"ids": list(self.missing)}))
                for r in late:
                    self.missing.pop(int(r[0] or 0), None)
        if not rows and not late:
            return False
        if rows and not self.st.db.is_sqlite:  # ids are drawn at insert, committed in any order
            expect, until = self.hi + 1, time.monotonic() + GAP_GRACE
            for r in rows:
                rid = int(r[0] or 0)
                for i in range(expect, min(rid, expect + 10_000)):
                    self.missing[i] = until
                expect = rid + 1
        await self._hand_out(self._render(sorted([*late, *rows], key=lambda r: int(r[0]))))  # type: ignore[arg-type]
        if rows:  # only now: a failed lookup reads the same events again
            self.hi = int(rows[-1][0])  # type: ignore[arg-type]
        return len(rows) == BATCH

    async def _hand_out(self, events: list[Event]) -> None:
        """Give each stream the events it may see (after its start)."""
        streams = list(self.streams)
        await self._learn(events, streams)
        everything: bytes | None = None
        for stream in streams:
            if stream.ended is not None or stream not in self.streams:
                continue
            if stream.sees_all and events[0][ID] > stream.start:  # the common dashboard: no check per event
                if everything is None:
                    everything = b"".join([e[FRAME] for e in events])
                frames, count = everything, len(events)
            else:
                picked = [e[FRAME] for e in events if e[ID] > stream.start and self._visible(stream, e)]
                frames, count = b"".join(picked), len(picked)
            if count and not stream.push(frames, count):
                self._drop(stream, "slow consumer", f"slow consumer: more than {MAX_QUEUED} events waiting")

    def _render(self, rows: Iterable[EventRow]) -> list[Event]:
        out: list[Event] = []
        append = out.append
        last_t, last_iso = self._iso
        for row_id, t, action, obj, source, target, detail, actor in rows:
            id_ = int(row_id or 0)
            if t != last_t:
                last_t, last_iso = t, iso(t)
            data = orjson.dumps({"time": last_iso, "actor": actor, "action": action, "object": obj,
                                 "source": source, "target": target, "detail": detail})
            append((id_, action, obj, actor, b"id: %d\nevent: %s\ndata: %s\n\n" % (id_, action.encode(), data)))
        self._iso = (last_t, last_iso)
        return out

    # -- who sees what ----------------------------------------------------------------------------------------------
    async def _learn(self, events: list[Event], streams: list[Stream]) -> None:
        """Look up the rights (and group, label) of the objects of ``events`` not known yet, if a stream needs
        them."""
        if not any(s.needs_info for s in streams):
            return
        wanted: dict[str, set[str]] = {}
        for e in events:
            obj, action = e[OBJECT], e[ACTION]
            if obj is None:
                continue
            if action.endswith(".chmod"):  # the rights changed: look again
                self._infos.pop(obj, None)
            if obj in self._infos:
                self._infos.move_to_end(obj)
                continue
            table = _TABLES.get(action.partition(".")[0])
            if table is not None:
                wanted.setdefault(table, set()).add(obj)
        if not wanted:
            return
        found, groups = await self.st.db.run(_lookup, wanted, self._groups_needed(streams))
        for uids in wanted.values():
            for uid in uids:
                self._infos[uid] = found.get(uid)
        self._groups.update(groups)
        while len(self._infos) > INFO_CACHE:
            self._infos.popitem(last=False)
        if len(self._groups) > INFO_CACHE:
            self._groups.clear()

    def _groups_needed(self, streams: list[Stream]) -> set[str]:
        """Owners whose usergroup decides for a stream of a grouped user (read with the objects)."""
        if not any(s.ident.usergroup and not s.ident.is_admin for s in streams):
            return set()
        return {i.owner for i in self._infos.values() if i is not None and i.owner not in self._groups}

    def _visible(self, stream: Stream, e: Event) -> bool:
        f = stream.filters
        obj, action = e[OBJECT], e[ACTION]
        if f.object is not None and obj != f.object:
            return False
        if f.action is not None and not action.startswith(f.action):
            return False
        info = self._infos.get(obj) if obj is not None else None
        if f.group is not None or f.label is not None:
            if info is None or not action.startswith("work."):
                return False
            if f.group is not None and info.grp != f.group:
                return False
            if f.label is not None and info.label != f.label:
                return False
        ident = stream.ident
        if ident.is_admin:
            return True
        if action.startswith(SECURITY):
            return False
        if e[ACTOR] == ident.uid:
            return True
        if info is None:
            return False
        group = self._groups.get(info.owner) if ident.usergroup and info.owner != ident.uid else None
        return can(ident.actor, Action.READ, Owned(info.owner, info.rights, group))


def _as_event_rows(rows: list[Any]) -> list[EventRow]:
    """Rows of ``_READ`` (id, time, actor, action, object, source, target, detail) in :data:`EventRow` order."""
    return [(r[0], r[1], r[3], r[4], r[5], r[6], r[7], r[2]) for r in rows]


def _lookup(conn: Connection, wanted: dict[str, set[str]], owners: set[str]
            ) -> tuple[dict[str, Info], dict[str, str | None]]:
    found: dict[str, Info] = {}
    for table, uids in wanted.items():
        for row in raw.tuples(conn, _INFO[table], {"uids": uids}):
            found[row[0]] = Info(row[1] or "", row[2], *row[3:5]) if table == "works" else Info(row[1] or "", row[2])
    owners = owners | {i.owner for i in found.values()}
    groups = dict(raw.tuples(conn, _GROUPS, {"uids": owners})) if owners else {}
    return found, groups
