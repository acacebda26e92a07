"""The commands, once: XWHEP's classic ``xw*`` scripts and the ``xw <command>`` forms run the same functions.

XWHEP options are spelled ``--xwNAME VALUE`` and may come anywhere; bare arguments are typed by what they look
like (a uid or ``xw://`` URI, an OS, a CPU, an app type, an existing file). argparse would accept prefixes and
mis-handle a job's own ``--flags``, so a small parser lives here. Under ``xw`` an option may also be spelled
``--NAME`` (before a work's own arguments start).

Exit codes: 0 success; 1 a refusal or failure (one ``prog: error: …`` line on stderr); 2 a usage error;
3 ``wait`` timed out; 130 interrupted.
"""

from __future__ import annotations

import getpass
import json
import os
import re
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xwhep import __version__
from xwhep.client import output
from xwhep.client.config import ConfigError
from xwhep.client.progress import Reporter
from xwhep.client.sdk import Client, XwError, uid_of, zip_dir
from xwhep.core.model import KNOWN_CPU, KNOWN_OS, AppType, UsageLevel, normalize_cpu, normalize_os
from xwhep.core.rights import BadRights, format_rights, parse_rights
from xwhep.core.uri import BadUri, to_uid

EXIT_OK, EXIT_FAIL, EXIT_USAGE, EXIT_TIMEOUT, EXIT_INTERRUPTED = 0, 1, 2, 3, 130


class UsageError(Exception):
    """A malformed command line (exit 2)."""


# -- typing bare arguments ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Bare:
    """A bare argument and what it looks like: ``ref`` (uid/URI, value is the uid), ``os``, ``cpu``,
    ``apptype`` (values normalized), ``file`` (an existing path) or ``text``."""

    kind: str
    value: str
    raw: str


_OS_ALIASES = {"darwin", "mac", "windows"}
_CPU_ALIASES = {"x64", "i386"}


def classify(arg: str, exists: Callable[[str], bool] = os.path.exists) -> Bare:
    """Type one bare argument as XWHEP did. Keywords win over same-named files (``linux`` is an OS)."""
    try:
        return Bare("ref", to_uid(arg), arg)
    except BadUri:
        pass
    low = arg.strip().lower()
    if low in KNOWN_OS or low in _OS_ALIASES:
        return Bare("os", "java" if low == "java" else normalize_os(low), arg)
    if low in KNOWN_CPU or low in _CPU_ALIASES:
        return Bare("cpu", normalize_cpu(low), arg)
    if arg.strip().upper() in AppType.__members__:
        return Bare("apptype", arg.strip().upper(), arg)
    if arg and exists(arg):
        return Bare("file", arg, arg)
    return Bare("text", arg, arg)


def looks_like_xw_uri(arg: str) -> bool:
    """True for anything that tries to be an ``xw://`` URI (so a malformed one is reported as such)."""
    return arg.strip().lower().startswith("xw://")


@dataclass
class SendApp:
    """What ``xwsendapp`` was asked: the app name, its type, binaries per platform, a VM/container image."""

    name: str
    type: str | None = None
    binaries: dict[str, str] = field(default_factory=dict)
    image: str | None = None


def parse_sendapp(bare: Sequence[str], exists: Callable[[str], bool] = os.path.exists) -> SendApp:
    """``NAME [TYPE] [OS CPU | java] FILE|URI …``: each file or URI is the binary for the OS/CPU before it.

    A lone ``.jar`` needs no platform (it is ``java``); a file after VM or CONTAINER is the image.
    """
    if not bare:
        raise UsageError("missing the application name")
    app = SendApp(bare[0])
    os_: str | None = None
    cpu: str | None = None
    for arg in bare[1:]:
        b = classify(arg, exists)
        if b.kind == "apptype":
            if app.type and app.type != b.value:
                raise UsageError(f"two application types: {app.type} and {b.value}")
            app.type = b.value
        elif b.kind == "os":
            os_ = b.value
        elif b.kind == "cpu":
            if b.value == "java":
                os_ = "java"
            else:
                cpu = b.value
        elif b.kind in ("file", "ref"):
            if os_ == "java" or (os_ is None and cpu is None and arg.lower().endswith(".jar")):
                platform = "java"
            elif os_ and cpu:
                platform = f"{os_}/{cpu}"
            elif os_ is None and cpu is None and app.type in ("VM", "CONTAINER"):
                if app.image:
                    raise UsageError(f"two images: {app.image} and {arg}")
                app.image = arg
                continue
            else:
                raise UsageError(f"binary {arg}: say which OS and CPU it is for (like: linux x86_64 {arg}), or java")
            app.binaries[platform] = arg
            os_ = cpu = None
        elif looks_like_xw_uri(arg):
            raise UsageError(f"malformed URI {arg!r}: expected xw://host/<uuid>")
        else:
            raise UsageError(f"no such file: {arg}")
    if os_ or cpu:
        raise UsageError(f"{' '.join(x for x in (os_, cpu) if x)}: no binary file or URI follows")
    return app


def parse_senddata(bare: Sequence[str], exists: Callable[[str], bool] = os.path.exists) -> list[tuple[str | None, str]]:
    """``[NAME] FILE …`` → ``[(name or None, path)]``; a NAME (not a file) is allowed only before a single file."""
    if not bare:
        raise UsageError("missing the file to send")
    texts = [a for a in bare if not exists(a)]
    files = [a for a in bare if exists(a)]
    if not texts:
        return [(None, f) for f in files]
    if len(texts) == 1 and len(files) == 1 and bare[0] == texts[0]:
        return [(texts[0], files[0])]
    missing = texts[-1]
    raise UsageError(f"malformed URI {missing!r}: expected xw://host/<uuid>" if looks_like_xw_uri(missing)
                     else f"no such file: {missing}")


