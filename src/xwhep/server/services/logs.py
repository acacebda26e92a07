"""A work's logs for people: the names in its result and the end of its captured stdout and stderr.

The worker packs a result as one file, or a zip whose last members are the captured ``stdout.txt`` and
``stderr.txt`` (``xw-stdout.txt`` … when the job wrote a file of that name itself: worker/packing.py). Reading a
zip member means inflating it, so a log is read up to :data:`SCAN_LIMIT` bytes and only its last :data:`TAIL`
bytes are kept; the whole result stays downloadable from its data.
"""

from __future__ import annotations

import re
import zipfile
from collections import deque
from pathlib import Path
from typing import IO, Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from xwhep.core.model import DataStatus
from xwhep.core.rights import Action
from xwhep.server.auth import Identity
from xwhep.server.db import schema as s
from xwhep.server.services import common as c

TAIL = 64 * 1024  # bytes of each log shown
SCAN_LIMIT = 64 * 1024 * 1024  # bytes of a log read at most to find its end
MAX_FILES = 200  # names listed
_STREAM = re.compile(r"^(xw-)*(stdout|stderr)\.txt$")


def locate(conn: Connection, ident: Identity, uid: str) -> dict[str, Any]:
    """What :func:`read` needs (checked: ``ident`` may read the work): the result data's sha256, name, type."""
    work = c.load_checked(conn, ident, "work", uid, Action.READ)
    out: dict[str, Any] = {"work": uid, "status": work["status"], "result": work["result"]}
    if work["result"]:
        d = conn.execute(sa.select(s.datas.c.sha256, s.datas.c.name, s.datas.c.type, s.datas.c.size,
                                   s.datas.c.status).where(s.datas.c.uid == work["result"])).mappings().first()
        if d is not None and d["status"] == DataStatus.AVAILABLE and d["sha256"]:
            out.update(sha256=d["sha256"], name=d["name"], type=d["type"], size=d["size"])
    return out


def _tail(f: IO[bytes]) -> tuple[str, int, bool]:
    """The text of the last :data:`TAIL` bytes, the bytes read, and whether the scan stopped before the end."""
    chunks: deque[bytes] = deque()
    kept = read = 0
    while read < SCAN_LIMIT:
        b = f.read(min(1 << 20, SCAN_LIMIT - read))
        if not b:
            break
        read += len(b)
        chunks.append(b)
        kept += len(b)
        while kept - len(chunks[0]) >= TAIL:
            kept -= len(chunks.popleft())
    scanned_all = not f.read(1)
    data = b"".join(chunks)[-TAIL:]
    return data.decode("utf-8", "replace"), read, not scanned_all


def read(where: dict[str, Any], path: Path | None) -> dict[str, Any]:
    """The logs of the result at ``path`` (blocking file I/O and inflation: run it in a worker thread)."""
    out: dict[str, Any] = {"work": where["work"], "status": where["status"], "files": [], "stdout": None,
                           "stderr": None}
    if path is None or not path.exists():
        out["note"] = ("no result yet" if not where.get("result") else "the result is not available on the server")
        return out
    name = str(where.get("name") or "result")
    if where.get("type") != "zip" or not zipfile.is_zipfile(path):
        out["files"] = [{"name": name, "size": where.get("size")}]
        m = _STREAM.match(name)
        if m:
            with open(path, "rb") as f:
                text, size, cut = _tail(f)
            out[m.group(2)] = {"name": name, "text": text, "size": size, "truncated": cut or size > TAIL}
        return out
    with zipfile.ZipFile(path) as zf:
        infos = zf.infolist()
        out["files"] = [{"name": i.filename, "size": i.file_size} for i in infos[:MAX_FILES]]
        if len(infos) > MAX_FILES:
            out["more_files"] = len(infos) - MAX_FILES
        for stream in ("stdout", "stderr"):
            # the captured stream is the last of its names (the job's own stdout.txt comes first)
            match = [i for i in infos if (m := _STREAM.match(i.filename)) and m.group(2) == stream]
            if match:
                info = match[-1]
                with zf.open(info) as f:
                    text, _, cut = _tail(f)
                out[stream] = {"name": info.filename, "text": text, "size": info.file_size,
                               "truncated": cut or info.file_size > TAIL}
    return out
