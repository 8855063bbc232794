"""Start and stop a local Prefect server in the background, for schedules to fire.

    python -m flows.server start [--port 4200]   # waits until it answers; prints PREFECT_API_URL
    python -m flows.server status
    python -m flows.server stop

The server keeps its database, log (server.log) and process id (server.pid) in PREFECT_HOME
(~/.prefect unless set), binds to 127.0.0.1 only, and sends nothing out: analytics are off
here and in prefect.toml.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import flows  # noqa: F401, I001  first: sets DO_NOT_TRACK before Prefect is imported
from prefect.settings import get_current_settings

PROJECT = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"
# The server answered its health endpoint after ~15 s on these 2-core machines; a loaded one is slower.
START_TIMEOUT_SECONDS = 120
OFFLINE = {"DO_NOT_TRACK": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_SERVER_UI_SHOW_PROMOTIONAL_CONTENT": "false"}


def home() -> Path:
    return Path(get_current_settings().home).expanduser()


def pid_file() -> Path:
    return home() / "server.pid"


def log_file() -> Path:
    return home() / "server.log"


def api_url(port: int) -> str:
    return f"http://{HOST}:{port}/api"


def running_pid() -> int | None:
    """The server's process id, when the pid file names a live process."""
    try:
        pid, _ = pid_file().read_text().split()
        os.kill(int(pid), 0)
        return int(pid)
    except (FileNotFoundError, ValueError, ProcessLookupError):
        return None


def healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def start(port: int) -> str:
    """Start `prefect server start` in the background and wait until it answers; its API URL."""
    if pid := running_pid():
        raise SystemExit(f"a server is already running (pid {pid}, {pid_file().read_text().split()[1]}); "
                         "`python -m flows.server stop` first")
    home().mkdir(parents=True, exist_ok=True)
    url = api_url(port)
    command = [sys.executable, "-m", "prefect", "server", "start", "--host", HOST, "--port", str(port)]
    # The project folder as working directory: prefect.toml there applies to the server too.
    env = {**os.environ, **OFFLINE, "PREFECT_HOME": str(home())}
    with open(log_file(), "ab") as log:
        # A session of its own: the server outlives this command and a terminal's Ctrl-C.
        server = subprocess.Popen(command, cwd=PROJECT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                  stdin=subprocess.DEVNULL, start_new_session=True)
    pid_file().write_text(f"{server.pid} {url}\n")
    deadline = time.monotonic() + START_TIMEOUT_SECONDS
    while not healthy(url):
        if server.poll() is not None or time.monotonic() > deadline:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
            pid_file().unlink(missing_ok=True)
            raise SystemExit(f"the Prefect server did not start; see {log_file()}")
        time.sleep(0.5)
    return url


def stop(timeout: float = 30) -> bool:
    """Stop the server started by `start` (SIGTERM, then SIGKILL); whether one was running."""
    pid = running_pid()
    if pid is not None:
        os.killpg(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while running_pid() and time.monotonic() < deadline:
            time.sleep(0.2)
        if running_pid():
            os.killpg(pid, signal.SIGKILL)
    pid_file().unlink(missing_ok=True)
    return pid is not None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=("start", "stop", "status"))
    parser.add_argument("--port", type=int, default=4200)
    args = parser.parse_args()
    if args.action == "start":
        url = start(args.port)
        print(f"Prefect server running (log {log_file()}); point flows and workers at it with:\n"
              f"export PREFECT_API_URL={url}")
    elif args.action == "stop":
        print("stopped" if stop() else "no server was running")
    elif pid := running_pid():
        print(f"running, pid {pid}, {pid_file().read_text().split()[1]}, log {log_file()}")
    else:
        print("not running")


if __name__ == "__main__":
    main()
