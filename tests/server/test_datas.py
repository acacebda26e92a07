"""The data repository: verified streaming uploads, content addressing, links, Range downloads, memory bounds."""

from __future__ import annotations

import hashlib
import os
import socket
import ssl
import threading
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest
from cluster import ServerProc

from xwhep.client import XwError


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> ServerProc:
    s = ServerProc(home=tmp_path_factory.mktemp("datasrv")).start()
    yield s
    s.stop()


def _blobs(srv: ServerProc) -> set[str]:
    root = srv.home / "blobs"
    return {p.name for p in root.glob("??/*")}


def test_same_bytes_stored_once_and_freed_with_last_link(srv: ServerProc, tmp_path: Path) -> None:
    admin = srv.client()
    f = tmp_path / "x.bin"
    f.write_bytes(os.urandom(4096))
    sha = hashlib.sha256(f.read_bytes()).hexdigest()
    d1 = admin.put_data(f)
    assert d1["status"] == "AVAILABLE" and d1["sha256"] == sha and d1["size"] == 4096
    d2 = admin.put_data(f, name="copy.bin")
    assert d2["uid"] != d1["uid"] and d2["status"] == "AVAILABLE"
    assert sha in _blobs(srv)
    assert len([b for b in _blobs(srv) if b == sha]) == 1
    admin.delete_data(d1["uid"])
    assert sha in _blobs(srv), "another data still uses the blob"
    admin.delete_data(d2["uid"])
    assert sha not in _blobs(srv), "the last link went: the blob is freed"


def test_data_used_by_work_cannot_vanish(srv: ServerProc, tmp_path: Path) -> None:
    admin = srv.client()
    prog = tmp_path / "p.sh"
    prog.write_text("#!/bin/sh\ncat\n")
    admin.put_app("cat-links", binaries={"linux/x86_64": prog})
    f = tmp_path / "in.txt"
    f.write_text("data in use\n")
    d = admin.put_data(f)
    w = admin.submit("cat-links", stdin=d["uid"])
    with pytest.raises(XwError) as err:
        admin.delete_data(d["uid"])
    assert err.value.status == 409 and "used by" in err.value.message
    admin.delete_work(w["uid"])
    admin.delete_data(d["uid"])
    with pytest.raises(XwError) as err:
        admin.data(d["uid"])
    assert err.value.status == 404


def test_checksum_mismatch_stays_unavailable(srv: ServerProc, tmp_path: Path) -> None:
    admin = srv.client()
    f = tmp_path / "y.bin"
    f.write_bytes(b"the real bytes")
    d = admin.create_data("y.bin", f.stat().st_size, hashlib.sha256(b"other bytes!!!").hexdigest())
    with pytest.raises(XwError) as err:
        admin.upload(d["uid"], f)
    assert err.value.status == 400 and "sha256 mismatch" in err.value.message
    assert admin.data(d["uid"])["status"] == "UNAVAILABLE"
    assert hashlib.sha256(b"the real bytes").hexdigest() not in _blobs(srv)
    assert list((srv.home / "blobs" / "tmp").iterdir()) == []


def test_truncated_upload_stores_nothing(srv: ServerProc, tmp_path: Path) -> None:
    admin = srv.client()
    payload = os.urandom(200_000)
    d = admin.create_data("t.bin", len(payload), hashlib.sha256(payload).hexdigest())
    token = admin.login()
    host, port = srv.url.split("://")[1].split(":")
    ctx = ssl.create_default_context(cafile=str(srv.ca))
    with socket.create_connection((host, int(port))) as raw, ctx.wrap_socket(raw, server_hostname=host) as s:
        s.sendall((f"PUT /api/v1/datas/{d['uid']}/content HTTP/1.1\r\nHost: {host}\r\n"
                   f"Authorization: Bearer {token}\r\nContent-Length: {len(payload)}\r\n\r\n").encode())
        s.sendall(payload[:50_000])  # then the connection drops
    # the server noticed (or will notice) the cut; the data never becomes AVAILABLE
    assert admin.data(d["uid"])["status"] == "UNAVAILABLE"
    f = tmp_path / "t.bin"
    f.write_bytes(payload)
    assert admin.upload(d["uid"], f)["status"] == "AVAILABLE"  # a full retry succeeds


