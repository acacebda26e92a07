"""X.509 login (DESIGN §6): certificate chains checked against the server's CA and CRL, RFC 3820 proxies, and the
single-use challenges that make a client prove it holds the leaf's private key.

uvicorn does not hand the TLS peer certificate to the application, and a TLS-terminating proxy would hide it
anyway, so authentication happens at the application level: the client sends its chain and signs a server
challenge with the leaf key (see :func:`xwhep.core.proxycert.login_message`). What is proven is the identity of
the *end-entity* certificate (the user or worker certificate our CA issued); proxies only carry it.

This module holds no database or web code: :mod:`xwhep.server.api.x509` maps the result to a user.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import logging
import os
import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from xwhep.core.proxycert import (
    GLOBUS_DRAFT_PROXY_CERT_INFO,
    PPL_INDEPENDENT,
    PPL_INHERIT_ALL,
    PPL_LIMITED,
    PROXY_CERT_INFO,
    extends_by_one_cn,
    legacy_proxy,
    login_message,
    normalize_host,
    proxy_cert_info,
)
from xwhep.server.config import ServerConfig

log = logging.getLogger("xwhep.server.x509")

#: Proxies allowed between the end-entity certificate and the leaf (proxy of a proxy of …): grid users delegate
#: a couple of times at most; the bound keeps the work an anonymous caller can cause small.
MAX_PROXY_DEPTH = 4
#: Certificates accepted in one chain: the leaf, the proxies, the end-entity cert and a copy of our CA.
MAX_CHAIN = MAX_PROXY_DEPTH + 2
MAX_PEM = 16 * 1024
#: Tolerated clock difference for a certificate's start (a client's clock may run ahead of ours).
CLOCK_SKEW = dt.timedelta(minutes=5)
NONCE_TTL = 60
#: Nonces consumed and not yet expired; past this many, challenges are answered 503 rather than letting an old
#: nonce be forgotten (which would make it replayable).
MAX_USED_NONCES = 100_000


class X509Refused(Exception):
    """The chain, the nonce or the signature is not acceptable; ``str()`` says why (logged and returned)."""


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def serial_hex(serial: int) -> str:
    """How serials are shown and carried in tokens: lowercase hex (JSON numbers would lose precision)."""
    return f"{serial:x}"


# --- files that change while the server runs -----------------------------------------------------------------------


class _FileCache:
    """Re-read a file only when its identity (inode, size, mtime) changes: one ``stat`` per use.

    ``pki.revoke`` replaces files by rename, so the inode changes on every write even within one mtime tick.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._key: tuple[int, int, int] | None = None
        self._data: bytes | None = None
        self._lock = threading.Lock()

    def read(self) -> tuple[bytes | None, bool]:
        """(content or None if missing, whether it changed since the last call)."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            changed = self._key is not None
            self._key, self._data = None, None
            return None, changed
        key = (st.st_ino, st.st_size, st.st_mtime_ns)
        with self._lock:
            if key == self._key:
                return self._data, False
            self._data = self.path.read_bytes()
            self._key = key
            return self._data, True


class RevocationList:
    """The serials HOME/pki/crl.pem revokes, re-read as soon as the file changes (``xw ca revoke``).

    A CRL that does not verify against the CA makes :meth:`is_revoked` answer True for every serial: refusing
    all certificate logins is better than honouring none of the revocations.
    """

    def __init__(self, crl_path: Path, ca_pem: Path) -> None:
        self._crl = _FileCache(crl_path)
        self._ca = _FileCache(ca_pem)
        self._serials: frozenset[int] = frozenset()
        self._broken: str | None = None

    def _refresh(self) -> None:
        crl_pem, crl_changed = self._crl.read()
        ca_pem, ca_changed = self._ca.read()
        if not (crl_changed or ca_changed):
            return
        if crl_pem is None:
            self._serials, self._broken = frozenset(), None
            return
        try:
            crl = x509.load_pem_x509_crl(crl_pem)
            if ca_pem is None:
                raise ValueError("no CA certificate to check it against")
            ca = x509.load_pem_x509_certificate(ca_pem)
            if crl.issuer != ca.subject or not crl.is_signature_valid(ca.public_key()):  # type: ignore[arg-type]
                raise ValueError("not signed by the server's CA")
        except ValueError as exc:
            self._broken = f"{self._crl.path}: {exc}"
            log.error("CRL unusable, refusing every certificate until it is fixed: %s", self._broken)
            return
        # nextUpdate is not enforced: the CRL is a local file written by the CA holder, not fetched from a
        # distribution point, so an old one is not a stale copy of something newer
        self._serials, self._broken = frozenset(r.serial_number for r in crl), None

    def is_revoked(self, serial: int) -> bool:
        """Whether ``serial`` is revoked now (or the CRL is unusable)."""
        self._refresh()
        return self._broken is not None or serial in self._serials

    @property
    def problem(self) -> str | None:
        """Why the CRL is unusable, if it is."""
        self._refresh()
        return self._broken

    def serials(self) -> frozenset[int]:
        self._refresh()
        return self._serials


# --- challenges ----------------------------------------------------------------------------------------------------


class NonceStore:
    """Single-use challenges valid for ``ttl`` seconds.

    A nonce is self-authenticating (random part + expiry + HMAC with a key derived from the server secret), so
    issuing one stores nothing: a flood of challenges costs no memory, and any server process sharing the home's
    secret accepts it (DESIGN §8: several API processes). Only *consumed* nonces are remembered, until they expire,
    so that each is accepted once. Across processes, single use is per process: replaying a captured login to
    another process within the TTL would need the signed request, which TLS protects.
    """

    def __init__(self, secret: bytes, ttl: int = NONCE_TTL, max_used: int = MAX_USED_NONCES) -> None:
        self._key = hmac.new(secret, b"xwhep-x509-nonce", hashlib.sha256).digest()
        self.ttl = ttl
        self.max_used = max_used
        self._used: OrderedDict[bytes, float] = OrderedDict()  # nonce → expiry; insertion order ≈ expiry order
        self._lock = threading.Lock()

    def _mac(self, body: bytes) -> bytes:
        return hmac.new(self._key, body, hashlib.sha256).digest()[:16]

    def _purge(self, now: float) -> None:
        while self._used:
            nonce, expiry = next(iter(self._used.items()))
            if expiry > now:
                break
            del self._used[nonce]

    def issue(self, now: float | None = None) -> str | None:
        """A fresh nonce (URL-safe base64), or None while too many consumed nonces are still live."""
        now = time.time() if now is None else now
        with self._lock:
            self._purge(now)
            if len(self._used) >= self.max_used:
                return None
        body = int(now + self.ttl).to_bytes(8, "big") + secrets.token_bytes(16)
        return base64.urlsafe_b64encode(body + self._mac(body)).decode().rstrip("=")

    def consume(self, nonce: str, now: float | None = None) -> bool:
        """True exactly once for a nonce this server issued that has not expired."""
        now = time.time() if now is None else now
        if not isinstance(nonce, str) or len(nonce) > 64:
            return False
        try:
            raw = base64.urlsafe_b64decode(nonce + "=" * (-len(nonce) % 4))
        except ValueError:
            return False
        if len(raw) != 40 or not hmac.compare_digest(raw[24:], self._mac(raw[:24])):
            return False
        expiry = int.from_bytes(raw[:8], "big")
        if expiry <= now or expiry > now + self.ttl + 1:
            return False
        with self._lock:
            self._purge(now)
            if raw in self._used:
                return False
            self._used[raw] = float(expiry)
        return True


# --- chain verification --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Verified:
    """A chain that passed every check: whom it proves, and the certificate whose key signs."""

    end_entity: x509.Certificate
    leaf: x509.Certificate
    proxies: int  # how many proxy certificates sit between them

    @property
    def dn(self) -> str:
        """The end-entity's subject as RFC 4514 (what ``pki.subject_dn`` gives and ``users.x509_dn`` holds)."""
        return self.end_entity.subject.rfc4514_string()

    @property
    def dn_forms(self) -> tuple[str, str]:
        """The RFC 4514 DN and the OpenSSL/Globus ``/O=…/OU=…/CN=…`` spelling an administrator may have stored."""
        slash = "".join("/" + "+".join(f"{a.rfc4514_attribute_name}={a.value!s}" for a in rdn)
                        for rdn in self.end_entity.subject.rdns)
        return self.dn, slash

    @property
    def cn(self) -> str:
        values = self.end_entity.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        return str(values[-1].value) if values else ""

    @property
    def kind(self) -> str:
        """``worker`` for certificates issued with ``--kind worker`` (OU=worker), else ``user``."""
        ous = self.end_entity.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
        return "worker" if any(a.value == "worker" for a in ous) else "user"

    @property
    def serial(self) -> int:
        return self.end_entity.serial_number

    @property
    def not_after(self) -> dt.datetime:
        """When the proof stops holding: the earliest end in the chain (a proxy usually)."""
        return min(self.end_entity.not_valid_after_utc, self.leaf.not_valid_after_utc)


