"""`python -m stages.predict` on a person's own files, with a model trained on tiny data."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from conftest import TINY_CLASSES, Project


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """A folder of odd images (RGBA PNG, grayscale JPEG, a large palette GIF) and one broken file."""
    folder = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (30, 50, 4), dtype=np.uint8), "RGBA").save(folder / "rgba.png")
    Image.fromarray(rng.integers(0, 255, (64, 40), dtype=np.uint8), "L").save(folder / "gray.jpg")
    Image.fromarray(rng.integers(0, 255, (300, 200, 3), dtype=np.uint8)).convert("P").save(folder / "large.gif")
    (folder / "broken.jpg").write_bytes(b"not an image at all")
    return folder


def predict(project: Project, *args: str):
    return project.run("stages.predict", *args)


def test_every_readable_image_is_classified_and_the_broken_one_named(trained_project, photos):
    result = predict(trained_project, str(photos), "--format", "json", "--top-k", "2")

    assert result.returncode == 1
    output = json.loads(result.stdout)
    classified = {entry["file"]: entry["predictions"] for entry in output["predictions"]}
    assert sorted(classified) == sorted(str(photos / name) for name in ("gray.jpg", "large.gif", "rgba.png"))
    for guesses in classified.values():
        assert len(guesses) == 2 and {guess["class"] for guess in guesses} <= set(TINY_CLASSES)
        assert guesses[0]["probability"] >= guesses[1]["probability"]
    assert output["failed"][0]["file"] == str(photos / "broken.jpg")
    assert f"{photos / 'broken.jpg'}: cannot be decoded as an image (not a format Pillow reads" in result.stderr


def test_readable_files_only_exit_zero_with_a_table_and_csv(trained_project, photos):
    files = [str(photos / "gray.jpg"), str(photos / "rgba.png")]

    table = predict(trained_project, *files)
    csv = predict(trained_project, *files, "--format", "csv", "--top-k", "3")

    assert table.returncode == 0, table.stderr
    assert "top 1" in table.stdout and "gray.jpg" in table.stdout
    assert csv.returncode == 0, csv.stderr
    lines = csv.stdout.splitlines()
    assert lines[0] == "file,rank,class,probability" and len(lines) == 1 + 2 * 3


def test_a_missing_file_is_reported_and_the_rest_classified(trained_project, photos):
    result = predict(trained_project, str(photos / "gray.jpg"), str(photos / "no-such.png"))

    assert result.returncode == 1
    assert "gray.jpg" in result.stdout
    assert "no-such.png" in result.stderr


def test_the_champion_is_used_when_there_is_one(trained_project, photos, tmp_path):
    project = trained_project.copy(tmp_path / "with-champion", "models")
    (project.root / "models" / "champion").mkdir()
    shutil.move(project.model, project.root / "models" / "champion" / "model.pt")

    result = predict(project, str(photos / "gray.jpg"))

    assert result.returncode == 0, result.stderr
    assert "with models/champion/model.pt" in result.stderr


def test_without_any_model_it_says_how_to_get_one(tmp_path, photos):
    result = Project(tmp_path).run("stages.predict", str(photos))

    assert result.returncode == 1
    assert "no model found: run `dvc repro` first" in result.stderr
    assert "Traceback" not in result.stderr


def test_explain_writes_the_image_beside_its_heat_map_for_each_classified_file(trained_project, photos, tmp_path):
    out = tmp_path / "explained"
    second_gray = tmp_path / "elsewhere" / "gray.png"  # the same stem as gray.jpg: named apart
    second_gray.parent.mkdir()
    shutil.copy(photos / "rgba.png", second_gray)

    result = predict(trained_project, str(photos), str(second_gray), "--explain", str(out))

    assert result.returncode == 1  # broken.jpg
    assert sorted(path.name for path in out.iterdir()) == ["gray-2.png", "gray.png", "large.png", "rgba.png"]
    for path in out.iterdir():
        with Image.open(path) as overlay:
            assert overlay.format == "PNG" and overlay.width > 2 * overlay.height * 0.8  # two squares side by side
    assert "wrote 4 explanation(s)" in result.stderr

