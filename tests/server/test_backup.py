"""``xw admin backup`` while a bag runs, ``xw admin restore`` into a fresh home (and database), a server started
on it: every work and data there, bytes intact. Real server processes, the real command line, real PostgreSQL."""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys
import tarfile
import threading
import uuid
from collections.abc import Callable
from pathlib import Path

import pgserver
import pytest
from cluster import ServerProc
from sdkworker import SdkWorker

from xwhep.client import Client


def _admin(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "xwhep.client.cli", "admin", *args], capture_output=True,
                          text=True, timeout=300)


def _result(args: str) -> bytes:
    return f"result of {args}\n".encode() * 500


def test_backup_while_a_bag_runs_and_restore_into_a_fresh_home(
        make_server: Callable[..., ServerProc], db_url: str | None, request: pytest.FixtureRequest,
        tmp_path: Path) -> None:
    srv = make_server(db_url)
    admin = srv.client()
    prog = tmp_path / "prog.sh"
    prog.write_text("#!/bin/sh\necho run\n")
    admin.put_app("bagapp", binaries={"linux/x86_64": prog})
    inputs = {}
    for i in range(3):
        f = tmp_path / f"input{i}.bin"
        f.write_bytes(os.urandom(100_000 + i))
        inputs[admin.put_data(f)["uid"]] = hashlib.sha256(f.read_bytes()).hexdigest()
    bag = [w["uid"] for w in admin.submit_bag([{"app": "bagapp", "args": f"n{i}"} for i in range(40)])]
    args_of = {w["uid"]: w["args"] for w in admin.works()}

    # the bag runs while the backup is taken: a worker finishes works with results, one after the other
    wk = SdkWorker(srv.client("worker"))
    stop = threading.Event()
    failures: list[BaseException] = []

    def run_bag() -> None:
        try:
            while not stop.is_set():
                taken = wk.take(1, wait=0.2)
                for a in taken:
                    wk.finish(a["task"], result=_result(args_of[a["work"]]), tmp=tmp_path)
                if not taken:
                    return
        except BaseException as exc:
            failures.append(exc)

    for a in wk.take(5):  # some results before the backup for sure; the rest run during it
        wk.finish(a["task"], result=_result(args_of[a["work"]]), tmp=tmp_path)
    runner = threading.Thread(target=run_bag)
    runner.start()
    archive = tmp_path / "backup.tar"
    try:
        made = _admin("backup", str(archive), "--home", str(srv.home), *(["--db", db_url] if db_url else []))
    finally:
        stop.set()
        runner.join(timeout=60)
    assert made.returncode == 0, made.stderr
    assert not failures, failures
    assert archive.stat().st_mode & 0o077 == 0, "the backup holds the home's keys: it must be private"
    assert not list(tmp_path.glob("*.part"))

    # refused: restoring over the running server's home
    busy = _admin("restore", str(archive), "--home", str(srv.home), "--force",
                  *(["--db", db_url] if db_url else []))
    assert busy.returncode == 1 and "stop it" in busy.stderr and "Traceback" not in busy.stderr

    target_db = None
    if db_url is not None:
        base = request.getfixturevalue("pg_url_base")
        name = f"t_{uuid.uuid4().hex[:16]}"
        target_db = pgserver.create_database(base, name)
        request.addfinalizer(lambda: pgserver.drop_database(base, name))
    fresh = tmp_path / "restored"
    done = _admin("restore", str(archive), "--home", str(fresh), *(["--db", target_db] if target_db else []))
    assert done.returncode == 0, done.stderr
    again = _admin("restore", str(archive), "--home", str(fresh), *(["--db", target_db] if target_db else []))
    assert again.returncode == 1 and "already holds" in again.stderr

    restored = ServerProc(home=fresh, db=target_db).start()
    try:
        back = Client.from_config(fresh / "admin.conf")  # the restored admin.conf, pointing at the new server
        assert back.me()["login"] == "admin"
        works = {w["uid"]: w for w in back.works()}
        assert set(bag) <= set(works), "works submitted before the backup are missing"
        completed = [u for u in bag if works[u]["status"] == "COMPLETED"]
        assert len(completed) >= 5
        (tmp_path / "results").mkdir()
        (tmp_path / "inputs").mkdir()
        for uid in completed:  # every result the snapshot has, byte for byte (the SDK checks sha256 too)
            path = back.fetch_result(uid, tmp_path / "results")
            assert path.read_bytes() == _result(args_of[uid])
        datas = {d["uid"]: d for d in back.datas()}
        for uid, sha in inputs.items():
            assert datas[uid]["sha256"] == sha
            got = back.download(uid, tmp_path / "inputs" / uid)
            assert hashlib.sha256(got.read_bytes()).hexdigest() == sha
        # the restored server runs works: its scheduler index was rebuilt from the restored database
        pending = [u for u in bag if works[u]["status"] == "PENDING"]
        if pending:
            wk2 = SdkWorker(Client.from_config(fresh / "worker.conf"))
            assert {a["work"] for a in wk2.take(len(pending))} == set(pending)
    finally:
        restored.stop()


def test_restore_refuses_a_damaged_backup_and_changes_nothing(make_server: Callable[..., ServerProc],
                                                                 tmp_path: Path) -> None:
    srv = make_server()
    admin = srv.client()
    f = tmp_path / "data.bin"
    f.write_bytes(os.urandom(50_000))
    admin.put_data(f)
    archive = tmp_path / "b.tar.gz"
    assert _admin("backup", str(archive), "--home", str(srv.home)).returncode == 0
    damaged = tmp_path / "damaged.tar"
    with tarfile.open(archive) as src, tarfile.open(damaged, "w") as out:
        for member in src:
            data = src.extractfile(member).read()  # type: ignore[union-attr]
            if member.name.startswith("blobs/"):
                data = bytes([data[0] ^ 1]) + data[1:]  # one bit flipped
            out.addfile(member, io.BytesIO(data))
    fresh = tmp_path / "fresh"
    r = _admin("restore", str(damaged), "--home", str(fresh))
    assert r.returncode == 1 and "checksum or size differs" in r.stderr and "Traceback" not in r.stderr
    assert not (fresh / "xwhep.db").exists() and not (fresh / "secret").exists()
    assert not list((fresh / "blobs").glob("*/*")) if (fresh / "blobs").exists() else True
    not_backup = tmp_path / "x.tar"
    with tarfile.open(not_backup, "w") as out:
        out.add(f, arcname="data.bin")
    r = _admin("restore", str(not_backup), "--home", str(tmp_path / "other"))
    assert r.returncode == 1 and "not an xwhep backup" in r.stderr
    ok = _admin("restore", str(archive), "--home", str(fresh))
    assert ok.returncode == 0, ok.stderr