def _ext(cert: x509.Certificate, kind: type[x509.ExtensionType]) -> x509.ExtensionType | None:
    try:
        return cert.extensions.get_extension_for_class(kind).value
    except x509.ExtensionNotFound:
        return None


def _name(cert: x509.Certificate) -> str:
    return cert.subject.rfc4514_string() or "(empty subject)"


def _check_time(cert: x509.Certificate, what: str, now: dt.datetime) -> None:
    if cert.not_valid_before_utc - CLOCK_SKEW > now:
        raise X509Refused(f"{what} {_name(cert)} is not valid before {cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC")
    if cert.not_valid_after_utc <= now:
        raise X509Refused(f"{what} {_name(cert)} expired on {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC")


def _may_sign(cert: x509.Certificate, what: str) -> None:
    """The key must be allowed to make signatures (on the login message, and on proxies it issues)."""
    usage = _ext(cert, x509.KeyUsage)
    if isinstance(usage, x509.KeyUsage) and not usage.digital_signature:
        raise X509Refused(f"{what} {_name(cert)} does not allow digital signatures (key usage)")


def _signed_by(cert: x509.Certificate, issuer: x509.Certificate, what: str) -> None:
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        raise X509Refused(f"{what} {_name(cert)} is not signed by {_name(issuer)}") from None


