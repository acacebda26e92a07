"""The built-in PKI, proven with real TLS handshakes over loopback (Python's ssl, i.e. OpenSSL)."""

from __future__ import annotations

import socket
import ssl
import stat
import threading
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from xwhep.server import pki
from xwhep.server.pki import (
    PkiError,
    build_crl,
    create_ca,
    crl_serials,
    fingerprint,
    issue_client_cert,
    issue_server_cert,
    load_cert,
    load_or_init_server_pki,
    revoke,
    subject_dn,
)


def _client_context(ca_pem: Path, cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca_pem))  # trusts only our CA
    assert ctx.check_hostname
    assert ctx.verify_mode == ssl.CERT_REQUIRED
    # what Python ≥3.13 turns on by default: our certificates must pass it already
    ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    if cert and key:
        ctx.load_cert_chain(str(cert), str(key))
    return ctx


def _server_context(cert: Path, key: Path, client_ca: Path | None = None, crl: Path | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(str(cert), str(key))
    if client_ca:
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(str(client_ca))
        ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    if crl:
        ctx.load_verify_locations(str(crl))
        ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
    return ctx


class Exchange:
    """What both ends saw in one connection."""

    def __init__(self) -> None:
        self.server_error: BaseException | None = None
        self.client_error: BaseException | None = None
        self.client_cert: dict[str, Any] | None = None
        self.server_cert: dict[str, Any] | None = None
        self.reply = b""


def _exchange(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext, server_hostname: str) -> Exchange:
    """One TLS connection over 127.0.0.1: the client says ping, the server answers pong.

    Failures are recorded, not raised, so that a test can look at both ends.
    """
    out = Exchange()
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(10)
    port = listener.getsockname()[1]

    def serve() -> None:
        try:
            conn, _ = listener.accept()
            conn.settimeout(10)
            with server_ctx.wrap_socket(conn, server_side=True) as tls:
                out.client_cert = tls.getpeercert()
                if tls.recv(4) == b"ping":
                    tls.sendall(b"pong")
        except BaseException as exc:
            out.server_error = exc

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
                client_ctx.wrap_socket(raw, server_hostname=server_hostname) as tls:
            out.server_cert = tls.getpeercert()
            tls.sendall(b"ping")
            out.reply = tls.recv(4)
    except (ssl.SSLError, OSError) as exc:
        out.client_error = exc
    finally:
        thread.join(10)
        listener.close()
    return out


@pytest.fixture
def server(tmp_path: Path) -> pki.ServerPki:
    return load_or_init_server_pki(tmp_path, ["localhost", "xw.example.org"], ["127.0.0.1", "::1"])


# --- the CA --------------------------------------------------------------------------------------------------------


def test_create_ca(tmp_path: Path) -> None:
    ca_pem, ca_key = create_ca(tmp_path / "ca", cn="Test CA")
    assert stat.S_IMODE(ca_key.stat().st_mode) == 0o600
    cert = load_cert(ca_pem)
    assert cert.subject == cert.issuer
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "Test CA"
    bc = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.key_cert_sign and ku.crl_sign
    years = (cert.not_valid_after_utc - cert.not_valid_before_utc).days / 365
    assert 9.9 < years < 10.1
    cert.verify_directly_issued_by(cert)


# --- server certificates and TLS -----------------------------------------------------------------------------------


def test_server_files_and_modes(server: pki.ServerPki) -> None:
    d = server.ca_pem.parent
    assert d.name == "pki"
    assert {p.name for p in d.iterdir()} >= {"ca.pem", "ca.key", "server.pem", "server.key"}
    for key in (server.key, server.ca_key):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert stat.S_IMODE(d.stat().st_mode) == 0o700


def test_server_cert_contents(server: pki.ServerPki) -> None:
    cert = load_cert(server.cert)
    cert.verify_directly_issued_by(load_cert(server.ca_pem))
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {"localhost", "xw.example.org"}
    assert {str(a) for a in san.get_values_for_type(x509.IPAddress)} == {"127.0.0.1", "::1"}
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    days = (cert.not_valid_after_utc - cert.not_valid_before_utc).days
    assert 729 <= days <= 731


@pytest.mark.parametrize("name", ["localhost", "127.0.0.1"])
def test_tls_handshake_checks_hostname(server: pki.ServerPki, name: str) -> None:
    out = _exchange(_server_context(server.cert, server.key), _client_context(server.ca_pem), name)
    assert out.client_error is None
    assert out.server_error is None
    assert out.reply == b"pong"
    assert out.server_cert is not None
    assert ("DNS", "localhost") in out.server_cert["subjectAltName"]


def test_tls_refuses_a_name_not_in_the_certificate(server: pki.ServerPki) -> None:
    out = _exchange(_server_context(server.cert, server.key), _client_context(server.ca_pem), "evil.example.org")
    assert isinstance(out.client_error, ssl.SSLCertVerificationError)
    assert "match" in str(out.client_error)
    assert out.reply == b""


def test_tls_refuses_a_server_from_another_ca(server: pki.ServerPki, tmp_path: Path) -> None:
    other = load_or_init_server_pki(tmp_path / "other", ["localhost"], [])
    out = _exchange(_server_context(other.cert, other.key), _client_context(server.ca_pem), "localhost")
    assert isinstance(out.client_error, ssl.SSLCertVerificationError)
    assert out.reply == b""


def test_ip_given_as_hostname_goes_to_ip_san(tmp_path: Path) -> None:
    p = load_or_init_server_pki(tmp_path, ["127.0.0.1"], [])
    out = _exchange(_server_context(p.cert, p.key), _client_context(p.ca_pem), "127.0.0.1")
    assert out.reply == b"pong"


def test_issue_server_cert_needs_a_name(server: pki.ServerPki, tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        issue_server_cert(server.ca_pem, server.ca_key, tmp_path, [], [])
    with pytest.raises(ValueError):
        issue_server_cert(server.ca_pem, server.ca_key, tmp_path, ["h"], ["not-an-ip"])


# --- client certificates -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["user", "worker"])
def test_client_cert_verified_by_the_ca(server: pki.ServerPki, tmp_path: Path, kind: pki.ClientKind) -> None:
    cert_path, key_path = tmp_path / "c.pem", tmp_path / "c.key"
    cert = issue_client_cert(server.ca_pem, server.ca_key, cert_path, key_path, "alice", kind=kind, days=30)
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    assert subject_dn(cert_path) == subject_dn(cert) == f"CN=alice,OU={kind},O=xwhep"
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert (cert.not_valid_after_utc - cert.not_valid_before_utc).days in (30, 31)

    out = _exchange(_server_context(server.cert, server.key, client_ca=server.ca_pem),
                    _client_context(server.ca_pem, cert_path, key_path), "localhost")
    assert out.server_error is None
    assert out.reply == b"pong"
    assert out.client_cert is not None
    assert ((("commonName", "alice"),) in out.client_cert["subject"])
    assert ((("organizationalUnitName", kind),) in out.client_cert["subject"])


def test_client_cert_from_another_ca_is_refused(server: pki.ServerPki, tmp_path: Path) -> None:
    other_ca, other_key = create_ca(tmp_path / "other")
    issue_client_cert(other_ca, other_key, tmp_path / "c.pem", tmp_path / "c.key", "mallory")
    out = _exchange(_server_context(server.cert, server.key, client_ca=server.ca_pem),
                    _client_context(server.ca_pem, tmp_path / "c.pem", tmp_path / "c.key"), "localhost")
    assert out.reply == b""
    assert isinstance(out.server_error, ssl.SSLCertVerificationError)
    assert out.client_cert is None


def test_client_cert_cannot_serve_as_server_cert(server: pki.ServerPki, tmp_path: Path) -> None:
    cert_path, key_path = tmp_path / "w.pem", tmp_path / "w.key"
    issue_client_cert(server.ca_pem, server.ca_key, cert_path, key_path, "localhost", kind="worker")
    out = _exchange(_server_context(cert_path, key_path), _client_context(server.ca_pem), "localhost")
    assert isinstance(out.client_error, ssl.SSLCertVerificationError)
    assert "purpose" in str(out.client_error)


@pytest.mark.parametrize(("cn", "kind", "days"), [("", "user", 1), ("x" * 65, "user", 1), ("a", "admin", 1),
                                                   ("a", "user", 0)])
def test_client_cert_bad_arguments(server: pki.ServerPki, tmp_path: Path, cn: str, kind: Any, days: int) -> None:
    with pytest.raises(ValueError):
        issue_client_cert(server.ca_pem, server.ca_key, tmp_path / "c.pem", tmp_path / "c.key", cn, kind, days)


# --- reuse ---------------------------------------------------------------------------------------------------------


def test_second_call_reuses_everything(tmp_path: Path) -> None:
    first = load_or_init_server_pki(tmp_path, ["localhost"], ["127.0.0.1"])
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in (first.ca_pem, first.ca_key, first.cert, first.key)}
    fp = fingerprint(first.cert)
    second = load_or_init_server_pki(tmp_path, ["localhost"], ["127.0.0.1"])
    assert second == first
    assert fingerprint(second.cert) == fp
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in before} == before
    # a subset of the names already covered is no reason to re-issue either
    third = load_or_init_server_pki(tmp_path, ["LOCALHOST"], [])
    assert fingerprint(third.cert) == fp


