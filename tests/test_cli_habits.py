"""The command line's habits, and what the package says about itself.

Options are never abbreviated; every mistake is reported in one short form that names the
option; `--help` groups the options by topic; the Redis client is an extra that `--queue`
asks for by name; and by default a model's stdout (which echoes requests' data) stays out
of an INFO log while its stderr (why it failed) is in it. All against the real command.
"""

from __future__ import annotations

import json
import re
import sys
from importlib import metadata
from pathlib import Path

import pytest
import trio
import trove_classifiers

from conftest import FAST_MODEL3, error_body, wait_until
from modelpool import PoolConfig
from modelpool.cli.parser import build_parser, parse
from modelpool.settings.config import ConfigError
from modelpool.settings.options import OPTIONS, TOPICS
from serverproc import clean_env, server_process, wait_listening, wait_ready

ROOT = Path(__file__).resolve().parents[1]
HINT = "(modelpool {command} --help lists the options)"
# The command with the Redis client made unimportable, as where it is not installed:
# None in sys.modules makes `import coredis` raise ImportError.
WITHOUT_COREDIS = (
    "import sys; sys.modules['coredis'] = None; "
    "from modelpool.cli.main import main; sys.exit(main())"
)


async def run(*args: str, env: dict[str, str] | None = None, code: str | None = None) -> tuple:
    """`python -m modelpool ARGS` (or `python -c CODE ARGS`) to its end, within 30 s:
    its exit code, stderr and stdout."""
    start = ["-c", code] if code is not None else ["-m", "modelpool"]
    with trio.fail_after(30):
        done = await trio.run_process(
            [sys.executable, *start, *args],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            env=clean_env(env),
        )
    return done.returncode, done.stderr.decode(errors="replace"), done.stdout.decode()


def refused_in_one_form(code: int, stderr: str, command: str = "serve") -> str:
    """The message of a refusal in the one form: exit 2, an error line and the hint."""
    assert code == 2, stderr
    lines = stderr.splitlines()
    assert len(lines) == 2, stderr  # no usage block, no traceback
    assert lines[0].startswith(f"modelpool {command}: error: "), stderr
    assert lines[1] == HINT.format(command=command), stderr
    return lines[0].removeprefix(f"modelpool {command}: error: ")


# -- no abbreviations ----------------------------------------------------------------


async def test_an_abbreviated_option_is_refused_with_a_suggestion(tmp_path: Path) -> None:
    """`--worker 2` used to mean `--workers 2`, silently."""
    started = tmp_path / "started"
    model = ("--model-cmd", f"touch {started}")
    for args, typed in [
        (["--worker", "2"], "--worker"),
        (["--worker=2"], "--worker"),
        (["serve", "--work", "2"], "--work"),
    ]:
        message = refused_in_one_form(*(await run(*args, *model))[:2])
        assert message == f"{typed}: no such option (did you mean --workers?)", message
    assert not started.exists(), "a model was started"
    message = refused_in_one_form(*(await run("worker", "--queu", "redis://h:1/0"))[:2], "worker")
    assert message == "--queu: no such option (did you mean --queue?)"


@pytest.mark.parametrize("option", OPTIONS, ids=lambda option: option.flag)
def test_no_option_can_be_shortened(option, capsys: pytest.CaptureFixture) -> None:
    flags = {o.flag for o in OPTIONS}
    short = option.flag[:-1]
    assert short not in flags
    with pytest.raises(SystemExit) as stopped:
        parse(["serve", short, "1"] if option.convert else ["serve", short], {})
    assert stopped.value.code == 2
    message = capsys.readouterr().err
    assert f"{short}: no such option (did you mean {option.flag}?)" in message, message


# -- one form of error ---------------------------------------------------------------


async def test_every_kind_of_mistake_is_reported_in_one_form(tmp_path: Path) -> None:
    config = tmp_path / "modelpool.toml"
    config.write_text("timeout = 'soon'\n")
    cases = [
        (["--workers", "0"], {}, "--workers: must be at least 1, got 0"),
        (["--workers", "many"], {}, "--workers: 'many' is not a whole number"),
        (["--workers"], {}, "--workers: expected one argument"),
        ([], {"MODELPOOL_TIMEOUT": "soon"}, "--timeout (from MODELPOOL_TIMEOUT='soon'): "),
        (["--config", str(config)], {}, f"--timeout (from {config}): 'soon' is not a number"),
        (["--log-level", "LOUD"], {}, "--log-level: must be one of DEBUG, INFO"),
        (["--host", "0.0.0.0"], {}, "--host: 0.0.0.0 is not a loopback address"),
        (["stray"], {}, "unexpected argument 'stray'"),
    ]
    for args, env, reason in cases:
        message = refused_in_one_form(*(await run("serve", *args, env=env))[:2])
        assert message.startswith(reason), (args, message)
    message = refused_in_one_form(*(await run("worker"))[:2], "worker")
    assert message.startswith("--queue is required"), message


