"""Image-folder data sets: a directory, or a .tar.gz/.tgz/.tar/.zip archive of one.

Expected layout, possibly wrapped in one top-level folder:

    train/<class>/<image>      required
    test/<class>/<image>       optional; without it `download` makes a stratified split

Archives are read member by member without extracting them, so no member can land anywhere
on disk; members with absolute paths, `..` or links leading outside are refused outright.
"""

from __future__ import annotations

import io
import os
import posixpath
import re
import stat
import tarfile
import warnings
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps

from stages.errors import StageError

ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar", ".tar.bz2", ".tar.xz", ".zip")
# Every format Pillow can open, so a folder of .webp or .tif needs nothing special.
IMAGE_SUFFIXES = frozenset(suffix for suffix, fmt in Image.registered_extensions().items() if fmt in Image.OPEN)
# Files that archivers and desktops add beside the data, never part of it.
IGNORED_NAMES = ("__MACOSX", ".DS_Store", "Thumbs.db")


class BadImage(StageError):
    """A file that should be an image but cannot be decoded."""


@dataclass
class Listing:
    """What a source holds: file names (posix, relative to its root) and folder names."""

    files: list[str]
    folders: set[str] = field(default_factory=set)


@dataclass
class Layout:
    """Where every image goes: its split, its index in that split and its label."""

    classes: list[str]
    names: dict[str, list[str]]  # split -> member names in prepared order
    labels: dict[str, np.ndarray]  # split -> (N,) class indices
    made_test_split: bool


def is_archive(path: Path) -> bool:
    return path.name.lower().endswith(ARCHIVE_SUFFIXES)


# --- reading sources -----------------------------------------------------------------------


class FolderSource:
    def __init__(self, root: Path, max_bytes: int):
        self.root = root
        self.label = str(root)
        self.max_bytes = max_bytes

    def listing(self) -> Listing:
        files, folders = [], set()
        for dirpath, dirnames, filenames in os.walk(self.root, followlinks=True):
            relative = Path(dirpath).relative_to(self.root).as_posix()
            prefix = "" if relative == "." else relative + "/"
            folders.update(prefix + name for name in dirnames)
            files.extend(prefix + name for name in filenames)
        return Listing(sorted(files), folders)

    def read(self, names: set[str]) -> Iterator[tuple[str, bytes]]:
        for name in sorted(names):
            path = self.root / name
            try:
                with open(path, "rb") as file:
                    payload = read_at_most(file, self.max_bytes, f"{path}", path.stat().st_size)
            except OSError as error:
                raise StageError(f"{path}: cannot be read ({error})") from None
            yield name, payload


