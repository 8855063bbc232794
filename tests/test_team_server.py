"""`python -m flows.team_server`: one command starts PostgreSQL and a Prefect server against it, a flow run against
that server is stored in PostgreSQL, `stop` leaves no process of its folder behind, and each bad input gets one
line that says what to do, with no traceback.

Real PostgreSQL (Debian's `postgresql`), real `prefect server start`; the fixture is tests/prefect_postgres.py's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request

import pytest
from prefect_postgres import (
    COMMAND_SECONDS,
    GONE_WITHIN_SECONDS,
    free_ports,
    postgres_bindir,
    postgres_prefect_fixture,  # noqa: F401  (the fixture postgres_prefect)
    processes_of,
    scratch_folder,
    team_server,
    wait_for,
)

HELLO_FLOW = """
from prefect import flow

@flow(name="hello-postgres")
def hello() -> str:
    return "stored"

print(hello())
"""


def assert_refused(result: subprocess.CompletedProcess, *phrases: str) -> None:
    """Exit status 1 and one line on stderr holding each phrase: no traceback."""
    assert result.returncode == 1, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for phrase in phrases:
        assert phrase in lines[0], lines[0]


# --- a server on PostgreSQL, started by the fixture with `start` ---------------------------------


def test_start_prints_the_api_url_to_export_how_to_stop_and_where_the_logs_are(postgres_prefect):
    output = postgres_prefect.start_output
    assert f"export PREFECT_API_URL={postgres_prefect.api_url}" in output
    assert f"python -m flows.team_server stop --dir {postgres_prefect.folder}" in output
    assert str(postgres_prefect.folder / "prefect.log") in output
    assert str(postgres_prefect.folder / "postgres.log") in output


def test_a_flow_run_against_the_server_completes_and_is_stored_in_postgresql(postgres_prefect, tmp_path):
    (tmp_path / "hello.py").write_text(HELLO_FLOW)
    ran = subprocess.run([sys.executable, "hello.py"], cwd=tmp_path, env=postgres_prefect.env,
                         capture_output=True, text=True, timeout=120)
    assert ran.returncode == 0 and "stored" in ran.stdout, ran.stdout + ran.stderr
    stored = postgres_prefect.sql("SELECT run.state_type FROM flow_run run JOIN flow ON flow.id = run.flow_id "
                                  "WHERE flow.name = 'hello-postgres'")
    assert stored == "COMPLETED"


def test_the_dashboard_calls_the_api_on_the_servers_own_port(postgres_prefect):
    # Not Prefect's default 4200: the trap of `prefect server start --port` (README, "Another port").
    no_proxy = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with no_proxy.open(postgres_prefect.api_url.removesuffix("/api") + "/ui-settings", timeout=30) as response:
        assert json.load(response)["api_url"] == postgres_prefect.api_url


def test_start_again_says_both_already_run_and_status_says_where(postgres_prefect):
    again = team_server("start", postgres_prefect.folder, env=postgres_prefect.env)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "already running" in again.stdout and postgres_prefect.api_url in again.stdout
    status = team_server("status", postgres_prefect.folder, env=postgres_prefect.env)
    assert status.returncode == 0, status.stdout + status.stderr
    assert f"runs on 127.0.0.1:{postgres_prefect.db_port}" in status.stdout
    assert f"runs at {postgres_prefect.api_url}" in status.stdout


@pytest.mark.parametrize("option", ["--port", "--db-port"])
def test_a_port_in_use_is_refused_before_anything_is_created(postgres_prefect, tmp_path, option):
    taken = postgres_prefect.api_url.split(":")[-1].removesuffix("/api") if option == "--port" \
        else str(postgres_prefect.db_port)
    other = "--db-port" if option == "--port" else "--port"
    refused = team_server("start", tmp_path / "new", option, taken, other, str(free_ports(1)[0]),
                          env=postgres_prefect.env)
    assert_refused(refused, f"port {taken} ({option}) is already in use")
    assert not (tmp_path / "new").exists()


def test_stop_leaves_no_postgres_or_prefect_process_of_the_folder(postgres_prefect):
    # Last of the tests on the fixture's server: it stops it (the fixture's own stop then finds nothing running).
    assert processes_of(postgres_prefect.folder)
    stopped = team_server("stop", postgres_prefect.folder, env=postgres_prefect.env)
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    assert "stopped the Prefect server" in stopped.stdout and "and PostgreSQL" in stopped.stdout
    assert wait_for(lambda: not processes_of(postgres_prefect.folder), GONE_WITHIN_SECONDS), \
        [process.cmdline() for process in processes_of(postgres_prefect.folder)]
    status = team_server("status", postgres_prefect.folder, env=postgres_prefect.env)
    assert status.returncode == 1 and status.stdout.count("not running") == 2, status.stdout


# --- bad input -------------------------------------------------------------------------------


def test_missing_postgresql_programs_name_the_package_to_install(tmp_path):
    refused = team_server("start", tmp_path / "db", "--bindir", str(tmp_path), timeout=60)
    assert_refused(refused, "PostgreSQL's programs", "are not installed", "apt-get install postgresql")


def test_a_folder_that_holds_something_else_is_refused(tmp_path):
    postgres_bindir()  # the programs are looked for first
    (tmp_path / "notes.txt").write_text("mine")
    for command in ("start", "stop", "status"):
        refused = team_server(command, tmp_path, timeout=60)
        assert_refused(refused, f"{tmp_path} exists but holds no PostgreSQL cluster", "give a new or empty folder")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["notes.txt"]


def test_a_server_not_healthy_in_time_names_its_log_and_leaves_nothing_running():
    postgres_bindir()
    with scratch_folder() as scratch:
        folder = scratch / "db"
        api_port, db_port = free_ports(2)
        # One second: Prefect alone takes longer to import.
        refused = team_server("start", folder, "--port", str(api_port), "--db-port", str(db_port), "--wait", "1")
        assert_refused(refused, "not healthy within 1 s", f"see its log {folder / 'prefect.log'}")
        assert wait_for(lambda: not processes_of(folder), GONE_WITHIN_SECONDS), \
            [process.cmdline() for process in processes_of(folder)]
        assert (folder / "pgdata" / "PG_VERSION").exists()  # the cluster stays, for the next start


@pytest.mark.skipif(os.geteuid() != 0, reason="only under root does the cluster run as another user")
def test_under_root_a_folder_the_postgres_user_cannot_reach_is_refused():
    postgres_bindir()
    with scratch_folder() as scratch:
        closed = scratch / "closed"
        closed.mkdir(mode=0o700)  # root's alone, as pytest's own temporary folders are
        refused = team_server("start", closed / "db", timeout=COMMAND_SECONDS)
        assert_refused(refused, "the postgres user", f"cannot enter {closed} (mode 700)", f"chmod o+x {closed}")
        assert list(closed.iterdir()) == []  # nor a half-made cluster