# -- commands ------------------------------------------------------------------------


async def test_a_mistyped_command_is_refused_with_the_closest_one_and_the_list(
    tmp_path: Path,
) -> None:
    """`modelpool serv` used to say "unexpected argument 'serv' (an option's value must
    follow it)": it was taken for a stray word of the default command, serve."""
    program = str(Path(sys.executable).parent / "modelpool")  # the installed entry point
    started = tmp_path / "started"
    for typed, hint in [
        ("serv", " (did you mean serve?)"),
        ("server", " (did you mean serve?)"),
        ("wroker", " (did you mean worker?)"),
        ("check", ""),
    ]:
        with trio.fail_after(30):
            done = await trio.run_process(
                [program, typed, "--model-cmd", f"touch {started}"],
                capture_stdout=True,
                capture_stderr=True,
                check=False,
                env=clean_env(),
            )
        assert done.returncode == 2, done.stderr
        assert done.stderr.decode().splitlines() == [
            f"modelpool: error: {typed}: no such command{hint}; the commands are serve, worker",
            "(modelpool --help lists the commands)",
        ]
    assert not started.exists(), "a model was started"
    code, _, text = await run("--help")
    assert code == 0
    assert re.search(r"^    serve ", text, re.MULTILINE), text
    assert re.search(r"^    worker ", text, re.MULTILINE), text


def test_the_architecture_names_the_commands_there_are() -> None:
    """ARCHITECTURE.md once named a `check` command that never existed."""
    layers = (ROOT / "ARCHITECTURE.md").read_text(encoding="utf-8")
    (cli,) = [line for line in layers.splitlines() if line.startswith("cli ")]
    named = re.findall(r"modelpool (\w+)", cli)
    commands = list(build_parser().commands)
    assert sorted(named) == sorted(commands), cli
    assert "..." not in cli, cli  # every command named, none left to guess


# -- help by topic -------------------------------------------------------------------


def sections(help_text: str) -> dict[str, str]:
    """`--help`'s sections by title: a line at the left margin that ends in a colon."""
    found: dict[str, str] = {}
    title = ""
    for line in help_text.splitlines():
        if re.fullmatch(r"[a-zA-Z][\w ]*:", line):
            title = line[:-1]
            found[title] = ""
        elif title:
            found[title] += line + "\n"
    return found


async def test_help_groups_the_options_by_topic() -> None:
    code, _, text = await run("serve", "--help")
    assert code == 0
    found = sections(text)
    assert list(found) == ["options", *TOPICS], list(found)
    for option in OPTIONS:
        listed = re.compile(rf"^  {re.escape(option.flag)}( |$)", re.MULTILINE)
        (where,) = [title for title, body in found.items() if listed.search(body)]
        assert where == option.topic, (option.flag, where)
    assert len(text.split("usage:")[1].split("\n\n")[0].splitlines()) == 1  # a short usage
    code, _, text = await run("worker", "--help")
    assert code == 0
    found = sections(text)
    assert "HTTP" not in found and "--port" not in text  # a worker listens nowhere
    assert "  --queue " in found["cluster"]


# -- the Redis client is an extra ----------------------------------------------------


async def test_queue_without_the_redis_client_names_the_extra_before_any_model_starts(
    tmp_path: Path,
) -> None:
    started = tmp_path / "started"
    model = ("--model-cmd", f"touch {started}", "--workers", "1")
    for command in ("serve", "worker"):
        begun = trio.current_time()
        code, stderr, _ = await run(
            command, "--queue", "redis://127.0.0.1:1/0", *model, code=WITHOUT_COREDIS
        )
        message = refused_in_one_form(code, stderr, command)
        assert message.startswith("--queue: needs the Redis client"), message
        assert "pip install 'modelpool[redis]'" in message
        assert trio.current_time() - begun < 20  # at once: the old one tried to connect
    assert not started.exists(), "a model was started"
    # Without --queue nothing imports it: a service (or worker) without a shared queue runs.
    unused = (
        "import sys, modelpool.cli.main, modelpool.service.server; "
        "assert 'coredis' not in sys.modules"
    )
    code, stderr, _ = await run(code=unused)
    assert code == 0, stderr


def test_the_library_names_the_extra_too(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "coredis", None)  # as if it were not installed
    with pytest.raises(ConfigError) as refused:
        PoolConfig(queue="redis://127.0.0.1:1/0")
    assert refused.value.field == "queue"
    assert "modelpool[redis]" in refused.value.problem
    PoolConfig()  # the in-process queue needs no client
    parse(["serve"], {})


