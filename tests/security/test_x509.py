"""X.509 login (DESIGN §6): certificates from the server's CA, RFC 3820 proxies, revocation, delegated registration.

The end-to-end tests run real server processes and use the real commands (``xw ca …``, ``xw x509 proxy-init``)
as subprocesses, and the SDK as a user or a worker would. The chain rules of RFC 3820 are also checked directly
on :func:`xwhep.server.x509.verify_chain`, one forged certificate per rule, since a real client never sends them.
"""

from __future__ import annotations

import base64
import datetime as dt
import os
import shutil
import ssl
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from cluster import ServerProc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from xwhep.client import Client, XwError
from xwhep.client.x509 import load_credentials, make_proxy, proxy_pem, sign
from xwhep.core.proxycert import (
    PPL_INDEPENDENT,
    PPL_INHERIT_ALL,
    PPL_LIMITED,
    ProxyCertInfo,
    login_message,
    proxy_cert_info,
)
from xwhep.server import pki
from xwhep.server.x509 import NonceStore, RevocationList, X509Refused, verify_chain

CA_CLI = "from xwhep.server.ca_cli import app; app()"
X509_CLI = "from xwhep.client.x509 import app; app()"


# --- helpers ---------------------------------------------------------------------------------------------------------

def run(code: str, *args: str | Path, env: dict[str, str] | None = None, ok: bool = True) -> str:
    """Run one of our Typer apps as a command; return its output (stdout + stderr)."""
    proc = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True,
                          timeout=60, env={**os.environ, **(env or {})})
    out = proc.stdout + proc.stderr
    assert (proc.returncode == 0) == ok, f"exit {proc.returncode}: {out}"
    return out


@dataclass
class Issued:
    cert: Path
    key: Path
    serial: str
    dn: str


def issue(home: Path, out: Path, cn: str, kind: str = "user") -> Issued:
    """``xw ca issue``; the serial and DN come from what it prints."""
    cert, key = out / f"{cn}-{kind}.pem", out / f"{cn}-{kind}.key"
    text = run(CA_CLI, "issue", "--home", home, "--cn", cn, "--kind", kind, "--out-cert", cert, "--out-key", key)
    fields = dict(line.split(" ", 1) for line in text.splitlines() if " " in line)
    assert fields["dn"] == pki.subject_dn(cert)
    return Issued(cert, key, fields["serial"], fields["dn"])


def proxy_init(cert: Path, out: Path, *extra: str, key: Path | None = None, ok: bool = True) -> str:
    args: list[str | Path] = ["proxy-init", "--cert", cert, "--out", out, *extra]
    if key is not None:
        args += ["--key", key]
    return run(X509_CLI, *args, ok=ok)


def create_user(admin: Client, login: str, level: str, dn: str) -> dict[str, Any]:
    return admin._json("POST", "/users", json={"login": login, "level": level, "x509_dn": dn})  # type: ignore


def cert_client(srv: ServerProc, issued: Issued) -> Client:
    return Client(srv.url, ca=str(srv.ca), cert=str(issued.cert), key=str(issued.key))


def actions(admin: Client) -> list[dict[str, Any]]:
    return [e for e in admin.events(limit=200) if e["action"].startswith("auth.x509")]


def http(srv: ServerProc) -> httpx.Client:
    return httpx.Client(base_url=srv.url + "/api/v1", verify=ssl.create_default_context(cafile=str(srv.ca)),
                        timeout=30)


def raw_login(h: httpx.Client, chain: list[x509.Certificate], key: Any, audience: str = "127.0.0.1",
              nonce: str | None = None, signed_nonce: str | None = None) -> httpx.Response:
    """The login protocol by hand, so that a test can change any part of it."""
    nonce = nonce or h.post("/auth/x509/challenge").json()["nonce"]
    sig = sign(key, login_message(audience, signed_nonce or nonce))
    return h.post("/auth/x509", json={
        "chain": [c.public_bytes(serialization.Encoding.PEM).decode() for c in chain], "nonce": nonce,
        "audience": audience, "signature": base64.b64encode(sig).decode()})


@pytest.fixture
def server_with(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., ServerProc]]:
    """Start a server whose HOME/server.toml holds ``settings`` before the first start."""
    started: list[ServerProc] = []

    def start(settings: str = "", args: list[str] | None = None) -> ServerProc:
        home = tmp_path_factory.mktemp("server")
        if settings:
            (home / "server.toml").write_text(settings)
        srv = ServerProc(home=home, args=args or []).start()
        started.append(srv)
        return srv

    yield start
    for srv in started:
        srv.stop()


