"""``xw ca``: the server's built-in certificate authority (DESIGN §6) from the command line.

It works on the files of a server home (``HOME/pki``) and needs no running server: the server re-reads
``crl.pem`` as soon as it changes, so ``xw ca revoke`` takes effect at once, for new logins and for tokens
already obtained with the certificate. Each issued certificate is recorded in ``HOME/pki/issued.jsonl`` (serial,
DN, kind, end of validity) so that it can be found again and revoked by serial.
"""

from __future__ import annotations

import datetime as dt
import json
import os
from pathlib import Path
from typing import Annotated, Any, cast

import typer
from cryptography import x509

from xwhep.server import pki
from xwhep.server.config import ServerConfig

app = typer.Typer(name="ca", no_args_is_help=True, add_completion=False,
                  help="The server's certificate authority: issue and revoke user and worker certificates.")

Home = Annotated[Path, typer.Option(help="Server home (its CA is in HOME/pki)")]


def _fail(message: str) -> typer.Exit:
    typer.echo(f"xw ca: error: {message}", err=True)
    return typer.Exit(1)


def _material(home: Path) -> pki.ServerPki:
    """The CA of ``home``, which must exist (``xw ca init`` or a first server start creates it)."""
    d = home.resolve() / "pki"
    material = pki.ServerPki(ca_pem=d / "ca.pem", cert=d / "server.pem", key=d / "server.key")
    if not material.ca_pem.exists():
        raise _fail(f"no CA in {d}: run xw ca init --home {home} (or start the server once)")
    if not material.ca_key.exists():
        raise _fail(f"{material.ca_key} is missing: this home cannot issue or revoke certificates")
    return material


def parse_serial(text: str) -> int:
    """A serial as ``xw ca`` prints it (``0x…``), as OpenSSL prints it (hex, maybe with colons) or in decimal.

    Bare digits are decimal; digits with ``a``-``f`` or colons are hex; ``0x`` makes hex certain.
    """
    t = text.strip().lower().replace(":", "")
    try:
        if t.startswith("0x"):
            return int(t[2:], 16)
        if t.isdigit() and ":" not in text:  # OpenSSL's colon form of an all-digit serial stays hex
            return int(t, 10)
        return int(t, 16)
    except ValueError:
        raise typer.BadParameter(f"not a serial number: {text!r} (give 0x<hex> or decimal)") from None


def _show_serial(serial: int) -> str:
    return f"0x{serial:x}"


def _issued_log(material: pki.ServerPki) -> Path:
    return material.ca_pem.with_name("issued.jsonl")


def _issued(material: pki.ServerPki) -> list[dict[str, Any]]:
    path = _issued_log(material)
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue  # a torn last line after a crash must not hide the others
    return out


