"""The prepared data set: what `download` writes once and every later stage memory-maps.

Layout of a prepared folder (all written by `PreparedWriter`, read by `load_split`):

    train_images.npy  (N, H, W, 3) uint8      train_labels.npy  (N,) int64
    test_images.npy   (M, H, W, 3) uint8      test_labels.npy   (M,) int64
    meta.json         class names, image size, counts, source and checksums

Plain .npy files so that `np.load(mmap_mode="r")` maps them without reading them whole:
a data set larger than memory is written and read in slices.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from stages.errors import StageError
from stages.outputs import file_digest, partial_folder, replace_folder


@dataclass(frozen=True)
class Split:
    images: np.ndarray  # (N, H, W, 3) uint8, memory-mapped
    labels: np.ndarray  # (N,) int64


def load_split(prepared_dir: str | Path, split: str, made_by: str = "download") -> Split:
    """Memory-map one split of a prepared folder (written by stage `made_by`)."""
    prepared_dir = Path(prepared_dir)
    images = read_array(prepared_dir / f"{split}_images.npy", made_by, mmap_mode="r")
    labels = read_array(prepared_dir / f"{split}_labels.npy", made_by)
    if images.ndim != 4 or labels.shape != images.shape[:1]:
        raise StageError(f"{prepared_dir}: {split}_images.npy holds {images.shape} images but {split}_labels.npy "
                         f"{labels.shape} labels; run `dvc repro -f {made_by}` to write them again")
    return Split(images, labels)


def read_array(path: Path, made_by: str, mmap_mode: str | None = None) -> np.ndarray:
    """A .npy file of a prepared folder; a missing, truncated or damaged one stops the stage in one line."""
    try:
        return np.load(path, mmap_mode=mmap_mode, allow_pickle=False)
    except FileNotFoundError:
        problem = "is missing"
    except (ValueError, EOFError, OSError) as error:  # numpy's words for a short or damaged file
        problem = f"is truncated or damaged ({error})"
    raise StageError(f"{path} {problem}; run `dvc repro -f {made_by}` to write it again")


def load_meta(prepared_dir: str | Path) -> dict:
    return json.loads((Path(prepared_dir) / "meta.json").read_text())


class PreparedWriter:
    """Writes a prepared folder into a temporary sibling and renames it into place on success.

    A crash, a bad image or a refused archive leaves no folder at `out_dir` that a later stage
    could take for finished data.
    """

    def __init__(self, out_dir: str | Path):
        self.out_dir = Path(out_dir)
        self.tmp_dir = partial_folder(self.out_dir)
        self.counts: dict[str, int] = {}

    def allocate(self, split: str, count: int, image_size: int) -> np.ndarray:
        """A writable (count, size, size, 3) uint8 array backed by the split's file."""
        return np.lib.format.open_memmap(
            self.tmp_dir / f"{split}_images.npy", mode="w+", dtype=np.uint8, shape=(count, image_size, image_size, 3)
        )

    def finish_split(self, split: str, images: np.ndarray, labels: np.ndarray, keep: np.ndarray | None = None) -> None:
        """Store the labels; with `keep` (a boolean mask), drop the images that were skipped."""
        if keep is not None and not keep.all():
            images = self._compact(split, images, keep)
            labels = labels[keep]
        images.flush()
        np.save(self.tmp_dir / f"{split}_labels.npy", labels.astype(np.int64))
        self.counts[split] = len(labels)

    def _compact(self, split: str, images: np.ndarray, keep: np.ndarray) -> np.ndarray:
        kept_indices = np.flatnonzero(keep)
        compact = np.lib.format.open_memmap(
            self.tmp_dir / f"{split}_images.kept.npy", mode="w+", dtype=np.uint8, shape=(len(kept_indices), *images.shape[1:])
        )
        for start in range(0, len(kept_indices), 4096):
            chunk = kept_indices[start : start + 4096]
            compact[start : start + len(chunk)] = images[chunk]
        compact.flush()
        del images
        os.replace(self.tmp_dir / f"{split}_images.kept.npy", self.tmp_dir / f"{split}_images.npy")
        return np.load(self.tmp_dir / f"{split}_images.npy", mmap_mode="r")

    def commit(self, meta: dict) -> dict:
        """Write meta.json (with a checksum of the arrays) and move the folder into place."""
        meta = {**meta, "counts": self.counts, "data_sha256": checksum_arrays(self.tmp_dir)}
        (self.tmp_dir / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        replace_folder(self.tmp_dir, self.out_dir)
        return meta

    def abort(self) -> None:
        shutil.rmtree(self.tmp_dir, ignore_errors=True)

    def __enter__(self) -> PreparedWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None or self.tmp_dir.exists():
            self.abort()


def checksum_arrays(prepared_dir: Path) -> str:
    """sha256 over the sha256 of every array in the folder, in name order: the data's identity."""
    digests = [f"{path.name} {file_digest(path)}" for path in sorted(Path(prepared_dir).glob("*.npy"))]
    return hashlib.sha256("\n".join(digests).encode()).hexdigest()
