"""The relay's raw stream format: the fast data path beside its WebSockets (server, ``xwproxy`` and workers).

A raw stream is a TLS connection to the server's raw relay port (announced with the stream tickets, see
``POST /api/v1/relay/tickets``). It starts with one line, ``XWRELAY1 TICKET PATH\\n`` (PATH: the WebSocket
endpoint it stands for, with its query), answered by a ``T accepted`` frame or a ``C`` frame (4000 + HTTP status
and the reason). Then frames, each a 5-byte header (kind, 4-byte big-endian length) and its payload, mirroring
WebSocket messages one for one: ``B`` bytes, ``T`` text (``open``, ``ok``, ``eof``, JSON offers), ``C`` close
(2-byte code, then the reason in UTF-8). Nothing is masked, and a splicing server forwards the bytes as they come,
only following the frame boundaries (to see a close, or to add its own at a boundary).
"""

from __future__ import annotations

import struct
from collections.abc import Callable

MAGIC = b"XWRELAY1"
HEADER = struct.Struct(">cI")
BIN, TEXT, CLOSE = b"B", b"T", b"C"
MAX_LINE = 4096  # bytes of the first line
MAX_CONTROL = 64 * 1024  # bytes of a T or C frame (a B frame is streamed, never held whole by a splice)
MAX_FRAME = 1 << 20  # bytes of a B frame a reader may hold whole (as the WebSockets' frame limit)
ACCEPTED = "accepted"


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
