"""Build modelpool's container image with podman, offline if need be, and smoke-test it.

What `nox -s image` runs:

1. The base. The Containerfile's default (an official slim Python image) if podman has
   it or can pull it; where no registry can be reached, a base made here instead: Debian
   bookworm by debootstrap (`--variant=minbase --include=python3,python3-venv`, its apt
   caches and docs dropped), imported into podman as localhost/modelpool-base:bookworm
   (made once; about a minute and a half).
2. The build context: the package's source, model3.py and the Containerfile, and in
   wheels/ the wheels of modelpool and of everything it needs, made here by pip (the
   package index may not be reachable inside a build: the base need not trust the CA
   this machine does). Built with `podman build --format docker` (the HEALTHCHECK is
   kept), `--isolation chroot`, tagged localhost/modelpool:VERSION.
3. The smoke test, as the image runs: its entry point, user, environment and working
   directory. In a container if this machine may run one; where it may not (crun
   cannot set rlimits in some sandboxes: "setrlimit RLIMIT_NOFILE: Operation not
   permitted"), in a chroot of the image's mounted filesystem, read-only, in a mount
   namespace of its own with /proc and /dev, on this machine's network. It checks:
   /readyz 200, the image's HEALTHCHECK command passes, one POST /predict answered with
   the API key (and 401 without), it runs as the image's user, has the Redis extra (for
   the cluster's pods), refuses to start without MODELPOOL_API_KEY, and SIGTERM stops it
   cleanly (exit code 0, every process gone). Then the same for a user's image built
   FROM it with a model of theirs (COPY and MODELPOOL_MODEL_CMD, as docs/deployment.md
   shows), which is removed after.

It prints the image's name and size. Talks only to 127.0.0.1 (and the registries that
podman, pip and debootstrap use); every step is bounded in time; it stops what it starts.
Run: `nox -s image`, or `python tools/image.py [--tag NAME] [--base IMAGE]` as root with
podman (and debootstrap, for an offline base) installed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_BASE = "docker.io/library/python:3.11-slim"  # the Containerfile's ARG BASE
MADE_BASE = "localhost/modelpool-base:bookworm"
SUITE, MIRROR = "bookworm", "http://deb.debian.org/debian"
CONTEXT_FILES = (
    "pyproject.toml",
    "README.md",
    "LICENSE",
    "model3.py",
    "model3.schema.json",
    "Containerfile",
)
DROPPED = (  # what a server image needs none of: apt's downloads and lists, docs, translations
    "var/cache/apt/archives",
    "var/lib/apt/lists",
    "usr/share/doc",
    "usr/share/man",
    "usr/share/info",
    "usr/share/locale",
)
READY_WITHIN = 120.0  # seconds for the image's service to have a model ready
STOP_WITHIN = 30.0  # seconds for it to stop after SIGTERM
CANNOT_RUN = ("setrlimit", "OCI permission denied", "OCI runtime error")


class ImageError(Exception):
    """A step failed: what, and what it printed."""


def run(command: list[str], timeout: float, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """Run a step; ImageError with its output if it fails."""
    print("  $ " + " ".join(command[:6]) + (" ..." if len(command) > 6 else ""), flush=True)
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=timeout, check=False, **kwargs
        )
    except subprocess.TimeoutExpired as exc:
        raise ImageError(f"{command[0]} took more than {timeout:g} s") from exc
    if done.returncode != 0:
        output = (done.stdout + done.stderr).strip()[-3000:]
        raise ImageError(f"{' '.join(command[:4])} failed ({done.returncode}):\n{output}")
    return done


def quietly(command: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    """Run a check whose exit code is the answer; ImageError if it hangs."""
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as exc:
        raise ImageError(f"{' '.join(command[:3])} ... took more than {timeout:g} s") from exc


def version() -> str:
    with open(ROOT / "pyproject.toml", "rb") as file:
        return str(tomllib.load(file)["project"]["version"])


# -- 1. the base --------------------------------------------------------------------


def base_image(wanted: str) -> str:
    """`wanted` if podman has it or can pull it, else the base made here (once)."""
    if quietly(["podman", "image", "exists", wanted], timeout=60).returncode == 0:
        return wanted
    try:
        run(["podman", "pull", "--quiet", wanted], timeout=300)
        return wanted
    except ImageError as exc:
        print(f"  cannot pull {wanted} ({str(exc).splitlines()[-1][:160]}): making a base")
    if wanted != DEFAULT_BASE:
        raise ImageError(f"the base {wanted} cannot be had; leave --base out to make one")
    if quietly(["podman", "image", "exists", MADE_BASE], timeout=60).returncode != 0:
        make_base()
    return MADE_BASE


def make_base() -> None:
    """Debian's minimal system with Python and its venv module, imported into podman."""
    if shutil.which("debootstrap") is None:
        raise ImageError("no registry can be reached and debootstrap is not installed")
    with tempfile.TemporaryDirectory(prefix="modelpool-base-") as tmp:
        rootfs = Path(tmp) / "rootfs"
        started = time.monotonic()
        run(
            [
                "debootstrap",
                "--variant=minbase",
                "--include=python3,python3-venv",
                SUITE,
                str(rootfs),
                MIRROR,
            ],
            timeout=900,
        )
        for path in DROPPED:
            shutil.rmtree(rootfs / path, ignore_errors=True)
            (rootfs / path).mkdir(parents=True, exist_ok=True)
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
        try:
            run(["podman", "import", "-", MADE_BASE], timeout=300, stdin=tar.stdout)
        finally:
            assert tar.stdout is not None
            tar.stdout.close()
            tar.wait()
        if tar.returncode != 0:
            raise ImageError(f"tar of the base's filesystem failed ({tar.returncode})")
        print(f"  made {MADE_BASE} in {time.monotonic() - started:.0f} s", flush=True)


