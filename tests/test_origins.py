"""Without an API key, web pages cannot drive the service (origins.py, admin.py).

A request whose `Host` is not one of the service's names (DNS rebinding) is refused on
every path, a request that changes something from the page of another origin is refused,
and the admin routes take only JSON; with an API key none of it is in the way of a proxy.
Each HTTP test runs against both `/predict` paths, the fast path and the quart route.
The same attacks from a real browser are in test_browser_origin.py.
"""

from __future__ import annotations

import signal
from pathlib import Path

import httpx
import pytest
from test_systemd import MODELPOOL, activated, held_socket, running

from conftest import (
    FAST_MODEL3,
    FAST_PREDICT_VARIABLE,
    RunningServer,
    error_body,
    running_server,
    scripted_config,
)
from modelpool import ServerConfig
from modelpool.cli.parser import parse
from modelpool.http.origins import Authority, Origins, parse_authority
from modelpool.settings.config import ConfigError
from serverproc import clean_env, wait_listening

KEY = "a-key-for-the-tests-of-hosts-and-origins"
FOREIGN_HOSTS = [
    "evil.example",
    "evil.example:{port}",
    "localhost.evil.example:{port}",
    "127.0.0.1.nip.io:{port}",
    "EVIL.example.:{port}",
    "[::1].evil.example",
    "user@localhost:{port}",
    "localhost:{port}:{port}",
    "::1",  # an IPv6 address without its brackets is no host
    "[::1",
    "localhost:99999",
    "192.0.2.7:{port}",  # an address, but not one the service listens on
]
OWN_HOSTS = [
    "127.0.0.1:{port}",
    "127.0.0.1",
    "localhost",
    "LocalHost.:{port}",
    "[::1]:{port}",
    "[::1]",
    "127.0.0.2:{port}",  # every loopback address is this machine's
]


@pytest.fixture(params=["0", "1"], ids=["quart", "fast"])
def predict_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run the test against the quart route and against the fast path of /predict."""
    monkeypatch.setenv(FAST_PREDICT_VARIABLE, request.param)  # read as the service starts
    return str(request.param)


def port_of(server: RunningServer) -> int:
    return int(server.url.rsplit(":", 1)[1])


def forbidden(response: httpx.Response, mentions: str) -> None:
    body = error_body(response, 403, "forbidden")
    assert mentions in body["detail"], body


ROUTES = [
    ("GET", "/", {}),
    ("GET", "/healthz", {}),
    ("GET", "/readyz", {}),
    ("GET", "/status", {}),
    ("GET", "/metrics", {}),
    ("GET", "/no-such-path", {}),
    ("OPTIONS", "/predict", {}),
    ("POST", "/predict", {"json": {"n": 1}}),
    ("POST", "/admin/scale", {"json": {"workers": 3}}),
    ("POST", "/admin/reload", {"json": {}}),
]


@pytest.mark.usefixtures("predict_path")
async def test_a_foreign_host_is_refused_on_every_route() -> None:
    """DNS rebinding: the browser sends the page's own name in Host, and gets 403."""
    async with running_server(scripted_config(workers=2)) as server:
        await server.pool.wait_ready()
        port = port_of(server)
        for method, path, sent in ROUTES:
            for host in FOREIGN_HOSTS:
                headers = {"Host": host.format(port=port)}
                response = await server.client.request(method, path, headers=headers, **sent)
                forbidden(response, "is not a name of this service")
                assert "--allowed-hosts" in response.json()["detail"]
        assert len(server.pool.workers) == 2
        assert sum(worker.served for worker in server.pool.workers) == 0  # no model was asked
        assert server.pool.generation == 1  # nor reloaded


@pytest.mark.usefixtures("predict_path")
async def test_the_services_own_names_are_answered() -> None:
    async with running_server(scripted_config(workers=1)) as server:
        await server.pool.wait_ready()
        port = port_of(server)
        for host in OWN_HOSTS:
            headers = {"Host": host.format(port=port)}
            response = await server.client.post("/predict", json={"n": 1}, headers=headers)
            assert response.status_code == 200, (host, response.text)
            assert (await server.client.get("/", headers=headers)).status_code == 200
        assert server.pool.workers[0].served == len(OWN_HOSTS)