@pytest.fixture(autouse=True)
def _no_ambient_proxy(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A grid proxy of the machine's user must not leak into these tests (nor theirs into it)."""
    monkeypatch.setenv("X509_USER_PROXY", str(tmp_path / "no-proxy-here"))


# --- end to end ------------------------------------------------------------------------------------------------------

def test_certificate_and_proxy_login_then_revocation_ends_everything(
        server_with: Callable[..., ServerProc], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    srv = server_with()
    admin = srv.client()
    alice = issue(srv.home, tmp_path, "alice")
    user = create_user(admin, "alice", "STANDARD_USER", alice.dn)

    # a user certificate (client config keys cert + key) logs in and acts as alice
    c = cert_client(srv, alice)
    me = c.me()
    assert (me["uid"], me["login"], me["x509_dn"]) == (user["uid"], "alice", "CN=alice,OU=user,O=xwhep")
    token_from_cert = c._token
    assert token_from_cert

    # a proxy made by proxy-init, found through X509_USER_PROXY by a client configured with nothing else
    proxy = tmp_path / "x509up_alice"
    out = proxy_init(alice.cert, proxy, key=alice.key)
    assert "Your identity: CN=alice,OU=user,O=xwhep" in out
    assert proxy.stat().st_mode & 0o777 == 0o600
    monkeypatch.setenv("X509_USER_PROXY", str(proxy))
    p = Client(srv.url, ca=str(srv.ca))
    assert p.me()["uid"] == user["uid"]
    token_from_proxy = p._token

    # a proxy of the proxy (delegated once more) carries the same identity
    proxy2 = tmp_path / "x509up_alice_2"
    proxy_init(proxy, proxy2)
    chain, key = load_credentials(proxy2)
    assert len(chain) == 3 and proxy_cert_info(chain[0]) is not None
    with http(srv) as h:
        r = raw_login(h, chain, key)
    assert r.status_code == 200, r.text
    assert r.json()["user"] == user["uid"] and r.json()["dn"] == alice.dn

    details = [e["detail"] for e in actions(admin) if e["action"] == "auth.x509"]
    assert any("via 1 proxy" in d for d in details) and any("via 2 proxies" in d for d in details)
    assert all(alice.serial[2:] in d for d in details)

    # revocation: a token obtained earlier is refused at once (no re-login, no waiting for its expiry) ...
    out = run(CA_CLI, "revoke", "--home", srv.home, "--cert", alice.cert)
    assert f"revoked {alice.serial}" in out and "CN=alice" in out
    assert alice.serial in run(CA_CLI, "crl", "--home", srv.home)
    with http(srv) as h:
        for token in (token_from_cert, token_from_proxy):
            r = h.get("/me", headers={"Authorization": f"Bearer {token}"})
            assert r.status_code == 401 and "revoked" in r.json()["error"]
        # ... and so is a new login, with the certificate or any proxy of it
        r = raw_login(h, *load_credentials(proxy2))
        assert r.status_code == 401 and "revoked" in r.json()["error"]
    for client in (c, p, cert_client(srv, alice)):
        with pytest.raises(XwError) as err:
            client.me()
        assert err.value.status == 401 and "revoked" in err.value.message
    assert any("revoked" in e["detail"] for e in actions(admin) if e["action"] == "auth.x509.failed")

    # another user's certificate is not affected
    bob = issue(srv.home, tmp_path, "bob")
    create_user(admin, "bob", "STANDARD_USER", bob.dn)
    assert cert_client(srv, bob).me()["login"] == "bob"


def test_unknown_certificate_is_refused_without_delegated_registration(
        server_with: Callable[..., ServerProc], tmp_path: Path) -> None:
    srv = server_with()
    carol = issue(srv.home, tmp_path, "carol")
    with pytest.raises(XwError) as err:
        cert_client(srv, carol).me()
    assert err.value.status == 401 and "no user is bound to CN=carol,OU=user,O=xwhep" in err.value.message
    admin = srv.client()
    assert "carol" not in {u["login"] for u in admin.users()}
    failed = [e["detail"] for e in actions(admin) if e["action"] == "auth.x509.failed"]
    assert any("delegated registration is off" in d for d in failed)

    # an administrator binding the DN (OpenSSL's /O=…/OU=…/CN=… spelling works too) lets the same cert in
    create_user(admin, "carol", "STANDARD_USER", "/O=xwhep/OU=user/CN=carol")
    assert cert_client(srv, carol).me()["login"] == "carol"


def test_delegated_registration_creates_standard_and_worker_users(
        server_with: Callable[..., ServerProc], tmp_path: Path) -> None:
    srv = server_with("delegated_registration = true\n")
    admin = srv.client()
    admin.create_user("dave", "a password of dave", "STANDARD_USER")  # takes the login "dave"

    dave = issue(srv.home, tmp_path, "dave")
    me = cert_client(srv, dave).me()
    assert me["level"] == "STANDARD_USER" and me["login"] == "dave-2" and me["x509_dn"] == dave.dn
    # the next login finds the same user (no second registration)
    assert cert_client(srv, dave).me()["uid"] == me["uid"]

    # a worker certificate (OU=worker) becomes a WORKER_USER, and works the worker protocol
    w = issue(srv.home, tmp_path, "node-17", kind="worker")
    wc = cert_client(srv, w)
    assert (wc.me()["level"], wc.me()["login"]) == ("WORKER_USER", "node-17")
    host = wc.register_host({"name": "node-17", "os": "linux", "cpu": "x86_64", "cores": 1})
    assert host["owner"] == wc.me()["uid"]
    assert wc.host_client(host).request_works(host["uid"], max=1, wait=0) == []

    registered = [e["detail"] for e in actions(admin) if e["action"] == "auth.x509.register"]
    assert any("CN=dave" in d and "dave-2 (STANDARD_USER)" in d for d in registered)
    assert any("CN=node-17,OU=worker" in d and "WORKER_USER" in d for d in registered)
    assert len(registered) == 2


def test_foreign_ca_forged_signature_replay_and_wrong_host_are_refused(
        server_with: Callable[..., ServerProc], tmp_path: Path) -> None:
    srv = server_with("delegated_registration = true\n")  # even then, none of these may register anyone
    alice = issue(srv.home, tmp_path, "alice")
    create_user(srv.client(), "alice", "STANDARD_USER", alice.dn)
    chain, key = load_credentials(alice.cert, alice.key)
    with http(srv) as h:
        # the same DN from another CA
        other = tmp_path / "other-ca"
        ca_pem, ca_key = pki.create_ca(other, "xwhep CA")  # even the CA's name is the same
        pki.issue_client_cert(ca_pem, ca_key, other / "a.pem", other / "a.key", "alice")
        r = raw_login(h, *load_credentials(other / "a.pem", other / "a.key"))
        assert r.status_code == 401 and "not issued by this server's CA" in r.json()["error"]

        # the right certificate, a signature made with another key
        r = raw_login(h, chain, ec.generate_private_key(ec.SECP256R1()))
        assert r.status_code == 401 and "signature does not verify" in r.json()["error"]

        # a signature over another nonce than the one presented
        other_nonce = h.post("/auth/x509/challenge").json()["nonce"]
        r = raw_login(h, chain, key, signed_nonce=other_nonce)
        assert r.status_code == 401 and "signature does not verify" in r.json()["error"]

        # a good login, replayed
        nonce = h.post("/auth/x509/challenge").json()["nonce"]
        sig = base64.b64encode(sign(key, login_message("127.0.0.1", nonce))).decode()
        body = {"chain": [alice.cert.read_text()], "nonce": nonce, "audience": "127.0.0.1", "signature": sig}
        assert h.post("/auth/x509", json=body).status_code == 200
        r = h.post("/auth/x509", json=body)
        assert r.status_code == 401 and "already used nonce" in r.json()["error"]

        # a nonce the server never issued
        r = raw_login(h, chain, key, nonce="A" * 54)
        assert r.status_code == 401 and "nonce" in r.json()["error"]

        # signed for another server (what a rogue server relaying our challenge would obtain)
        r = raw_login(h, chain, key, audience="evil.example.org")
        assert r.status_code == 401 and "not one of this server's names" in r.json()["error"]

        # the server's own TLS certificate (same CA, no clientAuth usage) is no login
        server_key = serialization.load_pem_private_key((srv.home / "pki" / "server.key").read_bytes(), None)
        r = raw_login(h, [pki.load_cert(srv.home / "pki" / "server.pem")], server_key)
        assert r.status_code == 401 and "not for client authentication" in r.json()["error"]

        # a legacy (pre-RFC 3820) Globus proxy is refused with a reason
        legacy, legacy_key = forge_proxy(chain[0], key, cn="proxy", info=None)
        r = raw_login(h, [legacy, chain[0]], legacy_key)
        assert r.status_code == 401 and "GT2 legacy proxy" in r.json()["error"]
    users = {u["login"] for u in srv.client().users()}
    assert users == {"admin", "worker", "alice"}


def test_proxy_path_length_is_enforced_end_to_end(server_with: Callable[..., ServerProc], tmp_path: Path) -> None:
    srv = server_with()
    alice = issue(srv.home, tmp_path, "alice")
    create_user(srv.client(), "alice", "STANDARD_USER", alice.dn)
    p0 = tmp_path / "p0"
    proxy_init(alice.cert, p0, "--path-length", "0", "--hours", "1", key=alice.key)
    p1 = tmp_path / "p1"
    proxy_init(p0, p1)
    assert "path length 0" in run(X509_CLI, "proxy-info", "--file", p0)
    with http(srv) as h:
        r = raw_login(h, *load_credentials(p0))
        assert r.status_code == 200 and r.json()["expires_in"] <= 3600
        r = raw_login(h, *load_credentials(p1))
        assert r.status_code == 401 and "allows 0 proxies under it" in r.json()["error"]


@pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap is not installed")
@pytest.mark.timeout(120)
def test_real_worker_daemon_authenticates_with_a_worker_certificate(
        server_with: Callable[..., ServerProc], tmp_path: Path) -> None:
    from sdkworker import wait_status
    from workerproc import WorkerProc, toml_sections

    srv = server_with(args=["--alive-period", "0.5", "--alive-timeout", "5"])
    admin = srv.client()
    w = issue(srv.home, tmp_path, "node-1", kind="worker")
    worker_user = create_user(admin, "node-1", "WORKER_USER", w.dn)

    class CertWorker(WorkerProc):
        def write_config(self) -> Path:  # no login, no password: the certificate only
            self.root.mkdir(parents=True, exist_ok=True)
            self.config.write_text(f'server = "{srv.url}"\nca = "{srv.ca}"\ncert = "{w.cert}"\nkey = "{w.key}"\n'
                                   + toml_sections({"worker": {"long_poll_s": 2.0}}))
            return self.config

    worker = CertWorker(srv, tmp_path / "worker").start()
    try:
        st = worker.wait_status(lambda s: bool(s.get("host")), 30, "the worker to register")
        app = tmp_path / "hello.bin"
        app.write_text("#!/bin/sh\necho hello > result.txt\n")
        app.chmod(0o755)
        admin.put_app("hello", binaries={"linux/x86_64": app})
        uid = admin.submit("hello", expected_host=st["host"])["uid"]
        wait_status(admin, uid, {"COMPLETED", "ERROR", "FAILED"}, 60)
        assert admin.work(uid)["status"] == "COMPLETED"
        hosts = {h["uid"]: h for h in admin.hosts()}
        assert hosts[st["host"]]["owner"] == worker_user["uid"]
    finally:
        worker.stop()
    assert any(e["actor"] == worker_user["uid"] for e in actions(admin) if e["action"] == "auth.x509")


def test_ca_commands(tmp_path: Path) -> None:
    home = tmp_path / "home"
    first = run(CA_CLI, "init", "--home", home)
    assert run(CA_CLI, "init", "--home", home) == first  # idempotent: the same CA
    a = issue(home, tmp_path, "alice")
    run(CA_CLI, "issue", "--home", home, "--cn", "alice", "--out-cert", a.cert, "--out-key", a.key, ok=False)
    w = issue(home, tmp_path, "w1", kind="worker")
    assert w.dn == "CN=w1,OU=worker,O=xwhep"
    assert "no certificate revoked" in run(CA_CLI, "crl", "--home", home)
    run(CA_CLI, "revoke", "--home", home, "--serial", w.serial)
    assert pki.crl_serials((home / "pki" / "crl.pem").read_bytes()) == {int(w.serial, 16)}
    shown = run(CA_CLI, "show", "--home", home)
    assert "2 client certificate(s), 1 revoked" in shown and f"{w.serial}  worker  revoked" in shown
    foreign = tmp_path / "foreign"
    ca_pem, ca_key = pki.create_ca(foreign)
    pki.issue_client_cert(ca_pem, ca_key, foreign / "x.pem", foreign / "x.key", "x")
    assert "not issued by this CA" in run(CA_CLI, "revoke", "--home", home, "--cert", foreign / "x.pem", ok=False)
    assert "no CA in" in run(CA_CLI, "show", "--home", tmp_path / "nothing", ok=False)


# --- the chain rules, one forged certificate each ---------------------------------------------------------------------

@dataclass
class Pki:
    ca: x509.Certificate
    ee: x509.Certificate
    ee_key: Any
    dir: Path

    def pems(self, *certs: x509.Certificate) -> list[str]:
        return [c.public_bytes(serialization.Encoding.PEM).decode() for c in certs]


@pytest.fixture
def local_pki(tmp_path: Path) -> Pki:
    ca_pem, ca_key = pki.create_ca(tmp_path)
    ee = pki.issue_client_cert(ca_pem, ca_key, tmp_path / "u.pem", tmp_path / "u.key", "alice")
    return Pki(pki.load_cert(ca_pem), ee, pki.load_key(tmp_path / "u.key"), tmp_path)


def forge_proxy(issuer: x509.Certificate, issuer_key: Any, *, cn: str = "4242",
                info: ProxyCertInfo | None = ProxyCertInfo(None, PPL_INHERIT_ALL),
                subject: x509.Name | None = None, hours: float = 1.0, not_after: dt.datetime | None = None,
                usage: x509.KeyUsage | None = None, extra: list[x509.ExtensionType] | None = None,
                signer: Any = None) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A proxy of ``issuer`` with any one rule broken."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    name = subject or x509.Name([*issuer.subject.rdns,
                                 x509.RelativeDistinguishedName([x509.NameAttribute(NameOID.COMMON_NAME, cn)])])
    b = (x509.CertificateBuilder().subject_name(name).issuer_name(issuer.subject).public_key(key.public_key())
         .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=1))
         .not_valid_after(not_after or now + dt.timedelta(hours=hours)))
    if info is not None:
        b = b.add_extension(info.extension(), critical=True)
    if usage is not None:
        b = b.add_extension(usage, critical=True)
    for ext in extra or []:
        b = b.add_extension(ext, critical=False)
    return b.sign(signer or issuer_key, hashes.SHA256()), key


