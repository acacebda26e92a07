"""The relay's raw stream format: the fast data path beside its WebSockets (server, ``xwproxy`` and workers).

A raw stream is a plain TCP connection to the server's raw relay port (announced with the stream tickets, see
``POST /api/v1/relay/tickets``) carrying *sealed records*, with keys that came over the authenticated HTTPS API:
every ticket comes with a random 32-byte key, which never travels on the relay port.

* The party opens with one line, ``XWRELAY2 TICKET\\n``, followed by a sealed *hello* record whose plaintext is
  PATH (the WebSocket endpoint it stands for, with its query), associated data: the record header and the ticket.
  The hello and everything the party sends the server itself are sealed with the *up* key derived from the ticket
  key, the server's answers with the *down* key (:func:`ticket_keys`). Opening the hello authenticates the party
  as the ticket's holder; the ticket is then spent (a replayed hello is refused).
* The server answers ``T accepted`` (to an initiator: ``accepted KEY``, the base64 stream key it drew for the
  stream) or a close (4000 + HTTP status and the reason). Refusals before the hello was opened (unknown, spent or
  expired ticket, a hello that fails authentication) are the only clear records: a ``C`` record (a close frame,
  not authenticated; a party takes it as a refusal only before any sealed record came).
* An initiator's ``open`` is its last record under the ticket key: what follows is the stream's, sealed with the
  stream key (:func:`stream_keys`: one key per direction, initiator → acceptor and back). The server's ``ok`` is
  its last record under the ticket key towards the initiator. A spare (acceptor) gets the stream as a JSON offer
  ``{"op": "open", …, "key": KEY}``; everything after it, both ways, is the stream's.
* Records: a 5-byte header (kind ``S`` sealed or ``F`` sealed and final — it carries the close that ends its
  sender's stream —, 4-byte big-endian length), then AES-256-GCM ciphertext and tag, associated data: the header;
  nonce: the record's number in its direction (a counter from 0 per key: a replayed, dropped, reordered or
  reflected record fails). The plaintext is one or more whole frames (below), so a record boundary is a frame
  boundary. A bad record ends the stream; so does a TCP close without a sealed close (reported as lost).
* Frames inside, mirroring WebSocket messages one for one: a 5-byte header (kind, 4-byte big-endian length) and
  its payload: ``B`` bytes, ``T`` text (``open``, ``ok``, ``eof``, JSON offers), ``C`` close (2-byte code, then
  the reason in UTF-8).

Two paired raw connections are spliced by the server without decrypting anything: it passes the records as they
come and only follows the record headers (to see an ``F``, whose close it may open for the reason, and to seal a
close of its own at a record boundary: it knows the stream key, as it knew every byte with TLS).
"""

from __future__ import annotations

import base64
import struct
from collections.abc import Callable

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

MAGIC = b"XWRELAY2"
HEADER = struct.Struct(">cI")
BIN, TEXT, CLOSE = b"B", b"T", b"C"
SEALED, FINAL, CLEAR = b"S", b"F", b"C"  # record kinds (CLEAR: a clear close, a refusal before any key)
TAG = 16  # bytes of an AES-GCM tag
KEY_SIZE = 32  # bytes of a ticket or stream key (AES-256-GCM keys are derived from it)
MAX_LINE = 256  # bytes of the first line
MAX_CONTROL = 64 * 1024  # bytes of a T or C frame (a B frame is streamed, never held whole by a splice)
MAX_FRAME = 1 << 20  # bytes of a B frame a reader may hold whole (as the WebSockets' frame limit)
ACCEPTED = "accepted"
MAX_RECORD = MAX_FRAME + 2 * HEADER.size + TAG  # bytes after a record header (one B frame of MAX_FRAME, sealed)
_NONCE = struct.Struct(">IQ")


class WireError(Exception):
    """The peer broke the format."""


def frame(kind: bytes, payload: bytes | bytearray | memoryview) -> bytes:
    return HEADER.pack(kind, len(payload)) + bytes(payload)