def _check_end_entity(ee: x509.Certificate, ca: x509.Certificate, now: dt.datetime) -> None:
    oids = {e.oid for e in ee.extensions}
    if PROXY_CERT_INFO in oids or GLOBUS_DRAFT_PROXY_CERT_INFO in oids:
        raise X509Refused("the chain ends with a proxy certificate: send the user certificate after it")
    try:
        ee.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        raise X509Refused(f"certificate {_name(ee)} was not issued by this server's CA") from None
    _check_time(ca, "the server's CA", now)
    _check_time(ee, "certificate", now)
    bc = _ext(ee, x509.BasicConstraints)
    if isinstance(bc, x509.BasicConstraints) and bc.ca:
        raise X509Refused(f"certificate {_name(ee)} is a CA certificate")
    eku = _ext(ee, x509.ExtendedKeyUsage)
    if not isinstance(eku, x509.ExtendedKeyUsage) or ExtendedKeyUsageOID.CLIENT_AUTH not in eku:
        raise X509Refused(f"certificate {_name(ee)} is not for client authentication (no clientAuth usage)")
    _may_sign(ee, "certificate")


def _check_proxy(proxy: x509.Certificate, issuer: x509.Certificate, below: int, now: dt.datetime) -> None:
    """RFC 3820 §3-4 for one proxy issued by ``issuer``, with ``below`` more proxies issued under it."""
    legacy = legacy_proxy(proxy, issuer)
    try:
        info = proxy_cert_info(proxy)
    except ValueError as exc:
        raise X509Refused(f"proxy {_name(proxy)}: malformed ProxyCertInfo ({exc})") from None
    if info is None:
        if legacy:
            raise X509Refused(f"{legacy} certificates are not accepted: make an RFC 3820 proxy "
                              "(xw x509 proxy-init, grid-proxy-init -rfc, voms-proxy-init -rfc)")
        raise X509Refused(f"{_name(proxy)} is neither an RFC 3820 proxy of {_name(issuer)} (no ProxyCertInfo) "
                          "nor this server's user certificate")
    if proxy.issuer != issuer.subject:
        raise X509Refused(f"proxy {_name(proxy)} names issuer {proxy.issuer.rfc4514_string()}, "
                          f"not {_name(issuer)}")
    if extends_by_one_cn(proxy.subject, issuer.subject) is None:
        raise X509Refused(f"proxy subject {_name(proxy)} is not its issuer's subject plus one CN")
    _may_sign(issuer, "issuer of proxy")
    _signed_by(proxy, issuer, "proxy")
    _check_time(proxy, "proxy", now)
    if proxy.not_valid_after_utc > issuer.not_valid_after_utc:
        raise X509Refused(f"proxy {_name(proxy)} outlives the certificate that issued it")
    if info.language == PPL_LIMITED:
        raise X509Refused("limited proxies (Globus) may not log in")
    if info.language == PPL_INDEPENDENT:
        raise X509Refused("independent proxies carry none of their issuer's rights")
    if info.language != PPL_INHERIT_ALL:
        raise X509Refused(f"proxy policy language {info.language} is not supported (only id-ppl-inheritAll)")
    if info.path_len is not None and below > info.path_len:
        raise X509Refused(f"proxy {_name(proxy)} allows {info.path_len} proxies under it, the chain has {below}")
    bc = _ext(proxy, x509.BasicConstraints)
    if isinstance(bc, x509.BasicConstraints) and bc.ca:
        raise X509Refused(f"proxy {_name(proxy)} claims to be a CA")
    usage = _ext(proxy, x509.KeyUsage)
    if isinstance(usage, x509.KeyUsage) and (usage.key_cert_sign or usage.content_commitment):
        raise X509Refused(f"proxy {_name(proxy)} asserts keyCertSign or nonRepudiation (RFC 3820 §3.7)")
    for forbidden in (x509.SubjectAlternativeName, x509.IssuerAlternativeName):
        if _ext(proxy, forbidden) is not None:
            raise X509Refused(f"proxy {_name(proxy)} carries a {forbidden.__name__} (RFC 3820 §3.5-3.6)")
    eku = _ext(proxy, x509.ExtendedKeyUsage)
    if isinstance(eku, x509.ExtendedKeyUsage) and ExtendedKeyUsageOID.CLIENT_AUTH not in eku:
        raise X509Refused(f"proxy {_name(proxy)} is restricted to other uses than client authentication")


