"""``xwhep.Executor``: a :class:`concurrent.futures.Executor` whose calls run as works on an xwhep grid.

Each call (or each chunk of ``chunksize`` calls of :meth:`Executor.map`) is one work of the runner app
(:mod:`xwhep.bridges.runnerapp`): the function, pickled with cloudpickle, is the work's stdin (one data per
distinct function, shared by all its works), the pickled ``(args, kwargs)`` ride in the work's arguments (a data of
their own when large), and the work's result holds the pickled outcomes, read by :mod:`xwhep.bridges.runner`'s
format. Three threads do the I/O, none in the caller's:

* the *submitter* sends what :meth:`~Executor.submit`/:meth:`~Executor.map` queued, as bags (one request for up
  to 10,000 works; whatever was queued while a request was under way goes in the next one);
* the *waiter* holds one long-poll (``POST /works/wait``) over every live work and marks futures running or hands
  finished works to
* the *fetchers* (a small pool), which read each result, set its futures and delete the work (and its result)
  from the server, unless ``keep=True``.

Every request that can fail for a passing reason (no connection, 5xx, 429) is retried with back-off; a refusal
(4xx) fails the futures concerned with the server's message.

Trust: results are unpickled in the caller, so a worker that returns a crafted result can run code in the
caller. Run an Executor's works on workers you trust (your own or your group's: ``requirements``/``expected_host``
and private or group workers), as with any pickle-based remote executor.
"""

from __future__ import annotations

import atexit
import base64
import hashlib
import io
import itertools
import logging
import os
import pickle
import re
import sys
import threading
import time
import uuid
import weakref
import zipfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Executor as _BaseExecutor
from concurrent.futures import Future
from concurrent.futures import ThreadPoolExecutor as _Pool
from dataclasses import dataclass, field
from typing import Any, TypeVar

from xwhep.client.sdk import FINAL, Client, XwError

__all__ = ["Executor", "RemoteError", "RemoteTraceback", "WorkFailed"]

log = logging.getLogger("xwhep.executor")

T = TypeVar("T")
PROTOCOL = "1"
INLINE_MAX = 16 * 1024  # base64 characters of arguments carried in the work itself; past that, a data
BAG_MAX = 10_000  # works per submission (the server's limit)
BAG_BYTES = 8 << 20  # and about this many bytes of arguments per submission (the server takes 64 MiB of JSON)
WAIT_MAX = 10_000  # works per long-poll (the server's limit)
CALLS_FILE = "xw-calls.pkl"
RESULT_FILE = "xw-result.pkl"
RUNNING = frozenset({"RUNNING", "DATAREQUEST"})
WORK_OPTIONS = frozenset({"wallclock", "max_retries", "requirements", "rank", "min_memory", "min_cpuspeed",
                          "min_disk", "expected_host", "env", "group", "access_rights"})
_NO_WORK = re.compile(r"no work ([0-9a-fA-F-]{36})")


class RemoteTraceback(Exception):
    """The traceback of an exception raised in a work, as text: set as the ``__cause__`` of the re-raised
    exception, so that a printed traceback shows where in the work it happened (as ProcessPoolExecutor does)."""

    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return f'\n"""\n{self.tb}"""'


class RemoteError(Exception):
    """A call failed in its work and its exception could not be recreated here (its type cannot be unpickled in
    the caller, or the runner itself failed: interpreter mismatch, a function that cannot be unpickled)."""

    def __init__(self, message: str, type_name: str = "", remote_traceback: str = "", work: str = "") -> None:
        super().__init__(message)
        self.type_name = type_name
        self.remote_traceback = remote_traceback
        self.work = work

    def __str__(self) -> str:
        text = super().__str__()
        return f"{text}\n\nremote traceback:\n{self.remote_traceback}" if self.remote_traceback else text


