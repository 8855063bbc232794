"""The champion in DVC's model registry: GTO's git tags on the experiments' commits, pushed to the shared
git remote, the models' bytes in the DVC remote. Anyone anywhere gets the champion with

    dvc artifacts get <repo-url> image-classifier --stage prod -o model.pt

A run's experiment commit is promoted when it beats the registered champion (flows.champion.decide):
`gto register` and `gto assign --stage prod` tag it. Each run's decision, promoted or not, is an annotated
tag of its own under decisions/image-classifier/, so the registry's history says what every run decided:

    git tag -n1 --list 'decisions/image-classifier/*'      # by name: by time

Two workers promoting at once: both see the same champion, so both name the same next tags
(image-classifier@v0.0.N and image-classifier#prod#M, GTO counts from the tags it sees), and `git push
--atomic` lets exactly one of them create those tags. The other deletes its own, reads the registry again
and decides against the champion it now finds.

models/champion/ stays as a local cache of the registered champion (`refresh_champion_cache`), for
`python -m stages.predict` and the report's comparison.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import gto.api
from gto.base import VersionSort
from gto.registry import GitRegistry
from ruamel.yaml import YAML

from flows import champion

ARTIFACT = "image-classifier"  # dvc.yaml's artifacts: entry
STAGE = "prod"
DECISIONS = f"decisions/{ARTIFACT}"  # one annotated tag per run's decision
REMOTE = "origin"
METRICS = "reports/metrics.json"  # git-tracked (cache: false): read from the commit itself
PER_CLASS = "reports/per_class.csv"
# How often a run decides again after another run's promotion took the tags it meant to push. Each
# loss means another run promoted in between: two workers settle in two attempts.
MAX_ATTEMPTS = 5
# The registry's own tags (GTO's for the artifact, the decisions'): fetched, and pruned where the remote lacks
# them, before every decision; a promotion that crashed before its push leaves local tags nobody else has.
REGISTRY_REFS = (f"refs/tags/{ARTIFACT}@*", f"refs/tags/{ARTIFACT}#*", f"refs/tags/{DECISIONS}/*")


class RegistryError(RuntimeError):
    """Git or the registry refused an operation; the message is theirs."""


class ModelNotInRemote(RegistryError):
    """The model of the commit to register is not in the DVC remote: others could not download it."""


class RegistryBusy(RegistryError):
    """The tags could not be pushed after MAX_ATTEMPTS decisions."""


@dataclass(frozen=True)
class Challenger:
    """The run asking for promotion: its experiment's commit (`dvc exp run`/`dvc exp save`), and where it came from."""

    commit: str
    experiment: str
    overrides: list[str] = field(default_factory=list)
    data_sha256: str | None = None
    flow_run_id: str | None = None
    flow_run_name: str | None = None


@dataclass(frozen=True)
class Champion:
    """The registered champion: the version last assigned `prod`, the commit it points at and that commit's metrics."""

    version: str
    commit: str
    metrics: dict
    message: str  # the registration tag's: the provenance of the run that promoted it
    assigned_at: datetime


@dataclass(frozen=True)
class Outcome:
    """What a run decided and what it pushed."""

    decision: champion.Decision
    champion: Champion | None  # the registered champion the decision was made against
    version: str | None  # the version registered and assigned prod; None when not promoted
    reason: str  # the decision's reason, and whether it was decided again after another run's promotion
    record: str  # the decision's tag, under decisions/image-classifier/
    attempts: int  # 2 or more: another run promoted first and this one decided again


def promote_if_better(project: Path, challenger: Challenger, metric: str = "accuracy", margin: float = 0.0,
                      max_epsilon: float | None = None, remote: str = REMOTE) -> Outcome:
    """Decide against the champion registered in remote, register and assign prod when the challenger beats it,
    record the decision in any case; all of it pushed to remote in one atomic push.

    Raises ModelNotInRemote (nothing tagged, nothing pushed) when the challenger would be promoted but its model is
    not in the DVC remote; RegistryBusy when every attempt's push was refused; RegistryError when git fails.
    """
    project = Path(project)
    metrics = json.loads(git_show(project, challenger.commit, METRICS))
    first_seen = None
    for attempt in range(1, MAX_ATTEMPTS + 1):
        current = registered_champion(project, remote)
        if attempt == 1:
            first_seen = current
        decision = champion.decide(metrics, current.metrics if current else None, metric, margin, max_epsilon)
        reason = decision.reason + decided_again_note(first_seen, current)
        version, tags = tag_decision(project, challenger, decision, current, reason, attempt)
        refused = push_tags(project, remote, tags)
        if not refused:
            return Outcome(decision, current, version, reason, tags[-1], attempt)
        # Another run took these names first (or the push failed): until the next fetch replaces them, GTO here
        # would take them for the registry's.
        git(project, "tag", "--delete", *tags)
    raise RegistryBusy(f"could not push the registry's tags to {remote} in {MAX_ATTEMPTS} attempts; git said: "
                       f"{refused}")