def close_frame(code: int, reason: str) -> bytes:
    data = reason.encode()[:120]
    return HEADER.pack(CLOSE, 2 + len(data)) + struct.pack(">H", code) + data


def parse_close(payload: bytes) -> tuple[int, str]:
    if len(payload) < 2:
        return 1005, ""
    return struct.unpack(">H", payload[:2])[0], payload[2:].decode(errors="replace")


class Framer:
    """Follows frame boundaries in a byte stream fed piece by piece.

    ``feed`` returns the complete control frames (``T``/``C``: kind, payload); ``B`` payload goes, piece by piece
    as it comes, to ``on_data`` (a memoryview valid during the call), or — without ``on_data`` — is collected
    and returned as whole ``B`` frames (at most :data:`MAX_FRAME` bytes each)."""

    __slots__ = ("cur", "hdr", "kind", "need", "on_data")

    def __init__(self, on_data: Callable[[memoryview], object] | None = None) -> None:
        self.need = 0  # payload bytes still to come in the current frame
        self.kind = b""  # kind of the current frame (b"" between frames)
        self.hdr = b""  # header bytes of the next frame received so far
        self.cur: bytearray | None = None  # payload collected so far (control frames; B without on_data)
        self.on_data = on_data

    @property
    def at_boundary(self) -> bool:
        """Between two frames (an extra frame may be written into this stream now)."""
        return not self.kind and not self.hdr

    def pending(self) -> bytes:
        """The bytes of the current, incomplete frame received so far (header and collected payload), for a
        reader that hands the stream over to plain forwarding."""
        if self.kind:
            return HEADER.pack(self.kind, self.need + len(self.cur or b"")) + bytes(self.cur or b"")
        return self.hdr

    def feed(self, data: bytes | bytearray | memoryview) -> list[tuple[bytes, bytes]]:
        out: list[tuple[bytes, bytes]] = []
        view = memoryview(data)
        n = len(view)
        i = 0
        while i < n:
            if not self.kind:
                take = HEADER.size - len(self.hdr)
                self.hdr += bytes(view[i:i + take])
                i += take
                if len(self.hdr) < HEADER.size:
                    break
                kind, length = HEADER.unpack(self.hdr)
                self.hdr = b""
                if kind not in (BIN, TEXT, CLOSE):
                    raise WireError(f"unknown frame kind {kind!r}")
                if kind != BIN and length > MAX_CONTROL:
                    raise WireError(f"control frame of {length} bytes")
                if kind == BIN and self.on_data is None and length > MAX_FRAME:
                    raise WireError(f"frame of {length} bytes (at most {MAX_FRAME})")
                self.kind, self.need = kind, length
                self.cur = None if kind == BIN and self.on_data is not None else bytearray()
            else:
                k = min(self.need, n - i)
                if k:
                    piece = view[i:i + k]
                    if self.cur is None:
                        assert self.on_data is not None
                        self.on_data(piece)
                    else:
                        self.cur += piece
                    i += k
                    self.need -= k
            if self.kind and not self.need:
                out_payload = bytes(self.cur) if self.cur is not None else b""
                if self.cur is not None or self.kind != BIN:
                    out.append((self.kind, out_payload))
                self.kind, self.cur = b"", None
        return out


# -- sealed records -------------------------------------------------------------------------------------------------

def _derive(key: bytes, salt: bytes | None, label: bytes) -> bytes:
    return HKDF(algorithm=SHA256(), length=32, salt=salt, info=b"xwhep relay 2: " + label).derive(key)


def ticket_keys(key: bytes, ticket: str) -> tuple[bytes, bytes]:
    """The keys a ticket's holder and the server talk with: (up: party → server, down: server → party)."""
    salt = ticket.encode()
    return _derive(key, salt, b"party to server"), _derive(key, salt, b"server to party")


def stream_keys(key: bytes) -> tuple[bytes, bytes]:
    """The keys of a stream: (initiator → acceptor, acceptor → initiator)."""
    return _derive(key, None, b"initiator to acceptor"), _derive(key, None, b"acceptor to initiator")


