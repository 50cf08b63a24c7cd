"""The agent's connection to the plane outlives a heartbeat interval: a heartbeat is not a new (TLS) connection."""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter

import httpx

from tether.agent.client import KEEPALIVE_EXPIRY, make_http_client
from tether.agent.settings import AgentSettings

#: An idle time between two calls: longer than httpx's own keep-alive (5 s), shorter than the agent's.
IDLE = 6.0


async def _call_twice_each(clients: dict[str, httpx.AsyncClient], url: str) -> None:
    async def call_twice(name: str, client: httpx.AsyncClient) -> None:
        for _ in range(2):
            response = await client.get(url, headers={"X-Client": name})
            assert response.status_code == 200
            await asyncio.sleep(IDLE)

    await asyncio.gather(*(call_twice(name, client) for name, client in clients.items()))


def test_a_connection_idle_for_longer_than_httpx_keeps_one_is_used_again() -> None:
    assert 5.0 < IDLE < KEEPALIVE_EXPIRY
    opened: Counter[str] = Counter()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        counted = False
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                if not counted:
                    name = next(
                        line.split(b":", 1)[1].strip().decode()
                        for line in head.split(b"\r\n")
                        if line.lower().startswith(b"x-client:")
                    )
                    opened[name] += 1
                    counted = True
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}")
                await writer.drain()
        writer.close()

    async def main() -> None:
        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        settings = AgentSettings(plane_url=f"http://127.0.0.1:{port}", token="t", name="unit")
        clients = {
            "agent": make_http_client(settings),
            # The positive control: httpx's defaults let the connection go after 5 s idle.
            "httpx-defaults": httpx.AsyncClient(trust_env=False),
        }
        try:
            await _call_twice_each(clients, f"http://127.0.0.1:{port}/tether/v1/health")
        finally:
            for client in clients.values():
                await client.aclose()
            server.close()
            await server.wait_closed()

    asyncio.run(main())
    assert opened == {"agent": 1, "httpx-defaults": 2}
