"""The download stage: every kind of source gives the same prepared arrays, and every bad input
is refused with one message naming the thing at fault, leaving nothing at data/prepared."""

from __future__ import annotations

import gzip
import hashlib
import http.server
import io
import json
import shutil
import stat
import tarfile
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from datamaker import (
    ALL_FORMATS,
    CifarContent,
    class_colour,
    image_bytes,
    make_cifar_archive,
    make_image_folder,
    make_tar_gz,
    make_zip,
    write_tar_members,
    write_zip_members,
)
from bench.processes import stage_command
from stages.cifar import OFFICIAL
from stages.datasets import load_meta, load_split
from stages.download import project_root, resolve_local
from stages.errors import StageError


def prepared_arrays(prepared: Path) -> dict[str, np.ndarray]:
    """Every array of a prepared folder, read into memory (the next run replaces the files)."""
    return {
        f"{split}_{kind}": np.array(getattr(load_split(prepared, split), kind))
        for split in ("train", "test")
        for kind in ("images", "labels")
    }


def assert_refused(result, *expected: str) -> str:
    """The stage failed with exit status 1 and one message holding every expected part."""
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr
    for part in expected:
        assert part in errors[0], f"{part!r} not in {errors[0]!r}"
    return errors[0]


def assert_nothing_prepared(project) -> None:
    """No data/prepared, no temporary folder beside it, no report: files only in data/raw/."""
    assert not project.prepared.exists()
    assert [name for name in project.files_written() if not name.startswith("data/raw/")] == []


# --- sources that work ----------------------------------------------------------------------


def test_a_folder_a_wrapped_tar_gz_and_a_zip_give_the_same_prepared_arrays(project, tmp_path):
    folder = make_image_folder(tmp_path / "flowers", classes=("cat", "dog", "owl"), per_class=4, size=(20, 16))
    sources = {
        "folder": folder,
        "tar.gz wrapped in one folder": make_tar_gz(folder, tmp_path / "flowers.tar.gz", wrap="flowers"),
        "zip": make_zip(folder, tmp_path / "flowers.zip"),
    }

    prepared = {}
    for kind, source in sources.items():
        project.write_params({"data.source": str(source)})
        result = project.download()
        assert result.returncode == 0, result.stderr
        prepared[kind] = (prepared_arrays(project.prepared), load_meta(project.prepared))

    arrays, meta = prepared["folder"]
    assert meta["classes"] == ["cat", "dog", "owl"]
    assert meta["counts"] == {"train": 12, "test": 6}
    assert arrays["train_labels"].tolist() == [0] * 4 + [1] * 4 + [2] * 4
    for kind, (other_arrays, other_meta) in prepared.items():
        assert other_meta["data_sha256"] == meta["data_sha256"], kind
        for name, array in arrays.items():
            np.testing.assert_array_equal(other_arrays[name], array, err_msg=f"{kind}: {name}")


def test_an_archive_without_folder_members_is_read(project, tmp_path):
    folder = make_image_folder(tmp_path / "flowers", per_class=3, size=(8, 8))
    archive = make_zip(folder, tmp_path / "flowers.zip", wrap="flowers", folder_entries=False)
    project.write_params({"data.source": str(archive)})

    result = project.download()

    assert result.returncode == 0, result.stderr
    assert load_meta(project.prepared)["counts"] == {"train": 6, "test": 4}


def test_prepared_arrays_memory_map_and_the_counts_are_reported(project, tmp_path):
    make_image_folder(project.root / "images", per_class=3, size=(8, 8))
    project.write_params({"data.source": "images"})

    result = project.download()

    assert result.returncode == 0, result.stderr
    images = np.load(project.prepared / "train_images.npy", mmap_mode="r")
    assert isinstance(images, np.memmap)
    assert (images.shape, images.dtype) == ((6, 32, 32, 3), np.uint8)
    assert np.load(project.prepared / "test_labels.npy").dtype == np.int64
    stats = json.loads(project.stats.read_text())
    assert {key: stats[key] for key in ("train_images", "test_images", "skipped_images")} == {
        "train_images": 6,
        "test_images": 4,
        "skipped_images": 0,
    }