class TarSource:
    def __init__(self, path: Path, max_bytes: int):
        self.path = path
        self.label = str(path)
        self.max_bytes = max_bytes

    def _open(self) -> tarfile.TarFile:
        try:
            return tarfile.open(self.path, "r:*")
        except (tarfile.TarError, OSError, EOFError) as error:
            raise StageError(f"{self.path} is not a readable tar archive ({error}); is it truncated or corrupt?") from None

    def listing(self) -> Listing:
        files, folders = [], set()
        with self._open() as archive:
            try:
                members = archive.getmembers()
                self._check_nothing_after_the_end(archive)
            except (tarfile.TarError, OSError, EOFError, zlib.error) as error:
                raise StageError(f"{self.path} is truncated or corrupt: {error}") from None
            for member in members:
                name = safe_member_name(member.name, self.path)
                if member.issym() or member.islnk():
                    self._check_link(member, name)
                if member.isdir():
                    folders.add(name)
                elif member.isfile() or member.issym() or member.islnk():
                    files.append(name)
        return Listing(files, folders)

    def _check_nothing_after_the_end(self, archive: tarfile.TarFile) -> None:
        # tarfile takes a damaged member header for the end of the archive and stops without a
        # word, which would make a shorter data set; past the real end there are only zero blocks.
        # Reading on to the end also makes gzip check its CRC, which tarfile never gets to.
        while block := archive.fileobj.read(1 << 20):
            if block.count(0) != len(block):
                raise StageError(
                    f"{self.path} is corrupt: a damaged member header after {len(archive.members)} members "
                    "hides the rest of the archive"
                )

    def _check_link(self, member: tarfile.TarInfo, name: str) -> None:
        # Hard link targets are archive paths; symlink targets are relative to the link's folder.
        target = member.linkname if member.islnk() else posixpath.join(posixpath.dirname(name), member.linkname)
        if member.linkname.startswith("/") or posixpath.normpath(target).startswith(".."):
            raise StageError(
                f"{self.path}: refusing member '{member.name}', a link to '{member.linkname}' outside the archive"
            )

    def read(self, names: set[str]) -> Iterator[tuple[str, bytes]]:
        with self._open() as archive:
            try:
                for member in archive:
                    name = safe_member_name(member.name, self.path)
                    if name in names:
                        yield name, self._member_bytes(archive, member)
            except (tarfile.TarError, OSError, EOFError, zlib.error) as error:
                raise StageError(f"{self.path} is truncated or corrupt: {error}") from None

    def _member_bytes(self, archive: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
        try:
            file = archive.extractfile(member)
        except KeyError:  # a link to a member the archive does not hold
            file = None
        if file is None:
            raise StageError(
                f"{self.path}: member '{member.name}' links to '{member.linkname}', not a file in the archive"
            )
        return read_at_most(file, self.max_bytes, f"{self.path}: member '{member.name}'", member.size)


class ZipSource:
    def __init__(self, path: Path, max_bytes: int):
        self.path = path
        self.label = str(path)
        self.max_bytes = max_bytes

    def _open(self) -> zipfile.ZipFile:
        try:
            return zipfile.ZipFile(self.path)
        except (zipfile.BadZipFile, OSError) as error:
            raise StageError(f"{self.path} is not a readable zip archive ({error}); is it truncated or corrupt?") from None

    def listing(self) -> Listing:
        files, folders = [], set()
        with self._open() as archive:
            for info in archive.infolist():
                name = safe_member_name(info.filename, self.path)
                if stat.S_ISLNK(info.external_attr >> 16):
                    raise StageError(f"{self.path}: refusing member '{info.filename}': links are not allowed in zip archives")
                if info.is_dir():
                    folders.add(name)
                else:
                    files.append(name)
        return Listing(files, folders)

    def read(self, names: set[str]) -> Iterator[tuple[str, bytes]]:
        with self._open() as archive:
            try:
                for info in archive.infolist():
                    name = safe_member_name(info.filename, self.path)
                    if name in names:
                        with archive.open(info) as file:
                            yield name, read_at_most(file, self.max_bytes, f"{self.path}: member '{info.filename}'",
                                                     info.file_size)
            except (zipfile.BadZipFile, OSError, EOFError, zlib.error) as error:
                raise StageError(f"{self.path} is truncated or corrupt: {error}") from None


def open_image_folder(path: Path, max_bytes: int) -> FolderSource | TarSource | ZipSource:
    """The source at `path`, reading no file or member of more than `max_bytes` (data.max_member_bytes)."""
    if path.is_dir():
        return FolderSource(path, max_bytes)
    if path.name.lower().endswith(".zip"):
        return ZipSource(path, max_bytes)
    if is_archive(path):
        return TarSource(path, max_bytes)
    raise StageError(
        f"data.source '{path}' is neither a folder nor an archive; "
        f"give a folder or a {'/'.join(ARCHIVE_SUFFIXES)} file laid out as train/<class>/*"
    )


def read_at_most(file: BinaryIO, max_bytes: int, what: str, declared: int) -> bytes:
    """The file's bytes, refused unread when its declared size passes `max_bytes`, and refused while reading
    when more bytes come than that (a compressed member can lie, or expand a thousandfold)."""
    if declared > max_bytes:
        raise StageError(too_large(what, f"{declared:,} bytes", max_bytes))
    payload = file.read(max_bytes + 1)
    if len(payload) > max_bytes:
        raise StageError(too_large(what, f"more than {max_bytes:,} bytes once uncompressed", max_bytes))
    return payload


def too_large(what: str, size: str, max_bytes: int) -> str:
    return (f"{what} is {size}, over data.max_member_bytes ({max_bytes:,}): refused without reading it whole "
            "(an image that large is rare, an archive bomb is not); raise data.max_member_bytes if it is an image")


def safe_member_name(name: str, archive: Path) -> str:
    """The member's path with './' and trailing '/' removed; absolute paths and '..' refused."""
    parts = [part for part in name.replace("\\", "/").split("/") if part not in ("", ".")]
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":") or ".." in parts:
        raise StageError(f"{archive}: refusing member '{name}': absolute paths and '..' would leave the extraction folder")
    return "/".join(parts)


# --- the layout ----------------------------------------------------------------------------


def plan_layout(listing: Listing, source_label: str, test_fraction: float, seed: int) -> Layout:
    """Find train/ (and test/) under at most one wrapper folder and give every image its place."""
    files = [name for name in listing.files if not _ignored(name)]
    folders = {name for name in listing.folders if not _ignored(name)}
    # Archives need not hold their folders as members (zip -D, tar of a file list).
    folders |= {name.rsplit("/", depth)[0] for name in files for depth in range(1, name.count("/") + 1)}
    root = _find_root(files, folders, source_label)

    by_split: dict[str, dict[str, list[str]]] = {}
    for split in ("train", "test"):
        split_dir = f"{root}{split}"
        if split_dir in folders:
            by_split[split] = _images_by_class(files, folders, split_dir, source_label)

    classes = sorted(by_split["train"])
    if "test" in by_split:
        unknown = sorted(set(by_split["test"]) - set(classes))
        if unknown:
            raise StageError(f"{source_label}: test/ has classes that train/ lacks: {', '.join(unknown)}")
        names = {split: [] for split in ("train", "test")}
        labels = {split: [] for split in ("train", "test")}
        for split, per_class in by_split.items():
            for label, name in enumerate(classes):
                members = per_class.get(name, [])
                names[split] += members
                labels[split] += [label] * len(members)
        return Layout(classes, names, {s: np.array(labels[s], dtype=np.int64) for s in labels}, made_test_split=False)
    return _stratified_layout(classes, by_split["train"], test_fraction, seed)