@pytest.mark.usefixtures("predict_path")
async def test_a_page_of_another_origin_may_not_change_anything() -> None:
    """POST /predict and the admin routes refuse a foreign Origin; reading is not refused
    (a browser hides the answer from a page of another origin anyway)."""
    async with running_server(scripted_config(workers=2)) as server:
        await server.pool.wait_ready()
        port = port_of(server)
        host = {"Host": f"127.0.0.1:{port}"}
        foreign = [
            "http://evil.example",
            f"http://127.0.0.1:{port + 1}",  # another service on this machine
            f"http://localhost:{port}",  # another name is another origin
            f"http://127.0.0.2:{port}",
            "null",  # a sandboxed frame, a file
            f"file://127.0.0.1:{port}",
            "nonsense",
        ]
        for origin in foreign:
            headers = {**host, "Origin": origin}
            for path, body in (("/predict", {"n": 1}), ("/admin/scale", {"workers": 3})):
                response = await server.client.post(path, json=body, headers=headers)
                forbidden(response, "from the page of another origin")
            response = await server.client.get("/status", headers=headers)
            assert response.status_code == 200
        assert len(server.pool.workers) == 2
        assert sum(worker.served for worker in server.pool.workers) == 0

        for origin in (f"http://127.0.0.1:{port}", f"HTTPS://127.0.0.1:{port}"):
            headers = {**host, "Origin": origin}
            response = await server.client.post("/predict", json={"n": 1}, headers=headers)
            assert response.status_code == 200, response.text
        headers = {"Host": "localhost", "Origin": "http://localhost:80"}  # the default port
        response = await server.client.post("/predict", json={"n": 2}, headers=headers)
        assert response.status_code == 200, response.text
        headers = {**host, "Origin": f"http://127.0.0.1:{port}"}  # the status page's own
        response = await server.client.post("/admin/scale", json={"workers": 3}, headers=headers)
        assert response.status_code == 200, response.text
        assert len(server.pool.workers) == 3


@pytest.mark.parametrize("api_key", [None, KEY])
async def test_the_admin_routes_take_only_json(api_key: str | None) -> None:
    """A form or a text/plain body is what a page may send to another origin without a
    preflight: the admin routes answer it 415, with a key or without."""
    auth = {} if api_key is None else {"Authorization": f"Bearer {KEY}"}
    async with running_server(scripted_config(workers=2), api_key=api_key) as server:
        await server.pool.wait_ready()
        for content_type in ("text/plain", "application/x-www-form-urlencoded", None):
            for path in ("/admin/scale", "/admin/reload"):
                headers = (
                    dict(auth) if content_type is None else {**auth, "Content-Type": content_type}
                )
                body = b'{"workers": 3}' if path == "/admin/scale" else b""
                response = await server.client.post(path, content=body, headers=headers)
                detail = error_body(response, 415, "unsupported media type")["detail"]
                assert "Content-Type: application/json" in detail
        form = await server.client.post("/admin/scale", data={"workers": "3"}, headers=auth)
        error_body(form, 415, "unsupported media type")
        assert len(server.pool.workers) == 2
        assert server.pool.generation == 1
        headers = {**auth, "Content-Type": "Application/JSON; charset=utf-8"}
        response = await server.client.post(
            "/admin/scale", content=b'{"workers": 3}', headers=headers
        )
        assert response.status_code == 200, response.text
        assert len(server.pool.workers) == 3


@pytest.mark.usefixtures("predict_path")
async def test_allowed_hosts_adds_names() -> None:
    names = ("modelpool.internal", "10.0.0.5")
    async with running_server(scripted_config(), allowed_hosts=names) as server:
        await server.pool.wait_ready()
        port = port_of(server)
        for host in (f"modelpool.internal:{port}", "MODELPOOL.INTERNAL.", "10.0.0.5:8080"):
            origin = "http://" + host.lower().removesuffix(".")
            headers = {"Host": host, "Origin": origin}
            response = await server.client.post("/predict", json={"n": 1}, headers=headers)
            assert response.status_code == 200, (host, response.text)
            assert (await server.client.get("/status", headers={"Host": host})).status_code == 200
        for host in ("other.internal", "x.modelpool.internal", "10.0.0.6"):
            response = await server.client.post("/predict", json={"n": 1}, headers={"Host": host})
            forbidden(response, "is not a name of this service")
        headers = {"Host": "127.0.0.1", "Origin": f"http://modelpool.internal:{port}"}
        response = await server.client.post("/predict", json={"n": 1}, headers=headers)
        forbidden(response, "from the page of another origin")  # a name is not an origin
    async with running_server(scripted_config(), allowed_hosts="*") as server:
        await server.pool.wait_ready()
        response = await server.client.get("/status", headers={"Host": "anything.example"})
        assert response.status_code == 200