def registered_champion(project: Path, remote: str = REMOTE) -> Champion | None:
    """The champion registered in remote (its tags fetched first); None when no version was ever assigned prod."""
    fetch_registry(project, remote)
    return champion_in_tags(project)


def refresh_champion_cache(project: Path, remote: str = REMOTE) -> Champion | None:
    """Make models/champion/ the registered champion (model.pt fetched with `dvc artifacts get`, metrics.json and
    per_class.csv from its commit), unless it already is; the champion, or None (folder untouched) when none."""
    current = registered_champion(project, remote)
    if current is None:
        return None
    folder = champion.champion_folder(project)
    cached = folder / "provenance.json"
    if cached.exists() and json.loads(cached.read_text()).get("version") == current.version:
        return current
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder.parent) as scratch:  # beside the cache: the model is moved, not copied
        model = Path(scratch) / "model.pt"
        dvc(project, "artifacts", "get", ".", ARTIFACT, "--rev", current.version, "-o", str(model))
        files = {"model.pt": model, "metrics.json": git_show(project, current.commit, METRICS).encode(),
                 "per_class.csv": git_show(project, current.commit, PER_CLASS).encode()}
        provenance = {"artifact": ARTIFACT, "version": current.version, "commit": current.commit,
                      "registered": current.message}
        champion.install(project, files, provenance)
    return current


def experiment_commit(project: Path, experiment: str) -> str:
    """The commit of the DVC experiment of that name on the current baseline: refs/exps/<HEAD's sha as ab/cdef...>/<name>,
    where `dvc exp run -n`/`dvc exp save -n` keep it."""
    baseline = git(project, "rev-parse", "HEAD").strip()
    return git(project, "rev-parse", f"refs/exps/{baseline[:2]}/{baseline[2:]}/{experiment}").strip()


# --- reading the registry -------------------------------------------------------------------


def fetch_registry(project: Path, remote: str) -> None:
    """Make this clone's registry tags those of remote: new ones fetched, moved ones updated, gone ones pruned."""
    git(project, "fetch", "--quiet", "--prune", "--no-tags", remote, *(f"+{ref}:{ref}" for ref in REGISTRY_REFS))


def champion_in_tags(project: Path) -> Champion | None:
    """The version whose prod assignment is the latest, as GTO orders them by time (`gto show --sort timestamp`):
    the one `dvc artifacts get --stage prod` downloads, whose assignment tag is the last in time."""
    with GitRegistry.from_url(str(project)) as registry:
        artifacts = registry.get_state().get_artifacts()
    if ARTIFACT not in artifacts:
        return None
    in_stage = artifacts[ARTIFACT].get_vstages(sort=VersionSort.Timestamp).get(STAGE)
    if not in_stage:
        return None
    latest = in_stage[0]
    version = artifacts[ARTIFACT].find_version(name=latest.version)
    return Champion(latest.version, latest.commit_hexsha, json.loads(git_show(project, latest.commit_hexsha, METRICS)),
                    version.message if version else "", latest.activated_at)


def decided_again_note(first_seen: Champion | None, current: Champion | None) -> str:
    if current is None or (first_seen is not None and first_seen.version == current.version):
        return ""
    return f" (decided again: {current.version} was registered by another run while this one was deciding)"


# --- writing it -------------------------------------------------------------------------------


def tag_decision(project: Path, challenger: Challenger, decision: champion.Decision, current: Champion | None,
                 reason: str, attempt: int) -> tuple[str | None, list[str]]:
    """The local tags of this decision: GTO's registration and assignment when promoted, then the decision's own;
    the version registered (or None) and the tags' names, the decision's last."""
    details = {**asdict(challenger), "decision": "promoted" if decision.promote else "not promoted",
               "metric": decision.metric, "score": decision.challenger,
               "champion": current.version if current else None, "champion_score": decision.champion,
               "attempt": attempt}
    version, tags = None, []
    if decision.promote:
        require_model_in_remote(project, challenger.commit)
        if current is not None:
            wait_until_after(current.assigned_at)
        version, tags = register_as_champion(project, challenger.commit, reason, details)
    verdict = f"promoted as {version}" if version else "not promoted" + (f", {current.version} stays" if current else "")
    subject = f"{challenger.experiment}: {verdict}: {reason}"
    tags.append(record_decision(project, challenger.commit, message(subject, {**details, "version": version})))
    return version, tags


