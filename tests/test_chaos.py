"""The chaos session (benchmarks/chaos.py), short: it must end with every promise kept."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import trio

from conftest import ROOT

# 40 s of chaos each: `-m "not slow"` skips them locally; CI runs them
pytestmark = pytest.mark.slow

DURATION = 40  # seconds of chaos; the whole run takes about 20 s more


@pytest.mark.parametrize(
    ("preload", "models"),
    [(False, 1), (True, 1), (True, 2)],
    ids=["plain", "preload", "preload-2-models"],
)
async def test_a_short_chaos_session_keeps_every_promise(
    tmp_path: Path, preload: bool, models: int
) -> None:
    """With --preload too: every model forked from one template, which is killed as well.
    With two models on the same slots (--models 2, with --preload: each model its own
    template, a slot moved by a fork): each request to one of them, every answer from a
    process of the model asked, and slots moved between them."""
    summary_file = tmp_path / "chaos.json"
    service_log = tmp_path / "service.log"
    done = await trio.run_process(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "chaos.py"),
            "--duration",
            str(DURATION),
            "--json",
            str(summary_file),
            "--service-log",
            str(service_log),
            *(["--preload"] if preload else []),
            *(["--models", str(models)] if models > 1 else []),
        ],
        capture_stdout=True,
        check=False,
    )
    output = done.stdout.decode()
    summary = json.loads(summary_file.read_text())
    assert done.returncode == 0, (output, _told(service_log, summary))
    assert summary["wrong_id"] == 0
    # a connection closed or reset before its answer: "Server disconnected without sending
    # a response" and the like, by kind
    assert summary["lost"] == 0, (summary["lost_kinds"], _told(service_log, summary))
    assert summary["missing"] == 0, _told(service_log, summary)
    assert summary["left_behind"] == 0
    assert summary["service_exit_code"] == 0
    assert all(summary["checks"].values()), summary["checks"]
    # the chaos really happened, and the service really served through it
    assert set(summary["chaos"]) >= {"kill", "timeout", "crash", "escape", "hangup", "burst"}
    if preload:
        assert summary["chaos"].get("template", 0) >= 1
        assert summary["template"]["forks"] > 4
    assert summary["errors"].get("504 model timeout", 0) >= 1
    assert summary["errors"].get("502 model failed", 0) >= 1
    assert summary["escaped_daemons_started"] >= 1
    assert summary["ok"] > 1000
    if models > 1:
        assert summary["wrong_model"] == 0
        assert summary["slot_moves"] >= 1
        assert set(summary["models"]) == {f"m{i}" for i in range(models)}
        assert all(m["ok"] > 0 for m in summary["models"].values()), summary["models"]


def _told(service_log: Path, summary: dict) -> list[str]:
    """What the service logged of the requests that got no answer, by their ids (each
    request is sent with its id as X-Request-ID), to tell where one was lost."""
    ids = [example.split(":")[0] for example in summary["unanswered"]]
    lines = service_log.read_text(errors="replace").splitlines()
    return [line for line in lines if any(i in line for i in ids)][:40] or lines[-40:]