def test_without_a_test_folder_a_stratified_split_is_made_from_test_fraction_and_seed(project, tmp_path):
    folder = tmp_path / "animals"
    make_image_folder(folder, classes=("bird", "cat"), per_class=10, split_test=False, size=(8, 8))
    make_image_folder(folder, classes=("dog",), per_class=2, split_test=False, size=(8, 8), seed=1)

    def prepare_with(seed: int) -> tuple[dict, dict]:
        project.write_params({"data.source": str(folder), "data.test_fraction": 0.2, "seed": seed})
        result = project.download()
        assert result.returncode == 0, result.stderr
        return prepared_arrays(project.prepared), load_meta(project.prepared)

    arrays, meta = prepare_with(seed=0)
    again, _ = prepare_with(seed=0)
    other_seed, _ = prepare_with(seed=1)

    assert meta["made_test_split"] is True
    # 20 % of 10 is 2; 20 % of 2 rounds to 0, yet a class of two still puts one in test.
    assert np.bincount(arrays["test_labels"]).tolist() == [2, 2, 1]
    assert np.bincount(arrays["train_labels"]).tolist() == [8, 8, 1]
    for name in arrays:
        np.testing.assert_array_equal(again[name], arrays[name])
    assert not np.array_equal(other_seed["test_images"], arrays["test_images"])


def test_images_of_mixed_formats_and_sizes_are_decoded_to_rgb_squares(project, tmp_path):
    # Seven formats over seven images per class: image i of a class is in ALL_FORMATS[i].
    sizes = [(40, 30), (17, 23), (8, 8), (33, 40), (12, 9)]
    make_image_folder(tmp_path / "mixed", per_class=len(ALL_FORMATS), test_per_class=1, size=sizes, formats=ALL_FORMATS)
    project.write_params({"data.source": str(tmp_path / "mixed"), "data.image_size": 16})

    result = project.download()

    assert result.returncode == 0, result.stderr
    train = load_split(project.prepared, "train")
    assert (train.images.shape, train.images.dtype) == ((2 * len(ALL_FORMATS), 16, 16, 3), np.uint8)
    for index, (image, label) in enumerate(zip(train.images, train.labels)):
        fmt = ALL_FORMATS[index % len(ALL_FORMATS)]
        if fmt == "gray_jpeg":
            assert (image[..., 0] == image[..., 1]).all() and (image[..., 1] == image[..., 2]).all(), fmt
        else:
            mean_colour = image.reshape(-1, 3).mean(axis=0)
            assert np.abs(mean_colour - class_colour(label)).max() < 25, (fmt, mean_colour)


@pytest.mark.parametrize(
    "kind, protocol",
    [("cifar10", None), ("cifar100", None), ("cifar10", 2), ("cifar10", 5)],
    ids=["cifar10", "cifar100", "cifar10-repickled-by-python3-protocol-2", "cifar10-repickled-protocol-5"],
)
def test_a_cifar_python_archive_given_as_a_path_is_read_exactly(project, tmp_path, kind, protocol):
    archive = tmp_path / "my-cifar.tar.gz"
    content = make_cifar_archive(archive, kind=kind, train_per_class=1, test_per_class=1, protocol=protocol)
    project.write_params({"data.source": str(archive)})

    result = project.download()

    assert result.returncode == 0, result.stderr
    train, test = load_split(project.prepared, "train"), load_split(project.prepared, "test")
    np.testing.assert_array_equal(train.images, CifarContent.images(content.train_rows))
    np.testing.assert_array_equal(test.images, CifarContent.images(content.test_rows))
    np.testing.assert_array_equal(train.labels, content.train_labels)
    np.testing.assert_array_equal(test.labels, content.test_labels)
    # A stored row is the red plane, then green, then blue, each 32 x 32 row-major.
    red, green, blue = content.train_rows[0].reshape(3, 1024)
    for channel, plane in enumerate((red, green, blue)):
        np.testing.assert_array_equal(train.images[0, :, :, channel].ravel(), plane)
    assert load_meta(project.prepared)["classes"] == content.classes