def test_range_download_resumes(srv: ServerProc, tmp_path: Path) -> None:
    admin = srv.client()
    f = tmp_path / "big.bin"
    f.write_bytes(os.urandom(3 * 1024 * 1024 + 17))
    d = admin.put_data(f)
    r = admin.http.get(f"{admin.base}/datas/{d['uid']}/content", headers={**admin._auth_header(),
                                                                         "Range": "bytes=100-199"})
    assert r.status_code == 206 and r.content == f.read_bytes()[100:200]
    dest = tmp_path / "got.bin"
    part = tmp_path / "got.bin.part"
    part.write_bytes(f.read_bytes()[: 1024 * 1024])  # an interrupted earlier download
    seen: list[int] = []
    admin.download(d["uid"], dest, progress=seen.append)
    assert dest.read_bytes() == f.read_bytes()
    assert seen[0] == 1024 * 1024, "the download resumed from the partial file"
    assert not part.exists()


def _peak_rss(pid: int, stop: threading.Event, out: list[int]) -> None:
    proc = psutil.Process(pid)
    peak = 0
    while not stop.wait(0.05):  # sampling a measurement, not synchronising
        peak = max(peak, proc.memory_info().rss)
    out.append(peak)


def test_one_gib_upload_and_download_keep_server_rss_low(srv: ServerProc, tmp_path: Path) -> None:
    admin = srv.client()
    f = tmp_path / "gib.bin"
    h = hashlib.sha256()
    block = os.urandom(1024 * 1024)
    with open(f, "wb") as out:
        for i in range(1024):
            chunk = block[i:] + block[:i]
            h.update(chunk)
            out.write(chunk)
    assert srv.proc is not None
    stop, peaks = threading.Event(), []
    t = threading.Thread(target=_peak_rss, args=(srv.proc.pid, stop, peaks))
    t.start()
    try:
        d = admin.put_data(f)
        assert d["sha256"] == h.hexdigest() and d["size"] == 1 << 30
        dest = tmp_path / "gib.out"
        admin.download(d["uid"], dest)
        assert dest.stat().st_size == 1 << 30
    finally:
        stop.set()
        t.join()
    assert peaks[0] < 200 * 1024 * 1024, f"server RSS peaked at {peaks[0] / 2**20:.0f} MiB"
    admin.delete_data(d["uid"])


def test_bad_input_errors_name_the_field(srv: ServerProc, tmp_path: Path) -> None:
    admin = srv.client()

    def err(fn: Callable[[], object]) -> XwError:
        with pytest.raises(XwError) as e:
            fn()
        return e.value

    e = err(lambda: admin.submit("no-such-app"))
    assert e.status == 404 and e.field == "app" and "unknown app" in e.message
    e = err(lambda: admin.put_data(tmp_path / "missing.txt"))
    assert "no such file" in e.message
    prog = tmp_path / "p.sh"
    prog.write_text("#!/bin/sh\n")
    admin.put_app("badinput", binaries={"linux/x86_64": prog})
    e = err(lambda: admin.submit("badinput", requirements="host.memory >"))
    assert e.status == 400 and e.field == "requirements" and "malformed expression" in e.message
    e = err(lambda: admin.work("xw://h/not-a-uuid"))
    assert "malformed URI" in e.message
    e = err(lambda: admin.work("0b4f2a38-8a1e-4a39-9d7f-5b0a1f0e0c11"))
    assert e.status == 404
    e = err(lambda: admin.submit("badinput", listen_ports="80,99999"))
    assert e.status == 400 and e.field == "listen_ports"
    e = err(lambda: admin.submit_bag([{"app": "badinput"}] * 10_001))
    assert e.status == 413 and "at most 10000" in e.message
    r = admin.http.post(f"{admin.base}/works", headers=admin._auth_header(), content=b"{not json")
    assert r.status_code == 400 and r.json()["field"] == "body"
    r = admin.http.post(f"{admin.base}/works", headers=admin._auth_header(), json={"app": "badinput", "bogus": 1})
    assert r.status_code == 400 and r.json()["field"] == "bogus"
    r = admin.http.post(f"{admin.base}/datas", headers={**admin._auth_header(), "Content-Type": "application/json"},
                        content=b"[" + b"1," * (40 * 1024 * 1024) + b"1]")
    assert r.status_code == 413
    r = admin.http.get(f"{admin.base}/works")
    assert r.status_code == 401 and "authentication required" in r.json()["error"]


