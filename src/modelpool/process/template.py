"""One generation's --preload template: loaded, loaded again when it dies, asked for forks.

See preload.py for what a template is and what can go wrong with one. The template
process is a model run under the launcher (_launcher.py), started like any model
(`open_model`) with a control socket passed to it; this module keeps one loaded and
asks it for children (`Template.fork`) over that socket (control.py).
"""

from __future__ import annotations

import contextlib
import enum
import json
import logging
import os
import signal
import socket
from dataclasses import replace
from typing import Any

import trio

from modelpool.process import control, forkpoint, threads
from modelpool.process.control import BadMessage, Requests
from modelpool.process.devices import ROOM_VAR
from modelpool.process.forked import ForkedProcess
from modelpool.process.forkpoint import first_word
from modelpool.process.immortal import Immortality, forks_before_walk
from modelpool.process.launch import launcher_command
from modelpool.process.lending import Lending
from modelpool.process.model import ModelProcess, StartFailed, model_environment, open_model
from modelpool.process.procfs import smaps_mib
from modelpool.process.reaper import TOKEN_VAR, Reaper
from modelpool.process.starter import Spawner
from modelpool.settings.config import PoolConfig
from modelpool.settings.pycommand import parse_python_command

log = logging.getLogger("modelpool.preload")

FORK_TIMEOUT = 5.0  # seconds a template gets to answer a fork request
HEALTHY_UPTIME = 30.0  # a template that served this long ends a run of failures
PLAIN_VAR = "MODELPOOL_PLAIN_ENV"  # as _launcher.py's: a plain model's thread variables
OWN_VARIABLES = (TOKEN_VAR, ROOM_VAR, PLAIN_VAR)  # the launcher's business, in no fork request
TEMPLATE_TOKEN_LENGTH = 64
"""Characters of a template's containment token: room for any child's token.

A child gets its own token written over the template's, in place, where
/proc/PID/environ shows it (see _launcher.py): a token no longer than the template's,
padded with NUL bytes (empty entries to whoever reads the environment).
"""


class TemplateGone(StartFailed):
    """The template ended as a fork was asked of it: the next one can be asked instead."""


class TemplateState(enum.StrEnum):
    LOADING = "loading"  # its model is loading (first time, or after it died)
    READY = "ready"  # models are forked from it
    FALLBACK = "fallback"  # it cannot be forked safely: models start plainly
    FAILED = "failed"  # its last load failed; it is loaded again after a back-off
    STOPPED = "stopped"


