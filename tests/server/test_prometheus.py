"""A real Prometheus (Debian's package, run by hand) scrapes a real server over TLS with the metrics token; the
figures it stores match what happened, and the Grafana dashboard in contrib/ asks only for series it has."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from cluster import ServerProc
from sdkworker import SdkWorker

DASHBOARD = Path(__file__).resolve().parents[2] / "contrib" / "grafana" / "xwhep-dashboard.json"
BAG = 12


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def prometheus_binary() -> str:
    path = shutil.which("prometheus")
    if path is None:
        if os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no"):
            pytest.fail("prometheus is required in CI (.ci/run installs it)", pytrace=False)
        pytest.skip("prometheus not installed (apt-get install prometheus)")
    return path


class Prometheus:
    def __init__(self, binary: str, root: Path, srv: ServerProc) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        token = root / "token"
        token.write_text((srv.home / "metrics.token").read_text())
        config = root / "prometheus.yml"
        config.write_text(json.dumps({  # YAML is a superset of JSON
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
            "scrape_configs": [{
                "job_name": "xwhep", "scheme": "https", "metrics_path": "/metrics",
                "tls_config": {"ca_file": str(srv.ca)},
                "authorization": {"type": "Bearer", "credentials_file": str(token)},
                "static_configs": [{"targets": [f"127.0.0.1:{srv.port}"]}],
            }],
        }))
        self.log = root / "prometheus.log"
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen([binary, f"--config.file={config}", f"--storage.tsdb.path={root / 'data'}",
                                          f"--web.listen-address=127.0.0.1:{self.port}"],
                                         stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        self.http = httpx.Client(timeout=10)

    def query(self, expr: str) -> list[dict[str, Any]]:
        r = self.http.get(self.url + "/api/v1/query", params={"query": expr})
        body = r.json()
        assert body["status"] == "success", (expr, body)
        return body["data"]["result"]  # type: ignore[no-any-return]

    def value(self, expr: str) -> float | None:
        try:
            result = self.query(expr)
        except httpx.TransportError:  # not listening yet
            return None
        return float(result[0]["value"][1]) if result else None

    def until(self, expr: str, wanted: Callable[[float | None], bool], timeout: float = 90) -> float | None:
        """Ask Prometheus until ``expr`` gives a wanted value (it scrapes every second); fail after ``timeout``."""
        deadline = time.monotonic() + timeout
        got = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError("prometheus exited:\n" + self.log.read_text()[-3000:])
            got = self.value(expr)
            if wanted(got):
                return got
            time.sleep(0.5)  # bounded polling of an external process' HTTP API (it offers nothing to wait on)
        raise AssertionError(f"{expr} stayed {got}; prometheus said:\n" + self.log.read_text()[-3000:])

    def stop(self) -> None:
        self.http.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def prometheus(prometheus_binary: str, tmp_path: Path) -> Iterator[Callable[[ServerProc], Prometheus]]:
    started: list[Prometheus] = []

    def start(srv: ServerProc) -> Prometheus:
        p = Prometheus(prometheus_binary, tmp_path, srv)
        started.append(p)
        return p

    yield start
    for p in started:
        p.stop()


def test_prometheus_scrapes_the_server_and_stores_what_happened(
        make_server: Callable[..., ServerProc], prometheus: Callable[[ServerProc], Prometheus],
        tmp_path: Path) -> None:
    srv = make_server()
    admin = srv.client()
    prog = tmp_path / "prog.sh"
    prog.write_text("#!/bin/sh\n")
    admin.put_app("promapp", binaries={"linux/x86_64": prog})
    prom = prometheus(srv)
    assert prom.until('up{job="xwhep"}', lambda v: v == 1) == 1  # scraped over TLS with the token

    uids = [w["uid"] for w in admin.submit_bag([{"app": "promapp", "args": str(i)} for i in range(BAG)])]
    wk = SdkWorker(srv.client("worker"), apptypes=["geant4"], packages={"ROOT": "6.30"})  # sharings to show
    for a in wk.take(BAG):
        wk.finish(a["task"], rc=0)
    assert admin.wait(uids, timeout=60) == dict.fromkeys(uids, "COMPLETED")
    completed = sum(1 for w in admin.works() if w["status"] == "COMPLETED")
    assert completed == BAG
    assert prom.until('sum(xwhep_works{status="COMPLETED"})', lambda v: v == completed) == completed
    assert prom.until('xwhep_work_transitions_total{status="COMPLETED"}', lambda v: v == BAG) == BAG
    assert prom.until("xwhep_works_dispatched_total", lambda v: v == BAG) == BAG

    # the dashboard: valid Grafana JSON whose every query Prometheus accepts, naming only series it has
    dash = json.loads(DASHBOARD.read_text())
    assert dash["title"] and dash["uid"] and isinstance(dash["schemaVersion"], int)
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    assert len(exprs) >= 10
    assert prom.until('count(xwhep_request_duration_seconds_bucket{job="xwhep"})', lambda v: bool(v))
    names = set(prom.http.get(prom.url + "/api/v1/label/__name__/values").json()["data"])
    for expr in exprs:
        for metric in set(re.findall(r"\b((?:xwhep|process)_[a-z0-9_]+)", expr)):
            assert metric in names, f"the dashboard asks for {metric}, which the server does not expose"
        prom.query(expr.replace("$job", "xwhep"))  # a query Prometheus refuses fails here
    variables = [v["query"] for v in dash["templating"]["list"] if v["type"] == "query"]
    for query in variables:
        metric = re.search(r"label_values\((\w+)", query)
        assert metric and metric.group(1) in names