def parse_envvars(values: Iterable[str]) -> dict[str, str]:
    """``K=V,K2=V2`` (the option may be repeated) → a dict."""
    env: dict[str, str] = {}
    for value in values:
        for item in value.split(","):
            if not item.strip():
                continue
            key, sep, val = item.partition("=")
            if not sep or not key.strip():
                raise UsageError(f"--xwenvvars: {item!r} is not NAME=VALUE")
            env[key.strip()] = val
    return env


def parse_int(option: str, value: str, lo: int = 0) -> int:
    """A whole-number option value, with a readable refusal."""
    try:
        n = int(value.strip())
    except ValueError:
        raise UsageError(f"--xw{option}: expected a whole number, got {value!r}") from None
    if n < lo:
        raise UsageError(f"--xw{option}: must be at least {lo}, got {n}")
    return n


def parse_packages(value: str) -> dict[str, str]:
    """``ROOT=6.30,geant4`` → ``{"ROOT": "6.30", "geant4": ""}``."""
    out = {}
    for item in value.split(","):
        if item.strip():
            name, _, version = item.partition("=")
            out[name.strip()] = version.strip()
    return out


# -- the argv parser -----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Opt:
    """One ``--xwNAME`` option; ``metavar`` None makes it a flag."""

    name: str
    metavar: str | None
    help: str


@dataclass
class Parsed:
    """A parsed command line: option values (every occurrence, in order), bare arguments, help asked."""

    opts: dict[str, list[str]] = field(default_factory=dict)
    bare: list[str] = field(default_factory=list)
    help: bool = False

    def get(self, name: str) -> str | None:
        """The last value given for option ``name``."""
        values = self.opts.get(name)
        return values[-1] if values else None

    def flag(self, name: str) -> bool:
        """Whether option ``name`` was given."""
        return name in self.opts


def parse_argv(argv: Sequence[str], options: Mapping[str, Opt], *, plain: bool = False,
               raw_after: int | None = None) -> Parsed:
    """Split ``argv`` into options and bare arguments.

    ``--xwNAME VALUE`` / ``--xwNAME=VALUE`` anywhere (until ``--``); with ``plain`` also ``--NAME``. Once
    ``raw_after`` bare arguments are seen, the rest is kept as given except ``--xw`` options (a work's own
    command line: ``xwsubmit app -v --out x``). Unknown ``--xw…`` options are usage errors, and so are unknown
    ``--…`` ones outside a work's command line; no prefix matching.
    """
    out = Parsed()
    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        i += 1
        raw = raw_after is not None and len(out.bare) >= raw_after
        if arg == "--":
            out.bare.extend(args[i:])
            break
        if arg == "--xwhelp" or (not raw and arg in ("-h", "--help")):
            out.help = True
            continue
        if arg.startswith("--") and len(arg) > 2:
            body, eq, inline = arg[2:].partition("=")
            if body.startswith("xw") and body[2:] in options:
                name = body[2:]
            elif body.startswith("xw"):
                raise UsageError(f"unknown option --{body}")
            elif plain and not raw and body in options:
                name = body
            elif raw:
                out.bare.append(arg)
                continue
            else:
                raise UsageError(f"unknown option --{body}")
            opt = options[name]
            if opt.metavar is None:
                if eq:
                    raise UsageError(f"option --xw{name} takes no value")
                out.opts.setdefault(name, []).append("")
                continue
            if eq:
                value = inline
            elif i < len(args):
                value = args[i]
                i += 1
            else:
                raise UsageError(f"option --xw{name} needs a value ({opt.metavar})")
            out.opts.setdefault(name, []).append(value)
            continue
        out.bare.append(arg)
    return out


# -- commands --------------------------------------------------------------------------------------------------------

CONFIG = Opt("config", "FILE", "client config file (default: $XW_CONFIG, else ~/.xwhep/client.conf)")
FORMAT = Opt("format", "FMT", "output format: short, text, csv, xml, json or html (default: short)")
HELP = Opt("help", None, "show this help")
ONBEHALF = Opt("onbehalfof", "LOGIN|URI",
               "a MANDATED_USER acting for the user who mandated it (default: $XW_ON_BEHALF_OF, else on_behalf_of "
               "in the client config)")
RIGHTS = Opt("rights", "RIGHTS", "access rights, like 0x755, 755 or go-rwx")
OUT = Opt("out", "DIR", "directory to download into (default: the current directory)")
MINS = (Opt("minmemory", "MB", "minimum memory in MiB"), Opt("mincpuspeed", "MHz", "minimum CPU speed in MHz"),
        Opt("mindisk", "MB", "minimum free disk in MiB"))
ENVVARS = Opt("envvars", "K=V,…", "environment variables (repeatable)")


@dataclass(frozen=True)
class Command:
    """One operation: its function, usage line, summary and options (besides --xwconfig and --xwhelp)."""

    name: str
    func: Callable[[Call], int]
    synopsis: str
    summary: str
    options: tuple[Opt, ...] = ()
    raw_after: int | None = None
    classic: bool = True  # has an xwNAME script

    def all_options(self) -> dict[str, Opt]:
        """Its options plus the common ones, by name."""
        return {o.name: o for o in (CONFIG, ONBEHALF, HELP, *self.options)}


