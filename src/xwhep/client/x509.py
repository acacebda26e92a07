"""X.509 on the client side (DESIGN §6): log in with a certificate + key or a grid proxy, and make RFC 3820 proxy
certificates (``xw x509 proxy-init``, after ``grid-proxy-init``).

Login is a challenge-response at the application level: ``POST /auth/x509/challenge`` gives a nonce, the leaf key
signs :func:`xwhep.core.proxycert.login_message` (context, server host name, nonce), ``POST /auth/x509`` sends
the chain and the signature and returns the usual bearer token. The private key never leaves the machine.

A proxy file (``$X509_USER_PROXY``, default ``/tmp/x509up_u<uid>``) holds, in this order, the proxy certificate,
its unencrypted key, then the certificate(s) that issued it: the layout every grid tool reads and writes.
"""

from __future__ import annotations

import base64
import datetime as dt
import os
import re
import secrets
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any
from urllib.parse import urlsplit

import typer
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID

from xwhep.core.proxycert import PPL_INHERIT_ALL, PROXY_CERT_INFO, ProxyCertInfo, login_message, proxy_cert_info
from xwhep.fsutil import write_atomic

if TYPE_CHECKING:
    from xwhep.client.sdk import Client

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey
#: A proxy starts a little in the past: the server tolerates a few minutes of skew, this covers the rest.
PROXY_BACKDATE = dt.timedelta(minutes=5)
DEFAULT_HOURS = 12.0
_KEY_BLOCK = re.compile(rb"-----BEGIN ([A-Z ]*PRIVATE KEY)-----.+?-----END \1-----", re.DOTALL)


class X509Error(ValueError):
    """Unusable local credentials (missing file, wrong key, encrypted key, expired proxy); one readable line."""


# --- where credentials are -----------------------------------------------------------------------------------------


def default_proxy_path() -> Path:
    """``/tmp/x509up_u<uid>``: where grid tools put a proxy when ``X509_USER_PROXY`` is not set."""
    return Path(f"/tmp/x509up_u{os.getuid()}")


def find_proxy() -> Path | None:
    """The grid proxy to use: ``$X509_USER_PROXY`` if set (and present), else ``/tmp/x509up_u<uid>`` if present."""
    env = os.environ.get("X509_USER_PROXY")
    path = Path(env).expanduser() if env else default_proxy_path()
    return path if path.is_file() else None


def _default_user_file(env: str, name: str) -> Path:
    value = os.environ.get(env)
    return Path(value).expanduser() if value else Path.home() / ".globus" / name


def _read(path: Path | str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise X509Error(f"cannot read {what} {path}: {exc.strerror}") from None


def load_key(path: Path | str, passphrase: bytes | None = None) -> PrivateKey:
    """The first private key in a PEM file (a key file, or a proxy file holding one)."""
    data = _read(path, "key")
    block = _KEY_BLOCK.search(data)
    if block is None:
        raise X509Error(f"{path}: no private key in it")
    try:
        key = serialization.load_pem_private_key(block.group(0), password=passphrase)
    except TypeError:
        raise X509Error(f"{path}: the key is encrypted (give its passphrase, or make a proxy with "
                        "xw x509 proxy-init)") from None
    except ValueError as exc:
        raise X509Error(f"{path}: unreadable private key ({exc})") from None
    if not isinstance(key, PrivateKey):
        raise X509Error(f"{path}: unsupported key type {type(key).__name__}")
    return key


def key_is_encrypted(path: Path | str) -> bool:
    try:
        load_key(path)
    except X509Error as exc:
        return "encrypted" in str(exc)
    return False


def load_chain(path: Path | str) -> list[x509.Certificate]:
    """Every certificate of a PEM file, in file order (leaf first for a proxy file)."""
    try:
        certs = x509.load_pem_x509_certificates(_read(path, "certificate"))
    except ValueError:
        raise X509Error(f"{path}: no PEM certificate in it") from None
    return certs


def load_credentials(cert: Path | str, key: Path | str | None = None,
                     passphrase: bytes | None = None) -> tuple[list[x509.Certificate], PrivateKey]:
    """The chain (leaf first) and the leaf's key; ``key`` defaults to the certificate file (a proxy file)."""
    chain = load_chain(cert)
    private = load_key(key or cert, passphrase)
    if _public_der(private.public_key()) != _public_der(chain[0].public_key()):
        raise X509Error(f"{key or cert}: this key does not belong to the certificate {_dn(chain[0])} in {cert}")
    now = dt.datetime.now(dt.UTC)
    for c in chain:
        if c.not_valid_after_utc <= now:
            what = "proxy" if _is_proxy(c) else "certificate"
            raise X509Error(f"{cert}: the {what} {_dn(c)} expired on {c.not_valid_after_utc:%Y-%m-%d %H:%M} UTC")
    return chain, private


def _public_der(key: Any) -> bytes:
    return bytes(key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo))