@pytest.mark.parametrize("source_kind", ["image folder", "cifar archive"])
def test_image_size_48_resizes_every_image(project, tmp_path, source_kind):
    if source_kind == "image folder":
        source = make_image_folder(tmp_path / "images", per_class=2, test_per_class=1, size=(40, 30))
        expected_counts = (4, 2)
    else:
        source = tmp_path / "cifar.tar.gz"
        make_cifar_archive(source, train_per_class=1, test_per_class=1)
        expected_counts = (10, 10)
    project.write_params({"data.source": str(source), "data.image_size": 48})

    result = project.download()

    assert result.returncode == 0, result.stderr
    for split, count in zip(("train", "test"), expected_counts):
        assert load_split(project.prepared, split).images.shape == (count, 48, 48, 3)
    assert load_meta(project.prepared)["image_size"] == 48


def test_a_url_source_is_downloaded_into_data_raw_once_and_reused(project, tmp_path, serve_folder):
    served = tmp_path / "served"
    served.mkdir()
    archive = make_tar_gz(make_image_folder(tmp_path / "flowers", per_class=3, size=(8, 8)), served / "flowers.tar.gz")
    base_url, server = serve_folder(served)
    project.write_params({"data.source": f"{base_url}/flowers.tar.gz"})

    first = project.download()
    server.shutdown()
    first_arrays = prepared_arrays(project.prepared)
    second = project.download()

    assert first.returncode == 0, first.stderr
    assert "downloading http://127.0.0.1" in first.stderr
    assert (project.raw / "flowers.tar.gz").read_bytes() == archive.read_bytes()
    assert sorted(path.name for path in project.raw.iterdir()) == ["flowers.tar.gz"]
    assert second.returncode == 0, second.stderr
    assert "downloaded before" in second.stderr
    for name, array in prepared_arrays(project.prepared).items():
        np.testing.assert_array_equal(array, first_arrays[name])


def test_a_url_the_server_refuses_is_reported_with_its_status_not_as_offline(project, tmp_path, serve_folder):
    served = tmp_path / "served"
    served.mkdir()
    base_url, _ = serve_folder(served)
    project.write_params({"data.source": f"{base_url}/missing.tar.gz"})

    result = project.download()

    assert result.returncode == 1
    assert f"could not download {base_url}/missing.tar.gz: the server answered 404" in result.stderr
    assert "offline" not in result.stderr
    assert not project.raw.exists() or not any(project.raw.iterdir())


def test_jpeg_orientation_from_exif_is_applied(project, tmp_path):
    # A 40x20 photo, red on the left and blue on the right, tagged "rotate 90° clockwise to view"
    # (EXIF orientation 6): upright, the red half is on top.
    pixels = np.zeros((20, 40, 3), dtype=np.uint8)
    pixels[:, :20] = (255, 0, 0)
    pixels[:, 20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    folder = make_image_folder(tmp_path / "photos", per_class=2, test_per_class=2, size=(8, 8))
    Image.fromarray(pixels).save(folder / "test" / "cat" / "phone.jpg", exif=exif, quality=95)
    project.write_params({"data.source": str(folder), "data.image_size": 16})

    result = project.download()

    assert result.returncode == 0, result.stderr
    photo = load_split(project.prepared, "test").images[2]  # cat's test images: 0.png, 1.png, phone.jpg
    top, bottom = photo[:4].reshape(-1, 3).mean(axis=0), photo[-4:].reshape(-1, 3).mean(axis=0)
    assert top[0] > 200 and top[2] < 60, top
    assert bottom[2] > 200 and bottom[0] < 60, bottom


class _DroppedConnection(http.server.BaseHTTPRequestHandler):
    """Promises 100 kB and closes the connection after 5 kB."""

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "100000")
        self.end_headers()
        self.wfile.write(b"\x1f\x8b" + b"\0" * 4998)
        self.close_connection = True

    def log_message(self, format: str, *args) -> None:
        pass