def _usage(**on: bool) -> x509.KeyUsage:
    flags = dict.fromkeys(("digital_signature", "content_commitment", "key_encipherment", "data_encipherment",
                           "key_agreement", "key_cert_sign", "crl_sign", "encipher_only", "decipher_only"), False)
    return x509.KeyUsage(**{**flags, **on})


def test_valid_chains_are_accepted(local_pki: Pki) -> None:
    p = local_pki
    assert verify_chain(p.pems(p.ee), p.ca).dn == "CN=alice,OU=user,O=xwhep"
    proxy, key = make_proxy([p.ee], p.ee_key, hours=2)
    v = verify_chain(p.pems(proxy, p.ee, p.ca), p.ca)  # a trailing copy of the CA is tolerated
    assert (v.dn, v.proxies, v.leaf, v.kind) == (p.ee.subject.rfc4514_string(), 1, proxy, "user")
    assert v.not_after == proxy.not_valid_after_utc
    assert v.dn_forms[1] == "/O=xwhep/OU=user/CN=alice"
    pp, _ = make_proxy([proxy, p.ee], key, hours=1)
    assert verify_chain(p.pems(pp, proxy, p.ee), p.ca).proxies == 2


@pytest.mark.parametrize("case, reason", [
    ("no_proxy_cert_info", "is neither an RFC 3820 proxy"),
    ("legacy_gt2", "GT2 legacy proxy"),
    ("subject_not_extended", "is not its issuer's subject plus one CN"),
    ("extended_by_two", "is not its issuer's subject plus one CN"),
    ("signed_by_other_key", "is not signed by"),
    ("outlives_issuer", "outlives the certificate that issued it"),
    ("expired", "expired on"),
    ("limited", "limited proxies"),
    ("independent", "independent proxies"),
    ("unknown_language", "is not supported"),
    ("key_cert_sign", "keyCertSign"),
    ("san", "SubjectAlternativeName"),
    ("server_auth_only", "restricted to other uses"),
    ("malformed_info", "malformed ProxyCertInfo"),
    ("too_deep", "at most 4 proxy certificates"),
    ("only_proxy", "chain ends with a proxy certificate"),
    ("ee_expired", "expired on"),
    ("ee_not_client", "not for client authentication"),
])
def test_broken_chains_are_refused(local_pki: Pki, case: str, reason: str) -> None:
    p = local_pki
    now = dt.datetime.now(dt.UTC)
    ee, ee_key = p.ee, p.ee_key
    forged: dict[str, Callable[[], list[x509.Certificate]]] = {
        "no_proxy_cert_info": lambda: [forge_proxy(ee, ee_key, info=None)[0], ee],
        "legacy_gt2": lambda: [forge_proxy(ee, ee_key, cn="limited proxy", info=None)[0], ee],
        "subject_not_extended": lambda: [forge_proxy(ee, ee_key, subject=x509.Name(
            [x509.NameAttribute(NameOID.COMMON_NAME, "mallory")]))[0], ee],
        "extended_by_two": lambda: [forge_proxy(ee, ee_key, subject=x509.Name([
            *ee.subject.rdns, x509.RelativeDistinguishedName([x509.NameAttribute(NameOID.COMMON_NAME, "1")]),
            x509.RelativeDistinguishedName([x509.NameAttribute(NameOID.COMMON_NAME, "2")])]))[0], ee],
        "signed_by_other_key": lambda: [forge_proxy(ee, ee_key, signer=ec.generate_private_key(ec.SECP256R1()))[0],
                                        ee],
        "outlives_issuer": lambda: [forge_proxy(ee, ee_key, not_after=ee.not_valid_after_utc
                                                + dt.timedelta(days=1))[0], ee],
        "expired": lambda: [forge_proxy(ee, ee_key, not_after=now - dt.timedelta(seconds=1))[0], ee],
        "limited": lambda: [forge_proxy(ee, ee_key, info=ProxyCertInfo(None, PPL_LIMITED))[0], ee],
        "independent": lambda: [forge_proxy(ee, ee_key, info=ProxyCertInfo(None, PPL_INDEPENDENT))[0], ee],
        "unknown_language": lambda: [forge_proxy(ee, ee_key, info=ProxyCertInfo(None, "1.2.3.4"))[0], ee],
        "key_cert_sign": lambda: [forge_proxy(ee, ee_key, usage=_usage(digital_signature=True,
                                                                       key_cert_sign=True))[0], ee],
        "san": lambda: [forge_proxy(ee, ee_key, extra=[x509.SubjectAlternativeName(
            [x509.DNSName("x.example")])])[0], ee],
        "server_auth_only": lambda: [forge_proxy(ee, ee_key, extra=[x509.ExtendedKeyUsage(
            [ExtendedKeyUsageOID.SERVER_AUTH])])[0], ee],
        "malformed_info": lambda: [_with_raw_info(ee, ee_key, b"\x30\x03\x02\x01\x00"), ee],
        "too_deep": lambda: _deep(ee, ee_key, 5),
        "only_proxy": lambda: [forge_proxy(ee, ee_key)[0]],
        "ee_expired": lambda: [_client_cert(p, days=-1)],
        "ee_not_client": lambda: [_client_cert(p, eku=ExtendedKeyUsageOID.SERVER_AUTH)],
    }
    with pytest.raises(X509Refused, match=reason.replace("(", r"\(")):
        verify_chain(p.pems(*forged[case]()), p.ca)


