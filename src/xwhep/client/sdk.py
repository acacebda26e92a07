"""``xwhep.Client``: the typed Python SDK. The CLI and the worker are thin layers over it.

Every method raises :class:`XwError` with the server's message (and the field it names) on a refusal, and on
connection problems with a readable text; never a bare HTTP exception.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import ssl
import tempfile
import threading
import time
import zipfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import urlsplit

import httpx

from xwhep.client.config import ClientConfig, load
from xwhep.client.transport import transport
from xwhep.core.uri import BadUri, is_uid, to_uid

Progress = Callable[[int], None]
CHUNK = 1024 * 1024
FINAL = frozenset({"COMPLETED", "ERROR", "FAILED"})
WAIT_BATCH = 10_000  # works per long-poll (the server's limit)


class XwError(Exception):
    """A refusal by the server or a failure to reach it; ``str()`` is one readable line."""

    def __init__(self, message: str, status: int | None = None, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.field = field


class HostForgotten(XwError):
    """The server no longer knows this client's host or its key (a new database, the host was deleted): register
    again (404, as a host call about an unknown host)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, 404, "host")


def uid_of(ref: str | dict[str, Any]) -> str:
    """The uid of a uid, an ``xw://`` URI, or an object dict."""
    if isinstance(ref, dict):
        return str(ref["uid"])
    try:
        return to_uid(ref)
    except BadUri as exc:
        raise XwError(str(exc), field="uri") from None


def sha256_file(path: Path, progress: Progress | None = None) -> tuple[str, int]:
    h = hashlib.sha256()
    n = 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
            n += len(chunk)
            if progress:
                progress(len(chunk))
    return h.hexdigest(), n


def zip_dir(src: Path, dest: Path) -> Path:
    """Zip a directory (or a lone file) for ``--xwenv``/dirin; paths are relative to ``src``."""
    with zipfile.ZipFile(dest, "w", zipfile.ZIP_DEFLATED) as z:
        if src.is_file():
            z.write(src, src.name)
        else:
            for p in sorted(src.rglob("*")):
                if p.is_symlink():
                    continue
                z.write(p, p.relative_to(src).as_posix())
    return dest


