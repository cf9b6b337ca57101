"""--preload: pay a model's start-up once, and fork every model from one warm template.

A `Template` runs the model command under modelpool's launcher (`_launcher.py`): the
model loads as it always does, prints its ready line, and at its first read of stdin
the launcher stops there and waits for fork requests on a control socket. A `Forker`
(the `ModelStarter` of a preloading pool, see starter.py) asks it for one child per
model start: it makes the child's three pipes, sends the child's ends and its
containment token over the socket (SCM_RIGHTS), and gets back the child's pid and a
pidfd. The child carries on with that same read on its own stdin, so for its worker it
is a model like any other (`ForkedProcess` is its `ModelHandle`), and for the model
nothing happened.

What can go wrong, and what happens then:
- The model is not safe to fork at its fork point (threads, sockets, devices, an
  epoll, a pipe it reads a helper's answers from; or it never reads sys.stdin): the
  template says why, the pool logs it in one WARNING line and shows it in /status,
  and this generation's models start plainly
  (`TemplateState.FALLBACK`). A process is never forked in an unsafe state.
- The template fails to load: it is loaded again after the usual back-off, and model
  starts meanwhile fail as a plain start that failed would (the worker backs off).
- The template dies while its children serve: they serve on. It is loaded again in the
  background, and replacements fork from the new one once it is ready.
- A child's environment is the template's, with its own token and, with --devices,
  its worker's device, set by the launcher right after the fork in its os.environ and
  where /proc/PID/environ shows it (the template itself has none, see devices.py).
- A child's exit: its pidfd tells the moment; its status comes from the template,
  which reaps its children and reports, or from waitid if the service adopted the child
  as a subreaper after the template died. If neither can tell, the status is unknown,
  and /status says so.

A reload loads a new generation's template first (`Preloader.prepare`), and retires
the old ones only once every model of theirs is replaced (`Preloader.retire_others`).
"""

from __future__ import annotations

import array
import contextlib
import enum
import itertools
import json
import logging
import os
import signal
import socket
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from modelpool.process.devices import ROOM_VAR
from modelpool.process.model import StartFailed, open_model
from modelpool.process.reaper import TOKEN_VAR, descendants
from modelpool.process.starter import ModelHandle, ModelStarter, Spawner
from modelpool.settings.pycommand import parse_python_command

if TYPE_CHECKING:
    from modelpool.pool.pool import Pool
    from modelpool.process.model import ModelProcess
    from modelpool.process.reaper import Reaper
    from modelpool.settings.config import PoolConfig

log = logging.getLogger("modelpool.preload")

FORK_POINT_WAIT = 10.0  # seconds from the ready line to the model's first read of stdin
FORK_TIMEOUT = 5.0  # seconds a template gets to answer a fork request
REPORT_WAIT = 2.0  # seconds the template gets to report how a child of its ended
MAX_MESSAGE = 64 * 1024
HEALTHY_UPTIME = 30.0  # a template that served this long ends a run of failures
OWN_VARIABLES = (TOKEN_VAR, ROOM_VAR)  # the launcher's business, in no fork request
TEMPLATE_TOKEN_LENGTH = 64
"""Characters of a template's containment token: room for any child's token.

A child gets its own token written over the template's, in place, where
/proc/PID/environ shows it (see _launcher.py): a token no longer than the template's,
padded with NUL bytes (empty entries to whoever reads the environment).
"""


class TemplateState(enum.StrEnum):
    LOADING = "loading"  # its model is loading (first time, or after it died)
    READY = "ready"  # models are forked from it
    FALLBACK = "fallback"  # it cannot be forked safely: models start plainly
    FAILED = "failed"  # its last load failed; it is loaded again after a back-off
    STOPPED = "stopped"


TEMPLATE_STATES = tuple(state.value for state in TemplateState)


@dataclass
class _ExitReport:
    """How a child ended, as its template reports it; `done` once known or never to be."""

    status: int | None = None
    done: trio.Event = field(default_factory=trio.Event)


