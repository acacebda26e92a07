"""The SDK's HTTP transport: httpx as usual, over connections that read every TLS record already received at once.

A TLS read returns one record (16 KiB at most), and httpx hands each read to its HTTP/1.1 parser as one event:
downloading 1 GiB took 65,536 trips through httpcore and h11, about 2 ms of client CPU per MiB, more than the
decryption itself (measured with cProfile). Here a read takes the first record as usual, then, without
waiting, whatever further records are already there, up to the size httpcore asked for (64 KiB): four
records per parser event instead of one. Nothing else changes: same pool, same TLS, same timeouts and errors.

httpx offers no way to give its default transport another network backend, so :class:`Transport` builds its
connection pool itself (httpcore's public API) and keeps everything else of ``httpx.HTTPTransport``. Proxies
from the environment (``HTTPS_PROXY`` …) are httpx's business: with one set, :func:`transport` returns None and
the client is built as before.
"""

from __future__ import annotations

import os
import socket
import ssl
from collections.abc import Iterable
from typing import Any

import httpcore
import httpx

_PROXY_VARS = ("https_proxy", "http_proxy", "all_proxy")


class _GatheringStream(httpcore.NetworkStream):
    """A connection whose ``read`` also takes the bytes that already arrived behind the first ones."""

    def __init__(self, inner: httpcore.NetworkStream) -> None:
        self._inner = inner

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        data = self._inner.read(max_bytes, timeout)  # blocks (with the timeout) for the first bytes, maps errors
        if not data or len(data) >= max_bytes:
            return data
        sock = self._inner.get_extra_info("socket")
        if not isinstance(sock, socket.socket):
            return data
        parts = [data]
        n = len(data)
        sock.settimeout(0.0)
        try:
            while n < max_bytes:
                try:
                    more = sock.recv(max_bytes - n)
                except OSError:  # nothing more yet (would block), or a real error: the next read raises it,
                    break  # mapped as httpcore maps it
                if not more:
                    break  # the peer closed: the next read sees it too
                parts.append(more)
                n += len(more)
        finally:
            sock.settimeout(timeout)
        return b"".join(parts) if len(parts) > 1 else data

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._inner.write(buffer, timeout)

    def close(self) -> None:
        self._inner.close()

    def start_tls(self, ssl_context: ssl.SSLContext, server_hostname: str | None = None,
                  timeout: float | None = None) -> httpcore.NetworkStream:
        return _GatheringStream(self._inner.start_tls(ssl_context, server_hostname, timeout))

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)


class _GatheringBackend(httpcore.SyncBackend):
    def connect_tcp(self, host: str, port: int, timeout: float | None = None, local_address: str | None = None,
                    socket_options: Iterable[Any] | None = None) -> httpcore.NetworkStream:
        return _GatheringStream(super().connect_tcp(host, port, timeout, local_address, socket_options))


class Transport(httpx.HTTPTransport):
    """``httpx.HTTPTransport`` whose connections gather TLS records (see the module's docstring)."""

    def __init__(self, verify: ssl.SSLContext | bool, limits: httpx.Limits) -> None:
        ctx = httpx.create_ssl_context(verify=verify)  # once: with verify=True it loads the CA bundle
        super().__init__(verify=ctx, limits=limits)
        self._pool = httpcore.ConnectionPool(
            ssl_context=ctx, max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections, keepalive_expiry=limits.keepalive_expiry,
            network_backend=_GatheringBackend())


def transport(verify: ssl.SSLContext | bool, limits: httpx.Limits) -> Transport | None:
    """The SDK's transport, or None when a proxy is configured in the environment (httpx then handles it)."""
    if any(os.environ.get(v) or os.environ.get(v.upper()) for v in _PROXY_VARS):
        return None
    return Transport(verify, limits)
