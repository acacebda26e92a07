"""The OpenAPI document declares what the server does: bearer authentication on every non-public operation, the
error answers with one error schema, a schema for every success answer, links from creations, and no 422 (this
server answers a bad request with 400). Schemathesis (test_schemathesis.py) checks the answers against it."""

from __future__ import annotations

from typing import Any

import pytest

from xwhep.server.app import create_app
from xwhep.server.config import ServerConfig


@pytest.fixture(scope="module")
def doc(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    class State:  # the document needs no database: only the routes
        config = ServerConfig(home=tmp_path_factory.mktemp("doc"))

    return create_app(State).openapi()  # type: ignore[arg-type]


def _operations(doc: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [(path, method, op) for path, item in doc["paths"].items() for method, op in item.items()]


def test_bearer_auth_is_declared_per_operation(doc: dict[str, Any]) -> None:
    assert doc["components"]["securitySchemes"]["bearer"] == {**doc["components"]["securitySchemes"]["bearer"],
                                                              "type": "http", "scheme": "bearer"}
    for path, method, op in _operations(doc):
        public = "public" in op.get("tags", [])
        assert ("security" in op) != public, f"{method} {path}"
        if not public:
            assert op["security"] == [{"bearer": []}]
            assert "401" in op["responses"] and "403" in op["responses"], f"{method} {path}"


def test_errors_are_declared_with_the_error_schema(doc: dict[str, Any]) -> None:
    error = doc["components"]["schemas"]["Error"]
    assert set(error["required"]) == {"error", "field"}
    for path, method, op in _operations(doc):
        responses = op["responses"]
        assert "422" not in responses, f"{method} {path}"
        assert "400" in responses, f"{method} {path}"
        if "requestBody" in op:
            assert "413" in responses, f"{method} {path}"
        if method in ("post", "put", "delete"):
            assert "507" in responses, f"{method} {path}"
        for code, answer in responses.items():
            if code.startswith(("4", "5")):
                assert answer == {"$ref": f"#/components/responses/{code}"}, f"{method} {path} {code}"
    for code, answer in doc["components"]["responses"].items():
        assert answer["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/Error"}, code
    assert "HTTPValidationError" not in doc["components"]["schemas"]


def test_every_success_has_a_schema(doc: dict[str, Any]) -> None:
    for path, method, op in _operations(doc):
        ok = [c for c in op["responses"] if c.startswith("2")]
        assert ok, f"{method} {path}"
        for code in ok:
            content = op["responses"][code]["content"]
            schema = next(iter(content.values()))["schema"]
            assert schema and schema != {}, f"{method} {path} {code}"
    work = doc["components"]["schemas"]["Work"]
    assert {"uid", "uri", "status", "app", "access_rights", "created"} <= set(work["required"])


def test_integers_are_bounded_and_creations_are_linked(doc: dict[str, Any]) -> None:
    def walk(node: Any, where: str) -> None:
        if isinstance(node, dict):
            if node.get("type") == "integer" and where.startswith("request"):
                assert "maximum" in node and "minimum" in node, where
            for value in node.values():
                walk(value, where)
        elif isinstance(node, list):
            for value in node:
                walk(value, where)

    for path, method, op in _operations(doc):
        walk(op.get("requestBody", {}), f"request {method} {path}")
        walk(op.get("parameters", []), f"request {method} {path}")
    for name in ("WorkSpec", "DataSpec", "AppSpec", "HostSpec", "SyncIn", "Report", "ResultRef"):
        walk(doc["components"]["schemas"][name], f"request {name}")
    links = doc["paths"]["/api/v1/works"]["post"]["responses"]["201"]["links"]
    assert any(link["operationId"].startswith("get_work") for link in links.values())
