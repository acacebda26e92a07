"""``xw admin``: operations on a server's home from the machine it runs on (backup, restore)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(no_args_is_help=True, add_completion=False,
                  help="Operate a server from its machine: backup and restore (docs/operations.md).")

Home = Annotated[Path, typer.Option(help="The server's home")]
Db = Annotated[str | None, typer.Option(help="The server's database URL when it is PostgreSQL (as given to "
                                             "xw server --db)")]


def _fail(text: str) -> None:
    print(f"xw admin: error: {text}", file=sys.stderr)
    raise typer.Exit(1)


@app.command("backup")
def backup_cmd(file: Annotated[Path, typer.Argument(help="The archive to write (.tar, or .tar.gz to compress)")],
               home: Home, db: Db = None) -> None:
    """Back up the database, the blobs and the home's keys into FILE; safe while the server runs."""
    from xwhep.server.backup import BackupError, backup

    try:
        r = backup(home, file.resolve(), db)
    except (BackupError, OSError) as exc:
        _fail(str(exc))
        return
    for sha in r.missing:
        print(f"xw admin: note: blob {sha} was deleted while the backup ran (its data was deleted meanwhile)",
              file=sys.stderr)
    print(f"{r.path}: {r.database} database, {r.blobs} blobs ({r.blob_bytes:,} bytes) in {r.seconds:.1f} s")


@app.command("restore")
def restore_cmd(file: Annotated[Path, typer.Argument(help="An archive made by xw admin backup")], home: Home,
                db: Db = None,
                force: Annotated[bool, typer.Option("--force", help="Replace what the home (or database) "
                                                                  "holds")] = False) -> None:
    """Restore FILE into a server home (not while a server runs on it); every member's checksum is verified
    before anything is moved into place. Start the server on the home afterwards."""
    from xwhep.server.backup import BackupError, restore

    try:
        r = restore(file.resolve(), home, db, force)
    except (BackupError, OSError) as exc:
        _fail(str(exc))
        return
    print(f"restored {r.database} database and {r.blobs} blobs ({r.blob_bytes:,} bytes) into {home} in "
          f"{r.seconds:.1f} s; start the server on it")
