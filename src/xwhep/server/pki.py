"""A small built-in PKI (DESIGN §6): one CA per server home, the server's TLS certificate, user and worker
client certificates, and a certificate revocation list.

Layout under ``HOME/pki``: ``ca.pem``, ``ca.key``, ``server.pem``, ``server.key`` (keys mode 0600) and, once
something is revoked, ``crl.pem``. Keys are EC P-256: small, fast to generate, accepted by every TLS stack we
meet. Client certificates carry ``CN=<name>,OU=<user|worker>,O=xwhep``; :func:`subject_dn` gives the RFC 4514
string the server stores in a user's X.509 binding.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import ipaddress
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from xwhep.fsutil import write_atomic

CA_DAYS = 3650
SERVER_DAYS = 730
CLIENT_DAYS = 365
CRL_DAYS = 7
#: A server certificate closer than this to its end is re-issued at start-up.
RENEW_BEFORE = dt.timedelta(days=30)
#: Certificates start a little in the past so that a peer whose clock lags still accepts them.
BACKDATE = dt.timedelta(hours=1)
ORGANIZATION = "xwhep"

SigningKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
ClientKind = Literal["user", "worker"]


class PkiError(RuntimeError):
    """The PKI files are inconsistent or unusable (e.g. a CA certificate without its key)."""


@dataclass(frozen=True)
class ServerPki:
    """Paths of the server's TLS material."""

    ca_pem: Path
    cert: Path
    key: Path

    @property
    def ca_key(self) -> Path:
        """The CA private key, beside the CA certificate (needed to issue client certificates)."""
        return self.ca_pem.with_name("ca.key")

    @property
    def crl(self) -> Path:
        """Where :func:`revoke` keeps the CRL (it may not exist yet)."""
        return self.ca_pem.with_name("crl.pem")


# --- small file helpers --------------------------------------------------------------------------------------------


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: SigningKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _write_key(path: Path, key: SigningKey) -> None:
    write_atomic(path, _key_pem(key), 0o600)


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    write_atomic(path, cert.public_bytes(serialization.Encoding.PEM), 0o644)


def load_cert(path: Path | str) -> x509.Certificate:
    """Read one PEM certificate."""
    return x509.load_pem_x509_certificate(Path(path).read_bytes())


def load_key(path: Path | str) -> SigningKey:
    """Read an unencrypted PEM private key (EC or RSA)."""
    key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise PkiError(f"{path}: unsupported key type {type(key).__name__}")
    return key


def fingerprint(cert: x509.Certificate | Path | str) -> str:
    """SHA-256 fingerprint of a certificate, lowercase hex (what a client may pin)."""
    c = cert if isinstance(cert, x509.Certificate) else load_cert(cert)
    return c.fingerprint(hashes.SHA256()).hex()


def subject_dn(cert: x509.Certificate | Path | str) -> str:
    """The subject as an RFC 4514 string, e.g. ``CN=alice,OU=user,O=xwhep`` — the key of an X.509 binding."""
    c = cert if isinstance(cert, x509.Certificate) else load_cert(cert)
    return c.subject.rfc4514_string()


# --- issuing -------------------------------------------------------------------------------------------------------


def _builder(subject: x509.Name, issuer: x509.Name, public_key: ec.EllipticCurvePublicKey | rsa.RSAPublicKey,
             days: int) -> x509.CertificateBuilder:
    now = _now()
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    )


def _leaf_usage() -> x509.KeyUsage:
    return x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                         data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
                         encipher_only=False, decipher_only=False)


def _authority_key_id(ca: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    ski = ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)


def create_ca(directory: Path | str, cn: str = "xwhep CA") -> tuple[Path, Path]:
    """Create a CA (EC P-256, 10 years) as ``DIR/ca.pem`` and ``DIR/ca.key`` (mode 0600); return both paths.

    Overwrites an existing CA: callers that want reuse use :func:`load_or_init_server_pki`.
    """
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    key = _new_key()
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
                      x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    cert = (
        _builder(name, name, key.public_key(), CA_DAYS)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                     crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
        .sign(key, hashes.SHA256())
    )
    ca_pem, ca_key = d / "ca.pem", d / "ca.key"
    # key first: a ca.pem without its key would be a CA nobody can use
    _write_key(ca_key, key)
    _write_cert(ca_pem, cert)
    return ca_pem, ca_key