def _with_raw_info(issuer: x509.Certificate, key: Any, der: bytes) -> x509.Certificate:
    proxy, _ = forge_proxy(issuer, key, info=None, extra=[x509.UnrecognizedExtension(
        x509.ObjectIdentifier("1.3.6.1.5.5.7.1.14"), der)])
    return proxy


def _deep(ee: x509.Certificate, key: Any, n: int) -> list[x509.Certificate]:
    chain = [ee]
    for i in range(n):
        proxy, key = forge_proxy(chain[0], key, cn=str(i + 1))
        chain.insert(0, proxy)
    return chain


def _client_cert(p: Pki, days: int = 30, eku: x509.ObjectIdentifier = ExtendedKeyUsageOID.CLIENT_AUTH
                 ) -> x509.Certificate:
    """A client certificate from the test CA with a chosen validity and extended key usage."""
    ca_key = pki.load_key(p.dir / "ca.key")
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    start, end = (now - dt.timedelta(days=2), now - dt.timedelta(days=1)) if days < 0 else \
        (now - dt.timedelta(hours=1), now + dt.timedelta(days=days))
    return (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "z")]))
            .issuer_name(p.ca.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(end)
            .add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
            .sign(ca_key, hashes.SHA256()))


def test_revocation_list_follows_the_file_and_fails_closed(local_pki: Pki, tmp_path: Path) -> None:
    p = local_pki
    crl = p.dir / "crl.pem"
    rl = RevocationList(crl, p.dir / "ca.pem")
    assert not rl.is_revoked(p.ee.serial_number)
    pki.revoke(p.dir / "ca.pem", p.dir / "ca.key", crl, 12345)
    assert rl.is_revoked(12345) and not rl.is_revoked(p.ee.serial_number)
    pki.revoke(p.dir / "ca.pem", p.dir / "ca.key", crl, p.ee.serial_number)  # within the same second: still seen
    assert rl.is_revoked(p.ee.serial_number)
    with pytest.raises(X509Refused, match="is revoked"):
        verify_chain(p.pems(p.ee), p.ca, rl)
    # a CRL not signed by the CA (same issuer name, another key): every certificate is refused
    other = tmp_path / "other"
    pki.create_ca(other)
    crl.write_bytes(pki.build_crl(other / "ca.pem", other / "ca.key", []))
    assert rl.is_revoked(1) and rl.problem is not None
    with pytest.raises(X509Refused, match="CRL is unusable"):
        verify_chain(p.pems(p.ee), p.ca, rl)
    crl.unlink()
    assert not rl.is_revoked(1)


