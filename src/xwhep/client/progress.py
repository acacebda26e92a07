"""Progress on stderr: Rich bars on a terminal, one plain line per event otherwise (logs, pipes, CI).

stdout stays for the command's result (URIs, listings), so a script can capture it while a person still sees
the transfers.
"""

from __future__ import annotations

import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TextIO

FINAL = ("COMPLETED", "ERROR", "FAILED")


def human_size(n: float) -> str:
    """``1536`` → ``1.5 kB`` (decimal units, as Rich shows them)."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"  # pragma: no cover - the loop always returns


class Reporter:
    """Where a command tells about long operations. ``tty`` defaults to whether the stream is a terminal."""

    def __init__(self, prog: str, stream: TextIO | None = None, tty: bool | None = None) -> None:
        self.prog = prog
        self.stream = stream if stream is not None else sys.stderr
        self.tty = self._isatty() if tty is None else tty

    def _isatty(self) -> bool:
        try:
            return bool(self.stream.isatty())
        except (AttributeError, ValueError):
            return False

    def note(self, text: str) -> None:
        """One line of chatter (``prog: text``)."""
        print(f"{self.prog}: {text}", file=self.stream, flush=True)

    def _console(self) -> Any:
        from rich.console import Console

        return Console(file=self.stream)

    @contextmanager
    def transfer(self, verb: str, label: str, total: int | None = None) -> Iterator[Callable[[int], None]]:
        """Yield a ``progress(nbytes)`` callback for one upload/download; on success, a summary line when plain."""
        start = time.monotonic()
        done = 0
        if self.tty:
            from rich.progress import (
                BarColumn,
                DownloadColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
                TransferSpeedColumn,
            )

            with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                          TimeRemainingColumn(), console=self._console(), transient=True) as bar:
                task = bar.add_task(f"{verb} {label}", total=total)

                def advance(n: int) -> None:
                    nonlocal done
                    done += n
                    bar.update(task, advance=n)

                yield advance
        else:
            def count(n: int) -> None:
                nonlocal done
                done += n

            yield count
        took = time.monotonic() - start
        self.note(f"{verb} {label} ({human_size(done)} in {took:.1f} s)")

    @contextmanager
    def waiting(self, names: dict[str, str]) -> Iterator[Callable[[str, str], None]]:
        """Yield an ``on_change(uid, status)`` callback while works are waited for; ``names`` maps uid → URI."""
        status: dict[str, str] = {}
        if self.tty:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            with Progress(TextColumn("waiting"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.description}"),
                          TimeElapsedColumn(), console=self._console(), transient=True) as bar:
                task = bar.add_task("", total=len(names))

                def update(uid: str, new: str) -> None:
                    status[uid] = new
                    counts = Counter(status.values())
                    text = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
                    bar.update(task, completed=sum(counts[s] for s in FINAL), description=text)

                yield update
        else:
            def line(uid: str, new: str) -> None:
                status[uid] = new
                self.note(f"{names.get(uid, uid)} {new}")

            yield line
