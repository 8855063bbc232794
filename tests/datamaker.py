"""Small real data sets for the tests: image folders, their archives, CIFAR python-format archives
and complete params.yaml files.

Everything is generated from a seed, so two calls with the same arguments write the same pixels.
"""

from __future__ import annotations

import io
import pickle
import struct
import tarfile
import zipfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from ruamel.yaml import YAML

PROJECT_ROOT = Path(__file__).resolve().parents[1]

# name -> (file suffix, how an RGB picture becomes the stored one, Pillow format)
FORMATS = {
    "png": (".png", lambda image: image, "PNG"),
    "jpeg": (".jpg", lambda image: image, "JPEG"),
    "rgba_png": (".png", lambda image: image.convert("RGBA"), "PNG"),
    "gray_jpeg": (".jpeg", lambda image: image.convert("L"), "JPEG"),
    "palette_gif": (".gif", lambda image: image.quantize(16), "GIF"),
    "palette_png": (".png", lambda image: image.quantize(16), "PNG"),
    "bmp": (".bmp", lambda image: image, "BMP"),
}
ALL_FORMATS = tuple(FORMATS)

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


# --- image folders and their archives ---------------------------------------------------------


def image_bytes(pixels: np.ndarray, fmt: str = "png") -> bytes:
    """(H, W, 3) uint8 pixels encoded as a file of one of FORMATS."""
    _, convert, pillow_format = FORMATS[fmt]
    buffer = io.BytesIO()
    convert(Image.fromarray(pixels, "RGB")).save(buffer, pillow_format)
    return buffer.getvalue()


def class_colour(class_index: int) -> np.ndarray:
    """The RGB colour around which a class's generated images vary."""
    return np.array([(60 * class_index) % 256, 255 - (60 * class_index) % 256, 128], dtype=np.int16)


def make_image_folder(
    root: str | Path,
    classes: Sequence[str] = ("cat", "dog"),
    per_class: int = 6,
    split_test: bool = True,
    test_per_class: int = 2,
    size: tuple[int, int] | Sequence[tuple[int, int]] = (40, 30),
    formats: Sequence[str] = ("png",),
    seed: int = 0,
) -> Path:
    """Write train/<class>/<n><suffix> (and test/<class>/... with split_test) under root.

    `size` is one (width, height) or a list of them used in turn, like `formats`; a class's
    images are its own colour plus noise, so a decoder that mixes them up shows.
    """
    root = Path(root)
    sizes = [size] if isinstance(size[0], int) else list(size)
    rng = np.random.default_rng(seed)
    splits = {"train": per_class, "test": test_per_class} if split_test else {"train": per_class}
    count = 0
    for split, images_per_class in splits.items():
        for class_index, class_name in enumerate(classes):
            class_dir = root / split / class_name
            class_dir.mkdir(parents=True, exist_ok=True)
            for index in range(images_per_class):
                width, height = sizes[count % len(sizes)]
                fmt = formats[count % len(formats)]
                noise = rng.integers(-40, 40, size=(height, width, 3))
                pixels = np.clip(class_colour(class_index) + noise, 0, 255).astype(np.uint8)
                (class_dir / f"{index}{FORMATS[fmt][0]}").write_bytes(image_bytes(pixels, fmt))
                count += 1
    return root


def _files_under(folder: Path) -> list[Path]:
    return sorted(path for path in folder.rglob("*") if path.is_file())


def make_tar_gz(folder: str | Path, archive: str | Path, wrap: str | None = None) -> Path:
    """A .tar.gz of folder's content (with folder members), inside `wrap/` when given."""
    folder, archive = Path(folder), Path(archive)
    with tarfile.open(archive, "w:gz") as tar:
        if wrap:
            tar.add(folder, arcname=wrap)
        else:
            for child in sorted(folder.iterdir()):
                tar.add(child, arcname=child.name)
    return archive


def make_zip(folder: str | Path, archive: str | Path, wrap: str | None = None, folder_entries: bool = True) -> Path:
    """A .zip of folder's content, inside `wrap/` when given; without folder members if asked,
    as `zip -D` and many scripts write them."""
    folder, archive = Path(folder), Path(archive)
    prefix = f"{wrap}/" if wrap else ""
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zip_file:
        for path in sorted(folder.rglob("*")):
            name = prefix + path.relative_to(folder).as_posix()
            if path.is_dir() and folder_entries:
                zip_file.writestr(name + "/", b"")
            elif path.is_file():
                zip_file.write(path, name)
    return archive


def write_tar_members(archive: str | Path, members: Iterable[tarfile.TarInfo | tuple[str, bytes]]) -> Path:
    """A .tar.gz holding exactly the given members: (name, bytes) files or prepared TarInfos
    (links, absolute names), written as given with no clean-up of their names."""
    archive = Path(archive)
    with tarfile.open(archive, "w:gz") as tar:
        for member in members:
            if isinstance(member, tarfile.TarInfo):
                tar.addfile(member)
            else:
                name, payload = member
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    return archive


def write_zip_members(archive: str | Path, members: Iterable[tuple[str | zipfile.ZipInfo, bytes]]) -> Path:
    """A .zip holding exactly the given (name or ZipInfo, bytes) members, names written as given."""
    archive = Path(archive)
    with zipfile.ZipFile(archive, "w") as zip_file:
        for name, payload in members:
            zip_file.writestr(name if isinstance(name, zipfile.ZipInfo) else zipfile.ZipInfo(name), payload)
    return archive


