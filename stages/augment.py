"""Stage 2, augment: the offline part of data augmentation, and a preview of all of it.

    python -m stages.augment data/prepared data/augmented --preview reports/augment_preview.png --stats reports/augment.json

Writes `augment.copies` augmented copies of every training image with a torchvision
`transforms.v2` policy (`augment.policy`), seeded so that the same params give the same bytes.
The originals are not copied: train reads them from data/prepared and the copies from here,
so `copies: 0` costs no disk at all. Flips and translations are cheap enough to be done by
train on every batch: they belong to the training recipe (`train.flip`, `train.translate`).
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms import v2
from torchvision.utils import make_grid
from tqdm import tqdm

from stages.datasets import PreparedWriter, load_split
from stages.errors import run_stage
from stages.outputs import atomic_path, write_json
from stages.params import AugmentParams, load_params

log = logging.getLogger("augment")

PREVIEW_SCALE = 3  # 32-pixel images are too small to judge at their own size


def main() -> None:
    args = parse_args()
    params = load_params()
    started = time.perf_counter()
    train = load_split(args.prepared, "train")
    policy = build_policy(params.augment.policy)
    with PreparedWriter(args.out) as writer:
        count = write_copies(writer, train, policy, params.augment.copies, params.seed)
        writer.commit({"copies": params.augment.copies, "policy": params.augment.policy, "count": count})
    save_preview(Path(args.preview), train.images, policy, params.augment, params.seed)
    stats = {"augment_seconds": round(time.perf_counter() - started, 2), "augmented_images": count}
    write_json(Path(args.stats), stats)
    log.info("wrote %d augmented images (%s, %d copies) in %.1f s", count, params.augment.policy,
             params.augment.copies, stats["augment_seconds"])


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("prepared", help="the prepared data set (from download)")
    parser.add_argument("out", help="where to write the augmented copies")
    parser.add_argument("--preview", default="reports/augment_preview.png", help="preview grid to write")
    parser.add_argument("--stats", default="reports/augment.json", help="timings and counts")
    return parser.parse_args()


def build_policy(name: str) -> v2.Transform | None:
    """The torchvision policy `augment.policy` names, working on uint8 (3, H, W) tensors."""
    if name == "trivialaugment":
        return v2.TrivialAugmentWide()
    if name == "randaugment":
        return v2.RandAugment()
    if name == "autoaugment":
        return v2.AutoAugment(v2.AutoAugmentPolicy.CIFAR10)
    if name == "augmix":
        return v2.AugMix()
    return None


def write_copies(writer: PreparedWriter, train, policy: v2.Transform | None, copies: int, seed: int) -> int:
    """Write `copies` augmented versions of every training image as the split `copies`."""
    count = len(train.labels) * copies
    if count == 0:
        return 0
    log.info("augmenting %d training images, %d copies each", len(train.labels), copies)
    target = writer.allocate("copies", count, train.images.shape[1])
    # The policies draw from torch's global generator; one seed per copy keeps copy k the same
    # whatever the number of copies.
    with tqdm(total=count, unit="img", desc="augmenting", disable=None) as bar:
        for copy in range(copies):
            torch.manual_seed(seed * 1_000 + copy)
            for index in range(len(train.labels)):
                image = torch.from_numpy(np.array(train.images[index])).permute(2, 0, 1)
                target[copy * len(train.labels) + index] = policy(image).permute(1, 2, 0).numpy()
                bar.update()
    writer.finish_split("copies", target, np.tile(train.labels, copies))
    return count


def save_preview(path: Path, images: np.ndarray, policy: v2.Transform | None, settings: AugmentParams, seed: int) -> None:
    """A grid: a row of originals, then three rows of what the policy makes of them (if any)."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    picks = torch.randperm(len(images), generator=generator)[: settings.preview_images].sort().values
    originals = torch.from_numpy(np.stack([images[i] for i in picks.tolist()])).permute(0, 3, 1, 2)
    rows = [originals]
    if policy is not None:
        rows += [torch.stack([policy(image) for image in originals]) for _ in range(3)]
    grid = make_grid(torch.cat(rows), nrow=len(originals), padding=2, pad_value=255)
    grid = F.interpolate(grid[None].float(), scale_factor=PREVIEW_SCALE, mode="nearest")[0].to(torch.uint8)
    with atomic_path(path) as partial:
        Image.fromarray(grid.permute(1, 2, 0).numpy()).save(partial, format="PNG")


if __name__ == "__main__":
    run_stage(main)