class Call:
    """One invocation: the parsed command line, the (lazily built) client, stdout and progress."""

    def __init__(self, command: Command, prog: str, parsed: Parsed, xw_mode: bool = False) -> None:
        self.command = command
        self.prog = prog
        self.parsed = parsed
        self.xw_mode = xw_mode
        self.bare = parsed.bare
        self.progress = Reporter(prog)
        self._client: Client | None = None

    @property
    def client(self) -> Client:
        """The SDK client, built from the config on first use (so --xwhelp and usage errors need none)."""
        if self._client is None:
            self._client = Client.from_config(self.parsed.get("config"), on_behalf_of=self.parsed.get("onbehalfof"))
        return self._client

    def close(self) -> None:
        """Release the HTTP connections."""
        if self._client is not None:
            self._client.close()

    def opt(self, name: str) -> str | None:
        """The last value of ``--xwNAME``, or None."""
        return self.parsed.get(name)

    def flag(self, name: str) -> bool:
        """Whether ``--xwNAME`` was given."""
        return self.parsed.flag(name)

    def int_opt(self, name: str, lo: int = 0) -> int | None:
        """``--xwNAME`` as a whole number (at least ``lo``), or None."""
        value = self.opt(name)
        return None if value is None else parse_int(name, value, lo)

    @property
    def fmt(self) -> str:
        """The checked ``--xwformat`` (default ``short``)."""
        fmt = (self.opt("format") or "short").lower()
        if fmt not in output.FORMATS:
            raise UsageError(f"--xwformat: {fmt!r} is not one of {', '.join(output.FORMATS)}")
        return fmt

    def print(self, text: str) -> None:
        """A result on stdout (nothing for empty text)."""
        if text:
            print(text, flush=True)

    def error(self, text: str) -> None:
        """One error line on stderr, for a failure that does not stop the command."""
        print(f"{self.prog}: error: {text}", file=sys.stderr, flush=True)

    def note(self, text: str) -> None:
        """One line on stderr about something not done, on purpose (not a failure)."""
        print(f"{self.prog}: note: {text}", file=sys.stderr, flush=True)

    def refs(self) -> list[str]:
        """The bare arguments as uids (a malformed one is an error naming it)."""
        return [uid_of(a) for a in self.bare]


def _stage(call: Call, value: str, option: str, env: bool = False) -> str:
    """An input given on the command line, as a data uid: a file or directory is uploaded (a directory, or a
    non-zip file for ``--xwenv``, zipped first) with progress; a uid or URI is used as is."""
    p = Path(value).expanduser()
    if p.exists():
        if p.is_dir() or (env and not zipfile.is_zipfile(p)):
            with tempfile.TemporaryDirectory(prefix="xw-") as tmp:
                z = zip_dir(p.resolve(), Path(tmp) / ((p.resolve().name or "env") + ".zip"))
                return _upload(call, z)
        return _upload(call, p)
    try:
        return to_uid(value)
    except BadUri:
        if looks_like_xw_uri(value):
            raise XwError(f"{option}: malformed URI {value!r}: expected xw://host/<uuid>") from None
        raise XwError(f"{option}: no such file or directory, and not a uid or URI: {value}") from None


def _upload(call: Call, path: Path, name: str | None = None, rights: str | None = None,
            type: str | None = None) -> str:
    with call.progress.transfer("uploaded", name or path.name, path.stat().st_size) as bar:
        data = call.client.put_data(path, name=name, access_rights=rights, type=type, progress=bar)
    return str(data["uid"])


def _uri(call: Call, obj: Mapping[str, Any]) -> str:
    return str(obj.get("uri") or call.client.uri(str(obj["uid"])))


def _one_of_kind(call: Call, ref: str, kind: str) -> dict[str, Any]:
    obj = call.client.get(ref)
    found = obj.pop("kind", kind)
    if found != kind:
        raise XwError(f"{ref} is a {found}, not a {kind}")
    return obj


# -- creating ------------------------------------------------------------------------------------------------------

def op_sendapp(call: Call) -> int:
    """Register an application, or add binaries to one; prints its URI."""
    spec = parse_sendapp(call.bare)
    settings: dict[str, Any] = {
        "env": parse_envvars(call.parsed.opts.get("envvars", [])) or None,
        "min_memory": call.int_opt("minmemory"), "min_cpuspeed": call.int_opt("mincpuspeed"),
        "min_disk": call.int_opt("mindisk"), "access_rights": _rights_opt(call),
        "packages": parse_packages(call.opt("packages") or "") or None,
    }
    atype = spec.type or _existing_type(call, spec.name)
    bins: dict[str, str | os.PathLike[str]] = {plat: _stage(call, value, "binary")
                                                for plat, value in spec.binaries.items()}
    if spec.image:
        settings["image"] = _stage(call, spec.image, "image")
    for key, option, env in (("default_stdin", "stdin", False), ("default_dirin", "env", True),
                             ("base_dirin", "basedirin", True)):
        if call.opt(option):
            settings[key] = _stage(call, str(call.opt(option)), f"--xw{option}", env)
    app = call.client.put_app(spec.name, type=atype, binaries=bins, **settings)
    call.print(_uri(call, app))
    return EXIT_OK


def _existing_type(call: Call, name: str) -> str:
    """The type of the app being updated (the API would otherwise reset it to DEPLOYABLE)."""
    try:
        return str(call.client.app(name)["type"])
    except XwError as exc:
        if exc.status == 404:
            return "DEPLOYABLE"
        raise


def _rights_opt(call: Call) -> str | None:
    value = call.opt("rights")
    if value is not None:
        try:
            parse_rights(value)
        except BadRights as exc:
            raise UsageError(f"--xwrights: {exc}") from None
    return value


def op_senddata(call: Call) -> int:
    """Send files as data; prints one URI per file."""
    items = parse_senddata(call.bare)
    rights = _rights_opt(call)
    for name, path in items:
        uid = _upload(call, Path(path), name=name, rights=rights, type=call.opt("type"))
        call.print(call.client.uri(uid))
    return EXIT_OK


def op_submit(call: Call) -> int:
    """Submit one work: ``APP [ARGS…]``; prints its URI."""
    if not call.bare:
        raise UsageError("missing the application (a name, uid or URI)")
    app, args = call.bare[0], call.bare[1:]
    if looks_like_xw_uri(app):
        uid_of(app)  # a malformed URI is reported as such, not as an unknown app name
    kw: dict[str, Any] = {
        "args": list(args) or None, "label": call.opt("label"), "group": call.opt("group"),
        "session": call.opt("session"), "expected_host": call.opt("expectedhost"),
        "listen_ports": call.opt("listenport"), "forward_addresses": call.opt("forwardaddresses"),
        "requirements": call.opt("requirements"), "rank": call.opt("rank"),
        "max_retries": call.int_opt("maxretries"), "replicas": call.int_opt("replicas", 1),
        "wallclock": call.int_opt("wallclock", 1), "min_memory": call.int_opt("minmemory"),
        "min_cpuspeed": call.int_opt("mincpuspeed"), "min_disk": call.int_opt("mindisk"),
        "env": parse_envvars(call.parsed.opts.get("envvars", [])) or None, "access_rights": _rights_opt(call),
    }
    if call.opt("env") or call.opt("stdin"):
        call.client.app(app)  # refuse an unknown app before uploading its inputs for nothing
        if call.opt("env"):
            kw["xwenv"] = _stage(call, str(call.opt("env")), "--xwenv", env=True)
        if call.opt("stdin"):
            kw["stdin"] = _stage(call, str(call.opt("stdin")), "--xwstdin")
    work = call.client.submit(app, **kw)
    call.print(_uri(call, work))
    return EXIT_OK


