"""Stage 1, download: fetch the data named by `data.source` and decode it once into data/prepared.

    python -m stages.download --raw data/raw --out data/prepared --stats reports/download.json

`data.source` is `cifar10` or `cifar100` (the official archives, MD5-verified, taken from the
raw folder when a copy is already there), an http(s) URL of an archive, or a local folder or
archive in image-folder layout (see stages/image_folders.py) or in CIFAR python format.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import http.client
import logging
import multiprocessing
import os
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from tqdm import tqdm

from stages.cifar import OFFICIAL, OfficialArchive, cifar_format_of, read_cifar_archive, resize_images
from stages.datasets import PreparedWriter
from stages.errors import StageError, run_stage
from stages.hardware import usable_cores
from stages.image_folders import BadImage, Layout, decode_image, open_image_folder, plan_layout
from stages.outputs import PARTIAL_SUFFIX, file_digest, write_json
from stages.params import DataParams, load_params

log = logging.getLogger("download")


def main() -> None:
    args = parse_args()
    params = load_params()
    started = time.perf_counter()
    raw_dir = project_root() / args.raw
    with PreparedWriter(args.out) as writer:
        meta = prepare(params.data, params.seed, raw_dir, writer)
        meta = writer.commit(meta)
    stats = {
        "download_seconds": round(time.perf_counter() - started, 2),
        "train_images": meta["counts"]["train"],
        "test_images": meta["counts"]["test"],
        "skipped_images": len(meta["skipped"]),
    }
    write_json(Path(args.stats), stats)
    log.info("prepared %s: %d train and %d test images, %d classes, in %.1f s", args.out,
             stats["train_images"], stats["test_images"], len(meta["classes"]), stats["download_seconds"])


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--raw", default="data/raw", help="where downloaded archives are kept")
    parser.add_argument("--out", default="data/prepared", help="the prepared data set to write")
    parser.add_argument("--stats", default="reports/download.json", help="timings and counts")
    return parser.parse_args()


def prepare(data: DataParams, seed: int, raw_dir: Path, writer: PreparedWriter) -> dict:
    """Decode the source into the writer's folder; return the data set's description."""
    if data.source in OFFICIAL:
        spec = OFFICIAL[data.source]
        archive = fetch_official(spec, raw_dir)
        return prepare_cifar(archive, spec, data, writer) | {"source_md5": spec.md5}
    path = fetch_url(data.source, raw_dir) if is_url(data.source) else resolve_local(data.source)
    spec = cifar_format_of(path) if path.is_file() else None
    if spec is not None:
        return prepare_cifar(path, spec, data, writer) | {"source_sha256": file_digest(path)}
    return prepare_image_folder(path, data, seed, writer)


# --- where the source is -------------------------------------------------------------------


def project_root() -> Path:
    """The user's project folder, also when DVC runs a queued experiment in a temporary copy.

    `dvc queue start` runs each experiment in <project>/.dvc/tmp/exps/<tmp>/, where a source
    the user wrote as `../datasets/x.tar.gz` would point somewhere else; relative sources
    and the raw folder keep meaning what they mean in the user's project.
    """
    cwd = Path.cwd().resolve()
    parts = cwd.parts
    for index in range(len(parts) - 2):
        if parts[index : index + 3] == (".dvc", "tmp", "exps"):
            return Path(*parts[:index])
    return cwd


def resolve_local(source: str) -> Path:
    path = Path(source).expanduser()
    path = path if path.is_absolute() else project_root() / path
    if not path.exists():
        raise StageError(
            f"data.source '{source}' does not exist (looked at {path}); accepted: cifar10, cifar100, "
            "an http(s) URL, or a local folder or .tar.gz/.tgz/.zip archive laid out as train/<class>/*"
        )
    return path


def is_url(source: str) -> bool:
    return urllib.parse.urlparse(source).scheme in ("http", "https")


# --- fetching ------------------------------------------------------------------------------


def fetch_official(spec: OfficialArchive, raw_dir: Path) -> Path:
    """The verified official archive: the copy in raw_dir if there is one, else downloaded."""
    archive = raw_dir / spec.filename
    if archive.exists():
        log.info("using %s, already present (no network needed)", archive)
    else:
        download(spec.url, archive, offline_hint=(
            f"copy the official archive {spec.filename} (MD5 {spec.md5}) into {raw_dir}/, or set "
            "data.source to a local image folder or archive, e.g. "
            "`dvc exp run -S data.source=../shared/datasets/cifar10-jpeg.tar.gz`"
        ))
    actual = file_digest(archive, "md5")
    if actual != spec.md5:
        raise StageError(
            f"{archive} has MD5 {actual} but the official {spec.filename} has MD5 {spec.md5}: the file is "
            "truncated, corrupt or not the official archive; delete it and run again, or replace it with the official file"
        )
    return archive


def fetch_url(url: str, raw_dir: Path) -> Path:
    """The archive at `url`, downloaded once into raw_dir and reused from there."""
    filename = Path(urllib.parse.urlparse(url).path).name or "download"
    archive = raw_dir / filename
    if archive.exists():
        log.info("using %s, downloaded before from %s", archive, url)
        return archive
    download(url, archive, offline_hint=(
        f"download it on a connected machine and either place it at {archive} or set data.source to its local path"
    ))
    return archive


def download(url: str, destination: Path, offline_hint: str) -> None:
    """Stream `url` into `destination`, atomically: a failed download leaves nothing behind."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    for leftover in destination.parent.glob(f".{destination.name}.*{PARTIAL_SUFFIX}"):
        leftover.unlink()  # of a download killed midway: only one run downloads into data/raw at a time
    log.info("downloading %s", url)
    handle, partial_name = tempfile.mkstemp(prefix=f".{destination.name}.", suffix=PARTIAL_SUFFIX,
                                            dir=destination.parent)
    partial = Path(partial_name)
    try:
        with os.fdopen(handle, "wb") as file, urllib.request.urlopen(url, timeout=60) as response:
            total = int(response.headers.get("Content-Length") or 0) or None
            received = 0
            with tqdm(total=total, unit="B", unit_scale=True, desc=destination.name, disable=None) as bar:
                while block := response.read(1 << 20):
                    file.write(block)
                    received += len(block)
                    bar.update(len(block))
        # read() ends quietly when the connection drops: a short file must not be kept as the archive.
        if total is not None and received != total:
            raise StageError(f"the download of {url} stopped after {received} of {total} bytes; run again to retry")
        os.replace(partial, destination)
    except urllib.error.HTTPError as error:
        raise StageError(f"could not download {url}: the server answered {error.code} {error.reason}; check the URL") from None
    except (urllib.error.URLError, http.client.HTTPException, OSError, TimeoutError) as error:
        reason = getattr(error, "reason", error)
        raise StageError(f"could not download {url} ({reason}). Working offline? {offline_hint}") from None
    finally:
        partial.unlink(missing_ok=True)


