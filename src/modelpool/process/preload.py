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
  (`TemplateState.FALLBACK`). A process is never forked in an unsafe state. The
  template itself is not thrown away: it becomes the first worker's model, a plain one
  (lending.py). A thread pool started in C is seen as it starts, while the model loads:
  the other models start plainly at once, beside it.
- The template fails to load: it is loaded again after the usual back-off, and model
  starts meanwhile fail as a plain start that failed would (the worker backs off).
- The template dies while its children serve: they serve on. It is loaded again in the
  background, and replacements fork from the new one once it is ready.
- A child's environment is the template's, with its own token, its thread budget
  (the template loads with one thread per C library, see threads.py) and, with
  --devices, its worker's device, set by the launcher right after the fork in its
  os.environ (the device also where /proc/PID/environ shows it; the template itself
  has none, see devices.py).
- A child's exit: its pidfd tells the moment; its status comes from the template,
  which reaps its children and reports, or from waitid if the service adopted the child
  as a subreaper after the template died. If neither can tell, the status is unknown,
  and /status says so.

A reload loads a new generation's template first (`Preloader.prepare`), and retires
the old ones only once every model of theirs is replaced (`Preloader.retire_others`).

The parts: `Template` (template.py) keeps one generation's template loaded and asks it
for forks over its control socket (control.py); `ForkedProcess` (forked.py) is a child;
this module holds the `Forker` and the pool's `Preloader`.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any, Protocol

import trio

from modelpool.core.kinds import RestartReason
from modelpool.process.failures import StartFailed
from modelpool.process.modelprocess import ModelProcess
from modelpool.process.reaper import Reaper
from modelpool.process.starter import ModelHandle, ModelStarter, Spawner
from modelpool.process.template import TEMPLATE_STATES, Template, TemplateGone, TemplateState
from modelpool.settings.config import PoolConfig

__all__ = ["TEMPLATE_STATES", "Forker", "Preloader", "PreloadingPool", "Template", "TemplateState"]

log = logging.getLogger("modelpool.preload")


class PreloadingPool(Protocol):
    """What a `Preloader` uses of its pool (a `modelpool.pool.pool.Pool`)."""

    @property
    def reaper(self) -> Reaper: ...

    @property
    def stopped(self) -> trio.Event:
        """Set once the pool has stopped: its templates stop with it."""

    @property
    def generation(self) -> int:
        """The model version new workers run; a reload raises it."""

    def _start_task(self, fn: Callable[[], Awaitable[None]]) -> None:
        """Run a task beside the workers, for as long as the pool runs (the pool's, for
        its own modules: not the library's surface)."""

    def _replace_models(self, pids: set[int], why: str, reason: RestartReason) -> None:
        """Replace by surge each worker whose model is one of `pids` (once per model)."""


class Forker:
    """The `ModelStarter` of a preloading pool: a fork from the template, or a plain
    start if the template cannot be forked safely."""

    def __init__(self, template: Template, spawner: Spawner, reaper: Reaper) -> None:
        self._template = template
        self._spawner = spawner
        self._reaper = reaper

    async def adopt(
        self, config: PoolConfig, name: str
    ) -> AbstractAsyncContextManager[ModelProcess] | None:
        """The template itself, once it fell back, for the first worker (lending.py)."""
        await self._template.settled(config.init_timeout, name)
        return self._template.lend(name)

    async def start(
        self, config: PoolConfig, name: str, token: str, env: dict[str, str]
    ) -> ModelHandle:
        asked_at = trio.current_time()
        try:
            return await self._start_once(config, name, token, env, asked_at)
        except TemplateGone:  # it ended just now, before the pool saw it go: the next one
            return await self._start_once(config, name, token, env, asked_at)

    async def _start_once(
        self, config: PoolConfig, name: str, token: str, env: dict[str, str], asked_at: float
    ) -> ModelHandle:
        template = self._template
        await template.settled(config.init_timeout, name)
        if template.fallen_back:
            return await self._spawner.start(config, name, token, env)
        try:
            async with self._reaper.spawning():
                child = await template.fork(name, token, template.env_changes(env))
                self._reaper.model_started(child.pid, token)
        except TemplateGone:
            raise
        except StartFailed:
            if not template.fallen_back:
                raise
            return await self._spawner.start(config, name, token, env)  # unsafe since: plain
        child.started_at = asked_at
        return child

    def backoff(self, config: PoolConfig, failures: int) -> float:
        """A fork is cheap: the first failure in a row is replaced at once."""
        return config.backoff(failures - 1)


class Preloader:
    """A preloading pool's templates, one per model generation (a reload makes a new one)."""

    def __init__(self, pool: PreloadingPool) -> None:
        self._pool = pool
        self._spawner = Spawner(pool.reaper)
        self.templates: dict[int, Template] = {}

    def load(self, generation: int, config: PoolConfig) -> Template:
        """Start loading a generation's template in the background."""
        template = Template(config, generation, self._pool.reaper)
        self.templates[generation] = template

        def replace(pids: set[int]) -> None:  # the children forked before (immortal.py)
            why = f"forked before {template.name}'s objects were made immortal"
            self._pool._replace_models(pids, why, RestartReason.IMMORTAL)

        async def replace_mortal() -> None:
            await template.immortality.replace_mortal(replace)

        template.immortality.when_immortal(lambda: self._pool._start_task(replace_mortal))

        async def run() -> None:
            await template.run(self._pool.stopped)

        self._pool._start_task(run)
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
            await template.settled(config.init_timeout, template.name)
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

    def forks_now(self) -> bool:
        """Whether a model started now is forked: the current template is ready."""
        template = self.current()
        return template is not None and template.state is TemplateState.READY

    def snapshot(self) -> dict[str, Any] | None:
        template = self.current()
        return None if template is None else template.snapshot()