def encode_key(key: bytes) -> str:
    return base64.urlsafe_b64encode(key).decode()


def decode_key(text: str) -> bytes:
    try:
        key = base64.urlsafe_b64decode(text.encode())
    except ValueError:
        raise WireError("malformed key") from None
    if len(key) != KEY_SIZE:
        raise WireError("malformed key")
    return key


class Sealer:
    """The sending state of one direction: its key and the number of the next record."""

    __slots__ = ("aead", "n")

    def __init__(self, key: bytes, n: int = 0) -> None:
        self.aead = AESGCM(key)
        self.n = n

    def seal(self, plain: bytes | bytearray | memoryview, final: bool = False, extra: bytes = b"") -> bytes:
        """One record (header and ciphertext) of ``plain`` (whole frames)."""
        header = HEADER.pack(FINAL if final else SEALED, len(plain) + TAG)
        n, self.n = self.n, self.n + 1
        return header + self.aead.encrypt(_NONCE.pack(0, n), bytes(plain), header + extra)

    def seal_into(self, out: memoryview, plain: memoryview) -> int:
        """Write one record of ``plain`` into ``out`` (room: header + len(plain) + TAG); its length."""
        length = len(plain) + TAG
        HEADER.pack_into(out, 0, SEALED, length)
        n, self.n = self.n, self.n + 1
        self.aead.encrypt_into(_NONCE.pack(0, n), plain, out[:HEADER.size], out[HEADER.size:HEADER.size + length])
        return HEADER.size + length

    def frames(self, *frames: bytes, final: bool = False) -> bytes:
        return self.seal(b"".join(frames), final)


def unseal(aead: AESGCM, n: int, header: bytes, body: bytes | bytearray | memoryview, extra: bytes = b"") -> bytes:
    """The plaintext of record number ``n``; :class:`WireError` if it fails authentication."""
    try:
        return aead.decrypt(_NONCE.pack(0, n), bytes(body), header + extra)
    except InvalidTag:
        raise WireError("a record failed authentication") from None


class Opener:
    """The receiving state of one direction: its key and the number of the next record."""

    __slots__ = ("aead", "n")

    def __init__(self, key: bytes, n: int = 0) -> None:
        self.aead = AESGCM(key)
        self.n = n

    def open(self, header: bytes | memoryview, body: bytes | bytearray | memoryview, extra: bytes = b"") -> bytes:
        """The plaintext of the next record; :class:`WireError` if it fails authentication."""
        plain = unseal(self.aead, self.n, bytes(header), body, extra)
        self.n += 1
        return plain

    def open_into(self, header: memoryview, body: memoryview, out: memoryview) -> int:
        """Decrypt the next record into ``out`` (room: len(body) - TAG); the plaintext's length."""
        try:
            n = self.aead.decrypt_into(_NONCE.pack(0, self.n), body, header, out[:len(body) - TAG])
        except (InvalidTag, ValueError):
            raise WireError("a record failed authentication") from None
        self.n += 1
        return int(n)


def check_header(kind: bytes, length: int) -> None:
    if kind not in (SEALED, FINAL, CLEAR):
        raise WireError(f"unknown record kind {kind!r}")
    if length > MAX_RECORD or (kind != CLEAR and length < TAG) or (kind == CLEAR and length > MAX_CONTROL):
        raise WireError(f"record of {length} bytes")


def clear_close(code: int, reason: str) -> bytes:
    """A refusal before any key (not authenticated: the party takes it only before its first sealed record)."""
    data = close_frame(code, reason)[HEADER.size:]
    return HEADER.pack(CLEAR, len(data)) + data


def hello(ticket: str, key: bytes, target: str) -> tuple[bytes, Sealer, Opener]:
    """The first bytes of a raw connection (line and sealed hello), and the party's sealer and opener."""
    up, down = ticket_keys(key, ticket)
    sealer = Sealer(up)
    first = MAGIC + b" " + ticket.encode() + b"\n" + sealer.seal(target.encode(), extra=ticket.encode())
    return first, sealer, Opener(down)
