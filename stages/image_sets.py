"""The images train learns from and scores on: in memory when they fit `train.memory_budget`, else read in
batches from download's (and augment's) memory-mapped arrays by DataLoader worker processes.

Both give the same batches for the same index batches: same seed, same metrics. In memory, a set is one
uint8 tensor (on a GPU, moved there once); streamed, only the batches in flight are in memory, and the
memory-mapped pages the kernel keeps are file-backed, dropped under pressure, not the process's own.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psutil
import torch
from torch.utils.data import DataLoader, Dataset

from stages.datasets import Split
from stages.errors import StageError
from stages.hardware import return_freed_memory, usable_cores
from stages.models import as_images_nchw

log = logging.getLogger("train")

AUTO = "auto"
AUTO_SHARE = 0.5  # of the memory available: the rest is for the model, its activations and the page cache
PREFETCHED = 2  # batches each loader worker keeps ready (DataLoader's prefetch_factor)


@dataclass
class ImageSet:
    """A set in memory."""

    images: torch.Tensor  # (N, 3, H, W) uint8, channels_last in memory
    labels: torch.Tensor  # (N,) int64

    @property
    def count(self) -> int:
        return len(self.labels)

    @property
    def side(self) -> int:
        return self.images.shape[-1]

    def every(self, stride: int) -> torch.Tensor:
        """Every `stride`-th image, (n, 3, H, W) uint8 on the CPU."""
        return self.images[::stride].cpu()

    def batches(self, index_batches: Sequence[torch.Tensor]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for indices in index_batches:
            indices = indices.to(self.images.device)
            yield self.images[indices], self.labels[indices]


class MappedRows(Dataset):
    """Rows of one or more memory-mapped (N, H, W, 3) arrays, read as one: what a loader worker fetches.
    Holds the files' paths, not the maps: each worker process maps them itself."""

    def __init__(self, files: Sequence[Path]):
        self.files = list(files)
        self.arrays: list[np.ndarray] | None = None
        self.ends = np.cumsum([mapped(file).shape[0] for file in self.files])

    def __len__(self) -> int:
        return int(self.ends[-1])

    def __getitems__(self, indices: Sequence[int]) -> torch.Tensor:
        if self.arrays is None:
            self.arrays = [mapped(file) for file in self.files]
        indices = np.asarray(indices)
        parts = np.searchsorted(self.ends, indices, side="right")
        starts = np.concatenate([[0], self.ends[:-1]])
        rows = np.empty((len(indices), *self.arrays[0].shape[1:]), dtype=np.uint8)
        for part in np.unique(parts):
            chosen = parts == part
            rows[chosen] = self.arrays[part][indices[chosen] - starts[part]]
        return torch.from_numpy(rows)


def mapped(file: Path) -> np.ndarray:
    return np.load(file, mmap_mode="r")


def as_batch(rows: torch.Tensor) -> torch.Tensor:
    return rows  # __getitems__ gives the whole batch already: nothing to collate