def op_senduser(call: Call) -> int:
    """Create a user: ``LOGIN [PASSWORD] [EMAIL] [LEVEL] [USERGROUP]``; prints its URI."""
    if not call.bare:
        raise UsageError("missing the login")
    login, rest = call.bare[0], list(call.bare[1:])
    password = rest.pop(0) if rest else None
    email, level, group = call.opt("email"), call.opt("level"), call.opt("usergroup")
    for arg in rest:
        if "@" in arg and email is None:
            email = arg
            continue
        try:
            level = UsageLevel.parse(arg).name
            continue
        except ValueError:
            pass
        if group is None:
            group = arg  # a label, uid or URI: the server resolves all three
        else:
            raise UsageError(f"unexpected argument {arg!r}")
    if level is not None:
        try:
            level = UsageLevel.parse(level).name
        except ValueError as exc:
            raise UsageError(str(exc)) from None
    if password is None:
        if not sys.stdin.isatty():
            raise UsageError(f"missing the password of {login}")
        password = getpass.getpass(f"password for {login}: ")
    user = call.client.create_user(login, password, level=level or "STANDARD_USER", usergroup=group, email=email)
    call.print(_uri(call, user))
    return EXIT_OK


def op_sendusergroup(call: Call) -> int:
    """Create user groups, one per LABEL; prints their URIs."""
    if not call.bare:
        raise UsageError("missing the user group label")
    for label in call.bare:
        call.print(_uri(call, call.client.create_usergroup(label)))
    return EXIT_OK


# -- listing -------------------------------------------------------------------------------------------------------

def _show(call: Call, kind: str, objs: Sequence[Mapping[str, Any]]) -> int:
    call.print(output.render(kind, objs, call.fmt))
    return EXIT_OK


def _list_filtered(call: Call, kind: str, everything: Callable[[], list[dict[str, Any]]]) -> int:
    """All objects, or just the named ones (looked up in the listing, so computed fields stay)."""
    fmt = call.fmt  # a bad format is refused before any request
    refs = call.refs()
    objs = everything()
    if refs:
        by_uid = {o["uid"]: o for o in objs}
        objs = [by_uid[r] if r in by_uid else _one_of_kind(call, r, kind) for r in refs]
    call.print(output.render(kind, objs, fmt))
    return EXIT_OK


def op_apps(call: Call) -> int:
    """List applications (all readable ones, or the given names/uids/URIs)."""
    fmt = call.fmt
    for a in call.bare:
        if looks_like_xw_uri(a):
            uid_of(a)
    objs = [call.client.app(a) for a in call.bare] if call.bare else call.client.apps()
    call.print(output.render("app", objs, fmt))
    return EXIT_OK


def op_datas(call: Call) -> int:
    """List data (all readable ones, or the given uids/URIs)."""
    fmt = call.fmt
    refs = call.refs()
    objs = [call.client.data(r) for r in refs] if refs else call.client.datas()
    call.print(output.render("data", objs, fmt))
    return EXIT_OK


def _works(call: Call) -> list[dict[str, Any]]:
    refs = call.refs()
    if refs:
        return [call.client.work(r) for r in refs]
    return call.client.works(status=call.opt("status"), label=call.opt("label"), group=call.opt("group"),
                             session=call.opt("session"), app=call.opt("app"))


def op_works(call: Call) -> int:
    """List works (jobs): all readable ones, the given ones, or those matching the filters."""
    call.fmt  # noqa: B018 - a bad format is refused before any request
    return _show(call, "work", _works(call))


def op_status(call: Call) -> int:
    """The status of works: ``URI STATUS [rc=N]`` per line in the short format."""
    fmt = call.fmt
    objs = _works(call)
    if fmt == "short":
        rows = [[_uri(call, w), w["status"], *([f"rc={w['return_code']}"] if w.get("return_code") is not None
                                               else [])] for w in objs]
        call.print(output.columns(rows))
        return EXIT_OK
    return _show(call, "work", objs)


def op_users(call: Call) -> int:
    """List users."""
    return _list_filtered(call, "user", call.client.users)


def op_usergroups(call: Call) -> int:
    """List user groups."""
    return _list_filtered(call, "usergroup", call.client.usergroups)


def op_workers(call: Call) -> int:
    """List workers (hosts)."""
    return _list_filtered(call, "host", call.client.hosts)


def _bags(kind: str) -> Callable[[Call], int]:
    def op(call: Call) -> int:
        label = call.opt("create")
        if label is not None:
            if call.bare:
                raise UsageError("--xwcreate takes no other argument")
            call.print(_uri(call, call.client.create_bag(kind, label or None)))
            return EXIT_OK
        return _list_filtered(call, kind, lambda: call.client.bags(kind))

    op.__doc__ = f"List {kind}s, or create one with --xwcreate LABEL (prints its URI)."
    return op