def _dn(cert: x509.Certificate) -> str:
    return cert.subject.rfc4514_string()


def _is_proxy(cert: x509.Certificate) -> bool:
    return any(e.oid == PROXY_CERT_INFO for e in cert.extensions)


def identity_of(chain: list[x509.Certificate]) -> x509.Certificate:
    """The end-entity certificate of a chain: the first one that is not a proxy."""
    for c in chain:
        if not _is_proxy(c):
            return c
    raise X509Error("the chain holds only proxy certificates: the user certificate is missing")


# --- login ---------------------------------------------------------------------------------------------------------


def sign(key: PrivateKey, message: bytes) -> bytes:
    """ECDSA-SHA256, Ed25519 or RSA PKCS#1 v1.5 with SHA-256: what the server verifies."""
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return key.sign(message, ec.ECDSA(hashes.SHA256()))
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key.sign(message)
    from cryptography.hazmat.primitives.asymmetric import padding

    return key.sign(message, padding.PKCS1v15(), hashes.SHA256())


def login_x509(client: Client, cert: str | os.PathLike[str] | None = None,
               key: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """Log ``client`` in with a certificate: ``cert``/``key``, else the client's, else the grid proxy.

    Sets the client's token and returns the server's answer (``token``, ``expires_in``, ``user``, ``level``,
    ``login``, ``dn``). Raises :class:`~xwhep.client.sdk.XwError` on refusal or unusable credentials.
    """
    from xwhep.client.sdk import XwError

    cert_path: str | os.PathLike[str] | None = cert or client._cert
    key_path = key or (client._key if cert is None else None)
    if not cert_path:
        proxy = find_proxy()
        if proxy is None:
            raise XwError("no X.509 credentials: set cert and key in the client config, or make a proxy "
                          "(xw x509 proxy-init; X509_USER_PROXY)")
        cert_path = proxy
    try:
        chain, private = load_credentials(cert_path, key_path)
    except X509Error as exc:
        raise XwError(str(exc)) from None
    audience = urlsplit(client.server).hostname or ""
    nonce = client._json("POST", "/auth/x509/challenge", auth=False)["nonce"]
    signature = sign(private, login_message(audience, nonce))
    body = {"chain": [c.public_bytes(serialization.Encoding.PEM).decode() for c in chain], "nonce": nonce,
            "audience": audience, "signature": base64.b64encode(signature).decode()}
    data: dict[str, Any] = client._json("POST", "/auth/x509", json=body, auth=False)
    client._token = data["token"]
    client._token_expiry = time.monotonic() + float(data.get("expires_in", 3600)) * 0.8
    return data


# --- proxies -------------------------------------------------------------------------------------------------------


def make_proxy(chain: list[x509.Certificate], issuer_key: PrivateKey, hours: float = DEFAULT_HOURS,
               path_len: int | None = None) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """An RFC 3820 proxy of ``chain[0]`` (a user certificate or a proxy), signed with ``issuer_key``.

    Subject: the issuer's subject plus ``CN=<random number>``; ProxyCertInfo (critical) with id-ppl-inheritAll;
    valid for ``hours`` but never past the issuer's end. The new key is EC P-256.
    """
    if hours <= 0:
        raise X509Error("hours must be positive")
    issuer = chain[0]
    now = dt.datetime.now(dt.UTC)
    if issuer.not_valid_after_utc <= now:
        raise X509Error(f"the certificate {_dn(issuer)} expired on {issuer.not_valid_after_utc:%Y-%m-%d %H:%M} UTC")
    key = ec.generate_private_key(ec.SECP256R1())
    # the CN number only has to be unique among this issuer's proxies (RFC 3820 §3.4)
    subject = x509.Name([*issuer.subject.rdns,
                         x509.RelativeDistinguishedName([x509.NameAttribute(NameOID.COMMON_NAME,
                                                                            str(secrets.randbits(31) + 1))])])
    usage = x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                          data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
                          encipher_only=False, decipher_only=False)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(max(now - PROXY_BACKDATE, issuer.not_valid_before_utc))
        .not_valid_after(min(now + dt.timedelta(hours=hours), issuer.not_valid_after_utc))
        .add_extension(ProxyCertInfo(path_len, PPL_INHERIT_ALL).extension(), critical=True)
        .add_extension(usage, critical=True)
        .sign(issuer_key, None if isinstance(issuer_key, ed25519.Ed25519PrivateKey) else hashes.SHA256())
    )
    return cert, key


