"""--queue URLs: a bad one stops the command at once (exit 2, naming the flag), before
any model starts; a password in one is never shown, in an error, a log line or /status."""

from __future__ import annotations

import signal
import sys

import pytest
import trio
from redisserver import server

from conftest import SCRIPTED
from modelpool import PoolConfig
from modelpool.settings.config import ConfigError, redact_url
from serverproc import clean_env, server_process, wait_listening, wait_ready

MODEL = ["--model-cmd", " ".join(SCRIPTED)]


async def run_cli(*args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    done = await trio.run_process(
        [sys.executable, "-m", "modelpool", *args],
        capture_stderr=True,
        check=False,
        env=clean_env(env),
    )
    return done.returncode, done.stderr.decode()


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("redis://", "must name a host"),
        ("redis://:6379", "must name a host"),
        ("redis://h:notaport/0", "must have a port from 1 to 65535, not 'notaport'"),
        ("redis://h:99999/0", "must have a port from 1 to 65535, not '99999'"),
        (
            "rediss://h:6380/0?ssl_cert_reqs=bogus",
            "option ssl_cert_reqs must be one of none, optional",
        ),
    ],
)
@pytest.mark.parametrize("command", ["serve", "worker"])
async def test_a_bad_queue_url_exits_2_naming_the_flag_before_any_model_starts(
    url: str, reason: str, command: str
) -> None:
    workers = ["--workers", "0"] if command == "serve" else []
    code, stderr = await run_cli(command, "--queue", url, *workers, *MODEL)
    assert code == 2, stderr
    assert f"--queue: {reason}" in stderr
    assert "Traceback" not in stderr
    assert "started" not in stderr  # no model ran


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("redis://h:0/0", "port from 1 to 65535"),
        ("redis://h:/0", "port from 1 to 65535"),
        ("redis://h:6379/zero", "must end in /DB"),
        ("redis://h:6379/0/1", "must end in /DB"),
        ("redis://h:6379/0?db=x", "option db must be a database number"),
        ("redis://h:6379/0?stream_timeout=1", "unknown option 'stream_timeout'"),
        ("redis://h:6379/0?ssl_cert_reqs=none", "(it needs rediss://)"),
        ("redis://h:6379/0?db", "not NAME=VALUE"),
        ("rediss://h/0?ssl_check_hostname=perhaps", "ssl_check_hostname must be one of"),
        ("rediss://h/0?ssl_ca_certs=/nonexistent.pem", "ssl_ca_certs must be a CA file"),
        ("rediss://h/0?ssl_certfile=/etc/hostname", "ssl_certfile and ssl_keyfile go together"),
        ("redis://h:6379/0?connect_timeout=nan", "connect_timeout must be a number of seconds"),
        ("redis+sentinel://h:99999/mp", "port out of 1..65535"),
        ("redis+sentinel://h/mp", "must be redis+sentinel://HOST:PORT"),
        ("redis+sentinel://h:26379/mp?x=1", "must be redis+sentinel://HOST:PORT"),
    ],
)
def test_more_bad_queue_urls_are_refused_when_the_config_is_made(url: str, reason: str) -> None:
    with pytest.raises(ConfigError, match="queue") as refused:
        PoolConfig(queue=url, workers=0)
    assert reason in str(refused.value)


@pytest.mark.parametrize(
    "url",
    [
        "redis://h",
        "redis://h:6379",
        "redis://h:6379/",
        "redis://user:pw@h:6379/15",
        "redis://[::1]:6379/0",
        "redis://h/0?db=2&client_name=front&connect_timeout=2.5",
        "rediss://:pw@h:6380/0?ssl_cert_reqs=required&ssl_check_hostname=true",
        "rediss://h/0?ssl_cert_reqs=none&ssl_ca_certs=/",
        "redis+sentinel://:pw@a:26379,b:26380/mp/1",
        "redis+sentinel://a:26379/mp",
    ],
)
def test_good_queue_urls_are_taken(url: str) -> None:
    assert PoolConfig(queue=url, workers=0).queue == url


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("rediss//:PW@h:6379/0", "rediss//:***@h:6379/0"),
        ("redis://user:PW@h:6379/0", "redis://user:***@h:6379/0"),
        ("redis://PW@h/0", "redis://***@h/0"),
        ("redis://:P@W@h/0", "redis://:***@h/0"),
        ("redis+sentinel://:PW@a:1,b:2/mp", "redis+sentinel://:***@a:1,b:2/mp"),
        ("redis://h:6379/0", "redis://h:6379/0"),
    ],
)
def test_a_password_is_redacted_even_from_a_malformed_url(url: str, shown: str) -> None:
    assert redact_url(url) == shown


@pytest.mark.parametrize(
    ("args", "env"),
    [
        ([], {"MODELPOOL_QUEUE": "rediss//:PW@h:6379/0"}),  # no colon after the scheme
        ([], {"MODELPOOL_QUEUE": "redis://:PW@h:99999/0"}),
        (["--queue", "redis://u:PW@h:6379/0?bogus=1"], {}),
        (["--queue", "redis+sentinel://:PW@h/mp"], {}),
    ],
)
async def test_a_password_in_a_bad_queue_url_is_never_printed(
    args: list[str], env: dict[str, str]
) -> None:
    code, stderr = await run_cli("serve", "--workers", "0", *args, *MODEL, env=env)
    assert code == 2, stderr
    assert "--queue" in stderr and "***@" in stderr
    assert "PW" not in stderr


async def test_a_password_is_in_no_log_line_nor_in_status() -> None:
    async with server("--requirepass", "s3cret-pw") as redis:
        url = f"redis://:s3cret-pw@127.0.0.1:{redis.port}/0"  # type: ignore[attr-defined]
        async with server_process("--queue", url, "--workers", "1", *MODEL) as node:
            async with await wait_listening(node, 60) as client:
                await wait_ready(client, 1, within=60)
                assert (await client.post("/predict", json={"n": 1})).status_code == 200
                status = (await client.get("/status")).text
            node.proc.send_signal(signal.SIGTERM)
            assert await node.exit_code(within=20) == 0
        assert "s3cret-pw" not in status and ":***@" in status
        assert any(":***@" in line for line in node.log)
        assert not [line for line in node.log if "s3cret-pw" in line]