def op_events(call: Call) -> int:
    """The event log: an object's history, or your own actions (everything for an administrator); with
    ``--follow``, the events you may see as they happen."""
    fmt = call.fmt
    refs = call.refs()
    if len(refs) > 1:
        raise UsageError("give at most one object")
    if call.flag("follow"):
        return _follow(call, refs[0] if refs else None, fmt)
    for name in ("action", "count"):
        if call.opt(name) is not None:
            raise UsageError(f"--xw{name} goes with --xwfollow")
    limit = call.int_opt("limit", 1) or 1000
    call.print(output.render("event", call.client.events(refs[0] if refs else None, limit=limit), fmt))
    return EXIT_OK


def _follow(call: Call, ref: str | None, fmt: str) -> int:
    """Print events as they come (one line each: short, or JSON lines) until interrupted or ``--count``."""
    if fmt not in ("short", "json"):
        raise UsageError("--xwfollow prints short lines or JSON lines: --xwformat short or json")
    count = call.int_opt("count", 1)

    def notice(kind: str, data: dict[str, Any]) -> None:
        if kind == "gap":
            call.note(f"events {data.get('missed_after')}..{data.get('missed_through')} were not replayed "
                      "(too many missed)")
        elif kind == "end":
            call.note(f"the server ended the stream ({data.get('reason')}); reconnecting")
        else:
            call.note(f"stream interrupted ({data.get('reason')}); reconnecting")

    for seen, event in enumerate(call.client.follow_events(ref, action=call.opt("action"), on_notice=notice), 1):
        if fmt == "json":
            call.print(json.dumps(event, separators=(",", ":")))
        else:
            call.print("  ".join(cell for cell in output.short_row("event", event) if cell))
        if count is not None and seen >= count:
            break
    return EXIT_OK


# -- results, downloads, removal, rights -------------------------------------------------------------------------------

def _outdir(call: Call) -> Path:
    out = Path(call.opt("out") or ".").expanduser()
    out.mkdir(parents=True, exist_ok=True)
    return out


def op_results(call: Call) -> int:
    """Download the results of completed works (all of yours when none is given), verify them, and erase the
    works unless --xwnoerase; prints the downloaded paths."""
    refs = call.refs()
    out = _outdir(call)
    me = call.client.me()["uid"]
    if refs:
        works = [call.client.work(r) for r in refs]
    else:
        works = [w for w in call.client.works(status="COMPLETED") if w.get("owner") == me]
    failed = 0
    for w in works:
        uri = _uri(call, w)
        if w["status"] != "COMPLETED":
            call.error(f"{uri} is {w['status']}, not COMPLETED; no result to download")
            failed += 1
            continue
        try:
            with call.progress.transfer("downloaded", f"result of {w['uid']}", w.get("result_size")) as bar:
                path = call.client.fetch_result(w["uid"], out, progress=bar)
        except XwError as exc:
            call.error(_message(exc))
            failed += 1
            continue
        call.print(str(path))
        if call.flag("noerase"):
            continue
        if w.get("owner") != me:  # readable is not deletable: erase only one's own works
            call.note(f"{uri}: downloaded, not erased: it is another user's work")
            continue
        try:
            call.client.delete_work(w["uid"])
        except XwError as exc:
            call.error(f"{uri}: downloaded, not erased: {_message(exc)}")
            failed += 1
    return EXIT_FAIL if failed else EXIT_OK


def op_download(call: Call) -> int:
    """Download data (or a work's result) by uid/URI; prints the paths."""
    refs = call.refs()
    if not refs:
        raise UsageError("missing the data to download (a uid or URI)")
    out = _outdir(call)
    for ref in refs:
        obj = call.client.get(ref)
        kind = obj.get("kind")
        if kind == "work":
            with call.progress.transfer("downloaded", f"result of {ref}", None) as bar:
                path = call.client.fetch_result(ref, out, progress=bar)
        elif kind == "data":
            if obj.get("status") != "AVAILABLE":
                raise XwError(f"data {ref} is {obj.get('status')}; nothing to download yet")
            name = _safe_name(str(obj.get("name") or ""), ref)
            with call.progress.transfer("downloaded", name, obj.get("size")) as bar:
                path = call.client.download(ref, out / name, progress=bar, expected_sha256=obj.get("sha256"))
        else:
            raise XwError(f"{ref} is a {kind}, not a data or a work")
        call.print(str(path))
    return EXIT_OK


def _safe_name(name: str, fallback: str) -> str:
    """The last component of a data's name, never a path that leaves the output directory."""
    base = name.replace("\\", "/").split("/")[-1]
    return base if base not in ("", ".", "..") else fallback


def _remove(client: Client, kind: str, obj: Mapping[str, Any]) -> None:
    uid = str(obj["uid"])
    if kind == "work":
        client.delete_work(uid)
    elif kind == "data":
        client.delete_data(uid)
    elif kind == "app":
        client.delete_app(uid)
    elif kind in ("session", "group"):
        client.delete_bag(kind, uid)
    elif kind == "user":
        client.delete_user(uid)
    elif kind == "host":
        client.delete_host(uid)
    else:
        raise XwError(f"{obj.get('uri') or uid}: removing a {kind} is not supported")


def op_rm(call: Call) -> int:
    """Remove objects of any kind (works, data, apps, sessions, groups, users, hosts)."""
    if not call.bare:
        raise UsageError("missing the objects to remove (uids or URIs)")
    failed = 0
    for arg in call.bare:
        try:
            obj = call.client.get(uid_of(arg))
            _remove(call.client, str(obj.pop("kind")), obj)
        except XwError as exc:
            call.error(_message(exc))
            failed += 1
    return EXIT_FAIL if failed else EXIT_OK


