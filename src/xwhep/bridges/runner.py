#!/usr/bin/env python3
"""The job side of :class:`xwhep.Executor`: run pickled Python calls inside a work, write their outcomes.

This file is uploaded as is as the binary of the runner app (``xwhep-python``): it runs under the worker's own
``python3`` inside the sandbox, so it uses the standard library only, plus the ``cloudpickle`` that the app ships
in its base dirin (``.xw-lib/``, beside this script in the job dir) or that the chosen image has installed.

Command line (protocol 1): ``xwhep-python 1 PYVER CALLS`` where ``PYVER`` is the caller's ``major.minor`` and
``CALLS`` the pickled list of ``(args, kwargs)`` in URL-safe base64, or ``@NAME``: a file of the job dir (the
work's dirin) holding those bytes. Standard input: the pickled function.

Output: ``xw-result.pkl`` in the job dir, a plain pickle (protocol 4, builtins only, so that any Python 3.8+ can
read it whatever happened) of ``{"proto": 1, "python": "3.11.2", "fatal": None | {kind, message, traceback},
"outcomes": [...]}`` with one outcome per call: ``(True, pickled value)`` or ``(False, pickled exception or None,
type name, message, traceback text)``. A fatal error (interpreter mismatch, a function that cannot be
unpickled) also exits with status 3.
"""

from __future__ import annotations

import binascii
import os
import pickle
import sys
from collections.abc import Callable
from typing import Any

sys.dont_write_bytecode = True  # a __pycache__ in the job dir would come back as part of the result

PROTOCOL = "1"
RESULT = "xw-result.pkl"
FATAL_EXIT = 3
_URLSAFE = bytes.maketrans(b"-_", b"+/")


def _lib() -> None:
    here = os.path.dirname(os.path.abspath(__file__))
    lib = os.environ.get("XWHEP_LIB") or os.path.join(here, ".xw-lib")
    if os.path.isdir(lib):
        sys.path.insert(0, lib)


def _dumps() -> Callable[[Any], bytes]:
    try:
        import cloudpickle

        return cloudpickle.dumps  # type: ignore[no-any-return]
    except ImportError:  # an image without cloudpickle: values of importable types still travel
        return pickle.dumps


Outcome = tuple[Any, ...]


def _format(exc: BaseException) -> str:
    import traceback  # only on failures: every import is paid by every job

    return "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))


def _failure(dumps: Callable[[Any], bytes], exc: BaseException, note: str = "") -> Outcome:
    if note:
        try:
            exc.add_note(f"xwhep: {note}")
        except (AttributeError, TypeError):
            pass
    tb = _format(exc)
    try:
        blob = dumps(exc)
    except Exception:  # an exception holding something unpicklable: its text still travels
        blob = None
    kind = f"{type(exc).__module__}.{type(exc).__qualname__}"
    return (False, blob, kind, f"{note}: {exc}" if note else str(exc), tb)


def _write(envelope: dict[str, Any]) -> None:
    tmp = RESULT + ".part"
    with open(tmp, "wb") as f:
        pickle.dump(envelope, f, protocol=4)
    os.replace(tmp, RESULT)


def _fatal(kind: str, message: str, tb: str = "") -> int:
    _write({"proto": 1, "python": sys.version.split()[0], "fatal": {"kind": kind, "message": message,
                                                                    "traceback": tb}, "outcomes": []})
    sys.stderr.write(f"xwhep-python: {message}\n")
    return FATAL_EXIT


def _hint(exc: BaseException) -> str:
    if isinstance(exc, ModuleNotFoundError) and exc.name:
        return (f" (module {exc.name!r} cannot be imported by the job's Python: pickle functions and classes of "
                f"modules that are not installed there by value: cloudpickle.register_pickle_by_value(module), "
                f"or choose an app/image that has the module)")
    return ""


def main(argv: list[str]) -> int:
    if len(argv) != 4 or argv[1] != PROTOCOL:
        return _fatal("protocol", f"this runner speaks protocol {PROTOCOL}; called as {argv[1:]!r}")
    mine = f"{sys.version_info[0]}.{sys.version_info[1]}"
    if argv[2] != mine:
        return _fatal("interpreter", f"the job's Python is {sys.version.split()[0]} ({sys.executable}), the "
                                     f"caller's is {argv[2]}: functions pickled by one Python minor version cannot "
                                     f"be unpickled by another; run the caller with Python {mine}, or choose an "
                                     f"app/image whose python3 is {argv[2]}")
    _lib()
    dumps = _dumps()
    try:
        if argv[3].startswith("@"):
            with open(argv[3][1:], "rb") as f:
                raw = f.read()
        else:
            # binascii, not base64: the base64 module imports re, ~10 ms of every job's start
            raw = binascii.a2b_base64(argv[3].encode().translate(_URLSAFE))
        calls = pickle.loads(raw)
    except BaseException as exc:
        return _fatal("arguments", f"cannot unpickle the arguments: {type(exc).__name__}: {exc}{_hint(exc)}",
                      _format(exc))
    try:
        fn = pickle.loads(sys.stdin.buffer.read())
    except BaseException as exc:
        return _fatal("function", f"cannot unpickle the function: {type(exc).__name__}: {exc}{_hint(exc)}",
                      _format(exc))
    outcomes: list[Outcome] = []
    for args, kwargs in calls:
        try:
            value = fn(*args, **kwargs)
        except BaseException as exc:
            outcomes.append(_failure(dumps, exc))
            continue
        try:
            outcomes.append((True, dumps(value)))
        except BaseException as exc:
            outcomes.append(_failure(dumps, exc, "the return value cannot be pickled"))
    _write({"proto": 1, "python": sys.version.split()[0], "fatal": None, "outcomes": outcomes})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