def verify_chain(pems: list[str], ca: x509.Certificate, revoked: RevocationList | None = None,
                 now: dt.datetime | None = None) -> Verified:
    """Check a leaf-first chain (leaf, its issuing proxies…, the end-entity certificate[, our CA]).

    Raises :class:`X509Refused` with the reason. The signature on the login message is checked separately
    (:func:`verify_signature`), with the leaf's key.
    """
    now = now or _now()
    if not isinstance(pems, list) or not 1 <= len(pems) <= MAX_CHAIN:
        raise X509Refused(f"chain: 1 to {MAX_CHAIN} PEM certificates, leaf first")
    certs: list[x509.Certificate] = []
    for i, pem in enumerate(pems):
        if not isinstance(pem, str) or len(pem) > MAX_PEM or pem.count("-----BEGIN") != 1:
            raise X509Refused(f"chain[{i}]: one PEM certificate of at most {MAX_PEM} characters")
        try:
            certs.append(x509.load_pem_x509_certificate(pem.encode()))
        except ValueError:
            raise X509Refused(f"chain[{i}]: not a PEM certificate") from None
    while len(certs) > 1 and certs[-1] == ca:  # a client may append the CA it trusts; it proves nothing
        certs.pop()
    ee, proxies = certs[-1], certs[:-1]
    if len(proxies) > MAX_PROXY_DEPTH:
        raise X509Refused(f"at most {MAX_PROXY_DEPTH} proxy certificates in a chain")
    _check_end_entity(ee, ca, now)
    if revoked is not None and revoked.is_revoked(ee.serial_number):
        problem = revoked.problem
        raise X509Refused(f"the server's CRL is unusable ({problem})" if problem else
                          f"certificate {_name(ee)} (serial {serial_hex(ee.serial_number)}) is revoked")
    issuer = ee
    for depth, proxy in enumerate(reversed(proxies)):
        _check_proxy(proxy, issuer, len(proxies) - 1 - depth, now)
        issuer = proxy
    return Verified(ee, certs[0], len(proxies))


