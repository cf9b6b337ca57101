"""Every option, from its flag or its variable: bad values are refused, naming what was typed."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from modelpool import PoolConfig, ServerConfig
from modelpool.cli.main import main
from modelpool.cli.parser import parse
from modelpool.settings.config import ConfigError
from modelpool.settings.options import OPTIONS
from modelpool.settings.parsers import count_or_none, mib_or_none, number, seconds_or_none

NUMBERS = (number, seconds_or_none, mib_or_none, count_or_none)
NUMERIC = [o for o in OPTIONS if o.convert in NUMBERS or o.flag == "--port"]
WHOLE = [o for o in OPTIONS if o.convert is not None and o.convert.__name__ == "integer"]


def refused(argv: list[str], environ: dict[str, str], capsys: pytest.CaptureFixture) -> str:
    with pytest.raises(SystemExit) as stopped:
        parse(["serve", *argv], environ)
    assert stopped.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize("option", NUMERIC + WHOLE, ids=lambda o: o.flag)
@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "-1", "1e999", "ten", ""])
def test_nonsense_numbers_are_refused_naming_flag_and_variable(
    option, value: str, capsys: pytest.CaptureFixture
) -> None:
    message = refused([option.flag, value], {}, capsys)
    assert option.flag in message
    assert "Traceback" not in message
    message = refused([], {option.env: value}, capsys)
    assert option.env in message and option.flag in message


@pytest.mark.parametrize(
    ("argv", "reason"),
    [
        (["--workers", "0"], "--workers: must be at least 1, got 0"),
        (["--workers", "5000"], "--workers: must be at most 1024, got 5000"),
        (["--queue", "http://127.0.0.1:1"], "--queue: must be a redis://"),
        (["--queue", "redis://127.0.0.1:1/0", "--reclaim-after", "1"], "must be at least 3"),
        (["--port", "65536"], "--port: must be at most 65535, got 65536"),
        (["--max-line", "10"], "--max-line: must be at least 64, got 10"),
        (["--backoff-initial", "5", "--backoff-max", "1"], "--backoff-max: must be at least 5"),
        (["--model-cmd", "'unclosed"], "cannot split"),
        (["--model-cmd", "   "], "--model-cmd: must name a program"),
        (["--id-field", " "], "--id-field: must be a non-empty field name"),
        (["--host", "0.0.0.0"], "--host: 0.0.0.0 is not a loopback address"),
        (["--api-key", ""], "--api-key: must not be empty"),
        (["--request-schema", "/nonexistent.json"], "cannot read /nonexistent.json"),
    ],
)
def test_values_that_make_no_sense_are_refused(
    argv: list[str], reason: str, capsys: pytest.CaptureFixture
) -> None:
    assert reason in refused(argv, {}, capsys)


def test_a_switch_from_the_environment_must_be_a_yes_or_no(capsys: pytest.CaptureFixture) -> None:
    message = refused([], {"MODELPOOL_ACCESS_LOG": "maybe"}, capsys)
    assert "--access-log (from MODELPOOL_ACCESS_LOG='maybe'): must be one of" in message
    _, settings = parse(["serve"], {"MODELPOOL_ACCESS_LOG": "yes"})
    assert settings.config.access_log is True


def test_the_flag_wins_over_the_variable_and_zero_means_no_limit() -> None:
    _, settings = parse(
        ["serve", "--timeout", "2.5", "--queue-timeout", "0"],
        {"MODELPOOL_TIMEOUT": "nan", "MODELPOOL_WORKERS": "3"},
    )
    assert settings.config.pool.timeout == 2.5  # the bad variable is never looked at
    assert settings.config.pool.workers == 3
    assert settings.config.pool.queue_timeout is None


def test_a_public_address_needs_a_key_or_an_explicit_opt_out(capsys) -> None:
    _, keyed = parse(["serve", "--host", "0.0.0.0"], {"MODELPOOL_API_KEY": "s3cret"})
    assert keyed.config.api_key == "s3cret"
    _, open_ = parse(["serve", "--host", "::", "--allow-unauthenticated"], {})
    assert open_.config.allow_unauthenticated
    for loopback in ("127.0.0.1", "::1", "localhost", "127.5.5.5"):
        parse(["serve", "--host", loopback], {})


def test_a_bad_schema_file_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    not_json = tmp_path / "a.json"
    not_json.write_text("{")
    assert "is not JSON" in refused(["--request-schema", str(not_json)], {}, capsys)
    bad = tmp_path / "b.json"
    bad.write_text(json.dumps({"type": "nonsense"}))
    assert "is not a valid JSON Schema" in refused(["--request-schema", str(bad)], {}, capsys)


@pytest.mark.parametrize(
    "settings",
    [
        {"timeout": math.nan},
        {"timeout": math.inf},
        {"workers": 2.5},
        {"queue_timeout": -1.0},
        {"max_queue": True},
        {"model_cmd": []},
        {"request_schema": {"type": 5}},
    ],
)
def test_the_library_refuses_the_same_values(settings: dict) -> None:
    with pytest.raises(ConfigError) as refused_:
        PoolConfig(**settings)
    assert refused_.value.field == next(iter(settings))


def test_server_settings_are_checked_too() -> None:
    with pytest.raises(ConfigError, match="keep_alive_timeout"):
        ServerConfig(keep_alive_timeout=math.nan)
    with pytest.raises(ConfigError, match="host"):
        ServerConfig(host="10.1.2.3")


def test_a_config_file_sets_options_and_flags_then_variables_win(tmp_path: Path) -> None:
    path = tmp_path / "modelpool.toml"
    path.write_text(
        'workers = 3\nmax-queue = 64\nmodel_cmd = ["python3", "-u", "my model.py"]\n'
        "timeout = 2.5\naccess-log = true\nmax-requests = 1000\nmodel-max-rss = 4096\n"
    )
    _, settings = parse(["serve", "--config", str(path)], {})
    pool = settings.config.pool
    assert (pool.workers, pool.max_queue, pool.timeout) == (3, 64, 2.5)
    assert pool.model_cmd == ["python3", "-u", "my model.py"]
    assert (pool.max_requests, pool.model_max_rss) == (1000, 4096.0)
    assert settings.config.access_log is True
    _, settings = parse(["serve", "--workers", "5"], {"MODELPOOL_CONFIG": str(path)})
    assert settings.config.pool.workers == 5  # the flag wins over the file
    environ = {"MODELPOOL_CONFIG": str(path), "MODELPOOL_MAX_QUEUE": "7"}
    _, settings = parse(["serve"], environ)
    assert settings.config.pool.max_queue == 7  # and so does the variable
    assert settings.config.pool.workers == 3


@pytest.mark.parametrize(
    ("text", "complaint"),
    [
        ("workers = 0\n", "--workers (from {path}): must be at least 1"),
        ("wokrers = 2\n", "wokrers: no such option (did you mean workers?)"),
        ("timeout = 'soon'\n", "--timeout (from {path}): 'soon' is not a number"),
        ("access-log = 'yes'\n", "--access-log (from {path}): must be true or false"),
        ("workers = [\n", "not valid TOML"),
    ],
)
def test_a_bad_config_file_is_refused_naming_the_file_and_key(
    tmp_path: Path, text: str, complaint: str, capsys: pytest.CaptureFixture
) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    message = refused(["--config", str(path)], {}, capsys)
    assert complaint.format(path=path) in message, message
    assert str(path) in message
    missing = refused(["--config", str(tmp_path / "none.toml")], {}, capsys)
    assert "No such file" in missing


def test_version_is_printed(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as stopped:
        main(["--version"])
    assert stopped.value.code == 0
    assert capsys.readouterr().out.startswith("modelpool 0.")
