"""The command-line contract, end to end: the INSTALLED ``xw`` and ``xw*`` scripts in subprocesses, against one real
server process for the module. Works are completed by acting as a worker through the SDK.

Run ``.venv/bin/pip install -e .`` first so that the console scripts exist next to the interpreter.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
import subprocess
import sys
import uuid
import xml.etree.ElementTree as ET
import zipfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from cluster import ServerProc

from xwhep.client import Client, XwError

BIN = Path(sys.executable).parent
URI = re.compile(r"^xw://[^/\s]+/[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProc]:
    if not (BIN / "xwsubmit").exists():
        pytest.fail(f"console scripts missing in {BIN}: run `.venv/bin/pip install -e .` first", pytrace=False)
    server = ServerProc(home=tmp_path_factory.mktemp("srv")).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A HOME without ~/.xwhep, so only XW_CONFIG/--xwconfig can point at a config."""
    return tmp_path_factory.mktemp("home")


@pytest.fixture(scope="module")
def token_conf(srv: ServerProc, home: Path) -> Path:
    """The administrator's config with a bearer token instead of the password: each command then skips the
    (deliberately slow) password check, which keeps this module fast. ``xw login`` still uses the password."""
    with srv.client("admin") as c:
        token = c.login()
    conf = home / "token.conf"
    conf.write_text(f'server = "{srv.url}"\nca = "{srv.ca}"\ntoken = "{token}"\n')
    return conf


@pytest.fixture(scope="module")
def admin(srv: ServerProc) -> Iterator[Client]:
    c = srv.client("admin")
    yield c
    c.close()


@pytest.fixture(scope="module")
def worker_client(srv: ServerProc) -> Iterator[Client]:
    c = Client.from_config(srv.worker_conf)
    yield c
    c.close()


def run(srv: ServerProc, home: Path, *argv: str, cwd: Path | None = None, env: dict[str, str] | None = None,
        rc: int | None = 0) -> subprocess.CompletedProcess[str]:
    """Run an installed script; never a traceback, and the exit code ``rc`` unless None."""
    token_conf = home / "token.conf"
    conf = token_conf if token_conf.exists() else srv.admin_conf
    full_env = {**os.environ, "HOME": str(home), "XW_CONFIG": str(conf), **(env or {})}
    full_env.pop("XW_DEBUG", None)
    p = subprocess.run([str(BIN / argv[0]), *argv[1:]], capture_output=True, text=True, cwd=cwd, env=full_env,
                       timeout=60)
    assert "Traceback" not in p.stdout + p.stderr, p.stdout + p.stderr
    if rc is not None:
        assert p.returncode == rc, f"{argv}: rc={p.returncode}\nstdout: {p.stdout}\nstderr: {p.stderr}"
    return p


def run_many(srv: ServerProc, home: Path, argvs: list[list[str]]) -> list[str]:
    """Independent successful commands, in parallel (each is a process; this keeps the module fast); stdouts."""
    with ThreadPoolExecutor(len(argvs)) as pool:
        return [p.stdout for p in pool.map(lambda argv: run(srv, home, *argv), argvs)]


def one_uri(p: subprocess.CompletedProcess[str]) -> str:
    """The stdout of a creating command: exactly one xw:// URI line and nothing else."""
    lines = p.stdout.splitlines()
    assert len(lines) == 1 and URI.match(lines[0]), repr(p.stdout)
    return lines[0]


def uid(uri: str) -> str:
    return uri.rsplit("/", 1)[1]


