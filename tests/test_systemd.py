"""Running under systemd: notifications to a real NOTIFY_SOCKET, and socket activation.

The notification socket is a real AF_UNIX datagram socket bound by the test, as systemd
binds its own; every message the real `modelpool` command sends is recorded with the
time it came. Socket activation runs through Debian's `systemd-socket-activate` (package
`systemd`); it runs its command once, so the restart test holds the socket itself, as
systemd does for a `.socket` unit, and starts modelpool twice on it. Without the
binary that test is skipped, unless CI=true or MODELPOOL_REQUIRE_SYSTEMD=1 (as in CI),
where a missing binary is a failure.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import httpx
import pytest
import trio
from redisserver import free_port, redis_server

from conftest import FAST_MODEL3, MODEL3, MODELS, children_of, wait_until
from modelpool.service.sdnotify import EXTEND_EVERY
from serverproc import ServerProcess, clean_env, server_process, wait_listening, wait_ready

SOCKET_ACTIVATE = shutil.which("systemd-socket-activate")
REQUIRE_SYSTEMD = (
    os.environ.get("CI") == "true" or os.environ.get("MODELPOOL_REQUIRE_SYSTEMD") == "1"
)
SYSTEMD_VARIABLES = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID")


@dataclass
class Message:
    at: float  # time.monotonic() when it came
    fields: dict[str, str]
    text: str


@dataclass
class NotifySocket:
    """What systemd hears: every datagram sent to `address`."""

    address: str
    messages: list[Message] = field(default_factory=list)
    _arrived: trio.Event = field(default_factory=trio.Event)

    async def receive(self, sock: trio.socket.SocketType) -> None:
        while True:
            data = await sock.recv(65536)
            text = data.decode()
            fields = dict(line.split("=", 1) for line in text.split("\n") if "=" in line)
            self.messages.append(Message(time.monotonic(), fields, text))
            self._arrived.set()
            self._arrived = trio.Event()

    def having(self, name: str, value: str | None = None) -> list[Message]:
        return [m for m in self.messages if name in m.fields and value in (None, m.fields[name])]

    async def wait_for(
        self, name: str, value: str | None = None, after: float = 0.0, within: float = 20
    ) -> Message:
        """The first message carrying `name` (=`value`) that came after time `after`."""
        with trio.move_on_after(within):
            while True:
                for message in self.having(name, value):
                    if message.at > after:
                        return message
                await self._arrived.wait()
        heard = "\n".join(m.text.replace("\n", " | ") for m in self.messages[-20:])
        raise AssertionError(f"no {name}={value or '...'} within {within} s; heard:\n{heard}")


@asynccontextmanager
async def notify_socket(abstract: bool = False) -> AsyncIterator[NotifySocket]:
    """A datagram socket bound in a fresh directory (or in the abstract namespace)."""
    directory = tempfile.mkdtemp(prefix="mp-notify-")
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        if abstract:
            name = f"modelpool-test-{os.getpid()}-{time.monotonic_ns()}"
            await sock.bind("\0" + name)
            address = "@" + name
        else:
            address = str(Path(directory) / "notify")
            await sock.bind(address)
        heard = NotifySocket(address)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(heard.receive, sock)
            yield heard
            nursery.cancel_scope.cancel()
    finally:
        sock.close()
        shutil.rmtree(directory, ignore_errors=True)


def environment_of(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    return dict(entry.split("=", 1) for entry in raw.decode().split("\0") if "=" in entry)


def sockets_of(pid: int) -> list[str]:
    """The sockets among a process's open file descriptors ("socket:[inode]")."""
    found = []
    for entry in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            if (target := os.readlink(entry)).startswith("socket:"):
                found.append(target)
    return found


def assert_models_inherit_nothing(server: ServerProcess) -> None:
    """No model got systemd's variables or a socket of the service."""
    pids = server.model_pids()
    assert pids, "no model started"
    for pid in pids:
        leaked = [name for name in SYSTEMD_VARIABLES if name in environment_of(pid)]
        assert not leaked, f"model {pid} inherited {leaked}"
        assert not sockets_of(pid), f"model {pid} inherited sockets {sockets_of(pid)}"


