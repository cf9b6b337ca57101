"""The pool: N workers of one model pulling jobs from one queue (`open_pool` runs it).

The queue is in this process by default; with `PoolConfig(queue="redis://...")` it is
a Redis stream shared with other nodes (see queues/). The pool does not care which: it
puts jobs in, its workers take them out.

The pool owns the workers, the queue and the stopping; the rest is done beside it, by
modules that see only a Protocol of it: the callers' side (intake.py), its reports
(report.py), the workers (worker.py), the live operations (operations.py), and its run
(running.py: `open_pool`, and the tasks beside the workers).

`Pool`'s public members are the library's surface, what an embedder calls (documented
in docs/embedding.md); the members the pool's own modules use (its workers' jobs and
starts, the operations' changes to the set of workers) are private by name, as in trio,
and are named only by those modules' Protocols. What it counts, they count on its
`metrics`.
"""

from __future__ import annotations

import itertools
import logging
import os
import random
import secrets
import socket
from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, Any

import trio

from modelpool.core.asks import asked
from modelpool.core.errors import ModelFailed, ShuttingDown, UnknownModel
from modelpool.core.job import MAX_ATTEMPTS, Job, Timing
from modelpool.core.kinds import Priority, RestartReason, WorkerState
from modelpool.pool import report
from modelpool.pool.intake import Intake
from modelpool.pool.metrics import PoolMetrics
from modelpool.pool.operations import Operations
from modelpool.pool.worker import Worker
from modelpool.process import devices
from modelpool.process.reaper import Reaper
from modelpool.process.starter import ModelStarter, Spawner
from modelpool.queues.base import JobQueue
from modelpool.queues.open import open_queue
from modelpool.settings.config import PoolConfig
from modelpool.settings.models import DEFAULT_NAME

if TYPE_CHECKING:
    from modelpool.process.preload import Preloader

log = logging.getLogger("modelpool.pool")


