"""Requirements and rank expressions: CEL, evaluated on a host description, never Python ``eval``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from xwhep.core.expressions import BadExpression, check_expression, compile_expression, rank_of, requirement_holds
from xwhep.core.matching import HostProfile

HOST: dict[str, Any] = HostProfile(
    uid="6a0c1e9a-1d53-4c55-8a8e-1d1f5a3b2c10",
    name="node1",
    os="linux",
    cpu="x86_64",
    cpuspeed=3000,
    cores=8,
    memory=16384,
    disk=100000,
    java=True,
    apptypes=frozenset({"VM", "CONTAINER"}),
    packages={"python": "3.11.2", "gcc": "12"},
    datas=frozenset({"d1"}),
    project="physics",
    incoming=True,
).as_cel()


@pytest.mark.parametrize(
    "text",
    [
        "host.memory >= 8192",
        'host.os == "linux" && host.cpu == "x86_64"',
        "host.cores > 4 || host.memory < 10",
        '"VM" in host.apptypes',
        '"python" in host.packages',
        'host.packages.python.startsWith("3.11")',
        'host.packages["gcc"] == "12"',
        'host.name.matches("^node[0-9]+$")',
        'host.project == "physics"',
        "host.incoming",
        "host.java && host.disk > 1000",
        'size(host.datas) == 1 && "d1" in host.datas',
        "host.cpuspeed * host.cores >= 24000",
        "true",
    ],
)
def test_requirements_true(text: str) -> None:
    check_expression(text)
    assert requirement_holds(text, HOST) is True


@pytest.mark.parametrize(
    "text",
    [
        "host.memory >= 32768",
        'host.os == "macosx"',
        '"VIRTUALBOX" in host.apptypes',
        '"perl" in host.packages',
        "!host.incoming",
        "false",
    ],
)
def test_requirements_false(text: str) -> None:
    check_expression(text)
    assert requirement_holds(text, HOST) is False


@pytest.mark.parametrize("text", [None, ""])
def test_no_requirements_always_hold(text: str | None) -> None:
    assert requirement_holds(text, HOST) is True
    assert requirement_holds(text, {}) is True


@pytest.mark.parametrize("text", ["host.memory >", "host.memory >= (1", "&& true", "host..os", "'unclosed", "1 +"])
def test_malformed_expression_is_refused_with_a_message(text: str) -> None:
    with pytest.raises(BadExpression) as info:
        check_expression(text)
    msg = str(info.value)
    assert "malformed expression" in msg
    assert text in msg
    assert "\n" not in msg  # one line, fit for an API error and a CLI message
    with pytest.raises(BadExpression):
        compile_expression(text)
    # At match time a malformed expression never matches instead of breaking the scheduler.
    assert requirement_holds(text, HOST) is False
    assert rank_of(text, HOST) == 0.0


def test_bad_expression_is_a_value_error() -> None:
    assert issubclass(BadExpression, ValueError)


@pytest.mark.parametrize(
    "text",
    [
        "host.nosuch > 1",  # missing field
        'host.os > 1',  # type mismatch
        "host.memory / 0 > 1",  # division by zero
        'host.packages.perl == "5"',  # missing key
        "unknown_function(host.memory)",
        "host",  # a map, not a bool
        "host.memory",  # an int, not a bool
        '"yes"',
    ],
)
def test_evaluation_error_or_non_bool_means_false(text: str) -> None:
    check_expression(text)  # it parses: only evaluation on this host fails
    assert requirement_holds(text, HOST) is False


def test_evaluation_depends_on_host() -> None:
    text = "host.memory >= 8192"
    assert requirement_holds(text, HOST)
    assert not requirement_holds(text, {**HOST, "memory": 1024})
    assert not requirement_holds(text, {})


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("host.memory", 16384.0),
        ("host.memory * 2", 32768.0),
        ("host.cores", 8.0),
        ("double(host.memory) / 1024.0", 16.0),
        ("host.cpuspeed - 3500", -500.0),
        ("1.5", 1.5),
        ('host.os == "linux" ? 10 : 1', 10.0),
    ],
)
def test_rank_numeric(text: str, value: float) -> None:
    result = rank_of(text, HOST)
    assert isinstance(result, float)
    assert result == value


@pytest.mark.parametrize("text", [None, "", "host.nosuch", '"fast"', "host.apptypes", "host.memory >"])
def test_rank_defaults_to_zero(text: str | None) -> None:
    assert rank_of(text, HOST) == 0.0


def test_rank_orders_hosts() -> None:
    small = {**HOST, "memory": 1024}
    assert rank_of("host.memory", HOST) > rank_of("host.memory", small)


def test_compiled_programs_are_cached() -> None:
    assert compile_expression("host.cores > 1") is compile_expression("host.cores > 1")


@pytest.mark.parametrize(
    "text",
    [
        "import os",
        "lambda: 1",
        "[x for x in host.apptypes]",
        "host.memory if True else 0",
        "exec('1'); True",
        "host.memory = 1",
        "not host.incoming",
        "host.memory ** 2",
    ],
)
def test_python_syntax_is_a_parse_error(text: str) -> None:
    with pytest.raises(BadExpression):
        check_expression(text)


@pytest.mark.parametrize(
    "template",
    [
        "__import__('os').system('touch {p}')",
        "__import__('os').system('touch {p}') == 0",
        "open('{p}', 'w').write('x') > 0",
        "exec(\"open('{p}', 'w')\")",
        "eval(\"open('{p}', 'w')\") == 1",
        "host.__class__.__init__.__globals__['os'].system('touch {p}') == 0",
    ],
)
def test_no_python_eval(template: str, tmp_path: Path) -> None:
    """CEL has no way into Python: such calls name unknown functions or fields, evaluate as errors, do nothing."""
    marker = tmp_path / "pwned"
    text = template.format(p=marker)
    try:
        check_expression(text)
    except BadExpression:
        pass  # refused at submission is as good
    assert requirement_holds(text, HOST) is False
    assert rank_of(text, HOST) == 0.0
    assert not marker.exists()
