"""Stage 3, train: fit `train.model` on the training set and save it with what is needed to use it.

    python -m stages.train data/prepared data/augmented models/model.pt --live reports/train

Reads params `seed`, `train` and the on-the-fly augmentations `augment.flip`, `augment.crop_padding`.
Per-epoch loss and accuracy go through DVCLive to <live>/plots/metrics/; the run's summary
(train_seconds, images_per_second, device, precision, ...) to <live>/metrics.json, and the
recipe that ran (`train.preset` resolved) to <live>/recipe.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from dvclive import Live
from tqdm import tqdm

from stages.augmentations import random_crop, random_flip
from stages.datasets import load_meta, load_split
from stages.errors import run_stage
from stages.hardware import Compute, resolve_compute
from stages.models import Classifier, ConvNet, build_model, save_checkpoint
from stages.outputs import write_json
from stages.params import Params, TrainParams, load_params

log = logging.getLogger("train")

NORMALIZATION_SAMPLE = 10_000  # images the normalisation and whitening statistics are measured on


@dataclass
class ImageSet:
    images: torch.Tensor  # (N, 3, H, W) uint8, channels_last in memory
    labels: torch.Tensor  # (N,) int64


def main() -> None:
    args = parse_args()
    params = load_params()
    settings = params.train
    torch.manual_seed(params.seed)  # model initialisation; batch order and augmentation use `generator`
    generator = torch.Generator().manual_seed(params.seed)
    compute = resolve_compute(settings.device, settings.precision)
    # cuDNN picks among kernels by timing them unless told not to: same seed, same weights.
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    if settings.threads:
        torch.set_num_threads(settings.threads)

    classes = load_meta(args.prepared)["classes"]
    train_set = load_training_set(Path(args.prepared), Path(args.augmented), compute)
    test_set = to_image_set(load_split(args.prepared, "test"), compute)
    model = create_model(settings, classes, train_set, compute)
    log.info("training %s (%.2fM parameters) on %d images, %s, %d threads", settings.model,
             count_parameters(model) / 1e6, len(train_set.labels), compute.describe(), torch.get_num_threads())

    with Live(args.live, dvcyaml=False, save_dvc_exp=False, report=None) as live:
        train_seconds = fit(model, train_set, test_set, len(classes), params, compute, generator, live)
        images_seen = len(train_set.labels) * settings.epochs
        summary = {
            "train_seconds": round(train_seconds, 2),
            "images_per_second": round(images_seen / train_seconds, 1),
            "device": compute.device.type,
            "precision": compute.precision,
            "threads": torch.get_num_threads(),
            "train_images": len(train_set.labels),
        }
        for name, value in summary.items():
            live.log_metric(name, value, plot=False)

    # The recipe that ran, preset resolved, as a metrics file: `dvc exp show` lists what ran.
    write_json(Path(args.live) / "recipe.json", settings.model_dump(mode="json"))
    description = describe_run(model, classes, train_set.images.shape[-1], params, compute, summary)
    save_checkpoint(Path(args.model), model, description)
    log.info("saved %s: %.1f s of training, %.0f images/s", args.model, train_seconds, summary["images_per_second"])


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("prepared", help="the prepared data set (from download)")
    parser.add_argument("augmented", help="the augmented copies (from augment)")
    parser.add_argument("model", help="where to save the trained model")
    parser.add_argument("--live", default="reports/train", help="DVCLive folder for per-epoch metrics")
    return parser.parse_args()


# --- data ----------------------------------------------------------------------------------


def load_training_set(prepared: Path, augmented: Path, compute: Compute) -> ImageSet:
    """The prepared training images plus augment's offline copies, if it made any."""
    parts = [load_split(prepared, "train")]
    copies = json.loads((augmented / "meta.json").read_text())
    if copies["count"] > 0:
        parts.append(load_split(augmented, "copies"))
    images = np.concatenate([part.images for part in parts])
    labels = np.concatenate([part.labels for part in parts])
    return to_image_set_arrays(images, labels, compute)


