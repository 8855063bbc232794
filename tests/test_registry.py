"""The champion in DVC's model registry (flows/registry.py) on real git, GTO and DVC: a bare repository on disk is
the shared git remote `origin`, a bucket of a real S3 API server on 127.0.0.1 (tests/s3_server.py, moto) the DVC
remote, and the challengers are experiments of the real pipeline (`dvc exp run`, then `dvc exp push origin`) on the
tiny generated images of tests/test_flows.py.

The tests share one registry, as a team's workers do: the first run becomes the champion, two clones race to
replace it, then a worse run is turned down.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import pytest
from s3_server import add_remote, s3_server  # noqa: F401  (a fixture)
from test_flows import git, make_repo

from flows import registry
from stages.outputs import file_digest

# The tiny params' own recipe (2 epochs of the default preset's Muon) stays at chance on the tiny set, 1/3;
# AdamW for 6 epochs gets its 12 test images all right. Deterministic: one seed, one thread.
STRONG = ("train.optimizer=adam", "train.lr=0.01", "train.epochs=6")
WORSE = ("train.epochs=1",)


def stage_env() -> dict[str, str]:
    """`python` and `dvc` of this interpreter; one OpenMP thread, since spinning ones crawl on a busy machine."""
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
            "OMP_NUM_THREADS": "1"}


def run(command: list[str], cwd: Path) -> subprocess.CompletedProcess:
    done = subprocess.run(command, cwd=cwd, env=stage_env(), capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, f"{' '.join(command)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}"
    return done


@dataclass
class Lab:
    """Worker one's clone, where the experiments run, beside the bare `origin` that every clone shares."""

    repo: Path
    origin: Path
    images: Path  # the generated images the data set was made of
    storage: str  # the DVC remote's URL

    def experiment(self, name: str, *overrides: str, push: bool = True) -> registry.Challenger:
        """`dvc exp run` of the pipeline up to evaluate (what promotion reads: the model and its metrics; compress
        and report would only add time), then `dvc exp push origin` unless push is False; the challenger."""
        run(["dvc", "exp", "run", "evaluate", "--name", name, *(arg for item in overrides for arg in ("-S", item))],
            self.repo)
        if push:
            run(["dvc", "exp", "push", "origin", name], self.repo)
        meta = json.loads((self.repo / "data/prepared/meta.json").read_text())
        return registry.Challenger(registry.experiment_commit(self.repo, name), name, list(overrides),
                                   meta["data_sha256"], f"id-of-{name}", f"flow-run-{name}")

    def clone(self, folder: Path) -> Path:
        """A clone of origin, as another worker has one, the experiments' commits (refs/exps) fetched too."""
        git(folder.parent, "clone", "--quiet", str(self.origin), folder.name)
        git(folder, "config", "user.email", "worker@example.com")
        git(folder, "config", "user.name", folder.name)
        git(folder, "fetch", "--quiet", "origin", "refs/exps/*:refs/exps/*")
        return folder


@pytest.fixture(scope="module")
def s3(s3_server):  # noqa: F811  (the fixture imported above)
    """The S3 server, its credentials in this process's environment for the whole module: promotion checks the DVC
    remote from this process, and the processes the tests start inherit them."""
    environment = s3_server.environment()
    with pytest.MonkeyPatch.context() as patch:
        for key in set(os.environ) - set(environment):
            patch.delenv(key)
        for key, value in environment.items():
            patch.setenv(key, value)
        yield s3_server


@pytest.fixture(scope="module")
def lab(s3, tmp_path_factory) -> Lab:
    workdir = tmp_path_factory.mktemp("registry")
    repo = make_repo(workdir)
    origin = workdir / "origin.git"
    git(workdir, "init", "--quiet", "--bare", "--initial-branch", "main", str(origin))
    # In the committed .dvc/config (the credentials stay in the environment), so that clones and
    # `dvc artifacts get` find it.
    storage = add_remote(repo, s3, s3.create_bucket("registry"), env=stage_env())
    git(repo, "commit", "--quiet", "--all", "--message", "DVC remote")
    git(repo, "remote", "add", "origin", str(origin))
    git(repo, "push", "--quiet", "origin", "main")
    return Lab(repo, origin, workdir / "images", storage)


@pytest.fixture(scope="module")
def first(lab) -> tuple[registry.Challenger, registry.Outcome]:
    """The first run, its accuracy at chance: no champion is registered yet."""
    challenger = lab.experiment("first")
    return challenger, registry.promote_if_better(lab.repo, challenger)


# Promotes the challenger given as JSON in the clone given, printing the outcome as JSON: one worker.
RACER = """
import json, sys
from pathlib import Path
from flows import registry
outcome = registry.promote_if_better(Path(sys.argv[1]), registry.Challenger(**json.loads(sys.argv[2])))
print(json.dumps({"version": outcome.version, "reason": outcome.reason, "attempts": outcome.attempts}))
"""

