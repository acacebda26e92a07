"""Request bodies. Unknown fields are refused so that a typo is an error, not a silently ignored option.

Every integer a client sends is a bounded strict integer (:data:`Int32`, :data:`Count`, :data:`Size`, …): the
bound is the column's (a PostgreSQL ``integer`` is 32-bit, ``bigint`` 64-bit; SQLite takes at most 64 bits), so
a value the database cannot hold is a 400 naming the field, never a 500, and ``true`` is never an integer. Every
string is :data:`Text`: a lone UTF-16 surrogate (which JSON's ``\\ud800`` can spell but UTF-8 cannot) is a 400
naming the field, not a failure in the database driver.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import (
    Annotated,
    Any,
    Required,  # pydantic needs typing_extensions' TypedDict before 3.12
)

from fastapi import Path, Query
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    GetCoreSchemaHandler,
    StrictBool,
    TypeAdapter,
    ValidationError,
)
from pydantic_core import core_schema as cs
from starlette.convertors import Convertor, register_url_convertor
from typing_extensions import TypedDict

from xwhep.core.model import LEVEL_ALIASES, UsageLevel

INT32_MAX = 2**31 - 1
INT64_MAX = 2**63 - 1
SAFE_MAX = 2**53 - 1
"""The largest integer every JSON parser reads exactly (JavaScript's Number.MAX_SAFE_INTEGER): the bound of the
64-bit fields (sizes in bytes: 8 PiB), so that no client rounds a value the server accepts."""


def _text(value: str) -> str:
    # isascii is O(1) on CPython's compact strings: the common case costs nothing; encoding finds a lone surrogate
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("not valid Unicode text (a lone UTF-16 surrogate)") from None
    return value


@dataclass(frozen=True)
class Unicode:
    """A str that must be valid Unicode, of at most ``max_length`` characters.

    Checked only on Python input (FastAPI's routes parse JSON with the standard library, which reads a lone
    surrogate escape): pydantic's own JSON parser (the workers' fast path) refuses those itself, so the hot path
    pays no Python call per string."""

    max_length: int | None = None
    min_length: int | None = None
    pattern: str | None = None
    format: str | None = None  # for the OpenAPI document only

    def __get_pydantic_core_schema__(self, source: Any, handler: GetCoreSchemaHandler) -> cs.CoreSchema:
        text = cs.str_schema(max_length=self.max_length, min_length=self.min_length, pattern=self.pattern)
        python: cs.CoreSchema = cs.no_info_after_validator_function(_text, cs.str_schema())
        if self.max_length is not None or self.min_length is not None or self.pattern is not None:
            python = cs.chain_schema([python, text])  # Unicode first: the pattern never sees a lone surrogate
        return cs.json_or_python_schema(json_schema=text, python_schema=python)

    def __get_pydantic_json_schema__(self, core: cs.CoreSchema, handler: Any) -> Any:
        out = {"type": "string"}
        if self.max_length is not None:
            out["maxLength"] = self.max_length  # type: ignore[assignment]
        if self.min_length is not None:
            out["minLength"] = self.min_length  # type: ignore[assignment]
        if self.pattern is not None:
            out["pattern"] = self.pattern
        if self.format is not None:
            out["format"] = self.format
        return out


_UUID = "[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
UID_PATTERN = f"^{_UUID}$"
"""A uid as the server hands them out (any case)."""
REF_PATTERN = f"^({_UUID}|xw://[A-Za-z0-9._\\[\\]:-]+/{_UUID}/?)$"
"""A reference to an object: its uid or its ``xw://host/uid`` URI (what core.uri.to_uid reads)."""
_PORT = "([1-9][0-9]{0,3}|[1-5][0-9]{4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}|655[0-2][0-9]|6553[0-5])"
PORTS_PATTERN = f"^{_PORT}(,{_PORT})*$"
_RIGHTS_CLAUSE = "[ugoaUGOA]*[-+=][rwxtRWXT]*"
RIGHTS_PATTERN = (f"^(0[xX]0*(1[0-7]{{3}}|[0-7]{{1,3}})|0*(1[0-7]{{3}}|[0-7]{{1,3}})"
                  f"|{_RIGHTS_CLAUSE}(,{_RIGHTS_CLAUSE})*)$")