def op_chmod(call: Call) -> int:
    """``RIGHTS URI…``: change access rights (0x755, 755, go-rwx, o+r); prints ``URI RIGHTS`` per object."""
    if len(call.bare) < 2:
        raise UsageError("usage: RIGHTS URI… (like: 0x755 xw://host/uid)")
    rights, refs = call.bare[0], [uid_of(a) for a in call.bare[1:]]
    try:
        asked = parse_rights(rights)
    except BadRights as exc:
        raise UsageError(str(exc)) from None
    absolute = rights.strip().lower().startswith("0x") or rights.strip().isdigit()  # not relative like go-w
    failed = 0
    for ref in refs:
        try:
            res = call.client.chmod(ref, rights)
        except XwError as exc:  # refused, with the server's reason: one line per object, go on with the others
            call.error(f"{call.client.uri(ref)}: {_message(exc)}")
            failed += 1
            continue
        stored = res["access_rights"]
        if absolute and parse_rights(stored) != asked:  # a server that trims what it was asked must not look fine
            call.error(f"{call.client.uri(res['uid'])}: the server stored {stored}, not {format_rights(asked)} as "
                       "asked")
            failed += 1
            continue
        call.print(f"{call.client.uri(res['uid'])} {stored}")
    return EXIT_FAIL if failed else EXIT_OK


def op_mandate(call: Call) -> int:
    """``[list]`` | ``grant LOGIN [--xwexpires S] [--xwmandator LOGIN]`` | ``revoke URI…``: mandates, which let a
    MANDATED_USER (a portal) act on a user's behalf (it then passes --xwonbehalfof)."""
    action = call.bare[0] if call.bare else "list"
    args = list(call.bare[1:])
    if action == "list":
        fmt = call.fmt
        if args:
            raise UsageError(f"unexpected argument {args[0]!r} (list takes none)")
        call.print(output.render("mandate", call.client.mandates(), fmt))
        return EXIT_OK
    if action == "grant":
        if len(args) != 1:
            raise UsageError("usage: grant LOGIN (the MANDATED_USER to act on your behalf)")
        expires = call.opt("expires")
        seconds = None
        if expires is not None:
            try:
                seconds = float(expires)
            except ValueError:
                raise UsageError(f"--xwexpires: expected seconds, not {expires!r}") from None
        call.print(_uri(call, call.client.grant_mandate(args[0], seconds, call.opt("mandator"))))
        return EXIT_OK
    if action == "revoke":
        if not args:
            raise UsageError("usage: revoke URI… (the mandates to end)")
        for arg in args:
            call.client.revoke_mandate(uid_of(arg))
        return EXIT_OK
    raise UsageError(f"unknown action {action!r}: list, grant or revoke")


# -- waiting and explaining ------------------------------------------------------------------------------------------

def op_why(call: Call) -> int:
    """Why is a work pending: per requirement, how many registered hosts satisfy it, and a verdict."""
    fmt = call.fmt
    refs = call.refs()
    if not refs:
        raise UsageError("missing the work (a uid or URI)")
    for i, ref in enumerate(refs):
        data = call.client.why(ref)
        if fmt == "json":
            call.print(json.dumps(data, indent=2))
            continue
        if i:
            call.print("")
        if sys.stdout.isatty():
            _why_rich(data)
        else:
            call.print(output.why_text(data))
    return EXIT_OK