async def test_systemd_hears_extensions_ready_status_watchdog_reload_and_stop(
    tmp_path: Path,
) -> None:
    async with notify_socket() as heard:
        # Models that load for about 2 s, and begin only once the service has first told
        # systemd how it is (its first STATUS=, with an extension, while none is ready):
        # however long a busy machine takes to import the HTTP stack meanwhile.
        gate = tmp_path / "gate"
        wait_then_load = 'while [ ! -e "$0" ]; do sleep 0.05; done; exec "$@"'
        model = shlex.join(["sh", "-c", wait_then_load, str(gate), *MODEL3])
        slow_enough = {"MODEL3_STEP_SECONDS": "0.4"}
        env = {**slow_enough, "NOTIFY_SOCKET": heard.address, "WATCHDOG_USEC": "1000000"}
        async with server_process("--workers", "2", "--model-cmd", model, env=env) as server:
            await heard.wait_for("STATUS")
            gate.touch()
            ready = await heard.wait_for("READY", "1")
            extensions = heard.having("EXTEND_TIMEOUT_USEC")
            assert extensions, "no EXTEND_TIMEOUT_USEC while the models started"
            assert extensions[0].at <= ready.at
            assert int(extensions[0].fields["EXTEND_TIMEOUT_USEC"]) >= 10_000_000
            statuses = [m.fields["STATUS"] for m in heard.having("STATUS")]
            assert "0/2 models ready, 0 queued" in statuses
            assert ready.fields.get("STATUS") == "2/2 models ready, 0 queued"
            assert_models_inherit_nothing(server)

            # The watchdog: WATCHDOG=1 at half of WATCHDOG_USEC (1 s), i.e. every 0.5 s,
            # from the service's first word on (before its models load, before its first
            # STATUS=), however long the interpreter took to start (1-3 s on a busy machine).
            assert heard.having("WATCHDOG", "1"), "no WATCHDOG=1"
            assert heard.messages[0].fields.get("WATCHDOG") == "1", heard.messages[:3]
            first = heard.messages[0].at
            await trio.sleep(max(0.0, first + 3.0 - time.monotonic()))
            pings = [m.at for m in heard.having("WATCHDOG", "1") if m.at <= first + 3.0]
            gaps = [b - a for a, b in itertools.pairwise(pings)]
            # 7 in 3 s, fewer when the machine is busy; pings at WATCHDOG_USEC (not half
            # of it) would be 1 s apart
            assert 4 <= len(pings) <= 9, f"{len(pings)} pings in 3 s: {gaps}"
            assert statistics.median(gaps) < 0.75, f"pings {gaps} s apart"

            # SIGHUP: RELOADING=1 with the monotonic clock, then READY=1 once reloaded.
            before_reload = time.monotonic()
            server.proc.send_signal(signal.SIGHUP)
            reloading = await heard.wait_for("RELOADING", "1", after=before_reload)
            sent_at_usec = int(reloading.fields["MONOTONIC_USEC"])
            assert abs(sent_at_usec / 1e6 - time.clock_gettime(time.CLOCK_MONOTONIC)) < 5
            reloaded = await heard.wait_for("READY", "1", after=reloading.at)
            assert any("reload to generation 2 done" in line for line in server.log)
            assert reloaded.at > reloading.at

            # SIGTERM: STOPPING=1, then a clean exit.
            before_stop = time.monotonic()
            server.proc.send_signal(signal.SIGTERM)
            await heard.wait_for("STOPPING", "1", after=before_stop)
            assert await server.exit_code(within=20) == 0
            assert heard.having("STOPPING", "1")[0].at > before_stop  # not sent before


async def test_status_follows_the_queue_at_most_a_few_times_a_second() -> None:
    async with notify_socket() as heard:
        env = {**FAST_MODEL3, "NOTIFY_SOCKET": heard.address}
        async with server_process("--workers", "1", env=env) as server:
            client = await wait_listening(server)
            async with client:
                await heard.wait_for("READY", "1")
                first = time.monotonic()
                async with trio.open_nursery() as nursery:
                    for _ in range(6):  # one computes (0.55 s each), the others wait in line
                        nursery.start_soon(partial(client.post, "/predict", json={"data": 0.5}))
                await heard.wait_for("STATUS", "1/1 models ready, 0 queued", after=first)
                updates = [m for m in heard.having("STATUS") if m.at > first]
                queued = [int(m.fields["STATUS"].split(", ")[1].split()[0]) for m in updates]
                assert queued[-1] == 0
                assert max(queued) >= 3, f"the queue as systemd saw it: {queued}"
                assert queued == sorted(queued, reverse=True)  # one line, served in turn
                gaps = [b.at - a.at for a, b in itertools.pairwise(updates)]
                assert min(gaps) > 0.2, f"STATUS= more often than four times a second: {gaps}"
            server.proc.send_signal(signal.SIGTERM)
            assert await server.exit_code(within=20) == 0


