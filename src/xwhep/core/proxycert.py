"""What client and server must agree on for X.509 login (DESIGN §6): the signed login message, and the RFC 3820
ProxyCertInfo extension that marks a proxy certificate.

``cryptography`` does not know ProxyCertInfo (it shows up as an ``UnrecognizedExtension``), so its DER is
encoded and decoded here; the structure is two nested SEQUENCEs, small enough not to need an ASN.1 library::

    ProxyCertInfo ::= SEQUENCE { pCPathLenConstraint INTEGER (0..MAX) OPTIONAL, proxyPolicy ProxyPolicy }
    ProxyPolicy   ::= SEQUENCE { policyLanguage OBJECT IDENTIFIER, policy OCTET STRING OPTIONAL }
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from cryptography import x509
from cryptography.x509.oid import NameOID

#: id-pe-proxyCertInfo (RFC 3820 §3.8).
PROXY_CERT_INFO = x509.ObjectIdentifier("1.3.6.1.5.5.7.1.14")
#: The pre-RFC "GT3" draft proxies put their ProxyCertInfo under this Globus OID.
GLOBUS_DRAFT_PROXY_CERT_INFO = x509.ObjectIdentifier("1.3.6.1.4.1.3536.1.222")
#: The proxy inherits every right of its issuer (RFC 3820 §3.8, id-ppl-inheritAll).
PPL_INHERIT_ALL = "1.3.6.1.5.5.7.21.1"
#: The proxy carries no right of its issuer (id-ppl-independent).
PPL_INDEPENDENT = "1.3.6.1.5.5.7.21.2"
#: Globus "limited proxy": meant for data movement, not for starting jobs.
PPL_LIMITED = "1.3.6.1.4.1.3536.1.1.1.9"

#: Domain separation: a signature made for an xwhep login can never be mistaken for anything else signed with
#: the same key (a TLS handshake, a proxy certificate, another protocol's challenge).
LOGIN_CONTEXT = b"xwhep-x509-login\0"


def normalize_host(host: str) -> str:
    """The form of a host name both sides sign: lowercase, no trailing dot, IP literals canonical, no brackets."""
    h = host.strip().lower().rstrip(".").strip("[]")
    try:
        return str(ipaddress.ip_address(h))
    except ValueError:
        return h


def login_message(audience: str, nonce: str) -> bytes:
    """The bytes a client signs with its leaf key to prove possession: context, server host name, nonce.

    The host name (``audience``) binds the proof to the server the client meant to reach, so a rogue server cannot
    relay a challenge from another server and replay the answer there.
    """
    return LOGIN_CONTEXT + normalize_host(audience).encode() + b"\0" + nonce.encode("ascii")


# --- a little DER ---------------------------------------------------------------------------------------------------

_SEQUENCE, _INTEGER, _OCTET_STRING, _OID = 0x30, 0x02, 0x04, 0x06


def _tlv(tag: int, body: bytes) -> bytes:
    n = len(body)
    if n < 0x80:
        return bytes([tag, n]) + body
    size = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(size)]) + size + body


def _read(data: bytes, pos: int) -> tuple[int, bytes, int]:
    """(tag, body, position after it) of the TLV at ``pos``; ValueError on anything malformed or non-minimal."""
    if pos + 2 > len(data):
        raise ValueError("truncated DER")
    tag, first = data[pos], data[pos + 1]
    pos += 2
    if first < 0x80:
        n = first
    else:
        count = first & 0x7F
        if count == 0 or count > 4 or pos + count > len(data):
            raise ValueError("bad DER length")
        n = int.from_bytes(data[pos:pos + count], "big")
        if n < 0x80 or data[pos] == 0:
            raise ValueError("non-minimal DER length")
        pos += count
    if pos + n > len(data):
        raise ValueError("truncated DER")
    return tag, data[pos:pos + n], pos + n


def _oid_bytes(dotted: str) -> bytes:
    arcs = [int(a) for a in dotted.split(".")]
    if len(arcs) < 2 or arcs[0] > 2 or (arcs[0] < 2 and arcs[1] >= 40):
        raise ValueError(f"not an OID: {dotted}")
    out = bytearray()
    for arc in [40 * arcs[0] + arcs[1], *arcs[2:]]:
        chunk = [arc & 0x7F]
        arc >>= 7
        while arc:
            chunk.append(0x80 | (arc & 0x7F))
            arc >>= 7
        out += bytes(reversed(chunk))
    return bytes(out)


def _oid_str(body: bytes) -> str:
    if not body or body[-1] & 0x80:
        raise ValueError("bad OID")
    arcs: list[int] = []
    value = 0
    for i, b in enumerate(body):
        if value == 0 and b == 0x80 and (i == 0 or not body[i - 1] & 0x80):
            raise ValueError("non-minimal OID arc")
        value = (value << 7) | (b & 0x7F)
        if not b & 0x80:
            arcs.append(value)
            value = 0
    first = arcs[0]
    head = [0, first] if first < 40 else [1, first - 40] if first < 80 else [2, first - 80]
    return ".".join(str(a) for a in head + arcs[1:])


@dataclass(frozen=True)
class ProxyCertInfo:
    """The decoded extension: how many proxies may follow, and which policy language says what it may do."""

    path_len: int | None
    language: str
    policy: bytes | None = None

    def to_der(self) -> bytes:
        body = b""
        if self.path_len is not None:
            if self.path_len < 0:
                raise ValueError("path length must not be negative")
            n = self.path_len
            body += _tlv(_INTEGER, n.to_bytes(n.bit_length() // 8 + 1, "big"))  # +1: keep the sign bit clear
        policy = _tlv(_OID, _oid_bytes(self.language))
        if self.policy is not None:
            policy += _tlv(_OCTET_STRING, self.policy)
        return _tlv(_SEQUENCE, body + _tlv(_SEQUENCE, policy))

    @classmethod
    def from_der(cls, data: bytes) -> ProxyCertInfo:
        tag, outer, end = _read(data, 0)
        if tag != _SEQUENCE or end != len(data):
            raise ValueError("ProxyCertInfo is not one SEQUENCE")
        pos, path_len = 0, None
        tag, body, nxt = _read(outer, pos)
        if tag == _INTEGER:
            if not body or body[0] & 0x80 or (len(body) > 1 and body[0] == 0 and not body[1] & 0x80):
                raise ValueError("bad pCPathLenConstraint")
            path_len = int.from_bytes(body, "big")
            pos = nxt
            tag, body, nxt = _read(outer, pos)
        if tag != _SEQUENCE or nxt != len(outer):
            raise ValueError("ProxyCertInfo has no ProxyPolicy")
        tag, oid, p = _read(body, 0)
        if tag != _OID:
            raise ValueError("ProxyPolicy has no policyLanguage")
        policy = None
        if p < len(body):
            tag, policy, p = _read(body, p)
            if tag != _OCTET_STRING or p != len(body):
                raise ValueError("bad ProxyPolicy policy")
        return cls(path_len, _oid_str(oid), policy)

    def extension(self) -> x509.UnrecognizedExtension:
        """The extension to add to a certificate builder (critical, as RFC 3820 requires)."""
        return x509.UnrecognizedExtension(PROXY_CERT_INFO, self.to_der())


def proxy_cert_info(cert: x509.Certificate) -> ProxyCertInfo | None:
    """The certificate's RFC 3820 ProxyCertInfo, or None when it has none. ValueError if present but malformed."""
    try:
        ext = cert.extensions.get_extension_for_oid(PROXY_CERT_INFO)
    except x509.ExtensionNotFound:
        return None
    value = ext.value
    if not isinstance(value, x509.UnrecognizedExtension):  # a future cryptography may parse it itself
        raise ValueError("ProxyCertInfo in an unexpected form")
    return ProxyCertInfo.from_der(value.value)


def extends_by_one_cn(subject: x509.Name, issuer: x509.Name) -> str | None:
    """The added CN when ``subject`` is ``issuer`` plus one single-valued CN RDN (the proxy naming rule), else None."""
    rdns, base = list(subject.rdns), list(issuer.rdns)
    if len(rdns) != len(base) + 1 or rdns[:-1] != base:
        return None
    last = list(rdns[-1])
    if len(last) != 1 or last[0].oid != NameOID.COMMON_NAME:
        return None
    value = last[0].value
    return value if isinstance(value, str) else None


def legacy_proxy(cert: x509.Certificate, issuer: x509.Certificate) -> str | None:
    """Why ``cert`` looks like a pre-RFC 3820 Globus proxy of ``issuer`` ("GT2 …", "GT3 …"), or None."""
    try:
        cert.extensions.get_extension_for_oid(GLOBUS_DRAFT_PROXY_CERT_INFO)
        return "GT3 draft proxy (ProxyCertInfo under the Globus OID)"
    except x509.ExtensionNotFound:
        pass
    cn = extends_by_one_cn(cert.subject, issuer.subject)
    if cn in ("proxy", "limited proxy"):
        return f"GT2 legacy proxy (CN={cn})"
    return None