def test_an_interrupted_download_is_refused_and_leaves_nothing_in_data_raw(project):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _DroppedConnection)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/flowers.tar.gz"
    project.write_params({"data.source": url})
    try:
        result = project.download()
    finally:
        server.shutdown()
        server.server_close()

    assert_refused(result, url, "stopped after 5000 of 100000 bytes")
    assert list(project.raw.iterdir()) == []
    assert_nothing_prepared(project)


# --- where a relative source is -------------------------------------------------------------


def test_a_relative_source_resolves_against_the_project_root_inside_a_dvc_queue_copy(tmp_path, monkeypatch):
    root = tmp_path / "user-project"
    experiment_copy = root / ".dvc" / "tmp" / "exps" / "tmpXYZ"
    experiment_copy.mkdir(parents=True)
    shared_archive = tmp_path / "shared" / "datasets" / "flowers.tar.gz"
    shared_archive.parent.mkdir(parents=True)
    shared_archive.write_bytes(b"an archive")

    monkeypatch.chdir(experiment_copy)

    assert project_root() == root.resolve()
    assert resolve_local("../shared/datasets/flowers.tar.gz").resolve() == shared_archive.resolve()
    with pytest.raises(StageError) as missing:
        resolve_local("flowers.tar.gz")
    looked_at = root.resolve() / "flowers.tar.gz"
    assert f"data.source 'flowers.tar.gz' does not exist (looked at {looked_at})" in str(missing.value)

    monkeypatch.chdir(root)
    assert project_root() == root.resolve()


def test_the_stage_run_in_a_dvc_queue_copy_reads_sources_and_raw_archives_of_the_project(project):
    make_image_folder(project.root / "images", per_class=3, size=(8, 8))
    experiment_copy = project.root / ".dvc" / "tmp" / "exps" / "tmpXYZ"
    experiment_copy.mkdir(parents=True)
    project.write_params({"data.source": "images"})
    shutil.copy(project.root / "params.yaml", experiment_copy / "params.yaml")

    _python, _dash_m, module, *args = stage_command("download")  # its relative paths, as DVC runs it there
    result = project.run(module, *args, cwd=experiment_copy)

    assert result.returncode == 0, result.stderr
    # Outputs go to the copy DVC collects them from; the source is the project's.
    assert load_meta(experiment_copy / "data" / "prepared")["counts"] == {"train": 6, "test": 4}
    assert not project.prepared.exists()


# --- bad archives and network failures ------------------------------------------------------


def test_a_cifar10_archive_with_the_wrong_md5_is_refused_with_both_checksums_named(project, closed_port):
    project.raw.mkdir(parents=True)
    archive = project.raw / "cifar-10-python.tar.gz"
    make_cifar_archive(archive)
    project.write_params({"data.source": "cifar10"})

    result = project.download(env={"https_proxy": f"http://127.0.0.1:{closed_port}"})

    actual_md5 = hashlib.md5(archive.read_bytes()).hexdigest()
    assert_refused(result, str(archive), f"has MD5 {actual_md5}", f"has MD5 {OFFICIAL['cifar10'].md5}")
    assert_nothing_prepared(project)


# Each writes a damaged archive into tmp (from an image folder) and returns its path.


def tar_gz_cut_in_half(folder: Path, tmp: Path) -> Path:
    return _cut_in_half(make_tar_gz(folder, tmp / "flowers.tar.gz"))