"""Access rights: ``0x755``, ``755`` (octal digits as people mean them), ``1755`` (sticky), or ``go-rwx,o+r``."""
SHA256_PATTERN = "^[0-9a-fA-F]{64}$"
APP_TYPE_PATTERN = "^(DEPLOYABLE|SHARED|VM|CONTAINER|deployable|shared|vm|container)$"
PLATFORM_PATTERN = "^([^/]+/.+|java|JAVA|jar|JAR)$"
"""A binary's platform: OS/CPU (``linux/x86_64``), or java."""
_LEVEL_NAMES = [level.name for level in UsageLevel] + sorted(LEVEL_ALIASES)
LEVEL_PATTERN = "^(" + "|".join(_LEVEL_NAMES + [n.lower() for n in _LEVEL_NAMES]) + ")$"
"""A usage level by name (aliases ADMIN, STANDARD, WORKER, …), upper or lower case."""
LOGIN_PATTERN = "^[^:]+$"
REPORT_STATUS_PATTERN = "^(COMPLETED|ERROR|FAILED|ABORTED|completed|error|failed|aborted)$"


Text = Annotated[str, Unicode()]
"""Any string a client sends: valid Unicode (storable as UTF-8)."""
Text16 = Annotated[str, Unicode(16)]
Text32 = Annotated[str, Unicode(32)]
Text64 = Annotated[str, Unicode(64)]
Text128 = Annotated[str, Unicode(128)]
Text255 = Annotated[str, Unicode(255)]
"""A string stored in a column of 255 characters (names, labels)."""
Text512 = Annotated[str, Unicode(512)]
Secret = Annotated[str, Unicode(4096)]
"""A password: bounded, so that hashing cannot be made arbitrarily expensive."""
NewSecret = Annotated[str, Unicode(4096, 8)]
"""A password being set: at least 8 characters."""
Name = Annotated[str, Unicode(255, 1)]
"""A name stored in a column of 255 characters: not empty."""
Label = Annotated[str, Unicode(128, 1)]
Ref = Annotated[str, Unicode(512, pattern=REF_PATTERN)]
"""A uid or an ``xw://`` URI."""
Rights = Annotated[str, Unicode(64, pattern=RIGHTS_PATTERN)]
Sha256 = Annotated[str, Unicode(64, pattern=SHA256_PATTERN)]
Expression = Annotated[str, Unicode(4096, format="cel-expression")]
"""A CEL expression over the host's attributes (requirements, rank)."""
def _whole(value: float) -> int:
    if not value.is_integer():
        raise ValueError("expected an integer, got a number with a fractional part")
    return int(value)


@dataclass(frozen=True)
class Integer:
    """An integer as JSON Schema means it: 3 or 3.0, never ``true`` nor ``"3"``; within [``ge``, ``le``].

    An exact integer is checked without any Python call (pydantic's strict int); only a float takes the slower
    second branch."""

    ge: int
    le: int

    def __get_pydantic_core_schema__(self, source: Any, handler: GetCoreSchemaHandler) -> cs.CoreSchema:
        exact = cs.int_schema(ge=self.ge, le=self.le, strict=True)
        whole = cs.chain_schema([cs.no_info_after_validator_function(_whole, cs.float_schema(strict=True)), exact])
        # tags that validation_error leaves out of the field's path
        return cs.union_schema([(exact, "int"), (whole, "float")], mode="left_to_right")

    def __get_pydantic_json_schema__(self, core: cs.CoreSchema, handler: Any) -> Any:
        return {"type": "integer", "minimum": self.ge, "maximum": self.le}


Int32 = Annotated[int, Integer(-(2**31), INT32_MAX)]
"""A signed integer stored in a 32-bit column (e.g. a return code)."""
Count = Annotated[int, Integer(0, INT32_MAX)]
"""A non-negative integer stored in a 32-bit column: megabytes, MHz, cores, counts."""
Size = Annotated[int, Integer(0, SAFE_MAX)]
"""A size in bytes (a 64-bit column)."""
Port = Annotated[int, Integer(1, 65535)]
Seconds = Annotated[float, Field(strict=True, ge=0.0, le=600.0)]
"""A wait in seconds: a number (an integer is one too), never ``false``."""
QUERY_INT64 = {"ge": 0, "le": SAFE_MAX}
"""Bounds of a non-negative 64-bit query parameter (``Query(**QUERY_INT64)``; query strings are text, so not strict)."""