# --- decoding ------------------------------------------------------------------------------


def prepare_cifar(archive: Path, spec: OfficialArchive, data: DataParams, writer: PreparedWriter) -> dict:
    classes, splits = read_cifar_archive(archive, spec, data.max_member_bytes)
    for split, (images, labels) in splits.items():
        if data.image_size != 32:
            images = resize_images(images, data.image_size)
        target = writer.allocate(split, len(images), data.image_size)
        target[:] = images
        writer.finish_split(split, target, labels)
    return describe_source(data, classes, kind=spec.folder, made_test_split=False, skipped=[])


def prepare_image_folder(path: Path, data: DataParams, seed: int, writer: PreparedWriter) -> dict:
    source = open_image_folder(path, data.max_member_bytes)
    layout = plan_layout(source.listing(), source.label, data.test_fraction, seed)
    if len(layout.names["test"]) == 0:
        raise StageError(
            f"{source.label}: no test images: add a test/<class>/ folder or more images per class "
            f"(data.test_fraction {data.test_fraction} of each class goes to test, keeping one for training)"
        )
    skipped = decode_into(writer, source, layout, data)
    kind = "image folder" if path.is_dir() else "image-folder archive"
    meta = describe_source(data, layout.classes, kind=kind, made_test_split=layout.made_test_split, skipped=skipped)
    if path.is_file():
        meta["source_sha256"] = file_digest(path)
    return meta


