"""Files from untrusted sources: a model file that would run code when unpickled, images of 100-200
megapixels, archive members that expand a thousandfold. Each is refused in one line naming the file and
what to change; the payload never runs, nothing is decoded or read whole, and nothing changes beyond
the project's data folders."""

from __future__ import annotations

import io
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest
import torch
from PIL import Image

from bench.processes import stage_command
from conftest import Project, stage_environment
from datamaker import make_image_folder, make_tar_gz

MB = 1_000_000


class WouldCreateAFile:
    """Unpickled, this opens (so creates) the file `marker`: code a model file must never get to run."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def malicious_checkpoint(path: Path, marker: Path) -> Path:
    """A .pt file shaped like a checkpoint of this pipeline, its weights replaced by the payload."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"architecture": "convnet", "classes": ["a", "b"], "state_dict": WouldCreateAFile(marker)}, path)
    return path


def snapshot(root: Path, outside: tuple[str, ...] = ()) -> dict[str, tuple[int, int]]:
    """Every file under root but those in the `outside` folders: its size and modification time."""
    return {path.relative_to(root).as_posix(): (path.stat().st_size, path.stat().st_mtime_ns)
            for path in root.rglob("*") if path.is_file()
            and not path.relative_to(root).as_posix().startswith(outside)}


def photo(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (40, 30), (200, 40, 40)).save(path)
    return path


def huge_png(path: Path, width: int, height: int) -> Path:
    """A bilevel PNG of width x height pixels: kilobytes on disk, hundreds of megabytes decoded."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("1", (width, height)).save(path)
    return path


# --- a model file that runs code when unpickled ----------------------------------------------


def test_the_payload_is_real_it_creates_its_file_when_unpickled_without_weights_only(tmp_path):
    checkpoint = malicious_checkpoint(tmp_path / "payload.pt", tmp_path / "created")
    code = f"import torch; torch.load({str(checkpoint)!r}, weights_only=False)"
    subprocess.run([sys.executable, "-c", code], env=stage_environment(), capture_output=True, timeout=120)
    assert (tmp_path / "created").exists()


def test_predict_refuses_a_model_file_that_would_run_code_naming_it(tmp_path):
    marker = tmp_path / "payload-ran"
    checkpoint = malicious_checkpoint(tmp_path / "downloads" / "model.pt", marker)
    image = photo(tmp_path / "photo.png")
    before = snapshot(tmp_path)

    result = Project(tmp_path).run("stages.predict", str(image), "--model", str(checkpoint))

    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.strip() == (f"error: {checkpoint} is not a model checkpoint this pipeline can load (it would "
                                     "run io.open when unpickled; nothing of it was run); give a models/model.pt that "
                                     "stage train wrote")
    assert not marker.exists()
    assert snapshot(tmp_path) == before


def test_a_champion_that_would_run_code_is_refused_by_predict(tmp_path):
    marker = tmp_path / "payload-ran"
    malicious_checkpoint(tmp_path / "models" / "champion" / "model.pt", marker)
    image = photo(tmp_path / "photo.png")

    result = Project(tmp_path).run("stages.predict", str(image))

    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith("error: models/champion/model.pt is not a model checkpoint")
    assert "nothing of it was run" in result.stderr
    assert not marker.exists()


def test_train_refuses_weights_that_would_run_code(augmented_project, tmp_path):
    marker = tmp_path / "payload-ran"
    weights = malicious_checkpoint(tmp_path / "weights.pt", marker)
    project = augmented_project.copy(tmp_path / "project", "data")
    project.write_params({"data.image_size": 16, "train.weights": str(weights), "train.widths": [8, 16, 16],
                          "train.epochs": 1, "train.device": "cpu"})
    before = snapshot(project.root, outside=("data/",))

    result = project.train()

    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert f"error: train.weights: {weights} is not a PyTorch weights file (it would run io.open" in result.stderr
    assert not marker.exists()
    assert snapshot(project.root, outside=("data/",)) == before  # no model, no reports


# --- images of too many pixels ---------------------------------------------------------------


@pytest.mark.parametrize(("width", "height"), [(10_000, 10_000), (13_380, 13_380), (14_200, 14_200)],
                         ids=["100-MP", "179-MP", "202-MP"])
def test_an_image_over_the_pixel_limit_stops_download_naming_it_and_the_key(project, width, height):
    images = make_image_folder(project.root / "images", per_class=3, test_per_class=1, size=(8, 8))
    huge = huge_png(images / "train" / "cat" / "huge.png", width, height)
    project.write_params({"data.source": "images"})
    before = snapshot(project.root)

    result = project.download()

    assert result.returncode == 1 and "Traceback" not in result.stderr
    (message,) = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert message.startswith(f"error: {images}: train/cat/huge.png: ")
    assert f"{width * height:,} pixels, over the 90,000,000 that data.max_image_pixels allows" in message
    assert message.endswith("fix or remove the file, or set data.on_bad_image: skip")
    assert snapshot(project.root) == before  # no data/prepared, no reports, the source as it was
    assert huge.exists()


def test_an_image_over_the_pixel_limit_is_skipped_with_on_bad_image_skip(project):
    images = make_image_folder(project.root / "images", per_class=3, test_per_class=1, size=(8, 8))
    huge_png(images / "train" / "dog" / "huge.png", 10_000, 10_000)
    project.write_params({"data.source": "images", "data.on_bad_image": "skip"})

    result = project.download()

    assert result.returncode == 0, result.stderr
    assert "train/dog/huge.png: 10000 × 10000 = 100,000,000 pixels, over the 90,000,000" in result.stderr
    assert (project.root / "data/prepared/meta.json").read_text().count("train/dog/huge.png") == 1


def test_the_pixel_limit_is_a_param_raised_at_will(project):
    images = make_image_folder(project.root / "images", per_class=3, test_per_class=1, size=(8, 8))
    huge_png(images / "train" / "cat" / "wide.png", 3_000, 40)
    project.write_params({"data.source": "images", "data.max_image_pixels": 100_000})
    assert project.download().returncode == 1
    project.write_params({"data.source": "images", "data.max_image_pixels": 200_000})
    assert project.download().returncode == 0


def test_predict_refuses_an_image_over_the_pixel_limit_and_classifies_the_others(trained_project, tmp_path):
    huge = huge_png(tmp_path / "huge.png", 10_000, 10_000)
    fine = photo(tmp_path / "fine.png")

    result = trained_project.run("stages.predict", str(huge), str(fine), "--format", "csv",
                                 "--model", str(trained_project.model), cwd=tmp_path)  # no params.yaml here

    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert f"{fine}," in result.stdout and f"{huge}," not in result.stdout
    assert (f"{huge}: 10000 × 10000 = 100,000,000 pixels, over the {Image.MAX_IMAGE_PIXELS:,} that "
            "--max-image-pixels allows") in result.stderr


# --- archive members that expand a thousandfold -------------------------------------------------


class Zeros(io.RawIOBase):
    """`size` zero bytes, made as they are read: a member's content that compresses about 1000 to 1."""

    def __init__(self, size: int):
        self.left = size

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        count = min(len(buffer), self.left)
        buffer[:count] = bytes(count)
        self.left -= count
        return count