async def test_a_worker_node_tells_systemd_too_on_an_abstract_socket() -> None:
    async with redis_server() as url, notify_socket(abstract=True) as heard:
        env = {**FAST_MODEL3, "NOTIFY_SOCKET": heard.address, "WATCHDOG_USEC": "600000"}
        args = ("--queue", url, "--workers", "2")
        async with server_process(*args, env=env, command=("worker",)) as node:
            ready = await heard.wait_for("READY", "1")
            assert ready.fields.get("STATUS") == "2/2 models ready, 0 queued"
            await heard.wait_for("WATCHDOG", "1", after=ready.at)
            assert_models_inherit_nothing(node)
            before_stop = time.monotonic()
            node.proc.send_signal(signal.SIGTERM)
            await heard.wait_for("STOPPING", "1", after=before_stop)
            assert await node.exit_code(within=20) == 0


async def test_without_notify_socket_nothing_changes() -> None:
    async with server_process("--workers", "1", env=FAST_MODEL3) as server:
        client = await wait_listening(server)
        async with client:
            await wait_ready(client, 1, within=20)
            assert (await client.post("/predict", json={"data": 0.1})).status_code == 200
        assert not any("systemd" in line for line in server.log)
        server.proc.send_signal(signal.SIGTERM)
        assert await server.exit_code(within=20) == 0


# -- socket activation ------------------------------------------------------------------


def systemd_socket_activate() -> str:
    if SOCKET_ACTIVATE is None:
        if REQUIRE_SYSTEMD:
            raise AssertionError("systemd-socket-activate is missing: apt-get install systemd")
        pytest.skip("needs Debian's systemd-socket-activate (apt-get install systemd)")
    return SOCKET_ACTIVATE


@asynccontextmanager
async def running(
    command: list[str], env: dict[str, str], **spawn: object
) -> AsyncIterator[ServerProcess]:
    """`command` as a process of its own, its log read; killed with its models if left running."""
    proc = await trio.lowlevel.open_process(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, **spawn
    )
    server = ServerProcess(proc)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.read_log)
        try:
            yield server
        finally:
            if proc.returncode is None:
                for child in children_of(proc.pid):
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(child, signal.SIGKILL)
                proc.kill()
            with trio.move_on_after(10):
                await proc.wait()


MODELPOOL = [sys.executable, "-m", "modelpool", "serve", "--workers", "1"]


async def test_systemd_socket_activate_starts_modelpool_on_its_socket() -> None:
    """The first connection starts modelpool (--host/--port say otherwise, and are ignored);
    that connection, made before modelpool ran, is answered."""
    binary = systemd_socket_activate()
    port = free_port()
    env = clean_env(FAST_MODEL3)
    passed = [f"--setenv={name}" for name in env]  # it passes on only the variables named
    command = [binary, "-l", f"127.0.0.1:{port}", *passed, *MODELPOOL, "--port", "1"]
    async with running(command, env) as server:
        # It listens once it has said so (a busy machine may take a while to run it);
        # modelpool starts only with the first connection.
        listening = f"Listening on 127.0.0.1:{port}"
        await wait_until(lambda: any(listening in line for line in server.log), 20, listening)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            response = await client.post("/predict", json={"data": 0.1})
            assert response.status_code == 200, response.text
            assert response.json() == {"ice_found": True}
        assert any("serving on the socket systemd passed" in line for line in server.log)
        assert any(f"listening on http://127.0.0.1:{port}" in line for line in server.log)
        assert_models_inherit_nothing(server)
        server.proc.send_signal(signal.SIGTERM)
        assert await server.exit_code(within=20) == 0


LAUNCH = """
import os, sys
fd = int(sys.argv[1])
if fd != 3:
    os.dup2(fd, 3)
    os.close(fd)
os.set_inheritable(3, True)
os.environ.update(LISTEN_FDS=sys.argv[2], LISTEN_PID=str(os.getpid()))
os.execv(sys.executable, [sys.executable, *sys.argv[3:]])
"""