def test_nonces_are_single_use_bounded_and_unforgeable() -> None:
    store = NonceStore(b"s" * 32, ttl=60, max_used=2)
    a = store.issue(now=1000.0)
    assert a and store.consume(a, now=1001.0) and not store.consume(a, now=1002.0)
    b = store.issue(now=1000.0)
    assert b and not store.consume(b, now=1061.0)  # expired
    assert not NonceStore(b"t" * 32).consume(store.issue(now=1000.0) or "", now=1001.0)  # another server's
    forged = bytearray(base64.urlsafe_b64decode((store.issue(now=1000.0) or "") + "=="))
    forged[0:8] = (10**9).to_bytes(8, "big")  # push the expiry out: the MAC no longer matches
    assert not store.consume(base64.urlsafe_b64encode(bytes(forged)).decode().rstrip("="), now=1001.0)
    c = store.issue(now=1000.0)
    assert c and store.consume(c, now=1001.0)
    assert store.issue(now=1002.0) is None  # two live consumed nonces: no more until they expire
    assert store.issue(now=1061.0) is not None


def test_proxy_interoperates_with_openssl(local_pki: Pki) -> None:
    """OpenSSL's proxy support accepts our proxies, and we accept an OpenSSL-made one (path length included)."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    p = local_pki
    proxy, key = make_proxy([p.ee], p.ee_key, hours=1)
    (p.dir / "proxy.pem").write_bytes(proxy_pem(proxy, key, [p.ee]))
    out = subprocess.run(["openssl", "verify", "-allow_proxy_certs", "-CAfile", p.dir / "ca.pem", "-untrusted",
                          p.dir / "u.pem", p.dir / "proxy.pem"], capture_output=True, text=True)
    assert out.returncode == 0 and "OK" in out.stdout, out.stdout + out.stderr

    (p.dir / "ext.cnf").write_text("[proxy]\nproxyCertInfo=critical,language:id-ppl-inheritAll,pathlen:1\n"
                                   "keyUsage=critical,digitalSignature\n")
    subprocess.run(["openssl", "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                    "-keyout", p.dir / "o.key", "-out", p.dir / "o.csr", "-subj", "/O=xwhep/OU=user/CN=alice/CN=777"],
                   check=True, capture_output=True)
    subprocess.run(["openssl", "x509", "-req", "-in", p.dir / "o.csr", "-CA", p.dir / "u.pem", "-CAkey",
                    p.dir / "u.key", "-set_serial", "777", "-days", "1", "-extfile", p.dir / "ext.cnf",
                    "-extensions", "proxy", "-out", p.dir / "o.pem"], check=True, capture_output=True)
    theirs = pki.load_cert(p.dir / "o.pem")
    assert proxy_cert_info(theirs) == ProxyCertInfo(1, PPL_INHERIT_ALL)
    assert verify_chain(p.pems(theirs, p.ee), p.ca).proxies == 1
