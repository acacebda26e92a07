"""Formatting objects for the command line: ``short``, ``text``, ``csv``, ``xml``, ``json`` and ``html``.

Everything here is pure (objects in, text out) so that the formats can be tested without a server. The object
dicts are the API's JSON; the element/kind names are the API's object kinds (work, app, data, user, usergroup,
host, session, group, event).
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable, Mapping, Sequence
from html import escape as html_escape
from typing import Any
from xml.sax.saxutils import escape as xml_escape

FORMATS = ("short", "text", "csv", "xml", "json", "html")

# The first attributes/columns per kind: what a person looks for first (and what XWHEP printed first).
_LEADING: dict[str, tuple[str, ...]] = {
    "work": ("uid", "status", "app_name", "label", "return_code"),
    "app": ("uid", "name", "type"),
    "data": ("uid", "name", "status", "size"),
    "user": ("uid", "login", "level"),
    "usergroup": ("uid", "label"),
    "host": ("uid", "name", "active", "os", "cpu"),
    "session": ("uid", "label"),
    "group": ("uid", "label"),
    "event": ("time", "action", "object"),
    "mandate": ("uid", "mandator_login", "mandatary_login", "expires"),
}

# What ``short`` shows after the URI, per kind.
_SHORT: dict[str, tuple[str, ...]] = {
    "work": ("status", "app_name", "label"),
    "app": ("name", "type"),
    "data": ("name", "status", "size"),
    "user": ("login", "level"),
    "usergroup": ("label",),
    "host": ("name", "os", "cpu", "cores", "memory", "running"),
    "session": ("label",),
    "group": ("label",),
    "mandate": ("mandator_login", "mandatary_login", "expires"),
}

_XML_ESCAPES = {'"': "&quot;", "\n": "&#10;", "\r": "&#13;", "\t": "&#9;"}


def flat(value: Any) -> str:
    """A field value as one line of text: ``k=v,k=v`` for objects, ``a,b`` for lists, ``""`` for null."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Mapping):
        return ",".join(f"{k}={flat(v)}" for k, v in value.items())
    if isinstance(value, list | tuple):
        return ",".join(flat(v) for v in value)
    return str(value)


def ordered_keys(kind: str, objs: Iterable[Mapping[str, Any]]) -> list[str]:
    """Union of the objects' keys, the kind's leading fields first, then in order of appearance."""
    seen: dict[str, None] = {}
    present: set[str] = set()
    for o in objs:
        for k in o:
            present.add(k)
            seen.setdefault(k, None)
    lead = [k for k in _LEADING.get(kind, ("uid",)) if k in present]
    return lead + [k for k in seen if k not in lead and k != "kind"]


def xml_attrs(kind: str, obj: Mapping[str, Any]) -> dict[str, str]:
    """The XML attributes of one object (null fields left out; XWHEP's ``listenport`` added for works)."""
    out = {k: flat(obj[k]) for k in ordered_keys(kind, [obj]) if obj.get(k) is not None}
    if kind == "work" and obj.get("listen_ports"):
        out["listenport"] = flat(obj["listen_ports"])  # the XWHEP attribute name scripts grep for
    return out


def to_xml(kind: str, objs: Sequence[Mapping[str, Any]]) -> str:
    """``<xwhep>`` with one empty element per object, named after its kind."""
    lines = ['<?xml version="1.0" encoding="UTF-8"?>', "<xwhep>"]
    for o in objs:
        attrs = " ".join(f'{k}="{xml_escape(v, _XML_ESCAPES)}"' for k, v in xml_attrs(kind, o).items())
        lines.append(f"  <{kind} {attrs}/>")
    lines.append("</xwhep>")
    return "\n".join(lines)


def to_json(objs: Sequence[Mapping[str, Any]]) -> str:
    """A JSON array of the objects as the API gave them."""
    return json.dumps([{k: v for k, v in o.items() if k != "kind"} for o in objs], indent=2, ensure_ascii=False)


def _cell(value: Any) -> str:
    # CSV keeps structure recoverable: nested values as compact JSON, not the lossy k=v form
    if isinstance(value, Mapping | list):
        return json.dumps(value, separators=(",", ":"))
    return flat(value)


def to_csv(kind: str, objs: Sequence[Mapping[str, Any]]) -> str:
    """A header line and one row per object."""
    keys = ordered_keys(kind, objs)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(keys)
    for o in objs:
        w.writerow([_cell(o.get(k)) for k in keys])
    return buf.getvalue().rstrip("\n")


def to_html(kind: str, objs: Sequence[Mapping[str, Any]]) -> str:
    """An HTML table (a fragment, ready to paste in a page)."""
    keys = ordered_keys(kind, objs)
    head = "".join(f"<th>{html_escape(k)}</th>" for k in keys)
    rows = ["<tr>" + "".join(f"<td>{html_escape(flat(o.get(k)))}</td>" for k in keys) + "</tr>" for o in objs]
    return "\n".join([f'<table class="xwhep {html_escape(kind)}">', f"<thead><tr>{head}</tr></thead>", "<tbody>",
                      *rows, "</tbody>", "</table>"])