def to_image_set(split, compute: Compute) -> ImageSet:
    return to_image_set_arrays(np.array(split.images), split.labels, compute)


def to_image_set_arrays(images: np.ndarray, labels: np.ndarray, compute: Compute) -> ImageSet:
    # NHWC bytes viewed as NCHW are exactly torch's channels_last layout: no copy, and the
    # convolutions' fastest CPU path. On a GPU the whole (uint8) set moves there once.
    images_nchw = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)
    return ImageSet(images_nchw.to(compute.device), torch.from_numpy(labels).to(compute.device))


def batches(count: int, batch_size: int, generator: torch.Generator | None) -> list[torch.Tensor]:
    """Index batches of near-equal size: a shuffled order when given a generator."""
    order = torch.randperm(count, generator=generator) if generator is not None else torch.arange(count)
    return list(torch.tensor_split(order, math.ceil(count / batch_size)))


def as_float(images: torch.Tensor) -> torch.Tensor:
    return images.float().div_(255)


# --- model, optimiser, schedule, loss ------------------------------------------------------


def create_model(settings: TrainParams, classes: list[str], train_set: ImageSet, compute: Compute) -> Classifier:
    # Every k-th image, not the first 10 000: image folders are prepared class by class, so the
    # first images can be a few classes only, and the statistics and whitening would be theirs.
    stride = math.ceil(len(train_set.images) / NORMALIZATION_SAMPLE)
    sample = as_float(train_set.images[::stride].cpu())
    mean = sample.mean(dim=(0, 2, 3)).tolist()
    std = sample.std(dim=(0, 2, 3)).clamp_min(1e-3).tolist()
    model = build_model(settings.model, len(classes), train_set.images.shape[-1], settings.widths, mean, std)
    if isinstance(model.network, ConvNet):
        model.network.fit_whitening(model.normalize(sample))
    return model.to(compute.device, memory_format=torch.channels_last)


def count_parameters(model: torch.nn.Module) -> int:
    return sum(parameter.numel() for parameter in model.parameters())


def make_optimizer(model: torch.nn.Module, settings: TrainParams) -> torch.optim.Optimizer:
    # Weight decay on conv and linear weights only: decaying BatchNorm and bias terms only
    # fights the normalisation (a common finding since Goyal et al., 2017).
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in trainable if p.ndim > 1], "weight_decay": settings.weight_decay},
        {"params": [p for p in trainable if p.ndim <= 1], "weight_decay": 0.0},
    ]
    if settings.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=settings.lr, momentum=settings.momentum, nesterov=settings.nesterov)
    if settings.optimizer == "adam":
        return torch.optim.Adam(groups, lr=settings.lr)
    return torch.optim.RMSprop(groups, lr=settings.lr, momentum=settings.momentum)


