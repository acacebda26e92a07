"""``xw worker`` / ``xwworker``: run a worker, or show what a running worker does and why it is idle."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Annotated

import typer

from xwhep.client.config import ConfigError

app = typer.Typer(add_completion=False, no_args_is_help=False, help="The xwhep worker (volunteer tier).")


@app.command("run")
def run_cmd(
    config: Annotated[Path | None, typer.Option("--config", "--xwconfig", help="Worker config (TOML)")] = None,
    workdir: Annotated[Path | None, typer.Option(help="Work directory (cache, jobs, spool)")] = None,
    pool: Annotated[int | None, typer.Option(help="Concurrent jobs (default: cores)")] = None,
    incoming_connections: Annotated[bool | None, typer.Option("--incoming-connections/--no-incoming-connections",
                                                              help="Accept works with listen ports")] = None,
    log_level: Annotated[str | None, typer.Option(help="debug, info (job start and end), warning, error "
                                                       "(default: $XW_LOG, else warning)")] = None,
    log_json: Annotated[bool, typer.Option("--log-json", help="Log JSON lines")] = False,
) -> None:
    """Register with the server and run jobs until interrupted."""
    from xwhep import logsetup as logs
    from xwhep.worker.config import load_worker_config
    from xwhep.worker.daemon import Worker

    try:
        logs.setup(log_level, log_json)
    except logs.LogSetupError as exc:
        raise ConfigError(str(exc)) from None
    cfg = load_worker_config(config, workdir, pool, incoming_connections)
    worker = Worker(cfg)
    signal.signal(signal.SIGTERM, lambda *_: worker.shutdown())
    signal.signal(signal.SIGINT, lambda *_: worker.shutdown())
    print(f"xwhep worker started (workdir {cfg.workdir}, pool {cfg.pool})", flush=True)
    page = None
    if cfg.status_port is not None:
        from xwhep.worker.statuspage import TOKEN_FILE, StatusPage

        page = StatusPage(cfg, cfg.status_port)
        url = page.start()
        print(f"xwhep worker status page at {url} (its key: {cfg.workdir / TOKEN_FILE}; "
              "'xwworker status --page' prints the address with it)", flush=True)
    try:
        worker.run()
    finally:
        if page is not None:
            page.stop()


@app.command("status")
def status_cmd(
    workdir: Annotated[Path | None, typer.Option(help="The worker's work directory")] = None,
    config: Annotated[Path | None, typer.Option("--config", "--xwconfig", help="Worker config")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the raw status")] = False,
    page: Annotated[bool, typer.Option("--page", help="Print the status page's address (with its key)")] = False,
) -> None:
    """What the worker runs now, and why it is idle."""
    if workdir is None:
        from xwhep.worker.config import load_worker_config

        workdir = load_worker_config(config).workdir
    if page:
        from xwhep.worker.statuspage import page_url

        url = page_url(workdir)
        if url is None:
            raise ConfigError(f"no status page for the worker in {workdir} (set [worker] status_port and restart "
                              "it; the key file must be readable)")
        print(url)
        return
    path = workdir / "status.json"
    if not path.exists():
        raise ConfigError(f"no worker status in {workdir} (is a worker running there?)")
    st = json.loads(path.read_text())
    alive = _pid_alive(st.get("pid"))
    if json_out:
        print(json.dumps({**st, "process_alive": alive}, indent=2))
        return
    print(f"host {st['host']} on {st['server']} — {'running' if alive else 'NOT RUNNING'} (pid {st['pid']}), "
          f"{'active' if st['active'] else 'inactive'}, pool {st['pool']}")
    for j in st["running"]:
        print(f"  {j['phase']:<10} work {j['work']}  app {j['app']}  for {time.time() - j['started']:.0f} s")
    if not st["running"]:
        print(f"  idle: {st['idle_reason']}")
    if st["results_pending"]:
        print(f"  {st['results_pending']} result(s) waiting for the server")
    for d in st.get("deliveries") or []:
        if d.get("last_error"):
            when = "now" if d["in_flight"] else f"in {max(0.0, (d['next_retry'] or 0) - time.time()):.0f} s"
            print(f"  {d['step']} of work {d['work']} (task {d['task']}) failing: {d['last_error']} "
                  f"— {d['attempts']} attempt(s), next {when}")
    for a in st.get("abandoned") or []:
        print(f"  result of work {a['work']} (task {a['task']}) given up: {a['reason']}")


@app.command("pause")
def pause_cmd(
    config: Annotated[Path | None, typer.Option("--config", "--xwconfig", help="Worker config (TOML)")] = None,
    workdir: Annotated[Path | None, typer.Option(help="The worker's work directory")] = None,
) -> None:
    """Pause the worker: its jobs stop (they go back to the server) and it takes none until 'xwworker resume'."""
    from xwhep.worker.config import load_worker_config
    from xwhep.worker.statuspage import pause

    cfg = load_worker_config(config, workdir)
    changed = pause(cfg)
    print(f"{'paused' if changed else 'already paused'} ({cfg.pause_file}); the worker stops within its "
          f"activation check ({cfg.activation_check_s:g} s)")


@app.command("resume")
def resume_cmd(
    config: Annotated[Path | None, typer.Option("--config", "--xwconfig", help="Worker config (TOML)")] = None,
    workdir: Annotated[Path | None, typer.Option(help="The worker's work directory")] = None,
) -> None:
    """Resume a paused worker."""
    from xwhep.worker.config import load_worker_config
    from xwhep.worker.statuspage import resume

    cfg = load_worker_config(config, workdir)
    changed = resume(cfg)
    print("resumed" if changed else f"not paused ({cfg.pause_file} does not exist)")


def _pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def main(argv: list[str] | None = None) -> None:
    """Entry point: ``xwworker [run] OPTIONS`` or ``xwworker status``; errors are one line, never a traceback."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or (args[0].startswith("-") and args[0] not in ("--help", "-h")):
        args = ["run", *args]
    try:
        app(args=args, prog_name="xwworker", standalone_mode=False)
    except ConfigError as exc:
        print(f"xwworker: error: {exc}", file=sys.stderr)
        sys.exit(1)
    except (typer.Abort, KeyboardInterrupt):
        sys.exit(130)
    except Exception as exc:  # click usage errors and anything else: one readable line
        import click

        if isinstance(exc, click.ClickException):
            print(f"xwworker: error: {exc.format_message()}", file=sys.stderr)
            sys.exit(exc.exit_code)
        print(f"xwworker: error: {exc}", file=sys.stderr)
        sys.exit(1)
