"""Output formats and the why-pending verdict (pure)."""

from __future__ import annotations

import csv
import io
import json
import xml.etree.ElementTree as ET

from xwhep.client import output
from xwhep.client.progress import Reporter, human_size

WORK = {"uid": "u1", "owner": "o", "status": "RUNNING", "app_name": "echo", "label": 'a "quoted" <label> & co',
        "args": "x 'y z'", "env": {"A": "1", "B": "2"}, "listen_ports": "8080,8081", "result": None,
        "return_code": None, "uri": "xw://h/u1"}
DATA = {"uid": "d1", "name": "in.txt", "status": "AVAILABLE", "size": 3, "uri": "xw://h/d1", "kind": "data"}


def test_xml_one_element_per_object_escaped_with_listenport() -> None:
    text = output.render("work", [WORK, {**WORK, "uid": "u2", "listen_ports": None}], "xml")
    assert '<work uid="u1" status="RUNNING"' in text
    root = ET.fromstring(text)
    assert root.tag == "xwhep" and [e.tag for e in root] == ["work", "work"]
    first, second = root
    assert first.get("label") == WORK["label"] and first.get("listenport") == "8080,8081"
    assert first.get("env") == "A=1,B=2" and first.get("result") is None  # null fields left out
    assert second.get("listenport") is None


def test_json_and_csv_round_trip() -> None:
    objs = json.loads(output.render("data", [DATA], "json"))
    assert objs == [{k: v for k, v in DATA.items() if k != "kind"}]
    rows = list(csv.DictReader(io.StringIO(output.render("work", [WORK], "csv"))))
    assert rows[0]["uid"] == "u1" and rows[0]["label"] == WORK["label"] and json.loads(rows[0]["env"]) == WORK["env"]
    assert list(rows[0])[:3] == ["uid", "status", "app_name"]


def test_short_text_html() -> None:
    short = output.render("work", [WORK, {**WORK, "uri": "xw://h/u22", "return_code": 3, "label": None}], "short")
    lines = short.splitlines()
    assert lines[0].split()[:3] == ["xw://h/u1", "RUNNING", "echo"]
    assert lines[1].split() == ["xw://h/u22", "RUNNING", "echo", "-", "rc=3"]
    text = output.render("data", [DATA], "text")
    assert text.splitlines()[0] == "data xw://h/d1" and "  status: AVAILABLE" in text
    html = output.render("work", [WORK], "html")
    assert "&lt;label&gt; &amp; co" in html and html.startswith("<table")


def test_empty_listings() -> None:
    assert output.render("work", [], "short") == ""
    assert json.loads(output.render("work", [], "json")) == []
    assert list(ET.fromstring(output.render("work", [], "xml"))) == []


WHY = {"uid": "w", "status": "PENDING", "reason": None, "retries": 0, "max_retries": 3, "hosts": 2,
       "hosts_alive": 2, "matching_alive": 0, "pending_ahead": 0,
       "requirements": [{"name": "binary", "satisfied_by": 2, "of": 2, "example_failure": ""},
                        {"name": "memory", "satisfied_by": 0, "of": 2,
                         "example_failure": "needs 999 MiB, host has 10 MiB"},
                        {"name": "all", "satisfied_by": 0, "of": 2, "example_failure": ""}]}


def test_why_verdicts() -> None:
    assert output.why_verdict(WHY) == "verdict: no registered host satisfies memory (needs 999 MiB, host has 10 MiB)"
    text = output.why_text(WHY)
    assert "memory            0/2    needs 999 MiB, host has 10 MiB" in text
    ok = {**WHY, "matching_alive": 2, "pending_ahead": 5,
          "requirements": [{"name": "all", "satisfied_by": 2, "of": 2, "example_failure": ""}]}
    assert "2 alive host(s) match; 5 pending work(s) ahead" in output.why_verdict(ok)
    assert "none is alive" in output.why_verdict({**ok, "matching_alive": 0})
    assert "no worker has registered" in output.why_verdict({**WHY, "hosts": 0, "requirements": []})
    assert "not waiting" in output.why_verdict({**WHY, "status": "COMPLETED"})
    split = {**WHY, "requirements": [{"name": "memory", "satisfied_by": 1, "of": 2, "example_failure": "x"},
                                     {"name": "all", "satisfied_by": 0, "of": 2, "example_failure": ""}]}
    assert "none of the 2 registered hosts meets all of them" in output.why_verdict(split)


def test_plain_progress_lines() -> None:
    buf = io.StringIO()
    r = Reporter("xwsubmit", stream=buf, tty=False)
    with r.transfer("uploaded", "env.zip", 2000) as bar:
        bar(1500)
        bar(500)
    with r.waiting({"u": "xw://h/u"}) as change:
        change("u", "RUNNING")
        change("u", "COMPLETED")
    lines = buf.getvalue().splitlines()
    assert lines[0].startswith("xwsubmit: uploaded env.zip (2.0 kB in ")
    assert lines[1:] == ["xwsubmit: xw://h/u RUNNING", "xwsubmit: xw://h/u COMPLETED"]
    assert (human_size(999), human_size(1500), human_size(2_500_000)) == ("999 B", "1.5 kB", "2.5 MB")


def test_rich_progress_on_a_terminal() -> None:
    buf = io.StringIO()
    r = Reporter("xwresults", stream=buf, tty=True)
    with r.transfer("downloaded", "out.zip", 10) as bar:
        bar(10)
    with r.waiting({"u": "xw://h/u"}) as change:
        change("u", "COMPLETED")
    assert "downloaded out.zip" in buf.getvalue()


def test_why_text_says_when_not_every_host_was_checked() -> None:
    assert "partial" not in output.why_text(WHY).splitlines()[0]
    note = "partial: 1 of 2 hosts checked (the check stops after 3 s)"
    partial = {**WHY, "partial": True, "checked": 1, "note": note}
    assert output.why_text(partial).splitlines()[0].endswith(f"; {note}")