def decode_into(writer: PreparedWriter, source, layout: Layout, data: DataParams) -> list[str]:
    """Decode every image of the layout into its slot; return the names of skipped images."""
    slots = {}  # member name -> (split, index)
    arrays, keep = {}, {}
    for split, names in layout.names.items():
        arrays[split] = writer.allocate(split, len(names), data.image_size)
        keep[split] = np.ones(len(names), dtype=bool)
        slots.update((name, (split, index)) for index, name in enumerate(names))

    skipped = []
    processes = usable_cores()
    log.info("decoding %d images from %s with %d process(es)", len(slots), source.label, processes)
    with decoders(processes) as pool, tqdm(total=len(slots), unit="img", desc="decoding", disable=None) as bar:
        for name, image in decoded(source, set(slots), data, pool, processes):
            split, index = slots[name]
            if isinstance(image, BadImage):
                if data.on_bad_image == "error":
                    raise StageError(f"{image}; fix or remove the file, or set data.on_bad_image: skip") from None
                log.warning("skipping %s", image)
                keep[split][index] = False
                skipped.append(name)
            else:
                arrays[split][index] = image
            bar.update()
    lost = [name for label, name in enumerate(layout.classes) if not keep["train"][layout.labels["train"] == label].any()]
    if lost:
        raise StageError(f"{source.label}: every training image of class {', '.join(lost)} was unreadable")
    for split in layout.names:
        if not keep[split].any():
            raise StageError(f"{source.label}: every {split} image was unreadable")
        writer.finish_split(split, arrays[split], layout.labels[split], keep[split])
    if skipped:
        log.warning("skipped %d unreadable image(s) (data.on_bad_image: skip)", len(skipped))
    return sorted(skipped)


@contextlib.contextmanager
def decoders(processes: int) -> Iterator[ProcessPoolExecutor | None]:
    """A pool of decoding processes, or None with one core. Forked where the platform forks safely (Linux),
    before any thread starts: a spawned worker would import this stage, torch with it, all over again."""
    if processes == 1:
        yield None
        return
    context = multiprocessing.get_context("fork" if sys.platform == "linux" else None)
    with ProcessPoolExecutor(processes, mp_context=context) as pool:
        try:
            yield pool
        except BaseException:
            # Waiting joins the pool's manager thread, at most a few chunks: one still running at exit races
            # Python's own exit hook, which then writes to the pipe the thread is closing ("Bad file descriptor"
            # traceback after the error message; CPython bpo-39098, its lock in gh-125451 is not in 3.11).
            pool.shutdown(wait=True, cancel_futures=True)
            raise


def decoded(source, names: set[str], data: DataParams, pool: ProcessPoolExecutor | None, processes: int
            ) -> Iterator[tuple[str, np.ndarray | BadImage]]:
    """Each named image of the source, decoded, or the reason it cannot be: the source is read here, in
    order (an archive can only be), and decoded by the pool in chunks, a few in flight at a time."""
    if pool is None:
        for name, payload in source.read(names):
            yield name, decode_or_reason(name, payload, source.label, data.image_size, data.max_image_pixels)
        return
    in_flight: collections.deque = collections.deque()
    chunk: list[tuple[str, bytes]] = []
    for name, payload in source.read(names):
        chunk.append((name, payload))
        if len(chunk) == DECODED_TOGETHER:
            in_flight.append(pool.submit(decode_chunk, chunk, source.label, data.image_size, data.max_image_pixels))
            chunk = []
            if len(in_flight) > 2 * processes:
                yield from in_flight.popleft().result()
    if chunk:
        in_flight.append(pool.submit(decode_chunk, chunk, source.label, data.image_size, data.max_image_pixels))
    while in_flight:
        yield from in_flight.popleft().result()


DECODED_TOGETHER = 64  # images a decoding process is sent at once: fewer round trips, little memory


def decode_chunk(chunk: list[tuple[str, bytes]], label: str, image_size: int, max_pixels: int
                 ) -> list[tuple[str, np.ndarray | BadImage]]:
    return [(name, decode_or_reason(name, payload, label, image_size, max_pixels)) for name, payload in chunk]


def decode_or_reason(name: str, payload: bytes, label: str, image_size: int, max_pixels: int) -> np.ndarray | BadImage:
    try:
        return decode_image(payload, image_size, f"{label}: {name}", max_pixels)
    except BadImage as error:
        return error


def describe_source(data: DataParams, classes: list[str], kind: str, made_test_split: bool, skipped: list[str]) -> dict:
    return {
        "source": data.source,
        "source_kind": kind,
        "classes": classes,
        "image_size": data.image_size,
        "made_test_split": made_test_split,
        "skipped": skipped,
    }


if __name__ == "__main__":
    run_stage(main)