@pytest.fixture(scope="module")
def apps(srv: ServerProc, home: Path, token_conf: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Apps sent once through the CLI: ``echo`` (linux/x86_64), ``jv`` (java), ``ppc`` (linux/ppc64le: only the
    tests' own SDK workers, registered as ppc64le hosts, ever take its works)."""
    d = tmp_path_factory.mktemp("apps")
    (d / "prog").write_text("#!/bin/sh\necho hello\n")
    (d / "app.jar").write_bytes(b"PK fake jar")
    forms = {"echo": ["echo", "linux", "amd64", "./prog"], "jv": ["jv", "java", "app.jar"],
             "ppc": ["ppc", "Linux", "ppc64le", str(d / "prog")]}
    with ThreadPoolExecutor(len(forms)) as pool:
        runs = {k: pool.submit(run, srv, home, "xwsendapp", *argv, cwd=d) for k, argv in forms.items()}
        return {k: one_uri(f.result()) for k, f in runs.items()}


class Worker:
    """A hand-driven worker: its own ppc64le host, named so that works can be pinned to it with
    --xwexpectedhost (tests sharing the server never take each other's works)."""

    def __init__(self, client: Client, name: str, **desc: Any) -> None:
        self.name = name
        base = {"name": name, "os": "linux", "cpu": "ppc64le", "cores": 2, "memory": 4096, "disk": 10000}
        reg = client.register_host({**base, **desc})
        self.host = reg["uid"]
        self.c = client.host_client(reg)

    def complete(self, tmp: Path, payload: dict[str, bytes]) -> set[str]:
        """Take the pending works pinned to this host and complete each with ``payload[work uid]``."""
        done = set()
        for a in self.c.request_works(self.host, max=10):
            body = payload[a["work"]]
            res = {"sha256": hashlib.sha256(body).hexdigest(), "size": len(body), "name": "out.txt"}
            out = self.c.report(self.host, [{"task": a["task"], "status": "COMPLETED", "return_code": 0,
                                             "result": res}])[0]
            assert out["outcome"] == "upload", out
            f = tmp / f"{a['work']}.out"
            f.write_bytes(body)
            self.c.upload(out["result"], f)
            done.add(a["work"])
        return done


# -- creating ------------------------------------------------------------------------------------------------------

def test_sendapp_both_forms_and_shared(srv: ServerProc, home: Path, admin: Client, apps: dict[str, str]) -> None:
    assert admin.get(apps["echo"])["binaries"].keys() == {"linux/x86_64"}  # amd64 normalized
    assert admin.get(apps["jv"])["binaries"].keys() == {"java"}
    assert admin.get(apps["ppc"])["binaries"].keys() == {"linux/ppc64le"}
    shared = one_uri(run(srv, home, "xwsendapp", "shapp", "shared"))
    assert admin.get(shared)["type"] == "SHARED"
    listing = run(srv, home, "xwapps").stdout
    assert {"echo", "jv", "ppc", "shapp"} <= {line.split()[1] for line in listing.splitlines()}


def test_senddata_datas_download(srv: ServerProc, home: Path, tmp_path: Path) -> None:
    f = tmp_path / "input.dat"
    f.write_bytes(os.urandom(3000))
    p = run(srv, home, "xwsenddata", str(f))
    uri = one_uri(p)
    assert "input.dat" in p.stderr  # the progress line went to stderr, not stdout
    datas = json.loads(run(srv, home, "xwdatas", "--xwformat", "json", uri).stdout)
    assert [(d["uid"], d["size"], d["status"]) for d in datas] == [(uid(uri), 3000, "AVAILABLE")]
    out = tmp_path / "dl"
    got = run(srv, home, "xwdownload", uri, "--xwout", str(out)).stdout.strip()
    assert Path(got) == out / "input.dat" and Path(got).read_bytes() == f.read_bytes()
    named = one_uri(run(srv, home, "xwsenddata", "renamed", str(f)))
    assert run(srv, home, "xwdatas", named).stdout.split()[1] == "renamed"


def test_submit_with_env_stdin_label_listenport(srv: ServerProc, home: Path, admin: Client, apps: dict[str, str],
                                               tmp_path: Path) -> None:
    env = tmp_path / "envdir"
    (env / "sub").mkdir(parents=True)
    (env / "a.txt").write_text("A")
    (env / "sub" / "b.txt").write_text("B")
    (tmp_path / "in.txt").write_text("standard input\n")
    p = run(srv, home, "xwsubmit", "echo", "--xwenv", "envdir", "--xwstdin", "in.txt", "--xwlabel", "contract",
            "--xwlistenport", "8080", "a", "b c", "--verbose", "-h", cwd=tmp_path)
    uri = one_uri(p)
    w = admin.work(uri)
    assert (w["label"], w["listen_ports"], w["app_name"]) == ("contract", "8080", "echo")
    assert w["args"] == "a 'b c' --verbose -h"  # the work's own arguments, kept as given
    admin.download(w["stdin"], tmp_path / "stdin.back")
    assert (tmp_path / "stdin.back").read_text() == "standard input\n"
    admin.download(w["dirin"], tmp_path / "env.zip")
    assert sorted(zipfile.ZipFile(tmp_path / "env.zip").namelist()) == ["a.txt", "sub/", "sub/b.txt"]

    xml, js, csv_text, html, status, text = run_many(srv, home, [
        ["xwworks", "--xwformat", "xml", uid(uri)], ["xwworks", "--xwformat", "json", uri],
        ["xwworks", "--xwformat", "csv", "--xwlabel", "contract"], ["xwworks", "--xwformat", "html", uri],
        ["xwstatus", uri], ["xwworks", "--xwformat", "text", uri]])
    assert f'<work uid="{uid(uri)}" status="PENDING"' in xml and 'listenport="8080"' in xml
    root = ET.fromstring(xml)
    assert root.tag == "xwhep" and [(e.tag, e.get("uid"), e.get("label")) for e in root] == [
        ("work", uid(uri), "contract")]
    assert [(o["uid"], o["listen_ports"]) for o in json.loads(js)] == [(uid(uri), "8080")]
    rows = list(csv.DictReader(io.StringIO(csv_text)))
    assert [(r["uid"], r["status"], r["listen_ports"]) for r in rows] == [(uid(uri), "PENDING", "8080")]
    assert "<table" in html
    assert status.split() == [uri, "PENDING"]
    assert re.search(r"^\s+label:\s+contract$", text, re.M)


def test_xw_form_is_the_same_command(srv: ServerProc, home: Path, admin: Client, apps: dict[str, str]) -> None:
    uri = one_uri(run(srv, home, "xw", "submit", "--label", "xwform", "--xwminmemory", "1", "jv", "--label", "x"))
    w = admin.work(uri)
    assert (w["label"], w["args"], w["min_memory"]) == ("xwform", "--label x", 1)  # after APP: the work's args
    js, top, server_help, submit_help, classic_help, version = run_many(srv, home, [
        ["xw", "jobs", "--format", "json", uri], ["xw", "--help"], ["xw", "server", "--help"],
        ["xw", "submit", "--help"], ["xwsubmit", "--xwhelp"], ["xwversion"]])
    assert json.loads(js)[0]["uid"] == uid(uri)
    assert "submit" in top and "--home" in server_help
    assert "--xwlistenport" in submit_help and "--xwlistenport" in classic_help
    assert "xwhep server" in version
    login = run(srv, home, "xw", "login", env={"XW_CONFIG": str(srv.admin_conf)})  # with the password
    assert login.stdout.startswith(f"logged in to {srv.url} as admin (SUPER_USER)")


# -- results, waiting, why -------------------------------------------------------------------------------------------

def test_results_download_verify_and_erase(srv: ServerProc, home: Path, admin: Client, worker_client: Client,
                                           apps: dict[str, str], tmp_path: Path) -> None:
    wk = Worker(worker_client, "results-host")
    pin = ("--xwexpectedhost", wk.name)
    u1 = one_uri(run(srv, home, "xwsubmit", "ppc", *pin, "one"))
    u2 = one_uri(run(srv, home, "xwsubmit", "ppc", *pin, "two"))
    payload = {uid(u1): b"result one\n", uid(u2): os.urandom(5000)}
    assert wk.complete(tmp_path, payload) == set(payload)

    out = tmp_path / "out"
    p = run(srv, home, "xwresults", u1, "--xwout", str(out))
    [path] = p.stdout.splitlines()
    assert Path(path).parent == out and Path(path).read_bytes() == payload[uid(u1)]
    with pytest.raises(XwError, match="no work"):
        admin.work(u1)  # erased after the download

    kept = tmp_path / "kept"
    [path2] = run(srv, home, "xwresults", "--xwnoerase", "--xwout", str(kept), u2).stdout.splitlines()
    assert Path(path2).read_bytes() == payload[uid(u2)]
    assert admin.work(u2)["status"] == "COMPLETED"

    # no uid: every COMPLETED work of the user, into the current directory
    cwd = tmp_path / "all"
    cwd.mkdir()
    paths = run(srv, home, "xwresults", cwd=cwd).stdout.splitlines()
    assert any((cwd / p).read_bytes() == payload[uid(u2)] for p in paths)
    with pytest.raises(XwError):
        admin.work(u2)


def test_results_refuses_an_unfinished_work(srv: ServerProc, home: Path, admin: Client, worker_client: Client,
                                              apps: dict[str, str], tmp_path: Path) -> None:
    wk = Worker(worker_client, "pending-host")
    u = one_uri(run(srv, home, "xwsubmit", "ppc", "--xwexpectedhost", wk.name))
    p = run(srv, home, "xwresults", u, rc=1)
    assert p.stdout == "" and "not COMPLETED" in p.stderr
    assert admin.work(u)["status"] == "PENDING"  # not erased


def test_wait_exit_codes(srv: ServerProc, home: Path, worker_client: Client, apps: dict[str, str],
                         tmp_path: Path) -> None:
    wk = Worker(worker_client, "wait-host")
    done = one_uri(run(srv, home, "xwsubmit", "ppc", "--xwexpectedhost", wk.name))
    wk.complete(tmp_path, {uid(done): b"ok"})
    p = run(srv, home, "xw", "wait", done, rc=0)
    assert p.stdout.split() == [done, "COMPLETED"]

    pending = one_uri(run(srv, home, "xwsubmit", "ppc", "--xwexpectedhost", "nobody"))
    p = run(srv, home, "xw", "wait", pending, "--timeout", "0.3", rc=3)
    assert "timed out" in p.stderr and p.stdout.split() == [pending, "PENDING"]

    assert run(srv, home, "xw", "cancel", pending).stdout.split() == [pending, "ERROR"]
    p = run(srv, home, "xw", "wait", done, pending, rc=1)
    assert sorted(p.stdout.split()) == sorted([done, "COMPLETED", pending, "ERROR"])


def test_why_names_the_failing_requirement(srv: ServerProc, home: Path, worker_client: Client,
                                           apps: dict[str, str]) -> None:
    worker_client.register_host({"name": "why-host", "os": "linux", "cpu": "x86_64", "memory": 2048})
    uri = one_uri(run(srv, home, "xwsubmit", "echo", "--xwminmemory", "999999999"))
    out = run(srv, home, "xw", "why", uri).stdout
    memory = next(line for line in out.splitlines() if line.startswith("memory"))
    assert "0/" in memory and "needs 999999999 MiB" in memory
    verdict = out.strip().splitlines()[-1]
    assert verdict.startswith("verdict: no registered host satisfies memory")
    data = json.loads(run(srv, home, "xw", "why", "--format", "json", uri).stdout)
    assert any(r["name"] == "memory" and r["satisfied_by"] == 0 for r in data["requirements"])


# -- rights, removal, users, bags --------------------------------------------------------------------------------------

def test_chmod(srv: ServerProc, home: Path, admin: Client, apps: dict[str, str]) -> None:
    uri = one_uri(run(srv, home, "xwsubmit", "echo", "--xwexpectedhost", "nobody"))
    assert run(srv, home, "xwchmod", "go-rwx", uri).stdout.split() == [uri, "0x700"]
    assert admin.get(uri)["access_rights"] == "0x700"
    assert run(srv, home, "xwchmod", "755", uri).stdout.split() == [uri, "0x755"]
    assert admin.get(uri)["access_rights"] == "0x755"
    run(srv, home, "xwchmod", "0x755", uri)
    p = run(srv, home, "xwchmod", "rwx!", uri, rc=2)
    assert "rights" in p.stderr


def test_rm_any_kind(srv: ServerProc, home: Path, admin: Client, apps: dict[str, str], tmp_path: Path) -> None:
    f = tmp_path / "x.txt"
    f.write_text("x")
    data = one_uri(run(srv, home, "xwsenddata", str(f)))
    work = one_uri(run(srv, home, "xwsubmit", "echo", "--xwexpectedhost", "nobody"))
    session = one_uri(run(srv, home, "xwsessions", "--xwcreate", "tmp-session"))
    run(srv, home, "xwrm", data, work, session)
    for ref in (data, work, session):
        with pytest.raises(XwError, match="no object"):
            admin.get(ref)
    p = run(srv, home, "xwrm", work, rc=1)
    assert p.stderr.count("\n") == 1 and "no object" in p.stderr


def test_rm_host_and_revoke_sessions(srv: ServerProc, home: Path, admin: Client, worker_client: Client) -> None:
    reg = worker_client.register_host({"name": "to-remove"})
    host = worker_client.host_client(reg)
    host.alive(reg["uid"])
    run(srv, home, "xwrm", f"xw://{srv.url.split('//')[1]}/{reg['uid']}")
    with pytest.raises(XwError) as err:
        host.alive(reg["uid"])
    assert err.value.status == 404  # its token and key stopped working: register again
    admin.create_user("dave", "dave-password")
    dave = Client(srv.url, ca=str(srv.ca), login="dave", password="dave-password")
    dave.me()
    old = Client(srv.url, ca=str(srv.ca), token=dave._token)
    assert run(srv, home, "xw", "revoke", "dave").stdout == "dave revoked\n"
    with pytest.raises(XwError) as err:
        old.me()
    assert err.value.status == 401
    p = run(srv, home, "xw", "revoke", "nobody-such", rc=1)
    assert p.stderr.count("\n") == 1 and "no user" in p.stderr


def test_users_groups_sessions(srv: ServerProc, home: Path, admin: Client) -> None:
    group = one_uri(run(srv, home, "xwsendusergroup", "physics"))
    user = one_uri(run(srv, home, "xwsenduser", "carol", "s3cret-password", "carol@example.org", "physics",
                       "advanced_user"))
    u = admin.get(user)
    assert (u["login"], u["level"], u["usergroup"], u["email"]) == ("carol", "ADVANCED_USER", uid(group),
                                                                     "carol@example.org")
    root = ET.fromstring(run(srv, home, "xwusers", "--xwformat", "xml", user).stdout)
    assert [(e.tag, e.get("uid"), e.get("login")) for e in root] == [("user", uid(user), "carol")]
    assert run(srv, home, "xwusergroups", group).stdout.split()[1] == "physics"
    bag = one_uri(run(srv, home, "xwgroups", "--xwcreate", "campaign"))
    assert run(srv, home, "xwgroups", bag).stdout.split() == [bag, "campaign"]
    workers = json.loads(run(srv, home, "xwworkers", "--xwformat", "json").stdout)
    assert isinstance(workers, list)


# -- bad input: one readable line, a non-zero exit, no traceback -------------------------------------------------------

BAD = [
    (["xwsubmit", "nope"], 1, "unknown app 'nope'"),
    (["xwsenddata", "/nonexistent/file.txt"], 2, "no such file: /nonexistent/file.txt"),
    (["xwsubmit", "echo", "--xwstdin", "/nonexistent/in.txt"], 1, "--xwstdin: no such file"),
    (["xwsendapp", "bad", "linux", "x86_64", "/nonexistent/prog"], 2, "no such file"),
    (["xwsubmit", "echo", "--xwrequirements", "host.memory >"], 1, "requirements: malformed expression"),
    (["xwworks", "xw://somehost/not-a-uid"], 1, "malformed URI 'xw://somehost/not-a-uid'"),
    (["xwworks", str(uuid.UUID(int=7))], 1, f"no work {uuid.UUID(int=7)}"),
    (["xwrm", str(uuid.UUID(int=8))], 1, "no object"),
    (["xwworks", "--xwbogus"], 2, "unknown option --xwbogus"),
    (["xw", "works", "--bogus"], 2, "unknown option --bogus"),
    (["xwworks", "--xwformat", "yaml"], 2, "--xwformat: 'yaml' is not one of"),
    (["xwsubmit", "echo", "--xwminmemory", "lots"], 2, "--xwminmemory: expected a whole number"),
    (["xwsubmit", "echo", "--xwlistenport"], 2, "needs a value"),
]


@pytest.fixture(scope="module")
def bad_runs(srv: ServerProc, home: Path, apps: dict[str, str]) -> dict[str, subprocess.CompletedProcess[str]]:
    """All the bad invocations at once, in parallel (each is a separate process; this saves seconds)."""
    with ThreadPoolExecutor(len(BAD)) as pool:
        futures = {" ".join(argv): pool.submit(run, srv, home, *argv, rc=None) for argv, _, _ in BAD}
        return {k: f.result() for k, f in futures.items()}


@pytest.mark.parametrize(("argv", "rc", "message"), BAD, ids=[" ".join(a[0][:3]) for a in BAD])
def test_bad_input_is_one_readable_line(bad_runs: dict[str, subprocess.CompletedProcess[str]], argv: list[str],
                                        rc: int, message: str) -> None:
    p = bad_runs[" ".join(argv)]
    assert p.returncode == rc, p.stderr
    prog = argv[0] if argv[0] != "xw" else f"xw {argv[1]}"
    assert p.stdout == ""
    assert p.stderr.count("\n") == 1 and p.stderr.startswith(f"{prog}: error: "), p.stderr
    assert message in p.stderr


def test_no_config_file(srv: ServerProc, home: Path, tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.conf"
    for argv in (["xwworks"], ["xwworks", "--xwconfig", str(missing)], ["xw", "login"]):
        p = run(srv, home, *argv, env={"XW_CONFIG": str(missing)}, rc=1)
        assert p.stderr.count("\n") == 1 and f"no client config at {missing}" in p.stderr
    env = {k: v for k, v in os.environ.items() if k != "XW_CONFIG"}
    p = subprocess.run([str(BIN / "xwapps")], capture_output=True, text=True, env={**env, "HOME": str(home)})
    assert p.returncode == 1 and "no client config at" in p.stderr and "Traceback" not in p.stderr
    # an explicit --xwconfig wins over XW_CONFIG
    run(srv, home, "xwversion", "--xwconfig", str(srv.admin_conf), env={"XW_CONFIG": str(missing)})


def test_unreachable_server(srv: ServerProc, home: Path, tmp_path: Path) -> None:
    conf = tmp_path / "closed.conf"
    conf.write_text(f'server = "https://127.0.0.1:1"\nca = "{srv.ca}"\nlogin = "a"\npassword = "b"\n')
    p = run(srv, home, "xwworks", "--xwconfig", str(conf), rc=1)
    assert p.stderr.count("\n") == 1 and p.stderr.startswith("xwworks: error: cannot reach server https://127.0.0.1:1")