TEMPLATE_STATES = tuple(state.value for state in TemplateState)


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
        self._requests = Requests()
        self._last_stderr: list[str] = []  # the last load's last stderr lines, for its failure
        self._env: dict[str, str] = {}  # the environment the ready template started with
        self._lending: Lending | None = None  # unsafe to fork: lent as a plain model
        self.adopted_by: str | None = None  # the worker that took it so (lending.py)
        early = forks_before_walk(threads.usable_cores(), threads.per_model(config))
        self.immortality = Immortality(self.name, config.preload_immortal, early)  # immortal.py

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
        """Stop the template gracefully (its stdin closes); its children serve on, and so
        does a worker that took it as its model (lending.py), until that worker ends it."""
        if self._lending is not None:
            self._lending.withdraw()
        self._scope.cancel()

    def kill(self) -> None:
        """Hard stop: SIGKILL the template and what it started (not its children) now."""
        if self._model is not None:
            self._model.kill_group()
        lending = self._lending
        if lending is not None and lending.borrower is None:  # no worker's: ours to kill
            lending.model.kill_group()
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
            python = parse_python_command(self.config.model_cmd)
            ones = threads.template_variables(self.config)  # one thread each: see threads.py
            command = launcher_command(python, theirs.fileno())
            env = {**(self.config.env or {}), **ones}
            if ones:  # for the launcher, if it becomes a plain model (lending.py)
                env[PLAIN_VAR] = json.dumps(self._plain_variables(ones))
            config = replace(self.config, model_cmd=command, env=env)  # one thread each
            starter = Spawner(self._reaper, pass_fds=[theirs.fileno()])
            token = self._reaper.new_token().ljust(TEMPLATE_TOKEN_LENGTH, ".")
            model_cm = open_model(
                config, self.name, self._reaper, starter, token, takes_requests=False
            )
            async with model_cm as model:
                loaded = model
                theirs.close()
                first = await first_word(sock, model, self.name)
                if first.get("event") != "fork_point":
                    # The launcher made it a plain model: the first worker to start takes it
                    # (lent before the workers hear of the fallback).
                    if first.get("event") == "unsafe" and not self.config.devices:
                        self._lending = Lending(model)
                    self._fall_back(str(first.get("reason", first)))
                    if self._lending is not None:
                        await self._lending.lend()
                    return
                self.pid, self._model, self._env = model.pid, model, model.env
                self.load_seconds = trio.current_time() - model.started_at
                self.loads += 1
                self.failure = None
                self._sock = sock
                self.immortality.reset(ready=True)
                self._set(TemplateState.READY)
                log.info(
                    "%s ready after %.1f s: models are forked from it",
                    model.name,
                    self.load_seconds,
                )
                await self.immortality.ask(sock, self._sending)
                await self._serve(sock)
        finally:
            if self._lending is not None:  # its model has stopped
                self._lending.closed()
                self._lending = None
            if loaded is not None:
                self._last_stderr = loaded.stderr_tail
            self._model = None
            self._gone()
            sock.close()
            theirs.close()
            self.pid = None

    def _gone(self) -> None:
        """The template ended (its control socket closed), or is being closed: fork
        requests no longer go to it, and starts wait for the next one from now on.

        Said as soon as its socket closes: its process is reaped after that, and a worker
        restarting meanwhile sent its fork request to a closed socket and failed its start.
        """
        self._sock = None
        self.immortality.reset(ready=False)
        if self.state is TemplateState.READY:
            self._set(TemplateState.LOADING)
        self._requests.template_gone()

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
                message, fds = await control.receive(sock)
                if message is None:
                    self._gone()  # now, not once its process is reaped: no fork waits on it
                    return
                self.immortality.on_message(message)  # a walk's news, or a child's
                unsafe = self._requests.on_message(message, fds)
                if unsafe is not None:  # it became unsafe to fork since its fork point
                    self._fall_back(unsafe)
                    return
            except (BadMessage, KeyError, TypeError, ValueError) as exc:
                log.error("%s sent a message that makes no sense (%s); killing it", self.name, exc)
                if self._model is not None:
                    self._model.kill_group()
                return

    # -- forking -----------------------------------------------------------------------

    async def settled(self, init_timeout: float, name: str) -> None:
        """Wait while it is loading; StartFailed if it does not become ready or fall back
        within `init_timeout` (its model's --init-timeout) and FORK_POINT_WAIT."""
        within = init_timeout + forkpoint.FORK_POINT_WAIT
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

    def lend(self, name: str) -> contextlib.AbstractAsyncContextManager[ModelProcess] | None:
        """Its process, as the model of the worker `name`, if it fell back as a plain
        model that no worker took yet (see lending.py); else None."""
        lending = self._lending
        taken = None if lending is None else lending.take(name)
        if taken is not None:
            self.adopted_by = name
            log.info("%s: %s takes it as its model, its load not thrown away", self.name, name)
        return taken

    def _plain_variables(self, ones: dict[str, str]) -> dict[str, str | None]:
        """For the launcher: what a plain model's environment says instead of the
        template's `ones`, should the process become one (lending.py): it then has a
        plain model's thread budget."""
        plain = model_environment(self.config, "")
        return {key: plain.get(key) for key in ones}

    @property
    def fallen_back(self) -> bool:
        """Whether it cannot be forked safely, so its generation's models start plainly."""
        return self.state is TemplateState.FALLBACK

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
        started_at = trio.current_time()
        await self.immortality.before_fork()  # the first go at once, the others after the walk
        sock = self._sock
        if sock is None or self.state is not TemplateState.READY:
            gone = TemplateGone if self.state is TemplateState.LOADING else StartFailed
            raise gone(f"{name} failed to start: {self.name} is {self.state}")
        stdin_r, stdin_w = os.pipe()
        stdout_r, stdout_w = os.pipe()
        stderr_r, stderr_w = os.pipe()
        theirs, ours = [stdin_r, stdout_w, stderr_w], [stdin_w, stdout_r, stderr_r]
        ident, reply = self._requests.open()
        child: ForkedProcess | None = None
        try:
            try:
                async with self._sending:
                    await control.send_fork(sock, ident, token, env or {}, theirs)
            except OSError as exc:
                self._gone()
                raise TemplateGone(f"{name} failed to start: {self.name} is gone ({exc})") from exc
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
            self._requests.close(ident)
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
            "adopted_by": self.adopted_by,
            "last_failure": None if self.failure is None else str(self.failure),
            **self.immortality.snapshot(self.state is TemplateState.FALLBACK),
        }

    def _set(self, state: TemplateState) -> None:
        self.state = state
        self._changed.set()
        self._changed = trio.Event()