@contextlib.contextmanager
def held_socket(
    host: str = "127.0.0.1", kind: socket.SocketKind = socket.SOCK_STREAM
) -> Iterator[socket.socket]:
    """A socket on a free port (listening, if a stream), held by the test as systemd does."""
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind((host, 0))
        if kind == socket.SOCK_STREAM:
            sock.listen(128)
        yield sock


def activated(sock: socket.socket, *args: str, count: int = 1) -> list[str]:
    """A command that runs `python ARGS` with `sock` as fd 3 and LISTEN_FDS=count, as
    systemd starts a service: LISTEN_PID is the pid of the process that execs it."""
    return [sys.executable, "-c", LAUNCH, str(sock.fileno()), str(count), *args]


@dataclass
class Outcome:
    sent: float
    answered: float = 0.0
    status: int | None = None
    error: str | None = None


async def keep_sending(port: int, outcomes: list[Outcome]) -> None:
    """POST /predict again and again, each on a new connection, recording every outcome."""
    limits = httpx.Limits(max_keepalive_connections=0)
    async with httpx.AsyncClient(
        base_url=f"http://127.0.0.1:{port}", timeout=30, limits=limits
    ) as client:
        while True:
            outcome = Outcome(time.monotonic())
            outcomes.append(outcome)
            try:
                response = await client.post("/predict", json={"data": 0.1})
            except httpx.TransportError as exc:
                outcome.error = repr(exc)
                await trio.sleep(0.05)
            else:
                outcome.status = response.status_code
            outcome.answered = time.monotonic()
            await trio.sleep(0.01)


async def test_a_restart_on_a_held_socket_refuses_no_connection() -> None:
    """Requests sent while modelpool stops, while none runs, and while the next one
    starts are all answered, as under a .socket unit's `systemctl restart`."""
    env = clean_env(FAST_MODEL3)
    outcomes: list[Outcome] = []
    with held_socket() as sock:
        port = sock.getsockname()[1]
        command = activated(sock, *MODELPOOL[1:])
        async with trio.open_nursery() as clients:
            async with running(command, env, pass_fds=(sock.fileno(),)) as first:
                client = await wait_listening(first)
                async with client:
                    await wait_ready(client, 1, within=20)
                for _ in range(3):
                    clients.start_soon(keep_sending, port, outcomes)
                await trio.sleep(1.0)
                stopping = time.monotonic()
                first.proc.send_signal(signal.SIGTERM)
                assert await first.exit_code(within=20) == 0
            gone = time.monotonic()
            clients.start_soon(keep_sending, port, outcomes)  # while no modelpool runs at all
            await trio.sleep(0.5)  # meanwhile, connections wait in the socket's backlog
            async with running(command, env, pass_fds=(sock.fileno(),)) as second:
                await wait_listening(second)
                back = time.monotonic()
                with trio.fail_after(30):
                    while sum(o.sent > back and o.status is not None for o in outcomes) < 10:
                        await trio.sleep(0.05)
                clients.cancel_scope.cancel()
                second.proc.send_signal(signal.SIGTERM)
                assert await second.exit_code(within=20) == 0
    done = [o for o in outcomes if o.status is not None or o.error is not None]
    # A connection the first service accepted just before its stop, whose request it
    # read after, is answered 503 "shutting down" (the documented graceful stop: the
    # listener closes, requests on connections already open get 503). That race is
    # the only failure allowed: no connection refused, no error, nothing else.
    raced = [o for o in done if o.status == 503 and o.answered >= stopping and o.sent <= gone]
    failed = [o for o in done if o.status != 200 and o not in raced]
    assert not failed, f"{len(failed)} of {len(done)} not answered 200: {failed[:5]}"
    assert len(raced) <= 3, f"{len(raced)} requests raced the stop: {raced}"
    in_the_gap = [o for o in done if gone <= o.sent <= back]
    assert in_the_gap, "no request was sent while no modelpool ran"
    across = [o for o in done if o.sent < gone and o.answered > back]
    assert across, "no request sent to the first modelpool was answered by the second"
    assert len(done) >= 20