def test_new_hostname_reissues_server_cert_only(tmp_path: Path) -> None:
    first = load_or_init_server_pki(tmp_path, ["localhost"], ["127.0.0.1"])
    ca_fp, server_fp, key = fingerprint(first.ca_pem), fingerprint(first.cert), first.key.read_bytes()
    second = load_or_init_server_pki(tmp_path, ["xw.example.org"], ["10.0.0.1"])
    assert fingerprint(second.ca_pem) == ca_fp
    assert fingerprint(second.cert) != server_fp
    assert second.key.read_bytes() == key  # same key pair: only the names changed
    san = load_cert(second.cert).extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    # old names are kept, so two callers asking for different names do not flip-flop
    assert set(san.get_values_for_type(x509.DNSName)) == {"localhost", "xw.example.org"}
    assert {str(a) for a in san.get_values_for_type(x509.IPAddress)} == {"127.0.0.1", "10.0.0.1"}
    out = _exchange(_server_context(second.cert, second.key), _client_context(second.ca_pem), "xw.example.org")
    assert out.reply == b"pong"
    assert fingerprint(load_or_init_server_pki(tmp_path, ["localhost"], []).cert) == fingerprint(second.cert)


def test_default_names(tmp_path: Path) -> None:
    p = load_or_init_server_pki(tmp_path, [], [])
    out = _exchange(_server_context(p.cert, p.key), _client_context(p.ca_pem), "localhost")
    assert out.reply == b"pong"


