"""``GET /metrics``: who may scrape, and figures that match what really happened (real server processes)."""

from __future__ import annotations

import hashlib
import ssl
from collections.abc import Callable
from pathlib import Path

import httpx
from cluster import ServerProc
from prometheus_client.parser import text_string_to_metric_families
from sdkworker import SdkWorker

from xwhep.client import Client


def scrape(srv: ServerProc, token: str | None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    with httpx.Client(verify=ssl.create_default_context(cafile=str(srv.ca)), timeout=30) as http:
        return http.get(srv.url + "/metrics", headers=headers)


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """(sample name, sorted labels) → value."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(found: dict[tuple[str, tuple[tuple[str, str], ...]], float], sample: str, /, **labels: str
          ) -> float | None:
    return found.get((sample, tuple(sorted(labels.items()))))


def test_metrics_need_the_metrics_token_or_an_administrator(make_server: Callable[..., ServerProc]) -> None:
    srv = make_server()
    admin = srv.client()
    admin.create_user("carol", "pw-carolcarol")
    carol = Client(srv.url, ca=str(srv.ca), login="carol", password="pw-carolcarol")
    assert scrape(srv, None).status_code == 401
    assert scrape(srv, "not-the-token").status_code == 401
    refused = scrape(srv, carol.login())
    assert refused.status_code == 403 and "metrics token" in refused.json()["error"]
    assert any(e["action"] == "access.denied" and "/metrics" in (e["detail"] or "") for e in admin.events())
    token = (srv.home / "metrics.token").read_text().strip()
    assert (srv.home / "metrics.token").stat().st_mode & 0o077 == 0, "the token file is readable by others"
    for good in (token, admin.login()):
        r = scrape(srv, good)
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
        assert "xwhep_build_info" in r.text


def test_metrics_match_what_happened(make_server: Callable[..., ServerProc], db_url: str | None,
                                     tmp_path: Path) -> None:
    srv = make_server(db_url)
    admin = srv.client()
    prog = tmp_path / "prog.sh"
    prog.write_text("#!/bin/sh\necho hi\n")
    admin.put_app("metricsapp", binaries={"linux/x86_64": prog}, access_rights="0x755")
    admin.create_usergroup("physics")
    admin.create_user("dave", "pw-davedave", usergroup="physics")
    dave = Client(srv.url, ca=str(srv.ca), login="dave", password="pw-davedave")
    mine = [admin.submit("metricsapp", args=str(i))["uid"] for i in range(3)]
    theirs = [dave.submit("metricsapp", args=str(i))["uid"] for i in range(2)]
    payload = tmp_path / "payload.bin"
    payload.write_bytes(hashlib.sha256(b"x").digest() * 1000)
    data = admin.put_data(payload)
    admin.download(data["uid"], tmp_path / "back.bin")
    wk = SdkWorker(srv.client("worker"), apptypes=["geant4"], packages={"ROOT": "6.30"})
    tasks = {a["work"]: a["task"] for a in wk.take(4)}
    assert len(tasks) == 4
    done = [w for w in (*mine, *theirs) if w in tasks]
    wk.finish(tasks[done[0]], status="FAILED", rc=2, reason="bad input")
    for w in done[1:]:
        wk.finish(tasks[w], rc=0)
    statuses = {w["uid"]: (w["status"], w["owner"]) for w in admin.works()}
    owners = {admin.me()["uid"]: "none", dave.me()["uid"]: "physics"}

    r = scrape(srv, (srv.home / "metrics.token").read_text().strip())
    assert r.status_code == 200
    found = samples(r.text)
    expected: dict[tuple[str, str], int] = {}
    for status, owner in statuses.values():
        expected[(status, owners[owner])] = expected.get((status, owners[owner]), 0) + 1
    for (status, owner_class), n in expected.items():
        assert value(found, "xwhep_works", status=status, owner_class=owner_class) == n, (status, owner_class)
    assert value(found, "xwhep_work_transitions_total", status="COMPLETED") == 3
    assert value(found, "xwhep_work_transitions_total", status="FAILED") == 1
    assert value(found, "xwhep_work_transitions_total", status="PENDING") == 5  # the submissions
    assert value(found, "xwhep_works_dispatched_total") == 4
    assert value(found, "xwhep_tasks_ended_total") == 4
    assert value(found, "xwhep_scheduler_pending_works") == 1
    assert value(found, "xwhep_hosts_registered") == 1 and value(found, "xwhep_hosts_alive") == 1
    assert value(found, "xwhep_hosts_alive_sharing", kind="apptype", name="geant4") == 1
    assert value(found, "xwhep_hosts_alive_sharing", kind="package", name="ROOT") == 1
    age = value(found, "xwhep_pending_oldest_age_seconds")
    assert age is not None and age > 0
    assert value(found, "xwhep_transfer_bytes_total", direction="upload") == prog.stat().st_size + 32_000
    assert value(found, "xwhep_transfer_bytes_total", direction="download") == 32_000
    assert (value(found, "xwhep_request_duration_seconds_count", route="POST /api/v1/works") or 0) >= 5
    assert value(found, "xwhep_responses_total", route="POST /api/v1/works", code="2xx") == 5
    assert value(found, "xwhep_events_total", action="auth.login") is not None
    # who runs what stays private: no login and no user uid in any label
    for secret in ("dave", "admin", *owners):
        assert secret not in r.text, f"{secret!r} leaked into the metrics"
