"""Settings that used to fail late or badly are refused at once, by the real command.

An API key a header cannot carry started the service, which then crashed (a byte
that is not UTF-8) or could never match it (any other non-ASCII character). A
`--config` that never ends (/dev/zero, an endless pipe) was read until memory ran out.
"""

from __future__ import annotations

import os
import resource
import sys
from pathlib import Path

import httpx
import pytest
import trio

from conftest import SCRIPTED, running_server, scripted_config
from modelpool.cli.parser import parse
from modelpool.settings.sources import MAX_CONFIG_FILE
from serverproc import clean_env

MEMORY_CAP = 2 << 30  # bytes of address space for the command: the old one read for ever
ONE_TINY_MODEL = ("--model-cmd", " ".join(SCRIPTED), "--workers", "1")


def capped() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_CAP, MEMORY_CAP))


async def modelpool(
    *args: str, env: dict[str, str] | None = None, shell_input: str | None = None
) -> tuple[int, str]:
    """Run `python -m modelpool serve ARGS` (fed by `shell_input`'s output, if given) to
    its end; its exit code and stderr. One that starts serving instead is stopped."""
    command = [sys.executable, "-m", "modelpool", "serve", "--port", "0", *args]
    if shell_input is not None:
        quoted = " ".join(f"'{word}'" for word in command)
        command = ["sh", "-c", f"{shell_input} | {quoted}"]
    with trio.move_on_after(30):
        done = await trio.run_process(
            command, capture_stderr=True, check=False, env=clean_env(env), preexec_fn=capped
        )
        return done.returncode, done.stderr.decode(errors="replace")
    raise AssertionError(f"modelpool {' '.join(args)} did not exit: it started serving")


@pytest.mark.parametrize(
    "key",
    [
        "caf\u00e9-s3cret",  # UTF-8, which a client would send as two bytes never matched
        os.fsdecode(b"s3cret-\xff-byte"),  # not UTF-8 at all: the variable's raw byte
        "s3cret\twith-a-tab",
        " s3cret-padded",  # a header's value is trimmed: never matched
    ],
    ids=["non-ascii", "not-utf8", "control", "padded"],
)
async def test_an_api_key_a_header_cannot_carry_is_refused_without_showing_it(key: str) -> None:
    code, message = await modelpool(*ONE_TINY_MODEL, env={"MODELPOOL_API_KEY": key})
    assert code == 2, message
    assert "--api-key (from MODELPOOL_API_KEY): must" in message, message
    assert "s3cret" not in message and "Traceback" not in message
    code, message = await modelpool(*ONE_TINY_MODEL, "--api-key", key)
    assert code == 2 and "--api-key: must" in message and "s3cret" not in message, message


async def test_a_printable_ascii_key_with_inner_spaces_is_matched_byte_for_byte() -> None:
    key = "s3cret key ~!#$%&'*+-.^_`|"
    async with running_server(scripted_config(), api_key=key) as server:
        await server.pool.wait_ready()
        right = await server.client.post(
            "/predict", json={"n": 1}, headers={"Authorization": f"Bearer {key}"}
        )
        assert right.status_code == 200, right.text
        wrong = await server.client.post(
            "/predict", json={"n": 1}, headers={"Authorization": f"Bearer {key[:-1]}"}
        )
        assert wrong.status_code == 401
        raw = httpx.Headers({"Authorization": "Bearer caf\u00e9".encode()})
        assert (await server.client.get("/status", headers=raw)).status_code == 401


async def test_a_config_file_that_never_ends_is_refused_at_once(tmp_path: Path) -> None:
    code, message = await modelpool("--config", "/dev/zero")
    assert code == 2, message
    assert "--config /dev/zero: not a file" in message, message
    code, message = await modelpool("--config", "/dev/stdin", shell_input="yes '# comment'")
    assert code == 2, message
    assert "--config /dev/stdin: larger than 1 MiB" in message, message
    big = tmp_path / "big.toml"
    big.write_text("workers = 2\n" + "#" * MAX_CONFIG_FILE)
    code, message = await modelpool("--config", str(big))
    assert code == 2 and "larger than 1 MiB: not a file of options" in message, message
    undecodable = tmp_path / "latin1.toml"
    undecodable.write_bytes(b'node-name = "caf\xe9"\n')
    code, message = await modelpool("--config", str(undecodable))
    assert code == 2 and "not UTF-8 text (byte 17 is not)" in message, message
    assert "Traceback" not in message


def test_a_config_file_up_to_the_limit_or_from_a_pipe_is_read(tmp_path: Path) -> None:
    largest = tmp_path / "largest.toml"
    head = "workers = 2\n"
    largest.write_text(head + "#" * (MAX_CONFIG_FILE - len(head)))
    _, settings = parse(["serve", "--config", str(largest)], {})
    assert settings.config.pool.workers == 2
    reading, writing = os.pipe()
    os.write(writing, b"workers = 3\n")
    os.close(writing)
    try:
        _, settings = parse(["serve", "--config", f"/dev/fd/{reading}"], {})
    finally:
        os.close(reading)
    assert settings.config.pool.workers == 3