class StreamedImageSet:
    """A set read in batches from its memory-mapped files by `workers` processes."""

    def __init__(self, files: Sequence[Path], labels: np.ndarray, device: torch.device, workers: int):
        self.rows = MappedRows(files)
        self.labels = torch.from_numpy(labels).to(device)
        self.device = device
        self.workers = workers
        self.side = mapped(files[0]).shape[2]

    @property
    def count(self) -> int:
        return len(self.labels)

    def every(self, stride: int) -> torch.Tensor:
        return as_images_nchw(self.rows.__getitems__(range(0, len(self.rows), stride)).numpy())

    def batches(self, index_batches: Sequence[torch.Tensor]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        loader = DataLoader(self.rows, batch_sampler=[indices.tolist() for indices in index_batches],
                            collate_fn=as_batch, num_workers=self.workers,
                            prefetch_factor=PREFETCHED if self.workers else None,
                            pin_memory=self.device.type == "cuda")
        for rows, indices in zip(loader, index_batches):
            images = as_images_nchw(rows.numpy()).to(self.device, non_blocking=True)
            yield images, self.labels[indices.to(self.device)]


def load_image_sets(train_parts: Sequence[tuple[Path, Split]], test: tuple[Path, Split], batch_size: int,
                    budget: int | str, workers: int | str, device: torch.device
                    ) -> tuple[ImageSet | StreamedImageSet, ImageSet | StreamedImageSet]:
    """The training set (its parts one after the other) and the test set: in memory when both fit the
    budget, else both streamed. `*_parts` are (images file, split) pairs."""
    splits = [split for _, split in train_parts] + [test[1]]
    needed = sum(split.images.nbytes for split in splits)
    budget_bytes = resolve_budget(budget)
    if needed <= budget_bytes:
        log.info("the images in memory: %s of train.memory_budget %s", in_words(needed), in_words(budget_bytes))
        train_images = np.concatenate([split.images for split in splits[:-1]])
        train_labels = np.concatenate([split.labels for split in splits[:-1]])
        return in_memory(train_images, train_labels, device), in_memory(test[1].images, test[1].labels, device)
    worker_count = resolve_workers(workers)
    batch_bytes = batch_size * math.prod(splits[0].images.shape[1:])
    smallest = batch_bytes * batches_in_flight(worker_count)
    if budget_bytes < smallest:
        raise StageError(f"train.memory_budget is {in_words(budget_bytes)}, too small for one batch: train.batch_size "
                         f"{batch_size} images of {'x'.join(map(str, splits[0].images.shape[1:]))} bytes each, "
                         f"{batches_in_flight(worker_count)} batches in flight with {worker_count} loader worker(s), "
                         f"take {in_words(smallest)}; set train.memory_budget to at least {smallest} (or auto), or "
                         "lower train.batch_size")
    log.info("streaming the images from their memory maps with %d loader worker(s): %s do not fit "
             "train.memory_budget %s", worker_count, in_words(needed), in_words(budget_bytes))
    return_freed_memory()  # the loader workers, forked later, inherit it
    train_labels = np.concatenate([split.labels for _, split in train_parts])
    return (StreamedImageSet([file for file, _ in train_parts], train_labels, device, worker_count),
            StreamedImageSet([test[0]], test[1].labels, device, worker_count))


def in_memory(images: np.ndarray, labels: np.ndarray, device: torch.device) -> ImageSet:
    # Kept as uint8, a quarter of the floats' memory; on a GPU the whole set moves there once.
    return ImageSet(as_images_nchw(images).to(device), torch.from_numpy(labels).to(device))


def batches_in_flight(workers: int) -> int:
    """Batches a streamed set holds at once: each worker's prefetched ones, and the one training."""
    return workers * PREFETCHED + 1


def resolve_budget(budget: int | str) -> int:
    """train.memory_budget in bytes; `auto`: a share of the memory available now, within a cgroup's limit."""
    if budget != AUTO:
        return int(budget)
    available = psutil.virtual_memory().available
    limit = cgroup_memory_left()
    return int(AUTO_SHARE * min(available, limit if limit is not None else available))


def cgroup_memory_left() -> int | None:
    """What the cgroup v2 this process runs in (a container, `systemd-run -p MemoryMax=`) still allows."""
    try:
        own = Path("/proc/self/cgroup").read_text().strip().split("::", 1)[1]
        folder = Path("/sys/fs/cgroup") / own.lstrip("/")
        limit = (folder / "memory.max").read_text().strip()
        if limit == "max":
            return None
        return int(limit) - int((folder / "memory.current").read_text())
    except (OSError, IndexError, ValueError):
        return None  # not Linux, cgroup v1, or no limit readable


def resolve_workers(workers: int | str) -> int:
    """train.loader_workers; `auto`: a quarter of the cores this process may use (1 to 4), so that the
    rest train; 0 reads in the training process itself."""
    if workers != AUTO:
        return int(workers)
    return max(1, min(4, usable_cores() // 4))


def in_words(size: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size} bytes"