def tar_gz_with_a_damaged_header(folder: Path, tmp: Path) -> Path:
    plain = io.BytesIO()
    with tarfile.open(fileobj=plain, mode="w") as tar:
        tar.add(folder, arcname="flowers")
    data = bytearray(plain.getvalue())
    members = tarfile.open(fileobj=io.BytesIO(bytes(data))).getmembers()
    middle = members[len(members) // 2].offset
    data[middle : middle + 100] = b"x" * 100  # the name field: the header's checksum no longer holds
    archive = tmp / "flowers.tar.gz"
    archive.write_bytes(gzip.compress(bytes(data)))  # a sound gzip stream around a damaged tar
    return archive


def zip_cut_in_half(folder: Path, tmp: Path) -> Path:
    return _cut_in_half(make_zip(folder, tmp / "flowers.zip"))


def zip_with_a_damaged_member(folder: Path, tmp: Path) -> Path:
    archive = make_zip(folder, tmp / "flowers.zip")
    data = bytearray(archive.read_bytes())
    info = next(info for info in zipfile.ZipFile(archive).infolist() if not info.is_dir())
    # The local header is 30 bytes, then the name and the extra field (lengths at 26 and 28).
    header = info.header_offset
    name_length = int.from_bytes(data[header + 26 : header + 28], "little")
    extra_length = int.from_bytes(data[header + 28 : header + 30], "little")
    data[header + 30 + name_length + extra_length] = 0xFF  # a deflate block of the reserved type
    archive.write_bytes(bytes(data))
    return archive


def zip_of_garbage(folder: Path, tmp: Path) -> Path:
    archive = tmp / "flowers.zip"
    archive.write_bytes(b"PK\x03\x04 this is no zip" * 20)
    return archive


def cifar_archive_cut_in_half(folder: Path, tmp: Path) -> Path:
    make_cifar_archive(tmp / "cifar.tar.gz", train_per_class=2)
    return _cut_in_half(tmp / "cifar.tar.gz")


def _cut_in_half(path: Path) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


DAMAGED = [
    pytest.param(tar_gz_cut_in_half, "truncated or corrupt", id="tar.gz-cut-in-half"),
    pytest.param(tar_gz_with_a_damaged_header, "is corrupt", id="tar.gz-with-a-damaged-header"),
    pytest.param(zip_cut_in_half, "not a readable zip archive", id="zip-cut-in-half"),
    pytest.param(zip_with_a_damaged_member, "truncated or corrupt", id="zip-with-a-damaged-member"),
    pytest.param(zip_of_garbage, "not a readable zip archive", id="zip-of-garbage"),
    pytest.param(
        cifar_archive_cut_in_half, "not a readable cifar-10-batches-py archive", id="cifar-archive-cut-in-half"
    ),
]


@pytest.mark.parametrize("damage, expected", DAMAGED)
def test_a_damaged_archive_is_refused_with_the_file_named(project, tmp_path, damage, expected):
    folder = make_image_folder(tmp_path / "flowers", per_class=6, size=(24, 24))
    archive = damage(folder, tmp_path)
    project.write_params({"data.source": str(archive)})

    result = project.download()

    assert_refused(result, str(archive), expected)
    assert_nothing_prepared(project)


def test_a_url_source_without_network_says_how_to_use_a_local_copy(project, closed_port):
    url = f"http://127.0.0.1:{closed_port}/flowers.tar.gz"
    project.write_params({"data.source": url})

    result = project.download()

    assert_refused(
        result,
        f"could not download {url}",
        "Working offline?",
        f"place it at {project.raw / 'flowers.tar.gz'}",
        "set data.source to its local path",
    )
    assert list(project.raw.iterdir()) == []  # no partial download left
    assert_nothing_prepared(project)


def test_cifar10_without_an_archive_or_network_says_how_to_use_a_local_copy(project, closed_port):
    project.write_params({"data.source": "cifar10"})
    no_network = {"https_proxy": f"http://127.0.0.1:{closed_port}", "http_proxy": f"http://127.0.0.1:{closed_port}"}

    result = project.download(env=no_network)

    assert_refused(
        result,
        f"could not download {OFFICIAL['cifar10'].url}",
        "Working offline?",
        f"copy the official archive cifar-10-python.tar.gz (MD5 {OFFICIAL['cifar10'].md5}) into {project.raw}/",
        "set data.source to a local image folder or archive",
    )
    assert list(project.raw.iterdir()) == []
    assert_nothing_prepared(project)


# --- bad image folders ----------------------------------------------------------------------


def test_an_unreadable_image_is_an_error_naming_the_file(project):
    folder = make_image_folder(project.root / "images", per_class=3, size=(8, 8))
    (folder / "train" / "dog" / "1.png").write_bytes(b"not a png")
    project.write_params({"data.source": "images"})

    result = project.download()

    assert_refused(result, f"{folder}: train/dog/1.png: cannot be decoded as an image", "data.on_bad_image: skip")
    assert_nothing_prepared(project)


def test_with_on_bad_image_skip_unreadable_images_are_skipped_counted_and_the_rest_prepared(project, tmp_path):
    clean = make_image_folder(tmp_path / "clean", per_class=4, size=(8, 8))
    damaged = shutil.copytree(clean, tmp_path / "damaged")
    (damaged / "train" / "cat" / "1.png").write_bytes(b"not a png")
    truncated = damaged / "test" / "dog" / "0.png"
    truncated.write_bytes(truncated.read_bytes()[:60])
    (clean / "train" / "cat" / "1.png").unlink()
    (clean / "test" / "dog" / "0.png").unlink()

    project.write_params({"data.source": str(clean)})
    assert project.download().returncode == 0
    expected = prepared_arrays(project.prepared)
    project.write_params({"data.source": str(damaged), "data.on_bad_image": "skip"})
    result = project.download()

    assert result.returncode == 0, result.stderr
    assert "skipped 2 unreadable image(s)" in result.stderr
    assert json.loads(project.stats.read_text())["skipped_images"] == 2
    assert load_meta(project.prepared)["skipped"] == ["test/dog/0.png", "train/cat/1.png"]
    for name, array in prepared_arrays(project.prepared).items():
        np.testing.assert_array_equal(array, expected[name], err_msg=name)


def test_a_file_that_cannot_be_read_is_an_error_naming_it(project):
    folder = make_image_folder(project.root / "images", per_class=3, size=(8, 8))
    (folder / "train" / "cat" / "3.png").symlink_to(project.root / "gone.png")
    project.write_params({"data.source": "images"})

    result = project.download()

    assert_refused(result, f"{folder / 'train' / 'cat' / '3.png'}: cannot be read")
    assert_nothing_prepared(project)


def test_an_empty_class_folder_is_an_error_naming_it(project):
    folder = make_image_folder(project.root / "images", per_class=3, size=(8, 8))
    (folder / "train" / "owl").mkdir()
    (folder / "train" / "owl" / "notes.txt").write_text("no images here")
    project.write_params({"data.source": "images"})

    result = project.download()

    assert_refused(result, "class folder train/owl has no images", "readable suffixes: .jpg, .png")
    assert_nothing_prepared(project)


def test_a_train_folder_without_class_folders_is_an_error(project):
    (project.root / "images" / "train").mkdir(parents=True)
    project.write_params({"data.source": "images"})

    result = project.download()

    assert_refused(result, "train/ has no class folders; expected train/<class>/<image>")
    assert_nothing_prepared(project)


def test_a_source_without_a_train_folder_is_an_error(project):
    folder = make_image_folder(project.root / "images", per_class=3, size=(8, 8))
    (folder / "train").rename(folder / "training")
    project.write_params({"data.source": "images"})

    result = project.download()

    assert_refused(result, f"{folder}: no train/ folder found; expected train/<class>/<image>")
    assert_nothing_prepared(project)


# --- members that would leave the archive ---------------------------------------------------


def grey_images(classes: tuple[str, ...], per_class: int) -> list[tuple[str, bytes]]:
    """(member name, PNG) pairs for train/<class>/<i>.png, each of its own grey level from 1 up."""
    names = [f"train/{name}/{index}.png" for name in classes for index in range(per_class)]
    return [(name, image_bytes(np.full((8, 8, 3), level, np.uint8))) for level, name in enumerate(names, 1)]


def _link(name: str, target: str, hard: bool = False) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = (tarfile.LNKTYPE if hard else tarfile.SYMTYPE), target
    return info


def _zip_symlink(name: str) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name)
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    return info