# -- 2. the build ---------------------------------------------------------------------


def build(tag: str, base: str) -> None:
    with tempfile.TemporaryDirectory(prefix="modelpool-image-") as tmp:
        context = Path(tmp)
        for name in CONTEXT_FILES:
            shutil.copy2(ROOT / name, context / name)
        shutil.copytree(ROOT / "src", context / "src", ignore=shutil.ignore_patterns("__pycache__"))
        wheels = context / "wheels"
        pip = [sys.executable, "-m", "pip", "wheel", "--quiet", "--wheel-dir", str(wheels)]
        run([*pip, f"{context}[redis]"], timeout=600)  # one image for every manifest
        run(
            [
                "podman",
                "build",
                "--format",
                "docker",
                "--isolation",
                "chroot",
                "--cgroup-manager",
                "cgroupfs",
                "--build-arg",
                f"BASE={base}",
                "--tag",
                tag,
                str(context),
            ],
            timeout=900,
        )


def inspect(tag: str) -> dict[str, Any]:
    found = json.loads(run(["podman", "image", "inspect", tag], timeout=60).stdout)
    return dict(found[0])


# -- 3. the smoke test ------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Running:
    """The image's entry point, running: in a container, or in a chroot of the image."""

    def __init__(self, tag: str, image: dict[str, Any], key: str, port: int) -> None:
        self.tag, self.config, self.key, self.port = tag, image["Config"], key, port
        self.name = f"modelpool-smoke-{port}"  # the container's, if one runs
        # HEALTHCHECK's ["CMD", ...], without "CMD" (kept by --format docker)
        self.health = list((image.get("Healthcheck") or {}).get("Test") or [])[1:]
        self.how = ""
        self.proc: subprocess.Popen[bytes] | None = None
        self.mount: str | None = None
        self.log = tempfile.TemporaryFile()  # noqa: SIM115

    def start(self) -> None:
        container = [
            "podman", "run", "--rm", "--name", self.name,
            "--network", "host", "--cgroup-manager", "cgroupfs",
            "-e", f"MODELPOOL_API_KEY={self.key}", "-e", f"MODELPOOL_PORT={self.port}",
            self.tag,
        ]  # fmt: skip
        self.proc = subprocess.Popen(container, stdout=self.log, stderr=subprocess.STDOUT)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=5)
        if self.proc.poll() is None:
            self.how = "in a container (podman run)"
            return
        said = self.output()
        if not any(sign in said for sign in CANNOT_RUN):
            raise ImageError(f"the container exited with {self.proc.returncode}:\n{said}")
        print(f"  podman cannot run containers here ({said.strip().splitlines()[-1][:120]})")
        self.start_in_chroot()

    def start_in_chroot(self) -> None:
        """The entry point, as the image's user, in its environment and working directory,
        chrooted into the image's filesystem (read-only), with /proc and /dev mounted in
        a mount namespace of its own. Each step execs the next: SIGTERM to this pid is
        SIGTERM to the service."""
        self.mount = run(["podman", "image", "mount", self.tag], timeout=60).stdout.strip()
        env = [*self.config.get("Env", []), f"MODELPOOL_API_KEY={self.key}"]
        command = [*self.config.get("Entrypoint", []), *self.config.get("Cmd", [])]
        argv = self._chroot_argv([*env, f"MODELPOOL_PORT={self.port}"], command)
        self.proc = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT)
        self.how = "in a chroot of the image's filesystem (podman cannot run containers here)"

    def _chroot_argv(self, env: list[str], command: list[str]) -> list[str]:
        """`command` as the image runs it: its user, `env` alone, its working directory."""
        assert self.mount is not None
        user = self.config.get("User") or "0:0"
        workdir = self.config.get("WorkingDir") or "/"
        script = (  # $0: the image's root, $1: its user; then env -i's variables, command
            'root=$0 user=$1; shift; mount --rbind /dev "$root/dev" && '
            'mount -t proc proc "$root/proc" && '
            'exec chroot --userspec="$user" "$root" /usr/bin/env -i "$@"'
        )
        in_workdir = ["/bin/sh", "-c", 'cd "$0" && exec "$@"', workdir, *command]
        return ["unshare", "--mount", "sh", "-c", script, self.mount, user, *env, *in_workdir]

    def run_in_image(self, command: list[str]) -> int:
        """`command` beside the service, as the image runs its own (the HEALTHCHECK's)."""
        if self.mount is None:
            return quietly(["podman", "exec", self.name, *command], timeout=30).returncode
        env = [*self.config.get("Env", []), f"MODELPOOL_PORT={self.port}"]
        return quietly(self._chroot_argv(env, command), timeout=30).returncode

    def without_key(self) -> tuple[int, str]:
        """The entry point run without MODELPOOL_API_KEY, to its end: its exit code and
        what it said."""
        port = f"MODELPOOL_PORT={free_port()}"
        if self.mount is None:
            argv = ["podman", "run", "--rm", "--network", "host", "--cgroup-manager", "cgroupfs"]
            argv += ["-e", port, self.tag]
        else:
            command = [*self.config.get("Entrypoint", []), *self.config.get("Cmd", [])]
            argv = self._chroot_argv([*self.config.get("Env", []), port], command)
        done = quietly(argv, timeout=60)
        return done.returncode, done.stdout + done.stderr

    def user_id(self) -> int | None:
        """The real uid the service runs as (None in a container, where podman says)."""
        if self.mount is None or self.proc is None:
            return None
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("Uid:"):
                return int(line.split()[1])
        return None

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")[-4000:]

    def stop(self, timeout: float) -> int | None:
        """SIGTERM, then wait; SIGKILL if it does not stop. Its exit code, None if killed."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            return None

    def left_behind(self) -> list[int]:
        """Processes still running from the image's filesystem (chroot) or container."""
        if self.mount is None:
            return []
        left = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                with contextlib.suppress(OSError):
                    if os.readlink(entry / "root") == self.mount:
                        left.append(int(entry.name))
        return left

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if self.proc is not None and self.mount is None:  # the container, not its client
            quietly(["podman", "rm", "--force", "--time", "0", self.name], timeout=60)
        for pid in self.left_behind():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if self.mount is not None:
            unmount = ["podman", "image", "unmount", self.tag]
            quietly(unmount, timeout=60)
        self.log.close()


