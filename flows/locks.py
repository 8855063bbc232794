"""DVC's locks in a checkout, as a flow meets them: who holds them, and holders that are stale.

`dvc repro` holds the repository lock (.dvc/tmp/lock, an fcntl lock through zc.lockfile, released
by the kernel when its process ends) for the whole run, and records the outputs it is writing in
.dvc/tmp/rwlock with its PID. DVC drops rwlock entries whose PID no longer exists, but a `dvc`
killed after its parent exited stays a zombie where PID 1 does not reap orphans (as in many
containers): its PID exists, and every later `dvc repro` stops with "... is busy, it is being
blocked by: (PID n) ...". Such an entry, and one whose process is gone, is stale.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path

import psutil
import zc.lockfile
from dvc.fs import localfs
from dvc.rwlock import RWLOCK_FILE, _edit_rwlock

LOCK_DIR = Path(".dvc/tmp")
REPOSITORY_LOCK = "lock"


@dataclass(frozen=True)
class Holder:
    pid: int
    command: str

    def __str__(self) -> str:
        return f"(PID {self.pid}) {self.command}"


def why_stale(pid: int) -> str | None:
    """Why a lock holder's process cannot be running DVC any more, or None when it can."""
    try:
        if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
            return "a zombie (killed, and never reaped by its parent)"
    except psutil.NoSuchProcess:
        return "no longer running on this host"
    return None


def rwlock_holders(project: Path) -> list[Holder]:
    """Every process .dvc/tmp/rwlock names, writers and readers."""
    try:
        content = json.loads((project / LOCK_DIR / RWLOCK_FILE).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return []
    entries = list((content.get("write") or {}).values())
    entries += [info for infos in (content.get("read") or {}).values() for info in infos]
    return list(dict.fromkeys(Holder(int(info["pid"]), info["cmd"]) for info in entries))


def clear_stale_holders(project: Path) -> list[tuple[Holder, str]]:
    """Remove the rwlock entries of processes that are zombies or gone; each holder removed, and why."""
    stale = [(holder, why) for holder in rwlock_holders(project) if (why := why_stale(holder.pid))]
    if not stale:
        return []
    pids = {holder.pid for holder, _ in stale}
    # DVC's own editor of the file: it takes the rwlock's guard lock, as every dvc does.
    with _edit_rwlock(str(project / LOCK_DIR), localfs, False) as lock:
        for path in [path for path, info in lock["write"].items() if info["pid"] in pids]:
            del lock["write"][path]
        for path, infos in list(lock["read"].items()):
            lock["read"][path] = [info for info in infos if info["pid"] not in pids]
            if not lock["read"][path]:
                del lock["read"][path]
    return stale


def live_holder(project: Path) -> Holder | None:
    """The running process that holds DVC's repository lock, or a live rwlock entry; None when DVC could start."""
    lock_file = project / LOCK_DIR / REPOSITORY_LOCK
    if lock_file.parent.is_dir():
        try:
            zc.lockfile.LockFile(str(lock_file)).close()  # free: taken and given back at once
        except zc.lockfile.LockError:
            return holder_of(lock_file)
    return next((holder for holder in rwlock_holders(project) if why_stale(holder.pid) is None), None)


def holder_of(lock_file: Path) -> Holder:
    """The process zc.lockfile wrote into the repository lock: its PID, and its command line when it can be read."""
    with contextlib.suppress(OSError, ValueError):
        pid = int(lock_file.read_text().split()[0])
        with contextlib.suppress(psutil.Error):
            return Holder(pid, " ".join(psutil.Process(pid).cmdline()))
        return Holder(pid, "unknown command")
    return Holder(0, "an unknown process")