def columns(rows: Sequence[Sequence[str]], sep: str = "  ") -> str:
    """Left-aligned columns (the last column is not padded)."""
    if not rows:
        return ""
    widths = [max(len(r[i]) if i < len(r) else 0 for r in rows) for i in range(max(len(r) for r in rows))]
    out = []
    for r in rows:
        cells = [c.ljust(widths[i]) if i < len(r) - 1 else c for i, c in enumerate(r)]
        out.append(sep.join(cells).rstrip())
    return "\n".join(out)


def short_row(kind: str, obj: Mapping[str, Any]) -> list[str]:
    """One ``short`` line's cells: the URI, then the kind's main fields."""
    if kind == "event":
        change = f"{obj.get('source') or ''}→{obj.get('target') or ''}" if obj.get("source") or obj.get(
            "target") else ""
        return [flat(obj.get("time")), flat(obj.get("action")), flat(obj.get("object")) or "-", change,
                flat(obj.get("detail"))]
    cells = [flat(obj.get("uri") or obj.get("uid")) or "-"]
    cells += [flat(obj.get(k)) or "-" for k in _SHORT.get(kind, ())]
    if kind == "work" and obj.get("return_code") is not None:
        cells.append(f"rc={obj['return_code']}")
    if kind == "host" and obj.get("active") is False:
        cells.append("inactive")
    return cells


def to_short(kind: str, objs: Sequence[Mapping[str, Any]]) -> str:
    """One aligned line per object."""
    return columns([short_row(kind, o) for o in objs])


def to_text(kind: str, objs: Sequence[Mapping[str, Any]]) -> str:
    """``key: value`` blocks, one per object, separated by blank lines (null fields left out)."""
    blocks = []
    for o in objs:
        keys = [k for k in ordered_keys(kind, [o]) if o.get(k) is not None and k != "uri"]
        width = max((len(k) for k in keys), default=0) + 1
        head = f"{kind} {o.get('uri') or o.get('uid') or ''}".rstrip()
        blocks.append("\n".join([head, *(f"  {(k + ':').ljust(width)} {flat(o[k])}" for k in keys)]))
    return "\n\n".join(blocks)


def render(kind: str, objs: Sequence[Mapping[str, Any]], fmt: str = "short") -> str:
    """Objects of one kind in format ``fmt`` (one of :data:`FORMATS`); empty listings give ``""``
    except for the formats that have a frame (xml root, json ``[]``, csv header, html table)."""
    if fmt == "json":
        return to_json(objs)
    if fmt == "xml":
        return to_xml(kind, objs)
    if fmt == "csv":
        return to_csv(kind, objs)
    if fmt == "html":
        return to_html(kind, objs)
    if fmt == "text":
        return to_text(kind, objs)
    if fmt == "short":
        return to_short(kind, objs)
    raise ValueError(f"unknown format {fmt!r}")


# -- why is my work pending ------------------------------------------------------------------------------------------

def why_rows(data: Mapping[str, Any]) -> list[list[str]]:
    """The table of ``GET /works/{uid}/why``: requirement, hosts satisfying it, an example failure."""
    rows = []
    for r in data.get("requirements", []):
        name = "all requirements" if r["name"] == "all" else r["name"]
        rows.append([name, f"{r['satisfied_by']}/{r['of']}", r.get("example_failure") or ""])
    return rows


def why_verdict(data: Mapping[str, Any]) -> str:
    """One sentence that tells what keeps the work waiting (or that nothing does)."""
    status = data.get("status")
    reqs = [r for r in data.get("requirements", []) if r["name"] != "all"]
    total = int(data.get("hosts") or 0)
    fit = next((r["satisfied_by"] for r in data.get("requirements", []) if r["name"] == "all"), 0)
    if status not in ("PENDING", "UNAVAILABLE"):
        reason = f" ({data['reason']})" if data.get("reason") else ""
        return f"verdict: the work is {status}{reason}; it is not waiting for a host"
    if status == "UNAVAILABLE":
        return "verdict: the work waits for its input data to become AVAILABLE"
    if total == 0:
        return "verdict: no worker has registered with this server yet; start one (xw worker)"
    blocking = [r for r in reqs if r["satisfied_by"] == 0]
    if blocking:
        parts = [f"{r['name']} ({r['example_failure']})" if r.get("example_failure") else r["name"]
                 for r in blocking]
        return "verdict: no registered host satisfies " + "; ".join(parts)
    if fit == 0:
        return (f"verdict: each requirement is met by some host, but none of the {total} registered hosts "
                "meets all of them at once")
    alive = int(data.get("matching_alive") or 0)
    if alive == 0:
        return f"verdict: {fit} registered host(s) match, but none is alive now; the work runs when one comes back"
    ahead = int(data.get("pending_ahead") or 0)
    return (f"verdict: {alive} alive host(s) match; {ahead} pending work(s) ahead in the queue — "
            "it should start soon")


def why_text(data: Mapping[str, Any]) -> str:
    """The plain-text why report: a header, the table and the verdict."""
    head = (f"work {data.get('uid')}: {data.get('status')}, {data.get('hosts', 0)} registered host(s), "
            f"{data.get('hosts_alive', 0)} alive, retries {data.get('retries', 0)}/{data.get('max_retries', 0)}")
    if data.get("partial"):
        head += f"; {data.get('note') or 'partial: not every host was checked'}"
    table = columns([["requirement", "hosts", "example failure"], *why_rows(data)])
    return "\n".join([head, "", table, "", why_verdict(data)])
