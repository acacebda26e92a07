"""The raw data path (a port of the server's own with sealed records, keyed stream tickets; docs/tunnels.md) and
its WebSocket fallback.

* streams go over raw connections by default, spliced transport to transport in the server;
* a raw connection with a wrong, replayed or expired ticket is refused with a reason (4401 and why);
* a server without a raw port, or a raw port that cannot be reached, leaves the WebSockets: tunnels still work.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from tunnels.tunnelgrid import (
    Grid,
    echo,
    make_grid,
    needs_bwrap,
    relay_state,
    stop_grid,
    tcpserv_proxy,
    wait_for,
)

from xwhep.client import Client
from xwhep.client.config import load
from xwhep.client.streams import Dialer, RawStream, request
from xwhep.core import relaywire as wire
from xwhep.core.model import UsageLevel
from xwhep.server.auth import Identity
from xwhep.server.relay import MAX_USER_TICKETS, TICKET_TTL, Hub, Refused

pytestmark = [needs_bwrap, pytest.mark.timeout(180)]


def _tickets(conf: Path, n: int = 2) -> dict[str, Any]:
    client = Client.from_config(conf)
    try:
        r = client.http.post(client.base + "/relay/tickets", params={"n": n}, headers=client._auth_header())
        r.raise_for_status()
        return dict(r.json())
    finally:
        client.close()


def _raw_answer(port: int, ticket: dict[str, str], path: str, key: bytes | None = None,
                first: bytes | None = None) -> tuple[int, str] | str:
    """Present ``ticket`` for ``path`` on the raw port (its hello sealed with ``key``, by default the ticket's;
    or send ``first`` as it is: a replay): the close (code, reason) it got, or its text answer."""
    opener = None

    async def go() -> tuple[int, str] | str:
        nonlocal opener
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            hello, _, opener = wire.hello(ticket["id"], key or wire.decode_key(ticket["key"]), path)
            writer.write(first or hello)
            header = await reader.readexactly(wire.HEADER.size)
            kind, n = wire.HEADER.unpack(header)
            payload = await reader.readexactly(n)
        finally:
            writer.close()
        if kind == wire.CLEAR:
            return wire.parse_close(payload)
        assert opener is not None
        ((fkind, plain),) = wire.Framer().feed(opener.open(header, payload))
        return wire.parse_close(plain) if fkind == wire.CLOSE else plain.decode()

    return asyncio.run(go())


def test_streams_take_the_raw_path_by_default(grid: Grid, tcpserv: tuple[str, int]) -> None:
    uid, port = tcpserv
    assert relay_state(grid.admin)["raw_port"] > 0
    with socket.create_connection(("127.0.0.1", port), timeout=30) as held:
        held.sendall(b"HOLD\n")
        state = wait_for(lambda: (s := relay_state(grid.admin, uid))["streams"] == 1 and s, 15, "the stream")
        assert state["raw_streams"] == 1, state  # raw connection to raw connection, on both sides
    assert echo(port, b"x" * 100_000) == b"x" * 100_000


def test_wrong_and_replayed_tickets_are_refused_with_a_reason(grid: Grid) -> None:
    got = _tickets(grid.alice)
    port, (first, second) = got["port"], got["tickets"]
    assert port and got["ttl"] == TICKET_TTL
    bogus = {"id": "not-a-ticket", "key": first["key"]}
    assert _raw_answer(port, bogus, "/api/v1/hosts/x/spare") == (4401, "unknown stream ticket")
    assert _raw_answer(port, first, "/api/v1/nowhere")[0] == 4404  # the ticket is spent on its first use
    assert _raw_answer(port, first, "/api/v1/nowhere") == (4401, "this stream ticket was already used")
    # a good ticket for an endpoint whose checks fail: the endpoint's own refusal (a malformed host uid)
    assert _raw_answer(port, second, "/api/v1/hosts/bad%20uid/spare")[0] == 4400


def test_tickets_need_a_token(grid: Grid) -> None:
    r = grid.admin.http.post(grid.admin.base + "/relay/tickets")
    assert r.status_code == 401


def test_an_expired_ticket_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    import xwhep.server.relay as relay

    async def go() -> None:
        hub = Hub(b"secret")
        ident = Identity("u", "alice", UsageLevel.STANDARD_USER, None)
        (ticket, _), (fresh, _) = hub.issue_tickets(ident, 2)
        assert hub.redeem(fresh) is ident
        now = relay.time.monotonic()
        monkeypatch.setattr(relay.time, "monotonic", lambda: now + TICKET_TTL + 1)
        assert hub.redeem(ticket) == "this stream ticket expired"
        assert hub.redeem(ticket) == "this stream ticket was already used"

    asyncio.run(go())


def test_one_user_cannot_take_every_ticket() -> None:
    hub = Hub(b"secret")
    alice = Identity("a", "alice", UsageLevel.STANDARD_USER, None)
    bob = Identity("b", "bob", UsageLevel.STANDARD_USER, None)
    issued = [t for _ in range(MAX_USER_TICKETS // 16) for t in hub.issue_tickets(alice, 16)]
    with pytest.raises(Refused) as exc:
        hub.issue_tickets(alice, 16)
    assert exc.value.status == 429
    assert len(hub.issue_tickets(bob, 16)) == 16  # others are not affected
    for t, _ in issued[:16]:
        assert hub.redeem(t) is alice
    assert len(hub.issue_tickets(alice, 16)) == 16  # used tickets make room again


def test_an_unreachable_raw_port_falls_back_to_websockets(grid: Grid, tcpserv: tuple[str, int],
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The server announces a raw port this client cannot reach (a firewall, a proxy in front of the server):
    the stream is opened over a WebSocket, and the raw port is left alone for a while."""
    uid, _ = tcpserv
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))  # bound, never listening: connections to it are refused
    closed_port = closed.getsockname()[1]
    cfg = load(grid.alice)
    client = Client.from_config(grid.alice)

    async def go() -> tuple[str, str]:
        dialer = Dialer(client, cfg.ca)
        fetch = Dialer._ticket

        async def ticket(self: Dialer, force: bool = False) -> tuple[str, bytes] | None:
            t = await fetch(self, force)
            self.raw_port = closed_port
            return t

        monkeypatch.setattr(Dialer, "_ticket", ticket)
        ws = await dialer.open(f"/works/{uid}/ports/7000", raw=True)
        try:
            await request(ws)
            await ws.send(b"ECHO\nfallback")
            echoed = b""
            while len(echoed) < len(b"fallback"):
                msg = await asyncio.wait_for(ws.recv(), 30)
                if isinstance(msg, bytes):
                    echoed += msg
        finally:
            await ws.close()
        return type(ws).__name__, echoed.decode()

    try:
        kind, echoed = asyncio.run(go())
    finally:
        client.close()
        closed.close()
    assert kind != RawStream.__name__
    assert echoed == "fallback"


@pytest.fixture(scope="module")
def websocket_only(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Grid]:
    """A grid whose server has no raw port (``relay_port = -1``: a server reachable on one port only)."""
    root = tmp_path_factory.mktemp("ws-only")
    (root / "server").mkdir()
    (root / "server" / "server.toml").write_text("relay_port = -1\n")
    g = make_grid(root)
    try:
        yield g
    finally:
        stop_grid(g)


def test_a_server_without_a_raw_port_relays_over_websockets(websocket_only: Grid) -> None:
    g = websocket_only
    assert relay_state(g.admin)["raw_port"] == 0
    assert _tickets(g.alice)["port"] is None
    with tcpserv_proxy(g) as (uid, port):
        with socket.create_connection(("127.0.0.1", port), timeout=30) as held:
            held.sendall(b"HOLD\n")
            state = wait_for(lambda: (s := relay_state(g.admin, uid))["streams"] == 1 and s, 15, "the stream")
            assert state["raw_streams"] == 0
        payload = bytes(range(256)) * 4096
        assert echo(port, payload) == payload