def _split_names(hostnames: Iterable[str], ips: Iterable[str]) -> tuple[list[str], list[str]]:
    """Normalise SAN entries: IP literals given as host names go to the IP list (TLS checks them there)."""
    dns: list[str] = []
    addrs: list[str] = []
    for h in hostnames:
        h = h.strip().lower().rstrip(".")
        if not h:
            continue
        try:
            ip = str(ipaddress.ip_address(h.strip("[]")))
        except ValueError:
            if h not in dns:
                dns.append(h)
        else:
            if ip not in addrs:
                addrs.append(ip)
    for a in ips:
        ip = str(ipaddress.ip_address(a.strip().strip("[]")))  # ValueError on garbage is the right answer
        if ip not in addrs:
            addrs.append(ip)
    return dns, addrs


def issue_server_cert(ca_cert: Path | str, ca_key: Path | str, out_dir: Path | str, hostnames: list[str],
                      ips: list[str], *, key: SigningKey | None = None) -> tuple[Path, Path]:
    """Issue ``OUT/server.pem`` + ``OUT/server.key`` for ``hostnames`` and ``ips`` (SAN, ServerAuth, 2 years).

    ``key`` reuses an existing key pair (so a renewal keeps what clients may have pinned on the key).
    """
    dns, addrs = _split_names(hostnames, ips)
    if not dns and not addrs:
        raise ValueError("a server certificate needs at least one host name or IP address")
    ca = load_cert(ca_cert)
    signer = load_key(ca_key)
    key = key or _new_key()
    sans: list[x509.GeneralName] = [x509.DNSName(h) for h in dns]
    sans += [x509.IPAddress(ipaddress.ip_address(a)) for a in addrs]
    subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
                         x509.NameAttribute(NameOID.COMMON_NAME, (dns or addrs)[0][:64])])
    cert = (
        _builder(subject, ca.subject, key.public_key(), SERVER_DAYS)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_leaf_usage(), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(_authority_key_id(ca), critical=False)
        .sign(signer, hashes.SHA256())
    )
    out = Path(out_dir)
    cert_path, key_path = out / "server.pem", out / "server.key"
    _write_key(key_path, key)
    _write_cert(cert_path, cert)
    return cert_path, key_path


def issue_client_cert(ca_cert: Path | str, ca_key: Path | str, out_cert: Path | str, out_key: Path | str, cn: str,
                      kind: ClientKind = "user", days: int = CLIENT_DAYS) -> x509.Certificate:
    """Issue a client certificate (ClientAuth) with subject ``CN=<cn>,OU=<kind>,O=xwhep``; return it.

    The subject (see :func:`subject_dn`) is what the server maps to a user; the serial is what :func:`revoke`
    takes.
    """
    if kind not in ("user", "worker"):
        raise ValueError(f"kind must be 'user' or 'worker', not {kind!r}")
    if not cn or len(cn) > 64:  # X.509 upper bound for a common name
        raise ValueError("the common name must be 1 to 64 characters")
    if days <= 0:
        raise ValueError("days must be positive")
    ca = load_cert(ca_cert)
    signer = load_key(ca_key)
    key = _new_key()
    subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
                         x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, kind),
                         x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    cert = (
        _builder(subject, ca.subject, key.public_key(), days)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_leaf_usage(), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(_authority_key_id(ca), critical=False)
        .sign(signer, hashes.SHA256())
    )
    _write_key(Path(out_key), key)
    _write_cert(Path(out_cert), cert)
    return cert


# --- revocation ----------------------------------------------------------------------------------------------------