@dataclass
class _Reply:
    """The template's answer to one fork request."""

    done: trio.Event = field(default_factory=trio.Event)
    pid: int | None = None
    pidfd: int | None = None
    report: _ExitReport | None = None
    error: str | None = None


class ForkedProcess:
    """A child forked from a template, as a `ModelHandle` (see starter.py)."""

    method = "fork"
    ready_at_start = True

    def __init__(
        self,
        pid: int,
        pidfd: int,
        pipes: tuple[int, int, int],
        report: _ExitReport,
        started_at: float,
    ) -> None:
        self.pid = pid
        self.started_at = started_at
        self.stdin = trio.lowlevel.FdStream(pipes[0])
        self.stdout = trio.lowlevel.FdStream(pipes[1])
        self.stderr = trio.lowlevel.FdStream(pipes[2])
        self._pidfd = pidfd
        self._report = report
        self._exited = False
        self._code: int | None = None
        self._waiting = trio.Lock()  # one task waits on the pidfd; the others on the lock

    @property
    def returncode(self) -> int | None:
        return self._code if self._exited else None

    @property
    def running(self) -> bool:
        return not self._exited

    async def wait(self) -> int | None:
        async with self._waiting:
            if not self._exited:
                await trio.lowlevel.wait_readable(self._pidfd)
                self._code = await self._exit_status()
                self._exited = True
                os.close(self._pidfd)
                self._pidfd = -1
        return self._code

    async def _exit_status(self) -> int | None:
        """It has exited: its status from whoever is its parent now, if anyone can tell."""
        code = self._reap_adopted()
        if code is not None:
            return code
        with trio.move_on_after(REPORT_WAIT):
            await self._report.done.wait()
        if self._report.status is not None:
            return self._report.status
        return self._reap_adopted()

    def _reap_adopted(self) -> int | None:
        """Its status, if this process is its parent (adopted after the template died)."""
        try:
            result = os.waitid(os.P_PIDFD, self._pidfd, os.WEXITED | os.WNOHANG)
        except ChildProcessError:
            return None
        if result is None:
            return None
        if result.si_code in (os.CLD_KILLED, os.CLD_DUMPED):
            return -result.si_status
        return result.si_status

    async def aclose(self) -> None:
        for stream in (self.stdin, self.stdout, self.stderr):
            await stream.aclose()

    def memory_mib(self) -> float:
        """What it holds of its own: the private pages of its tree, not the template's."""
        return tree_private_mib(self.pid)