def verify_signature(leaf: x509.Certificate, message: bytes, signature: bytes) -> None:
    """The leaf's key signed ``message``: ECDSA-SHA256, Ed25519, or RSA PKCS#1 v1.5 / PSS with SHA-256."""
    key = leaf.public_key()
    try:
        if isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(signature, message, ec.ECDSA(hashes.SHA256()))
        elif isinstance(key, ed25519.Ed25519PublicKey):
            key.verify(signature, message)
        elif isinstance(key, rsa.RSAPublicKey):
            try:
                key.verify(signature, message, padding.PKCS1v15(), hashes.SHA256())
            except InvalidSignature:
                key.verify(signature, message, padding.PSS(padding.MGF1(hashes.SHA256()), padding.PSS.AUTO),
                           hashes.SHA256())
        else:
            raise X509Refused(f"unsupported key type {type(key).__name__}")
    except InvalidSignature:
        raise X509Refused("the signature does not verify with the certificate's key") from None


# --- per-server state ----------------------------------------------------------------------------------------------


class X509Auth:
    """What the X.509 routes and the token check need, built once per server process (lazily reads files)."""

    def __init__(self, config: ServerConfig, secret: bytes) -> None:
        self.config = config
        pki = config.home / "pki"
        self.ca_path = pki / "ca.pem"
        self.revocations = RevocationList(pki / "crl.pem", self.ca_path)
        self.nonces = NonceStore(secret)
        self._ca = _FileCache(self.ca_path)
        self._ca_cert: x509.Certificate | None = None
        self._server = _FileCache(pki / "server.pem")
        self._names: frozenset[str] = frozenset()

    def ca(self) -> x509.Certificate | None:
        """The CA certificate, or None when this home has no CA (``--insecure`` and never ``xw ca init``)."""
        pem, changed = self._ca.read()
        if changed:
            self._ca_cert = x509.load_pem_x509_certificate(pem) if pem else None
        return self._ca_cert

    def audiences(self) -> frozenset[str] | None:
        """The host names a login may be signed for: the server certificate's names, the public name and the
        listening address; None (anything) for a plain-HTTP server, where a relay could read tokens anyway."""
        if self.config.insecure:
            return None
        pem, changed = self._server.read()
        if changed:
            names: set[str] = set()
            if pem:
                try:
                    san = x509.load_pem_x509_certificate(pem).extensions.get_extension_for_class(
                        x509.SubjectAlternativeName).value
                    names |= {str(n) for n in san.get_values_for_type(x509.DNSName)}
                    names |= {str(a) for a in san.get_values_for_type(x509.IPAddress)}
                except (ValueError, x509.ExtensionNotFound):
                    pass
            self._names = frozenset(normalize_host(n) for n in names)
        extra = {self.config.host} if self.config.host not in ("", "0.0.0.0", "::") else set()
        if self.config.public_name:
            extra.add(_host_of(self.config.public_name))
        return self._names | {normalize_host(h) for h in extra}

    def authenticate(self, chain: list[str], nonce: str, audience: str, signature_b64: str) -> Verified:
        """Every check of an X.509 login, in an order that spends the nonce first (one try per challenge)."""
        if not self.nonces.consume(nonce):
            raise X509Refused("unknown, expired or already used nonce: ask for a new challenge")
        ca = self.ca()
        if ca is None:
            raise X509Refused("this server has no CA (HOME/pki/ca.pem): X.509 login is not available")
        allowed = self.audiences()
        if not isinstance(audience, str) or (allowed is not None and normalize_host(audience) not in allowed):
            raise X509Refused(f"the login was signed for host {audience!r}, which is not one of this server's names")
        try:
            signature = base64.b64decode(signature_b64, validate=True)
        except (ValueError, TypeError):
            raise X509Refused("signature: not base64") from None
        verified = verify_chain(chain, ca, self.revocations)
        verify_signature(verified.leaf, login_message(audience, nonce), signature)
        return verified


def _host_of(name: str) -> str:
    """``host`` of ``host``, ``host:port``, ``[v6]:port`` or a URL."""
    name = name.split("://", 1)[-1].split("/", 1)[0]
    if name.startswith("["):
        return name[1:name.index("]")] if "]" in name else name
    return name.rsplit(":", 1)[0] if name.count(":") == 1 else name