def make_schedule(optimizer: torch.optim.Optimizer, settings: TrainParams, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over `warmup_fraction` of the steps, then constant, linear or cosine decay to zero."""
    warmup_steps = int(settings.warmup_fraction * total_steps)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        if settings.schedule == "linear":
            return 1 - progress
        if settings.schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * progress))
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def loss_function(settings: TrainParams, num_classes: int):
    if settings.loss == "mse":
        # MSE between logits and one-hot targets, as in Hui & Belkin (2021), "Evaluation of
        # neural architectures trained with square loss vs cross-entropy".
        return lambda logits, labels: F.mse_loss(logits.float(), F.one_hot(labels, num_classes).float())
    return lambda logits, labels: F.cross_entropy(logits.float(), labels, label_smoothing=settings.label_smoothing)


# --- the loop ------------------------------------------------------------------------------


def fit(model: Classifier, train_set: ImageSet, test_set: ImageSet, num_classes: int, params: Params,
        compute: Compute, generator: torch.Generator, live: Live) -> float:
    """Train for `train.epochs`; log each epoch to `live`; return the training wall time in seconds."""
    settings = params.train
    loss_of = loss_function(settings, num_classes)
    steps_per_epoch = math.ceil(len(train_set.labels) / min(settings.batch_size, len(train_set.labels)))
    optimizer = make_optimizer(model, settings)
    schedule = make_schedule(optimizer, settings, steps_per_epoch * settings.epochs)
    train_seconds = 0.0
    for epoch in range(1, settings.epochs + 1):
        epoch_lr = optimizer.param_groups[0]["lr"]  # where the epoch starts on the schedule
        started = time.perf_counter()
        loss, accuracy = train_one_epoch(model, train_set, params, compute, generator, optimizer, schedule, loss_of, epoch)
        train_seconds += time.perf_counter() - started
        live.log_metric("train/loss", loss)
        live.log_metric("train/accuracy", accuracy)
        live.log_metric("lr", epoch_lr)
        message = f"epoch {epoch}/{settings.epochs}: train loss {loss:.4f}, accuracy {accuracy:.4f}"
        if settings.test_each_epoch or epoch == settings.epochs:
            test_loss, test_accuracy = measure(model, test_set, compute, loss_of, settings.batch_size)
            live.log_metric("test/loss", test_loss)
            live.log_metric("test/accuracy", test_accuracy)
            message += f"; test loss {test_loss:.4f}, accuracy {test_accuracy:.4f}"
        log.info("%s (%.1f s)", message, train_seconds)
        live.next_step()
    return train_seconds


def train_one_epoch(model, train_set: ImageSet, params: Params, compute: Compute, generator, optimizer, schedule,
                    loss_of, epoch: int) -> tuple[float, float]:
    model.train()
    total_loss = torch.zeros((), device=compute.device)
    total_correct = torch.zeros((), device=compute.device)
    index_batches = batches(len(train_set.labels), params.train.batch_size, generator)
    for indices in tqdm(index_batches, desc=f"epoch {epoch}", leave=False, disable=None):
        images = augment_batch(as_float(train_set.images[indices.to(compute.device)]), params, generator)
        labels = train_set.labels[indices.to(compute.device)]
        with compute.autocast():
            logits = model(images)
        loss = loss_of(logits, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        total_loss += loss.detach() * len(labels)
        total_correct += (logits.argmax(dim=1) == labels).sum()
    count = len(train_set.labels)
    return total_loss.item() / count, total_correct.item() / count


def augment_batch(images: torch.Tensor, params: Params, generator: torch.Generator) -> torch.Tensor:
    if params.augment.flip:
        images = random_flip(images, generator)
    return random_crop(images, params.augment.crop_padding, generator).contiguous(memory_format=torch.channels_last)


@torch.inference_mode()
def measure(model: Classifier, image_set: ImageSet, compute: Compute, loss_of, batch_size: int) -> tuple[float, float]:
    """Loss and accuracy on a whole set, without augmentation."""
    model.eval()
    total_loss, total_correct = 0.0, 0
    for indices in batches(len(image_set.labels), batch_size, generator=None):
        indices = indices.to(compute.device)
        with compute.autocast():
            logits = model(as_float(image_set.images[indices]))
        labels = image_set.labels[indices]
        total_loss += loss_of(logits, labels).item() * len(labels)
        total_correct += (logits.argmax(dim=1) == labels).sum().item()
    return total_loss / len(image_set.labels), total_correct / len(image_set.labels)


def describe_run(model: Classifier, classes: list[str], image_size: int, params: Params, compute: Compute,
                 summary: dict) -> dict:
    """Everything a later user of the checkpoint needs besides the weights, as plain values."""
    return {
        "architecture": params.train.model,
        "widths": params.train.widths,  # None for lenet
        "classes": list(classes),
        "image_size": image_size,
        "normalization": {"mean": model.normalize.mean.flatten().tolist(), "std": model.normalize.std.flatten().tolist()},
        "params": params.model_dump(mode="json"),
        "compute": {"device": compute.device.type, "precision": compute.precision},
        "summary": summary,
        "torch_version": str(torch.__version__),  # TorchVersion is not a plain str: weights_only refuses it
    }


if __name__ == "__main__":
    run_stage(main)