# Each builds the member at fault, given the folder it would try to reach.
ESCAPING_TAR_MEMBERS = {
    "absolute-path": lambda outside: (f"{outside}/escaped.png", image_bytes(np.zeros((8, 8, 3), np.uint8))),
    "dot-dot": lambda outside: ("train/cat/../../../escaped.png", image_bytes(np.zeros((8, 8, 3), np.uint8))),
    "symlink-outside": lambda outside: _link("train/cat/link.png", "../../../escaped.png"),
    "absolute-symlink": lambda outside: _link("train/cat/link.png", f"{outside}/escaped.png"),
    "hard-link-outside": lambda outside: _link("train/cat/link.png", "../escaped.png", hard=True),
}
ESCAPING_ZIP_MEMBERS = {
    "absolute-path": lambda outside: (f"{outside}/escaped.png", image_bytes(np.zeros((8, 8, 3), np.uint8))),
    "dot-dot": lambda outside: ("train/cat/../../../escaped.png", image_bytes(np.zeros((8, 8, 3), np.uint8))),
    "symlink": lambda outside: (_zip_symlink("train/cat/link.png"), b"../../../escaped.png"),
}


def _files_around(folder: Path) -> set[Path]:
    return {path for path in folder.rglob("*") if not path.is_dir()}