def request(url: str, body: bytes | None = None, key: str | None = None) -> tuple[int, str]:
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    req = urllib.request.Request(url, data=body, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=15) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def smoke_test(tag: str, image: dict[str, Any], answer_has: str = "ice_found") -> str:
    """Start the image's entry point and check it serves and stops; how it ran.
    `answer_has`: a key of its model's answer to {"data": 2} (model3.py's by default)."""
    key = secrets.token_hex(16)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    running = Running(tag, image, key, port)
    if not running.health:
        raise ImageError("the image has no HEALTHCHECK (was it built with --format docker?)")
    try:
        running.start()
        deadline = time.monotonic() + READY_WITHIN
        while True:
            assert running.proc is not None
            if running.proc.poll() is not None:
                raise ImageError(f"it exited with {running.proc.returncode}:\n{running.output()}")
            with contextlib.suppress(OSError):
                if request(f"{base}/readyz")[0] == 200:
                    break
            if time.monotonic() > deadline:
                raise ImageError(f"not ready within {READY_WITHIN:g} s:\n{running.output()}")
            time.sleep(0.5)
        print("  /readyz: 200", flush=True)
        uid = running.user_id()
        wanted = (image["Config"].get("User") or "0").split(":")[0]
        if uid is not None and str(uid) != wanted:
            raise ImageError(f"it runs as uid {uid}, not the image's user {wanted}")
        if uid is not None:
            print(f"  runs as uid {uid}, the image's user", flush=True)
        if (code := running.run_in_image(running.health)) != 0:
            raise ImageError(f"its HEALTHCHECK failed ({code})")
        print("  HEALTHCHECK: passes", flush=True)
        if running.run_in_image(["python3", "-c", "import coredis"]) != 0:
            raise ImageError("the Redis extra is missing: the cluster's pods cannot run it")
        status, text = request(f"{base}/predict", b'{"data": 2}')
        if status != 401:
            raise ImageError(f"POST /predict without the API key: {status}, not 401: {text}")
        status, text = request(f"{base}/predict", b'{"data": 2}', key)
        if status != 200 or answer_has not in json.loads(text):
            raise ImageError(f"POST /predict: {status} {text}")
        print(f"  POST /predict: {status} {text.strip()}", flush=True)
        code, said = running.without_key()
        if code == 0 or "API key" not in said:
            raise ImageError(f"without MODELPOOL_API_KEY it did not refuse ({code}): {said}")
        print("  without MODELPOOL_API_KEY: refuses to start, and says why", flush=True)
        started = time.monotonic()
        code = running.stop(STOP_WITHIN)
        if code != 0:
            raise ImageError(f"SIGTERM: exit code {code}, not 0:\n{running.output()}")
        left = running.left_behind()
        if left:
            raise ImageError(f"processes left behind after it stopped: {left}")
        print(f"  SIGTERM: stopped cleanly in {time.monotonic() - started:.1f} s", flush=True)
        return running.how
    finally:
        running.close()


