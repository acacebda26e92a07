"""The tables (SQLAlchemy Core). Every object row carries uid, owner, access_rights, created, modified.

Times are epoch seconds (float): cheap to compare in the hot paths; the API renders them as ISO 8601.
"""

from __future__ import annotations

import sqlalchemy as sa

metadata = sa.MetaData()

UID = sa.String(36)


def _object_columns() -> list[sa.Column[object]]:
    return [
        sa.Column("uid", UID, primary_key=True),
        sa.Column("owner", UID, nullable=True, index=True),
        sa.Column("access_rights", sa.Integer, nullable=False),
        sa.Column("created", sa.Float, nullable=False),
        sa.Column("modified", sa.Float, nullable=False),
    ]


users = sa.Table(
    "users", metadata, *_object_columns(),
    sa.Column("login", sa.String(128), nullable=False, unique=True),
    sa.Column("password_hash", sa.String(255), nullable=True),
    sa.Column("level", sa.String(32), nullable=False),
    sa.Column("usergroup", UID, nullable=True, index=True),
    sa.Column("email", sa.String(255), nullable=True),
    sa.Column("x509_dn", sa.String(512), nullable=True, unique=True),
    sa.Column("oidc_subject", sa.String(512), nullable=True),
    sa.Column("tokens_after", sa.Float, nullable=True),  # tokens issued before this time are refused
)

usergroups = sa.Table(
    "usergroups", metadata, *_object_columns(),
    sa.Column("label", sa.String(128), nullable=False, unique=True),
)

apps = sa.Table(
    "apps", metadata, *_object_columns(),
    sa.Column("name", sa.String(255), nullable=False, unique=True),
    sa.Column("type", sa.String(16), nullable=False),
    sa.Column("binaries", sa.JSON, nullable=False),  # {"linux/x86_64": data uid, "java": data uid}
    sa.Column("default_stdin", UID, nullable=True),
    sa.Column("default_dirin", UID, nullable=True),
    sa.Column("base_dirin", UID, nullable=True),
    sa.Column("env", sa.JSON, nullable=False),
    sa.Column("packages", sa.JSON, nullable=False),  # {"ROOT": "6.30"}
    sa.Column("min_memory", sa.Integer, nullable=False, default=0),
    sa.Column("min_cpuspeed", sa.Integer, nullable=False, default=0),
    sa.Column("min_disk", sa.Integer, nullable=False, default=0),
    sa.Column("image", UID, nullable=True),  # VM disk or container image data
)

datas = sa.Table(
    "datas", metadata, *_object_columns(),
    sa.Column("name", sa.String(255), nullable=False),
    sa.Column("type", sa.String(32), nullable=False),
    sa.Column("size", sa.BigInteger, nullable=True),
    sa.Column("sha256", sa.String(64), nullable=True, index=True),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("links", sa.Integer, nullable=False, default=0),
    sa.Column("work", UID, nullable=True, index=True),  # set when the data is a work's result
)

