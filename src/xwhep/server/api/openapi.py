"""The OpenAPI document, made to say what the server does (Schemathesis checks it: tests/server/test_schemathesis.py).

FastAPI's generated document is completed here, once, at the first request for it:

- bearer authentication (``Authorization: Bearer <token from POST /auth/login>``) on every operation but the
  public ones (tag ``public``);
- the error answers each operation can give, all with the one :class:`~xwhep.server.api.schemas.Error` body; and
  not FastAPI's 422, which this server never sends (a bad request is a 400 naming the field);
- the request bodies FastAPI cannot see (a submission is validated by the route itself: one work or a bag; an
  upload is raw bytes) and the download's byte answers;
- links from each object's creation to the operations on that object (``$response.body#/uid``), so that a
  stateful client (Schemathesis) can create, read, change and delete what it made.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from xwhep.server.api.models import SUBMIT_BODY
from xwhep.server.api.schemas import Error

PUBLIC_TAG = "public"
REF = "#/components/schemas/{model}"

ERRORS = {
    400: "Bad request: the field named in the body is missing, malformed or out of range",
    401: "Authentication required, or the credentials were refused",
    403: "Authenticated, but not allowed to do this",
    404: "No such object (or not readable by the caller: no existence leaks)",
    409: "Conflicts with the current state (e.g. a name taken, a data still in use)",
    410: "The object exists but its content is gone from the store",
    413: "Request body too large",
    416: "The requested Range is outside the content",
    429: "Too many attempts: retry after Retry-After seconds",
    503: "Temporarily unable (e.g. no CA for X.509 login, too many streams): retry later",
    507: "The server's storage is full: nothing was stored; retry later",
}
LOGINS = {"/api/v1/auth/login", "/api/v1/auth/x509", "/api/v1/auth/host"}


def _errors_for(path: str, method: str, op: dict[str, Any]) -> list[int]:
    public = PUBLIC_TAG in op.get("tags", [])
    writes = method in ("post", "put", "delete")
    codes = {400}
    if not public:
        codes |= {401, 403, 404}
    if path in LOGINS:
        codes |= {401, 429}
    if writes:
        codes |= {409, 507} if not public else {507}
    if "requestBody" in op:
        codes.add(413)
    if path == "/api/v1/auth/x509/challenge":
        codes.add(503)
    if path == "/api/v1/relay/tickets":
        codes |= {429, 503}
    if path == "/api/v1/datas/{uid}/content" and method == "get":
        codes |= {409, 410, 416}  # 409: the data's bytes have not arrived yet
    return sorted(codes)


def _key_patterns(node: Any) -> None:
    """pydantic says what a dict's keys must be as ``patternProperties``, which lets any other key through; say it
    as ``propertyNames`` (what the server checks: every key matches)."""
    if isinstance(node, dict):
        pattern = node.get("patternProperties")
        if isinstance(pattern, dict) and len(pattern) == 1 and "additionalProperties" not in node:
            [(regex, values)] = pattern.items()
            del node["patternProperties"]
            node["propertyNames"] = {**node.get("propertyNames", {}), "pattern": regex}
            node["additionalProperties"] = values
        for value in node.values():
            _key_patterns(value)
    elif isinstance(node, list):
        for value in node:
            _key_patterns(value)


def _links(paths: dict[str, Any]) -> None:
    """Creation → every operation on the created object: ``POST /api/v1/X`` (201 with a uid) links to the
    operations of ``/api/v1/X/{param}…``, and to the generic ones of ``/api/v1/objects/{uid}…``."""
    for path, item in paths.items():
        post = item.get("post")
        if post is None or "201" not in post.get("responses", {}) or "{" in path:
            continue
        links: dict[str, Any] = {}
        for other, other_item in paths.items():
            if not (other.startswith(path + "/{") or other.startswith("/api/v1/objects/{")):
                continue
            param = other.split("{", 1)[1].split("}", 1)[0]
            for method, op in other_item.items():
                name = op.get("operationId") or f"{method}{other}"
                links[name] = {"operationId": name, "parameters": {param: "$response.body#/uid"}}
        events = paths.get("/api/v1/events", {}).get("get")
        if events is not None:
            links[events["operationId"]] = {"operationId": events["operationId"],
                                            "parameters": {"object": "$response.body#/uid"}}
        links.update(_flows(paths, path))
        if links:
            post["responses"]["201"]["links"] = links


def _flows(paths: dict[str, Any], path: str) -> dict[str, Any]:
    """Links that carry a created object into the creation of the next one, as a person would: a data becomes
    an app's binary, an app gets a work, a work is waited for."""
    def op_id(target: str, method: str) -> str:
        return str(paths[target][method]["operationId"])

    uid = "$response.body#/uid"
    flows: dict[str, tuple[str, str, dict[str, Any]]] = {
        "/api/v1/datas": ("/api/v1/apps", "post", {"name": f"app-{{{uid}}}", "type": "DEPLOYABLE",
                                                   "binaries": {"linux/x86_64": uid}}),
        "/api/v1/apps": ("/api/v1/works", "post", {"app": uid}),
        "/api/v1/works": ("/api/v1/works/wait", "post", {"works": [uid], "timeout": 0}),
    }
    if path not in flows:
        return {}
    target, method, body = flows[path]
    name = f"{op_id(target, method)}_from_{op_id(path, 'post')}"
    return {name: {"operationId": op_id(target, method), "requestBody": body}}


def document(app: FastAPI) -> dict[str, Any]:
    """The completed OpenAPI document of ``app``."""
    doc = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    components = doc.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
    schemas["Error"] = Error.model_json_schema(ref_template=REF)
    components["securitySchemes"] = {"bearer": {
        "type": "http", "scheme": "bearer",
        "description": "The token of POST /api/v1/auth/login (or /auth/x509, or an OpenID Connect issuer's JWT)"}}
    components["responses"] = {str(code): {
        "description": text, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
        for code, text in ERRORS.items()}

    paths: dict[str, Any] = doc["paths"]
    submit = SUBMIT_BODY.json_schema(ref_template=REF)
    schemas.update(submit.pop("$defs", {}))
    paths["/api/v1/works"]["post"]["requestBody"] = {
        "required": True, "description": "One work, or a bag {\"works\": [...]} of up to 10,000 in one transaction",
        "content": {"application/json": {"schema": submit}}}
    content = "/api/v1/datas/{uid}/content"
    paths[content]["put"]["requestBody"] = {
        "required": True, "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}
    binary = {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}
    paths[content]["get"]["responses"]["200"] = {"description": "The bytes", "content": binary}
    paths[content]["get"]["responses"]["206"] = {"description": "The requested Range of the bytes", "content": binary}

    for path, item in paths.items():
        for method, op in item.items():
            op["responses"].pop("422", None)
            if PUBLIC_TAG not in op.get("tags", []):
                op["security"] = [{"bearer": []}]
            for code in _errors_for(path, method, op):
                op["responses"].setdefault(str(code), {"$ref": f"#/components/responses/{code}"})
    _links(paths)
    _key_patterns(doc)
    return doc


def install(app: FastAPI) -> None:
    """Serve :func:`document` as the app's ``/openapi.json`` (made once)."""
    made: dict[str, Any] = {}

    def openapi() -> dict[str, Any]:
        if not made:
            made.update(document(app))
        return made

    app.openapi = openapi  # type: ignore[method-assign]
