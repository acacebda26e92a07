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

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    GetCoreSchemaHandler,
    StrictBool,
    StrictInt,
    TypeAdapter,
    ValidationError,
)
from pydantic_core import core_schema as cs
from typing_extensions import TypedDict

INT32_MAX = 2**31 - 1
INT64_MAX = 2**63 - 1


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

    def __get_pydantic_core_schema__(self, source: Any, handler: GetCoreSchemaHandler) -> cs.CoreSchema:
        text = cs.str_schema(max_length=self.max_length)
        return cs.json_or_python_schema(json_schema=text,
                                        python_schema=cs.no_info_after_validator_function(_text, text))


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
Int32 = Annotated[StrictInt, Field(ge=-(2**31), le=INT32_MAX)]
"""A signed integer stored in a 32-bit column (e.g. a return code)."""
Count = Annotated[StrictInt, Field(ge=0, le=INT32_MAX)]
"""A non-negative integer stored in a 32-bit column: megabytes, MHz, cores, counts."""
Size = Annotated[StrictInt, Field(ge=0, le=INT64_MAX)]
"""A size in bytes (a 64-bit column)."""
Port = Annotated[StrictInt, Field(ge=1, le=65535)]
QUERY_INT64 = {"ge": 0, "le": INT64_MAX}
"""Bounds of a non-negative 64-bit query parameter (``Query(**QUERY_INT64)``; query strings are text, so not strict)."""

CONFIG = ConfigDict(extra="forbid", allow_inf_nan=False)


class Strict(BaseModel):
    model_config = CONFIG


class LoginIn(Strict):
    login: Text128
    password: Secret


class WorkSpec(TypedDict, total=False):
    """One work to submit. A typed dict, not a model: a bag of 10,000 is validated straight into the dicts the
    service takes (building and dumping 10,000 models cost ~6 µs a work, measured; this ~1 µs)."""

    __pydantic_config__ = CONFIG  # type: ignore[misc]
    app: Required[Text]
    args: Text | list[Text] | None
    env: dict[Text, Text] | None
    stdin: Text | None
    dirin: Text | None
    label: Text255 | None
    group: Text | None
    session: Text | None
    expected_host: Text255 | None
    min_memory: Count | None
    min_cpuspeed: Count | None
    min_disk: Count | None
    wallclock: Count | None
    max_retries: Count | None
    replicas: Count | None
    requirements: Text | None
    rank: Text | None
    listen_ports: Text255 | list[Port] | None
    forward_addresses: Text | None
    access_rights: Text | None


class Bag(TypedDict):
    __pydantic_config__ = CONFIG  # type: ignore[misc]
    works: list[WorkSpec]


SUBMISSION: TypeAdapter[WorkSpec] = TypeAdapter(WorkSpec)
BAG: TypeAdapter[Bag] = TypeAdapter(Bag)
SUBMIT_BODY: TypeAdapter[WorkSpec | Bag] = TypeAdapter(WorkSpec | Bag)  # for the OpenAPI document only


def set_fields(spec: Mapping[str, Any]) -> dict[str, Any]:
    """The fields given a value (an explicit null is the same as leaving the field out)."""
    if None not in spec.values():
        return dict(spec)
    return {k: v for k, v in spec.items() if v is not None}


class DataSpec(Strict):
    name: Text255
    type: Text32 | None = None
    size: Size | None = None
    sha256: Text64 | None = None
    access_rights: Text | None = None


class AppSpec(Strict):
    name: Text255
    type: Text16 | None = None
    binaries: dict[Text, Text] | None = None
    default_stdin: Text | None = None
    default_dirin: Text | None = None
    base_dirin: Text | None = None
    image: Text | None = None
    env: dict[Text, Text] | None = None
    packages: dict[Text, Text] | list[Text] | None = None
    min_memory: Count | None = None
    min_cpuspeed: Count | None = None
    min_disk: Count | None = None
    access_rights: Text | None = None


class HostSpec(Strict):
    uid: Text | None = None
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
    max: StrictInt = Field(1, ge=1, le=1000)
    wait: float = Field(0.0, ge=0.0, le=600.0)


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
    task: Text
    status: Text16 = "COMPLETED"
    charge: StrictBool = True  # ABORTED: count this attempt against max retries (False: deactivation, shutdown)
    return_code: Int32 | None = None
    reason: Text | None = None
    result: ResultRef | None = None


class WaitIn(Strict):
    """Long-poll on works' states: answers as soon as one differs from ``known`` (uid → status), all are final,
    or ``timeout`` seconds passed."""

    works: list[Text] = Field(min_length=1, max_length=10_000)
    known: dict[Text, Text] = Field(default_factory=dict)
    timeout: float = Field(30.0, ge=0.0, le=600.0)


class ReportsIn(Strict):
    reports: list[Report] = Field(max_length=10_000)


class SyncIn(Strict):
    """One round trip of a worker: what it finished, what it runs and holds, and how many works it wants."""

    reports: list[Report] = Field(default_factory=list, max_length=10_000)
    tasks: list[Text] = Field(default_factory=list)
    results: list[Text] = Field(default_factory=list)
    active: StrictBool = True
    max: StrictInt = Field(0, ge=0, le=1000)
    wait: float = Field(0.0, ge=0.0, le=600.0)


class UserSpec(Strict):
    login: Text128
    password: Secret | None = None
    level: Text32 | None = None
    usergroup: Text | None = None
    email: Text255 | None = None
    x509_dn: Text512 | None = None
    oidc_subject: Text512 | None = None


class GroupSpec(Strict):
    label: Text128


class BagSpec(Strict):
    label: Text255 | None = None


class ChmodIn(Strict):
    access_rights: Text64


class PasswordIn(Strict):
    password: Secret


class MandateIn(Strict):
    """A mandate to give: to ``mandatary`` (login, uid or URI), for ``expires_in`` seconds (default: until revoked),
    from ``mandator`` (administrators only; default the caller)."""

    mandatary: Text512
    expires_in: float | None = None
    mandator: Text512 | None = None


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
    msg = str(error.get("msg", "invalid value"))
    return msg.removeprefix("Value error, ")


MODEL_NAMES = frozenset(name for name, obj in list(vars().items()) if isinstance(obj, type))