def proxy_pem(proxy: x509.Certificate, key: PrivateKey, chain: list[x509.Certificate]) -> bytes:
    """The proxy file: proxy certificate, its key (unencrypted, as grid tools expect), the issuing chain."""
    pem = serialization.Encoding.PEM
    return (proxy.public_bytes(pem)
            + key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
            + b"".join(c.public_bytes(pem) for c in chain))


def write_private(path: Path, data: bytes) -> None:
    """Write ``data`` readable by its owner only, atomically (see :func:`xwhep.fsutil.write_atomic`)."""
    write_atomic(path, data, 0o600)


def _time_left(cert: x509.Certificate) -> str:
    left = int((cert.not_valid_after_utc - dt.datetime.now(dt.UTC)).total_seconds())
    if left <= 0:
        return "expired"
    return f"{left // 3600}:{left % 3600 // 60:02d}:{left % 60:02d}"


app = typer.Typer(name="x509", no_args_is_help=True, add_completion=False,
                  help="X.509 credentials: make and inspect RFC 3820 proxy certificates.")


@app.command("proxy-init")
def proxy_init(
    cert: Annotated[Path | None, typer.Option(help="User certificate (default $X509_USER_CERT, else "
                                                   "~/.globus/usercert.pem); a proxy file makes a proxy of it")] = None,
    key: Annotated[Path | None, typer.Option(help="Its private key (default: the certificate file if it holds "
                                                  "one, else $X509_USER_KEY, else ~/.globus/userkey.pem)")] = None,
    hours: Annotated[float, typer.Option(help="Lifetime (never past the user certificate's end)")] = DEFAULT_HOURS,
    out: Annotated[Path | None, typer.Option(help="Proxy file (default $X509_USER_PROXY, else "
                                                  "/tmp/x509up_u<uid>)")] = None,
    path_length: Annotated[int | None, typer.Option(help="How many further proxies may be made from this one "
                                                         "(default: no limit)")] = None,
) -> None:
    """Create a proxy certificate from your user certificate (as grid-proxy-init does); mode 0600."""
    cert_path = cert or _default_user_file("X509_USER_CERT", "usercert.pem")
    key_path = key or (cert_path if cert and not key and _has_key(cert_path)
                       else _default_user_file("X509_USER_KEY", "userkey.pem"))
    out_path = out or (Path(os.environ["X509_USER_PROXY"]) if os.environ.get("X509_USER_PROXY")
                       else default_proxy_path())
    try:
        passphrase = None
        if key_is_encrypted(key_path):
            passphrase = typer.prompt(f"Passphrase for {key_path}", hide_input=True).encode()
        chain, issuer_key = load_credentials(cert_path, key_path, passphrase)
        if path_length is not None and path_length < 0:
            raise X509Error("--path-length must not be negative")
        proxy, proxy_key = make_proxy(chain, issuer_key, hours, path_length)
        write_private(out_path, proxy_pem(proxy, proxy_key, chain))
    except X509Error as exc:
        typer.echo(f"xw x509 proxy-init: error: {exc}", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"Your identity: {_dn(identity_of(chain))}")
    typer.echo(f"Proxy {out_path} valid until {proxy.not_valid_after_utc:%Y-%m-%d %H:%M} UTC ({_time_left(proxy)})")


@app.command("proxy-info")
def proxy_info(
    file: Annotated[Path | None, typer.Option(help="Proxy file (default $X509_USER_PROXY, else "
                                                   "/tmp/x509up_u<uid>)")] = None,
) -> None:
    """Show a proxy: its subject, the identity it carries, and the time left (exit 1 when none or expired)."""
    path = file or find_proxy()
    if path is None:
        typer.echo("xw x509 proxy-info: error: no proxy (xw x509 proxy-init makes one)", err=True)
        raise typer.Exit(1)
    try:
        chain = load_chain(path)
        info = proxy_cert_info(chain[0])
        ee = identity_of(chain)
    except (X509Error, ValueError) as exc:
        typer.echo(f"xw x509 proxy-info: error: {exc}", err=True)
        raise typer.Exit(1) from None
    kind = ("RFC 3820 compliant proxy" if info else "end-entity certificate") + (
        f", path length {info.path_len}" if info and info.path_len is not None else "")
    typer.echo(f"subject  : {_dn(chain[0])}\nidentity : {_dn(ee)}\ntype     : {kind}\npath     : {path}\n"
               f"timeleft : {_time_left(chain[0])}")
    if chain[0].not_valid_after_utc <= dt.datetime.now(dt.UTC):
        raise typer.Exit(1)


def _has_key(path: Path) -> bool:
    try:
        return _KEY_BLOCK.search(path.read_bytes()) is not None
    except OSError:
        return False
