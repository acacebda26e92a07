"""``xw``: one command for everything (Typer + Rich).

``xw server`` runs the server, ``xw worker`` the worker; every other subcommand is an operation of
:mod:`xwhep.client.classic` (``xw submit`` runs exactly what ``xwsubmit`` runs, with the same options; under
``xw`` they may also be spelled without ``xw``: ``--label`` for ``--xwlabel``). Those arguments go to the
operation untouched (no Click parsing in between), so ``xw submit app -- --xwlike`` behaves as ``xwsubmit`` does.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Sequence

import typer

from xwhep.client import classic
from xwhep.client.x509 import app as x509_app
from xwhep.server.admin_cli import app as admin_app
from xwhep.server.ca_cli import app as ca_app
from xwhep.server.cli import server

app = typer.Typer(name="xw", no_args_is_help=True, add_completion=False, rich_markup_mode="rich",
                  help="xwhep: a secured desktop-grid middleware after XtremWeb-HEP. "
                       "Each command also exists as a classic xwCOMMAND script (xw submit = xwsubmit); "
                       "see [bold]xw COMMAND --help[/bold].")

app.command("server", help="Run the xwhep server (scheduler + repository). The first start initializes HOME.")(
    server)
app.add_typer(ca_app, name="ca", help="Manage the server's certificate authority: issue, revoke, CRL.")
app.add_typer(admin_app, name="admin", help="Operate a server from its machine: backup, restore.")
app.add_typer(x509_app, name="x509", help="Grid-style X.509 proxy certificates (proxy-init, proxy-info).")

_PASSTHROUGH = {"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []}


def _operation(name: str) -> Callable[[typer.Context], None]:
    def command(ctx: typer.Context) -> None:
        raise typer.Exit(classic.run(name, list(ctx.args), prog=f"xw {name}", xw_mode=True))

    command.__name__ = f"xw_{name}"
    return command


for _name, _cmd in classic.COMMANDS.items():
    _summary = _cmd.summary[0].upper() + _cmd.summary[1:] + "."
    app.command(_name, help=_summary, context_settings=_PASSTHROUGH, add_help_option=False,
                options_metavar=_cmd.synopsis.replace("[", "\\[") or None)(_operation(_name))
for _alias, _target in classic.ALIASES.items():
    app.command(_alias, help=f"Alias of [bold]xw {_target}[/bold].", context_settings=_PASSTHROUGH,
                add_help_option=False)(_operation(_alias))


def run_worker(argv: Sequence[str]) -> int:
    """``xw worker …``: hand everything after ``worker`` to the worker's own command line."""
    try:
        module = importlib.import_module("xwhep.worker.cli")
        entry = module.main
    except (ImportError, AttributeError) as exc:
        print(f"xw worker: error: the worker is not available in this installation ({exc})", file=sys.stderr)
        return 1
    try:
        rc = entry(list(argv))
    except KeyboardInterrupt:
        return 130
    return rc if isinstance(rc, int) else 0


@app.command("worker", context_settings=_PASSTHROUGH, add_help_option=False)
def worker(ctx: typer.Context) -> None:
    """Run a worker (see [bold]xw worker --help[/bold])."""
    raise typer.Exit(run_worker(ctx.args))


@app.command("bench", context_settings=_PASSTHROUGH, add_help_option=False)
def bench(ctx: typer.Context) -> None:
    """Run the benchmark suite (see [bold]xw bench --help[/bold]; needs the xwhep[bench] extra)."""
    raise typer.Exit(run_bench(ctx.args))


def run_bench(argv: Sequence[str]) -> int:
    from xwhep.bench.runner import main as bench_main

    return int(bench_main(list(argv)) or 0)


@app.command("demo")
def demo() -> None:
    """An embedded SQLite server, a local worker, a registered app, a submitted work, its result."""
    from xwhep.demo import main as demo_main

    raise typer.Exit(demo_main())


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of ``xw``."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] == "worker":
        sys.exit(run_worker(args[1:]))
    if args and args[0] == "bench":
        sys.exit(run_bench(args[1:]))
    if args and (args[0] in classic.COMMANDS or args[0] in classic.ALIASES):
        sys.exit(classic.run(args[0], args[1:], prog=f"xw {args[0]}", xw_mode=True))
    app(args=args, prog_name="xw")


if __name__ == "__main__":  # pragma: no cover
    main()