def build_crl(ca_cert: Path | str, ca_key: Path | str, revoked_serials: Iterable[int],
              days: int = CRL_DAYS) -> bytes:
    """A PEM CRL signed by the CA that lists ``revoked_serials``, valid for ``days``."""
    ca = load_cert(ca_cert)
    signer = load_key(ca_key)
    now = _now()
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca.subject)
        .last_update(now - BACKDATE)
        .next_update(now + dt.timedelta(days=days))
        # a fresh number each build, so relying parties can tell the newer CRL
        .add_extension(x509.CRLNumber(int(now.timestamp() * 1000)), critical=False)
        .add_extension(_authority_key_id(ca), critical=False)
    )
    for serial in sorted(set(revoked_serials)):
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(now - BACKDATE).build())
    return builder.sign(signer, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def crl_serials(crl_pem: bytes) -> set[int]:
    """The serial numbers a PEM CRL lists."""
    return {r.serial_number for r in x509.load_pem_x509_crl(crl_pem)}


def revoke(ca_cert: Path | str, ca_key: Path | str, crl_path: Path | str, serials: int | Iterable[int]) -> bytes:
    """Add ``serials`` to the CRL kept at ``crl_path`` (created when missing), rewrite it and return it.

    The CRL file itself is the list of revoked serials: an existing one is trusted only if the CA signed it.
    """
    path = Path(crl_path)
    new = {serials} if isinstance(serials, int) else set(serials)
    known: set[int] = set()
    if path.exists():
        old = x509.load_pem_x509_crl(path.read_bytes())
        if not old.is_signature_valid(load_key(ca_key).public_key()):
            raise PkiError(f"{path} is not signed by {ca_cert}")
        known = {r.serial_number for r in old}
    pem = build_crl(ca_cert, ca_key, known | new)
    write_atomic(path, pem, 0o644)
    return pem


# --- the server's own material -------------------------------------------------------------------------------------


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """Serialise first-time creation between server processes sharing one home."""
    with open(directory / ".lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _sans(cert: x509.Certificate) -> tuple[list[str], list[str]]:
    """(DNS names, IP addresses) of a certificate's subjectAltName; empty lists when it has none."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return [], []
    return ([n.lower() for n in san.get_values_for_type(x509.DNSName)],
            [str(a) for a in san.get_values_for_type(x509.IPAddress)])


def _covered(cert: x509.Certificate, dns: list[str], addrs: list[str]) -> bool:
    have_dns, have_ips = _sans(cert)
    return set(dns) <= set(have_dns) and set(addrs) <= set(have_ips)


def _server_cert_usable(ca: x509.Certificate, cert: x509.Certificate, dns: list[str], addrs: list[str]) -> bool:
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):  # issuer or signature mismatch: the CA was replaced
        return False
    return _covered(cert, dns, addrs) and cert.not_valid_after_utc - _now() > RENEW_BEFORE


def load_or_init_server_pki(home: Path | str, hostnames: list[str], ips: list[str]) -> ServerPki:
    """The server's CA and TLS certificate under ``HOME/pki``: created the first time, reused afterwards.

    The server certificate is re-issued (same key, names = old ∪ requested) when it does not cover every
    requested host name and IP, nears its end, or was not issued by the current CA. With no names at all,
    ``localhost`` and ``127.0.0.1`` are used.
    """
    d = Path(home) / "pki"
    d.mkdir(parents=True, exist_ok=True)
    os.chmod(d, 0o700)
    pki = ServerPki(ca_pem=d / "ca.pem", cert=d / "server.pem", key=d / "server.key")
    dns, addrs = _split_names(hostnames, ips)
    if not dns and not addrs:
        dns, addrs = ["localhost"], ["127.0.0.1"]
    with _locked(d):
        if not pki.ca_pem.exists():
            if pki.ca_key.exists() or pki.cert.exists():
                raise PkiError(f"{d} holds a key or server certificate but no ca.pem: refusing to guess")
            create_ca(d)
        elif not pki.ca_key.exists():
            raise PkiError(f"{pki.ca_pem} exists without {pki.ca_key}")
        ca = load_cert(pki.ca_pem)
        key: SigningKey | None = None
        if pki.cert.exists() and pki.key.exists():
            current = load_cert(pki.cert)
            if _server_cert_usable(ca, current, dns, addrs):
                return pki
            # keep the names it already served, so that two callers asking for different names do not
            # take turns re-issuing it
            old_dns, old_ips = _sans(current)
            dns, addrs = [*old_dns, *dns], [*old_ips, *addrs]
            key = load_key(pki.key)
        issue_server_cert(pki.ca_pem, pki.ca_key, d, dns, addrs, key=key)
    return pki
