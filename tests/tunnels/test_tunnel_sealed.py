"""The raw relay port's sealed records (docs/relay-speed.md, xwhep/core/relaywire.py), attacked on the path.

* a hello sealed with another key than its ticket's is refused (an event of the ticket's user), and does not spend
  the ticket; a replayed hello is refused (the ticket was spent);
* a record tampered with on the way aborts the stream: the client sees an error, never altered data;
* a stream whose TCP connection is closed without a sealed close is reported lost (the local side is reset), not
  ended;
* a record sent back to its sender (towards the client, or towards the server) fails authentication.

The attacks go through a small TCP proxy in front of the raw port that sees each record go by.
"""

from __future__ import annotations

import asyncio
import secrets
import socket
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pytest
from tunnels.test_tunnel_raw import _raw_answer, _tickets
from tunnels.tunnelgrid import Grid, needs_bwrap, relay_state
from websockets.exceptions import ConnectionClosed

from xwhep.client import Client
from xwhep.client.config import load
from xwhep.client.streams import LOST, Dialer, RawStream, StreamError, local_socket, request, splice
from xwhep.core import relaywire as wire

pytestmark = [needs_bwrap, pytest.mark.timeout(180)]

T = TypeVar("T")
Hook = Callable[[int, bytes, "OnPath"], bytes | None]


class OnPath:
    """A TCP proxy in front of the raw relay port, for one connection: the first line passes as it is, then each
    record goes through ``up`` (client → server) or ``down`` hooks: (its number, the record) → what to pass on
    (None: close both connections there)."""

    def __init__(self, target: int, up: Hook | None = None, down: Hook | None = None) -> None:
        self.target = target
        self.up, self.down = up, down
        self.client: asyncio.StreamWriter | None = None
        self.server: asyncio.StreamWriter | None = None
        self.seen: dict[str, list[bytes]] = {"up": [], "down": []}
        self._server: asyncio.Server | None = None

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return int(self._server.sockets[0].getsockname()[1])

    async def _handle(self, creader: asyncio.StreamReader, cwriter: asyncio.StreamWriter) -> None:
        sreader, swriter = await asyncio.open_connection("127.0.0.1", self.target)
        self.client, self.server = cwriter, swriter
        swriter.write(await creader.readline())
        await asyncio.gather(self._pump("up", creader, swriter, self.up),
                             self._pump("down", sreader, cwriter, self.down), return_exceptions=True)

    async def _pump(self, name: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    hook: Hook | None) -> None:
        try:
            while True:
                header = await reader.readexactly(wire.HEADER.size)
                record = header + await reader.readexactly(wire.HEADER.unpack(header)[1])
                self.seen[name].append(record)
                out = record if hook is None else hook(len(self.seen[name]) - 1, record, self)
                if out is None:
                    self.cut()
                    return
                writer.write(out)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    def cut(self) -> None:
        """Close both connections (a plain TCP close, FIN: no sealed close)."""
        for w in (self.client, self.server):
            if w is not None:
                w.close()

    def close(self) -> None:
        if self._server is not None:
            self._server.close()


def _through(grid: Grid, work: str, body: Callable[[RawStream], Awaitable[T]], up: Hook | None = None,
             down: Hook | None = None) -> T:
    """Open a raw stream as alice to the tcpserv of ``work`` through an :class:`OnPath` proxy with those hooks;
    ``body(stream)``."""
    raw_port = relay_state(grid.admin)["raw_port"]
    cfg = load(grid.alice)
    client = Client.from_config(grid.alice)

    async def go() -> T:
        proxy = OnPath(raw_port, up, down)
        port = await proxy.start()

        class Via(Dialer):
            async def _ticket(self, force: bool = False) -> tuple[str, bytes] | None:
                got = await super()._ticket(force)
                self.raw_port = port
                return got

        try:
            ws = await Via(client, cfg.ca).open(f"/works/{work}/ports/7000", raw=True)
            assert isinstance(ws, RawStream)
            return await body(ws)
        finally:
            proxy.close()

    try:
        return asyncio.run(go())
    finally:
        client.close()


async def _drain(ws: RawStream) -> tuple[bytes, ConnectionClosed]:
    """Everything the stream delivers until it fails (it must): the bytes, and how it ended."""
    got = b""
    try:
        while True:
            msg = await asyncio.wait_for(ws.recv(), 30)
            if isinstance(msg, bytes):
                got += msg
    except ConnectionClosed as exc:
        return got, exc