def test_bulk_bag_of_ten_thousand(srv: ServerProc, tmp_path: Path) -> None:
    admin = srv.client()
    prog = tmp_path / "p.sh"
    prog.write_text("#!/bin/sh\n")
    admin.put_app("bulk", binaries={"linux/x86_64": prog})
    out = admin.submit_bag([{"app": "bulk", "args": str(i), "label": "bag10k"} for i in range(10_000)])
    assert len(out) == 10_000 and len({w["uid"] for w in out}) == 10_000
    assert len(admin.works(label="bag10k")) == 10_000


def test_listing_pages_through_everything(srv: ServerProc, tmp_path: Path) -> None:
    admin = srv.client()
    made = set()
    for i in range(7):
        f = tmp_path / f"p{i}.txt"
        f.write_text(f"page {i}\n")
        made.add(admin.put_data(f)["uid"])
    everything = {d["uid"] for d in admin.datas()}
    paged = admin.datas(page=3)  # 3 + 3 + 3 + … until a short page
    assert made <= {d["uid"] for d in paged}
    assert [d["uid"] for d in paged] == sorted(everything) and len(paged) == len(everything)


def test_bag_of_mixed_shapes_keeps_each_works_fields(srv: ServerProc, tmp_path: Path) -> None:
    """Works of one bag that share their shape are checked once; every work still gets exactly its own fields,
    links are counted per work, and a bad work names its index."""
    admin = srv.client()
    prog = tmp_path / "m.sh"
    prog.write_text("#!/bin/sh\n")
    admin.put_app("mixed", binaries={"linux/x86_64": prog})
    stdin = tmp_path / "in.txt"
    stdin.write_text("input\n")
    data = admin.put_data(stdin)
    specs = []
    for i in range(30):
        spec: dict[str, object] = {"app": "mixed", "args": ["x", str(i)] if i % 3 == 0 else f"a {i}"}
        if i % 2:
            spec["label"] = f"odd-{i}"
        if i % 5 == 0:
            spec.update(stdin=data["uid"], env={"K": str(i % 10)}, max_retries=1, min_memory=64)
        specs.append(spec)
    out = admin.submit_bag(specs)
    got = {w["uid"]: admin.work(w["uid"]) for w in out}
    for spec, w in zip(specs, out, strict=True):
        row = got[w["uid"]]
        args = spec["args"]
        assert row["args"] == (" ".join(args) if isinstance(args, list) else args)
        assert row["label"] == spec.get("label")
        assert row["stdin"] == spec.get("stdin")
        assert row["env"] == spec.get("env", {})
        assert row["max_retries"] == spec.get("max_retries", 3) and row["min_memory"] == spec.get("min_memory", 0)
    assert admin.data(data["uid"])["links"] == 6  # i = 0, 5, 10, 15, 20, 25
    with pytest.raises(XwError) as err:
        admin.submit_bag([{"app": "mixed", "args": "ok"}, {"app": "mixed", "args": 7}])
    assert err.value.status == 400 and "works.1.args" in err.value.message
    with pytest.raises(XwError) as err:
        admin.submit_bag([{"app": "mixed", "args": "ok"}, {"app": "mixed", "args": "ok", "requirements": "host.("}])
    assert err.value.status == 400 and "works[1]" in err.value.message and err.value.field == "requirements"
    assert admin.data(data["uid"])["links"] == 6  # the refused bags changed nothing
