"""Requirements and rank expressions in CEL (Common Expression Language) — a safe, well-known language, never eval.

A work's ``requirements`` (bool) and ``rank`` (number) see one variable, ``host``, with the host's
description: ``os``, ``cpu``, ``cores``, ``cpuspeed`` (MHz), ``memory`` (MiB), ``disk`` (MiB), ``project``,
``name``, ``packages`` (map name → version), ``apptypes`` (list), ``datas`` (list), ``incoming`` (bool).

Expressions are bounded twice (docs/decisions.md, "Expression bounds"):

* at submission (:func:`check_expression`): the text's length, the parse tree's depth, the sizes of literals and a
  static cost: the tree's nodes, with the body of each comprehension (``map``, ``filter``, ``all``, ``exists``,
  ``exists_one``, ``reduce``) counted once per item of the list it walks (a literal's length, else
  :data:`ASSUMED_ITEMS`). Nested comprehensions multiply.
* at evaluation: a budget of steps (tree nodes visited, counted by the evaluator itself), a wall-clock limit, and
  a bound on the size of every value made (nested items, string lengths): whatever slipped past the static check
  stops there, and the requirement is false (the rank 0) with the reason, which ``xw why`` shows.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import celpy
import lark
from celpy.adapter import json_to_cel
from celpy.evaluation import Activation, Evaluator

# -- limits --------------------------------------------------------------------------------------------------------
MAX_TEXT = 4096  # characters of an expression
MAX_DEPTH = 300  # levels of its parse tree (a parenthesis or a call is about ten): the evaluator recurses
MAX_LITERAL_ITEMS = 256  # items of a list or map literal
MAX_LITERAL_CHARS = 1024  # characters of a string or bytes literal
MAX_HOST_ITEMS = 256  # items of a host's lists (apptypes, datas, packages): checked at registration
ASSUMED_ITEMS = 64  # what a comprehension over anything but a literal is assumed to walk (a quarter of the cap)
MAX_COST = 5_000  # static cost: the most steps an expression may take, by the estimate above
MAX_STEPS = 2 * MAX_COST  # evaluation budget: tree nodes visited in one evaluation
MAX_SECONDS = 0.1  # wall-clock limit of one evaluation (a backstop: the steps stop it first, ~5 µs each)
MAX_WEIGHT = 50_000  # size of any value made: items, nested ones included (shared ones as often as they occur)
_CHARS_PER_UNIT = 16  # a string weighs one unit per 16 characters

MACROS = frozenset({"map", "filter", "all", "exists", "exists_one", "reduce", "min"})


class BadExpression(ValueError):
    """An expression that does not parse, or that does not evaluate to the expected type."""


class TooCostly(BadExpression):
    """An expression refused at submission for its size or cost (the message says which bound)."""


class OverBudget(Exception):
    """An evaluation stopped: too many steps, too long, or a value too large."""


_ENV = celpy.Environment()


@dataclass(frozen=True)
class Program:
    """A parsed expression, ready to evaluate any number of times."""

    text: str
    ast: lark.Tree[Any]
    activation: Activation  # functions and annotations; each evaluation layers ``host`` on a clone


def _depth(tree: lark.Tree[Any]) -> int:
    best = 0
    stack: list[tuple[Any, int]] = [(tree, 1)]
    while stack:
        node, d = stack.pop()
        if d > best:
            best = d
        if isinstance(node, lark.Tree):
            stack.extend((c, d + 1) for c in node.children if isinstance(c, lark.Tree))
    return best


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


@lru_cache(maxsize=4096)
def compile_expression(text: str) -> Program:
    """Parse and prepare ``text``; raise :class:`BadExpression` with the parser's message.

    Length and depth are checked here, before the parser and evaluator (both recursive) see the text."""
    if len(text) > MAX_TEXT:
        raise TooCostly(f"expression too costly: {len(text):,} characters, at most {MAX_TEXT:,}")
    try:
        ast = _ENV.compile(text)
    except RecursionError:
        raise TooCostly(f"expression too costly: nested deeper than {MAX_DEPTH} levels of its parse tree") from None
    except Exception as exc:  # celpy raises several parser error types
        raise BadExpression(f"malformed expression {text!r}: {_one_line(exc)}") from None
    depth = _depth(ast)
    if depth > MAX_DEPTH:
        raise TooCostly(f"expression too costly: nested {depth} levels deep in its parse tree, at most {MAX_DEPTH}")
    runner = _ENV.program(ast)
    return Program(text, ast, runner.new_activation())


# -- the static cost -----------------------------------------------------------------------------------------------

def _children(node: lark.Tree[Any]) -> list[Any]:
    return [c for c in node.children if c is not None]


def _cost(node: Any) -> tuple[int, int | None]:
    """(steps, items): an upper estimate of the steps evaluating ``node`` takes, and how many items its value
    has when it is a list or map whose length is known from the text (None otherwise)."""
    if not isinstance(node, lark.Tree):
        if isinstance(node, lark.Token) and node.type in ("STRING_LIT", "MLSTRING_LIT", "BYTES_LIT") \
                and len(node.value) > MAX_LITERAL_CHARS:
            raise TooCostly(f"expression too costly: a {len(node.value):,}-character literal, at most "
                            f"{MAX_LITERAL_CHARS:,}")
        return 0, None
    kids = _children(node)
    if node.data == "member_dot_arg" and len(kids) >= 2 and str(kids[1]) in MACROS:
        target_cost, items = _cost(kids[0])
        n = ASSUMED_ITEMS if items is None else items
        args = _children(kids[2]) if len(kids) > 2 else []
        if str(kids[1]) == "reduce":  # reduce(acc, item, init, body): init once, body per item
            once = sum(_cost(a)[0] for a in args[2:3])
            body = sum(_cost(a)[0] for a in args[3:])
        else:  # the first argument is the variable, the rest runs per item
            once = 0
            body = sum(_cost(a)[0] for a in args[1:])
        steps = 2 + target_cost + once + n * (body + 2)
        return steps, (n if str(kids[1]) in ("map", "filter") else None)
    steps = 1
    known: list[int | None] = []
    for child in kids:
        s, items = _cost(child)
        steps += s
        if isinstance(child, lark.Tree):
            known.append(items)
    if node.data in ("list_lit", "map_lit"):
        inner = _children(kids[0]) if kids else []
        count = len(inner) if node.data == "list_lit" else len(inner) // 2
        if count > MAX_LITERAL_ITEMS:
            raise TooCostly(f"expression too costly: a literal of {count:,} items, at most {MAX_LITERAL_ITEMS:,}")
        return steps, count
    if node.data == "addition" and len(known) == 2 and None not in known:
        return steps, sum(k for k in known if k is not None)  # list + list
    if len(known) == 1:  # the grammar's one-child wrappers (expr → … → primary) pass the length on
        return steps, known[0]
    return steps, None


@lru_cache(maxsize=4096)
def static_cost(text: str) -> int:
    """The estimated steps of the worst evaluation of ``text`` (see the module docstring)."""
    return _cost(compile_expression(text).ast)[0]


def check_expression(text: str) -> None:
    """Validate at submission time: a malformed or too costly expression is refused with a clear error."""
    cost = static_cost(text)
    if cost > MAX_COST:
        raise TooCostly(f"expression too costly: about {cost:,} evaluation steps, at most {MAX_COST:,} "
                        f"(comprehensions multiply: each item of the list walked runs the body once; a list "
                        f"that is not a literal counts as {ASSUMED_ITEMS})")


# -- evaluation under a budget --------------------------------------------------------------------------------------

# the Python bases: celpy's operators return plain lists and strings (``ListType + ListType`` is a ``list``)
_CONTAINERS = (list, tuple, dict)
_SEQUENCES = (str, bytes)
_ANY_SIZED = _CONTAINERS + _SEQUENCES


class _Budget:
    """What one evaluation may still spend; shared by the evaluators of nested comprehensions."""

    __slots__ = ("deadline", "keep", "steps", "weights")

    def __init__(self, steps: int, seconds: float) -> None:
        self.steps = steps
        self.deadline = time.monotonic() + seconds
        self.weights: dict[int, int] = {}  # id(container) → weight, for the containers seen (kept alive below)
        self.keep: list[Any] = []

    def weigh(self, value: Any) -> int:
        """The size of ``value``: one per item, nested ones included; strings one per 16 characters."""
        if isinstance(value, _SEQUENCES):
            return 1 + len(value) // _CHARS_PER_UNIT
        if not isinstance(value, _CONTAINERS):
            return 1
        known = self.weights.get(id(value))
        if known is not None:
            return known
        total = 1 + len(value)
        if total > MAX_WEIGHT:
            raise OverBudget(f"a value of more than {MAX_WEIGHT:,} items")
        if isinstance(value, dict):
            parts: Any = (x for kv in value.items() for x in kv)
        else:
            parts = iter(value)
        for item in parts:
            if isinstance(item, _ANY_SIZED):
                total += self.weigh(item) - 1
                if total > MAX_WEIGHT:
                    raise OverBudget(f"a value of more than {MAX_WEIGHT:,} items")
        self.weights[id(value)] = total
        self.keep.append(value)  # its id stays its own while the evaluation lasts
        return total


class _BudgetedEvaluator(Evaluator):
    """celpy's tree-walking evaluator, charged one step per node it visits.

    Every visit goes through lark's ``Interpreter._visit_tree`` (``visit`` and ``visit_children`` both call it),
    and every nested evaluator (comprehension bodies) is made by ``sub_evaluator``: counting there covers the
    whole evaluation. tests/core/test_expressions.py checks that the budget really stops an evaluation, so a
    change of celpy or lark that bypassed this hook would fail there."""

    def __init__(self, ast: lark.Tree[Any], activation: Activation, budget: _Budget) -> None:
        super().__init__(ast, activation)
        self.budget = budget

    def sub_evaluator(self, ast: lark.Tree[Any]) -> Evaluator:
        return _BudgetedEvaluator(ast, self.activation, self.budget)

    def _visit_tree(self, tree: lark.Tree[Any]) -> Any:
        b = self.budget
        b.steps -= 1
        if b.steps < 0:
            raise OverBudget(f"more than {MAX_STEPS:,} evaluation steps")
        if not b.steps & 63 and time.monotonic() > b.deadline:
            raise OverBudget(f"longer than {MAX_SECONDS:g} s")
        value = super()._visit_tree(tree)
        if isinstance(value, _CONTAINERS):
            b.weigh(value)
        elif isinstance(value, _SEQUENCES) and len(value) > MAX_WEIGHT * _CHARS_PER_UNIT:
            raise OverBudget(f"a value of more than {MAX_WEIGHT * _CHARS_PER_UNIT:,} characters")
        return value


@dataclass(frozen=True)
class Outcome:
    """The value of an expression on one host, or why there is none (``error``)."""

    value: Any = None
    error: str | None = None
    over_budget: bool = False


def evaluate(text: str, host: Mapping[str, Any], steps: int = MAX_STEPS, seconds: float = MAX_SECONDS) -> Outcome:
    """Evaluate ``text`` with ``host`` under a budget of ``steps`` and ``seconds``; never raises."""
    try:
        program = compile_expression(text)
    except BadExpression as exc:
        return Outcome(error=str(exc))
    budget = _Budget(steps, seconds)
    try:
        host_value = json_to_cel(dict(host))
        budget.weigh(host_value)
        evaluator = _BudgetedEvaluator(program.ast, program.activation, budget)
        result = evaluator.evaluate({"host": host_value})
    except OverBudget as exc:
        return Outcome(error=f"evaluation stopped: {exc}", over_budget=True)
    except RecursionError:
        return Outcome(error="evaluation stopped: nested too deeply", over_budget=True)
    except Exception as exc:  # celpy's evaluation errors, and whatever a type mismatch raises
        return Outcome(error=f"failed on host: {_one_line(exc)[:300]}")
    if isinstance(result, Exception):
        return Outcome(error=f"failed on host: {_one_line(result)[:300]}")
    return Outcome(value=result)


def requirement(text: str | None, host: Mapping[str, Any]) -> tuple[bool, str | None]:
    """Whether the requirements expression holds on ``host`` (empty: it does), and why not when the reason is more
    than the value false: an evaluation error, a non-boolean value, or the budget."""
    if not text:
        return True, None
    out = evaluate(text, host)
    if out.error is not None:
        return False, out.error
    if isinstance(out.value, bool | celpy.celtypes.BoolType):
        return bool(out.value), None
    return False, f"not a boolean: {type(out.value).__name__}"


def requirement_holds(text: str | None, host: Mapping[str, Any]) -> bool:
    """True when the requirements expression is empty or true for ``host``; an evaluation error (or the budget
    running out) is false."""
    return requirement(text, host)[0]


def rank_of(text: str | None, host: Mapping[str, Any]) -> float:
    """The rank expression's value for ``host`` (0 when empty, not numeric, failing or over budget)."""
    if not text:
        return 0.0
    out = evaluate(text, host)
    if out.error is not None:
        return 0.0
    try:
        return float(out.value)
    except (TypeError, ValueError):
        return 0.0