def _refusals(grid: Grid, needle: str) -> list[dict[str, Any]]:
    return [e for e in grid.admin.events(limit=5000) if e["action"] == "tunnel.refuse"
            and needle in (e.get("detail") or "") and e["actor"] == grid.users["alice"]]


def test_a_hello_sealed_with_a_wrong_key_is_refused(grid: Grid) -> None:
    got = _tickets(grid.alice, 1)
    port, (ticket,) = got["port"], got["tickets"]
    before = len(_refusals(grid, "the hello failed authentication"))
    wrong = secrets.token_bytes(wire.KEY_SIZE)
    answer = _raw_answer(port, ticket, "/api/v1/nowhere", key=wrong)
    assert answer[0] == 4401 and "the hello failed authentication" in str(answer[1]), answer
    assert len(_refusals(grid, "the hello failed authentication")) == before + 1  # the ticket's user sees it
    # whoever saw the ticket go by cannot spend it: its holder still can
    assert _raw_answer(port, ticket, "/api/v1/nowhere")[0] == 4404


def test_a_replayed_hello_is_refused(grid: Grid) -> None:
    got = _tickets(grid.alice, 1)
    port, (ticket,) = got["port"], got["tickets"]
    first, _, _ = wire.hello(ticket["id"], wire.decode_key(ticket["key"]), "/api/v1/nowhere")
    assert _raw_answer(port, ticket, "", first=first)[0] == 4404  # the endpoint's own answer: the hello opened
    assert _raw_answer(port, ticket, "", first=first) == (4401, "this stream ticket was already used")
    assert _refusals(grid, "this stream ticket was already used")


def test_a_tampered_record_aborts_the_stream(grid: Grid, tcpserv: tuple[str, int]) -> None:
    def flip(i: int, record: bytes, _: OnPath) -> bytes:
        if i != 2:  # 0: accepted, 1: ok, 2: the first record of the stream (the echo)
            return record
        altered = bytearray(record)
        altered[-20] ^= 0x01
        return bytes(altered)

    async def body(ws: RawStream) -> tuple[bytes, ConnectionClosed]:
        await request(ws)
        await ws.send(b"ECHO\n" + b"x" * 1000)
        return await _drain(ws)

    got, exc = _through(grid, tcpserv[0], body, down=flip)
    assert got == b""  # nothing of the altered record, nor after it
    assert exc.rcvd is not None and exc.rcvd.code == 1002 and "failed authentication" in exc.rcvd.reason


def test_a_truncated_stream_is_lost_not_ended(grid: Grid, tcpserv: tuple[str, int]) -> None:
    """The connection is closed (FIN) after the first record of the echo: the application sees a reset, the
    splice reports the stream lost."""
    def cut_after_first(i: int, record: bytes, proxy: OnPath) -> bytes:
        if i == 2:
            asyncio.get_running_loop().call_soon(proxy.cut)  # after this record went out
        return record

    async def body(ws: RawStream) -> tuple[bytes, type[BaseException] | None, StreamError | None]:
        loop = asyncio.get_running_loop()
        listener = socket.create_server(("127.0.0.1", 0))
        app = socket.socket()
        app.setblocking(False)
        await loop.sock_connect(app, listener.getsockname())
        local, _ = listener.accept()
        listener.close()
        await request(ws)
        spliced = asyncio.create_task(splice(ws, local_socket(local)))
        await loop.sock_sendall(app, b"ECHO\nhello")
        got = b""
        failure: type[BaseException] | None = None
        try:
            while True:
                chunk = await asyncio.wait_for(loop.sock_recv(app, 1000), 30)
                if not chunk:
                    break
                got += chunk
        except ConnectionResetError as exc:
            failure = type(exc)
        finally:
            app.close()
        return got, failure, await asyncio.wait_for(spliced, 30)

    got, failure, err = _through(grid, tcpserv[0], body, down=cut_after_first)
    assert got == b"hello"
    assert failure is ConnectionResetError  # not a clean end of file
    assert err is not None and err.message == LOST