class Client:
    """A session with one xwhep server."""

    def __init__(self, server: str, ca: str | None = None, login: str | None = None, password: str | None = None,
                 token: str | None = None, timeout: float = 60.0, cert: str | None = None,
                 key: str | None = None, on_behalf_of: str | None = None) -> None:
        self.server = server.rstrip("/")
        # a MANDATED_USER acting for the user who mandated it: every authenticated request says so
        self.on_behalf_of = on_behalf_of
        self.base = self.server + "/api/v1"
        self.login_name = login
        self._password = password
        self._token = token
        self._token_expiry = float("inf") if token else 0.0
        self._cert = cert
        self._key = key
        self._given_token = token is not None
        # a host's own identity (services/hostkeys.py on the server): once bound, the client speaks as that host
        self.host: str | None = None
        self._host_key: str | None = None
        self._lock = threading.Lock()
        self._ca, self._timeout = ca, timeout
        verify: Any = ssl.create_default_context(cafile=ca) if ca else True
        if self.server.startswith("http://"):
            verify = False
        # the certificate proves who we are at the application level (xwhep.client.x509), not in the TLS handshake
        limits = httpx.Limits(max_connections=64, max_keepalive_connections=32)
        self.http = httpx.Client(verify=verify, timeout=httpx.Timeout(timeout, connect=15.0), limits=limits,
                                 transport=transport(verify, limits))
        netloc = urlsplit(self.server).netloc
        self.netloc = netloc

    @classmethod
    def from_config(cls, path: str | os.PathLike[str] | None = None, **kw: Any) -> Client:
        """Build from a client config file (see :mod:`xwhep.client.config`)."""
        cfg: ClientConfig = load(path)
        behalf = kw.pop("on_behalf_of", None) or os.environ.get("XW_ON_BEHALF_OF") or cfg.on_behalf_of
        return cls(cfg.server, ca=cfg.ca, login=cfg.login, password=cfg.password, token=cfg.token, cert=cfg.cert,
                   key=cfg.key, on_behalf_of=behalf, **kw)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def uri(self, uid: str) -> str:
        return f"xw://{self.netloc}/{uid}"

    # -- transport ---------------------------------------------------------------------------------------------
    def _login_method(self) -> str | None:
        """How :meth:`login` gets a token: ``x509`` with a configured certificate (+ key), else ``password``, else
        ``x509`` with a grid proxy ($X509_USER_PROXY, /tmp/x509up_u<uid>) when nothing at all is configured."""
        if self._host_key:
            return "host"
        if self._cert:
            return "x509"
        if self.login_name and self._password is not None:
            return "password"
        if not self._given_token:
            from xwhep.client.x509 import find_proxy

            if find_proxy() is not None:
                return "x509"
        return None

    def login(self) -> str:
        """Get a bearer token (done transparently when needed): X.509 with the configured certificate and key,
        else login + password, else a grid proxy (see :meth:`_login_method`)."""
        method = self._login_method()
        if method == "host":
            return self._login_host()
        if method == "x509":
            from xwhep.client.x509 import login_x509

            login_x509(self)
            return str(self._token)
        if method is None:
            raise XwError("no credentials: the client config needs login and password, cert and key, or a token "
                          "(or a grid proxy: xw x509 proxy-init)")
        assert self.login_name is not None and self._password is not None
        r = self._send("POST", "/auth/login", json={"login": self.login_name, "password": self._password}, auth=False)
        data = r.json()
        self._token = data["token"]
        self._token_expiry = time.monotonic() + float(data.get("expires_in", 3600)) * 0.8
        return str(self._token)

    def _login_host(self) -> str:
        assert self.host is not None and self._host_key is not None
        try:
            r = self._send("POST", "/auth/host", json={"host": self.host, "key": self._host_key}, auth=False)
        except XwError as exc:
            if exc.status != 401:
                raise
            host, self.host, self._host_key, self._token = self.host, None, None, None  # back to the user's login
            raise HostForgotten(f"the server no longer knows host {host} ({exc.message}): register again") from None
        data = r.json()
        self._token = data["token"]
        self._token_expiry = time.monotonic() + float(data.get("expires_in", 3600)) * 0.8
        return str(self._token)

    def bind_host(self, registration: dict[str, Any], key: str | None = None) -> None:
        """Speak as the host of ``registration`` (the answer of :meth:`register_host`) from now on: its token, and
        its key to renew it. ``key``: the host's key when the answer has none (a re-registration)."""
        host_key = registration.get("key") or key
        if not host_key:
            raise XwError(f"host {registration.get('uid')}: no key to bind to (register it anew)", field="key")
        with self._lock:
            self.host = str(registration["uid"])
            self._host_key = str(host_key)
            self._token = registration.get("token")
            ttl = float(registration.get("expires_in") or 0)
            self._token_expiry = time.monotonic() + ttl * 0.8 if self._token else 0.0

    def unbind_host(self) -> None:
        """Speak as the user again (e.g. to register a host anew)."""
        with self._lock:
            if self.host is not None:
                self.host, self._host_key, self._token, self._token_expiry = None, None, None, 0.0

    def host_client(self, registration: dict[str, Any], key: str | None = None) -> Client:
        """A new client for the same server that speaks only as the host of ``registration``."""
        c = Client(self.server, ca=self._ca, timeout=self._timeout)
        c.bind_host(registration, key)
        return c

    def _auth_header(self) -> dict[str, str]:
        with self._lock:
            expired = self._token is None or time.monotonic() >= self._token_expiry
            if expired and self._login_method():
                self.login()
            headers = {"Authorization": f"Bearer {self._token}"} if self._token else {}
        if self.on_behalf_of:
            headers["X-Xw-On-Behalf-Of"] = self.on_behalf_of
        return headers

    def _send(self, method: str, path: str, auth: bool = True, **kw: Any) -> httpx.Response:
        url = self.base + path
        for attempt in (1, 2):
            headers = dict(kw.pop("headers", None) or {})
            if auth:
                headers.update(self._auth_header())
            try:
                r = self.http.request(method, url, headers=headers, **kw)
            except httpx.TimeoutException:
                raise XwError(f"{self.server}: request timed out ({method} {path})") from None
            except httpx.ConnectError as exc:
                raise XwError(f"cannot reach server {self.server}: {_short(exc)}") from None
            except httpx.HTTPError as exc:
                raise XwError(f"{self.server}: {_short(exc)}") from None
            if r.status_code == 401 and auth and attempt == 1 and self._login_method():
                self._token = None  # expired or server restarted with a new secret: log in again once
                kw["headers"] = headers
                continue
            if r.status_code >= 400:
                raise _error(r)
            return r
        raise XwError("authentication failed")

    def _json(self, method: str, path: str, **kw: Any) -> Any:
        return self._send(method, path, **kw).json()

    # -- misc ----------------------------------------------------------------------------------------------------
    def version(self) -> dict[str, Any]:
        return self._json("GET", "/version", auth=False)  # type: ignore[no-any-return]

    def health(self) -> dict[str, Any]:
        return self._json("GET", "/health", auth=False)  # type: ignore[no-any-return]

    def me(self) -> dict[str, Any]:
        return self._json("GET", "/me")  # type: ignore[no-any-return]

    def get(self, ref: str) -> dict[str, Any]:
        """Any object by uid or URI (its ``kind`` tells what it is)."""
        return self._json("GET", f"/objects/{uid_of(ref)}")  # type: ignore[no-any-return]

    def chmod(self, ref: str, rights: str) -> dict[str, Any]:
        return self._json("POST", f"/objects/{uid_of(ref)}/chmod", json={"access_rights": rights})  # type: ignore

    def events(self, ref: str | None = None, limit: int = 1000) -> list[dict[str, Any]]:
        params: dict[str, Any] = {"limit": limit}
        if ref:
            params["object"] = uid_of(ref)
        return self._json("GET", "/events", params=params)  # type: ignore[no-any-return]

    # -- data ----------------------------------------------------------------------------------------------------
    def create_data(self, name: str, size: int | None = None, sha256: str | None = None, type: str | None = None,
                    access_rights: str | None = None) -> dict[str, Any]:
        body = {k: v for k, v in {"name": name, "size": size, "sha256": sha256, "type": type,
                                  "access_rights": access_rights}.items() if v is not None}
        return self._json("POST", "/datas", json=body)  # type: ignore[no-any-return]

    def upload(self, ref: str, path: Path, progress: Progress | None = None,
               sha256: str | None = None) -> dict[str, Any]:
        """Stream a file as the content of data ``ref``."""
        size = path.stat().st_size

        def chunks() -> Iterator[bytes]:
            with open(path, "rb") as f:
                while chunk := f.read(CHUNK):
                    if progress:
                        progress(len(chunk))
                    yield chunk

        headers = {"Content-Length": str(size), "Content-Type": "application/octet-stream"}
        if sha256:
            headers["X-Xw-Sha256"] = sha256
        return self._json("PUT", f"/datas/{uid_of(ref)}/content", content=chunks(), headers=headers,
                          timeout=httpx.Timeout(None, connect=15.0))

    def put_data(self, path: str | os.PathLike[str], name: str | None = None, access_rights: str | None = None,
                 type: str | None = None, progress: Progress | None = None) -> dict[str, Any]:
        """Send a file: checksum it, create the data, stream the bytes (skipped when the server has them)."""
        p = Path(path)
        if not p.is_file():
            raise XwError(f"no such file: {p}", field="file")
        sha, size = sha256_file(p)
        data = self.create_data(name or p.name, size, sha, type, access_rights)
        if data["status"] != "AVAILABLE":
            data = self.upload(data["uid"], p, progress)
        elif progress:
            progress(size)
        return data

    def data(self, ref: str) -> dict[str, Any]:
        return self._json("GET", f"/datas/{uid_of(ref)}")  # type: ignore[no-any-return]

    def put_bytes(self, content: bytes, name: str, access_rights: str | None = None,
                  type: str | None = None) -> dict[str, Any]:
        """Send bytes held in memory as a new data (no upload when the server already has them for you)."""
        sha = hashlib.sha256(content).hexdigest()
        data = self.create_data(name, len(content), sha, type, access_rights)
        if data["status"] != "AVAILABLE":
            headers = {"Content-Type": "application/octet-stream", "X-Xw-Sha256": sha}
            data = self._json("PUT", f"/datas/{data['uid']}/content", content=content, headers=headers)
        return data

    def read_bytes(self, ref: str, expected_sha256: str | None = None) -> bytes:
        """A data's whole content in memory (small data: results of Python calls), sha256 verified."""
        uid = uid_of(ref)
        r = self._send("GET", f"/datas/{uid}/content", timeout=httpx.Timeout(None, connect=15.0))
        sha = r.headers.get("x-xw-sha256") or expected_sha256
        if sha and hashlib.sha256(r.content).hexdigest() != sha:
            raise XwError(f"download of {uid}: sha256 mismatch (expected {sha})")
        return r.content

    def datas(self, page: int = 10_000) -> list[dict[str, Any]]:
        """Every data the caller may read (fetched ``page`` at a time, in uid order)."""
        out: list[dict[str, Any]] = []
        after = ""
        while True:
            items: list[dict[str, Any]] = self._json("GET", "/datas", params={"limit": page, "after": after})
            out.extend(items)
            if len(items) < page:
                return out
            after = items[-1]["uid"]

    def delete_data(self, ref: str) -> None:
        self._send("DELETE", f"/datas/{uid_of(ref)}")

    def download(self, ref: str, dest: str | os.PathLike[str], progress: Progress | None = None,
                 expected_sha256: str | None = None, resume: bool = True) -> Path:
        """Fetch a data's bytes to ``dest``; resumes a partial ``dest.part`` with HTTP Range; verifies sha256."""
        uid = uid_of(ref)
        dest = Path(dest)
        part = dest.with_name(dest.name + ".part")
        have = part.stat().st_size if resume and part.exists() else 0
        headers = {"Range": f"bytes={have}-"} if have else {}
        headers.update(self._auth_header())
        url = f"{self.base}/datas/{uid}/content"
        try:
            with self.http.stream("GET", url, headers=headers, timeout=httpx.Timeout(None, connect=15.0)) as r:
                if r.status_code == 416:  # the part is already complete
                    sha = r.headers.get("x-xw-sha256") or expected_sha256
                elif r.status_code >= 400:
                    r.read()
                    raise _error(r)
                else:
                    sha = r.headers.get("x-xw-sha256") or expected_sha256
                    mode = "ab" if r.status_code == 206 else "wb"
                    if mode == "ab" and progress:
                        progress(have)
                    with open(part, mode) as f:
                        for chunk in r.iter_bytes():
                            f.write(chunk)
                            if progress:
                                progress(len(chunk))
        except httpx.HTTPError as exc:
            raise XwError(f"download of {uid} interrupted: {_short(exc)} (run again to resume)") from None
        got, _ = sha256_file(part)
        if sha and got != sha:
            part.unlink()
            raise XwError(f"download of {uid}: sha256 mismatch (expected {sha}, got {got}); removed")
        os.replace(part, dest)
        return dest

    # -- apps ----------------------------------------------------------------------------------------------------
    def put_app(self, name: str, type: str | None = None, binaries: dict[str, str | os.PathLike[str]] | None = None,
                progress: Progress | None = None, **settings: Any) -> dict[str, Any]:
        """Register an app (or add binaries to it). Binary values are files (uploaded) or data uids/URIs."""
        bins: dict[str, str] = {}
        for platform, value in (binaries or {}).items():
            bins[platform] = self._data_ref(value, progress)
        for key in ("default_stdin", "default_dirin", "base_dirin", "image"):
            if settings.get(key) is not None:
                settings[key] = self._data_ref(settings[key], progress)
        body = {"name": name, "binaries": bins, **({"type": type} if type else {}),
                **{k: v for k, v in settings.items() if v is not None}}
        return self._json("POST", "/apps", json=body)  # type: ignore[no-any-return]

    def _data_ref(self, value: str | os.PathLike[str], progress: Progress | None = None) -> str:
        text = str(value)
        if text.startswith("xw://"):
            return uid_of(text)
        p = Path(text)
        if p.exists():
            if p.is_dir():
                with tempfile.TemporaryDirectory() as tmp:
                    z = zip_dir(p, Path(tmp) / (p.name + ".zip"))
                    return str(self.put_data(z, progress=progress)["uid"])
            return str(self.put_data(p, progress=progress)["uid"])
        try:
            return to_uid(text)
        except BadUri:
            raise XwError(f"no such file: {text}", field="file") from None

    def apps(self) -> list[dict[str, Any]]:
        return self._json("GET", "/apps")  # type: ignore[no-any-return]

    def app(self, ref: str) -> dict[str, Any]:
        return self._json("GET", f"/apps/{ref if not ref.startswith('xw://') else uid_of(ref)}")  # type: ignore

    def delete_app(self, ref: str) -> None:
        self._send("DELETE", f"/apps/{uid_of(self.app(ref)['uid'])}")

    # -- works ---------------------------------------------------------------------------------------------------
    def work_spec(self, app: str, **kw: Any) -> dict[str, Any]:
        """A submission dict; ``env_dir`` (``--xwenv``): a directory/file is zipped and sent, a zip/uid/URI used."""
        spec = {"app": app if not app.startswith("xw://") else uid_of(app)}
        xwenv = kw.pop("xwenv", None)
        if xwenv:
            spec["dirin"] = self._env_ref(str(xwenv))
        for key in ("stdin",):
            if kw.get(key):
                kw[key] = self._data_ref(kw[key])
        spec.update({k: v for k, v in kw.items() if v is not None})
        return spec

    def _env_ref(self, value: str) -> str:
        p = Path(value)
        if p.exists():
            if p.is_file() and zipfile.is_zipfile(p):
                return str(self.put_data(p)["uid"])
            with tempfile.TemporaryDirectory() as tmp:
                z = zip_dir(p, Path(tmp) / ((p.name or "env") + ".zip"))
                return str(self.put_data(z)["uid"])
        try:
            return to_uid(value)
        except BadUri:
            raise XwError(f"--xwenv: no such file or directory, and not a uid/URI: {value}", field="xwenv") from None

    def submit(self, app: str, **kw: Any) -> dict[str, Any]:
        """Submit one work; returns ``{"uid", "uri", "status"}``."""
        return self._json("POST", "/works", json=self.work_spec(app, **kw))  # type: ignore[no-any-return]

    def submit_bag(self, specs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Submit many works in one request (up to 10,000)."""
        return self._json("POST", "/works", json={"works": specs})["works"]  # type: ignore[no-any-return]

    def work(self, ref: str) -> dict[str, Any]:
        return self._json("GET", f"/works/{uid_of(ref)}")  # type: ignore[no-any-return]

    def works(self, status: str | None = None, label: str | None = None, group: str | None = None,
              session: str | None = None, app: str | None = None, page: int = 10_000) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        after = 0
        while True:
            params = {k: v for k, v in {"status": status, "label": label, "group": group, "session": session,
                                         "app": app, "limit": page, "after": after}.items() if v is not None}
            data = self._json("GET", "/works", params=params)
            out.extend(data["items"])
            if not data.get("next"):
                return out
            after = data["next"]

    def tasks(self, ref: str) -> list[dict[str, Any]]:
        return self._json("GET", f"/works/{uid_of(ref)}/tasks")  # type: ignore[no-any-return]

    def why(self, ref: str) -> dict[str, Any]:
        return self._json("GET", f"/works/{uid_of(ref)}/why")  # type: ignore[no-any-return]

    def delete_work(self, ref: str) -> None:
        self._send("DELETE", f"/works/{uid_of(ref)}")

    def cancel(self, ref: str) -> dict[str, Any]:
        return self._json("POST", f"/works/{uid_of(ref)}/cancel")  # type: ignore[no-any-return]

    def statuses(self, refs: Iterable[str]) -> dict[str, str]:
        return {w["uid"]: w["status"] for w in (self.work(r) for r in refs)}

    def wait(self, refs: Iterable[str], timeout: float | None = None,
             on_change: Callable[[str, str], None] | None = None) -> dict[str, str]:
        """Block until every work is final (COMPLETED, ERROR, FAILED) or ``timeout``; returns uid → status.

        The server answers as soon as a status changes (a long-poll), so this returns when the last work ends,
        not at the next poll."""
        uids = list(dict.fromkeys(uid_of(r) for r in refs))
        deadline = None if timeout is None else time.monotonic() + timeout
        status: dict[str, str] = {}
        for start in range(0, len(uids), WAIT_BATCH):
            chunk = uids[start:start + WAIT_BATCH]
            while True:
                left = 30.0 if deadline is None else max(0.0, min(30.0, deadline - time.monotonic()))
                known = {u: status[u] for u in chunk if u in status}
                new = self._json("POST", "/works/wait", json={"works": chunk, "known": known, "timeout": left},
                                 timeout=httpx.Timeout(left + 30.0, connect=15.0))["works"]
                for uid, st in new.items():
                    if st != status.get(uid) and on_change:
                        on_change(uid, st)
                    status[uid] = st
                if all(status[u] in FINAL for u in chunk):
                    break
                if deadline is not None and time.monotonic() >= deadline:
                    for rest in range(start + WAIT_BATCH, len(uids), WAIT_BATCH):  # not asked yet: where they stand
                        status.update(self._json("POST", "/works/wait", json={
                            "works": uids[rest:rest + WAIT_BATCH], "timeout": 0})["works"])
                    return status
        return status

    def wait_bag(self, group: str | None = None, label: str | None = None, timeout: float | None = None,
                 on_change: Callable[[dict[str, int]], None] | None = None) -> dict[str, int]:
        """Block until every work of ``group`` (uid or URI) or with ``label`` is final, or ``timeout``; returns
        status → count (the works the caller reads). Empty when there are none. A long-poll on the counts: one
        request per change, whatever the number of works."""
        body: dict[str, Any] = {"group": uid_of(group)} if group else {"label": label}
        deadline = None if timeout is None else time.monotonic() + timeout
        counts: dict[str, int] | None = None
        while True:
            left = 30.0 if deadline is None else max(0.0, min(30.0, deadline - time.monotonic()))
            reply = self._json("POST", "/works/wait", json={**body, "known_counts": counts or {}, "timeout": left},
                               timeout=httpx.Timeout(left + 30.0, connect=15.0))
            if reply["counts"] != counts and on_change:
                on_change(reply["counts"])
            counts = reply["counts"]
            if reply["final"] or (deadline is not None and time.monotonic() >= deadline):
                return counts

    def follow_events(self, ref: str | None = None, action: str | None = None, group: str | None = None,
                      label: str | None = None, after: int | None = None,
                      on_notice: Callable[[str, dict[str, Any]], None] | None = None) -> EventStream:
        """The events the caller may see, as the server commits them (``GET /events/stream``, Server-Sent
        Events): an iterator over them, open when this returns (what happens from now on is in it), until
        :meth:`EventStream.close`. Each is rendered as :meth:`events` renders them, plus its ``id``. Filters: an
        object, an action prefix, a group or a label (events on its works). ``after``: replay the events after
        this id first. A broken stream is reopened after the last event seen (``Last-Event-ID``), with back-off;
        ``on_notice(kind, data)`` hears of ``open``, ``reconnect``, ``gap`` (events not replayed) and ``end``
        (the server ended the stream)."""
        params = {k: v for k, v in {"object": uid_of(ref) if ref else None, "action": action,
                                    "group": uid_of(group) if group else None, "label": label}.items()
                  if v is not None}
        return EventStream(self, params, after, on_notice)

    def poll_works(self, refs: Iterable[str], known: dict[str, str] | None = None,
                   timeout: float = 30.0) -> dict[str, str]:
        """One long-poll round (at most 10,000 works): uid → status as soon as one work's status differs from
        ``known``, all are final, or ``timeout`` seconds passed. :meth:`wait` loops over it."""
        body = {"works": [uid_of(r) for r in refs], "known": known or {}, "timeout": timeout}
        return self._json("POST", "/works/wait", json=body,  # type: ignore[no-any-return]
                          timeout=httpx.Timeout(timeout + 30.0, connect=15.0))["works"]

    def fetch_result(self, ref: str, dest_dir: str | os.PathLike[str] = ".", progress: Progress | None = None) -> Path:
        """Download a completed work's result into ``dest_dir``; size and sha256 verified."""
        w = self.work(ref)
        if not w.get("result"):
            raise XwError(f"work {w['uid']} has no result (status {w['status']})")
        d = self.data(w["result"])
        dest = Path(dest_dir) / f"{w['uid']}-{d['name'].split('/')[-1]}"
        path = self.download(w["result"], dest, progress=progress, expected_sha256=d["sha256"])
        if path.stat().st_size != d["size"]:
            path.unlink()
            raise XwError(f"result of {w['uid']}: size mismatch")
        return path

    # -- users, groups, sessions -----------------------------------------------------------------------------------
    def users(self) -> list[dict[str, Any]]:
        return self._json("GET", "/users")  # type: ignore[no-any-return]

    def create_user(self, login: str, password: str | None = None, level: str = "STANDARD_USER",
                    usergroup: str | None = None, email: str | None = None) -> dict[str, Any]:
        body = {k: v for k, v in {"login": login, "password": password, "level": level, "usergroup": usergroup,
                                  "email": email}.items() if v is not None}
        return self._json("POST", "/users", json=body)  # type: ignore[no-any-return]

    def delete_user(self, ref: str) -> None:
        """Remove a user (administrators; a group administrator for members of the group)."""
        self._send("DELETE", f"/users/{uid_of(ref)}")

    def user(self, ref: str) -> dict[str, Any]:
        """A user by login, uid or URI, among those the caller may see."""
        want = ref.strip()
        uid = None
        if want.startswith("xw://") or is_uid(want.lower()):
            uid = uid_of(want)
        for u in self.users():
            if u["uid"] == uid or u["login"] == want:
                return u
        raise XwError(f"no user {ref}", 404, "user")

    def revoke_tokens(self, ref: str) -> None:
        """End every session of a user now: its tokens issued until now are refused (the user itself, its group
        administrator or an administrator)."""
        self._send("POST", f"/users/{uid_of(ref)}/revoke")

    def delete_host(self, ref: str) -> None:
        """Remove a host (its owner or an administrator): its key and tokens are refused at once."""
        self._send("DELETE", f"/hosts/{uid_of(ref)}")

    def grant_mandate(self, mandatary: str, expires_in: float | None = None,
                      mandator: str | None = None) -> dict[str, Any]:
        """Let the MANDATED_USER ``mandatary`` act on your behalf (administrators: on ``mandator``'s), until
        ``expires_in`` seconds from now or until revoked. Granting again renews it."""
        body: dict[str, Any] = {"mandatary": mandatary}
        if expires_in is not None:
            body["expires_in"] = expires_in
        if mandator is not None:
            body["mandator"] = mandator
        return self._json("POST", "/mandates", json=body)  # type: ignore[no-any-return]

    def mandates(self) -> list[dict[str, Any]]:
        """The mandates you gave or hold (administrators: all)."""
        return self._json("GET", "/mandates")  # type: ignore[no-any-return]

    def revoke_mandate(self, ref: str) -> None:
        """End a mandate at once."""
        self._send("DELETE", f"/mandates/{uid_of(ref)}")

    def usergroups(self) -> list[dict[str, Any]]:
        return self._json("GET", "/usergroups")  # type: ignore[no-any-return]

    def create_usergroup(self, label: str) -> dict[str, Any]:
        return self._json("POST", "/usergroups", json={"label": label})  # type: ignore[no-any-return]

    def create_bag(self, kind: str, label: str | None = None) -> dict[str, Any]:
        return self._json("POST", f"/{kind}s", json={"label": label} if label else {})  # type: ignore

    def bags(self, kind: str) -> list[dict[str, Any]]:
        return self._json("GET", f"/{kind}s")  # type: ignore[no-any-return]

    def delete_bag(self, kind: str, ref: str) -> None:
        self._send("DELETE", f"/{kind}s/{uid_of(ref)}")

    def hosts(self) -> list[dict[str, Any]]:
        return self._json("GET", "/hosts")  # type: ignore[no-any-return]

    # -- the worker protocol ---------------------------------------------------------------------------------------
    def host_record(self, ref: str) -> dict[str, Any]:
        """What a host did (its owner, administrators): tasks by status, time run, latest tasks."""
        return self._json("GET", f"/hosts/{uid_of(ref)}/stats")  # type: ignore[no-any-return]

    def stats(self, **params: Any) -> dict[str, Any]:
        """Works by status, bags' progress, hosts alive (GET /stats; ``group=``, ``label=``, ``by="label"``)."""
        return self._json("GET", "/stats", params={k: v for k, v in params.items() if v is not None})  # type: ignore

    def register_host(self, description: dict[str, Any]) -> dict[str, Any]:
        """Register a host (a new one answers with its ``key``: keep it), or refresh one: ``uid`` and ``key`` in
        ``description``, or a client already bound to it. The answer has a ``token`` bound to the host; pass the
        answer to :meth:`bind_host` (or :meth:`host_client`) to speak as the host."""
        return self._json("POST", "/hosts", json=description)  # type: ignore[no-any-return]

    def request_works(self, host: str, max: int = 1, wait: float = 0.0) -> list[dict[str, Any]]:
        r = self._json("POST", f"/hosts/{host}/request", json={"max": max, "wait": wait},
                       timeout=httpx.Timeout(wait + 60.0, connect=15.0))
        return r["works"]  # type: ignore[no-any-return]

    def alive(self, host: str, tasks: list[str] | None = None, results: list[str] | None = None,
              active: bool = True) -> dict[str, Any]:
        return self._json("POST", f"/hosts/{host}/alive",  # type: ignore[no-any-return]
                          json={"tasks": tasks or [], "results": results or [], "active": active})

    def report(self, host: str, reports: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return self._json("POST", f"/hosts/{host}/reports", json={"reports": reports})["reports"]  # type: ignore

    def sync(self, host: str, reports: list[dict[str, Any]] | None = None, tasks: list[str] | None = None,
             results: list[str] | None = None, active: bool = True, max: int = 0, wait: float = 0.0
             ) -> dict[str, Any]:
        """A worker's round trip in one call: report finished tasks, signal alive for ``tasks`` (running) and
        ``results`` (held), and take up to ``max`` new works, waiting up to ``wait`` s for some. The reply has
        ``reports`` (outcomes), ``tasks``/``ack``/``resend``/``report`` (as :meth:`alive`) and ``works``."""
        body = {"reports": reports or [], "tasks": tasks or [], "results": results or [], "active": active,
                "max": max, "wait": wait}
        return self._json("POST", f"/hosts/{host}/sync", json=body,  # type: ignore[no-any-return]
                          timeout=httpx.Timeout(wait + 60.0, connect=15.0))

    def download_to(self, info: dict[str, Any], f: BinaryIO) -> None:
        """Stream a data described by an assignment (uid, sha256) into an open file (the worker's cache)."""
        url = f"{self.base}/datas/{info['uid']}/content"
        with self.http.stream("GET", url, headers=self._auth_header(), timeout=httpx.Timeout(None, connect=15.0)) as r:
            if r.status_code >= 400:
                r.read()
                raise _error(r)
            for chunk in r.iter_bytes():
                f.write(chunk)


class EventStream:
    """An open ``GET /events/stream`` (see :meth:`Client.follow_events`): iterate for events; close when done."""

    def __init__(self, client: Client, params: dict[str, str], after: int | None,
                 on_notice: Callable[[str, dict[str, Any]], None] | None) -> None:
        self.client, self.params, self.last, self.on_notice = client, params, after, on_notice
        self._response: Any = None
        self._lines: Iterator[tuple[str, str | None, str]] | None = None
        self._open()

    def _notice(self, kind: str, data: dict[str, Any]) -> None:
        if self.on_notice is not None:
            self.on_notice(kind, data)

    def _open(self) -> None:
        c = self.client
        for attempt in (1, 2):
            headers = c._auth_header()
            if self.last is not None:
                headers["Last-Event-ID"] = str(self.last)
            cm = c.http.stream("GET", c.base + "/events/stream", params=self.params, headers=headers,
                               timeout=httpx.Timeout(15.0, read=60.0))  # heartbeats come every 15 s
            try:
                r = cm.__enter__()
            except httpx.TimeoutException:
                raise XwError(f"{c.server}: request timed out (GET /events/stream)") from None
            except httpx.HTTPError as exc:
                raise XwError(f"cannot reach server {c.server}: {_short(exc)}") from None
            if r.status_code == 401 and attempt == 1 and c._login_method():
                cm.__exit__(None, None, None)
                c._token = None  # expired: log in again once
                continue
            if r.status_code >= 400:
                r.read()
                cm.__exit__(None, None, None)
                raise _error(r)
            self._response = cm
            self._lines = _sse(r.iter_lines())
            self._notice("open", {"after": self.last})
            return

    def _drop(self) -> None:
        cm, self._response, self._lines = self._response, None, None
        if cm is not None:
            with contextlib.suppress(Exception):
                cm.__exit__(None, None, None)

    def __iter__(self) -> EventStream:
        return self

    def __next__(self) -> dict[str, Any]:
        pause = 0.5
        while True:
            if self._lines is None:
                try:
                    self._open()
                except XwError as exc:
                    if exc.status is not None:  # a refusal (not a network failure): retrying will not help
                        raise
                    self._notice("reconnect", {"reason": exc.message, "after": self.last})
                    time.sleep(pause)
                    pause = min(30.0, pause * 2)
                    continue
            try:
                assert self._lines is not None
                kind, ident, data = next(self._lines)
            except (StopIteration, httpx.TransportError) as exc:
                self._drop()
                reason = _short(exc) if isinstance(exc, httpx.TransportError) else "the stream ended"
                self._notice("reconnect", {"reason": reason, "after": self.last})
                time.sleep(pause)
                pause = min(30.0, pause * 2)
                continue
            if kind in ("gap", "end"):
                self._notice(kind, json.loads(data))
                continue
            event: dict[str, Any] = json.loads(data)
            if ident is not None:
                self.last = event["id"] = int(ident)
            return event

    def close(self) -> None:
        """End the stream (the server frees its slot at once)."""
        self._drop()

    def __enter__(self) -> EventStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _sse(lines: Iterable[str]) -> Iterator[tuple[str, str | None, str]]:
    """Server-Sent Events from text lines: (event name, id, data) each; comments and retry hints skipped."""
    kind, ident, data = "message", None, []
    for line in lines:
        if not line:
            if data:
                yield kind, ident, "\n".join(data)
            kind, ident, data = "message", None, []
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if name == "event":
            kind = value
        elif name == "id":
            ident = value
        elif name == "data":
            data.append(value)


def _short(exc: Exception) -> str:
    text = str(exc) or type(exc).__name__
    return text.splitlines()[0][:300]


def _error(r: httpx.Response) -> XwError:
    try:
        body = r.json()
        msg = body.get("error") or body.get("detail") or r.text
        field = body.get("field")
    except ValueError:
        msg, field = (r.text.strip()[:300] or r.reason_phrase), None
    return XwError(f"{msg} (HTTP {r.status_code})", r.status_code, field)