works = sa.Table(
    "works", metadata,
    sa.Column("id", sa.Integer, sa.Identity(), primary_key=True),  # submission order (FIFO)
    sa.Column("uid", UID, nullable=False, unique=True),
    sa.Column("owner", UID, nullable=False, index=True),
    sa.Column("access_rights", sa.Integer, nullable=False),
    sa.Column("created", sa.Float, nullable=False),
    sa.Column("modified", sa.Float, nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("app", UID, nullable=False, index=True),
    sa.Column("args", sa.Text, nullable=True),
    sa.Column("env", sa.JSON, nullable=False),
    sa.Column("stdin", UID, nullable=True),
    sa.Column("dirin", UID, nullable=True),
    sa.Column("label", sa.String(255), nullable=True),
    sa.Column("grp", UID, nullable=True),
    sa.Column("session", UID, nullable=True),
    sa.Column("expected_host", sa.String(255), nullable=True),
    sa.Column("min_memory", sa.Integer, nullable=False, default=0),
    sa.Column("min_cpuspeed", sa.Integer, nullable=False, default=0),
    sa.Column("min_disk", sa.Integer, nullable=False, default=0),
    sa.Column("wallclock", sa.Integer, nullable=True),
    sa.Column("max_retries", sa.Integer, nullable=False),
    sa.Column("retries", sa.Integer, nullable=False, default=0),
    # attempts so far (one task each, aborted ones included): the next task's trial number
    sa.Column("trials", sa.Integer, nullable=False, server_default=sa.text("0")),
    sa.Column("replicas", sa.Integer, nullable=False, default=1),
    sa.Column("replica_of", UID, nullable=True),
    sa.Column("requirements", sa.Text, nullable=True),
    sa.Column("rank", sa.Text, nullable=True),
    sa.Column("listen_ports", sa.String(255), nullable=True),
    sa.Column("forward_addresses", sa.Text, nullable=True),
    sa.Column("result", UID, nullable=True),
    sa.Column("return_code", sa.Integer, nullable=True),
    sa.Column("reason", sa.Text, nullable=True),
    sa.Column("host", UID, nullable=True),
    sa.Column("task", UID, nullable=True),
    sa.Column("pending_since", sa.Float, nullable=True),
    sa.Column("started", sa.Float, nullable=True),
    sa.Column("completed", sa.Float, nullable=True),
    sa.Index("ix_works_status_id", "status", "id"),
    # partial: most works have no group, session or master, and a bag of 10,000 would otherwise add 30,000 NULL
    # entries to these indexes (40 % of a bulk insert, measured); "col = ?" still uses them
    *(sa.Index(f"ix_works_{col}", col, sqlite_where=sa.text(f"{col} IS NOT NULL"),
               postgresql_where=sa.text(f"{col} IS NOT NULL")) for col in ("grp", "session", "replica_of")),
)

tasks = sa.Table(
    "tasks", metadata, *_object_columns(),
    sa.Column("work", UID, nullable=False, index=True),
    sa.Column("host", UID, nullable=False, index=True),
    sa.Column("trial", sa.Integer, nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("started", sa.Float, nullable=False),
    sa.Column("last_alive", sa.Float, nullable=False),
    sa.Column("ended", sa.Float, nullable=True),
    sa.Column("return_code", sa.Integer, nullable=True),
    sa.Column("reason", sa.Text, nullable=True),
    sa.Column("result_sha256", sa.String(64), nullable=True),
    sa.Index("ix_tasks_status_alive", "status", "last_alive"),
)

hosts = sa.Table(
    "hosts", metadata, *_object_columns(),
    sa.Column("name", sa.String(255), nullable=False),
    sa.Column("os", sa.String(32), nullable=False),
    sa.Column("cpu", sa.String(32), nullable=False),
    sa.Column("cpuspeed", sa.Integer, nullable=False, default=0),
    sa.Column("cores", sa.Integer, nullable=False, default=1),
    sa.Column("memory", sa.Integer, nullable=False, default=0),
    sa.Column("disk", sa.Integer, nullable=False, default=0),
    sa.Column("java", sa.Boolean, nullable=False, default=False),
    sa.Column("version", sa.String(64), nullable=True),
    sa.Column("apptypes", sa.JSON, nullable=False),
    sa.Column("packages", sa.JSON, nullable=False),
    sa.Column("sharedatas", sa.JSON, nullable=False),
    sa.Column("project", sa.String(128), nullable=True),
    sa.Column("incoming", sa.Boolean, nullable=False, default=False),
    sa.Column("pool", sa.Integer, nullable=False, default=1),
    sa.Column("active", sa.Boolean, nullable=False, default=True),
    sa.Column("last_alive", sa.Float, nullable=True),
    sa.Column("key_hash", sa.String(64), nullable=True),  # sha256 of the host's own key (its identity)
)

sessions = sa.Table(
    "sessions", metadata, *_object_columns(),
    sa.Column("label", sa.String(255), nullable=True),
)

groups = sa.Table(
    "groups", metadata, *_object_columns(),
    sa.Column("label", sa.String(255), nullable=True),
)

# A user's mandate to a MANDATED_USER (a portal, a workflow engine): the mandatary may act on the mandator's behalf
mandates = sa.Table(
    "mandates", metadata, *_object_columns(),  # owner: the mandator
    sa.Column("mandator", UID, nullable=False),
    sa.Column("mandatary", UID, nullable=False, index=True),
    sa.Column("expires", sa.Float, nullable=True),  # epoch seconds; None: until revoked
    sa.UniqueConstraint("mandator", "mandatary", name="uq_mandates_pair"),
)

events = sa.Table(
    "events", metadata,
    sa.Column("id", sa.Integer, sa.Identity(), primary_key=True),
    sa.Column("time", sa.Float, nullable=False),
    sa.Column("actor", UID, nullable=True),
    sa.Column("action", sa.String(64), nullable=False),
    sa.Column("object", UID, nullable=True, index=True),
    sa.Column("source", sa.String(16), nullable=True),
    sa.Column("target", sa.String(16), nullable=True),
    sa.Column("detail", sa.Text, nullable=True),
)

TABLES_BY_TYPE = {
    "user": users, "usergroup": usergroups, "app": apps, "data": datas, "work": works, "task": tasks,
    "host": hosts, "session": sessions, "group": groups,
}