class WorkFailed(Exception):
    """The work that carried the call did not complete: it ended ERROR or FAILED (a worker failure, its wall
    clock, retries exhausted, cancelled by someone else), vanished from the server, or left no outcome."""

    def __init__(self, message: str, work: str = "", status: str = "", reason: str = "",
                 return_code: int | None = None, stderr_tail: str = "") -> None:
        super().__init__(message)
        self.work = work
        self.status = status
        self.reason = reason
        self.return_code = return_code
        self.stderr_tail = stderr_tail


# Guards every move of a call future out of PENDING (to RUNNING, or cancelled and notified), so that a cancel() in
# the caller's thread and the waiter marking a work running never both act on one future. Reentrant: done callbacks
# run under it and may cancel other futures.
_transitions = threading.RLock()


class _CallFuture(Future[Any]):
    """A future whose cancellation reaches the server (when every call of its work is cancelled)."""

    def __init__(self, executor: Executor, work: _Work) -> None:
        super().__init__()
        self._xw_executor = weakref.ref(executor)
        self._xw_work = work

    @property
    def work(self) -> str | None:
        """The uid of the work that carries this call (None until submitted)."""
        return self._xw_work.uid

    def cancel(self) -> bool:
        with _transitions:
            if self.cancelled():
                return True
            if not super().cancel():
                return False
            # notified at once: concurrent.futures.wait() and as_completed() count a cancelled future as done
            # only then, and the work may never be looked at again (a queued one is simply not sent)
            self.set_running_or_notify_cancel()
        ex = self._xw_executor()
        if ex is not None:
            ex._cancelled(self._xw_work)
        return True


@dataclass(eq=False)
class _Work:
    fn_sha: str
    fn_bytes: bytes
    calls: bytes  # the pickled list of (args, kwargs)
    options: dict[str, Any]
    label: str
    futures: list[_CallFuture] = field(default_factory=list)
    uid: str | None = None
    args_data: str | None = None  # a data of its own for large arguments (deleted after the work)
    status: str | None = None
    started: bool = False
    cancel_sent: bool = False
    finishing: bool = False

    def all_cancelled(self) -> bool:
        return all(f.cancelled() for f in self.futures)


def _transient(exc: BaseException) -> bool:
    return isinstance(exc, XwError) and (exc.status is None or exc.status >= 500 or exc.status == 429)


class _EnvelopeUnpickler(pickle.Unpickler):
    """The outcome envelope holds builtins only: refusing every global keeps a crafted one from running code
    while it is read (the values inside are unpickled one by one, afterwards)."""

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"unexpected global {module}.{name} in an outcome envelope")


_live_executors: weakref.WeakSet[Executor] = weakref.WeakSet()


@atexit.register
def _abandon_all() -> None:
    # An interpreter that exits cannot take results any more: what is left on the server is cancelled and removed
    # (unless kept), instead of running for nobody.
    for ex in list(_live_executors):
        try:
            ex._abandon()
        except Exception:  # exiting: tell, never raise
            log.exception("xwhep.Executor: cleanup at exit failed")