# git's pre-push hook: each worker, having decided and tagged, waits here until the other has too (up to 60 s).
BARRIER_HOOK = """#!/bin/sh
touch "{barrier}/{worker}"
for attempt in $(seq 600); do
    [ "$(ls "{barrier}" | wc -l)" -ge 2 ] && exit 0
    sleep 0.1
done
"""


@dataclass
class Race:
    challengers: dict[str, registry.Challenger]  # by worker
    outcomes: dict[str, dict]  # by worker: the version it registered, the reason, its attempts
    clones: Path  # a folder per worker, its clone
    first: registry.Challenger  # the champion they raced to replace


@pytest.fixture(scope="module")
def race(lab, first, tmp_path_factory) -> Race:
    """Two workers, each in its own clone with an experiment that beats the first run, promote at once: both
    decide against the same champion before either pushes."""
    challengers = {"worker-a": lab.experiment("strong-a", *STRONG),
                   "worker-b": lab.experiment("strong-b", *STRONG, "evaluate.batch_size=32")}
    workdir, barrier = tmp_path_factory.mktemp("race"), tmp_path_factory.mktemp("barrier")
    racers = {}
    for worker, challenger in challengers.items():
        clone = lab.clone(workdir / worker)
        hook = clone / ".git/hooks/pre-push"
        hook.write_text(BARRIER_HOOK.format(barrier=barrier, worker=worker))
        hook.chmod(0o755)
        racers[worker] = subprocess.Popen([sys.executable, "-c", RACER, str(clone), json.dumps(asdict(challenger))],
                                          cwd=clone, env=stage_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                          text=True)
    outcomes = {}
    for worker, racer in racers.items():
        out, err = racer.communicate(timeout=120)
        assert racer.returncode == 0, err
        outcomes[worker] = json.loads(out)
    return Race(challengers, outcomes, workdir, first[0])


def accuracy_of(lab: Lab, challenger: registry.Challenger) -> str:
    """The challenger's accuracy as the decisions write it."""
    return f"{json.loads(git(lab.repo, 'show', f'{challenger.commit}:reports/metrics.json'))['accuracy']:.4f}"


def remote_tags(lab: Lab) -> list[str]:
    listed = git(lab.repo, "ls-remote", "--tags", "--refs", "origin").splitlines()
    return sorted(line.split("\trefs/tags/")[1] for line in listed)


def decisions_in(clone: Path) -> list[str]:
    """The decisions' subject lines, oldest first, as `git tag -n1` lists them (by name, which is by time)."""
    listed = git(clone, "for-each-ref", "--format=%(contents:subject)", f"refs/tags/{registry.DECISIONS}")
    return listed.splitlines()


def tag_message(clone: Path, tag: str) -> tuple[str, dict]:
    """A registry tag's subject line and its details."""
    subject, _, details = git(clone, "tag", "--list", "--format=%(contents)", tag).partition("\n\n")
    return subject, json.loads(details)


def prod_in(clone: Path) -> str:
    """The version in prod, as `gto show` in that clone says."""
    shown = json.loads(run(["gto", "show", "--json"], clone).stdout)
    return shown[registry.ARTIFACT]["stage"][registry.STAGE]


def test_the_first_run_is_registered_and_assigned_prod_with_its_provenance(lab, first, tmp_path):
    challenger, outcome = first
    assert outcome.decision.promote and outcome.version == "v0.0.1" and outcome.champion is None
    assert remote_tags(lab) == sorted([outcome.record, "image-classifier#prod#1", "image-classifier@v0.0.1"])

    other = lab.clone(tmp_path / "other")
    assert prod_in(other) == "v0.0.1"
    assert git(other, "rev-list", "-n", "1", "image-classifier@v0.0.1").strip() == challenger.commit
    subject, details = tag_message(other, "image-classifier@v0.0.1")
    assert subject == (f"image-classifier: registered as the champion: no champion yet: this run's accuracy "
                       f"{accuracy_of(lab, challenger)} becomes the first")
    assert {key: details[key] for key in ("commit", "experiment", "data_sha256", "flow_run_id", "flow_run_name")} == {
        "commit": challenger.commit, "experiment": "first", "data_sha256": challenger.data_sha256,
        "flow_run_id": "id-of-first", "flow_run_name": "flow-run-first"}
    assert tag_message(other, "image-classifier#prod#1")[1]["version"] == "v0.0.1"
    assert decisions_in(other) == [f"first: promoted as v0.0.1: {outcome.reason}"]


def test_anyone_gets_the_champion_with_dvc_artifacts_get_and_predict_classifies_with_it(lab, first, tmp_path):
    challenger, _ = first
    anywhere = tmp_path / "anywhere"
    anywhere.mkdir()
    run(["dvc", "artifacts", "get", lab.origin.as_uri(), "image-classifier", "--stage", "prod", "-o", "model.pt"],
        anywhere)
    assert sorted(path.name for path in anywhere.iterdir()) == ["model.pt"]
    _path, md5 = registry.artifact_hash_at(lab.repo, challenger.commit)
    assert file_digest(anywhere / "model.pt", "md5") == md5

    images = lab.images / "train/circle"
    shown = run([sys.executable, "-m", "stages.predict", str(images), "--model", "model.pt", "--format", "json"],
                anywhere)
    predictions = json.loads(shown.stdout)["predictions"]
    assert len(predictions) == len(list(images.iterdir()))
    assert {guess["class"] for image in predictions for guess in image["predictions"]} == {"circle", "square",
                                                                                            "stripes"}