class Template:
    """One generation's warm template: loaded, re-loaded when it dies, asked for forks."""

    def __init__(self, config: PoolConfig, generation: int, reaper: Reaper) -> None:
        self.config = config
        self.generation = generation
        self.name = f"template (generation {generation})"
        self.state = TemplateState.LOADING
        self.pid: int | None = None
        self.load_seconds: float | None = None
        self.loads = 0  # templates loaded that became ready
        self.forks = 0
        self.fallback_reason: str | None = None
        self.failure: StartFailed | None = None
        self._reaper = reaper
        self._changed = trio.Event()
        self._scope = trio.CancelScope()
        self._sock: trio.socket.SocketType | None = None
        self._model: ModelProcess | None = None
        self._sending = trio.Lock()
        self._ids = itertools.count(1)
        self._pending: dict[int, _Reply] = {}
        self._exits: dict[int, _ExitReport] = {}  # pid -> report, for this template's children
        self._last_stderr: list[str] = []  # the last load's last stderr lines, for its failure
        self._env: dict[str, str] = {}  # the environment the ready template started with

    # -- its life -----------------------------------------------------------------------

    async def run(self, pool_stopped: trio.Event) -> None:
        """Load the template and keep one loaded until stopped (or the pool is)."""
        async with trio.open_nursery() as nursery:

            async def stop_with_pool() -> None:
                await pool_stopped.wait()
                self.stop()

            nursery.start_soon(stop_with_pool)
            with self._scope:
                await self._keep_loaded()
            nursery.cancel_scope.cancel()
        self._set(TemplateState.STOPPED)

    def stop(self) -> None:
        """Stop the template gracefully (its stdin closes); its children serve on."""
        self._scope.cancel()

    def kill(self) -> None:
        """Hard stop: SIGKILL the template and what it started (not its children) now."""
        if self._model is not None:
            self._model.kill_group()
        self.stop()

    async def _keep_loaded(self) -> None:
        failures = 0
        while True:
            if failures:
                await trio.sleep(self.config.backoff(failures))
            self._set(TemplateState.LOADING)
            loaded_at = trio.current_time()
            failed = False
            try:
                await self._one_template()
            except* StartFailed as group:
                exc = group.exceptions[0]
                assert isinstance(exc, StartFailed)
                exc.stderr = exc.stderr or self._last_stderr  # for the workers' reports
                self.failure = exc
                failed = True
                log.error("%s failed to load: %s", self.name, exc)
            if self.state is TemplateState.FALLBACK:
                await trio.sleep_forever()  # this generation's models start plainly
            if failed:
                failures += 1
                self._set(TemplateState.FAILED)
                continue
            up = trio.current_time() - loaded_at
            failures = 0 if up >= HEALTHY_UPTIME else failures + 1
            log.warning(
                "%s ended after %.1f s; its children serve on; loading a new one", self.name, up
            )

    async def _one_template(self) -> None:
        """Load one template process and serve fork requests until it ends."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        sock = trio.socket.from_stdlib_socket(ours)
        self._last_stderr = []
        loaded: ModelProcess | None = None
        try:
            command = parse_python_command(self.config.model_cmd).launched(theirs.fileno())
            config = replace(self.config, model_cmd=command)
            starter = Spawner(self._reaper, pass_fds=[theirs.fileno()])
            token = self._reaper.new_token().ljust(TEMPLATE_TOKEN_LENGTH, ".")
            model_cm = open_model(
                config, self.name, self._reaper, starter, token, takes_requests=False
            )
            async with model_cm as model:
                loaded = model
                theirs.close()
                await model.wait_ready()
                first = await self._fork_point(sock, model)
                if first.get("event") != "fork_point":
                    self._fall_back(str(first.get("reason", first)))
                    return
                self.pid, self._model, self._env = model.pid, model, model.env
                self.load_seconds = trio.current_time() - model.started_at
                self.loads += 1
                self.failure = None
                self._sock = sock
                self._set(TemplateState.READY)
                log.info(
                    "%s ready after %.1f s: models are forked from it",
                    model.name,
                    self.load_seconds,
                )
                await self._serve(sock)
        finally:
            if loaded is not None:
                self._last_stderr = loaded.stderr_tail
            self._sock, self._model = None, None
            sock.close()
            theirs.close()
            self.pid = None
            if self.state is TemplateState.READY:
                self._set(TemplateState.LOADING)  # starts wait for the next one from now on
            self._template_gone()

    async def _fork_point(self, sock: trio.socket.SocketType, model: ModelProcess) -> dict:
        """The launcher's first word: it reached the fork point, or it is not safe to fork."""
        with trio.move_on_after(FORK_POINT_WAIT):
            try:
                message, fds = await _receive(sock)
            except BadMessage as exc:
                problem = f"a message on its control socket makes no sense: {exc}"
                raise StartFailed(f"{self.name} failed to start: {problem}") from None
            for fd in fds:
                os.close(fd)
            if message is None:
                failure = await model.describe_failure()
                raise StartFailed(f"{self.name} ended before its fork point: {failure.detail}")
            return message
        return {
            "event": "unsafe",
            "reason": f"it printed its ready line but did not read sys.stdin within "
            f"{FORK_POINT_WAIT:g} s (a model that reads fd 0 directly, or waits with "
            "select(), never reaches the fork point)",
        }

    def _fall_back(self, reason: str) -> None:
        self.fallback_reason = reason
        self._set(TemplateState.FALLBACK)
        log.warning(
            "--preload: %s cannot be forked safely: %s; its models start plainly",
            self.name,
            reason,
        )

    async def _serve(self, sock: trio.socket.SocketType) -> None:
        """Read the template's messages until it ends, or falls back to plain starts.

        The model runs in that process and could write to the socket too: a message
        that makes no sense ends the template (a new one is loaded).
        """
        while True:
            try:
                message, fds = await _receive(sock)
                if message is None or self._on_message(message, fds):
                    return
            except (BadMessage, KeyError, TypeError, ValueError) as exc:
                log.error("%s sent a message that makes no sense (%s); killing it", self.name, exc)
                if self._model is not None:
                    self._model.kill_group()
                return

    def _on_message(self, message: dict, fds: list[int]) -> bool:
        """Act on one message, owning its descriptors; True once the template is unsafe."""
        event = message.get("event")
        if event == "forked":
            self._on_forked(message, fds)
            return False
        for fd in fds:
            os.close(fd)
        if event == "exited":
            report = self._exits.pop(int(message["pid"]), None)
            if report is not None:
                report.status = int(message["status"])
                report.done.set()
        elif event == "fork_failed":
            reply = self._pending.get(message.get("id", 0))
            if reply is not None:
                reply.error = str(message.get("error"))
                reply.done.set()
            if message.get("unsafe"):  # it became unsafe to fork since its fork point
                self._fall_back(str(message.get("error")))
                return True
        return False

    def _on_forked(self, message: dict, fds: list[int]) -> None:
        pid = message.get("pid")
        reply = self._pending.get(message.get("id", 0))
        if not isinstance(pid, int) or pid <= 0 or len(fds) != 1:
            for fd in fds:
                os.close(fd)
            raise ValueError(f"a fork reported with pid {pid!r} and {len(fds)} descriptor(s)")
        report = self._exits[pid] = _ExitReport()
        if reply is None:  # its start was cancelled meanwhile: nobody owns the child
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(fds[0], signal.SIGKILL)
            os.close(fds[0])
            return
        reply.pid, reply.pidfd, reply.report = pid, fds[0], report
        reply.done.set()

    def _template_gone(self) -> None:
        """No more reports will come: children that end from now on are waited for alone."""
        for report in self._exits.values():
            report.done.set()
        self._exits.clear()
        for reply in self._pending.values():
            if reply.error is None and reply.pidfd is None:
                reply.error = "the template ended"
            reply.done.set()

    # -- forking -----------------------------------------------------------------------

    async def settled(self, within: float, name: str) -> None:
        """Wait while it is loading; StartFailed if it does not become ready or fall back."""
        with trio.move_on_after(within):
            while self.state is TemplateState.LOADING:
                await self._changed.wait()
        if self.state in (TemplateState.READY, TemplateState.FALLBACK):
            return
        if self.state is TemplateState.LOADING:
            raise StartFailed(f"{name} failed to start: {self.name} not loaded within {within:g} s")
        if self.failure is not None:
            failure = self.failure
            raise type(failure)(f"{name} failed to start: {failure}", stderr=failure.stderr)
        raise StartFailed(f"{name} failed to start: {self.name} is {self.state}")

    def env_changes(self, env: dict[str, str]) -> dict[str, str | None]:
        """How a child's environment (`env`, what a plain start would get) differs from
        the template's: its device (see devices.py), set in the child's os.environ right
        after the fork. None unsets a variable. The token is written apart, and the room
        is the launcher's (see _launcher.py).
        """
        changes: dict[str, str | None] = {
            key: value
            for key, value in env.items()
            if self._env.get(key) != value and key not in OWN_VARIABLES
        }
        gone = [key for key in self._env if key not in env and key not in OWN_VARIABLES]
        changes.update(dict.fromkeys(gone))
        return changes

    async def fork(
        self, name: str, token: str, env: dict[str, str | None] | None = None
    ) -> ForkedProcess:
        """One child, with its own pipes, token and `env` changes (see env_changes);
        StartFailed if the template cannot."""
        sock = self._sock
        if sock is None or self.state is not TemplateState.READY:
            raise StartFailed(f"{name} failed to start: {self.name} is {self.state}")
        started_at = trio.current_time()
        stdin_r, stdin_w = os.pipe()
        stdout_r, stdout_w = os.pipe()
        stderr_r, stderr_w = os.pipe()
        theirs, ours = [stdin_r, stdout_w, stderr_w], [stdin_w, stdout_r, stderr_r]
        ident = next(self._ids)
        reply = self._pending[ident] = _Reply()
        child: ForkedProcess | None = None
        try:
            fork = {"op": "fork", "id": ident, "token": token, "env": env or {}}
            request = json.dumps(fork).encode()
            fds = array.array("i", theirs)
            try:
                async with self._sending:
                    await sock.sendmsg([request], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])
            except OSError as exc:
                raise StartFailed(f"{name} failed to start: {self.name} is gone ({exc})") from exc
            finally:
                for fd in theirs:
                    os.close(fd)
            with trio.move_on_after(FORK_TIMEOUT):
                await reply.done.wait()
            if not reply.done.is_set():
                problem = f"{self.name} did not fork within {FORK_TIMEOUT:g} s"
                if self._model is not None:  # it is stuck: a new one is loaded
                    log.error("%s; killing it", problem)
                    self._model.kill_group()
                raise StartFailed(f"{name} failed to start: {problem}")
            if reply.error is not None or reply.pid is None or reply.pidfd is None:
                problem = f"{self.name} could not fork: {reply.error}"
                raise StartFailed(f"{name} failed to start: {problem}")
            assert reply.report is not None
            pipes = (stdin_w, stdout_r, stderr_r)
            child = ForkedProcess(reply.pid, reply.pidfd, pipes, reply.report, started_at)
            self.forks += 1
            return child
        finally:
            self._pending.pop(ident, None)
            if child is None:
                for fd in ours:
                    os.close(fd)
                if reply.pidfd is not None:  # forked, but its start was cancelled
                    with contextlib.suppress(ProcessLookupError):
                        signal.pidfd_send_signal(reply.pidfd, signal.SIGKILL)
                    os.close(reply.pidfd)

    def snapshot(self) -> dict[str, Any]:
        """The template for /status: where it is, what it cost, and what it shares."""
        memory = smaps_mib(self.pid) if self.pid is not None else {}
        return {
            "generation": self.generation,
            "state": self.state.value,
            "pid": self.pid,
            "load_seconds": None if self.load_seconds is None else round(self.load_seconds, 3),
            "loads": self.loads,
            "forks": self.forks,
            "shared_mib": memory.get("shared"),
            "private_mib": memory.get("private"),
            "fallback_reason": self.fallback_reason,
            "last_failure": None if self.failure is None else str(self.failure),
        }

    def _set(self, state: TemplateState) -> None:
        self.state = state
        self._changed.set()
        self._changed = trio.Event()