BOMB_BYTES = 256 * 2**20


def tar_bomb(images: Path, archive: Path) -> Path:
    make_tar_gz(images, archive)
    with tarfile.open(archive, "r:gz") as original:
        members = [(member, original.extractfile(member).read() if member.isfile() else None)
                   for member in original.getmembers()]
    with tarfile.open(archive, "w:gz") as tar:
        for member, content in members:
            tar.addfile(member, io.BytesIO(content) if content is not None else None)
        bomb = tarfile.TarInfo("train/cat/bomb.png")
        bomb.size = BOMB_BYTES
        tar.addfile(bomb, Zeros(BOMB_BYTES))
    return archive


def zip_bomb(images: Path, archive: Path) -> Path:
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zipped:
        for path in sorted(images.rglob("*")):
            if path.is_file():
                zipped.write(path, path.relative_to(images).as_posix())
        with zipped.open("train/cat/bomb.png", "w", force_zip64=True) as bomb:
            for _ in range(BOMB_BYTES // 2**20):
                bomb.write(bytes(2**20))
    return archive


# The stage runs as the child of a small Python process: a child forked from pytest itself would count
# pytest's own memory in its peak (ru_maxrss spans the process's life before exec too).
MEASURED = """
import resource, subprocess, sys
result = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
sys.stderr.write(result.stderr)
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)
sys.exit(result.returncode)
"""


def run_measuring_memory(project: Project, command: list[str]) -> tuple[subprocess.CompletedProcess, int]:
    """The command run in the project, and its peak resident memory in bytes."""
    _python, *args = command
    result = subprocess.run([sys.executable, "-c", MEASURED, sys.executable, *args], cwd=project.root,
                            env=stage_environment(), capture_output=True, text=True, timeout=120)
    return result, int(result.stdout.split()[-1])


@pytest.mark.parametrize("make_bomb", [tar_bomb, zip_bomb], ids=["tar.gz", "zip"])
def test_an_archive_member_expanding_a_thousandfold_is_refused_without_being_read(project, make_bomb):
    images = make_image_folder(project.root / "images", per_class=3, test_per_class=1, size=(8, 8))
    archive = make_bomb(images, project.root / f"images.{make_bomb.__name__[:3]}")
    assert archive.stat().st_size * 500 < BOMB_BYTES  # it does expand about a thousandfold
    project.write_params({"data.source": archive.name, "data.max_member_bytes": 100 * MB})
    before = snapshot(project.root)

    result, peak_bytes = run_measuring_memory(project, stage_command("download"))
    _, imports_bytes = run_measuring_memory(project, ["python", "-c", "import stages.download"])

    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.splitlines()[-1] == (
        f"error: {archive}: member 'train/cat/bomb.png' is {BOMB_BYTES:,} bytes, over data.max_member_bytes "
        "(100,000,000): refused without reading it whole (an image that large is rare, an archive bomb is not); "
        "raise data.max_member_bytes if it is an image")
    assert peak_bytes - imports_bytes < BOMB_BYTES / 2  # the member never was in memory
    assert snapshot(project.root) == before