def test_allowed_hosts_is_an_option_like_every_other(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    _, settings = parse(["serve", "--allowed-hosts", "a.example, B.Example.,[::1],10.0.0.5"], {})
    assert settings.config.allowed_hosts == ("a.example", "b.example", "::1", "10.0.0.5")
    _, settings = parse(["serve"], {"MODELPOOL_ALLOWED_HOSTS": "a.example"})
    assert settings.config.allowed_hosts == ("a.example",)
    path = tmp_path / "modelpool.toml"
    path.write_text('allowed-hosts = ["modelpool.internal", "*"]\n')
    _, settings = parse(["serve", "--config", str(path)], {})
    assert settings.config.allowed_hosts == ("modelpool.internal", "*")
    path.write_text('allowed_hosts = "one.example,two.example"\n')
    _, settings = parse(["serve", "--config", str(path)], {})
    assert settings.config.allowed_hosts == ("one.example", "two.example")
    _, settings = parse(["serve", "--allowed-hosts", " "], {})
    assert settings.config.allowed_hosts is None
    assert ServerConfig(allowed_hosts=["X.example"]).allowed_hosts == ("x.example",)
    for bad in ("a.example:8080", "http://a.example", "a b", "a/b", "[::1]:80", "-.example"):
        with pytest.raises(SystemExit):
            parse(["serve", f"--allowed-hosts={bad}"], {})
        message = capsys.readouterr().err
        assert "--allowed-hosts" in message and "without a port" in message, message
        with pytest.raises(ConfigError, match="allowed_hosts"):
            ServerConfig(allowed_hosts=bad)
    with pytest.raises(ConfigError, match="allowed_hosts"):
        ServerConfig(allowed_hosts=[1, 2])  # type: ignore[list-item]


@pytest.mark.usefixtures("predict_path")
async def test_with_an_api_key_any_host_and_origin_is_answered() -> None:
    """Behind a proxy or a Kubernetes Service the service is called by names of theirs:
    the key protects it (a page can send no key), so no Host or Origin check is made."""
    auth = {"Authorization": f"Bearer {KEY}"}
    async with running_server(scripted_config(), host="0.0.0.0", api_key=KEY) as server:
        await server.pool.wait_ready()
        port = port_of(server)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            for host in (
                "modelpool.default.svc.cluster.local",
                f"modelpool:{port}",
                "evil.example",
            ):
                headers = {**auth, "Host": host, "Origin": f"https://{host}"}
                response = await client.post("/predict", json={"n": 1}, headers=headers)
                assert response.status_code == 200, (host, response.text)
                assert (await client.get("/status", headers=headers)).status_code == 200
                response = await client.get("/healthz", headers={"Host": host})  # a probe
                assert response.status_code == 200
                response = await client.post("/predict", json={"n": 1}, headers={"Host": host})
                error_body(response, 401, "unauthorized")  # the key still counts
            headers = {**auth, "Host": "modelpool.default.svc"}
            response = await client.post("/admin/scale", json={"workers": 2}, headers=headers)
            assert response.status_code == 200, response.text
        assert server.pool.workers[0].served + server.pool.workers[1].served == 3


async def test_the_listening_address_is_learned_from_a_passed_socket() -> None:
    """Under socket activation --host is ignored: the socket's address (here every address:
    0.0.0.0) is what Host may name; any address then, and still no foreign name."""
    env = clean_env({**FAST_MODEL3, "MODELPOOL_ALLOW_UNAUTHENTICATED": "1"})
    with held_socket("0.0.0.0") as sock:
        command = activated(sock, *MODELPOOL[1:], "--host", "127.0.0.1")
        async with running(command, env, pass_fds=(sock.fileno(),)) as server:
            client = await wait_listening(server)
            port = sock.getsockname()[1]
            async with (
                client,
                httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as local,
            ):
                for host in (f"192.0.2.2:{port}", "10.1.2.3", "127.0.0.1"):
                    response = await local.get("/status", headers={"Host": host})
                    assert response.status_code == 200, (host, response.text)
                response = await local.get("/status", headers={"Host": "evil.example"})
                forbidden(response, "is not a name of this service")
            server.proc.send_signal(signal.SIGTERM)
            assert await server.exit_code(within=20) == 0


@pytest.mark.parametrize(
    ("listening", "allowed", "host", "verdict"),
    [
        (["127.0.0.1"], [], "127.0.0.1:8080", True),
        (["127.0.0.1"], [], None, True),  # HTTP/1.0 sends none: no browser's request
        (["127.0.0.1"], [], "", True),
        (["127.0.0.1"], [], "localhost.", True),
        (["127.0.0.1"], [], "[::1]:8080", True),
        (["127.0.0.1"], [], "127.255.0.1", True),
        (["127.0.0.1"], [], "evil.example", False),
        (["127.0.0.1"], [], "localhost..", False),
        (["127.0.0.1"], [], "[evil.example]:80", False),
        (["127.0.0.1"], [], "[::1]x", False),
        (["127.0.0.1"], [], "localhost:-1", False),
        (["127.0.0.1"], [], "localhost:\uff18\uff10", False),  # digits, but not ASCII ones
        (["127.0.0.1"], [], "10.0.0.5", False),
        (["10.0.0.5"], [], "10.0.0.5:80", True),
        (["10.0.0.5"], [], "10.0.0.6:80", False),
        (["0.0.0.0"], [], "10.0.0.6:80", True),  # every address of the machine
        (["0.0.0.0"], [], "[fd00::2]:80", True),
        (["0.0.0.0"], [], "evil.example", False),
        (["::"], [], "192.0.2.2", True),
        (["::"], [], "evil.example:80", False),
        (["::1", "my-host.lan"], [], "My-Host.Lan.:8080", True),  # the name it was told
        (["127.0.0.1"], ["*"], "anything.example", True),
        (["*"], [], "anything.example", False),  # only --allowed-hosts may say "any"
        (["127.0.0.1"], ["[fd00::5]"], "[FD00::5]:1", True),
    ],
)
def test_which_hosts_are_the_services(
    listening: list[str], allowed: list[str], host: str | None, verdict: bool
) -> None:
    origins = Origins(listening, allowed)
    assert (origins.refusal("GET", host, None) is None) is verdict
    assert (origins.refusal("POST", host, None) is None) is verdict


def test_an_authority_is_parsed_as_a_browser_writes_it() -> None:
    assert parse_authority("[::1]:8080") == Authority("::1", 8080)
    assert parse_authority("LOCALHOST.:80") == Authority("localhost", 80)
    assert parse_authority(" Evil.Example ") == Authority("evil.example", None)
    assert parse_authority("localhost:") == Authority("localhost", None)  # the default port
    assert parse_authority(":80") is None
    assert parse_authority("[::1]:65536") is None


@pytest.mark.parametrize(
    ("method", "origin", "verdict"),
    [
        ("POST", None, True),  # no browser's request from another origin
        ("POST", "http://127.0.0.1:8080", True),
        ("POST", "https://127.0.0.1:8080", True),  # TLS ended by a proxy in front
        ("POST", "http://127.0.0.1:8081", False),
        ("POST", "http://127.0.0.1", False),
        ("POST", "null", False),
        ("POST", "http://localhost:8080", False),
        ("PUT", "http://evil.example", False),
        ("DELETE", "http://evil.example", False),
        ("GET", "http://evil.example", True),
        ("HEAD", "null", True),
        ("OPTIONS", "http://evil.example", True),  # a preflight, which is never granted
    ],
)
def test_which_origins_may_change_anything(method: str, origin: str | None, verdict: bool) -> None:
    origins = Origins(["127.0.0.1"])
    assert (origins.refusal(method, "127.0.0.1:8080", origin) is None) is verdict
