"""A Prefect server backed by a real PostgreSQL, for tests: `python -m flows.team_server` started on free
loopback ports in a temporary folder and stopped afterwards.

The fixture `postgres_prefect` is module-scoped: one cluster and one server for the tests of each module that
imports it, stopped after that module's last test. Pytest finds it by name among the module's globals; it is
defined under another name so that tests taking `postgres_prefect` do not shadow an import:

    from prefect_postgres import postgres_prefect_fixture  # noqa: F401  (the fixture postgres_prefect)

    def test_two_workers(postgres_prefect):
        subprocess.Popen([sys.executable, "-m", "flows.worker", ...], env=postgres_prefect.env)
        postgres_prefect.sql("SELECT count(*) FROM flow_run")

It yields a `PrefectOnPostgres`:
- `env`: the environment for every process that talks to the server (workers, flows, `prefect` commands):
  PREFECT_API_URL, a PREFECT_HOME in the temporary folder (no test reads or writes the user's Prefect
  profile), no other PREFECT_* variable, no proxy, fast polling (workers and runners every 2 s);
- `api_url`, `database_url` (postgresql+asyncpg://...), `db_port`, `folder` (the command's --dir: its logs
  are there, `postgres.log` and `prefect.log`), and `start_output`, what `start` printed;
- `sql(query)`: one query in the `prefect` database, through psql; its output.

For other server settings (its services' loop intervals, say) start one of your own:
`with prefect_on_postgres({"PREFECT_SERVER_SERVICES_...": "5"}) as server:`. A server that does not start
within its bound fails the test with the command's message; each is stopped afterwards, and checked to have
left no process behind. Outside CI, the fixture skips when PostgreSQL's programs are missing; under
CI=true it fails instead, since .ci/run installs them.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
from datamaker import PROJECT_ROOT

from flows.team_server import HOST, Refused, find_bindir

# The command waits up to this for the server to answer; the test's own bound on it is a little longer.
HEALTHY_WITHIN_SECONDS = 120
COMMAND_SECONDS = HEALTHY_WITHIN_SECONDS + 60
GONE_WITHIN_SECONDS = 15  # for the folder's processes to be gone once `stop` returns
PROXY_VARIABLES = ("http_proxy", "https_proxy", "all_proxy", "no_proxy")


@dataclass(frozen=True)
class PrefectOnPostgres:
    folder: Path
    api_url: str
    db_port: int
    bindir: Path
    env: dict[str, str]
    start_output: str

    @property
    def database_url(self) -> str:
        return f"postgresql+asyncpg://postgres@{HOST}:{self.db_port}/prefect"

    def sql(self, query: str) -> str:
        result = subprocess.run([str(self.bindir / "psql"), "-X", "-tA", "-v", "ON_ERROR_STOP=1", "-h", HOST,
                                 "-p", str(self.db_port), "-U", "postgres", "-d", "prefect", "-c", query],
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        return result.stdout.strip()


@pytest.fixture(scope="module", name="postgres_prefect")
def postgres_prefect_fixture() -> Iterator[PrefectOnPostgres]:
    with prefect_on_postgres() as server:
        yield server


@contextlib.contextmanager
def prefect_on_postgres(server_settings: dict[str, str] | None = None) -> Iterator[PrefectOnPostgres]:
    """`python -m flows.team_server start` in a temporary folder on free ports, with `server_settings` in the
    server's environment; stopped, checked stopped and removed afterwards."""
    bindir = postgres_bindir()
    with scratch_folder() as scratch:
        api_port, db_port = free_ports(2)
        env = client_environment(scratch / "prefect-home", f"http://{HOST}:{api_port}/api")
        folder = scratch / "db"
        try:
            started = team_server("start", folder, "--port", str(api_port), "--db-port", str(db_port),
                                  "--wait", str(HEALTHY_WITHIN_SECONDS), env=env | (server_settings or {}))
            assert started.returncode == 0, started.stdout + started.stderr
            yield PrefectOnPostgres(folder, env["PREFECT_API_URL"], db_port, bindir, env, started.stdout)
        finally:
            stop_and_check_stopped(folder, env)


def stop_and_check_stopped(folder: Path, env: dict[str, str]) -> None:
    if not folder.exists():
        return
    stopped = team_server("stop", folder, env=env)
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    assert wait_for(lambda: not processes_of(folder), GONE_WITHIN_SECONDS), \
        f"still running: {[process.cmdline() for process in processes_of(folder)]}"


def team_server(command: str, folder: Path, *options: str, env: dict[str, str] | None = None,
                timeout: float = COMMAND_SECONDS) -> subprocess.CompletedProcess:
    """`python -m flows.team_server COMMAND --dir FOLDER OPTIONS...`, from the project root."""
    return subprocess.run([sys.executable, "-m", "flows.team_server", command, "--dir", str(folder), *options],
                          cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def postgres_bindir() -> Path:
    """PostgreSQL's programs, as the command finds them; missing: a skip, or under CI a failure."""
    try:
        return find_bindir(None)
    except Refused as missing:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{missing} (.ci/run installs it)")
        pytest.skip(str(missing))


@contextlib.contextmanager
def scratch_folder() -> Iterator[Path]:
    """A temporary folder that PostgreSQL can reach, removed afterwards. Not pytest's tmp_path: under root
    the cluster runs as the postgres user, and pytest's base folder (/tmp/pytest-of-root) is root's alone."""
    scratch = Path(tempfile.mkdtemp(prefix="prefect-postgres-"))
    scratch.chmod(0o755)
    try:
        yield scratch
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def client_environment(prefect_home: Path, api_url: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items()
           if not key.startswith("PREFECT_") and key.lower() not in PROXY_VARIABLES}
    return env | {
        "PREFECT_HOME": str(prefect_home),
        "PREFECT_API_URL": api_url,
        "PREFECT_WORKER_QUERY_SECONDS": "2",
        "PREFECT_RUNNER_POLL_FREQUENCY": "2",
        "DO_NOT_TRACK": "1",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "PYTHONUNBUFFERED": "1",
    }


def free_ports(count: int) -> list[int]:
    """Ports free on the loopback interface, all different (each probe holds its port until all are found)."""
    with contextlib.ExitStack() as probes:
        sockets = [probes.enter_context(socket.socket()) for _ in range(count)]
        for probe in sockets:
            probe.bind((HOST, 0))
        return [probe.getsockname()[1] for probe in sockets]


def processes_of(folder: Path) -> list[psutil.Process]:
    """The live processes working in the folder: PostgreSQL's (in pgdata/) and the Prefect server (in the folder
    itself). Zombies do not count: PID 1 in many containers never reaps the orphans they become."""
    folder = folder.resolve()
    inside = []
    for process in psutil.process_iter(["cwd", "status"]):
        cwd = process.info["cwd"]
        if cwd and process.info["status"] != psutil.STATUS_ZOMBIE and Path(cwd).is_relative_to(folder):
            inside.append(process)
    return inside


def wait_for(check, seconds: float, every: float = 0.5):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if result := check():
            return result
        time.sleep(every)
    return check()
