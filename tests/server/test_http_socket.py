"""The server's listening socket: what asyncio makes of the connections it accepts."""

from __future__ import annotations

import asyncio
import socket

from erllama_py.server.http_child import bind_socket


def test_accepted_connections_send_without_nagle_delay():
    # asyncio turns TCP_NODELAY on only for sockets whose proto is IPPROTO_TCP; without it
    # a response's body waited behind its headers for the client's delayed ACK.
    async def accepted_nodelay() -> int:
        sock = bind_socket("127.0.0.1", 0)
        seen: asyncio.Future[int] = asyncio.get_running_loop().create_future()

        async def on_connect(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            conn = writer.get_extra_info("socket")
            seen.set_result(conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            writer.close()

        server = await asyncio.start_server(on_connect, sock=sock)
        async with server:
            _, writer = await asyncio.open_connection(*sock.getsockname()[:2])
            value = await asyncio.wait_for(seen, 30)
            writer.close()
        return value

    assert asyncio.run(accepted_nodelay()) != 0