DERIVED = """FROM {tag}
COPY my_model.py /opt/modelpool/models/
ENV MODELPOOL_MODEL_CMD="python3 -u /opt/modelpool/models/my_model.py"
"""
MY_MODEL = """import json, sys
print("ready: Model-initialized")
for line in sys.stdin:
    print("result: " + json.dumps({"mine": json.loads(line)}))
"""


def build_derived(tag: str, derived: str) -> None:
    """A user's image: FROM this one, with a model of theirs (as docs/deployment.md shows)."""
    with tempfile.TemporaryDirectory(prefix="modelpool-derived-") as tmp:
        context = Path(tmp)
        (context / "Containerfile").write_text(DERIVED.format(tag=tag))
        (context / "my_model.py").write_text(MY_MODEL)
        build = ["podman", "build", "--format", "docker", "--isolation", "chroot"]
        run([*build, "--cgroup-manager", "cgroupfs", "--tag", derived, str(context)], timeout=300)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tag", help="the image's name (localhost/modelpool:VERSION)")
    parser.add_argument("--base", default=DEFAULT_BASE, help=f"ARG BASE ({DEFAULT_BASE})")
    args = parser.parse_args()
    tag = args.tag or f"localhost/modelpool:{version()}"
    if sys.version_info[:2] != (3, 11):  # the wheels are made here, for the base's Python
        print("image: run it with Python 3.11, the bases' (bookworm's, python:3.11-slim's)")
        return 1
    if shutil.which("podman") is None:
        print("image: podman is not installed (Debian's podman package)")
        return 1
    try:
        started = time.monotonic()
        print("base", flush=True)
        base = base_image(args.base)
        print(f"build {tag} FROM {base}", flush=True)
        build(tag, base)
        image = inspect(tag)
        size = int(image["Size"]) / 2**20
        print("smoke test", flush=True)
        how = smoke_test(tag, image)
        derived = f"{tag.rsplit(':', 1)[0]}-with-a-model:test"
        print(f"a user's image, FROM {tag} with a model of theirs: {derived}", flush=True)
        try:
            build_derived(tag, derived)
            smoke_test(derived, inspect(derived), answer_has="mine")
        finally:
            quietly(["podman", "image", "rm", "--force", derived], timeout=60)
    except ImageError as exc:
        print(f"image failed: {exc}")
        return 1
    print(f"\n{tag}: {size:.0f} MiB, FROM {base}; built and smoke-tested {how}")
    print(f"in {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
