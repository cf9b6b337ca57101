"""The reference model speaks the protocol the issue describes."""

from __future__ import annotations

import os
import re
import subprocess

from conftest import FAST_MODEL3, MODEL3

STARTUP = [
    "initializing model...",
    " 0",
    " 1",
    " 2",
    " 3",
    " 4",
    "ready: Model-initialized",
    "Loading data from the stdin",
]


def run_model3(stdin: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        MODEL3,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **FAST_MODEL3, **(env or {})},
    )


def test_answers_each_line_then_exits_when_stdin_closes() -> None:
    done = run_model3('{"data": 3}\n\n{"data": 0}\n')
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[:8] == STARTUP
    assert lines[8:10] == ['input: {"data": 3}', "Start calculations"]
    assert re.fullmatch(r"Done in 0\.1[4-9]sec|Done in 0\.[2-4]\dsec", lines[10])
    assert lines[11] == 'result: {"ice_found": true}'
    assert lines[12:15] == ['input: {"data": 0}', "Start calculations", "Done in 0.00sec"]
    assert lines[15:] == ['result: {"ice_found": true}']


def test_step_count_is_configurable() -> None:
    done = run_model3("", env={"MODEL3_INIT_STEPS": "2"})
    assert done.stdout.splitlines() == [*STARTUP[:3], *STARTUP[6:]]


def test_request_without_data_raises_value_error() -> None:
    done = run_model3('{"foo": 1}\n{"data": 0}\n')
    assert done.returncode != 0
    assert "ValueError" in done.stderr
    assert "result:" not in done.stdout


def test_line_that_is_not_json_raises() -> None:
    done = run_model3("not json\n")
    assert done.returncode != 0
    assert "JSONDecodeError" in done.stderr


def test_non_numeric_data_raises() -> None:
    done = run_model3('{"data": "abc"}\n')
    assert done.returncode != 0
    assert "TypeError" in done.stderr