STATUS_PATTERN = ("^(UNAVAILABLE|PENDING|RUNNING|DATAREQUEST|REPLICATING|COMPLETED|ERROR|FAILED|ABORTED|LOST|"
                  "unavailable|pending|running|datarequest|replicating|completed|error|failed|aborted|lost)$")
"""A work's status (upper or lower case)."""
UidPath = Annotated[str, Path(pattern=UID_PATTERN)]
"""A uid in a URL path (a URI's slashes cannot be part of a path segment); routes write it ``{uid:uid}``."""


class UidConvertor(Convertor[str]):
    """``{uid:uid}`` in a route's path matches only a uid, so that ``/works/wait`` is never taken for the work
    ``wait``: routing then agrees with the OpenAPI document (405 and its Allow header included)."""

    regex = _UUID

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


register_url_convertor("uid", UidConvertor())
AppRef = Annotated[str, Path(min_length=1, max_length=255)]
"""An app's name or uid in a URL path."""
RefQuery = Annotated[str | None, Query(pattern=REF_PATTERN)]
"""An optional uid or URI in a query string."""

CONFIG = ConfigDict(extra="forbid", allow_inf_nan=False)


class Strict(BaseModel):
    model_config = CONFIG


class LoginIn(Strict):
    login: Text128
    password: Secret


class HostLoginIn(Strict):
    """A host proves itself with the key it got at registration."""

    host: Ref
    key: Annotated[str, Unicode(256)]


class WorkSpec(TypedDict, total=False):
    """One work to submit. A typed dict, not a model: a bag of 10,000 is validated straight into the dicts the
    service takes (building and dumping 10,000 models cost ~6 µs a work, measured; this ~1 µs)."""

    __pydantic_config__ = CONFIG  # type: ignore[misc]
    app: Required[Name]  # its name, uid or URI
    args: Text | list[Text] | None
    env: dict[Text, Text] | None
    stdin: Ref | None
    dirin: Ref | None
    label: Text255 | None
    group: Ref | None
    session: Ref | None
    expected_host: Text255 | None  # a host's name, uid or URI
    min_memory: Count | None
    min_cpuspeed: Count | None
    min_disk: Count | None
    wallclock: Annotated[int, Integer(1, INT32_MAX)] | None
    max_retries: Annotated[int, Integer(0, 1000)] | None
    replicas: Annotated[int, Integer(1, 1000)] | None
    requirements: Expression | None
    rank: Expression | None
    listen_ports: Annotated[str, Unicode(255, pattern=PORTS_PATTERN)] | list[Port] | None
    forward_addresses: Text | None
    access_rights: Rights | None


class Bag(TypedDict):
    __pydantic_config__ = CONFIG  # type: ignore[misc]
    works: Annotated[list[WorkSpec], Field(min_length=1)]


SUBMISSION: TypeAdapter[WorkSpec] = TypeAdapter(WorkSpec)
BAG: TypeAdapter[Bag] = TypeAdapter(Bag)
SUBMIT_BODY: TypeAdapter[WorkSpec | Bag] = TypeAdapter(WorkSpec | Bag)  # for the OpenAPI document only


def set_fields(spec: Mapping[str, Any]) -> dict[str, Any]:
    """The fields given a value (an explicit null is the same as leaving the field out)."""
    if None not in spec.values():
        return dict(spec)
    return {k: v for k, v in spec.items() if v is not None}


class DataSpec(Strict):
    name: Name
    type: Text32 | None = None
    size: Size | None = None
    sha256: Sha256 | None = None
    access_rights: Rights | None = None


class AppSpec(Strict):
    """An app to register (or, same name and owner, to update: then ``binaries`` add to those it has). A new
    DEPLOYABLE app (the default type) needs at least one binary."""

    model_config = ConfigDict(**CONFIG, json_schema_extra={"anyOf": [
        {"required": ["type"], "properties": {"type": {"pattern": "^(SHARED|VM|CONTAINER|shared|vm|container)$"}}},
        {"required": ["binaries"], "properties": {"binaries": {"minProperties": 1}}}]})

    name: Name
    type: Annotated[str, Unicode(pattern=APP_TYPE_PATTERN)] | None = None
    binaries: dict[Annotated[str, Unicode(64, pattern=PLATFORM_PATTERN)], Ref] | None = None
    default_stdin: Ref | None = None
    default_dirin: Ref | None = None
    base_dirin: Ref | None = None
    image: Ref | None = None
    env: dict[Text, Text] | None = None
    packages: dict[Text, Text] | list[Text] | None = None
    min_memory: Count | None = None
    min_cpuspeed: Count | None = None
    min_disk: Count | None = None
    access_rights: Rights | None = None


