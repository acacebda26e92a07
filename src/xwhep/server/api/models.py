"""Request bodies. Unknown fields are refused so that a typo is an error, not a silently ignored option."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import (
    Annotated,
    Any,
    Required,  # pydantic needs typing_extensions' TypedDict before 3.12
)

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter
from typing_extensions import TypedDict


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LoginIn(Strict):
    login: str
    password: str


class HostLoginIn(Strict):
    """A host proves itself with the key it got at registration."""

    host: str
    key: Annotated[str, Field(max_length=256)]


class WorkSpec(TypedDict, total=False):
    """One work to submit. A typed dict, not a model: a bag of 10,000 is validated straight into the dicts the
    service takes (building and dumping 10,000 models cost ~6 µs a work, measured; this ~1 µs)."""

    __pydantic_config__ = ConfigDict(extra="forbid")  # type: ignore[misc]
    app: Required[str]
    args: str | list[str] | None
    env: dict[str, str] | None
    stdin: str | None
    dirin: str | None
    label: Annotated[str | None, Field(max_length=255)]
    group: str | None
    session: str | None
    expected_host: str | None
    min_memory: int | None
    min_cpuspeed: int | None
    min_disk: int | None
    wallclock: int | None
    max_retries: int | None
    replicas: int | None
    requirements: str | None
    rank: str | None
    listen_ports: str | list[int] | None
    forward_addresses: str | None
    access_rights: str | None


class Bag(TypedDict):
    __pydantic_config__ = ConfigDict(extra="forbid")  # type: ignore[misc]
    works: list[WorkSpec]


SUBMISSION: TypeAdapter[WorkSpec] = TypeAdapter(WorkSpec)
BAG: TypeAdapter[Bag] = TypeAdapter(Bag)


def set_fields(spec: Mapping[str, Any]) -> dict[str, Any]:
    """The fields given a value (an explicit null is the same as leaving the field out)."""
    if None not in spec.values():
        return dict(spec)
    return {k: v for k, v in spec.items() if v is not None}


class DataSpec(Strict):
    name: str
    type: str | None = None
    size: int | None = None
    sha256: str | None = None
    access_rights: str | None = None


class AppSpec(Strict):
    name: str
    type: str | None = None
    binaries: dict[str, str] | None = None
    default_stdin: str | None = None
    default_dirin: str | None = None
    base_dirin: str | None = None
    image: str | None = None
    env: dict[str, str] | None = None
    packages: dict[str, str] | list[str] | None = None
    min_memory: int | None = None
    min_cpuspeed: int | None = None
    min_disk: int | None = None
    access_rights: str | None = None


class HostSpec(Strict):
    uid: str | None = None  # re-register this host: with its key (or a token bound to it), else a new host
    key: Annotated[str | None, Field(max_length=256)] = None  # the host's key, from its first registration
    name: str | None = None
    os: str | None = None
    cpu: str | None = None
    cpuspeed: int | None = None
    cores: int | None = None
    memory: int | None = None
    disk: int | None = None
    java: bool | None = None
    version: str | None = None
    apptypes: list[str] | None = None
    packages: dict[str, str] | None = None
    datas: list[str] | None = None
    project: str | None = None
    incoming: bool | None = None
    pool: int | None = None
    active: bool | None = None


class RequestIn(Strict):
    max: int = Field(1, ge=1, le=1000)
    wait: float = Field(0.0, ge=0.0, le=600.0)


class AliveIn(Strict):
    # default_factory, not ``= []``: pydantic deep-copies a mutable default on every request (a tenth of the
    # sync call's time, measured)
    tasks: list[str] = Field(default_factory=list)
    results: list[str] = Field(default_factory=list)
    active: bool = True
    running: int | None = None


class ResultRef(Strict):
    sha256: str
    size: int = Field(ge=0)
    name: str | None = None
    type: str | None = None


class Report(Strict):
    task: str
    status: str = "COMPLETED"
    charge: bool = True  # ABORTED: count this attempt against max retries (False: deactivation, shutdown)
    return_code: int | None = None
    reason: str | None = None
    result: ResultRef | None = None


class WaitIn(Strict):
    """Long-poll on works' states: answers as soon as one differs from ``known`` (uid → status), all are final,
    or ``timeout`` seconds passed. Instead of ``works``, a ``group`` (uid or URI) or a ``label``: every work of
    it the caller reads, with ``known_counts`` (status → count) as known (api/bagwait.py)."""

    works: list[str] = Field(default_factory=list, max_length=10_000)
    known: dict[str, str] = Field(default_factory=dict)
    group: str | None = None
    label: Annotated[str | None, Field(max_length=255)] = None
    known_counts: dict[str, int] = Field(default_factory=dict)
    timeout: float = Field(30.0, ge=0.0, le=600.0)


class ReportsIn(Strict):
    reports: list[Report] = Field(max_length=10_000)


class SyncIn(Strict):
    """One round trip of a worker: what it finished, what it runs and holds, and how many works it wants."""

    reports: list[Report] = Field(default_factory=list, max_length=10_000)
    tasks: list[str] = Field(default_factory=list)
    results: list[str] = Field(default_factory=list)
    active: bool = True
    max: int = Field(0, ge=0, le=1000)
    wait: float = Field(0.0, ge=0.0, le=600.0)


class UserSpec(Strict):
    login: str
    password: str | None = None
    level: str | None = None
    usergroup: str | None = None
    email: str | None = None
    x509_dn: str | None = None
    oidc_subject: str | None = None


class GroupSpec(Strict):
    label: str


class BagSpec(Strict):
    label: str | None = None


class ChmodIn(Strict):
    access_rights: str


class PasswordIn(Strict):
    password: str


def dump(model: BaseModel) -> dict[str, Any]:
    return model.model_dump(exclude_none=True)


def validation_error(errors: Sequence[Any]) -> dict[str, Any]:
    """The 400 body for a request that failed validation: the first problem names its field."""
    first = errors[0] if errors else {}
    loc = [str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path") and p not in MODEL_NAMES]
    field = ".".join(loc) or None
    msg = first.get("msg", "invalid request")
    if first.get("type") == "json_invalid":
        msg, field = "request body is not valid JSON", "body"
    elif first.get("type") in ("model_attributes_type", "dict_type", "model_type") and not loc:
        msg, field = "request body must be a JSON object", "body"
    return {"error": f"{field}: {msg}" if field else msg, "field": field,
            "details": [{"field": ".".join(str(p) for p in e.get("loc", ())), "error": e.get("msg")}
                        for e in errors[:20]]}


MODEL_NAMES = frozenset(name for name, obj in list(vars().items()) if isinstance(obj, type))
