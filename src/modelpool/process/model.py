"""One model process: start it, read what it prints, hand it requests, and make sure it dies.

The model runs in a session of its own, with a token in its environment; the reaper
(reaper.py) kills its process group, its tree and anything that carries the token when
it ends. A pump task reads its stdout for the whole of its life: lines before the ready
line and lines that are not results go to the log (at a bounded rate, see `OutputLog`),
and a result line goes to the worker only while the worker awaits one. A result nobody
awaits puts the model out of step: it will be replaced, since a stray result could
otherwise answer the next request; with --id-field, one that carries the id of an
earlier request is stale, and only dropped (results.py). After each answer the worker
lets the model finish printing before it sends the next request (see `catch_up`):
until it is back to reading its stdin, where Linux shows that (procwatch.py), or else
for a quiet period (QUIET_PERIOD, pacing.py). What a model prints while none of its
results is awaited is read within a budget (see OutputBudget, output.py), so a flood
costs the service little. Another pump logs stderr and keeps its last lines for error
reports.

This module starts a model (`open_model`) and is where the rest of the service finds
it: `ModelProcess` (modelprocess.py) is the running model, `StartFailed` and
`CommandNotRunnable` (failures.py) how a start fails.
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio

from modelpool.core import logs
from modelpool.process import devices, threads
from modelpool.process.failures import CommandNotRunnable, StartFailed
from modelpool.process.modelprocess import ModelProcess
from modelpool.process.reaper import TOKEN_VAR, Reaper
from modelpool.process.starter import ModelStarter, Spawner
from modelpool.settings.config import PoolConfig

__all__ = ["CommandNotRunnable", "ModelProcess", "StartFailed", "model_environment", "open_model"]

HIDDEN_VARIABLES = ("MODELPOOL_",)  # the service's settings, its API key among them

log = logging.getLogger("modelpool.model")


def model_environment(config: PoolConfig, token: str, device: str | None = None) -> dict[str, str]:
    """The service's environment minus its own settings, plus the model's token, thread
    budget (threads.py) and device.

    MODELPOOL_* variables are the service's business (one may hold the API key); a
    model, which is untrusted, gets none of them but its own: its token and, with
    --devices, MODELPOOL_DEVICE (see devices.py; `device` None is a template's, which
    gets none). PYTHONUNBUFFERED makes a Python model that prints with plain print()
    heard at once.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith(HIDDEN_VARIABLES)}
    env.update(config.env or {})
    env.update(threads.variables(config, env))  # its thread budget, unless the user set it
    env["PYTHONUNBUFFERED"] = "1"
    env[TOKEN_VAR] = token
    for key, value in devices.variables(config, device).items():
        env.pop(key, None)  # last, in order: a forked child rewrites them (_launcher.py)
        env[key] = value
    return env


@asynccontextmanager
async def open_model(
    config: PoolConfig,
    name: str,
    reaper: Reaper,
    starter: ModelStarter | None = None,
    token: str | None = None,
    takes_requests: bool = True,
    device: str | None = None,
) -> AsyncIterator[ModelProcess]:
    """Start a model (spawned, unless `starter` says otherwise); on the way out, close its
    stdin, give it `exit_grace`, then kill it. `token`: its containment token, if not a
    new one (a preload template's has room for its children's, see preload.py).
    `takes_requests` False (a preload template): how it waits between requests is not
    learned, since it gets none.
    `device`: its worker's, with --devices."""
    starter = starter or Spawner(reaper)
    adopted = await starter.adopt(config, name)
    if adopted is not None:  # a model already loaded, stopped by its owner
        async with adopted as model:  # the template's log says so (template.lend)
            assert isinstance(model, ModelProcess)
            logs.set_field("pid", model.pid)
            yield model
        return
    token = token or reaper.new_token()
    env = model_environment(config, token, device)
    proc = await starter.start(config, name, token, env)
    logs.set_field("pid", proc.pid)  # for this task's log lines and those of the pumps
    model = ModelProcess(proc, config, name, reaper, token)
    model.env = env
    how = " (forked from its template)" if proc.method == "fork" else ""
    log.info("%s started%s: %s", model.name, how, " ".join(config.model_cmd))
    try:
        async with trio.open_nursery() as nursery:
            model.start_tasks(nursery, takes_requests)
            try:
                yield model
            finally:
                with trio.CancelScope(shield=True):
                    await model.stop(config.exit_grace)
                    await model.drain()
                    nursery.cancel_scope.cancel()
                    await proc.aclose()
    finally:
        with trio.CancelScope(shield=True):
            if proc.running:  # only if something above failed half-way
                reaper.kill_tree(proc.pid)
                await proc.wait()
            model.close()
            await reaper.model_reaped(proc.pid, token)