def test_server_cert_from_a_replaced_ca_is_reissued(tmp_path: Path) -> None:
    first = load_or_init_server_pki(tmp_path, ["localhost"], [])
    create_ca(first.ca_pem.parent)  # someone replaced the CA
    second = load_or_init_server_pki(tmp_path, ["localhost"], [])
    load_cert(second.cert).verify_directly_issued_by(load_cert(second.ca_pem))


def test_ca_without_key_is_an_error(tmp_path: Path) -> None:
    p = load_or_init_server_pki(tmp_path, ["localhost"], [])
    p.ca_key.unlink()
    with pytest.raises(PkiError):
        load_or_init_server_pki(tmp_path, ["localhost"], [])


def test_concurrent_first_start_makes_one_ca(tmp_path: Path) -> None:
    results: list[pki.ServerPki] = []
    threads = [threading.Thread(target=lambda: results.append(load_or_init_server_pki(tmp_path, ["localhost"], [])))
               for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(results) == 4
    fps = {fingerprint(r.cert) for r in results}
    assert len(fps) == 1
    load_cert(results[0].cert).verify_directly_issued_by(load_cert(results[0].ca_pem))


# --- revocation ----------------------------------------------------------------------------------------------------


def test_crl_lists_the_revoked_serial(server: pki.ServerPki, tmp_path: Path) -> None:
    bad = issue_client_cert(server.ca_pem, server.ca_key, tmp_path / "b.pem", tmp_path / "b.key", "bad")
    pem = build_crl(server.ca_pem, server.ca_key, [bad.serial_number])
    assert pem.startswith(b"-----BEGIN X509 CRL-----")
    crl = x509.load_pem_x509_crl(pem)
    assert crl.is_signature_valid(load_cert(server.ca_pem).public_key())  # type: ignore[arg-type]
    assert crl.get_revoked_certificate_by_serial_number(bad.serial_number) is not None
    assert crl_serials(pem) == {bad.serial_number}
    assert crl.issuer == load_cert(server.ca_pem).subject
    assert crl_serials(build_crl(server.ca_pem, server.ca_key, [])) == set()


def test_revoke_accumulates(server: pki.ServerPki, tmp_path: Path) -> None:
    assert not server.crl.exists()
    assert crl_serials(revoke(server.ca_pem, server.ca_key, server.crl, 11)) == {11}
    assert crl_serials(revoke(server.ca_pem, server.ca_key, server.crl, [12, 13])) == {11, 12, 13}
    assert crl_serials(server.crl.read_bytes()) == {11, 12, 13}


def test_revoke_refuses_a_foreign_crl(server: pki.ServerPki, tmp_path: Path) -> None:
    other_ca, other_key = create_ca(tmp_path / "other")
    server.crl.write_bytes(build_crl(other_ca, other_key, [1]))
    with pytest.raises(PkiError):
        revoke(server.ca_pem, server.ca_key, server.crl, 2)


def test_revoked_client_cert_fails_tls(server: pki.ServerPki, tmp_path: Path) -> None:
    good = issue_client_cert(server.ca_pem, server.ca_key, tmp_path / "g.pem", tmp_path / "g.key", "good")
    bad = issue_client_cert(server.ca_pem, server.ca_key, tmp_path / "b.pem", tmp_path / "b.key", "bad")
    revoke(server.ca_pem, server.ca_key, server.crl, bad.serial_number)
    assert good.serial_number not in crl_serials(server.crl.read_bytes())

    def connect(name: str) -> Exchange:
        server_ctx = _server_context(server.cert, server.key, client_ca=server.ca_pem, crl=server.crl)
        client_ctx = _client_context(server.ca_pem, tmp_path / f"{name}.pem", tmp_path / f"{name}.key")
        return _exchange(server_ctx, client_ctx, "localhost")

    accepted = connect("g")
    assert accepted.server_error is None
    assert accepted.reply == b"pong"
    refused = connect("b")
    assert refused.reply == b""
    assert isinstance(refused.server_error, ssl.SSLCertVerificationError)
    assert "revoked" in str(refused.server_error)