class Forker:
    """The `ModelStarter` of a preloading pool: a fork from the template, or a plain
    start if the template cannot be forked safely."""

    def __init__(self, template: Template, spawner: Spawner, reaper: Reaper) -> None:
        self._template = template
        self._spawner = spawner
        self._reaper = reaper

    async def start(
        self, config: PoolConfig, name: str, token: str, env: dict[str, str]
    ) -> ModelHandle:
        asked_at = trio.current_time()
        template = self._template
        await template.settled(config.init_timeout + FORK_POINT_WAIT, name)
        if template.state is TemplateState.FALLBACK:
            return await self._spawner.start(config, name, token, env)
        try:
            async with self._reaper.spawning():
                child = await template.fork(name, token, template.env_changes(env))
                self._reaper.model_started(child.pid, token)
        except StartFailed:
            if template.state is not TemplateState.FALLBACK:
                raise
            return await self._spawner.start(config, name, token, env)  # unsafe since: plain
        child.started_at = asked_at
        return child

    def backoff(self, config: PoolConfig, failures: int) -> float:
        """A fork is cheap: the first failure in a row is replaced at once."""
        return config.backoff(failures - 1)


class Preloader:
    """A preloading pool's templates, one per model generation (a reload makes a new one)."""

    def __init__(self, pool: Pool) -> None:
        self._pool = pool
        self._spawner = Spawner(pool.reaper)
        self.templates: dict[int, Template] = {}

    def load(self, generation: int, config: PoolConfig) -> Template:
        """Start loading a generation's template in the background."""
        template = Template(config, generation, self._pool.reaper)
        self.templates[generation] = template

        async def run() -> None:
            await template.run(self._pool.stopped)

        self._pool.start_task(run)
        return template

    def starter(self, generation: int, config: PoolConfig) -> ModelStarter:
        """How a model of `generation` starts: forked from its template, which the first
        model of the pool's generation has loaded; plainly for an older generation whose
        template is retired (its last workers are on their way out)."""
        template = self.templates.get(generation)
        if template is None and generation == self._pool.generation:
            template = self.load(generation, config)
        if template is None or template.config.model_cmd != config.model_cmd:
            return self._spawner
        return Forker(template, self._spawner, self._pool.reaper)

    async def prepare(self, generation: int, config: PoolConfig) -> Template:
        """Load a new generation's template and wait for it; StartFailed if it fails."""
        template = self.load(generation, config)
        try:
            await template.settled(config.init_timeout + FORK_POINT_WAIT, template.name)
        except StartFailed:
            template.stop()
            del self.templates[generation]
            if template.failure is not None:  # its own words, not wrapped in its name again
                raise template.failure from None
            raise
        return template

    def kill(self) -> None:
        for template in self.templates.values():
            template.kill()

    def retire_others(self, generation: int) -> None:
        """Every model is of `generation` now: the other templates are of no more use."""
        for number in [g for g in self.templates if g != generation]:
            log.info("%s retired", self.templates[number].name)
            self.templates.pop(number).stop()

    def current(self) -> Template | None:
        return self.templates.get(self._pool.generation)

    def snapshot(self) -> dict[str, Any] | None:
        template = self.current()
        return None if template is None else template.snapshot()


