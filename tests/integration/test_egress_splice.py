"""The egress splice past its switch to the kernel (splice(2)): bulk both ways with a half-close, the
bytes a server sends first, back-pressure from a client that does not read, and the idle timeout, over
real loopback sockets. (Small exchanges, which stay on the streams, are test_egress_proxy.py's.)"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import AsyncIterator, Awaitable, Callable

from gateway.egress import splice as splice_module
from gateway.egress.splice import Carried, splice

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
MIB = 1 << 20
# The receive buffer of the test's two connecting sockets, fixed: left to autotuning, a loopback socket
# grows to net.ipv4.tcp_rmem's maximum (32 MiB on some hosts), and what a client that does not read
# leaves buffered in the kernel is then no measure of the splice's back-pressure (41 MiB seen once).
RECEIVE_BUFFER = 256 * 1024


async def connect(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    return await asyncio.open_connection(sock=sock)


@contextlib.asynccontextmanager
async def spliced(
    destination: Handler, idle_timeout_s: float = 30.0
) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter, asyncio.Future[Carried]]]:
    """A client connected to ``destination`` through ``splice``; the future: what it carried."""
    loop = asyncio.get_running_loop()
    carried: asyncio.Future[Carried] = loop.create_future()
    dest_server = await asyncio.start_server(destination, "127.0.0.1", 0)
    dest_port = dest_server.sockets[0].getsockname()[1]

    async def proxy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        dest_reader, dest_writer = await connect(dest_port)
        carried.set_result(
            await splice(reader, writer, dest_reader, dest_writer, idle_timeout_s=idle_timeout_s)
        )

    proxy_server = await asyncio.start_server(proxy, "127.0.0.1", 0)
    reader, writer = await connect(proxy_server.sockets[0].getsockname()[1])
    try:
        yield reader, writer, carried
    finally:
        writer.close()
        for server in (proxy_server, dest_server):
            server.close()
            await server.wait_closed()


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while chunk := await reader.read(64 * 1024):
        writer.write(chunk)
        await writer.drain()
    writer.close()


async def test_bulk_both_ways_and_a_half_close() -> None:
    data = os.urandom(8 * MIB)
    async with spliced(echo) as (reader, writer, carried):

        async def send() -> None:
            for offset in range(0, len(data), MIB):
                writer.write(data[offset : offset + MIB])
                await writer.drain()
            writer.write_eof()  # the echo ends only after this reached it

        sending = asyncio.ensure_future(send())
        async with asyncio.timeout(30):
            received = await reader.read()
            await sending
            result = await carried
    assert received == data
    assert (result.to_destination, result.to_vm) == (len(data), len(data))


async def test_a_server_that_speaks_first_and_a_client_that_does_not_read() -> None:
    total = 64 * MIB
    sent = 0

    async def flood(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal sent
        block = os.urandom(MIB)
        while sent < total:
            writer.write(block)
            await writer.drain()
            sent += len(block)
        writer.close()

    async with spliced(flood) as (reader, writer, carried):
        await asyncio.sleep(1.0)  # the client reads nothing meanwhile
        held = sent
        async with asyncio.timeout(30):
            received = len(await reader.read())
            writer.write_eof()  # (the splice ends when both directions have)
            result = await carried
    # Back-pressure: the server got no further than the sockets' buffers and one pipe hold.
    assert held < total // 2, held
    assert received == total and result.to_vm == total


async def test_quiet_both_ways_past_the_switch_closes_at_the_idle_timeout() -> None:
    async def then_quiet(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(bytes(splice_module.KERNEL_AFTER_BYTES + MIB))
        await writer.drain()
        await reader.read()  # until the proxy closes
        writer.close()

    async with spliced(then_quiet, idle_timeout_s=0.5) as (reader, _writer, carried):
        async with asyncio.timeout(10):
            received = await reader.read()  # EOF: the proxy closed at the idle timeout
            result = await carried
    assert len(received) == result.to_vm == splice_module.KERNEL_AFTER_BYTES + MIB
