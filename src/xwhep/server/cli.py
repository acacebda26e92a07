"""``xw server``: the server's command line (also ``python -m xwhep.server``)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from xwhep.server.config import ServerConfig


def server(
    home: Annotated[Path, typer.Option(help="Server home: database, blobs, PKI, admin.conf, worker.conf")],
    host: Annotated[str, typer.Option(help="Address to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port (0: any free port; the ready line tells which)")] = 4330,
    db: Annotated[str | None, typer.Option(help="Database URL, e.g. postgresql://user@host/db "
                                                "(default: SQLite in HOME)")] = None,
    insecure: Annotated[bool, typer.Option("--insecure", help="Plain HTTP instead of HTTPS")] = False,
    alive_period: Annotated[float, typer.Option(help="Seconds between worker alive signals")] = 30.0,
    alive_timeout: Annotated[float, typer.Option(help="Seconds of silence after which a task is LOST")] = 120.0,
    public_name: Annotated[str | None, typer.Option(help="host[:port] used in xw:// URIs")] = None,
    log_level: Annotated[str | None, typer.Option(help="debug, info (access log, work transitions), warning, "
                                                       "error (default: $XW_LOG, else warning)")] = None,
    log_json: Annotated[bool, typer.Option("--log-json", help="Log JSON lines (ts, level, logger, msg, "
                                                              "fields)")] = False,
) -> None:
    """Run the xwhep server (scheduler + repository). The first start initializes HOME."""
    from xwhep.server.logs import LogSetupError, level_of
    from xwhep.server.main import serve

    if alive_timeout <= 0 or alive_period <= 0:
        raise typer.BadParameter("alive period and timeout must be positive")
    try:
        level_of(log_level)
    except LogSetupError as exc:
        raise typer.BadParameter(str(exc)) from None
    serve(ServerConfig(home=home.resolve(), host=host, port=port, db_url=db, insecure=insecure,
                       alive_period=alive_period, alive_timeout=alive_timeout, public_name=public_name,
                       log_level=log_level, log_json=log_json))


def main() -> None:
    typer.run(server)
