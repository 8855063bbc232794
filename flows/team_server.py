"""A local Prefect server backed by PostgreSQL, for trying Prefect at team scale on one machine.

    python -m flows.team_server start --dir .prefect-postgres --port 4300 --db-port 5433
    python -m flows.team_server status --dir .prefect-postgres
    python -m flows.team_server stop --dir .prefect-postgres

`start` creates a PostgreSQL cluster in the folder the first time (PostgreSQL's own initdb and
pg_ctl, from Debian's `postgresql` package). It starts the cluster on 127.0.0.1, creates its
`prefect` database if it is missing, and starts `prefect server start` against it
(PREFECT_API_DATABASE_CONNECTION_URL=postgresql+asyncpg://...) in the background. Once the
server answers, it prints the PREFECT_API_URL to export and how to stop both. When both already
run, it says so. `stop` stops the server, then the cluster. `status` says what runs; it exits 1
unless both do.

The folder holds everything and ignores itself in git:
    pgdata/        the cluster: passwordless, on 127.0.0.1 and its own Unix socket only
    sockets/       that socket; not in /var/run/postgresql, which only the postgres user may write
    postgres.log   PostgreSQL's log
    prefect.log    the Prefect server's log
    server.json    the Prefect server this command started: its PID, start time and port

PostgreSQL refuses to run as root, so under root the cluster runs as the `postgres` user, which
then needs to be able to reach the folder. To use an existing PostgreSQL instead, see the
README's "Prefect on PostgreSQL".
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pwd
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import psutil

HOST = "127.0.0.1"
DATABASE = "prefect"
# The cluster's superuser, and under root the system user the cluster runs as (Debian's package creates it).
POSTGRES_USER = "postgres"
PROGRAMS = ("initdb", "pg_ctl", "psql")
DEBIAN_BINDIRS = "/usr/lib/postgresql/*/bin"
# Measured: healthy ~6 s after the start, migrations included, on an idle 2-core machine. This
# allows for a loaded one.
HEALTHY_WITHIN_SECONDS = 120
POSTGRES_WAIT_SECONDS = 60  # pg_ctl's own default for -w
SERVER_STOP_SECONDS = 30  # SIGTERM stops it in ~2 s; SIGKILL after this
UNIX_SOCKET_PATH_MAX = 107  # sockaddr_un's 108 bytes, less the terminating NUL


class Refused(Exception):
    """Bad input, or a step that failed: one line for the user, without a traceback."""


@dataclass(frozen=True)
class Folder:
    """The files of one server and its cluster (see the module's docstring); `root` as the user gave it."""

    root: Path

    @property
    def pgdata(self) -> Path:
        return self.root.absolute() / "pgdata"

    @property
    def sockets(self) -> Path:
        return self.root.absolute() / "sockets"

    @property
    def postgres_log(self) -> Path:
        return self.root / "postgres.log"

    @property
    def prefect_log(self) -> Path:
        return self.root / "prefect.log"

    @property
    def server_state(self) -> Path:
        return self.root / "server.json"

    def is_cluster(self) -> bool:
        return (self.pgdata / "PG_VERSION").is_file()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        folder = Folder(args.dir)
        if args.command == "start":
            start(folder, find_bindir(args.bindir), args.port, args.db_port, args.wait)
        elif args.command == "stop":
            stop(folder, find_bindir(args.bindir))
        else:
            sys.exit(0 if status(folder) else 1)
    except (Refused, OSError) as error:  # an OSError's message names its file: clear enough
        sys.exit(f"error: {error}")
    except KeyboardInterrupt:
        sys.exit("interrupted: what this command had started is stopped again")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--dir", type=Path, default=Path(".prefect-postgres"),
                        help="the folder of the cluster, its logs and the server's PID (default: .prefect-postgres)")
    common.add_argument("--bindir", type=Path, help="PostgreSQL's programs (default: initdb's folder on PATH, "
                                                    f"else the newest {DEBIAN_BINDIRS})")
    parser = argparse.ArgumentParser(prog="python -m flows.team_server", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    starting = commands.add_parser("start", parents=[common],
                                   help="create if needed, start both, print how to use them")
    starting.add_argument("--port", type=port_number, default=4300, help="the Prefect server's port (default: 4300)")
    starting.add_argument("--db-port", type=port_number, default=5433, help="PostgreSQL's port (default: 5433)")
    starting.add_argument("--wait", type=float, default=HEALTHY_WITHIN_SECONDS, metavar="SECONDS",
                          help=f"how long the server may take to answer (default: {HEALTHY_WITHIN_SECONDS})")
    commands.add_parser("stop", parents=[common], help="stop the Prefect server, then PostgreSQL")
    commands.add_parser("status", parents=[common], help="say what runs")
    return parser.parse_args(argv)


def port_number(text: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number (1-65535)")
    return int(text)


# --- the commands ----------------------------------------------------------------------------


def start(folder: Folder, bindir: Path, port: int, db_port: int, wait_seconds: float) -> None:
    """Start what does not run yet, creating the cluster first when the folder is new; print how to use it."""
    check_folder(folder)
    db_running, server = running_postgres_port(folder), running_server(folder)
    if db_running and server:
        print(f"already running in {folder.root}, nothing started:")
        print_usage(folder, server["port"], db_running)
        return
    if port == db_port:
        raise Refused(f"--port and --db-port are both {port}: give each its own")
    check_ports_free(([] if server else [(port, "--port")]) + ([] if db_running else [(db_port, "--db-port")]))
    if not db_running:
        check_socket_path_fits(folder, db_port)
    if not folder.is_cluster():
        create_cluster(folder, bindir)

    started_postgres = False
    try:
        if not db_running:
            start_postgres(folder, bindir, db_port)
            db_running, started_postgres = db_port, True
        create_database_if_missing(bindir, db_running)
        if not server:
            start_prefect_server(folder, port, db_running, wait_seconds)
    except BaseException:
        # Leave things as they were: a half-started pair would make the next `start` say "already running".
        if started_postgres:
            stop_postgres(folder, bindir)
        raise
    print_usage(folder, server["port"] if server else port, db_running)


def stop(folder: Folder, bindir: Path) -> None:
    check_folder(folder, must_exist=True)
    stopped = []
    if server_pid := stop_prefect_server(folder):
        stopped.append(f"the Prefect server (PID {server_pid})")
    if running_postgres_port(folder):
        stop_postgres(folder, bindir)
        stopped.append(f"PostgreSQL ({folder.pgdata})")
    print(f"stopped {' and '.join(stopped)}" if stopped else f"nothing was running in {folder.root}")


def status(folder: Folder) -> bool:
    """Print what runs; whether both do."""
    check_folder(folder, must_exist=True)
    db_port, server = running_postgres_port(folder), running_server(folder)
    print(f"PostgreSQL: runs on {HOST}:{db_port}, database {DATABASE} (log: {folder.postgres_log})" if db_port
          else "PostgreSQL: not running")
    print(f"Prefect server: runs at {api_url(server['port'])} (PID {server['pid']}, log: {folder.prefect_log})"
          if server else "Prefect server: not running")
    return bool(db_port and server)


def print_usage(folder: Folder, port: int, db_port: int) -> None:
    print(f"PostgreSQL: {HOST}:{db_port}, database {DATABASE}; its log: {folder.postgres_log}")
    print(f"Prefect server: {api_url(port)} (dashboard: http://{HOST}:{port}); its log: {folder.prefect_log}")
    print()
    print("Point flows, workers and `prefect` commands at it:")
    print(f"    export PREFECT_API_URL={api_url(port)}")
    print("Stop both:")
    print(f"    python -m flows.team_server stop --dir {shlex.quote(str(folder.root))}")


def api_url(port: int) -> str:
    return f"http://{HOST}:{port}/api"


def database_url(db_port: int) -> str:
    return f"postgresql+asyncpg://{POSTGRES_USER}@{HOST}:{db_port}/{DATABASE}"


# --- checks, before anything is created or started ----------------------------------------------


def find_bindir(given: Path | None) -> Path:
    """The folder holding PostgreSQL's programs: the one given, else initdb's on PATH, else Debian's newest."""
    if given:
        candidates = [given]
    else:
        # Debian keeps initdb and pg_ctl off PATH, in one folder per major version.
        debian = sorted(Path("/").glob(DEBIAN_BINDIRS.lstrip("/")), key=major_version, reverse=True)
        on_path = [Path(found).parent for found in [shutil.which("initdb")] if found]
        candidates = on_path + debian
    for bindir in candidates:
        if all(os.access(bindir / program, os.X_OK) for program in PROGRAMS):
            check_postgres_user()
            return bindir
    where = f" in {given}" if given else ""
    raise Refused(f"PostgreSQL's programs ({', '.join(PROGRAMS)}) are not installed{where}: apt-get install postgresql")


def major_version(bindir: Path) -> int:
    """15 for /usr/lib/postgresql/15/bin."""
    version = bindir.parent.name.split(".")[0]
    return int(version) if version.isdigit() else 0


def check_postgres_user() -> None:
    if running_as_root():
        try:
            pwd.getpwnam(POSTGRES_USER)
        except KeyError:
            raise Refused(f"PostgreSQL does not run as root, and there is no {POSTGRES_USER!r} user to run it as: "
                          "apt-get install postgresql creates it") from None


def running_as_root() -> bool:
    return os.geteuid() == 0


def check_folder(folder: Folder, must_exist: bool = False) -> None:
    """A folder this command made, or for `start` one that does not exist yet or is empty."""
    if folder.is_cluster():
        return
    if not folder.root.exists() and must_exist:
        raise Refused(f"{folder.root} does not exist: `python -m flows.team_server start --dir {folder.root}` "
                      "creates it")
    if folder.root.exists() and (must_exist or not folder.root.is_dir() or any(folder.root.iterdir())):
        raise Refused(f"{folder.root} exists but holds no PostgreSQL cluster made by this command "
                      "(no pgdata/PG_VERSION): give a new or empty folder")


def check_ports_free(ports: list[tuple[int, str]]) -> None:
    for port, option in ports:
        with socket.socket() as probe:
            # As Prefect and PostgreSQL bind theirs: a port left in TIME_WAIT is free, one with a listener is not.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((HOST, port))
            except OSError:
                raise Refused(f"port {port} ({option}) is already in use on {HOST}: choose another") from None


def check_socket_path_fits(folder: Folder, db_port: int) -> None:
    socket_path = folder.sockets / f".s.PGSQL.{db_port}"
    if len(str(socket_path)) > UNIX_SOCKET_PATH_MAX:
        raise Refused(f"{folder.root.absolute()} is too deep for PostgreSQL's Unix socket "
                      f"({len(str(socket_path))} characters, at most {UNIX_SOCKET_PATH_MAX}): give a shorter --dir")


def check_reachable_by_postgres(path: Path) -> None:
    """Under root the cluster runs as the postgres user, which must be able to enter every folder above it."""
    if not running_as_root():
        return
    account = pwd.getpwnam(POSTGRES_USER)
    for parent in reversed(path.absolute().parents):
        mode, owner, group = (info := parent.stat()).st_mode, info.st_uid, info.st_gid
        enters = (mode & stat.S_IXOTH or (owner == account.pw_uid and mode & stat.S_IXUSR)
                  or (group == account.pw_gid and mode & stat.S_IXGRP))
        if not enters:
            raise Refused(f"the {POSTGRES_USER} user, which PostgreSQL runs as under root, cannot enter {parent} "
                          f"(mode {stat.S_IMODE(mode):o}): give a --dir it can reach, or chmod o+x {parent}")


# --- PostgreSQL --------------------------------------------------------------------------------


def as_postgres(command: list) -> list[str]:
    """The command, run as the postgres user when this process is root (initdb and pg_ctl refuse root)."""
    command = [str(part) for part in command]
    return ["runuser", "-u", POSTGRES_USER, "--", *command] if running_as_root() else command


def create_cluster(folder: Folder, bindir: Path) -> None:
    """initdb in a hidden folder beside the given one, renamed into place once complete: an interrupted
    creation never leaves a folder that looks like a cluster."""
    partial = Folder(folder.root.absolute().with_name(f".{folder.root.absolute().name}.partial"))
    shutil.rmtree(partial.root, ignore_errors=True)  # from an earlier creation that was interrupted
    try:
        lay_out(partial)
        check_reachable_by_postgres(partial.pgdata)
        run_or_refuse(as_postgres([bindir / "initdb", "-D", partial.pgdata, "-U", POSTGRES_USER, "--auth", "trust",
                                   # The C locale exists everywhere; the environment's may not be generated.
                                   "--no-locale", "--encoding", "UTF8"]), "initdb failed")
        (partial.pgdata / "pg_hba.conf").write_text(
            "# flows/team_server.py: passwordless, from this machine only: the loopback interface and the socket\n"
            "# in ../sockets, which only the cluster's user may enter.\n"
            "local  all  all                trust\n"
            "host   all  all  127.0.0.1/32  trust\n")
        if folder.root.exists():
            folder.root.rmdir()  # empty: check_folder said so
        partial.root.rename(folder.root)
    except BaseException:
        shutil.rmtree(partial.root, ignore_errors=True)
        raise


def lay_out(folder: Folder) -> None:
    """The folder, and the parts of it PostgreSQL writes, handed to the postgres user under root."""
    folder.root.mkdir(parents=True)
    folder.root.chmod(0o755)  # whatever the umask: under root, the postgres user must enter it
    (folder.root / ".gitignore").write_text("# made by `python -m flows.team_server`: a database and logs\n*\n")
    folder.pgdata.mkdir(mode=0o700)
    folder.sockets.mkdir(mode=0o700)
    folder.postgres_log.touch()
    if running_as_root():
        for path in (folder.pgdata, folder.sockets, folder.postgres_log):
            shutil.chown(path, POSTGRES_USER, POSTGRES_USER)


def start_postgres(folder: Folder, bindir: Path, db_port: int) -> None:
    # pg_ctl hands -o to a shell: the socket folder's path is quoted for it.
    options = f"-p {db_port} -k {shlex.quote(str(folder.sockets))} -c listen_addresses={HOST}"
    started = subprocess.run(as_postgres([bindir / "pg_ctl", "start", "-w", "-t", POSTGRES_WAIT_SECONDS,
                                          "-D", folder.pgdata, "-l", folder.postgres_log.absolute(), "-o", options]),
                             cwd="/", capture_output=True, text=True)
    if started.returncode != 0:
        raise Refused(f"PostgreSQL did not start: see its log {folder.postgres_log} "
                      f"({last_line(folder.postgres_log) or last_line_of(started.stderr)})")


def stop_postgres(folder: Folder, bindir: Path) -> None:
    # fast: active sessions (the Prefect server's, if it is somehow still up) are disconnected, not waited for.
    run_or_refuse(as_postgres([bindir / "pg_ctl", "stop", "-D", folder.pgdata, "-m", "fast", "-w",
                               "-t", POSTGRES_WAIT_SECONDS]), "pg_ctl stop failed")


def running_postgres_port(folder: Folder) -> int | None:
    """The port of the folder's running cluster, or None. From postmaster.pid, whose lines 1 and 4 are the
    postmaster's PID and port; the file stays behind after a crash, so the PID is checked."""
    with contextlib.suppress(FileNotFoundError, IndexError, ValueError):
        lines = (folder.pgdata / "postmaster.pid").read_text().splitlines()
        if process_runs(int(lines[0]), name="postgres"):
            return int(lines[3])
    return None


def create_database_if_missing(bindir: Path, db_port: int) -> None:
    exists = psql(bindir, db_port, f"SELECT 1 FROM pg_database WHERE datname = '{DATABASE}'")
    if exists != "1":
        psql(bindir, db_port, f"CREATE DATABASE {DATABASE}")


def psql(bindir: Path, db_port: int, query: str) -> str:
    """One query over TCP as the cluster's superuser (no password: the cluster trusts 127.0.0.1); its output."""
    # -X: no ~/.psqlrc; -tA: the bare value.
    command = [bindir / "psql", "-X", "-tA", "-v", "ON_ERROR_STOP=1", "-h", HOST, "-p", db_port,
               "-U", POSTGRES_USER, "-d", "postgres", "-c", query]
    return run_or_refuse([str(part) for part in command], f"psql failed ({query})").strip()


# --- the Prefect server -----------------------------------------------------------------------


def start_prefect_server(folder: Folder, port: int, db_port: int, wait_seconds: float) -> None:
    """`prefect server start` in the background, in a session of its own (a Ctrl-C meant for this command
    does not reach it); returns once it answers, else stops it."""
    with folder.prefect_log.open("a") as log:
        server = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", HOST,
                                   "--port", str(port)],
                                  # In the folder: no prefect.toml or .env of wherever this command ran changes it.
                                  cwd=folder.root, env=server_environment(port, db_port), stdin=subprocess.DEVNULL,
                                  stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    write_atomically(folder.server_state, json.dumps(
        {"pid": server.pid, "created": psutil.Process(server.pid).create_time(), "port": port}))
    try:
        wait_until_healthy(server, folder, port, wait_seconds)
    except BaseException:
        stop_prefect_server(folder)
        raise


def server_environment(port: int, db_port: int) -> dict[str, str]:
    return os.environ | {
        # Prefect reads a setting under its current name before its older alias, so both are set: neither a
        # profile nor an environment holding the other one can point this server elsewhere.
        "PREFECT_SERVER_DATABASE_CONNECTION_URL": database_url(db_port),
        "PREFECT_API_DATABASE_CONNECTION_URL": database_url(db_port),
        # The dashboard asks /ui-settings for its API's address, which comes from these settings and not
        # from --port (README, "Another port").
        "PREFECT_SERVER_UI_API_URL": api_url(port),
        "PREFECT_UI_API_URL": api_url(port),
        "PREFECT_SERVER_API_HOST": HOST,
        "PREFECT_SERVER_API_PORT": str(port),
        "PREFECT_API_URL": api_url(port),
        # Nothing phones home (these machines are offline), as prefect.toml says for the project's own server.
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_UI_SHOW_PROMOTIONAL_CONTENT": "false",
        "DO_NOT_TRACK": "1",
    }


def wait_until_healthy(server: subprocess.Popen, folder: Folder, port: int, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise Refused(f"the Prefect server exited while starting (code {server.returncode}): see its log "
                          f"{folder.prefect_log} ({last_line(folder.prefect_log)})")
        if answers(f"{api_url(port)}/ready"):  # /ready, not /health: it also asks the database
            return
        time.sleep(0.5)
    raise Refused(f"the Prefect server was not healthy within {seconds:g} s: see its log {folder.prefect_log} "
                  "(what this command started is stopped again)")


def answers(url: str) -> bool:
    # No proxy: an http_proxy in the environment would otherwise be asked for 127.0.0.1.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def running_server(folder: Folder) -> dict | None:
    """server.json's record of the server this command started, when that process still runs, else None."""
    try:
        state = json.loads(folder.server_state.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return state if process_runs(state["pid"], created=state["created"]) else None


def stop_prefect_server(folder: Folder) -> int | None:
    """SIGTERM to the server's process group, SIGKILL if it outlives SERVER_STOP_SECONDS; its PID, or None
    when none ran."""
    server = running_server(folder)
    folder.server_state.unlink(missing_ok=True)
    if not server:
        return None
    pid = server["pid"]
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGTERM)  # its group: it was started in a session of its own
        deadline = time.monotonic() + SERVER_STOP_SECONDS
        while process_runs(pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        if process_runs(pid):
            os.killpg(pid, signal.SIGKILL)
    return pid


# --- small helpers ----------------------------------------------------------------------------


def process_runs(pid: int, name: str | None = None, created: float | None = None) -> bool:
    """Whether the process runs, and is the one meant: its name, its start time (a PID can be reused).
    A zombie (ended, not yet reaped by its parent: PID 1 in many containers never does) does not run."""
    try:
        process = psutil.Process(pid)
        return (process.status() != psutil.STATUS_ZOMBIE and (name is None or process.name() == name)
                and (created is None or abs(process.create_time() - created) < 1))
    except psutil.Error:
        return False


def run_or_refuse(command: list, failure: str) -> str:
    """Run a command (from /, which the postgres user can always enter); its output, or Refused with its
    last line of errors."""
    try:
        done = subprocess.run([str(part) for part in command], cwd="/", capture_output=True, text=True,
                              timeout=POSTGRES_WAIT_SECONDS + 30)  # pg_ctl's own -t, and a margin
    except subprocess.TimeoutExpired:
        raise Refused(f"{failure}: no answer within {POSTGRES_WAIT_SECONDS + 30} s") from None
    if done.returncode != 0:
        raise Refused(f"{failure}: {last_line_of(done.stderr or done.stdout)}")
    return done.stdout


def last_line(path: Path) -> str:
    with contextlib.suppress(OSError):
        return last_line_of(path.read_text(errors="replace"))
    return ""


def last_line_of(text: str) -> str:
    return next((line.strip() for line in reversed(text.splitlines()) if line.strip()), "")


def write_atomically(path: Path, text: str) -> None:
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(text)
    partial.replace(path)


if __name__ == "__main__":
    main()
