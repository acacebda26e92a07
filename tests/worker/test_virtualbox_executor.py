"""CONTRACT TESTS of the VirtualBox executor — not VirtualBox runs. VirtualBox cannot be installed on this project's
machines; these tests run the executor against tests/fakevbox/VBoxManage, a strict recorder of VBoxManage's
documented syntax (VirtualBox 7.0) that keeps the hypervisor's state in a JSON file and refuses whatever the real
program would. The test plays the guest: it reads the disks the executor attached (the real job disk and seed
made by xwhep.vm.guestio), writes the result stream a guest agent writes, and powers the VM off in the state.
What these tests cannot show: that a real VirtualBox boots the template, runs the agent, or enforces anything.
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import json
import os
import shutil
import socket
import subprocess
import tarfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from xwhep.vm.guestio import MAGIC_JOB
from xwhep.worker.executors import ExecutorError, JobSpec
from xwhep.worker.executors.base import VmSpec
from xwhep.worker.executors.virtualbox import VirtualBoxExecutor

FAKE = Path(__file__).resolve().parent.parent / "fakevbox" / "VBoxManage"
VDI_HEADER = 512  # the recorder's stand-in for a VDI: a 512-byte header, then the raw bytes

pytestmark = pytest.mark.skipif(not (shutil.which("mkfs.ext4") and shutil.which("genisoimage")
                                     and shutil.which("debugfs") and shutil.which("isoinfo")),
                                reason="e2fsprogs and genisoimage are not installed")


@dataclass
class Hypervisor:
    """The recorder's state file and the socket it announces started VMs on."""

    state: Path
    events: socket.socket

    def load(self) -> dict[str, Any]:
        with open(self.state.with_suffix(".lock"), "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            return json.loads(self.state.read_text()) if self.state.exists() else {"vms": {}, "calls": []}

    def edit(self, fn: Any) -> None:
        with open(self.state.with_suffix(".lock"), "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            doc = json.loads(self.state.read_text())
            fn(doc)
            self.state.write_text(json.dumps(doc))

    def wait_started(self, timeout: float = 60) -> str:
        self.events.settimeout(timeout)
        conn, _ = self.events.accept()
        with conn:
            line = conn.makefile().readline().strip()
        assert line.startswith("startvm "), line
        return line.split(" ", 1)[1]

    def calls(self) -> list[str]:
        return [c[1] if c[0] == "-q" else c[0] for c in self.load()["calls"]]


@pytest.fixture
def hv(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Hypervisor]:
    sockpath = Path("/tmp") / f"xwvb-{os.getpid()}-{tmp_path.name[-8:]}.sock"
    events = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    events.bind(str(sockpath))
    events.listen(4)
    monkeypatch.setenv("XWHEP_FAKE_VBOX_STATE", str(tmp_path / "vbox-state.json"))
    monkeypatch.setenv("XWHEP_FAKE_VBOX_EVENTS", str(sockpath))
    yield Hypervisor(tmp_path / "vbox-state.json", events)
    events.close()
    sockpath.unlink(missing_ok=True)


@pytest.fixture
def template(tmp_path: Path) -> Path:
    disk = tmp_path / "template.raw"
    disk.write_bytes(b"\xeb\x63\x90 a bootable disk, as far as this contract goes" + b"\0" * (1 << 20))
    return disk


@pytest.fixture
def root(tmp_path: Path) -> Path:
    r = tmp_path / "jobroot"
    (r / "job").mkdir(parents=True)
    return r


def executor(tmp_path: Path, **kw: Any) -> VirtualBoxExecutor:
    return VirtualBoxExecutor(tmp_path / "worker", vboxmanage=str(FAKE), poll_s=0.05, **kw)


def play_guest(hv: Hypervisor, name: str, tmp_path: Path, rc: int) -> dict[str, Any]:
    """What the guest agent would do: read its job disk and seed, write the results, power off."""
    vm = hv.load()["vms"][name]
    att = {k.split(":")[1]: v for k, v in vm["attachments"].items()}
    job = tmp_path / "guest-job.raw"
    job.write_bytes(Path(att["1"]["medium"]).read_bytes()[VDI_HEADER:])
    assert job.read_bytes()[:len(MAGIC_JOB)] == MAGIC_JOB
    inp = subprocess.run(["debugfs", "-R", "cat /in/input.txt", str(job)], capture_output=True, text=True,
                         check=True).stdout
    run_sh = subprocess.run(["debugfs", "-R", "cat /xw/run.sh", str(job)], capture_output=True, text=True,
                            check=True).stdout
    env = subprocess.run(["debugfs", "-R", "cat /xw/job.env", str(job)], capture_output=True, text=True,
                         check=True).stdout
    offset = int(dict(line.split("=", 1) for line in env.split())["XW_OUT_OFFSET"])
    user_data = subprocess.run(["isoinfo", "-R", "-x", "/user-data", "-i", att["2"]["medium"]],
                               capture_output=True, text=True, check=True).stdout
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name_, data in (("log/rc", f"{rc}\n".encode()), ("log/stdout.txt", b"guest says " + inp.encode()),
                            ("log/stderr.txt", b""), ("job/output.txt", b"computed\n"), ("log/end", b"")):
            info = tarfile.TarInfo(name_)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    with open(att["1"]["medium"], "r+b") as f:
        f.seek(VDI_HEADER + offset)
        f.write(buf.getvalue())

    def poweroff(doc: dict[str, Any]) -> None:
        doc["vms"][name]["state"] = "poweroff"

    hv.edit(poweroff)
    return {"attachments": att, "run_sh": run_sh, "settings": vm["settings"], "controllers": vm["controllers"],
            "user_data": user_data}


def test_a_vm_job_follows_the_vboxmanage_contract(hv: Hypervisor, template: Path, root: Path,
                                                  tmp_path: Path) -> None:
    (root / "job" / "input.txt").write_text("the input")
    before = hashlib.sha256(template.read_bytes()).hexdigest()
    ex = executor(tmp_path)
    spec = JobSpec(jobdir=root / "job", logdir=root / "log", argv=["sh", "-c", "compute > output.txt"],
                   wallclock=120, vm=VmSpec(disk=template, disk_format="raw", memory_mb=512, cpus=2))
    running = ex.start(spec)
    seen: dict[str, Any] = {}
    guest = threading.Thread(target=lambda: seen.update(play_guest(hv, hv.wait_started(), tmp_path, 0)))
    guest.start()
    out = running.wait(120)
    guest.join()
    assert (out.status, out.return_code) == ("COMPLETED", 0), out.reason
    assert (root / "job" / "output.txt").read_text() == "computed\n"
    assert (root / "log" / "stdout.txt").read_text() == "guest says the input"
    doc = hv.load()
    assert doc.get("refused", []) == []
    calls = hv.calls()
    assert calls[:3] == ["convertfromraw"] * 2 + ["createvm"]
    assert calls[3:9] == ["modifyvm", "storagectl", *["storageattach"] * 3, "startvm"]
    assert set(calls[9:-3]) == {"showvminfo"} and calls[-3:] == ["clonemedium", "showvminfo", "unregistervm"]
    # what was asked of VirtualBox
    s = seen["settings"]
    assert s["--memory"] == ["512"] and s["--cpus"] == ["2"] and s["--ioapic"] == ["on"]
    assert s["--nic1"] == ["none"] and s["--boot1"] == ["disk"]
    assert seen["controllers"] == {"SATA": {"bus": "sata", "ports": 3}}
    att = seen["attachments"]
    assert att["0"]["mtype"] == "multiattach" and att["0"]["medium"].endswith(".vdi")
    assert att["1"]["type"] == "hdd" and "exec sh -c 'compute > output.txt'" in seen["run_sh"]
    assert att["2"]["type"] == "dvddrive" and seen["user_data"].startswith("#cloud-config")
    # nothing left: no VM registered, no run dir; the template (its VDI made once) untouched
    assert doc["vms"] == {}
    assert sorted(p.name for p in root.iterdir()) == ["job", "log"]
    assert hashlib.sha256(template.read_bytes()).hexdigest() == before
    assert Path(att["0"]["medium"]).is_file()
    # a second job reuses the template's VDI: one convertfromraw fewer
    running = ex.start(spec)
    guest = threading.Thread(target=lambda: play_guest(hv, hv.wait_started(), tmp_path, 7))
    guest.start()
    out = running.wait(120)
    guest.join()
    assert (out.status, out.return_code) == ("COMPLETED", 7)
    assert hv.calls()[len(calls):len(calls) + 2] == ["convertfromraw", "createvm"]


def test_wall_clock_and_stop_power_the_vm_off(hv: Hypervisor, template: Path, root: Path, tmp_path: Path) -> None:
    ex = executor(tmp_path)
    vm = VmSpec(disk=template, disk_format="raw")
    running = ex.start(JobSpec(jobdir=root / "job", logdir=root / "log", argv=["sleep", "1000"], wallclock=1,
                               vm=vm))
    hv.wait_started()
    out = running.wait(60)
    assert out.status == "FAILED" and "wall-clock" in out.reason
    after_start = hv.calls()[hv.calls().index("startvm") + 1:]
    assert "controlvm" in after_start and after_start[-1] == "unregistervm" and "clonemedium" not in after_start
    assert hv.load()["vms"] == {} and hv.load().get("refused", []) == []
    n = len(hv.calls())
    running = ex.start(JobSpec(jobdir=root / "job", logdir=root / "log", argv=["sleep", "1000"], vm=vm))
    hv.wait_started()
    running.stop("the volunteer came back")
    out = running.wait(60)
    assert (out.status, out.reason) == ("ABORTED", "the volunteer came back")
    later = hv.calls()[n:]
    assert "controlvm" in later and later[-1] == "unregistervm" and "clonemedium" not in later
    assert hv.load()["vms"] == {} and hv.load().get("refused", []) == []
    assert sorted(p.name for p in root.iterdir()) == ["job", "log"]


def test_listen_ports_need_nat_which_the_worker_must_allow(hv: Hypervisor, template: Path, root: Path,
                                                          tmp_path: Path) -> None:
    vm = VmSpec(disk=template, disk_format="raw", listen_ports=[22])
    spec = JobSpec(jobdir=root / "job", logdir=root / "log", argv=["sleep", "1000"], vm=vm)
    with pytest.raises(ExecutorError, match="NAT"):
        executor(tmp_path).start(spec)
    running = executor(tmp_path, allow_nat=True).start(spec)
    name = hv.wait_started()
    settings = hv.load()["vms"][name]["settings"]
    running.stop("done")
    running.wait(60)
    assert settings["--nic1"] == ["nat"] and settings["--nat-localhostreachable1"] == ["off"]
    assert settings["--nat-pf1"] == [f"xw22,tcp,127.0.0.1,{running.host_ports[22]},,22"]


def test_what_virtualbox_cannot_do_is_refused(tmp_path: Path, template: Path, root: Path) -> None:
    ex = executor(tmp_path)
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"k")
    for vm, why in ((VmSpec(kernel=kernel, disk=template, disk_format="raw"), "direct kernel boot"),
                    (VmSpec(disk=template, disk_format="qcow2"), "not qcow2"),
                    (VmSpec(disk=tmp_path / "missing.vdi", disk_format="vdi"), "does not exist")):
        with pytest.raises(ExecutorError, match=why):
            ex.start(JobSpec(jobdir=root / "job", logdir=root / "log", argv=["true"], vm=vm))


def test_the_recorder_refuses_what_vboxmanage_refuses(hv: Hypervisor, tmp_path: Path) -> None:
    """The contract is only as good as the recorder's strictness: calls the manual does not allow fail."""
    def vbox(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(FAKE), "-q", *args], capture_output=True, text=True, check=False)

    assert vbox("createvm", "--name", "t", "--basefolder", str(tmp_path / "vms"), "--register").returncode == 0
    bad = [
        ["modifyvm", "t", "--memroy", "512"],  # a typo
        ["modifyvm", "t", "--nic1", "natted"],  # not a NIC type
        ["modifyvm", "t", "--cpus", "2"],  # without an IO APIC
        ["modifyvm", "t", "--nat-pf1", "ssh,tcp,,2222,,22"],  # NIC 1 is not NAT
        ["storagectl", "t", "--name", "S", "--add", "sata", "--portcount", "31"],
        ["storageattach", "t", "--storagectl", "nope", "--port", "0", "--type", "hdd", "--medium", "/x.vdi"],
        ["startvm", "t", "--type", "invisible"],
        ["controlvm", "t", "poweroff"],  # not running
        ["showvminfo", "other"],
        ["frobnicate"],
    ]
    for args in bad:
        proc = vbox(*args)
        assert proc.returncode == 1 and proc.stderr.startswith("VBoxManage: error: "), (args, proc.stderr)
    assert vbox("storagectl", "t", "--name", "S", "--add", "sata", "--portcount", "1").returncode == 0
    disk = tmp_path / "d.vdi"
    disk.write_bytes(b"x")
    assert vbox("storageattach", "t", "--storagectl", "S", "--port", "1", "--device", "0", "--type", "hdd",
                "--medium", str(disk)).returncode == 1  # port 1 of a 1-port controller
    assert vbox("storageattach", "t", "--storagectl", "S", "--port", "0", "--device", "0", "--type", "hdd",
                "--medium", str(disk)).returncode == 0
    assert vbox("startvm", "t", "--type", "headless").returncode == 0
    hv.wait_started()
    assert vbox("modifyvm", "t", "--memory", "256").returncode == 1  # running: not mutable
    assert vbox("unregistervm", "t", "--delete").returncode == 1  # running: locked
    assert vbox("controlvm", "t", "poweroff").returncode == 0
    assert vbox("unregistervm", "t", "--delete").returncode == 0
    assert not disk.exists() and hv.load()["vms"] == {}