def test_a_record_sent_back_to_its_client_fails(grid: Grid, tcpserv: tuple[str, int]) -> None:
    def reflect(i: int, record: bytes, proxy: OnPath) -> bytes:
        if i == 2:  # 0: hello, 1: open, 2: the client's first record of the stream, also sent back to it
            assert proxy.client is not None
            proxy.client.write(record)
        return record

    async def body(ws: RawStream) -> tuple[bytes, ConnectionClosed]:
        await request(ws)
        await ws.send(b"ECHO\nreflected")
        return await _drain(ws)

    got, exc = _through(grid, tcpserv[0], body, up=reflect)
    assert b"reflected".startswith(got)  # at most the genuine echo, never the client's own record
    assert exc.rcvd is not None and exc.rcvd.code == 1002 and "failed authentication" in exc.rcvd.reason


def test_a_record_sent_back_to_the_server_fails(grid: Grid, tcpserv: tuple[str, int]) -> None:
    """The server's ``accepted`` record replayed to it as the client's ``open``: refused, with a sealed reason."""
    def reflect(i: int, record: bytes, proxy: OnPath) -> bytes:
        return proxy.seen["down"][0] if i == 1 else record

    async def body(ws: RawStream) -> StreamError:
        with pytest.raises(StreamError) as exc:
            await request(ws)
        return exc.value

    err = _through(grid, tcpserv[0], body, up=reflect)
    assert "failed authentication" in err.message


def test_the_server_seals_its_own_close_into_a_spliced_stream(monkeypatch: pytest.MonkeyPatch) -> None:
    """A hub on loopback splices an initiator and a spare (raw to raw: nothing decrypted) and then ends the stream
    itself ("the work ended"): both ends read that reason, sealed by the server at a record boundary."""
    import xwhep.server.relay as relay
    from xwhep.core.model import UsageLevel
    from xwhep.server.auth import Identity

    monkeypatch.setattr(relay, "WATCH_PERIOD", 0.05)

    async def go() -> tuple[bytes, bytes, tuple[int, str], tuple[int, str], bool]:
        hub = relay.Hub(b"secret")
        ident = Identity("u", "alice", UsageLevel.STANDARD_USER, None)
        ch = relay.Channel("host", "h", "u", None)  # type: ignore[arg-type]  # streams go to its spares only
        ended = asyncio.Event()
        spliced: list[relay.Stream] = []

        async def dispatch(side: relay.RawSide, hello: relay.Hello) -> None:
            if hello.target == "spare":
                await side.accept()
                spare = relay.Spare("host", "h", "u", side)
                hub.add_spare(spare)
                await spare.done.wait()
                return
            side.accept_initiator()
            assert (await side.receive()).get("text") == "open"
            s = await hub.connect(ch, {"task": "t"}, key=side.stream_key)
            await side.send_text("ok")
            side.enter_stream()
            spliced.append(s)
            await hub.splice(s, side, lambda: "the work ended" if ended.is_set() else None)

        sock = socket.create_server(("127.0.0.1", 0))
        await hub.serve_raw(sock, dispatch)
        loop = asyncio.get_running_loop()

        async def dial(target: str) -> RawStream:
            (ticket, key), = hub.issue_tickets(ident, 1)
            _, ws = await loop.create_connection(RawStream, "127.0.0.1", hub.raw_port)
            ws.hello(ticket, key, target)
            assert await ws.recv() == wire.ACCEPTED
            return ws

        spare = await dial("spare")
        initiator = await dial("work")
        await initiator.send("open")
        offer = await spare.recv()
        assert isinstance(offer, str) and '"task": "t"' in offer and "key" not in offer
        assert await initiator.recv() == "ok"
        await initiator.send(b"up")
        await spare.send(b"down")
        up, down = await spare.recv(), await initiator.recv()
        raw = bool(spliced) and hub.stats()["raw_streams"] == 1
        ended.set()
        closes = []
        for ws in (initiator, spare):
            with pytest.raises(ConnectionClosed) as exc:
                await asyncio.wait_for(ws.recv(), 10)
            assert exc.value.rcvd is not None
            closes.append((exc.value.rcvd.code, exc.value.rcvd.reason))
        await hub.close()
        sock.close()
        assert isinstance(up, bytes) and isinstance(down, bytes)
        return up, down, closes[0], closes[1], raw

    up, down, to_initiator, to_spare, raw = asyncio.run(go())
    assert (up, down) == (b"up", b"down") and raw
    assert to_initiator == to_spare == (relay.CLOSE_WORK_ENDED, "the work ended")
