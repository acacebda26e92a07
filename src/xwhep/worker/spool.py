"""Results waiting for the server: kept on disk until acknowledged, re-sent after a restart or a network cut.

A spool entry is a directory ``spool/<task>/`` with the packed result (if any) and ``report.json``; the JSON is
written last and atomically, so an entry either exists whole or not at all.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass
class Entry:
    task: str
    report: dict[str, Any]
    result: Path | None
    data: str | None = None  # the server's data uid to upload the result to, once known

    @property
    def dir(self) -> Path:
        return self.result.parent if self.result else Path()


class Spool:
    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        for d in root.iterdir():  # left by a previous run before its commit: that job did not finish here
            if not (d / "report.json").is_file():
                shutil.rmtree(d, ignore_errors=True)

    def dir_for(self, task: str) -> Path:
        d = self.root / task
        d.mkdir(parents=True, exist_ok=True)
        return d

    def commit(self, task: str, report: dict[str, Any], result: Path | None, data: str | None = None) -> Entry:
        """Record a finished task (its result file already lies in :meth:`dir_for`)."""
        d = self.dir_for(task)
        tmp = d / "report.json.tmp"
        tmp.write_text(json.dumps({"report": report, "result": result.name if result else None, "data": data}))
        os.replace(tmp, d / "report.json")
        return Entry(task, report, result, data)

    def set_data(self, entry: Entry, data: str) -> None:
        entry.data = data
        self.commit(entry.task, entry.report, entry.result, data)

    def entries(self) -> list[Entry]:
        out = []
        for d in sorted(self.root.iterdir()):
            meta = d / "report.json"
            if not meta.is_file():  # a result being packed right now: not an entry yet
                continue
            m = json.loads(meta.read_text())
            out.append(Entry(d.name, m["report"], d / m["result"] if m["result"] else None, m.get("data")))
        return out

    def drop(self, task: str) -> None:
        shutil.rmtree(self.root / task, ignore_errors=True)

    def __contains__(self, task: str) -> bool:
        return (self.root / task / "report.json").is_file()
