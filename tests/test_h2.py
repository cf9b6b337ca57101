"""HTTP/2 clients (the `h2` package, a real HTTP/2 implementation) against a real
`modelpool serve` with `--max-connections 5`.

The service speaks HTTP/1.1 only. Whatever HTTP/2 clients do, and however many come,
they are told so at once, and keep no one out and hold up no stop. Each client here
opens its flow-control window at 0, so that an HTTP/2 server could send it no answer.
"""

from __future__ import annotations

import signal

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.settings
import httpx
import trio

from conftest import SCRIPTED, error_body
from serverproc import server_process, wait_listening, wait_ready

SERVE = ("--model-cmd", " ".join(SCRIPTED), "--workers", "1", "--max-connections", "5")
NO_WINDOW = {h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 0}


def address(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    return host, int(port)


class H2Client:
    """One HTTP/2 connection, with prior knowledge, that asks for GET /healthz."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.h2 = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        self.h2.local_settings = h2.settings.Settings(client=True, initial_values=NO_WINDOW)
        self.events: list[h2.events.Event] = []

    @classmethod
    async def open(cls, url: str) -> H2Client:
        client = cls(await trio.open_tcp_stream(*address(url)))
        client.h2.initiate_connection()
        headers = [(":method", "GET"), (":path", "/healthz"), (":scheme", "http")]
        client.h2.send_headers(1, [*headers, (":authority", "test")], end_stream=True)
        await client.stream.send_all(client.h2.data_to_send())
        return client

    async def read_until_closed(self, within: float) -> None:
        """Every frame the server sends until it closes the connection (or fail)."""
        with trio.fail_after(within):
            while True:
                try:
                    data = await self.stream.receive_some(65536)
                except trio.BrokenResourceError:  # reset: whatever came before is read
                    return
                if not data:
                    return
                self.events += self.h2.receive_data(data)

    def told_http_1_1_required(self) -> bool:
        return any(
            isinstance(event, h2.events.ConnectionTerminated)
            and event.error_code == h2.errors.ErrorCodes.HTTP_1_1_REQUIRED
            for event in self.events
        )


def upgrade_settings() -> str:
    """The HTTP2-Settings header of an `Upgrade: h2c` request, with no window either."""
    connection = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    connection.local_settings = h2.settings.Settings(client=True, initial_values=NO_WINDOW)
    header = connection.initiate_upgrade_connection()
    assert header is not None
    return header.decode()


async def clients_that_go_after(url: str, count: int, seconds: float) -> None:
    """`count` HTTP/2 clients at once, each gone after `seconds`, as the red team's were."""
    clients = [await H2Client.open(url) for _ in range(count)]
    await trio.sleep(seconds)
    for client in clients:
        await client.stream.aclose()


async def status_connections(client: httpx.AsyncClient) -> dict:
    return (await client.get("/status")).json()["connections"]


async def test_an_http2_client_is_told_at_once_to_use_http_1_1() -> None:
    async with server_process(*SERVE) as server, await wait_listening(server) as client:
        await wait_ready(client, 1, within=15)
        h2_client = await H2Client.open(server.url)
        await h2_client.read_until_closed(within=5)
        assert h2_client.told_http_1_1_required(), h2_client.events
        assert not any(isinstance(e, h2.events.ResponseReceived) for e in h2_client.events)
        await h2_client.stream.aclose()
        # `Upgrade: h2c` is ignored: the answer comes in HTTP/1.1, on a connection that stays
        upgrade = {
            "Connection": "Upgrade, HTTP2-Settings",
            "Upgrade": "h2c",
            "HTTP2-Settings": upgrade_settings(),
        }
        with trio.fail_after(5):
            async with await trio.open_tcp_stream(*address(server.url)) as raw:
                head = "".join(f"{name}: {value}\r\n" for name, value in upgrade.items())
                request = f"GET /healthz HTTP/1.1\r\nHost: localhost\r\n{head}\r\n".encode()
                await raw.send_all(request * 2)
                answer = b""
                while answer.count(b'{"status": "ok"}\n') < 2:
                    answer += await raw.receive_some(65536)
        assert answer.startswith(b"HTTP/1.1 200 ")
        assert b" 101 " not in answer
        server.proc.send_signal(signal.SIGTERM)
        assert await server.exit_code(within=15) == 0


async def test_http2_clients_keep_no_one_out_and_hold_up_no_graceful_stop() -> None:
    async with server_process(*SERVE) as server, await wait_listening(server) as client:
        await wait_ready(client, 1, within=15)
        for _ in range(6):  # five at a time, each gone after a second, as the red team did
            await clients_that_go_after(server.url, 5, 1.0)
        staying = [await H2Client.open(server.url) for _ in range(5)]  # and five that stay
        await trio.sleep(1)
        # (a) new clients are still served, at once
        with trio.fail_after(5):
            async with httpx.AsyncClient(base_url=server.url, timeout=5) as newcomer:
                assert (await newcomer.get("/healthz")).json() == {"status": "ok"}
                assert (await newcomer.post("/predict", json={"n": 1})).json()["echo"] == {"n": 1}
                assert (await status_connections(newcomer))["open"] <= 5
        # (b) SIGTERM stops the service within its bounds, with them still connected
        started = trio.current_time()
        server.proc.send_signal(signal.SIGTERM)
        assert await server.exit_code(within=15) == 0
        assert trio.current_time() - started < 10
        for h2_client in staying:
            await h2_client.read_until_closed(within=1)
            assert h2_client.told_http_1_1_required()
            await h2_client.stream.aclose()


async def test_a_second_signal_stops_the_service_at_once_whatever_http2_clients_do() -> None:
    serve = server_process(*SERVE, "--timeout", "60")
    async with serve as server, await wait_listening(server) as client:
        await wait_ready(client, 1, within=15)
        answers: list[httpx.Response] = []

        async def long_request() -> None:  # keeps the graceful stop draining for 30 s
            answers.append(await client.post("/predict", json={"sleep": 30}))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(long_request)
            await trio.sleep(0.5)
            staying = [await H2Client.open(server.url) for _ in range(4)]
            await trio.sleep(1)
            server.proc.send_signal(signal.SIGTERM)
            await trio.sleep(0.5)
            started = trio.current_time()
            server.proc.send_signal(signal.SIGTERM)
            # (c) a second signal stops the service at once
            assert await server.exit_code(within=15) == 0
            assert trio.current_time() - started < 3
        error_body(answers[0], 503, "shutting down")
        for h2_client in staying:
            await h2_client.stream.aclose()