def test_the_shipped_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    """deploy/systemd/ as systemd reads it: no warning, no unknown setting. ExecStart
    points at this venv's modelpool, which verify requires to exist."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        if REQUIRE_SYSTEMD:
            raise AssertionError("systemd-analyze is missing: apt-get install systemd")
        pytest.skip("needs systemd-analyze (apt-get install systemd)")
    units = Path(__file__).resolve().parents[1] / "deploy" / "systemd"
    program = Path(sys.executable).with_name("modelpool")
    service = (units / "modelpool.service").read_text()
    assert "ExecStart=/usr/local/bin/modelpool serve" in service
    assert "Type=notify" in service and "KillMode=mixed" in service
    (tmp_path / "modelpool.service").write_text(
        service.replace("/usr/local/bin/modelpool", str(program))
    )
    shutil.copy(units / "modelpool.socket", tmp_path / "modelpool.socket")
    result = subprocess.run(
        [
            analyze,
            "verify",
            *(str(tmp_path / name) for name in ("modelpool.service", "modelpool.socket")),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0 and not (result.stdout + result.stderr).strip(), (
        result.stdout + result.stderr
    )


@pytest.mark.parametrize(
    ("host", "kind", "count", "key", "expected"),
    [
        ("127.0.0.1", socket.SOCK_STREAM, 2, None, "modelpool serves one"),
        ("127.0.0.1", socket.SOCK_DGRAM, 1, None, "is not a TCP socket"),
        ("0.0.0.0", socket.SOCK_STREAM, 1, None, "not a loopback address, and no API key"),
        ("0.0.0.0", socket.SOCK_STREAM, 1, "k" * 32, None),  # with a key, it serves
    ],
)
async def test_a_passed_socket_it_must_not_serve_is_refused_before_any_model_starts(
    host: str, kind: socket.SocketKind, count: int, key: str | None, expected: str | None
) -> None:
    env = clean_env({**FAST_MODEL3, **({"MODELPOOL_API_KEY": key} if key else {})})
    with held_socket(host, kind) as sock:
        command = activated(sock, *MODELPOOL[1:], count=count)
        async with running(command, env, pass_fds=(sock.fileno(),)) as server:
            if expected is None:
                await wait_listening(server)
                server.proc.send_signal(signal.SIGTERM)
                assert await server.exit_code(within=20) == 0
                return
            assert await server.exit_code(within=20) == 1
            assert any(expected in line for line in server.log), server.log
            assert not server.model_pids()


# -- start-up that does not go to plan ----------------------------------------------------


async def test_ready_once_one_model_is_while_another_keeps_failing(tmp_path: Path) -> None:
    """starts_once.py serves on the first worker and fails on every later start."""
    model = f"{sys.executable} -u {MODELS / 'starts_once.py'} {tmp_path / 'started'}"
    async with notify_socket() as heard:
        args = ("--workers", "2", "--model-cmd", model)
        async with server_process(*args, env={"NOTIFY_SOCKET": heard.address}) as server:
            ready = await heard.wait_for("READY", "1")
            assert ready.fields.get("STATUS") == "1/2 models ready, 0 queued"
            server.proc.send_signal(signal.SIGTERM)
            assert await server.exit_code(within=20) == 0


async def test_a_pool_whose_every_model_fails_stops_asking_for_more_time(tmp_path: Path) -> None:
    """Extensions stop once the pool is unhealthy, so TimeoutStartSec applies again."""
    (tmp_path / "started").touch()  # every start of starts_once.py now fails
    model = f"{sys.executable} -u {MODELS / 'starts_once.py'} {tmp_path / 'started'}"
    async with notify_socket() as heard:
        args = ("--workers", "1", "--model-cmd", model, "--unhealthy-after", "1", "--keep-trying")
        async with server_process(*args, env={"NOTIFY_SOCKET": heard.address}) as server:
            # No model was ever ready and every one fails: the pool is unhealthy at once
            # (--keep-trying keeps it running), so at most the first extension is sent.
            failing = await heard.wait_for("STATUS")
            while "failing" not in failing.fields["STATUS"]:
                failing = await heard.wait_for("STATUS", after=failing.at)
            await trio.sleep(EXTEND_EVERY + 1.5)
            assert len(heard.having("EXTEND_TIMEOUT_USEC")) <= 1, heard.messages
            assert not heard.having("READY")
            server.proc.send_signal(signal.SIGTERM)
            assert await server.exit_code(within=20) == 0
