"""Results waiting for the server: kept on disk until acknowledged, re-sent after a restart or a network cut.

A spool entry is a directory ``spool/<task>/`` with the packed result (if any) and ``report.json``; the JSON is
written last and atomically, so an entry either exists whole or not at all. Who may touch an entry is decided by
:class:`~xwhep.worker.state.WorkerState` (one owner at a time); this module only reads and writes files, and
never raises because an entry vanished.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("xwhep.worker")


@dataclass
class Entry:
    task: str
    report: dict[str, Any]
    result: Path | None
    work: str | None = None


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

    def commit(self, task: str, report: dict[str, Any], result: Path | None, work: str | None = None) -> Entry:
        """Record a finished task (its result file already lies in :meth:`dir_for`)."""
        d = self.dir_for(task)
        tmp = d / "report.json.tmp"
        tmp.write_text(json.dumps({"report": report, "result": result.name if result else None, "work": work}))
        os.replace(tmp, d / "report.json")
        return Entry(task, report, result, work)

    def entries(self) -> list[Entry]:
        """The committed entries; one that cannot be read is removed (its task will be declared LOST)."""
        out = []
        try:
            dirs = sorted(self.root.iterdir())
        except FileNotFoundError:
            return []
        for d in dirs:
            meta = d / "report.json"
            try:
                m = json.loads(meta.read_text())
                report = m["report"]
                if not isinstance(report, dict) or report.get("task") != d.name:
                    raise ValueError("the report is not this task's")
            except FileNotFoundError:  # a result being packed right now, or removed meanwhile: not an entry
                continue
            except (OSError, ValueError, KeyError, TypeError) as exc:
                log.error("spool entry %s is unreadable (%s): removed", d.name, exc)
                self.drop(d.name)
                continue
            out.append(Entry(d.name, report, d / m["result"] if m.get("result") else None, m.get("work")))
        return out

    def drop(self, task: str) -> None:
        shutil.rmtree(self.root / task, ignore_errors=True)

    def __contains__(self, task: str) -> bool:
        return (self.root / task / "report.json").is_file()
