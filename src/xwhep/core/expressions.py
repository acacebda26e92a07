"""Requirements and rank expressions in CEL (Common Expression Language) — a safe, well-known language, never eval.

A work's ``requirements`` (bool) and ``rank`` (number) see one variable, ``host``, with the host's
description: ``os``, ``cpu``, ``cores``, ``cpuspeed`` (MHz), ``memory`` (MiB), ``disk`` (MiB), ``project``,
``name``, ``packages`` (map name → version), ``apptypes`` (list), ``datas`` (list), ``incoming`` (bool).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import celpy
from celpy.adapter import json_to_cel


class BadExpression(ValueError):
    """An expression that does not parse, or that does not evaluate to the expected type."""


_ENV = celpy.Environment()


@lru_cache(maxsize=4096)
def compile_expression(text: str) -> Any:
    """Parse and prepare ``text``; raise :class:`BadExpression` with the parser's message."""
    try:
        return _ENV.program(_ENV.compile(text))
    except Exception as exc:  # celpy raises several parser error types
        msg = " ".join(str(exc).split())
        raise BadExpression(f"malformed expression {text!r}: {msg}") from None


def _evaluate(text: str, host: dict[str, Any]) -> Any:
    program = compile_expression(text)
    try:
        result = program.evaluate({"host": json_to_cel(host)})
    except Exception as exc:
        raise BadExpression(f"expression {text!r} failed on host: {exc}") from None
    if isinstance(result, Exception):
        raise BadExpression(f"expression {text!r} failed on host: {result}")
    return result


def requirement_holds(text: str | None, host: dict[str, Any]) -> bool:
    """True when the requirements expression is empty or true for ``host``; an evaluation error is false."""
    if not text:
        return True
    try:
        result = _evaluate(text, host)
    except BadExpression:
        return False
    return bool(result) if isinstance(result, bool | celpy.celtypes.BoolType) else False


def rank_of(text: str | None, host: dict[str, Any]) -> float:
    """The rank expression's value for ``host`` (0 when empty or not numeric)."""
    if not text:
        return 0.0
    try:
        result = _evaluate(text, host)
    except BadExpression:
        return 0.0
    try:
        return float(result)
    except (TypeError, ValueError):
        return 0.0


def check_expression(text: str) -> None:
    """Validate at submission time, so that a malformed expression is refused with a clear error."""
    compile_expression(text)
