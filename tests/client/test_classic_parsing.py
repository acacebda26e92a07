"""The classic commands' command-line parsing: bare-argument auto-typing, ``--xwNAME`` options, XWHEP forms.

Pure: no server, no files beyond tmp_path.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from xwhep.client import classic
from xwhep.client.classic import (
    Opt,
    UsageError,
    classify,
    parse_argv,
    parse_envvars,
    parse_int,
    parse_packages,
    parse_sendapp,
    parse_senddata,
)

UID = "0f1e2d3c-4b5a-4978-8695-a4b3c2d1e0f9"


def nofile(_: str) -> bool:
    return False


# -- auto-typing ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("arg", "kind", "value"), [
    (UID, "ref", UID),
    (UID.upper(), "ref", UID),
    (f"xw://server.example.org:4330/{UID}", "ref", UID),
    ("linux", "os", "linux"),
    ("Linux", "os", "linux"),
    ("macosx", "os", "macosx"),
    ("darwin", "os", "macosx"),
    ("win64", "os", "win64"),
    ("java", "os", "java"),
    ("x86_64", "cpu", "x86_64"),
    ("amd64", "cpu", "x86_64"),
    ("AMD64", "cpu", "x86_64"),
    ("aarch64", "cpu", "aarch64"),
    ("arm64", "cpu", "aarch64"),
    ("ppc64le", "cpu", "ppc64le"),
    ("i686", "cpu", "ix86"),
    ("DEPLOYABLE", "apptype", "DEPLOYABLE"),
    ("shared", "apptype", "SHARED"),
    ("Vm", "apptype", "VM"),
    ("container", "apptype", "CONTAINER"),
    ("hello", "text", "hello"),
    ("xw://host/not-a-uid", "text", "xw://host/not-a-uid"),
])
def test_classify(arg: str, kind: str, value: str) -> None:
    b = classify(arg, nofile)
    assert (b.kind, b.value, b.raw) == (kind, value, arg)


def test_classify_existing_file(tmp_path: Path) -> None:
    f = tmp_path / "prog"
    f.write_text("x")
    assert classify(str(f)).kind == "file"
    assert classify(str(tmp_path / "missing")).kind == "text"


def test_keywords_win_over_same_named_files() -> None:
    assert classify("linux", lambda _: True).kind == "os"
    assert classify("shared", lambda _: True).kind == "apptype"


# -- the argv parser ----------------------------------------------------------------------------------------------

OPTS = {o.name: o for o in (Opt("config", "FILE", ""), Opt("label", "TEXT", ""), Opt("noerase", None, ""),
                            Opt("envvars", "K=V", ""), Opt("help", None, ""))}


def test_xw_options_anywhere_bare_in_order() -> None:
    p = parse_argv(["a", "--xwlabel", "L", "b", "--xwnoerase", "--xwconfig=/c.conf", "c"], OPTS)
    assert p.bare == ["a", "b", "c"]
    assert (p.get("label"), p.get("config"), p.flag("noerase"), p.flag("label"), p.flag("help")) == (
        "L", "/c.conf", True, True, False)


def test_repeated_option_keeps_every_value_last_wins() -> None:
    p = parse_argv(["--xwenvvars", "A=1", "--xwenvvars", "B=2", "--xwlabel", "x", "--xwlabel", "y"], OPTS)
    assert p.opts["envvars"] == ["A=1", "B=2"] and p.get("label") == "y"


def test_no_prefix_matching_and_unknown_xw_option() -> None:
    with pytest.raises(UsageError, match=r"unknown option --xwlab$"):
        parse_argv(["--xwlab", "x"], OPTS)
    with pytest.raises(UsageError, match="unknown option --xwbogus"):
        parse_argv(["app", "--xwbogus"], OPTS, raw_after=1)


def test_unknown_plain_option_is_an_error_outside_a_works_arguments() -> None:
    with pytest.raises(UsageError, match="unknown option --verbose"):
        parse_argv(["--verbose"], OPTS)
    assert parse_argv(["app", "--verbose", "-x", "-h", "--help"], OPTS, raw_after=1).bare == [
        "app", "--verbose", "-x", "-h", "--help"]


def test_single_dash_arguments_are_bare() -> None:
    # chmod's symbolic rights may start with '-'
    assert parse_argv(["-w", UID], OPTS).bare == ["-w", UID]


def test_value_missing_and_flag_with_value() -> None:
    with pytest.raises(UsageError, match="--xwlabel needs a value"):
        parse_argv(["--xwlabel"], OPTS)
    with pytest.raises(UsageError, match="takes no value"):
        parse_argv(["--xwnoerase=yes"], OPTS)


def test_help_forms() -> None:
    for argv in (["-h"], ["--help"], ["--xwhelp"], ["app", "--xwhelp"]):
        assert parse_argv(argv, OPTS, raw_after=1).help, argv
    assert not parse_argv(["app", "-h"], OPTS, raw_after=1).help  # the work's own -h


def test_double_dash_ends_options() -> None:
    p = parse_argv(["app", "--xwlabel", "L", "--", "--xwlabel", "x"], OPTS, raw_after=1)
    assert p.bare == ["app", "--xwlabel", "x"] and p.get("label") == "L"


def test_plain_spelling_under_xw() -> None:
    p = parse_argv(["--label", "L", "app", "--label", "mine"], OPTS, plain=True, raw_after=1)
    assert p.get("label") == "L" and p.bare == ["app", "--label", "mine"]
    p = parse_argv(["--label=L", "x"], OPTS, plain=True)
    assert p.get("label") == "L"
    with pytest.raises(UsageError, match="unknown option --label"):
        parse_argv(["--label", "L"], OPTS)  # the classic scripts only know the --xw spelling


# -- xwsendapp ------------------------------------------------------------------------------------------------------

def files(*names: str):  # type: ignore[no-untyped-def]
    return lambda p: p in names


def test_sendapp_java_jar() -> None:
    app = parse_sendapp(["NAME", "java", "app.jar"], files("app.jar"))
    assert (app.name, app.type, app.binaries) == ("NAME", None, {"java": "app.jar"})
    assert parse_sendapp(["NAME", "app.jar"], files("app.jar")).binaries == {"java": "app.jar"}


def test_sendapp_linux_binary_normalized() -> None:
    assert parse_sendapp(["NAME", "linux", "x86_64", "./prog"], files("./prog")).binaries == {
        "linux/x86_64": "./prog"}
    assert parse_sendapp(["NAME", "Linux", "amd64", "./prog"], files("./prog")).binaries == {
        "linux/x86_64": "./prog"}
    assert parse_sendapp(["NAME", "x86_64", "linux", "./prog"], files("./prog")).binaries == {
        "linux/x86_64": "./prog"}


def test_sendapp_several_binaries_and_uri() -> None:
    app = parse_sendapp(["N", "DEPLOYABLE", "linux", "x86_64", "a", "macosx", "arm64", f"xw://h/{UID}"], files("a"))
    assert app.type == "DEPLOYABLE"
    assert app.binaries == {"linux/x86_64": "a", "macosx/aarch64": f"xw://h/{UID}"}


def test_sendapp_shared_and_vm() -> None:
    app = parse_sendapp(["NAME", "SHARED"], nofile)
    assert (app.type, app.binaries, app.image) == ("SHARED", {}, None)
    vm = parse_sendapp(["NAME", "vm", "disk.qcow2"], files("disk.qcow2"))
    assert (vm.type, vm.image, vm.binaries) == ("VM", "disk.qcow2", {})


@pytest.mark.parametrize(("argv", "message"), [
    ([], "missing the application name"),
    (["N", "./prog"], "say which OS and CPU"),
    (["N", "linux", "./prog"], "say which OS and CPU"),
    (["N", "linux", "x86_64"], "no binary file or URI follows"),
    (["N", "linux", "x86_64", "missing"], "no such file: missing"),
    (["N", "linux", "x86_64", "xw://h/bad"], "malformed URI"),
    (["N", "SHARED", "VM"], "two application types"),
])
def test_sendapp_refusals(argv: list[str], message: str) -> None:
    with pytest.raises(UsageError, match=message):
        parse_sendapp(argv, files("./prog"))


# -- xwsenddata and values ----------------------------------------------------------------------------------------

def test_senddata_forms() -> None:
    assert parse_senddata(["a", "b"], files("a", "b")) == [(None, "a"), (None, "b")]
    assert parse_senddata(["name", "a"], files("a")) == [("name", "a")]
    with pytest.raises(UsageError, match="no such file: missing"):
        parse_senddata(["a", "missing"], files("a"))
    with pytest.raises(UsageError, match="no such file: b"):
        parse_senddata(["x", "a", "b"], files("a"))
    with pytest.raises(UsageError, match="missing the file"):
        parse_senddata([], nofile)


def test_envvars_ints_packages() -> None:
    assert parse_envvars(["A=1,B=x=y", "C="]) == {"A": "1", "B": "x=y", "C": ""}
    with pytest.raises(UsageError, match="'nope' is not NAME=VALUE"):
        parse_envvars(["A=1,nope"])
    assert parse_int("minmemory", " 512 ") == 512
    with pytest.raises(UsageError, match="--xwreplicas: must be at least 1"):
        parse_int("replicas", "0", 1)
    with pytest.raises(UsageError, match="expected a whole number"):
        parse_int("wallclock", "1h")
    assert parse_packages("ROOT=6.30, geant4") == {"ROOT": "6.30", "geant4": ""}


# -- every command is declared once and reachable both ways ------------------------------------------------------

def test_every_classic_script_is_a_command() -> None:
    scripts = ["sendapp", "apps", "senddata", "datas", "download", "submit", "works", "status", "results", "rm",
               "chmod", "senduser", "users", "sendusergroup", "usergroups", "workers", "sessions", "groups",
               "version"]
    for name in scripts:
        assert classic.COMMANDS[name].classic
        assert callable(getattr(classic, f"xw{name}"))
    for name in ("login", "why", "wait", "events", "cancel"):
        assert name in classic.COMMANDS
    assert classic.ALIASES == {"jobs": "works"}


def test_usage_errors_exit_2_with_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert classic.run("works", ["--xwbogus"]) == 2
    err = capsys.readouterr().err
    assert err == "xwworks: error: unknown option --xwbogus (see xwworks --xwhelp)\n"
    assert classic.run("jobs", ["--bogus"], xw_mode=True) == 2
    assert capsys.readouterr().err.startswith("xw jobs: error: unknown option --bogus")


def test_no_config_is_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert classic.run("works", ["--xwconfig", str(tmp_path / "none.conf")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no client config at" in err


def test_help_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    assert classic.run("submit", ["--xwhelp"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: xwsubmit APP [ARGS…]") and "--xwenv DIR|ZIP|URI" in out
