"""Text logs hold one line per record, whatever a client or a model puts in a field.

A request path with `%0D%0A` reaches the access log as CR LF; written as they are, the
rest of the path would pass for a record of its own, of any logger, level and content.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from conftest import SCRIPTED, wait_until
from modelpool.core.logs import TextFormatter, escape
from serverproc import server_process, wait_listening, wait_ready

FORGED = "2026-01-01 00:00:00,000 WARNING modelpool.admin: forged by a client"
ENCODED = FORGED.replace(" ", "%20").replace(",", "%2C")
KEY = "the-key"


async def test_a_crlf_in_a_request_path_cannot_forge_a_log_line() -> None:
    args = ("--model-cmd", " ".join(SCRIPTED), "--workers", "1", "--access-log")
    async with server_process(*args, "--api-key", KEY) as server:
        async with await wait_listening(server) as client:
            client.headers["Authorization"] = f"Bearer {KEY}"
            await wait_ready(client, 1, within=20)
            found = await client.get(f"/nothing%0D%0A{ENCODED}")
            assert found.status_code == 404
            refused = await client.post(
                f"/predict%0A{ENCODED}", headers={"Authorization": "Bearer wrong"}
            )
            assert refused.status_code == 401
            ids = [found.headers["x-request-id"], refused.headers["x-request-id"]]
            await wait_until(lambda: all(any(i in x for x in server.log) for i in ids), 5, "log")
        server.proc.terminate()
        assert await server.exit_code(within=15) == 0
    forged = [line for line in server.log if "forged by a client" in line]
    assert len(forged) == 2, forged  # one access line per request, nothing more
    assert not [line for line in server.log if line.startswith("2026-01-01")], forged
    found_line, refused_line = forged
    assert f'"GET /nothing\\r\\n{FORGED}" 404' in found_line, found_line
    assert f'"POST /predict\\n{FORGED}" 401' in refused_line, refused_line
    assert "modelpool.access" in found_line and f"request_id={ids[0]}" in found_line


def record(message: str, *args: object, **fields: object) -> logging.LogRecord:
    made = logging.LogRecord("modelpool.test", logging.INFO, __file__, 1, message, args, None)
    made.__dict__.update(fields)
    return made


def test_every_field_of_a_text_line_is_escaped() -> None:
    formatter = TextFormatter()
    tricky = "a\rb\nc\x00d\x1be\x7ff\x85g\u2028h\u202ei\tj"
    line = formatter.format(record("model said %s", tricky, request_id="r\n1"))
    assert "\n" not in line and "\r" not in line and line.isprintable()
    assert line.endswith(
        "model said a\\rb\\nc\\x00d\\x1be\\x7ff\\x85g\\u2028h\\u202ei\\tj request_id=r\\n1"
    )
    assert formatter.format(record("caf\u00e9 \u4e2d %d", 3)).endswith("caf\u00e9 \u4e2d 3")
    assert escape("plain text, kept as it is") == "plain text, kept as it is"


def test_a_traceback_keeps_its_lines_but_none_starts_at_the_margin() -> None:
    formatter = TextFormatter()
    error = ValueError(f"bad\n{FORGED}")
    failed = record("failed", exc_info=(ValueError, error, None))
    lines = formatter.format(failed).split("\n")
    assert lines[0].endswith("modelpool.test: failed")
    assert all(line.startswith("    ") for line in lines[1:]), lines
    assert lines[-1] == f"    {FORGED}"  # indented: not a record of its own


async def test_a_first_start_error_quotes_the_models_stderr_one_escaped_line_each(
    tmp_path: Path,
) -> None:
    """The service's own ERROR when no model can start quotes the model's last stderr
    lines: in a text log each on its own indented line, readable as the model wrote
    it, with its control characters escaped; none starts at the margin, so a model
    cannot forge a record there either."""
    model = tmp_path / "fails.py"
    model.write_text(
        "import sys\n"
        "sys.stderr.write('Traceback (most recent call last):\\n')\n"
        f"sys.stderr.write({FORGED!r} + '\\r\\n')\n"
        "sys.stderr.write('\\x1b[31mModuleNotFoundError: torhc\\n')\n"
        "sys.exit(1)\n"
    )
    args = ("--workers", "1", "--model-cmd", f"{sys.executable} {model}")
    async with server_process(*args) as server:
        assert await server.exit_code(within=20) == 3
    assert not [line for line in server.log if line.startswith("2026-01-01")], server.log
    start = next(i for i, line in enumerate(server.log) if "cannot start any model" in line)
    assert server.log[start].endswith("its last stderr lines:"), server.log[start]
    assert server.log[start + 1 : start + 4] == [
        "    Traceback (most recent call last):",
        f"    {FORGED}",
        "    \\x1b[31mModuleNotFoundError: torhc",
    ], server.log[start:]


def test_the_lines_a_record_quotes_are_escaped_and_indented() -> None:
    text = TextFormatter().format(record("verdict:", quoted=["one", "two\rthree\n" + FORGED]))
    assert text.endswith(f"verdict:\n    one\n    two\\rthree\\n{FORGED}"), text