def _why_rich(data: Mapping[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table()
    for col in ("requirement", "hosts", "example failure"):
        table.add_column(col)
    for name, hosts, sample in output.why_rows(data):
        ok, of = hosts.split("/")
        style = "red" if ok == "0" and of != "0" else None
        table.add_row(name, hosts, sample, style=style)
    console = Console(highlight=False)
    console.print(output.why_text(data).splitlines()[0], markup=False)
    console.print(table)
    console.print(output.why_verdict(data), markup=False)


def op_wait(call: Call) -> int:
    """Block until the works are final. Exit 0 iff all COMPLETED, 1 if one ended otherwise, 3 on timeout."""
    refs = call.refs()
    timeout = None
    if call.opt("timeout") is not None:
        try:
            timeout = float(str(call.opt("timeout")))
        except ValueError:
            raise UsageError(f"--xwtimeout: expected seconds, got {call.opt('timeout')!r}") from None
    group, label = call.opt("group"), call.opt("label")
    if group is not None or label is not None:
        if refs or (group is not None and label is not None):
            raise UsageError("wait for works, or a --xwgroup, or a --xwlabel: one of them")
        return _wait_bag(call, group, label, timeout)
    if not refs:
        raise UsageError("missing the works to wait for (uids or URIs), or --xwgroup or --xwlabel")
    names = {r: call.client.uri(r) for r in refs}
    with call.progress.waiting(names) as on_change:
        status = call.client.wait(refs, timeout=timeout, on_change=on_change)
    call.print(output.columns([[names[u], s] for u, s in status.items()]))
    if any(s not in ("COMPLETED", "ERROR", "FAILED") for s in status.values()):
        call.error(f"timed out after {timeout:g} s")
        return EXIT_TIMEOUT
    return EXIT_OK if all(s == "COMPLETED" for s in status.values()) else EXIT_FAIL


def _wait_bag(call: Call, group: str | None, label: str | None, timeout: float | None) -> int:
    """``xw wait --group G | --label L``: prints the count per status once all are final."""
    what = f"group {group}" if group is not None else f"label {label!r}"
    counts = call.client.wait_bag(group=group, label=label, timeout=timeout)
    if not counts:
        raise XwError(f"no works of yours with {what}" if label is not None else f"no works in {what}")
    call.print(output.columns([[status, str(n)] for status, n in sorted(counts.items())]))
    if any(s not in ("COMPLETED", "ERROR", "FAILED") for s in counts):
        call.error(f"timed out after {timeout:g} s")
        return EXIT_TIMEOUT
    return EXIT_OK if set(counts) == {"COMPLETED"} else EXIT_FAIL


def op_cancel(call: Call) -> int:
    """Stop works for good (they end in ERROR); prints ``URI STATUS`` per work."""
    refs = call.refs()
    if not refs:
        raise UsageError("missing the works to cancel (uids or URIs)")
    for ref in refs:
        w = call.client.cancel(ref)
        call.print(f"{_uri(call, w)} {w['status']}")
    return EXIT_OK


def op_revoke(call: Call) -> int:
    """``LOGIN|URI…``: end every session of these users now (their tokens are refused; hosts renew theirs with
    their keys); prints ``LOGIN revoked`` per user."""
    if not call.bare:
        raise UsageError("missing the users whose sessions to end (logins, uids or URIs)")
    for ref in call.bare:
        user = call.client.user(ref)
        call.client.revoke_tokens(user["uid"])
        call.print(f"{user['login']} revoked")
    return EXIT_OK


# -- session -------------------------------------------------------------------------------------------------------

def op_version(call: Call) -> int:
    """The client's version, and the server's when a client config is found."""
    call.print(f"xwhep client {__version__}")
    try:
        client = call.client
    except ConfigError as exc:
        call.progress.note(f"no server asked: {exc}")
        return EXIT_OK
    v = client.version()
    call.print(f"xwhep server {v.get('version')} (API {v.get('api')}) at {client.server}")
    return EXIT_OK


def op_login(call: Call) -> int:
    """Check the credentials of the client config, or (``--oidc``) log in through OpenID Connect's device flow
    and store the token in the client config; prints who you are."""
    if call.bare:
        raise UsageError("login takes no argument (the credentials are in the client config)")
    if call.flag("oidc"):
        from xwhep.client.config import find
        from xwhep.client.oidc import login_oidc

        info = login_oidc(find(call.opt("config")), issuer=call.opt("issuer"), prompt=call.progress.note)
        call.progress.note(f"stored the {info['token_kind'].replace('_', ' ')} from {info['issuer']} "
                           f"in {info['config']}")
    me = call.client.me()
    call.print(f"logged in to {call.client.server} as {me['login']} ({me['level']}) {_uri(call, me)}")
    return EXIT_OK


# -- the table of commands -------------------------------------------------------------------------------------------

_WORK_OPTS = (
    Opt("env", "DIR|ZIP|URI", "the work's input directory (dirin): a directory or file is zipped and sent"),
    Opt("stdin", "FILE|URI", "the work's standard input"),
    Opt("label", "TEXT", "a label to find the work by"),
    Opt("group", "URI", "put the work in this group"),
    Opt("session", "URI", "put the work in this session"),
    Opt("expectedhost", "NAME|URI", "run only on this worker"),
    Opt("listenport", "PORT[,PORT]", "ports the work listens on (reachable through xwproxy)"),
    Opt("forwardaddresses", "ADDR,PORT[;…]", "client-side services the work may reach"),
    Opt("requirements", "EXPR", "a CEL expression on host.* the worker must satisfy"),
    Opt("rank", "EXPR", "a CEL expression ranking the matching workers"),
    Opt("maxretries", "N", "reschedule at most N times when lost"),
    Opt("replicas", "N", "run N copies"),
    Opt("wallclock", "S", "wall-clock limit in seconds"),
    *MINS, ENVVARS, RIGHTS,
)
_FILTERS = (Opt("status", "STATUS", "only works in this status"), Opt("label", "TEXT", "only works with this label"),
            Opt("group", "URI", "only works of this group"), Opt("session", "URI", "only works of this session"),
            Opt("app", "NAME", "only works of this application"))

COMMANDS: dict[str, Command] = {c.name: c for c in (
    Command("sendapp", op_sendapp, "NAME [TYPE] [OS CPU FILE|URI]… | NAME java FILE.jar",
            "register an application or add binaries to it",
            (Opt("env", "DIR|ZIP|URI", "default input directory of its works"),
             Opt("stdin", "FILE|URI", "default standard input of its works"),
             Opt("basedirin", "DIR|ZIP|URI", "a base directory installed under every work's own"),
             Opt("packages", "NAME[=VERSION],…", "packages the workers must have"), *MINS, ENVVARS, RIGHTS)),
    Command("apps", op_apps, "[NAME|URI…]", "list applications", (FORMAT,)),
    Command("senddata", op_senddata, "[NAME] FILE | FILE…", "send files as data",
            (RIGHTS, Opt("type", "TYPE", "data type (default: from the file name)"))),
    Command("datas", op_datas, "[URI…]", "list data", (FORMAT,)),
    Command("download", op_download, "URI… [--xwout DIR]", "download data (or works' results)", (OUT,)),
    Command("submit", op_submit, "APP [ARGS…]", "submit a work (a job)", _WORK_OPTS, raw_after=1),
    Command("works", op_works, "[URI…]", "list works (jobs)", (FORMAT, *_FILTERS)),
    Command("status", op_status, "[URI…]", "status of works", (FORMAT, *_FILTERS)),
    Command("results", op_results, "[URI…] [--xwout DIR] [--xwnoerase]",
            "download results of completed works (all of yours by default), then erase those that are yours",
            (OUT, Opt("noerase", None, "keep the works on the server"))),
    Command("rm", op_rm, "URI…", "remove works, data, apps, sessions, groups, users or hosts (revokes them)"),
    Command("chmod", op_chmod, "RIGHTS URI…", "change access rights (0x755, 755, go-rwx, o+r)"),
    Command("senduser", op_senduser, "LOGIN PASSWORD [EMAIL] [LEVEL] [USERGROUP]", "create a user",
            (Opt("level", "LEVEL", "usage level, like STANDARD_USER or ADVANCED_USER"),
             Opt("usergroup", "LABEL|URI", "the user's group"), Opt("email", "ADDRESS", "e-mail address"))),
    Command("users", op_users, "[URI…]", "list users", (FORMAT,)),
    Command("sendusergroup", op_sendusergroup, "LABEL…", "create user groups"),
    Command("usergroups", op_usergroups, "[URI…]", "list user groups", (FORMAT,)),
    Command("workers", op_workers, "[URI…]", "list workers (hosts)", (FORMAT,)),
    Command("sessions", _bags("session"), "[URI…] | --xwcreate LABEL", "list or create sessions",
            (FORMAT, Opt("create", "LABEL", "create a session and print its URI"))),
    Command("groups", _bags("group"), "[URI…] | --xwcreate LABEL", "list or create groups of works",
            (FORMAT, Opt("create", "LABEL", "create a group and print its URI"))),
    Command("version", op_version, "", "client and server versions"),
    Command("login", op_login, "[--oidc [--issuer URL]]",
            "check the credentials, or log in through OpenID Connect (device flow; stores the token)",
            (Opt("oidc", None, "log in at the server's OpenID Connect issuer (device flow); stores the token"),
             Opt("issuer", "URL", "which issuer, when the server accepts several")), classic=False),
    Command("why", op_why, "URI…", "why a work is pending: requirements against the registered hosts", (FORMAT,),
            classic=False),
    Command("wait", op_wait, "URI… | --group URI | --label TEXT [--timeout S]",
            "wait until works are final; exit 0 iff all COMPLETED, 1 otherwise, 3 on timeout",
            (Opt("timeout", "S", "give up after S seconds (exit 3)"),
             Opt("group", "URI", "every work of this group"),
             Opt("label", "TEXT", "every work of yours with this label")), classic=False),
    Command("events", op_events, "[URI] [--follow [--action PREFIX] [--count N]]",
            "the event log (an object's history); --follow: events as they happen",
            (FORMAT, Opt("limit", "N", "at most N events (default 1000)"),
             Opt("follow", None, "print the events you may see as they happen, until interrupted"),
             Opt("action", "PREFIX", "with --follow: only actions starting so (work.transition, auth., …)"),
             Opt("count", "N", "with --follow: stop after N events")), classic=False),
    Command("cancel", op_cancel, "URI…", "stop works for good (they end in ERROR)", classic=False),
    Command("revoke", op_revoke, "LOGIN|URI…", "end every session of users (their tokens stop working now)",
            classic=False),
    Command("mandate", op_mandate, "[list] | grant LOGIN [--xwexpires S] [--xwmandator LOGIN] | revoke URI…",
            "let a MANDATED_USER act on your behalf (--xwonbehalfof), list or end mandates",
            (FORMAT, Opt("expires", "S", "the mandate ends after S seconds (default: when revoked)"),
             Opt("mandator", "LOGIN|URI", "administrators: give the mandate for this user")), classic=False),
)}
ALIASES = {"jobs": "works"}


def help_text(command: Command, prog: str, xw_mode: bool = False) -> str:
    """The ``--xwhelp`` text of a command."""
    lines = [f"usage: {prog} {command.synopsis}".rstrip(), "", f"{command.summary[0].upper()}{command.summary[1:]}.",
             "", "options:"]
    opts = [*command.options, CONFIG, ONBEHALF]
    rows = []
    for o in opts:
        spelled = f"--xw{o.name}" + (f" {o.metavar}" if o.metavar else "")
        rows.append([f"  {spelled}", o.help])
    rows.append(["  --xwhelp, -h", "show this help"])
    lines.append(output.columns(rows))
    if xw_mode:
        lines += ["", "Options may also be spelled without 'xw' (--label for --xwlabel)"
                  + (", before the work's own arguments." if command.raw_after else ".")]
    return "\n".join(lines)


def _message(exc: XwError) -> str:
    # the HTTP status is noise for a person when the server explained the refusal itself
    text = str(exc)
    if exc.status is not None and exc.status < 500:
        text = re.sub(r"\s*\(HTTP \d{3}\)$", "", text)
    return text


def run(name: str, argv: Sequence[str], prog: str | None = None, xw_mode: bool = False) -> int:
    """Run command ``name`` with ``argv``; every failure becomes one ``prog: error: …`` line and an exit code."""
    command = COMMANDS[ALIASES.get(name, name)]
    prog = prog or (f"xw {name}" if xw_mode else f"xw{name}")
    hint = f" (see {prog} --xwhelp)"
    call: Call | None = None
    try:
        parsed = parse_argv(argv, command.all_options(), plain=xw_mode, raw_after=command.raw_after)
        if parsed.help:
            print(help_text(command, prog, xw_mode))
            return EXIT_OK
        call = Call(command, prog, parsed, xw_mode)
        return command.func(call)
    except UsageError as exc:
        _err(prog, f"{exc}{hint}")
        return EXIT_USAGE
    except XwError as exc:
        _err(prog, _message(exc))
        return EXIT_FAIL
    except ConfigError as exc:
        _err(prog, str(exc))
        return EXIT_FAIL
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # the reader went away (xwworks | head): stop quietly, and keep the interpreter's final flush silent too
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_FAIL
    except OSError as exc:
        where = f": {exc.filename}" if exc.filename else ""
        _err(prog, f"{exc.strerror or exc}{where}")
        return EXIT_FAIL
    except Exception as exc:
        if os.environ.get("XW_DEBUG"):
            raise
        _err(prog, f"internal error: {type(exc).__name__}: {exc} (set XW_DEBUG=1 for a traceback)")
        return EXIT_FAIL
    finally:
        if call is not None:
            try:
                call.close()
            except Exception:
                pass


def _err(prog: str, text: str) -> None:
    line = " ".join(text.split("\n"))
    print(f"{prog}: error: {line}", file=sys.stderr, flush=True)


# -- the classic scripts ---------------------------------------------------------------------------------------------

def _script(name: str) -> Callable[[], None]:
    def entry() -> None:
        sys.exit(run(name, sys.argv[1:], prog=f"xw{name}"))

    entry.__name__ = entry.__qualname__ = f"xw{name}"
    entry.__doc__ = f"``xw{name}``: {COMMANDS[name].summary}."
    return entry


xwsendapp = _script("sendapp")
xwapps = _script("apps")
xwsenddata = _script("senddata")
xwdatas = _script("datas")
xwdownload = _script("download")
xwsubmit = _script("submit")
xwworks = _script("works")
xwstatus = _script("status")
xwresults = _script("results")
xwrm = _script("rm")
xwchmod = _script("chmod")
xwsenduser = _script("senduser")
xwusers = _script("users")
xwsendusergroup = _script("sendusergroup")
xwusergroups = _script("usergroups")
xwworkers = _script("workers")
xwsessions = _script("sessions")
xwgroups = _script("groups")
xwversion = _script("version")
