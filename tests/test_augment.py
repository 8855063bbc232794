"""The augment stage, run as DVC runs it on a tiny prepared set: offline copies made with a
torchvision policy, the same bytes for the same params, and a preview of what train sees."""

from __future__ import annotations

import json
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import AUGMENTED_PARAMS, TINY_PARAMS, Project, finished
from stages.augment import PREVIEW_SCALE, build_policy, write_copies
from stages.datasets import PreparedWriter, load_meta, load_split

PREVIEW_ROWS = 4  # the originals, then three draws of policy, flip and crop


# augment run again on augmented_project's prepared set with other params: each in its own
# folder, all at once, since they are independent and spend most of their time importing torch.
RERUNS = {
    "no-copies": {"augment.copies": 0, "augment.policy": "none"},
    "same-params": {},
    "seed-1": {"seed": 1},
}


@pytest.fixture(scope="module")
def reruns(augmented_project, tmp_path_factory) -> dict[str, tuple[Project, subprocess.CompletedProcess]]:
    root = tmp_path_factory.mktemp("reruns")

    def augment_again(name: str) -> tuple[Project, subprocess.CompletedProcess]:
        project = augmented_project.copy(root / name, "data/prepared")
        project.write_params({**AUGMENTED_PARAMS, **RERUNS[name]})
        return project, project.augment()

    with ThreadPoolExecutor(len(RERUNS)) as pool:
        return dict(zip(RERUNS, pool.map(augment_again, RERUNS)))


def copies_of(project: Project) -> tuple[np.ndarray, np.ndarray]:
    """The augmented images and labels, read into memory."""
    copies = load_split(project.augmented, "copies")
    return np.array(copies.images), copies.labels


def files_under(folder: Path) -> dict[str, bytes]:
    """Every file under folder by its relative name, with its bytes."""
    return {path.relative_to(folder).as_posix(): path.read_bytes() for path in folder.rglob("*") if path.is_file()}


def test_copies_0_write_only_meta_json_and_still_the_preview_and_the_stats(reruns):
    project = finished(reruns, "no-copies")

    assert sorted(files_under(project.augmented)) == ["meta.json"]
    meta = load_meta(project.augmented)
    assert (meta["copies"], meta["count"], meta["counts"]) == (0, 0, {})
    assert Image.open(project.reports / "augment_preview.png").format == "PNG"
    stats = json.loads((project.reports / "augment.json").read_text())
    assert stats["augmented_images"] == 0


def test_two_trivialaugment_copies_are_2n_images_of_the_prepared_shape_with_labels_tiled_in_order(augmented_project):
    train = load_split(augmented_project.prepared, "train")
    images, labels = copies_of(augmented_project)

    assert images.shape == (2 * len(train.labels), 16, 16, 3)
    assert images.dtype == np.uint8
    assert labels.dtype == np.int64
    assert labels.tolist() == train.labels.tolist() * 2
    first, second = images[: len(train.labels)], images[len(train.labels) :]
    assert (first != np.array(train.images)).any(axis=(1, 2, 3)).mean() > 0.5, "most copies differ from the originals"
    assert (first != second).any(axis=(1, 2, 3)).mean() > 0.5, "the two copies of an image differ"
    assert load_meta(augmented_project.augmented)["count"] == 2 * len(train.labels)
    stats = json.loads((augmented_project.reports / "augment.json").read_text())
    assert stats["augmented_images"] == 60


# The other policies through the stage's own functions, in this process: a stage run each
# would spend seconds importing torchvision to make 30 images.
@pytest.mark.parametrize("policy", ["randaugment", "autoaugment", "augmix"])
def test_each_policy_writes_one_changed_copy_of_every_image(augmented_project, tmp_path, policy):
    train = load_split(augmented_project.prepared, "train")

    with PreparedWriter(tmp_path / "augmented") as writer:
        count = write_copies(writer, train, build_policy(policy), copies=1, seed=0)
        writer.commit({"count": count})

    copies = load_split(tmp_path / "augmented", "copies")
    assert count == len(train.labels)
    assert (copies.images.shape, copies.images.dtype) == (train.images.shape, np.uint8)
    assert copies.labels.tolist() == train.labels.tolist()
    assert (np.array(copies.images) != train.images).any(axis=(1, 2, 3)).mean() > 0.5, "most copies differ"


def test_the_same_params_give_byte_identical_copies_preview_and_stats(augmented_project, reruns):
    again = finished(reruns, "same-params")

    assert files_under(again.augmented) == files_under(augmented_project.augmented)
    preview = "augment_preview.png"
    assert (again.reports / preview).read_bytes() == (augmented_project.reports / preview).read_bytes()
    # augment.json too, but for its timing
    stats, first_stats = (json.loads((p.reports / "augment.json").read_text()) for p in (again, augmented_project))
    assert stats.pop("augment_seconds") >= 0 and first_stats.pop("augment_seconds") >= 0
    assert stats == first_stats


def test_another_seed_gives_different_copies_of_the_same_images(augmented_project, reruns):
    reseeded = finished(reruns, "seed-1")

    images, labels = copies_of(reseeded)
    first_images, first_labels = copies_of(augmented_project)
    assert labels.tolist() == first_labels.tolist()
    assert (images != first_images).any(axis=(1, 2, 3)).mean() > 0.5


def test_the_preview_is_a_grid_of_the_originals_and_three_augmented_rows(augmented_project):
    preview = Image.open(augmented_project.reports / "augment_preview.png")

    columns = TINY_PARAMS["augment.preview_images"]
    cell = TINY_PARAMS["data.image_size"] + 2  # make_grid's padding
    assert preview.format == "PNG" and preview.mode == "RGB"
    assert preview.size == (PREVIEW_SCALE * (columns * cell + 2), PREVIEW_SCALE * (PREVIEW_ROWS * cell + 2))