class HostSpec(Strict):
    uid: Ref | None = None  # re-register this host: with its key, else a new host
    key: Annotated[str, Unicode(256)] | None = None  # the host's key, from its first registration
    name: Text255 | None = None
    os: Text32 | None = None
    cpu: Text32 | None = None
    cpuspeed: Count | None = None
    cores: Count | None = None
    memory: Count | None = None
    disk: Count | None = None
    java: StrictBool | None = None
    version: Text64 | None = None
    apptypes: list[Text] | None = None
    packages: dict[Text, Text] | None = None
    datas: list[Text] | None = None
    project: Text128 | None = None
    incoming: StrictBool | None = None
    pool: Count | None = None
    active: StrictBool | None = None


class RequestIn(Strict):
    max: Annotated[int, Integer(1, 1000)] = 1
    wait: Seconds = 0.0


class AliveIn(Strict):
    # default_factory, not ``= []``: pydantic deep-copies a mutable default on every request (a tenth of the
    # sync call's time, measured)
    tasks: list[Text] = Field(default_factory=list)
    results: list[Text] = Field(default_factory=list)
    active: StrictBool = True
    running: Count | None = None


class ResultRef(Strict):
    sha256: Text64
    size: Size
    name: Text255 | None = None
    type: Text32 | None = None


class Report(Strict):
    task: Ref
    status: Annotated[str, Unicode(pattern=REPORT_STATUS_PATTERN)] = "COMPLETED"
    charge: StrictBool = True  # ABORTED: count this attempt against max retries (False: deactivation, shutdown)
    return_code: Int32 | None = None
    reason: Text | None = None
    result: ResultRef | None = None


class WaitIn(Strict):
    """Long-poll on works' states: answers as soon as one differs from ``known`` (uid → status), all are final,
    or ``timeout`` seconds passed. Instead of ``works``, a ``group`` (uid or URI) or a ``label``: every work of
    it the caller reads, with ``known_counts`` (status → count) as known (api/bagwait.py)."""

    works: list[Ref] = Field(default_factory=list, max_length=10_000)
    known: dict[Ref, Text] = Field(default_factory=dict)
    group: Ref | None = None
    label: Text255 | None = None
    known_counts: dict[Text32, Count] = Field(default_factory=dict)
    timeout: Seconds = 30.0


class ReportsIn(Strict):
    reports: list[Report] = Field(max_length=10_000)


class SyncIn(Strict):
    """One round trip of a worker: what it finished, what it runs and holds, and how many works it wants."""

    reports: list[Report] = Field(default_factory=list, max_length=10_000)
    tasks: list[Text] = Field(default_factory=list)
    results: list[Text] = Field(default_factory=list)
    active: StrictBool = True
    max: Annotated[int, Integer(0, 1000)] = 0
    wait: Seconds = 0.0


class UserSpec(Strict):
    login: Annotated[str, Unicode(128, 1, pattern=LOGIN_PATTERN)]
    password: NewSecret | None = None
    level: Annotated[str, Unicode(pattern=LEVEL_PATTERN)] | None = None
    usergroup: Text255 | None = None  # its label, uid or URI
    email: Annotated[str, Unicode(255, 1)] | None = None
    x509_dn: Annotated[str, Unicode(512, 1)] | None = None
    oidc_subject: Annotated[str, Unicode(512, 1)] | None = None


class GroupSpec(Strict):
    label: Label


class BagSpec(Strict):
    label: Text255 | None = None


class ChmodIn(Strict):
    access_rights: Rights


class PasswordIn(Strict):
    password: NewSecret