class Pool:
    """Hands each request to the first free model; built and run by `open_pool`.

    `config` is what it was opened with, `metrics` every number it counts, `operations`
    the live operations (reload, scale), `workers` its workers, `stopped` set once it has
    stopped; `closing` once it takes no new requests.
    """

    def __init__(
        self,
        config: PoolConfig,
        nursery: trio.Nursery,
        reaper: Reaper,
        model_name: str | None = None,
        other_devices: Callable[[Pool], Iterable[str | None]] | None = None,
    ) -> None:
        self.config = config
        # Several models (fleet.py): its name, the others' devices, each pool by name.
        self.model_name = model_name
        self._other_devices = other_devices
        self._siblings: Callable[[str], Pool] | None = None
        self.reaper = reaper
        self.closing = False
        self.ever_ready = False  # every model was ready at once, at least once
        self.model_was_ready = False  # some model of this node was ready, at least once
        self.started_at = trio.current_time()
        self._nursery = nursery
        self._changed = trio.Event()
        self._prefix = secrets.token_hex(4)
        self.node = config.node_name or f"{socket.gethostname()}-{os.getpid()}-{self._prefix}"
        self.stopped = trio.Event()  # every worker stopped and every caller answered
        self._workers_stopped = trio.Event()
        self._generation = 1  # the model version new workers run; a reload raises it
        self._model_config = config  # what new workers run (a reload changes model_cmd)
        self.retired_busy_seconds = 0.0  # busy time of workers no longer in the pool
        self._indexes = itertools.count()
        self._random = random.Random()
        self.workers: list[Worker] = []
        self._ready_models = 0  # workers whose model is ready, told by them: no scan per change
        self.metrics = PoolMetrics(self)
        self.queue: JobQueue = open_queue(config, self.metrics, self.node, self.node_status)
        self._intake = Intake(self, config, self.metrics, self._prefix)
        self._serves_http = False  # told by the HTTP service, for the cluster's view
        self.operations = Operations(self)
        self._spawner = Spawner(reaper)
        self.preloader: Preloader | None = None
        if config.preload:
            from modelpool.process.preload import Preloader

            self.preloader = Preloader(self)  # loads a template once a model is asked for
        for _ in range(config.workers):
            self._add_worker()

    # -- what callers use -------------------------------------------------------------

    async def predict(
        self,
        request: Any,
        request_id: str | None = None,
        timing: Timing | None = None,
        *,
        model: str | None = None,
        # A deadline, not a cancel scope's: the queue and the model's compute obey it.
        timeout: float | None = None,  # noqa: ASYNC109
        priority: Priority | str = Priority.NORMAL,
    ) -> dict[str, Any]:
        """The model's answer to `request`, or a PoolError saying why there is none.

        `request_id` names the request in logs and errors; one is made up if not given. `timing`,
        if given, is filled in with where the request's time went. `model` names another model
        of the same service (several models): UnknownModel if none has that name. `timeout`:
        seconds the caller will wait in all (DeadlineExceeded if no model took it by then; a
        model computes it for what is left at most). `priority`: "high", "normal" or "low": a
        free model takes the oldest request of the highest class waiting. Cancelling the call
        while a model computes it stops that model as --cancel-computing says.
        """
        timeout, priority = asked(timeout, priority)  # BadRequest for nonsense
        if model is not None and model != (self.model_name or DEFAULT_NAME):
            if self._siblings is None:
                raise UnknownModel(model, [self.model_name or DEFAULT_NAME])
            other = self._siblings(model)
            return await other.predict(
                request, request_id, timing, timeout=timeout, priority=priority
            )
        return await self._intake.predict(request, request_id, timing, timeout, priority)

    @property
    def queue_length(self) -> int:
        """Requests waiting for a model (on a shared queue: this front's)."""
        return self.queue.length

    @property
    def ready_count(self) -> int:
        """Models ready to take this pool's jobs: its own, and other nodes' on a shared queue."""
        return self.local_ready + self.queue.remote_ready()

    @property
    def local_ready(self) -> int:
        """This node's models that are ready (`ready_count` without other nodes')."""
        return self._ready_models

    @property
    def generation(self) -> int:
        """The model version new workers run; a reload raises it."""
        return self._generation

    @property
    def model_config(self) -> PoolConfig:
        """What new workers run: `config`, but a reload's command once one succeeded."""
        return self._model_config

    @property
    def serves_http(self) -> bool:
        """Whether this node serves HTTP (`mark_serving_http`), as the cluster sees it."""
        return self._serves_http

    def mark_serving_http(self) -> None:
        """An HTTP service serves this pool (`modelpool serve` says so): its heartbeat tells
        the cluster, whose /status then shows this node as a front."""
        self._serves_http = True

    async def wait_ready(self, count: int | None = None) -> None:
        """Wait until `count` models (all by default) are ready; ShuttingDown if stopping."""
        want = len(self.workers) if count is None else count
        while self.local_ready < want:
            if self.closing:
                raise ShuttingDown()
            await self._changed.wait()

    async def wait_changed(self) -> None:
        """Wait until a worker changes state (or joins or leaves the pool)."""
        await self._changed.wait()

    def status(self) -> dict[str, Any]:
        """What `GET /status` shows: every worker, the queue, health and the last minute."""
        return report.status(self)

    def node_status(self) -> dict[str, Any]:
        """This node as other nodes of a cluster see it (its heartbeat)."""
        return report.node_status(self)

    def health(self) -> report.Health:
        """What `GET /healthz` answers: healthy, or not and why (see report.health). It
        unpacks as `healthy, detail`; `.body()` and `.http_status` are the route's."""
        return report.health(self)

    def shutdown(self) -> None:
        """Take no new requests; serve the queued ones until the drain deadline, then stop."""
        if self.closing:
            return
        self.closing = True
        self.queue.close()
        log.info(
            "shutting down: %d request(s) queued, draining for up to %g s",
            self.queue.length,
            self.config.effective_drain_timeout,
        )
        self._nursery.start_soon(self._drain)
        self._stop_idle_starts()
        self._worker_changed()  # a pool with no workers of its own has stopped them all

    def kill(self) -> None:
        """Hard stop: SIGKILL every model now; every waiting request gets ShuttingDown."""
        self.shutdown()
        for worker in self.workers:
            worker.kill_model()
        if self.preloader is not None:
            self.preloader.kill()
        self._abort()

    # -- changing the set of workers (operations.py decides when) ----------------------

    def _add_worker(
        self,
        config: PoolConfig | None = None,
        generation: int | None = None,
        trial: bool = False,
        device: str | None = None,
    ) -> Worker:
        """Start one more worker; it leaves `workers` when it ends (retired or stopped).

        With --devices, it runs on `device` (a replacement's, its predecessor's), or
        else on the device the fewest serving workers have (see devices.py).
        """
        if device is None and self.config.devices:
            serving = [w.device for w in self.workers if w.retiring is None]
            if self._other_devices is not None:
                serving += self._other_devices(self)
            device = devices.least_used(self.config.devices, serving)
        worker = Worker(
            next(self._indexes),
            self,
            config or self._model_config,
            self._generation if generation is None else generation,
            trial,
            device,
        )
        self.workers.append(worker)
        self._nursery.start_soon(self._run_worker, worker, name=f"modelpool {worker.name}")
        return worker

    async def _run_worker(self, worker: Worker) -> None:
        try:
            await worker.run()
        finally:
            if not self.closing and worker in self.workers:
                self.workers.remove(worker)  # while stopping, /status shows every worker
                self.retired_busy_seconds += worker.busy_seconds()
                self._worker_changed()

    def _starter_for(self, worker: Worker) -> ModelStarter:
        """How the worker's next model comes to be: spawned, or forked from its template."""
        if self.preloader is None:
            return self._spawner
        return self.preloader.starter(worker.generation, worker.config)

    def _start_task(self, fn: Callable[[], Awaitable[None]]) -> None:
        """Run a task beside the workers (operations that must outlive their caller)."""
        self._nursery.start_soon(fn)

    def _request_limit(self) -> int | None:
        """How many answers a new model may give (--max-requests plus jitter), or None."""
        if self.config.max_requests is None:
            return None
        return self.config.max_requests + self._random.randint(0, self.config.max_requests_jitter)

    def _recycle(
        self, worker: Worker, why: str, reason: RestartReason = RestartReason.RECYCLED
    ) -> None:
        """Replace a worker by surge (its replacement is ready before it retires), for
        what its model now is: the one asked about (see Operations.recycle)."""
        if not self.closing:
            self._nursery.start_soon(self.operations.recycle, worker, why, reason, worker.pid)

    def _replace_models(self, pids: set[int], why: str, reason: RestartReason) -> None:
        """Replace by surge each worker whose model is one of `pids` (once per model): a
        template's children forked before its objects were immortal (process/immortal.py)."""
        for worker in self.workers:
            if worker.pid in pids and worker.retiring is None and worker.ask_recycle():
                self._recycle(worker, why, reason)

    def _switch_model(self, config: PoolConfig, generation: int) -> None:
        """A reload succeeded: new workers run `config`, of `generation`, from now on."""
        self._model_config, self._generation = config, generation

    # -- what workers use -------------------------------------------------------------

    async def _next_job(self) -> Job:
        """The oldest job, for an idle worker; EndOfChannel once there are no more."""
        return await self.queue.get()

    def _take(self, job: Job) -> bool:
        """Claim a job a worker got from the queue; False if it must be skipped."""
        if not self.queue.claim(job):
            return False
        job.attempts += 1
        job.taken.set()
        self._stop_idle_starts()
        return True

    def _retry(self, job: Job, reason: str) -> None:
        """Queue a job again whose model died before it could have read it."""
        closed = self.closing and not self.queue.requeue_while_closing
        if job.abandoned or closed or job.attempts >= MAX_ATTEMPTS:
            job.fail(ModelFailed(reason))
            return
        log.warning("request %s: %s; queued again", job.request_id, reason)
        self.queue.requeue(job)

    def _replacement_forks(self) -> bool:
        """Whether a model of this pool that stops now is replaced by a fork (--preload,
        its template ready): a cancelled computation then costs next to nothing."""
        return self.preloader is not None and self.preloader.forks_now()

    def _wants_models(self) -> bool:
        """False once shutting down with nothing left for this node's workers."""
        return self.queue.has_work()

    def _first_start_failed(self, worker: Worker) -> bool:
        """Note that `worker`'s model failed before its ready line; True: give up on the pool.

        Given up on while no model was ever ready, once every worker has seen a model
        fail so (exit, or no ready line within init_timeout), unless `keep_trying`: at
        first start that is a mistake in the command, which restarting will not mend.
        Once a model was ready, failures are backed off and retried (a broken reload
        is not fatal), as they are while stopping.
        """
        if self.model_was_ready or self.config.keep_trying or self.closing:
            return False
        worker.failed_first_start = True
        return all(w.failed_first_start for w in self.workers)

    def _worker_changed(self, ready: bool | None = None) -> None:
        """A worker changed state, joined or left; `ready`: its model became ready, or
        stopped being (counted here, so that no change needs a scan of every worker)."""
        if ready is not None:
            self._ready_models += 1 if ready else -1
        self._changed.set()
        self._changed = trio.Event()
        if self.local_ready:
            self.model_was_ready = True
        if not self.ever_ready and self.workers and self.local_ready == len(self.workers):
            self.ever_ready = True
            elapsed = trio.current_time() - self.started_at
            size = len(self.workers)
            log.info("%d/%d models ready after %.1f s", size, size, elapsed)
        stopped = self.closing and all(w.state is WorkerState.STOPPED for w in self.workers)
        if stopped and not self._workers_stopped.is_set():
            self._workers_stopped.set()
            self._nursery.start_soon(self._wait_callers_answered)

    async def _wait_callers_answered(self) -> None:
        """Stopped: once the workers are, and no caller still waits (on a shared queue)."""
        await self.queue.drained()
        self.stopped.set()

    # -- inside -----------------------------------------------------------------------

    def _stop_idle_starts(self) -> None:
        """While draining with an empty queue, a model still starting has nothing to do."""
        if self._wants_models():
            return
        for worker in self.workers:
            if worker.state in (WorkerState.STARTING, WorkerState.RESTARTING):
                worker.scope.cancel()

    async def _drain(self) -> None:
        with trio.move_on_after(self.config.effective_drain_timeout):
            await self.stopped.wait()
        if self.stopped.is_set():
            return
        log.warning(
            "drain deadline passed with %d request(s) queued; stopping all models",
            self.queue.length,
        )
        self._abort()

    def _abort(self) -> None:
        """Fail every queued job and every waiting caller; stop every worker, busy or not."""
        for job in self.queue.take_unclaimed():
            job.fail(ShuttingDown())
        for job in self.queue.waiting_callers():
            job.fail(ShuttingDown())
            self.queue.abandon(job)
        for worker in self.workers:
            worker.scope.cancel()