@pytest.mark.parametrize(
    "archive_kind, member",
    [("tar.gz", kind) for kind in ESCAPING_TAR_MEMBERS] + [("zip", kind) for kind in ESCAPING_ZIP_MEMBERS],
)
def test_members_that_would_leave_the_archive_are_refused_and_nothing_lands_outside(
    project, tmp_path, archive_kind, member
):
    outside = tmp_path / "outside"
    outside.mkdir()
    good = grey_images(("cat", "dog"), per_class=3)
    if archive_kind == "tar.gz":
        archive = write_tar_members(tmp_path / "evil.tar.gz", [*good, ESCAPING_TAR_MEMBERS[member](outside)])
    else:
        archive = write_zip_members(tmp_path / "evil.zip", [*good, ESCAPING_ZIP_MEMBERS[member](outside)])
    project.write_params({"data.source": str(archive)})
    before = _files_around(tmp_path.parent)

    result = project.download()

    assert_refused(result, f"{archive}: refusing member")
    assert_nothing_prepared(project)
    assert _files_around(tmp_path.parent) == before
    assert list(outside.iterdir()) == []


def test_a_link_inside_a_tar_archive_is_read_as_its_target(project, tmp_path):
    good = grey_images(("cat", "dog"), per_class=3)  # grey levels 1, 2, 3 and 4, 5, 6
    archive = write_tar_members(tmp_path / "linked.tar.gz", [*good, _link("train/dog/3.png", "../cat/2.png")])
    project.write_params({"data.source": str(archive)})

    result = project.download()

    assert result.returncode == 0, result.stderr
    arrays = prepared_arrays(project.prepared)
    levels = np.concatenate([arrays["train_images"], arrays["test_images"]])[:, 0, 0, 0]
    assert sorted(levels.tolist()) == [1, 2, 3, 3, 4, 5, 6]


def test_a_link_to_a_member_the_tar_archive_lacks_is_an_error_naming_it(project, tmp_path):
    good = grey_images(("cat", "dog"), per_class=3)
    archive = write_tar_members(tmp_path / "linked.tar.gz", [*good, _link("train/dog/3.png", "missing.png")])
    project.write_params({"data.source": str(archive)})

    result = project.download()

    assert_refused(result, f"{archive}: member 'train/dog/3.png' links to 'missing.png', not a file in the archive")
    assert_nothing_prepared(project)