def test_the_package_metadata_has_licence_authors_and_classifiers() -> None:
    """What a package index shows, from the installed distribution's metadata."""
    meta = metadata.metadata("modelpool")
    assert meta["License-Expression"] == "MIT"
    assert "LICENSE" in meta.get_all("License-File")
    assert meta["Author"] == "the modelpool authors"
    licence = (ROOT / "LICENSE").read_text()
    assert licence.startswith("MIT License\n\nCopyright (c) 2026 the modelpool authors\n")
    classifiers = meta.get_all("Classifier")
    unknown = [c for c in classifiers if c not in trove_classifiers.classifiers]
    assert not unknown, unknown
    assert "Operating System :: POSIX :: Linux" in classifiers
    assert "Programming Language :: Python :: 3.11" in classifiers
    requires = meta.get_all("Requires-Dist")
    coredis = [r for r in requires if r.startswith("coredis")]
    assert coredis and all("extra == 'redis'" in r or "extra == 'test'" in r for r in coredis)
    assert {"redis", "test"} <= set(meta.get_all("Provides-Extra"))


# -- a model's output in the log -----------------------------------------------------


def test_each_stream_has_its_level_option() -> None:
    _, settings = parse(["serve"], {})
    assert settings.config.pool.model_stdout_level == "DEBUG"
    assert settings.config.pool.model_log_level == "INFO"
    _, settings = parse(["serve"], {"MODELPOOL_MODEL_STDOUT_LEVEL": "info"})
    assert settings.config.pool.model_stdout_level == "INFO"
    assert PoolConfig(model_stdout_level="WARNING").model_stdout_level == "WARNING"
    with pytest.raises(ConfigError) as refused:
        PoolConfig(model_stdout_level="LOUD")
    assert refused.value.field == "model_stdout_level"


@pytest.mark.parametrize(
    ("args", "stdout_level"),
    [
        ((), None),  # the default: not in an INFO log
        (("--model-stdout-level", "INFO"), "INFO"),
        (("--log-level", "DEBUG"), "DEBUG"),
    ],
    ids=["default", "stdout-at-info", "debug-log"],
)
async def test_a_models_stdout_reaches_the_log_only_when_asked_and_its_stderr_does(
    args: tuple[str, ...], stdout_level: str | None
) -> None:
    """model3 echoes every input on stdout ("input: {...}") and counts on it at start-up;
    a request without "data" makes it raise: the traceback, on stderr, says why it failed."""
    options = ("--workers", "1", "--log-format", "json", *args)
    async with server_process(*options, env=FAST_MODEL3) as server:
        async with await wait_listening(server) as client:
            await wait_ready(client, 1, within=20)
            body = {"data": 0, "user": "private-words"}
            assert (await client.post("/predict", json=body)).status_code == 200
            error_body(await client.post("/predict", json={"user": "x"}), 502, "model failed")
            await wait_until(lambda: any("failed, model" in x for x in server.log), 5, "log")
        server.proc.terminate()
        assert await server.exit_code(within=15) == 0
    records = [json.loads(line) for line in server.log if line.strip()]
    stdout = [r for r in records if r.get("stream") == "stdout"]
    stderr = [r for r in records if r.get("stream") == "stderr"]
    echoed = [r for r in stdout if "private-words" in r["message"]]
    starting = [r for r in stdout if "initializing model" in r["message"]]
    if stdout_level is None:
        assert not stdout, stdout
        assert not [r for r in records if "private-words" in r["message"]]
    else:
        assert [r["level"] for r in echoed] == [stdout_level], echoed
        assert "input: " in echoed[0]["message"] and echoed[0]["request_id"]
        assert [r["level"] for r in starting] == [stdout_level]  # before the ready line too
    assert any("request has no 'data' field" in r["message"] for r in stderr), records
    assert {r["level"] for r in stderr} == {"INFO"}


async def test_a_model_that_says_on_stdout_why_it_cannot_start_is_quoted_at_info(
    tmp_path: Path,
) -> None:
    """Its stdout is out of an INFO log now; the start-up failure's own line quotes it.

    No request reached the model, so what it printed holds no user's data; /healthz,
    which anyone may read, gets the failure without it.
    """
    model = tmp_path / "model.py"
    model.write_text(
        "import sys\nprint('loading weights.bin', flush=True)\n"
        "print('error: weights.bin: no such file', flush=True)\nsys.exit(1)\n"
    )
    args = ("--model-cmd", f"{sys.executable} {model}", "--workers", "1")
    code, stderr, _ = await run("serve", "--port", "0", *args)
    assert code == 3, stderr
    (verdict,) = [line for line in stderr.splitlines() if "cannot start any model" in line]
    assert "model exited with code 1" in verdict
    assert "printed 2 lines on stdout, the last: 'loading weights.bin', " in verdict, verdict
    assert "'error: weights.bin: no such file'" in verdict
    assert " stdout: " not in stderr  # the lines themselves: at --model-stdout-level