def require_model_in_remote(project: Path, commit: str) -> None:
    """Refuse to register a model that others could not download: its bytes must be in the default DVC remote."""
    from dvc.config import NoRemoteError
    from dvc.repo import Repo

    path, md5 = artifact_hash_at(project, commit)
    with Repo(str(project)) as repo:
        try:
            remote = repo.cloud.get_remote(command="push")
        except NoRemoteError as error:
            raise ModelNotInRemote(f"{ARTIFACT} ({path} of commit {commit[:10]}) cannot be registered: {error}") from None
        present = repo.cloud.get_remote_odb(remote.name, "push").exists(md5)
        where = f"'{remote.name}' ({remote.fs.unstrip_protocol(remote.path)})"
    if not present:
        raise ModelNotInRemote(
            f"{ARTIFACT} ({path} of commit {commit[:10]}, md5 {md5}) is not in the DVC remote {where}: push it first "
            "(`dvc exp push origin <experiment>`, or `dvc push`) so that `dvc artifacts get` finds it; nothing was "
            "registered")


def artifact_hash_at(project: Path, commit: str) -> tuple[str, str]:
    """The artifact's path (dvc.yaml's artifacts: entry) and its md5 (dvc.lock's outs) at commit."""
    yaml = YAML(typ="safe", pure=True)
    path = yaml.load(git_show(project, commit, "dvc.yaml"))["artifacts"][ARTIFACT]["path"]
    for stage in yaml.load(git_show(project, commit, "dvc.lock"))["stages"].values():
        for out in stage.get("outs", []):
            if out["path"] == path:
                return path, out["md5"]
    raise RegistryError(f"{path} is no stage's output in dvc.lock of commit {commit[:10]}: nothing to register")


def wait_until_after(moment: datetime) -> None:
    """Wait for the next second after moment. Tags carry whole seconds, and `dvc artifacts get --stage prod` takes
    the prod tag that is last in time (ties in name order, where #prod#10 comes before #prod#9): a new assignment
    in the same second as the champion's could lose to it."""
    delay = moment.timestamp() + 1 - time.time()
    if delay > 0:
        time.sleep(delay)


def register_as_champion(project: Path, commit: str, reason: str, details: dict) -> tuple[str, list[str]]:
    """`gto register` the commit (the next version) and `gto assign` it prod; the version and the two tags."""
    registration = gto.api.register(str(project), ARTIFACT, commit, message=message(
        f"{ARTIFACT}: registered as the champion: {reason}", details))
    assignment = gto.api.assign(str(project), ARTIFACT, STAGE, version=registration.version, message=message(
        f"{ARTIFACT} {registration.version} to {STAGE}: {reason}", {**details, "version": registration.version}))
    return registration.version, [registration.tag, assignment.tag]


def record_decision(project: Path, commit: str, text: str) -> str:
    """An annotated tag on the challenger's commit holding the decision. Its name sorts by time to the millisecond:
    tags carry whole seconds, and a race's two decisions fall in the same one."""
    now = datetime.now(UTC)
    name = f"{DECISIONS}/{now:%Y%m%dT%H%M%S}.{now.microsecond // 1000:03d}Z-{commit[:10]}"
    git(project, "tag", "--annotate", "--message", text, name, commit)
    return name


def message(subject: str, details: dict) -> str:
    """A tag message: one line for `git tag -n`, then the details as one line of JSON."""
    return f"{subject}\n\n{json.dumps(details, default=str)}\n"


def push_tags(project: Path, remote: str, tags: list[str]) -> str | None:
    """Push the tags all or none (a tag that exists in remote is never overwritten); None, or git's refusal."""
    pushed = subprocess.run(["git", "push", "--atomic", "--quiet", remote, *(f"refs/tags/{tag}" for tag in tags)],
                            cwd=project, capture_output=True, text=True, check=False)
    return None if pushed.returncode == 0 else pushed.stderr.strip()


# --- git and dvc --------------------------------------------------------------------------------


def git(project: Path, *args: str) -> str:
    done = subprocess.run(["git", *args], cwd=project, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RegistryError(f"git {' '.join(args)} failed: {done.stderr.strip()}")
    return done.stdout


def git_show(project: Path, commit: str, path: str) -> str:
    return git(project, "show", f"{commit}:{path}")


def dvc(project: Path, *args: str) -> None:
    """DVC of this interpreter's environment (a worker may run without the virtual environment activated)."""
    done = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=project, capture_output=True, text=True,
                          check=False)
    if done.returncode != 0:
        raise RegistryError(f"dvc {' '.join(args)} failed: {(done.stderr or done.stdout).strip()}")