class BadMessage(Exception):
    """What came on a template's control socket is not a message of the launcher's."""


async def _receive(sock: trio.socket.SocketType) -> tuple[dict | None, list[int]]:
    """One message from the launcher and the descriptors it carried; None at its end.

    BadMessage (its descriptors closed) if it is not one JSON object, whole.
    """
    fds: list[int] = []
    try:
        data, ancillary, flags, _ = await sock.recvmsg(MAX_MESSAGE, socket.CMSG_SPACE(4 * 4))
    except OSError:
        return None, fds
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            numbers = array.array("i")
            numbers.frombytes(payload[: len(payload) - len(payload) % numbers.itemsize])
            fds.extend(numbers)
    if not data:
        for fd in fds:
            os.close(fd)
        return None, []
    problem = _message_problem(data, flags)
    if problem is not None:
        for fd in fds:
            os.close(fd)
        raise BadMessage(f"{data[:80]!r}: {problem}")
    return json.loads(data), fds


def _message_problem(data: bytes, flags: int) -> str | None:
    """Why `data` is not one whole JSON object, or None."""
    if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
        return "cut short"
    try:
        message = json.loads(data)
    except ValueError as exc:
        return str(exc)
    return None if isinstance(message, dict) else "not an object"


def smaps_mib(pid: int) -> dict[str, float]:
    """A process's resident memory split into pages it shares and pages of its own, in MiB."""
    shared = private = 0
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key in ("Shared_Clean", "Shared_Dirty"):
            shared += int(rest.split()[0])
        elif key in ("Private_Clean", "Private_Dirty"):
            private += int(rest.split()[0])
    return {"shared": round(shared / 1024, 1), "private": round(private / 1024, 1)}


def tree_private_mib(pid: int) -> float:
    """Private memory of a model and every process below it, in MiB: what it holds of its
    own, leaving out the pages it still shares with its template."""
    return sum(smaps_mib(member).get("private", 0.0) for member in [pid, *descendants(pid)])
