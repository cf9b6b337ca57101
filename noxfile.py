"""Sessions: `nox -s tests` (the suite), `nox -s lint` (ruff), `nox -s bench` (load figures)."""

import nox

nox.options.sessions = ["tests", "lint"]
nox.options.error_on_missing_interpreters = True


@nox.session
def tests(session: nox.Session) -> None:
    """The whole suite, against real model processes and a real server on loopback."""
    session.install(".[test]")
    session.run("pytest", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    session.install("ruff")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session
def bench(session: nox.Session) -> None:
    """Throughput, latency, utilisation and memory of `modelpool serve`; prints figures."""
    session.install(".", "httpx")
    session.run("python", "benchmarks/load.py", *session.posargs)