def _ignored(name: str) -> bool:
    return any(part in IGNORED_NAMES or part.startswith(".") for part in name.split("/"))


def _find_root(files: list[str], folders: set[str], source_label: str) -> str:
    if "train" in folders:
        return ""
    top_level = {name.split("/")[0] for name in files} | {name.split("/")[0] for name in folders}
    if len(top_level) == 1:
        wrapper = top_level.pop()
        if f"{wrapper}/train" in folders:
            return wrapper + "/"
    raise StageError(
        f"{source_label}: no train/ folder found; expected train/<class>/<image> "
        "(and optionally test/<class>/<image>), at the top or inside one folder"
    )


def _images_by_class(files: list[str], folders: set[str], split_dir: str, source_label: str) -> dict[str, list[str]]:
    class_names = sorted(name.rsplit("/", 1)[1] for name in folders if posixpath.dirname(name) == split_dir)
    if not class_names:
        raise StageError(f"{source_label}: {split_dir}/ has no class folders; expected {split_dir}/<class>/<image>")
    per_class = {name: [] for name in class_names}
    for file in files:
        if file.startswith(split_dir + "/") and Path(file).suffix.lower() in IMAGE_SUFFIXES:
            class_name = file[len(split_dir) + 1 :].split("/")[0]
            if class_name in per_class:
                per_class[class_name].append(file)
    empty = [name for name, members in per_class.items() if not members]
    if empty:
        raise StageError(
            f"{source_label}: class folder{'s' if len(empty) > 1 else ''} {', '.join(f'{split_dir}/{e}' for e in empty)} "
            f"ha{'ve' if len(empty) > 1 else 's'} no images (readable suffixes: .jpg, .png, .webp, .bmp, .tif, ...)"
        )
    return {name: sorted(members) for name, members in per_class.items()}


def _stratified_layout(classes: list[str], per_class: dict[str, list[str]], test_fraction: float, seed: int) -> Layout:
    # Per class by hand rather than sklearn's train_test_split(stratify=...): that refuses classes
    # with a single image and test sets smaller than the number of classes, and small data sets
    # are normal here. A class of n images gives round(n * test_fraction) to test, at least one
    # so that every class is scored, and keeps at least one image for training.
    rng = np.random.default_rng(seed)
    names = {"train": [], "test": []}
    labels = {"train": [], "test": []}
    for label, class_name in enumerate(classes):
        members = per_class[class_name]
        order = rng.permutation(len(members))
        test_count = min(max(int(round(len(members) * test_fraction)), 1), len(members) - 1)
        test_picks = set(order[:test_count].tolist())
        for index, member in enumerate(members):
            split = "test" if index in test_picks else "train"
            names[split].append(member)
            labels[split].append(label)
    return Layout(classes, names, {s: np.array(labels[s], dtype=np.int64) for s in labels}, made_test_split=True)


# --- decoding ------------------------------------------------------------------------------


def decode_image(data: bytes, image_size: int, name: str, max_pixels: int,
                 limit_key: str = "data.max_image_pixels") -> np.ndarray:
    """(image_size, image_size, 3) uint8 RGB: shorter side resized, centre cropped. An image of more than
    `max_pixels` pixels is refused from its header, before anything is decoded."""
    # Pillow's own guard against decompression bombs, which its plugins apply to every frame too,
    # warns above this and refuses above twice this: at our limit it agrees with the check below.
    Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
        with image:
            width, height = image.size
            if width * height > max_pixels:
                raise BadImage(over_pixel_limit(name, f"{width} × {height} = {width * height:,} pixels", max_pixels,
                                                limit_key))
            # draft() lets the JPEG decoder scale down while decoding: large photos decode ~4x faster.
            image.draft("RGB", (image_size, image_size))
            image = ImageOps.exif_transpose(image).convert("RGB")  # phone photos stand upright
            if image.size != (image_size, image_size):
                image = ImageOps.fit(image, (image_size, image_size), Image.Resampling.BICUBIC)
            return np.asarray(image, dtype=np.uint8)
    except Image.DecompressionBombError as error:
        pixels = re.search(r"\((\d+) pixels\)", str(error))
        size = f"{int(pixels.group(1)):,} pixels" if pixels else "too many pixels"
        raise BadImage(over_pixel_limit(name, size, max_pixels, limit_key)) from None
    except Image.UnidentifiedImageError:
        # Pillow's own message names its in-memory buffer, not the file.
        raise BadImage(f"{name}: cannot be decoded as an image (not a format Pillow reads, or not an image at all)"
                       ) from None
    except (OSError, ValueError, SyntaxError) as error:
        raise BadImage(f"{name}: cannot be decoded as an image ({error})") from None


def over_pixel_limit(name: str, size: str, max_pixels: int, limit_key: str) -> str:
    return f"{name}: {size}, over the {max_pixels:,} that {limit_key} allows (raise it to read this image)"
