"""The runner app of :class:`xwhep.Executor`: find it on the server, or publish it for the caller.

The app's binary is ``runner.py`` (the same script for every Linux CPU: the worker's ``python3`` runs it) and its
base dirin a zip of ``.xw-lib/cloudpickle``: the caller's own cloudpickle, sources plus bytecode compiled by the
caller's interpreter (unchecked-hash pycs, so the worker's Python of the same minor version imports them without
compiling: ~50 ms per job instead of ~250 ms on the test machine).

The app's name is content-addressed: ``xwhep-python-<fingerprint>``, the fingerprint covering the runner, the
cloudpickle sources and the interpreter's cache tag. So an app, once made, never changes under a work that waits
for it, and two callers with different cloudpickle or Python versions each get the runner they need. When an
administrator has run an Executor (or :func:`ensure_runner` with ``public=True``), the app is public and every user
runs that one; otherwise each user makes a private copy, named ``xwhep-python-<fingerprint>-<login>`` when another
user's private copy holds the plain name (app names are unique on a server).
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import py_compile
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from xwhep.client.sdk import Client, XwError

__all__ = ["PLATFORMS", "RunnerFiles", "ensure_runner", "runner_files"]

APP_PREFIX = "xwhep-python"
BINARY_NAME = "xwhep-python"  # the file name in the job dir (the worker names the binary after its data)
LIB_DIR = ".xw-lib"
# the script runs on any Linux CPU the worker's python3 runs on
PLATFORMS = ("linux/x86_64", "linux/aarch64", "linux/ppc64le", "linux/ix86")
_ZIP_TIME = (2020, 1, 1, 0, 0, 0)


@dataclass(frozen=True)
class RunnerFiles:
    script: bytes
    lib_zip: bytes
    fingerprint: str  # hex sha256 of what the app's behaviour depends on

    @property
    def app_name(self) -> str:
        return f"{APP_PREFIX}-{self.fingerprint[:12]}"


def _cloudpickle_sources() -> list[tuple[str, bytes]]:
    spec = importlib.util.find_spec("cloudpickle")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("xwhep.Executor needs cloudpickle: pip install 'xwhep[executor]'")
    root = Path(next(iter(spec.submodule_search_locations)))
    return [(p.name, p.read_bytes()) for p in sorted(root.glob("*.py"))]


@cache
def runner_files() -> RunnerFiles:
    """The runner script, its library zip and their fingerprint (computed once per process)."""
    script = (Path(__file__).with_name("runner.py")).read_bytes()
    sources = _cloudpickle_sources()
    h = hashlib.sha256()
    h.update(script)
    h.update(sys.implementation.cache_tag.encode())
    for name, data in sources:
        h.update(name.encode() + b"\0" + hashlib.sha256(data).digest())
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z, tempfile.TemporaryDirectory() as tmp:
        for name, data in sources:
            arc = f"{LIB_DIR}/cloudpickle/{name}"
            z.writestr(zipfile.ZipInfo(arc, _ZIP_TIME), data, zipfile.ZIP_DEFLATED)
            src = Path(tmp) / name
            src.write_bytes(data)
            pyc = Path(tmp) / (name + "c")
            # the path the job's Python sees, so that tracebacks through cloudpickle name a real file
            py_compile.compile(str(src), cfile=str(pyc), dfile=f"/job/{arc}", doraise=True,
                               invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH)
            cached = f"{LIB_DIR}/cloudpickle/__pycache__/{Path(name).stem}.{sys.implementation.cache_tag}.pyc"
            z.writestr(zipfile.ZipInfo(cached, _ZIP_TIME), pyc.read_bytes(), zipfile.ZIP_DEFLATED)
    return RunnerFiles(script, buf.getvalue(), h.hexdigest())


def _usable(client: Client, app: dict[str, Any], files: RunnerFiles) -> bool:
    """Is this app our runner? Its binaries must be our script (a look at one is enough: we publish them all
    from one data) and its fingerprint ours."""
    if (app.get("env") or {}).get("XWHEP_RUNNER") != files.fingerprint:
        return False
    binaries = app.get("binaries") or {}
    ref = binaries.get(PLATFORMS[0])
    if not ref:
        return False
    try:
        data = client.data(ref)
    except XwError:
        return False
    return data.get("sha256") == hashlib.sha256(files.script).hexdigest()


def _publish(client: Client, name: str, files: RunnerFiles, public: bool) -> dict[str, Any]:
    rights = "0x755" if public else None
    script = client.put_bytes(files.script, BINARY_NAME, access_rights=rights)
    lib = client.put_bytes(files.lib_zip, "xwhep-python-lib.zip", access_rights=rights, type="zip")
    return client.put_app(name, binaries={p: script["uid"] for p in PLATFORMS}, base_dirin=lib["uid"],
                          env={"XWHEP_RUNNER": files.fingerprint}, access_rights=rights)


def ensure_runner(client: Client, public: bool = False) -> dict[str, Any]:
    """The runner app this client can use (its record): the published one when there is one, else the caller's
    own, made now if missing. ``public``: publish it for every user (administrators only)."""
    files = runner_files()
    names = [files.app_name]
    login = client.login_name or str(client.me().get("login") or "")
    if login:
        names.append(f"{files.app_name}-{login}")
    last: XwError | None = None
    for name in names:
        try:
            app = client.app(name)
        except XwError as exc:
            if exc.status != 404:
                raise
            try:
                return _publish(client, name, files, public)
            except XwError as exc2:
                if exc2.status not in (403, 409):  # 409: another user's private app holds the name
                    raise
                last = exc2
                continue
        if _usable(client, app, files):
            return app
        last = XwError(f"app {name} exists but is not the runner this client needs", 409, "app")
    raise XwError(f"no usable runner app: {last}", 409, "app")