def _record(material: pki.ServerPki, cert: x509.Certificate, kind: str) -> None:
    entry = {"serial": _show_serial(cert.serial_number), "dn": pki.subject_dn(cert), "kind": kind,
             "not_after": cert.not_valid_after_utc.isoformat(), "issued": dt.datetime.now(dt.UTC).isoformat()}
    fd = os.open(_issued_log(material), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    with os.fdopen(fd, "a") as f:
        f.write(json.dumps(entry) + "\n")


def _revoked(material: pki.ServerPki) -> x509.CertificateRevocationList | None:
    if not material.crl.exists():
        return None
    return x509.load_pem_x509_crl(material.crl.read_bytes())


@app.command("init")
def init(home: Home) -> None:
    """Create the CA and the server certificate of HOME if missing (the same as a first server start does)."""
    from xwhep.server.home import pki as server_pki

    home = home.resolve()
    home.mkdir(parents=True, exist_ok=True)
    try:
        material = server_pki(ServerConfig(home=home))
    except pki.PkiError as exc:
        raise _fail(str(exc)) from None
    ca = pki.load_cert(material.ca_pem)
    typer.echo(f"CA {pki.subject_dn(ca)} in {material.ca_pem}\nfingerprint (SHA-256) {pki.fingerprint(ca)}")


@app.command("issue")
def issue(
    home: Home,
    cn: Annotated[str, typer.Option(help="Common name: the user's or worker's name (1-64 characters)")],
    out_cert: Annotated[Path, typer.Option(help="Where to write the certificate (PEM)")],
    out_key: Annotated[Path, typer.Option(help="Where to write its private key (PEM, mode 0600)")],
    kind: Annotated[str, typer.Option(help="user or worker (OU=worker: a worker's identity)")] = "user",
    days: Annotated[int, typer.Option(help="Validity in days")] = pki.CLIENT_DAYS,
    force: Annotated[bool, typer.Option("--force", help="Overwrite existing output files")] = False,
) -> None:
    """Issue a client certificate; prints its serial (for revocation) and subject DN (the user's x509_dn)."""
    material = _material(home)
    if kind not in ("user", "worker"):
        raise typer.BadParameter("--kind must be user or worker")
    for path in (out_cert, out_key):
        if path.exists() and not force:
            raise _fail(f"{path} exists (use --force to overwrite it)")
    try:
        cert = pki.issue_client_cert(material.ca_pem, material.ca_key, out_cert, out_key, cn,
                                     cast(pki.ClientKind, kind), days)
    except ValueError as exc:
        raise _fail(str(exc)) from None
    _record(material, cert, kind)
    typer.echo(f"serial {_show_serial(cert.serial_number)}\ndn {pki.subject_dn(cert)}\n"
               f"valid until {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC\ncert {out_cert}\nkey {out_key}")


@app.command("revoke")
def revoke(
    home: Home,
    serial: Annotated[str | None, typer.Option(help="Serial to revoke (0x<hex> as printed by issue, or decimal)")]
    = None,
    cert: Annotated[Path | None, typer.Option(help="Certificate file to revoke")] = None,
) -> None:
    """Revoke a certificate: new logins with it (or its proxies) and tokens already obtained with it are refused."""
    material = _material(home)
    if (serial is None) == (cert is None):
        raise typer.BadParameter("give exactly one of --serial and --cert")
    if cert is not None:
        try:
            target = pki.load_cert(cert)
        except (OSError, ValueError) as exc:
            raise _fail(f"{cert}: not a PEM certificate ({exc})") from None
        ca = pki.load_cert(material.ca_pem)
        try:
            target.verify_directly_issued_by(ca)
        except Exception:
            raise _fail(f"{cert} was not issued by this CA: nothing to revoke here") from None
        number = target.serial_number
    else:
        number = parse_serial(serial or "")
    try:
        crl = pki.revoke(material.ca_pem, material.ca_key, material.crl, number)
    except pki.PkiError as exc:
        raise _fail(str(exc)) from None
    dn = next((e["dn"] for e in _issued(material) if e.get("serial") == _show_serial(number)), None)
    typer.echo(f"revoked {_show_serial(number)}" + (f" ({dn})" if dn else "")
               + f"; the CRL lists {len(pki.crl_serials(crl))} certificate(s)")


@app.command("crl")
def crl(
    home: Home,
    renew: Annotated[bool, typer.Option("--renew", help="Sign the CRL again with a fresh validity period")] = False,
) -> None:
    """List the revoked serials (with the DN when this CA issued them)."""
    material = _material(home)
    if renew:
        pki.revoke(material.ca_pem, material.ca_key, material.crl, [])
    current = _revoked(material)
    if current is None:
        typer.echo("no certificate revoked")
        return
    names = {e.get("serial"): e.get("dn") for e in _issued(material)}
    for r in sorted(current, key=lambda r: r.revocation_date_utc):
        s = _show_serial(r.serial_number)
        typer.echo(f"{s}\t{r.revocation_date_utc:%Y-%m-%d %H:%M} UTC\t{names.get(s) or ''}".rstrip())
    next_update = current.next_update_utc
    if next_update is not None:
        typer.echo(f"# {len(current)} revoked; CRL signed until {next_update:%Y-%m-%d %H:%M} UTC", err=True)


@app.command("show")
def show(home: Home) -> None:
    """The CA, the server certificate, and the certificates issued and revoked."""
    material = _material(home)
    ca = pki.load_cert(material.ca_pem)
    lines = [f"CA          {pki.subject_dn(ca)}",
             f"fingerprint {pki.fingerprint(ca)}",
             f"valid until {ca.not_valid_after_utc:%Y-%m-%d} UTC",
             f"files       {material.ca_pem.parent}"]
    if material.cert.exists():
        server = pki.load_cert(material.cert)
        try:
            san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            names = [str(n) for n in san.get_values_for_type(x509.DNSName)]
            names += [str(a) for a in san.get_values_for_type(x509.IPAddress)]
        except x509.ExtensionNotFound:
            names = []
        lines.append(f"server      {', '.join(names)} (until {server.not_valid_after_utc:%Y-%m-%d} UTC)")
    current = _revoked(material)
    revoked = {r.serial_number for r in current} if current is not None else set()
    issued = _issued(material)
    lines.append(f"issued      {len(issued)} client certificate(s), {len(revoked)} revoked")
    for e in issued:
        state = "revoked" if parse_serial(e["serial"]) in revoked else "valid"
        lines.append(f"  {e['serial']}  {e['kind']:<6}  {state:<7}  until {e['not_after'][:10]}  {e['dn']}")
    typer.echo("\n".join(lines))