class MandateIn(Strict):
    """A mandate to give: to ``mandatary`` (login, uid or URI), for ``expires_in`` seconds (default: until revoked),
    from ``mandator`` (administrators only; default the caller)."""

    mandatary: Annotated[str, Unicode(512, 1)]
    expires_in: Annotated[float, Field(strict=True, gt=0, le=10 * 365 * 86400)] | None = None
    mandator: Annotated[str, Unicode(512, 1)] | None = None


def dump(model: BaseModel) -> dict[str, Any]:
    return model.model_dump(exclude_none=True)


def json_errors(model: type[BaseModel], body: bytes, exc: ValidationError) -> list[Any]:
    """The errors of ``model.model_validate_json(body)``, with the field named where pydantic's JSON parser could
    not: it refuses a lone surrogate (``"\\ud800"``) as invalid JSON, while the standard library's parser reads it,
    so the model's own check on the decoded value names the field. Only on the error path."""
    errors = exc.errors()
    if not errors or errors[0].get("type") != "json_invalid":
        return errors
    try:
        decoded = json.loads(body)
        model.model_validate(decoded)
    except (ValueError, RecursionError) as again:
        return again.errors() if isinstance(again, ValidationError) else errors
    return errors


def validation_error(errors: Sequence[Any]) -> dict[str, Any]:
    """The 400 body for a request that failed validation: the first problem names its field."""
    first = errors[0] if errors else {}
    loc, key = _field_path(first.get("loc", ()))
    field = ".".join(loc) or None
    msg = _message(first) if first else "invalid request"
    if key:
        msg = f"a key: {msg}"
    if first.get("type") == "json_invalid":
        msg, field = "request body is not valid JSON", "body"
    elif first.get("type") in ("model_attributes_type", "dict_type", "model_type") and not loc:
        msg, field = "request body must be a JSON object", "body"
    return {"error": f"{field}: {msg}" if field else msg, "field": field,
            "details": [{"field": ".".join(_field_path(e.get("loc", ()))[0]), "error": _message(e)}
                        for e in errors[:20]]}


def _field_path(loc: Sequence[Any]) -> tuple[list[str], bool]:
    """A pydantic error location as the client's field path: without the request part (body, query, path), the
    union members' type tags (``str``, ``list[int]``, ``WorkSpec``) and, for a bad dict key, the key itself (it may
    be the very text that cannot be rendered). Returns (path, whether a key was at fault)."""
    out: list[str] = []
    for part in loc:
        if isinstance(part, int):
            out.append(str(part))
        elif part == "[key]":
            return out[:-1], True
        elif part in ("body", "query", "path", "header") or part in MODEL_NAMES or "[" in part or part in _TAGS:
            continue
        else:
            out.append(part.encode("utf-8", "backslashreplace").decode("utf-8"))
    return out, False


_TAGS = frozenset({"str", "int", "float", "bool", "list", "dict", "none", "null"})


def _message(error: Mapping[str, Any]) -> str:
    if error.get("type") == "string_pattern_mismatch":
        meaning = PATTERN_MEANINGS.get(str((error.get("ctx") or {}).get("pattern")))
        if meaning:
            return meaning
    msg = str(error.get("msg", "invalid value"))
    return msg.removeprefix("Value error, ")


PATTERN_MEANINGS = {
    UID_PATTERN: "expected a uid (a UUID)",
    REF_PATTERN: "expected a uid or an xw://host/uid URI",
    RIGHTS_PATTERN: "expected access rights like 0x755, 755, 1755 or go-rwx,o+r",
    SHA256_PATTERN: "expected 64 hexadecimal characters",
    PORTS_PATTERN: "expected port numbers 1-65535 separated by commas",
    LEVEL_PATTERN: "expected a usage level (e.g. STANDARD_USER, ADVANCED_USER, WORKER_USER, SUPER_USER)",
    APP_TYPE_PATTERN: "expected DEPLOYABLE, SHARED, VM or CONTAINER",
    PLATFORM_PATTERN: "expected OS/CPU (like linux/x86_64) or java",
    REPORT_STATUS_PATTERN: "expected COMPLETED, ERROR, FAILED or ABORTED",
    STATUS_PATTERN: "expected a work status (PENDING, RUNNING, COMPLETED, …)",
    LOGIN_PATTERN: "a login cannot contain ':'",
}


MODEL_NAMES = frozenset(name for name, obj in list(vars().items()) if isinstance(obj, type))
