"""The official CIFAR-10 and CIFAR-100 archives (python format) and how to read them.

URLs and MD5 sums are the ones published on the data set's page and used by torchvision.
"""

from __future__ import annotations

import io
import pickle
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from stages.errors import StageError
from stages.image_folders import read_at_most


@dataclass(frozen=True)
class OfficialArchive:
    url: str
    md5: str
    folder: str  # the top-level folder inside the archive
    train_members: tuple[str, ...]
    test_member: str
    meta_member: str
    label_key: bytes
    names_key: bytes

    @property
    def filename(self) -> str:
        return self.url.rsplit("/", 1)[1]


OFFICIAL = {
    "cifar10": OfficialArchive(
        url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        md5="c58f30108f718f92721af3b95e74349a",
        folder="cifar-10-batches-py",
        train_members=tuple(f"data_batch_{i}" for i in range(1, 6)),
        test_member="test_batch",
        meta_member="batches.meta",
        label_key=b"labels",
        names_key=b"label_names",
    ),
    "cifar100": OfficialArchive(
        url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        md5="eb9058c3a382ffc7106e4002c42a8d85",
        folder="cifar-100-python",
        train_members=("train",),
        test_member="test",
        meta_member="meta",
        label_key=b"fine_labels",
        names_key=b"fine_label_names",
    ),
}


def cifar_format_of(archive_path: Path) -> OfficialArchive | None:
    """Which CIFAR python format an archive holds (by its top folder), or None."""
    try:
        with tarfile.open(archive_path, "r:*") as archive:
            first = archive.next()
    except (tarfile.TarError, OSError, EOFError):
        return None
    if first is None:
        return None
    top = first.name.lstrip("./").split("/")[0]
    return next((spec for spec in OFFICIAL.values() if spec.folder == top), None)


class _ArraysOnlyUnpickler(pickle.Unpickler):
    # The batches are pickles; only what they are made of (dicts, lists, bytes and numpy
    # arrays) may be rebuilt, so a doctored archive cannot run code while being read.
    # Re-packed with Python 3: protocol 5 (3.14's default) rebuilds arrays with _frombuffer, and
    # protocol 2 writes bytes as _codecs.encode(text, "latin1") (torch's weights_only allows it too).
    ALLOWED = {
        ("_codecs", "encode"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def read_cifar_archive(archive_path: Path, spec: OfficialArchive, max_bytes: int
                       ) -> tuple[list[str], dict[str, tuple[np.ndarray, np.ndarray]]]:
    """Class names and {split: (images (N, 32, 32, 3) uint8, labels (N,) int64)}; no member of more than
    `max_bytes` is read."""
    try:
        with tarfile.open(archive_path, "r:*") as archive:
            meta = _load_member(archive, f"{spec.folder}/{spec.meta_member}", max_bytes)
            classes = [name.decode() for name in meta[spec.names_key]]
            splits = {
                "train": _load_batches(archive, spec, spec.train_members, max_bytes),
                "test": _load_batches(archive, spec, (spec.test_member,), max_bytes),
            }
    except (tarfile.TarError, OSError, EOFError, zlib.error, pickle.UnpicklingError, KeyError, ValueError) as error:
        raise StageError(f"{archive_path} is not a readable {spec.folder} archive: {error}") from None
    return classes, splits


def _load_member(archive: tarfile.TarFile, name: str, max_bytes: int) -> dict:
    member = archive.extractfile(name)
    if member is None:
        raise KeyError(f"{name} is not a file")
    payload = read_at_most(member, max_bytes, f"{archive.name}: member '{name}'", archive.getmember(name).size)
    return _ArraysOnlyUnpickler(io.BytesIO(payload), encoding="bytes").load()


def _load_batches(archive: tarfile.TarFile, spec: OfficialArchive, members: tuple[str, ...], max_bytes: int
                  ) -> tuple[np.ndarray, np.ndarray]:
    batches = [_load_member(archive, f"{spec.folder}/{member}", max_bytes) for member in members]
    # Rows are 3072 bytes: the red plane, then green, then blue, each 32x32 row-major.
    images = np.concatenate([np.asarray(batch[b"data"], dtype=np.uint8) for batch in batches])
    images = images.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    labels = np.concatenate([np.asarray(batch[spec.label_key], dtype=np.int64) for batch in batches])
    return np.ascontiguousarray(images), labels


def resize_images(images: np.ndarray, image_size: int) -> np.ndarray:
    """Resize (N, 32, 32, 3) images one by one with Pillow: only when image_size is not 32."""
    resized = np.empty((len(images), image_size, image_size, 3), dtype=np.uint8)
    for index, image in enumerate(images):
        resized[index] = np.asarray(Image.fromarray(image).resize((image_size, image_size), Image.Resampling.BICUBIC))
    return resized