class Executor(_BaseExecutor):
    """Run Python calls as works on an xwhep grid.

    ``client``: an :class:`xwhep.Client`, a client config path, or None for the default config (``XW_CONFIG``).
    ``app``: the runner app (name, uid or URI); None publishes or reuses the standard one (see
    :mod:`xwhep.bridges.runnerapp`). A chosen app must run :mod:`xwhep.bridges.runner` with a ``python3`` of the
    caller's minor version that can import cloudpickle (a container or VM image, a SHARED app).
    ``keep``: leave works, results and data on the server (inspect them with ``xw works --session``).
    ``fetchers``: results read in parallel. ``poll_s``: the long-poll's length (works submitted during one are
    watched from the next). ``label``: prefix of the works' labels. Other keyword arguments are work options given
    to every work: ``wallclock`` (s), ``max_retries``, ``requirements``, ``rank``, ``min_memory``, ``min_cpuspeed``,
    ``min_disk``, ``expected_host``, ``env``, ``group``, ``access_rights``.

    Functions and arguments are pickled with cloudpickle: functions defined in ``__main__`` travel by value; those
    of other modules by reference, so the job's Python must import the module, unless it is registered with
    ``cloudpickle.register_pickle_by_value(module)``. The job's ``python3`` must be of the caller's minor version
    (checked in the job: a mismatch fails the call with :class:`RemoteError` saying so).
    """

    def __init__(self, client: Client | str | os.PathLike[str] | None = None, app: str | None = None, *,
                 keep: bool = False, fetchers: int = 4, poll_s: float = 2.0, label: str | None = None,
                 **work_options: Any) -> None:
        unknown = set(work_options) - WORK_OPTIONS
        if unknown:
            raise TypeError(f"unknown work option(s): {', '.join(sorted(unknown))} (known: "
                            f"{', '.join(sorted(WORK_OPTIONS))})")
        import cloudpickle  # here, so that a missing extra says so at once

        self._dumps: Callable[[Any], bytes] = cloudpickle.dumps
        self._own_client = not isinstance(client, Client)
        self.client: Client = client if isinstance(client, Client) else Client.from_config(client)
        self.keep = keep
        self.poll_s = poll_s
        self.options = dict(work_options)
        self.label = label or f"xwhep-executor-{uuid.uuid4().hex[:8]}"
        self._pyver = f"{sys.version_info[0]}.{sys.version_info[1]}"
        try:
            if app is None:
                from xwhep.bridges.runnerapp import ensure_runner

                app = str(ensure_runner(self.client)["uid"])
            self.app = app
            self.session = str(self.client.create_bag("session", self.label)["uid"])
        except BaseException:
            if self._own_client:
                self.client.close()
            raise
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._queue: list[_Work] = []
        self._live: dict[str, _Work] = {}  # uid → submitted work not yet finished
        self._in_flight = 0  # works taken by the submitter, not yet live
        self._fn_datas: dict[str, str] = {}  # sha256 of a pickled function → its data
        self._seq = itertools.count()
        self._shutdown = False
        self._submit_done = False  # the submitter has ended (shut down, queue empty)
        self._stop = threading.Event()  # set when everything is over (or abandoned): back-offs end at once
        self._closed = False
        self._pool = _Pool(max_workers=max(1, fetchers), thread_name_prefix="xwhep-fetch")
        self._submitter = threading.Thread(target=self._submit_loop, name="xwhep-submit", daemon=True)
        self._waiter = threading.Thread(target=self._wait_loop, name="xwhep-wait", daemon=True)
        self._submitter.start()
        self._waiter.start()
        _live_executors.add(self)

    # -- the public API -------------------------------------------------------------------------------------------
    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        """Run ``fn(*args, **kwargs)`` in a work; the future holds its return value or its exception."""
        return self._submit_calls(fn, [(args, kwargs)], {})[0]

    def submit_with(self, options: Mapping[str, Any], fn: Callable[..., T], /, *args: Any,
                    **kwargs: Any) -> Future[T]:
        """:meth:`submit` with work options for this call only (e.g. ``{"wallclock": 60}``)."""
        return self._submit_calls(fn, [(args, kwargs)], dict(options))[0]

    def map(self, fn: Callable[..., T], *iterables: Iterable[Any], timeout: float | None = None,
            chunksize: int = 1) -> Iterator[T]:
        """Like :func:`map`, the calls running as works, ``chunksize`` calls per work; results come in order, an
        exception is raised when its call's turn comes. All calls are submitted before this returns."""
        if chunksize < 1:
            raise ValueError("chunksize must be >= 1")
        end = None if timeout is None else time.monotonic() + timeout
        calls: list[tuple[tuple[Any, ...], dict[str, Any]]] = [(args, {}) for args in zip(*iterables, strict=False)]
        futures: list[Future[T]] = []
        fn_bytes = self._dumps(fn)
        works = [self._make_work(fn_bytes, calls[i:i + chunksize], {}) for i in range(0, len(calls), chunksize)]
        self._enqueue(works)
        for w in works:
            futures.extend(w.futures)

        def results() -> Iterator[T]:
            try:
                futures.reverse()
                while futures:
                    f = futures.pop()
                    yield f.result() if end is None else f.result(end - time.monotonic())
            finally:
                for f in futures:
                    f.cancel()

        return results()

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """No more calls; ``cancel_futures`` cancels the calls whose works have not started (on the server too);
        ``wait`` blocks until every call is done and the server cleaned (its works, results and data deleted,
        unless ``keep``). Without ``wait`` that goes on in the background."""
        with self._lock:
            self._shutdown = True
            queued, live = list(self._queue), list(self._live.values())
            # When no call has started, deleting the session removes every work in one request (instead of a
            # cancel and a delete per work); the works are marked so that nothing else acts on them meanwhile.
            bulk = (cancel_futures and not self.keep and bool(live) and not self._in_flight
                    and not any(w.started for w in live))
            if bulk:
                for w in live:
                    w.cancel_sent = w.finishing = True
        if cancel_futures:
            for w in [*queued, *live]:
                for f in w.futures:
                    f.cancel()  # one cancel request per work whose calls are all cancelled (not in bulk)
            if bulk:
                self._drop_session(live)
        with self._lock:
            self._changed.notify_all()
        if wait:
            self._submitter.join()
            self._waiter.join()

    # -- building and queueing works ------------------------------------------------------------------------------
    def _submit_calls(self, fn: Callable[..., Any], calls: list[tuple[tuple[Any, ...], dict[str, Any]]],
                      options: dict[str, Any]) -> list[_CallFuture]:
        work = self._make_work(self._dumps(fn), calls, options)
        self._enqueue([work])
        return work.futures

    def _make_work(self, fn_bytes: bytes, calls: list[tuple[tuple[Any, ...], dict[str, Any]]],
                   options: dict[str, Any]) -> _Work:
        unknown = set(options) - WORK_OPTIONS
        if unknown:
            raise TypeError(f"unknown work option(s): {', '.join(sorted(unknown))}")
        work = _Work(fn_sha=hashlib.sha256(fn_bytes).hexdigest(), fn_bytes=fn_bytes, calls=self._dumps(calls),
                     options={**self.options, **options}, label=f"{self.label}/{next(self._seq)}")
        work.futures = [_CallFuture(self, work) for _ in calls]
        return work

    def _enqueue(self, works: list[_Work]) -> None:
        with self._lock:
            if self._shutdown:
                raise RuntimeError("cannot schedule new futures after shutdown")
            self._queue.extend(works)
            self._changed.notify_all()

    # -- the submitter --------------------------------------------------------------------------------------------
    def _submit_loop(self) -> None:
        while True:
            with self._lock:
                while not self._queue and not self._shutdown:
                    self._changed.wait()
                if not self._queue:
                    self._submit_done = True
                    self._changed.notify_all()  # the waiter may be idle, waiting for this thread to end
                    return
                batch = self._take_batch()
                self._in_flight += len(batch)
            try:
                self._send(batch)
            except Exception as exc:  # a refusal, or a bug: the calls fail with it, the thread goes on
                log.warning("xwhep.Executor: submission failed: %s", exc)
                for w in batch:
                    if w.uid is None:
                        _fail(w, exc)
            finally:
                with self._lock:
                    self._in_flight -= len(batch)
                    for w in batch:
                        if w.uid is not None:
                            self._live[w.uid] = w
                    self._changed.notify_all()
                for w in batch:
                    if w.uid is not None and w.all_cancelled():
                        self._spawn(self._cancel_remote, w)

    def _take_batch(self) -> list[_Work]:
        """The front of the queue, up to one bag (cancelled works are dropped: never sent)."""
        batch: list[_Work] = []
        size = taken = 0
        for w in self._queue:
            if len(batch) >= BAG_MAX or size >= BAG_BYTES:
                break
            taken += 1
            if not w.all_cancelled():
                batch.append(w)
                size += len(w.calls)
        del self._queue[:taken]
        return batch

    def _send(self, batch: list[_Work]) -> None:
        for w in batch:
            if w.fn_sha not in self._fn_datas:
                data = self._retry("upload of a function", lambda w=w: self.client.put_bytes(  # type: ignore[misc]
                    w.fn_bytes, f"{self.label}-function.pkl"))
                self._fn_datas[w.fn_sha] = str(data["uid"])
        specs = []
        for w in batch:
            text = base64.urlsafe_b64encode(w.calls).decode()
            spec: dict[str, Any] = {"app": self.app, "stdin": self._fn_datas[w.fn_sha], "session": self.session,
                                    "label": w.label, **w.options}
            if len(text) <= INLINE_MAX:
                spec["args"] = f"{PROTOCOL} {self._pyver} {text}"
            else:
                if w.args_data is None:
                    w.args_data = str(self._retry("upload of arguments", lambda w=w: self.client.put_bytes(  # type: ignore[misc]
                        _zip_one(CALLS_FILE, w.calls), f"{w.label}-calls.zip", type="zip"))["uid"])
                spec["args"] = f"{PROTOCOL} {self._pyver} @{CALLS_FILE}"
                spec["dirin"] = w.args_data
            specs.append(spec)
        pending = list(zip(batch, specs, strict=True))
        delay = 0.2
        while pending:
            try:
                out = self.client.submit_bag([s for _, s in pending])
            except XwError as exc:
                if not _transient(exc) or self._stop.is_set():
                    raise
                log.warning("xwhep.Executor: submission of %d works: %s; retrying in %.1f s", len(pending), exc,
                            delay)
                self._stop.wait(delay)
                delay = min(delay * 2, 10.0)
                # the request may have been carried out before the answer was lost: find what arrived
                pending = self._recover(pending)
                continue
            for (w, _), res in zip(pending, out, strict=True):
                w.uid, w.status = str(res["uid"]), str(res["status"])
            pending = []
        for w in batch:
            w.fn_bytes = w.calls = b""  # on the server now: a long map holds no pickles while it runs

    def _recover(self, pending: list[tuple[_Work, dict[str, Any]]]) -> list[tuple[_Work, dict[str, Any]]]:
        try:
            on_server = {w["label"]: w for w in self.client.works(session=self.session)}
        except XwError as exc:
            if _transient(exc):
                return pending  # try the whole bag again after the next back-off (after another look)
            raise
        rest = []
        for w, spec in pending:
            found = on_server.get(w.label)
            if found is None:
                rest.append((w, spec))
            else:
                w.uid, w.status = str(found["uid"]), str(found["status"])
        return rest

    # -- the waiter -----------------------------------------------------------------------------------------------
    def _wait_loop(self) -> None:
        known: dict[str, str] = {}
        delay = 0.2
        while True:
            with self._lock:
                while not self._watchable() and not self._drained():
                    self._changed.wait()
                if self._drained():
                    break
                watch = [u for u, w in self._live.items() if not w.finishing]
            known = {u: known[u] for u in watch if u in known}
            try:
                status = self._poll(watch, known)
                delay = 0.2
            except XwError as exc:
                if exc.status == 404 and (m := _NO_WORK.search(exc.message)):
                    self._vanished(m.group(1))
                    continue
                log.warning("xwhep.Executor: waiting for works: %s; retrying in %.1f s", exc, delay)
                self._stop.wait(delay)
                delay = min(delay * 2, 10.0)
                continue
            except Exception:  # a bug must not end the thread that every future depends on
                log.exception("xwhep.Executor: waiting for works failed; retrying in %.1f s", delay)
                self._stop.wait(delay)
                delay = min(delay * 2, 10.0)
                continue
            known.update(status)
            for uid, st in status.items():
                self._observe(uid, st)
        self._finish()

    def _watchable(self) -> bool:
        return any(not w.finishing for w in self._live.values())

    def _drained(self) -> bool:
        return self._submit_done and not self._live

    def _poll(self, watch: list[str], known: dict[str, str]) -> dict[str, str]:
        out: dict[str, str] = {}
        # beyond one long-poll's 10,000 works, the others are looked at without waiting, then the first waited on
        for start in range(WAIT_MAX, len(watch), WAIT_MAX):
            part = watch[start:start + WAIT_MAX]
            out.update(self.client.poll_works(part, {u: known[u] for u in part if u in known}, timeout=0))
        first = watch[:WAIT_MAX]
        changed = any(out.get(u) != known.get(u) for u in out)
        out.update(self.client.poll_works(first, {u: known[u] for u in first if u in known},
                                          timeout=0 if changed else self.poll_s))
        return out

    def _observe(self, uid: str, status: str) -> None:
        with self._lock:
            w = self._live.get(uid)
            if w is None or w.finishing:
                return
            w.status = status
            # decided under the lock: shutdown() bulk-deletes only works that no one is starting
            start = (status in RUNNING or status in FINAL) and not w.started
            w.started = w.started or start
            if status in FINAL:
                w.finishing = True
        if start:
            _running(w.futures)
        if status in FINAL:
            self._pool.submit(self._finish_work, w)

    def _vanished(self, uid: str) -> None:
        """The server knows this work no more: deleted by us (a cancellation), or by someone else."""
        with self._lock:
            w = self._live.pop(uid, None)
            self._changed.notify_all()
        if w is None or w.all_cancelled():
            return
        _fail(w, WorkFailed(f"work {self.client.uri(uid)} no longer exists on the server (deleted)", uid))

    # -- the fetchers ---------------------------------------------------------------------------------------------
    def _finish_work(self, w: _Work) -> None:
        assert w.uid is not None
        try:
            if not w.all_cancelled():
                self._deliver(w)
        except Exception as exc:
            _fail(w, exc)
        finally:
            self._cleanup(w)
            with self._lock:
                self._live.pop(w.uid, None)
                self._changed.notify_all()

    def _deliver(self, w: _Work) -> None:
        assert w.uid is not None
        uid = w.uid
        uri = self.client.uri(uid)
        info = self._retry("reading a work", lambda: self.client.work(uid))
        status = str(info["status"])
        envelope, stderr = None, ""
        if info.get("result"):
            blob = self._retry("reading a result", lambda: self.client.read_bytes(
                info["result"], info.get("result_sha256")))
            envelope, stderr = _open_result(blob)
        rc = info.get("return_code")
        if status != "COMPLETED":
            reason = info.get("reason") or "no reason given"
            msg = f"work {uri} ended {status}: {reason}"
            if stderr:
                msg += f"\nits stderr ends with:\n{_tail(stderr)}"
            raise WorkFailed(msg, uri, status, str(info.get("reason") or ""), rc, _tail(stderr))
        if envelope is None:
            msg = f"work {uri} completed with return code {rc} but left no outcome file ({RESULT_FILE})"
            if stderr:
                msg += f"; its output ends with:\n{_tail(stderr)}"
            raise WorkFailed(msg, uri, status, "", rc, _tail(stderr))
        fatal = envelope.get("fatal")
        if fatal:
            err = RemoteError(f"work {uri}: {fatal.get('message')}", str(fatal.get("kind") or ""),
                              str(fatal.get("traceback") or ""), uri)
            _fail(w, err)
            return
        outcomes = envelope.get("outcomes") or []
        if len(outcomes) != len(w.futures):
            raise WorkFailed(f"work {uri}: {len(outcomes)} outcomes for {len(w.futures)} calls", uri, status)
        for f, outcome in zip(w.futures, outcomes, strict=True):
            _settle(f, outcome, uri)

    def _cleanup(self, w: _Work) -> None:
        if self.keep or w.uid is None:
            return
        uid = w.uid
        try:
            self._retry("deleting a work", lambda: self.client.delete_work(uid))
        except XwError as exc:
            if exc.status != 404:
                log.warning("xwhep.Executor: could not delete work %s: %s", uid, exc)
        if w.args_data:
            args_data = w.args_data
            try:
                self._retry("deleting arguments", lambda: self.client.delete_data(args_data))
            except XwError as exc:
                if exc.status != 404:
                    log.warning("xwhep.Executor: could not delete data %s: %s", args_data, exc)

    # -- cancellation ---------------------------------------------------------------------------------------------
    def _cancelled(self, w: _Work) -> None:
        """A future of ``w`` was cancelled; once all are, the work is stopped on the server (a queued one is
        simply never sent)."""
        if not w.all_cancelled():
            return
        with self._lock:
            if w.uid is None or w.cancel_sent or w.finishing:
                return  # still queued (the submitter skips it, or cancels it once it has its uid), or ended
            w.cancel_sent = True
        self._spawn(self._cancel_remote, w)

    def _cancel_remote(self, w: _Work) -> None:
        uid = w.uid
        if uid is None:
            return
        w.cancel_sent = True
        try:
            # cancel keeps the work's record (ERROR, "cancelled by"); the waiter sees it end and the fetcher
            # deletes it unless kept
            self._retry("cancelling a work", lambda: self.client.cancel(uid))
        except XwError as exc:
            if exc.status not in (404, 409):  # gone, or already final: nothing left to stop
                log.warning("xwhep.Executor: could not cancel work %s: %s", uid, exc)

    def _drop_session(self, live: list[_Work]) -> None:
        """Delete the session with all its works (none of which has started), then their arguments' data."""
        try:
            self._retry("deleting the session", lambda: self.client.delete_bag("session", self.session))
        except XwError as exc:
            log.warning("xwhep.Executor: could not delete session %s: %s", self.session, exc)
        for w in live:
            if w.args_data:
                self._spawn(self._cleanup_data, w.args_data)
        with self._lock:
            for w in live:
                self._live.pop(str(w.uid), None)
            self._changed.notify_all()

    def _cleanup_data(self, uid: str) -> None:
        try:
            self._retry("deleting a data", lambda: self.client.delete_data(uid))
        except XwError as exc:
            if exc.status != 404:
                log.warning("xwhep.Executor: could not delete data %s: %s", uid, exc)

    # -- the end ----------------------------------------------------------------------------------------------------
    def _spawn(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run ``fn`` on a fetcher thread, unless the executor is over (then there is nothing left to do)."""
        try:
            self._pool.submit(fn, *args)
        except RuntimeError:  # the pool has shut down: every work has ended already
            pass

    def _finish(self) -> None:
        """Everything is done: the last cleanup (the session and the functions' data, unless kept)."""
        self._pool.shutdown(wait=True)
        if not self.keep:
            try:
                self._retry("deleting the session", lambda: self.client.delete_bag("session", self.session))
            except XwError as exc:
                if exc.status != 404:
                    log.warning("xwhep.Executor: could not delete session %s: %s", self.session, exc)
            for uid in self._fn_datas.values():
                try:
                    self._retry("deleting a function", lambda uid=uid: self.client.delete_data(uid))  # type: ignore[misc]
                except XwError as exc:
                    if exc.status != 404:
                        log.warning("xwhep.Executor: could not delete data %s: %s", uid, exc)
        self._close()

    def _close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._stop.set()
        _live_executors.discard(self)
        if self._own_client:
            self.client.close()

    def _abandon(self) -> None:
        """The interpreter exits with this executor running: cancel and remove what is left, at once."""
        with self._lock:
            if self._closed:
                return
            self._shutdown = True
            everything = [*self._queue, *self._live.values()]
            self._queue.clear()
        for w in everything:
            for f in w.futures:
                f.cancel()
        self._stop.set()
        if not self.keep:
            try:
                self.client.delete_bag("session", self.session)
            except XwError as exc:
                log.warning("xwhep.Executor: could not delete session %s at exit: %s", self.session, exc)
        self._close()

    def _retry(self, what: str, call: Callable[[], T]) -> T:
        """``call()``, again after a back-off while it fails for a passing reason (until the executor is over)."""
        delay = 0.2
        while True:
            try:
                return call()
            except XwError as exc:
                if not _transient(exc) or self._stop.is_set():
                    raise
                log.warning("xwhep.Executor: %s: %s; retrying in %.1f s", what, exc, delay)
                self._stop.wait(delay)
                delay = min(delay * 2, 10.0)


# -- results --------------------------------------------------------------------------------------------------------

def _zip_one(name: str, content: bytes) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr(name, content)
    return buf.getvalue()


def _read_envelope(raw: bytes) -> dict[str, Any] | None:
    try:
        env = _EnvelopeUnpickler(io.BytesIO(raw)).load()
    except Exception:
        return None
    return env if isinstance(env, dict) and "outcomes" in env else None


def _open_result(blob: bytes) -> tuple[dict[str, Any] | None, str]:
    """(the outcome envelope if the result has one, the job's stderr — or its lone output — as text)."""
    if zipfile.is_zipfile(io.BytesIO(blob)):
        with zipfile.ZipFile(io.BytesIO(blob)) as z:
            names = z.namelist()
            envelope = _read_envelope(z.read(RESULT_FILE)) if RESULT_FILE in names else None
            # the captured stream is stderr.txt, or xw-stderr.txt (xw-xw-…) when the job made a stderr.txt itself
            streams = sorted((n for n in names if re.fullmatch(r"(xw-)*stderr\.txt", n)), key=len)
            stderr = z.read(streams[-1]).decode(errors="replace") if streams else ""
        return envelope, stderr
    envelope = _read_envelope(blob)
    if envelope is not None:
        return envelope, ""
    return None, blob.decode(errors="replace")


def _tail(text: str, lines: int = 20) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


def _settle(f: Future[Any], outcome: Any, uri: str) -> None:
    if f.done():
        return
    try:
        if outcome[0] is True:
            f.set_result(pickle.loads(outcome[1]))
            return
        _, blob, type_name, message, tb = outcome
    except Exception as exc:
        f.set_exception(RemoteError(f"work {uri}: the call's outcome cannot be read here: "
                                    f"{type(exc).__name__}: {exc}", work=uri))
        return
    f.set_exception(_remote_exception(blob, str(type_name), str(message), str(tb), uri))


def _remote_exception(blob: bytes | None, type_name: str, message: str, tb: str, uri: str) -> BaseException:
    """The exception raised in the job, recreated (same type) with the remote traceback as its cause; a
    :class:`RemoteError` when it cannot be recreated here, or when it would end the caller (SystemExit, …)."""
    exc: BaseException | None = None
    if blob is not None:
        try:
            exc = pickle.loads(blob)
        except Exception:
            exc = None
    if not isinstance(exc, Exception):
        return RemoteError(f"work {uri}: {type_name}: {message}", type_name, tb, uri)
    exc.__cause__ = RemoteTraceback(tb)
    try:
        exc.remote_traceback = tb  # type: ignore[attr-defined]
        exc.add_note(f"(raised in work {uri})")
    except (AttributeError, TypeError):  # an exception type with __slots__: the cause still tells
        pass
    return exc


def _running(futures: Iterable[Future[Any]]) -> None:
    """PENDING futures become RUNNING (cancelled ones were notified by their cancel())."""
    with _transitions:
        for f in futures:
            if not (f.done() or f.running()):
                f.set_running_or_notify_cancel()


def _fail(w: _Work, exc: BaseException) -> None:
    _running(w.futures)
    for f in w.futures:
        if not f.done():
            f.set_exception(exc)