# --- CIFAR python format ----------------------------------------------------------------------


@dataclass(frozen=True)
class CifarContent:
    """What a generated CIFAR archive holds, to compare the prepared arrays with."""

    classes: list[str]
    train_rows: np.ndarray  # (N, 3072) uint8, as stored: the red plane, then green, then blue
    train_labels: np.ndarray  # (N,) int64
    test_rows: np.ndarray
    test_labels: np.ndarray

    @staticmethod
    def images(rows: np.ndarray) -> np.ndarray:
        """(N, 3072) rows as (N, 32, 32, 3) RGB images."""
        return rows.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)


def make_cifar_archive(
    path: str | Path,
    kind: str = "cifar10",
    train_per_class: int = 2,
    test_per_class: int = 1,
    seed: int = 0,
    protocol: int | None = None,
) -> CifarContent:
    """Write a real CIFAR-10 or CIFAR-100 python-format .tar.gz: pickled dicts of numpy rows.

    protocol None pickles as the official archives are pickled (by Python 2, protocol 2);
    a number is the protocol of a user re-packing the data with today's Python.
    """
    rng = np.random.default_rng(seed)
    if kind == "cifar10":
        folder, classes, label_key = "cifar-10-batches-py", list(CIFAR10_CLASSES), b"labels"
        train_names, test_name = [f"data_batch_{i}" for i in range(1, 6)], "test_batch"
        meta_name, meta = "batches.meta", {b"label_names": [c.encode() for c in CIFAR10_CLASSES], b"num_vis": 3072}
    elif kind == "cifar100":
        folder, classes, label_key = "cifar-100-python", [f"class_{i:03d}" for i in range(100)], b"fine_labels"
        train_names, test_name = ["train"], "test"
        meta_name = "meta"
        meta = {
            b"fine_label_names": [c.encode() for c in classes],
            b"coarse_label_names": [f"super_{i:02d}".encode() for i in range(20)],
        }
    else:
        raise ValueError(f"kind must be cifar10 or cifar100, not {kind!r}")

    def split(per_class: int) -> tuple[np.ndarray, np.ndarray]:
        labels = rng.permutation(np.repeat(np.arange(len(classes)), per_class)).astype(np.int64)
        rows = rng.integers(0, 256, size=(len(labels), 3072), dtype=np.uint8)
        return rows, labels

    train_rows, train_labels = split(train_per_class)
    test_rows, test_labels = split(test_per_class)

    def batch(rows: np.ndarray, labels: np.ndarray, name: str) -> dict:
        content = {
            b"batch_label": name.encode(),
            label_key: [int(label) for label in labels],  # plain lists, as in the official files
            b"data": rows,
            b"filenames": [f"{name}_{i}.png".encode() for i in range(len(labels))],
        }
        if kind == "cifar100":
            content[b"coarse_labels"] = [int(label) // 5 for label in labels]
        return content

    members = {meta_name: meta, test_name: batch(test_rows, test_labels, test_name)}
    for name, rows, labels in zip(
        train_names, np.array_split(train_rows, len(train_names)), np.array_split(train_labels, len(train_names))
    ):
        members[name] = batch(rows, labels, name)

    with tarfile.open(path, "w:gz") as tar:
        top = tarfile.TarInfo(folder)
        top.type, top.mode = tarfile.DIRTYPE, 0o755
        tar.addfile(top)
        for name, content in members.items():
            payload = pickle.dumps(content, protocol=protocol) if protocol else python2_pickle(content)
            info = tarfile.TarInfo(f"{folder}/{name}")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return CifarContent(classes, train_rows, train_labels, test_rows, test_labels)


class _Python2Pickler(pickle._Pickler):
    """Protocol 2 with bytes written as Python 2 byte strings (BINSTRING), as in the official
    files; Python 3's own protocol 2 writes them as calls to _codecs.encode instead."""

    def save_bytes(self, obj: bytes) -> None:
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    dispatch = {**pickle._Pickler.dispatch, bytes: save_bytes}


def python2_pickle(content: object) -> bytes:
    buffer = io.BytesIO()
    _Python2Pickler(buffer, protocol=2).dump(content)
    return buffer.getvalue()


# --- params.yaml ------------------------------------------------------------------------------


def project_params() -> dict:
    """The project's own params.yaml, as a plain dict."""
    return YAML(typ="safe", pure=True).load((PROJECT_ROOT / "params.yaml").read_text())


def write_params(folder: str | Path, overrides: dict | None = None, remove: Sequence[str] = ()) -> Path:
    """A complete params.yaml in folder: the project's, with dotted-key overrides
    ({"train.lr": 0.05}, new keys included) and dotted keys removed."""
    params = project_params()
    for dotted, value in (overrides or {}).items():
        *sections, key = dotted.split(".")
        node = params
        for section in sections:
            node = node[section]
        node[key] = value
    for dotted in remove:
        *sections, key = dotted.split(".")
        node = params
        for section in sections:
            node = node[section]
        del node[key]
    path = Path(folder) / "params.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    yaml = YAML(typ="safe", pure=True)
    yaml.default_flow_style = False
    with open(path, "w") as file:
        yaml.dump(params, file)
    return path
