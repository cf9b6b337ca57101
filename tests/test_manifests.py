"""The deployment files in deploy/: valid for their tools, and true to modelpool.

Every Kubernetes manifest is checked against the Kubernetes schemas that
`kubernetes-validate` ships (strictly: an unknown field fails). The KEDA ScaledObject,
a custom resource those schemas do not know, is read into the models that
`cloudcoil.models.keda` generates from KEDA's CRDs, and must come out unchanged (so
no field was unknown to them). Then the files are held to modelpool itself: each
container's command and environment must parse as modelpool's options, the probes and
grace periods must fit the timeouts they configure, and the ScaledObject must name the
stream the queue really uses and scale the worker Deployment. Last, the stream's length,
which KEDA scales on, is measured on a real Valkey: it is the jobs waiting plus the jobs
being computed.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import coredis
import kubernetes_validate
import pytest
import trio
import yaml
from cloudcoil.models.keda.v1alpha1 import ScaledObject
from redisserver import redis_server

from conftest import MODEL3, ROOT
from modelpool import PoolConfig, open_pool
from modelpool.cli.parser import parse
from modelpool.queues.redis.wire import GROUP, STREAM
from modelpool.service.server import RESPONSE_SLACK
from modelpool.settings.config import ServerConfig

KUBERNETES = ROOT / "deploy" / "kubernetes"
MANIFESTS = sorted(KUBERNETES.rglob("*.yaml"))
OLDEST_KUBERNETES = "1.30.0"  # preStop `sleep` is on by default from 1.30
SECRET = "a-key-from-a-kubernetes-secret"
MARGIN = 5  # seconds a grace period must exceed the stop it waits for


def resources(kind: str | None = None) -> list[tuple[Path, dict[str, Any]]]:
    found = [
        (path, document)
        for path in MANIFESTS
        for document in yaml.safe_load_all(path.read_text())
        if document
    ]
    return [(path, doc) for path, doc in found if kind is None or doc["kind"] == kind]


def container(deployment: dict[str, Any]) -> dict[str, Any]:
    (only,) = deployment["spec"]["template"]["spec"]["containers"]
    return only


def environment(container: dict[str, Any]) -> dict[str, str]:
    """The container's variables as the kubelet sets them: $(NAME) expanded, secrets
    replaced by a stand-in."""
    env: dict[str, str] = {}
    for variable in container.get("env", []):
        if "valueFrom" in variable:
            assert "secretKeyRef" in variable["valueFrom"], variable
            env[variable["name"]] = SECRET
        else:
            value = re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], variable["value"])
            env[variable["name"]] = value
    return env


def settings_of(deployment: dict[str, Any]) -> tuple[str, ServerConfig]:
    """modelpool's command and configuration from the container's command and env."""
    spec = container(deployment)
    program, *argv = spec["command"]
    assert program == "modelpool"
    _, settings = parse(argv, environment(spec))
    return settings.command, settings.config


def test_there_are_manifests_to_check() -> None:
    kinds = sorted(doc["kind"] for _, doc in resources())
    assert kinds.count("Deployment") == 3 and "ScaledObject" in kinds, kinds


def test_no_two_resources_share_a_kind_and_name() -> None:
    """standalone.yaml and cluster/front.yaml both defined Service/modelpool: applying one
    set beside the other replaced its Service."""
    where: dict[tuple[str, str], list[str]] = {}
    for path, resource in resources():
        key = (resource["kind"], resource["metadata"]["name"])
        where.setdefault(key, []).append(str(path.relative_to(KUBERNETES)))
    twice = {f"{kind}/{name}": paths for (kind, name), paths in where.items() if len(paths) > 1}
    assert not twice, f"defined more than once: {twice}"


def selector_of(resource: dict[str, Any]) -> dict[str, str] | None:
    """The labels a Deployment, Service or PodDisruptionBudget selects pods by."""
    spec = resource.get("spec", {})
    if resource["kind"] == "Service":
        return spec.get("selector")
    if "selector" in spec:
        assert set(spec["selector"]) == {"matchLabels"}, resource["metadata"]["name"]
        return spec["selector"]["matchLabels"]
    return None


def test_every_selector_selects_only_the_pods_of_its_own_file() -> None:
    """Each set applies beside the other: a Service, a PodDisruptionBudget or a
    Deployment of one file never takes the pods another file's Deployment makes (a
    Deployment, only its own)."""
    pods = [
        (path, doc["metadata"]["name"], doc["spec"]["template"]["metadata"]["labels"])
        for path, doc in resources("Deployment")
    ]
    checked = 0
    for path, resource in resources():
        selector = selector_of(resource)
        if selector is None:
            continue
        name = resource["metadata"]["name"]
        taken = [
            f"{pod_path.name}: {deployment}"
            for pod_path, deployment, labels in pods
            if selector.items() <= labels.items()
        ]
        own = [
            f"{pod_path.name}: {deployment}"
            for pod_path, deployment, _ in pods
            if pod_path == path and (resource["kind"] != "Deployment" or deployment == name)
        ]
        assert taken and set(taken) <= set(own), f"{path.name}: {resource['kind']}/{name} {taken}"
        checked += 1
    assert checked >= 7


@pytest.mark.parametrize("version", [OLDEST_KUBERNETES, kubernetes_validate.latest_version()])
def test_every_manifest_matches_the_kubernetes_schemas(version: str) -> None:
    checked = 0
    for path, resource in resources():
        if resource["kind"] == "ScaledObject":
            continue  # a custom resource: see the next test
        try:
            kubernetes_validate.validate(resource, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            where = ".".join(str(p) for p in exc.path)
            pytest.fail(f"{path.name}: {resource['kind']} {where}: {exc.message}")
        checked += 1
    assert checked >= 7


def test_the_scaled_object_matches_kedas_crd() -> None:
    ((path, resource),) = resources("ScaledObject")
    model = ScaledObject.model_validate(resource)
    read_back = model.model_dump(by_alias=True, exclude_unset=True, mode="json")
    assert read_back == resource, f"{path.name} has fields KEDA's ScaledObject does not know"


def test_every_container_runs_the_image_that_nox_s_image_builds() -> None:
    """tools/image.py tags localhost/modelpool:VERSION; the pods run as its user."""
    with open(ROOT / "pyproject.toml", "rb") as file:
        version = tomllib.load(file)["project"]["version"]
    containerfile = (ROOT / "Containerfile").read_text()
    (user,) = re.findall(r"^USER (\d+)", containerfile, re.MULTILINE)
    deployments = resources("Deployment")
    assert len(deployments) == 3
    for path, deployment in deployments:
        assert container(deployment)["image"] == f"localhost/modelpool:{version}", path.name
        security = deployment["spec"]["template"]["spec"]["containers"][0]["securityContext"]
        assert security["runAsUser"] == int(user) and security["runAsNonRoot"], path.name


def test_every_container_runs_modelpool_with_options_it_accepts() -> None:
    commands = sorted(settings_of(doc)[0] for _, doc in resources("Deployment"))
    assert commands == ["serve", "serve", "worker"]


def test_probes_and_grace_periods_fit_the_timeouts() -> None:
    for path, deployment in resources("Deployment"):
        command, config = settings_of(deployment)
        pod = deployment["spec"]["template"]["spec"]
        spec = container(deployment)
        pool = config.pool
        grace = pod["terminationGracePeriodSeconds"]
        if command == "worker":
            # Finishes the jobs its models compute, then gives them --exit-grace.
            assert grace >= pool.timeout + pool.exit_grace + MARGIN, path.name
            assert "readinessProbe" not in spec  # no HTTP to probe
            continue
        pause = spec["lifecycle"]["preStop"]["sleep"]["seconds"]
        models_stop = pool.exit_grace if pool.workers else 0
        stop = pause + pool.effective_drain_timeout + models_stop + RESPONSE_SLACK
        assert grace >= stop + MARGIN, f"{path.name}: {grace} s for a stop of {stop} s"
        assert grace > pause + pool.timeout + pool.effective_drain_timeout, path.name
        startup, ready, live = (
            spec[p] for p in ("startupProbe", "readinessProbe", "livenessProbe")
        )
        assert startup["httpGet"]["path"] == ready["httpGet"]["path"] == "/readyz"
        assert live["httpGet"]["path"] == "/healthz"
        # Two whole starts (one timing out, then its retry) before the pod is restarted.
        models = pool if pool.workers else settings_of(worker_deployment())[1].pool
        allowed = startup["periodSeconds"] * startup["failureThreshold"]
        assert allowed >= 2 * models.init_timeout, f"{path.name}: startup allows {allowed} s"
        # The pause lets the endpoints drop the pod: a readiness miss must not take longer
        # than a slow load, and a probe must answer well within its period.
        for probe in (startup, ready, live):
            assert probe["timeoutSeconds"] < probe["periodSeconds"]
        assert config.host == "0.0.0.0" and config.api_key == SECRET


def worker_deployment() -> dict[str, Any]:
    (worker,) = [doc for _, doc in resources("Deployment") if settings_of(doc)[0] == "worker"]
    return worker


def test_the_scaled_object_scales_the_workers_on_the_real_stream() -> None:
    ((_, scaled),) = resources("ScaledObject")
    worker = worker_deployment()
    _, config = settings_of(worker)
    spec = scaled["spec"]
    assert spec["scaleTargetRef"]["name"] == worker["metadata"]["name"]
    assert spec["minReplicaCount"] >= 1  # fronts are ready only while some model is
    (trigger,) = spec["triggers"]
    metadata = trigger["metadata"]
    assert trigger["type"] == "redis-streams"
    assert metadata["stream"] == STREAM
    assert metadata.get("consumerGroup", GROUP) == GROUP
    assert int(metadata["streamLength"]) == config.pool.workers  # one model per job
    address = environment(container(worker))[metadata["addressFromEnv"]]
    assert config.pool.queue is not None
    assert urlsplit(config.pool.queue).netloc == address  # KEDA reads the queue modelpool uses
    nodes = [
        settings_of(doc)[1]
        for path, doc in resources("Deployment")
        if path.parent.name == "cluster"
    ]
    assert len(nodes) == 2 and {c.pool.queue for c in nodes} == {config.pool.queue}


async def test_the_streams_length_is_the_jobs_waiting_plus_those_computing() -> None:
    """What the ScaledObject relies on, on a real server: XLEN = waiting + pending.

    Waiting is counted as the entries after the group's last delivered id, in the same
    script as XLEN: the group's `lag` field would do, but the server cannot tell it (nil)
    once entries have been deleted, as answered jobs are.
    """
    async with redis_server() as url:
        config = PoolConfig(
            model_cmd=MODEL3, env={"MODEL3_STEP_SECONDS": "0.05"}, workers=2, queue=url
        )
        client = coredis.Redis.from_url(url, decode_responses=True)
        look = client.register_script(
            """
            for _, flat in ipairs(redis.call('XINFO', 'GROUPS', KEYS[1])) do
                local group = {}
                for i = 1, #flat, 2 do group[flat[i]] = flat[i + 1] end
                if group['name'] == ARGV[1] then
                    local after = '(' .. group['last-delivered-id']
                    local waiting = #redis.call('XRANGE', KEYS[1], after, '+')
                    return {redis.call('XLEN', KEYS[1]), waiting, group['pending']}
                end
            end
            return redis.error_reply('no group ' .. ARGV[1])
            """
        )
        samples: list[tuple[int, int, int]] = []
        async with client, open_pool(config) as pool:
            await pool.wait_ready()
            async with trio.open_nursery() as nursery:
                for _ in range(6):  # 2 computing (0.55 s each), 4 waiting at first
                    nursery.start_soon(pool.predict, {"data": 0.5})
                for _ in range(12):
                    await trio.sleep(0.1)
                    length, waiting, pending = await look(keys=[STREAM], args=[GROUP])
                    samples.append((length, waiting, pending))
            length, _, _ = await look(keys=[STREAM], args=[GROUP])
        assert all(length == waiting + pending for length, waiting, pending in samples), samples
        assert max(length for length, _, _ in samples) >= 4, samples
        assert max(waiting for _, waiting, _ in samples) >= 2, samples  # some did wait
        assert length == 0  # every answered job left the stream