def test_a_clone_caches_the_registered_champion_for_predict(lab, first, tmp_path):
    challenger, _ = first
    clone = lab.clone(tmp_path / "clone")
    assert registry.refresh_champion_cache(clone).version == "v0.0.1"
    cached = clone / "models/champion"
    assert file_digest(cached / "model.pt", "md5") == registry.artifact_hash_at(clone, challenger.commit)[1]
    assert json.loads((cached / "metrics.json").read_text()) == json.loads(
        git(clone, "show", f"{challenger.commit}:reports/metrics.json"))
    assert json.loads((cached / "provenance.json").read_text())["version"] == "v0.0.1"
    assert git(clone, "status", "--porcelain") == ""  # the cache ignores itself

    shown = run([sys.executable, "-m", "stages.predict", str(lab.images / "train/square"), "--format", "csv"], clone)
    assert "classifying 16 file(s) with models/champion/model.pt" in shown.stderr


def test_a_model_missing_from_the_dvc_remote_is_refused_and_nothing_is_tagged(lab, first):
    unpushed = lab.experiment("unpushed", "train.epochs=3", push=False)
    tags_before, local_before = remote_tags(lab), git(lab.repo, "tag", "--list")
    # A margin of -1: any run would be promoted, so the refusal can only be the missing model's.
    with pytest.raises(registry.ModelNotInRemote) as refused:
        registry.promote_if_better(lab.repo, unpushed, margin=-1.0)
    _path, md5 = registry.artifact_hash_at(lab.repo, unpushed.commit)
    assert str(refused.value) == (
        f"image-classifier (models/model.pt of commit {unpushed.commit[:10]}, md5 {md5}) is not in the DVC remote "
        f"'storage' ({lab.storage}): push it first (`dvc exp push origin <experiment>`, or "
        "`dvc push`) so that `dvc artifacts get` finds it; nothing was registered")
    assert remote_tags(lab) == tags_before
    assert git(lab.repo, "tag", "--list") == local_before


def test_two_clones_promoting_at_once_make_one_champion_and_the_loser_decides_again(lab, race, tmp_path):
    outcomes = race.outcomes
    (winner,) = [worker for worker, outcome in outcomes.items() if outcome["version"]]
    (loser,) = set(outcomes) - {winner}
    strong, weak = accuracy_of(lab, race.challengers[winner]), accuracy_of(lab, race.first)
    assert accuracy_of(lab, race.challengers[loser]) == strong == "1.0000"
    assert outcomes[winner] == {"version": "v0.0.2", "attempts": 1,
                                "reason": f"accuracy {strong} beats the champion's {weak} by more than 0"}
    assert outcomes[loser] == {"version": None, "attempts": 2, "reason": (
        f"accuracy {strong} does not beat the champion's {strong} by more than 0: the champion stays (decided again: "
        "v0.0.2 was registered by another run while this one was deciding)")}

    versions = [tag for tag in remote_tags(lab) if not tag.startswith(registry.DECISIONS)]
    assert versions == ["image-classifier#prod#1", "image-classifier#prod#2", "image-classifier@v0.0.1",
                        "image-classifier@v0.0.2"]
    other = lab.clone(tmp_path / "other")
    assert prod_in(other) == "v0.0.2"
    assert git(other, "rev-list", "-n", "1", "image-classifier@v0.0.2").strip() == race.challengers[winner].commit
    experiment = {worker: challenger.experiment for worker, challenger in race.challengers.items()}
    assert decisions_in(other)[1:] == [
        f"{experiment[winner]}: promoted as v0.0.2: {outcomes[winner]['reason']}",
        f"{experiment[loser]}: not promoted, v0.0.2 stays: {outcomes[loser]['reason']}"]
    # The loser deleted the tags it could not push: its clone's registry is origin's.
    assert git(race.clones / loser, "tag", "--list") == git(other, "tag", "--list")


def test_a_worse_run_is_not_promoted_and_the_history_says_so(lab, race, tmp_path):
    worse = lab.experiment("worse", *WORSE)
    outcome = registry.promote_if_better(lab.repo, worse)
    assert not outcome.decision.promote and outcome.version is None and outcome.champion.version == "v0.0.2"
    assert outcome.reason == (f"accuracy {accuracy_of(lab, worse)} does not beat the champion's 1.0000 by more "
                              "than 0: the champion stays")

    other = lab.clone(tmp_path / "other")
    assert prod_in(other) == "v0.0.2"
    assert decisions_in(other)[-1] == f"worse: not promoted, v0.0.2 stays: {outcome.reason}"
    _subject, details = tag_message(other, outcome.record)
    assert details | {"commit": worse.commit, "decision": "not promoted", "champion": "v0.0.2", "version": None,
                      "overrides": ["train.epochs=1"]} == details
