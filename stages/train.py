"""Stage 3, train: fit `train.model` on the training set and save it with what is needed to use it.

    python -m stages.train data/prepared data/augmented models/model.pt --live reports/train

Reads params `seed`, `train` (with the preset it names under `presets`).
Per-epoch loss and accuracy go through DVCLive to <live>/plots/metrics/; the run's summary
(train_seconds, images_per_second, device, precision, ...) to <live>/metrics.json, and the
recipe that ran (`train.preset` resolved) to <live>/params.yaml, as DVCLive logs params.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.utils import parametrize
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.flop_counter import FlopCounterMode
from dvclive import Live
from tqdm import tqdm

from stages import distributed
from stages.augmentations import flip_chosen, random_crop, random_flip
from stages.datasets import Split, load_meta, load_split
from stages.distributed import Ranks, Replicas
from stages.errors import StageError, run_stage
from stages.hardware import Compute, resolve_compute
from stages.image_sets import ImageSet, StreamedImageSet, in_words, load_image_sets, resolve_budget, resolve_workers
from stages.architectures import family_of, main_and_auxiliary
from stages.models import (Classifier, ConvNet, ScatterNet, as_unit_floats, build_model, head_parameters,
                           save_checkpoint, smallest_image_side)
from stages.outputs import atomic_folder
from stages.params import RANDOM, Params, TrainParams, load_params
from stages.pretrained import load_initial_weights
from stages.privacy import (MEMORY_FORMAT as PRIVATE_MEMORY_FORMAT, PUBLIC_MEAN, PUBLIC_STD, Budget, PrivateSteps,
                            check_per_image_gradients, poisson_batches)

log = logging.getLogger("train")

# The normalisation and whitening statistics are measured on 10,000 images, or as many as hold as many
# pixels as 10,000 of CIFAR's: their floats (120 MB) stay small beside any train.memory_budget.
NORMALIZATION_SAMPLE = 10_000
NORMALIZATION_PIXELS = NORMALIZATION_SAMPLE * 32 * 32


def main() -> None:
    args = parse_args()
    params = load_params()
    settings = params.train
    if distributed.wanted(settings) and not distributed.launched():
        # Refused here, before a process is started for nothing; a rank checks again (torchrun by hand).
        check_batches_for_ranks(count_training_images(args), settings.batch_size, settings.processes * settings.nodes)
        distributed.launch(settings, sys.argv[1:])  # which runs this module again, as each rank
        return
    compute = resolve_compute(settings.device, settings.precision)
    ranks, compute = distributed.join(compute)
    with distributed.failures_reported(ranks):
        train(args, params, compute, ranks)


def train(args: argparse.Namespace, params: Params, compute: Compute, ranks: Ranks) -> None:
    settings = params.train
    if ranks.several and settings.target_epsilon is not None:  # launched by hand: params.yaml said one process
        raise StageError(f"{ranks.world} processes (torchrun) with a private run (train.target_epsilon "
                         f"{settings.target_epsilon}): its accounting assumes one process drawing every Poisson "
                         "batch; run it as one process")
    torch.manual_seed(params.seed)  # model initialisation; batch order and augmentation use `generator`
    generator = torch.Generator().manual_seed(params.seed)
    # cuDNN picks among kernels by timing them unless told not to: same seed, same weights.
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    if ranks.several:
        torch.set_num_threads(distributed.threads_per_rank(settings.threads, ranks.local_world))
    elif settings.threads:
        torch.set_num_threads(settings.threads)

    classes = load_meta(args.prepared)["classes"]
    started = time.perf_counter()
    parts = training_parts(Path(args.prepared), Path(args.augmented))
    if settings.target_epsilon is not None:
        check_private_data(parts, settings)
    train_set, test_set = load_image_sets(parts, split_file(Path(args.prepared), "test"), settings.batch_size,
                                          *machine_share(settings, ranks), compute.device)
    load_seconds = time.perf_counter() - started
    model = create_model(settings, classes, train_set)
    initial_weights = None if settings.weights == RANDOM else load_initial_weights(model, settings.model, settings.weights)
    model = model.to(compute.device, memory_format=memory_format(settings))
    if ranks.several:
        check_batches_for_ranks(train_set.count, settings.batch_size, ranks.world)
        if compute.device.type == "cuda":  # on CPU (gloo) torch has no SyncBatchNorm: each rank's own statistics
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if settings.target_epsilon is not None:
        check_per_image_gradients(model, settings.model, train_set.side)
    smallest = smallest_image_side(settings.model)
    if settings.resize_from is not None and settings.resize_from < smallest:
        raise StageError(f"train.resize_from is {settings.resize_from}, but train.model {settings.model} needs images "
                         f"of side ≥ {smallest}")
    if settings.unused:
        log.info("not used by this recipe (set by preset %s): %s", settings.preset,
                 ", ".join(f"{key} {getattr(settings, key)}" for key in settings.unused))
    log.info("training %s (%.2fM parameters) on %d images, %s, %d threads%s", settings.model,
             count_parameters(model) / 1e6, train_set.count, compute.describe(), torch.get_num_threads(),
             f" in each of {ranks.world} processes" if ranks.several else "")

    with live_logger(args.live, ranks) as live:
        # The recipe that ran, preset resolved, as params: `dvc exp show` lists it among them.
        live.log_params(settings.model_dump(mode="json"))
        train_seconds, privacy, flops = fit(model, train_set, test_set, len(classes), params, compute, generator,
                                            live, ranks)
        images_seen = train_set.count * settings.epochs
        steps = math.ceil(train_set.count / min(settings.batch_size, train_set.count)) * settings.epochs
        allreduce = distributed.allreduce_seconds(model, ranks) if ranks.several else None
        summary = {
            "load_seconds": round(load_seconds, 3),  # the prepared train and test sets into memory
            "train_seconds": round(train_seconds, 2),
            "images_per_second": round(images_seen / train_seconds, 1),
            "device": compute.device.type,
            "precision": compute.precision,
            "threads": torch.get_num_threads(),  # each process's
            "processes": ranks.world,
            "parameters": count_parameters(model),
            "train_flops": flops.total,  # what the training steps computed, as FlopCount says
            # Several processes: one all-reduce of the gradients across them, and its share of a step's time.
            "allreduce_seconds": round(allreduce, 5) if allreduce is not None else None,
            "allreduce_share": round(allreduce / (train_seconds / steps), 4) if allreduce is not None else None,
            "train_images": train_set.count,
            # Null for a run without a privacy guarantee: `dvc exp show` keeps the same columns for every run.
            "epsilon": privacy["epsilon"] if privacy else None,
            "delta": privacy["delta"] if privacy else None,
        }
        for name, value in summary.items():
            if value is not None:  # DVCLive takes numbers only
                live.log_metric(name, value, plot=False)

    distributed.check_in_step(model, ranks)
    if not ranks.main:
        return
    description = describe_run(model, classes, train_set.side, params, compute, summary)
    description["initial_weights"] = initial_weights  # the file and its sha256: `dvc repro` does not watch it
    description["privacy"] = privacy  # what the run spent, None if it was not private
    save_checkpoint(Path(args.model), model, description)
    log.info("saved %s: %.1f s of training, %.0f images/s", args.model, train_seconds, summary["images_per_second"])


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("prepared", help="the prepared data set (from download)")
    parser.add_argument("augmented", help="the augmented copies (from augment)")
    parser.add_argument("model", help="where to save the trained model")
    parser.add_argument("--live", default="reports/train", help="DVCLive folder for per-epoch metrics")
    return parser.parse_args()


# --- several processes (stages/distributed.py) ---------------------------------------------


def count_training_images(args: argparse.Namespace) -> int:
    return sum(len(split.labels) for _, split in training_parts(Path(args.prepared), Path(args.augmented)))


def check_batches_for_ranks(images: int, batch_size: int, world: int) -> None:
    smallest = images // math.ceil(images / min(batch_size, images))  # batches() splits near-equally
    if smallest < world:
        raise StageError(f"train.processes: {world} processes in all, but the {images} training images in "
                         f"batches of train.batch_size {batch_size} give batches of {smallest} images, less than "
                         f"one a process: use at most {smallest} processes, or a larger batch_size")


def machine_share(settings: TrainParams, ranks: Ranks) -> tuple[int | str, int | str]:
    """train.memory_budget and train.loader_workers are the machine's: each of its ranks gets its share."""
    if not ranks.several:
        return settings.memory_budget, settings.loader_workers
    return (resolve_budget(settings.memory_budget) // ranks.local_world,
            max(0, resolve_workers(settings.loader_workers) // ranks.local_world))


@contextlib.contextmanager
def live_logger(live: str, ranks: Ranks):
    """DVCLive, writing into a hidden folder that becomes <live> at the end: a run killed midway leaves no curves or
    summary that look like a finished run's. Only rank 0 logs: DVCLive in two processes would race on the signal
    files it keeps in the DVC repository's .dvc/tmp (one removed what the other was about to)."""
    if not ranks.main:
        yield distributed.SILENT
        return
    with atomic_folder(live) as folder, Live(folder, dvcyaml=False, save_dvc_exp=False, report=None) as logger:
        yield logger


# --- data ----------------------------------------------------------------------------------


def training_parts(prepared: Path, augmented: Path) -> list[tuple[Path, Split]]:
    """The prepared training images plus augment's offline copies, if it made any."""
    parts = [split_file(prepared, "train")]
    copies = json.loads((augmented / "meta.json").read_text())
    if copies["count"] > 0:
        parts.append(split_file(augmented, "copies", made_by="augment"))
    return parts


def split_file(folder: Path, split: str, made_by: str = "download") -> tuple[Path, Split]:
    return folder / f"{split}_images.npy", load_split(folder, split, made_by)


def check_private_data(parts: list[tuple[Path, Split]], settings: TrainParams) -> None:
    """What a private run may learn from: the prepared training images only, each counted once, with δ below
    one in their number (else a mechanism that gives away one whole image would qualify)."""
    if len(parts) > 1:
        copies = len(parts[1][1].labels)
        raise StageError(f"train.target_epsilon is {settings.target_epsilon} (a private run), but augment made {copies} "
                         "offline copies of the training images (augment.copies > 0): a copy is the same person's "
                         "image again, which DP-SGD's accounting counts once; set augment.copies to 0 (train's own "
                         "flips and translations, train.flip and train.translate, are drawn afresh each step and "
                         "are allowed)")
    images = len(parts[0][1].labels)
    if settings.delta >= 1 / images:
        raise StageError(f"train.delta is {settings.delta}, not below 1 / {images} training images ({1 / images:.3g}): "
                         f"choose one well below it (e.g. {10 ** math.floor(math.log10(0.1 / images)):.0e})")


def batches(count: int, batch_size: int, generator: torch.Generator | None) -> list[torch.Tensor]:
    """Index batches of near-equal size: a shuffled order when given a generator."""
    order = torch.randperm(count, generator=generator) if generator is not None else torch.arange(count)
    return list(torch.tensor_split(order, math.ceil(count / batch_size)))


# --- model, optimiser, schedule, loss ------------------------------------------------------


def create_model(settings: TrainParams, classes: list[str], train_set: ImageSet | StreamedImageSet) -> Classifier:
    if settings.target_epsilon is not None:
        return create_private_model(settings, classes, train_set.side)
    # Every k-th image, not the first 10 000: image folders are prepared class by class, so the
    # first images can be a few classes only, and the statistics and whitening would be theirs.
    sample_size = max(1, min(NORMALIZATION_SAMPLE, NORMALIZATION_PIXELS // train_set.side**2))
    stride = math.ceil(train_set.count / sample_size)
    sample = as_unit_floats(train_set.every(stride))
    mean = sample.mean(dim=(0, 2, 3)).tolist()
    std = sample.std(dim=(0, 2, 3)).clamp_min(1e-3).tolist()
    model = build_model(settings.model, len(classes), train_set.side, settings.widths, mean, std)
    if isinstance(model.network, ConvNet):
        model.network.fit_whitening(model.normalize(sample))
        if settings.whiten_bias_epochs == 0:
            model.network.whiten.bias.requires_grad_(False)
    set_up_batchnorm(model, settings)
    return model


def create_private_model(settings: TrainParams, classes: list[str], side: int) -> Classifier:
    """Nothing measured on the training images outside DP-SGD's accounting: ImageNet's published statistics
    normalise, and convnet's first layer is trained like the others instead of fitted as a whitening."""
    model = build_model(settings.model, len(classes), side, settings.widths, PUBLIC_MEAN, PUBLIC_STD, private=True)
    if isinstance(model.network, ConvNet):
        model.network.whiten.weight.requires_grad_(True)
        if settings.whiten_bias_epochs == 0:
            model.network.whiten.bias.requires_grad_(False)
    return model


def set_up_batchnorm(model: torch.nn.Module, settings: TrainParams) -> None:
    momentum = settings.batchnorm_momentum
    if momentum is None:
        momentum = family_of(settings.model).batchnorm_momentum
    for layer in model.modules():
        if isinstance(layer, torch.nn.BatchNorm2d):
            if momentum is not None:  # else the network's own
                layer.momentum = momentum
            # Frozen at 1, as airbench: BatchNorm only standardises and shifts; the next conv scales.
            layer.weight.requires_grad_(not settings.frozen_batchnorm_scale)


def count_parameters(model: torch.nn.Module) -> int:
    return sum(parameter.numel() for parameter in model.parameters())


def make_optimizers(model: Classifier, settings: TrainParams) -> list[torch.optim.Optimizer]:
    """One optimiser for every parameter, or for `muon` two: Muon for the conv filters, SGD for the rest."""
    groups = parameter_groups(model, settings)
    if settings.optimizer == "muon":
        # Muon orthogonalises each conv filter bank's update (as a matrix); SGD trains the rest.
        filters = [flatten_filters(conv) for conv in trainable_convs(model)]
        muon = torch.optim.Muon(filters, lr=settings.lr, momentum=settings.muon_momentum, nesterov=settings.nesterov,
                                weight_decay=0.0, ns_steps=settings.muon_ns_steps, adjust_lr_fn="original")
        optimizers = [muon, sgd(groups.without_filters(), settings)]
    elif settings.optimizer == "sgd":
        optimizers = [sgd(groups.all(), settings)]
    elif settings.optimizer == "adam":
        optimizers = [torch.optim.AdamW(groups.all(), lr=settings.lr)]
    else:
        optimizers = [torch.optim.RMSprop(groups.all(), lr=settings.lr, momentum=settings.momentum)]
    return optimizers


def sgd(groups: list[dict], settings: TrainParams) -> torch.optim.SGD:
    return torch.optim.SGD(groups, lr=settings.lr, momentum=settings.momentum, nesterov=settings.nesterov)


@dataclass
class ParameterGroups:
    """The trainable parameters by role, each role with its learning rate and weight decay."""

    filters: list[torch.nn.Parameter]  # conv weights
    head: list[torch.nn.Parameter]  # the last linear layer's weight
    weights: list[torch.nn.Parameter]  # other conv and linear weights
    biases: list[torch.nn.Parameter]  # biases, BatchNorm shifts and scales
    whitening_bias: list[torch.nn.Parameter]  # convnet's first layer, on its own schedule
    settings: TrainParams

    def all(self) -> list[dict]:
        decayed = self.settings.weight_decay
        return nonempty([self.group(self.filters + self.weights, self.settings.lr, decayed),
                         self.group(self.head, self.head_lr, decayed),
                         self.group(self.biases, self.bias_lr, 0.0),
                         self.group(self.whitening_bias, self.bias_lr, 0.0, whitening=True)])

    def without_filters(self) -> list[dict]:
        # As airbench: with Muon (filters renormalised each step), weight decay goes to the rest.
        decayed = self.settings.weight_decay
        return nonempty([self.group(self.head + self.weights, self.head_lr, decayed),
                         self.group(self.biases, self.bias_lr, decayed),
                         self.group(self.whitening_bias, self.bias_lr, decayed, whitening=True)])

    @property
    def head_lr(self) -> float:
        return self.settings.head_lr or self.settings.lr

    @property
    def bias_lr(self) -> float:
        return self.settings.bias_lr or self.settings.lr

    @staticmethod
    def group(params: list, lr: float, weight_decay: float, whitening: bool = False) -> dict:
        # Decoupled weight decay: torch's coupled decay scaled by 1/lr shrinks the weights by
        # `weight_decay` per step at the peak learning rate whatever the group's lr, and follows
        # the schedule (Loshchilov & Hutter, 2019).
        return {"params": params, "lr": lr, "weight_decay": weight_decay / lr, "whitening": whitening}


def nonempty(groups: list[dict]) -> list[dict]:
    return [group for group in groups if group["params"]]


def parameter_groups(model: Classifier, settings: TrainParams) -> ParameterGroups:
    head_weights = [p for p in head_parameters(model) if p.ndim >= 2]  # its biases are biases
    whitening = [model.network.whiten.bias] if isinstance(model.network, ConvNet) else []
    special = {id(p) for p in [*head_weights, *whitening]}
    trainable = [p for p in model.parameters() if p.requires_grad and id(p) not in special]
    return ParameterGroups(
        filters=[p for p in trainable if p.ndim == 4],
        head=[p for p in head_weights if p.requires_grad],
        weights=[p for p in trainable if p.ndim in (2, 3)],
        biases=[p for p in trainable if p.ndim <= 1],
        whitening_bias=[p for p in whitening if p.requires_grad],
        settings=settings,
    )


def trainable_convs(model: torch.nn.Module) -> list[torch.nn.Conv2d]:
    return [layer for layer in model.modules() if isinstance(layer, torch.nn.Conv2d) and layer.weight.requires_grad]


class FlatFilters(torch.nn.Module):
    """A conv weight kept as a matrix, one row per filter (torch.optim.Muon takes 2-D parameters only),
    seen by the conv as its (out, in, kh, kw) weight in channels_last order."""

    def __init__(self, shape: torch.Size):
        super().__init__()
        self.shape = shape

    def forward(self, matrix: torch.Tensor) -> torch.Tensor:
        out, channels, height, width = self.shape
        return matrix.view(out, height, width, channels).permute(0, 3, 1, 2)

    def right_inverse(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.permute(0, 2, 3, 1).reshape(len(weight), -1)


def flatten_filters(conv: torch.nn.Conv2d) -> torch.nn.Parameter:
    parametrize.register_parametrization(conv, "weight", FlatFilters(conv.weight.shape), unsafe=True)
    return conv.parametrizations.weight.original


def unflatten_filters(model: torch.nn.Module) -> None:
    """Back to plain conv weights, for the checkpoint."""
    for layer in model.modules():
        if parametrize.is_parametrized(layer, "weight"):
            parametrize.remove_parametrizations(layer, "weight", leave_parametrized=True)


@torch.no_grad()
def renormalise_filters(optimizer: torch.optim.Optimizer) -> None:
    """Each filter bank back to norm sqrt(filters) before Muon's step: airbench's Muon keeps the
    weights' scale fixed (BatchNorm makes the net blind to it) so its steps keep their size."""
    for group in optimizer.param_groups:
        for matrix in group["params"]:
            if matrix.requires_grad:  # not while train.freeze_epochs holds the backbone as loaded
                matrix.mul_(len(matrix) ** 0.5 / matrix.norm())


def make_schedules(optimizers: list[torch.optim.Optimizer], settings: TrainParams, steps_per_epoch: int
                   ) -> list[torch.optim.lr_scheduler.LambdaLR]:
    """Linear warm-up over `warmup_fraction` of the steps, then constant, linear or cosine decay to
    zero; the whitening bias, when `whiten_bias_epochs` is set, decays to zero over those epochs."""
    total_steps = steps_per_epoch * settings.epochs
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

    def whitening_factor(step: int) -> float:
        if settings.whiten_bias_epochs is None:
            return factor(step)
        return max(0.0, 1 - step / (steps_per_epoch * settings.whiten_bias_epochs))

    return [torch.optim.lr_scheduler.LambdaLR(optimizer, [whitening_factor if group.get("whitening") else factor
                                                          for group in optimizer.param_groups])
            for optimizer in optimizers]


def loss_function(settings: TrainParams, num_classes: int):
    if settings.loss == "mse":
        # MSE between logits and one-hot targets, as in Hui & Belkin (2021), "Evaluation of
        # neural architectures trained with square loss vs cross-entropy".
        return lambda logits, labels: F.mse_loss(logits.float(), F.one_hot(labels, num_classes).float())
    return lambda logits, labels: F.cross_entropy(logits.float(), labels, label_smoothing=settings.label_smoothing)


# --- the loop ------------------------------------------------------------------------------


def fit(model: Classifier, train_set: ImageSet, test_set: ImageSet, num_classes: int, params: Params,
        compute: Compute, generator: torch.Generator, live: Live, ranks: Ranks = Ranks()
        ) -> tuple[float, dict | None, FlopCount]:
    """Train for `train.epochs`; log each epoch to `live`; return the training wall time in seconds, for a
    private run what it spent, and the FLOPs the steps computed."""
    settings = params.train
    loss_of = loss_function(settings, num_classes)
    steps_per_epoch = math.ceil(train_set.count / min(settings.batch_size, train_set.count))
    optimizers = make_optimizers(model, settings)
    schedules = make_schedules(optimizers, settings, steps_per_epoch)
    average = weight_average(model, settings.ema_decay)
    kept = average.module if average is not None else model  # what is scored each epoch, and saved
    flips = Flips(settings.flip, train_set.count, generator, distributed.rank_generator(params.seed, ranks, generator))
    replicas = Replicas(ranks, compute)
    backbone = Backbone(model)
    flops = FlopCount()
    private = private_steps(model, optimizers, settings, train_set.count, steps_per_epoch, generator)
    started = time.perf_counter()
    train_set, test_set = features_once(model, train_set, test_set, settings)
    train_seconds = time.perf_counter() - started
    for epoch in range(1, settings.epochs + 1):
        backbone.freeze(epoch <= settings.freeze_epochs and "freeze_epochs" not in settings.unused)
        if isinstance(model.network, ConvNet) and epoch > (settings.whiten_bias_epochs or math.inf):
            # Frozen, not merely at lr 0: the first conv then needs no input gradient (~5 % a step).
            model.network.whiten.bias.requires_grad_(False)
        epoch_lr = optimizers[0].param_groups[0]["lr"]  # where the epoch starts on the schedule
        started = time.perf_counter()
        loss, accuracy = train_one_epoch(model, backbone, train_set, settings, compute, generator, optimizers,
                                         schedules, loss_of, flips, epoch, average, private, replicas, flops)
        train_seconds += time.perf_counter() - started
        live.log_metric("train/loss", loss)
        live.log_metric("train/accuracy", accuracy)
        live.log_metric("lr", epoch_lr)
        message = f"epoch {epoch}/{settings.epochs}: train loss {loss:.4f}, accuracy {accuracy:.4f}"
        if private is not None:
            live.log_metric("epsilon", private.epsilon)  # spent so far
            message += f", ε {private.epsilon:.3f}"
        if ranks.main and (settings.test_each_epoch or epoch == settings.epochs):
            test_loss, test_accuracy = measure(kept, test_set, compute, loss_of, settings.batch_size)
            live.log_metric("test/loss", test_loss)
            live.log_metric("test/accuracy", test_accuracy)
            message += f"; test loss {test_loss:.4f}, accuracy {test_accuracy:.4f}"
        log.info("%s (%.1f s)", message, train_seconds)
        live.next_step()
    if private is not None:
        private.close()
    if average is not None:
        model.load_state_dict(kept.state_dict())
    unflatten_filters(model)
    return train_seconds, private.spent() if private is not None else None, flops


def private_steps(model: Classifier, optimizers: list[torch.optim.Optimizer], settings: TrainParams, images: int,
                  steps_per_epoch: int, generator: torch.Generator) -> PrivateSteps | None:
    """For a private run, the optimiser made DP-SGD's, its noise calibrated to the steps planned."""
    if settings.target_epsilon is None:
        return None
    budget = Budget(settings.target_epsilon, settings.delta, settings.max_grad_norm, settings.accountant,
                    sample_rate=min(1.0, settings.batch_size / images), steps=steps_per_epoch * settings.epochs)
    noise_seed = int(torch.randint(2**62, (1,), generator=generator))  # a stream of its own, from `seed`
    private = PrivateSteps(model, optimizers[0], budget, images, noise_seed)
    log.info("DP-SGD: ε %.3g at δ %.3g over %d steps of Poisson batches (q %.4g): noise multiplier %.4f, each image's "
             "gradient clipped to %.3g, %s accountant", budget.target_epsilon, budget.delta, budget.steps,
             budget.sample_rate, private.noise_multiplier, budget.max_grad_norm, budget.accountant)
    return private


# kymatio scatters fastest in batches of a few hundred images (2 cores of a Xeon: ~500 images/s in batches of 64 or
# 256, 361 in batches of 1,024, ~180 in the private preset's 8,192).
SCATTERING_BATCH = 256


class FeatureSet(ImageSet):
    """A set's images through the network's fixed front (`features_once`), float16 in memory: its classifier's
    inputs, given as float32."""

    def batches(self, index_batches):
        for features, labels in super().batches(index_batches):
            yield features.float(), labels


def features_once(model: Classifier, train_set, test_set, settings: TrainParams) -> tuple:
    """ScatterNet's scattering learns nothing and draws nothing at random: when the recipe augments nothing,
    each image's features are the same in every epoch, so they are computed once (as Tramèr & Boneh do) and
    the classifier trains on them; scattering every image again each epoch (~500 images/s on 2 cores) would
    take longer than training the classifier. The sets unchanged for any other network or recipe, or when
    the features do not fit the memory budget."""
    if not isinstance(model.network, ScatterNet) or settings.flip != "none" or settings.translate > 0:
        return train_set, test_set
    front = model.network.features
    needed = (train_set.count + test_set.count) * front.CHANNELS * front.side**2 * 2  # float16
    images = sum(image_set.images.nbytes for image_set in (train_set, test_set) if isinstance(image_set, ImageSet))
    budget = resolve_budget(settings.memory_budget)
    if needed + images > budget:
        log.info("scattering each batch anew: the features of every image (%s) do not fit train.memory_budget %s "
                 "beside the images", in_words(needed), in_words(budget))
        return train_set, test_set
    started = time.perf_counter()
    sets = [FeatureSet(*features_of(model, image_set)) for image_set in (train_set, test_set)]
    log.info("scattering features of the %d training and %d test images computed once (%s, %.1f s)",
             train_set.count, test_set.count, in_words(needed), time.perf_counter() - started)
    return tuple(sets)


@torch.inference_mode()
def features_of(model: Classifier, image_set) -> tuple[torch.Tensor, torch.Tensor]:
    features, labels = [], []
    for images, batch_labels in image_set.batches(batches(image_set.count, SCATTERING_BATCH, generator=None)):
        features.append(model.network.features(model.normalize(as_unit_floats(images))).half())
        labels.append(batch_labels)
    return torch.cat(features), torch.cat(labels)


def weight_average(model: Classifier, decay: float) -> AveragedModel | None:
    """An exponential moving average of the weights after every step, BatchNorm's statistics too
    (decay 0: none, the last step's weights are kept). The last steps of a short run still jitter
    around the minimum they settle in, and their average sits nearer its centre (Polyak averaging;
    airbench94's first recipe kept one too)."""
    if decay == 0:
        return None
    average_floats = get_ema_multi_avg_fn(decay)

    def update(averaged: list[torch.Tensor], current: list[torch.Tensor], steps: torch.Tensor) -> None:
        if averaged[0].is_floating_point():
            average_floats(averaged, current, steps)
        else:  # BatchNorm's batch counters: counted, not averaged (torch's EMA would round them down)
            for kept, now in zip(averaged, current):
                kept.copy_(now)

    return AveragedModel(model, multi_avg_fn=update, use_buffers=True)


def train_one_epoch(model, backbone: Backbone, train_set: ImageSet | StreamedImageSet, settings: TrainParams,
                    compute: Compute, generator, optimizers, schedules, loss_of, flips: Flips, epoch: int,
                    average: AveragedModel | None, private: PrivateSteps | None = None,
                    replicas: Replicas | None = None, flops: FlopCount | None = None) -> tuple[float, float]:
    """One pass over the training set. With several processes every rank draws the same batch order from
    `generator` and trains on its share of each batch (`distributed.share`), augmented from its own stream."""
    model.train()
    backbone.hold_statistics_if_frozen()
    side = image_side(settings, epoch, train_set.side)
    total_loss = torch.zeros((), device=compute.device)
    total_correct = torch.zeros((), device=compute.device)
    aux_weight = family_of(settings.model).aux_weight
    # The batch order is drawn before the first batch is read, as loader workers read ahead. A private run
    # draws each batch by Poisson sampling, as many as an epoch of batch_size would take.
    order = (batches(train_set.count, settings.batch_size, generator) if private is None else
             poisson_batches(train_set.count, private.budget.sample_rate, math.ceil(train_set.count / min(
                 settings.batch_size, train_set.count)), generator))
    replicas = replicas or Replicas(Ranks(), compute)
    ranks = replicas.ranks
    shares = [distributed.share(indices, ranks) for indices in order]
    # On features computed once (features_once), the classifier alone trains: they need no augmenting either.
    trained = model.network.classifier if isinstance(train_set, FeatureSet) else model
    stepped = replicas(trained)  # DistributedDataParallel's, with several processes
    seen = sum(len(whole) for whole in order)
    flops = flops or FlopCount()
    for indices, whole, (images, labels) in tqdm(zip(shares, order, train_set.batches(shares)), total=len(order),
                                                 desc=f"epoch {epoch}", leave=False, disable=None if ranks.main else True):
        if trained is model:
            images = random_crop(flips.apply(as_unit_floats(images), indices, epoch), settings.translate,
                                 flips.generator)
            if side < images.shape[-1]:
                images = F.interpolate(images, size=(side, side), mode="bilinear", antialias=True)
        with flops.counted(epoch, images_in_step=len(labels), images_in_epoch=seen):
            if private is None:
                loss, logits = train_step(stepped, images, labels, compute, optimizers, schedules, loss_of,
                                          aux_weight, distributed.loss_weight(len(labels), len(whole), ranks))
            else:
                loss, logits = private_train_step(trained, images, labels, compute, private, schedules, loss_of,
                                                  aux_weight)
        if average is not None:
            average.update_parameters(model)
        total_loss += loss.detach() * len(labels)
        total_correct += (logits.argmax(dim=1) == labels).sum()
    total_loss, total_correct = (distributed.summed(total, ranks) for total in (total_loss, total_correct))
    return total_loss.item() / max(1, seen), total_correct.item() / max(1, seen)


def memory_format(settings: TrainParams) -> torch.memory_format:
    """channels_last, convolutions' fast layout on CPUs and GPUs; a private run's is Opacus' (stages/privacy.py)."""
    return PRIVATE_MEMORY_FORMAT if settings.target_epsilon is not None else torch.channels_last


def forward_loss(model, images: torch.Tensor, labels: torch.Tensor, compute: Compute, loss_of,
                 aux_weight: float = 0.0, layout: torch.memory_format = torch.channels_last
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch's mean loss and its logits. Auxiliary classifiers (GoogLeNet's, Inception v3's) add their
    losses at `aux_weight` each, as in their papers."""
    with compute.autocast():
        outputs = model(images.contiguous(memory_format=layout))
    logits, auxiliary = main_and_auxiliary(outputs)
    return loss_of(logits, labels) + sum(aux_weight * loss_of(extra, labels) for extra in auxiliary), logits


def private_train_step(model, images: torch.Tensor, labels: torch.Tensor, compute: Compute, private: PrivateSteps,
                       schedules, loss_of, aux_weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One DP-SGD step on a Poisson batch, fed to the model in chunks (stages/privacy.py); its loss and logits."""
    losses, logits = [], []

    def backward_chunk(start: int, stop: int) -> None:
        loss, chunk_logits = forward_loss(model, images[start:stop], labels[start:stop], compute, loss_of, aux_weight,
                                          PRIVATE_MEMORY_FORMAT)
        (loss * (stop - start)).backward()  # summed over the chunk: each image's gradient is its own
        losses.append(loss.detach() * (stop - start))
        logits.append(chunk_logits.detach())

    private.step(len(labels), backward_chunk)
    for schedule in schedules:
        schedule.step()
    if not logits:
        return torch.zeros((), device=images.device), images.new_zeros((0, 1))
    return sum(losses) / len(labels), torch.cat(logits)


def train_step(model, images: torch.Tensor, labels: torch.Tensor, compute: Compute, optimizers, schedules,
               loss_of, aux_weight: float = 0.0, weight: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """One batch forward, backward (its loss times `weight`: a rank's share, distributed.loss_weight) and
    every optimiser's step; the loss and logits."""
    loss, logits = forward_loss(model, images, labels, compute, loss_of, aux_weight)
    (loss * weight if weight != 1.0 else loss).backward()
    for optimizer, schedule in zip(optimizers, schedules):
        if isinstance(optimizer, torch.optim.Muon):
            renormalise_filters(optimizer)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        schedule.step()
    return loss, logits


class FlopCount:
    """The FLOPs training computed, as torch's FlopCounterMode counts them from the shapes: every convolution and
    matmul that ran, forward, backward and the optimiser's own (Muon's Newton–Schulz products); elementwise work
    and a cached front's (features_once) are left out. An epoch's first step (with images: a Poisson batch may
    have none) is counted and its count per image scaled to the images the epoch trained on, all ranks': counting
    every step would send each operation through Python dispatch."""

    def __init__(self):
        self.total = 0
        self.epochs: set[int] = set()

    @contextlib.contextmanager
    def counted(self, epoch: int, images_in_step: int, images_in_epoch: int):
        if epoch in self.epochs or images_in_step == 0:
            yield
            return
        self.epochs.add(epoch)
        with FlopCounterMode(display=False) as counter:
            yield
        self.total += round(counter.get_total_flops() * images_in_epoch / images_in_step)


class Backbone:
    """Every trainable parameter but the head's. `train.freeze_epochs` holds it as loaded, BatchNorm's
    running statistics included, while a new head learns on its features: fine-tuning's usual first step,
    so that the head's first, large, random gradients do not reach the pretrained layers."""

    def __init__(self, model: Classifier):
        head = {id(parameter) for parameter in head_parameters(model)}
        self.parameters = [p for p in model.parameters() if p.requires_grad and id(p) not in head]
        self.batchnorms = [layer for layer in model.modules() if isinstance(layer, torch.nn.modules.batchnorm._BatchNorm)]
        self.frozen = False

    def freeze(self, frozen: bool) -> None:
        # No gradient, so no optimiser step either (they skip parameters without one).
        for parameter in self.parameters:
            parameter.requires_grad_(not frozen)
        self.frozen = frozen

    def hold_statistics_if_frozen(self) -> None:
        if self.frozen:
            for layer in self.batchnorms:
                layer.eval()


def image_side(settings: TrainParams, epoch: int, full_side: int) -> int:
    """Progressive resizing (as fast.ai's and FFCV's ImageNet runs): the first epochs see smaller
    images, which cost fewer FLOPs in every conv, growing linearly (to even sides) back to full size."""
    if settings.resize_from is None or epoch > settings.resize_epochs:
        return full_side
    start = min(settings.resize_from, full_side)
    side = start + (full_side - start) * (epoch - 1) / settings.resize_epochs
    return min(full_side, 2 * round(side / 2))


class Flips:
    """`train.flip`: none, random (each image, each epoch, by chance), or alternate: a random half
    in the first epoch, then every image the other way round from its previous epoch, so that
    each sees both sides equally often (airbench's alternating flip, Jordan 2024)."""

    def __init__(self, kind: str, count: int, shared: torch.Generator, generator: torch.Generator | None = None):
        # `shared` draws what every rank must agree on (which images start flipped), `generator` each rank's
        # own random flips and crops (the same generator with one process).
        self.kind = kind
        self.generator = generator or shared
        self.first_epoch = torch.rand(count, generator=shared) < 0.5 if kind == "alternate" else None

    def apply(self, images: torch.Tensor, indices: torch.Tensor, epoch: int) -> torch.Tensor:
        if self.kind == "random":
            return random_flip(images, self.generator)
        if self.kind == "alternate":
            return flip_chosen(images, self.first_epoch[indices] ^ (epoch % 2 == 0))
        return images


@torch.inference_mode()
def measure(model: Classifier, image_set: ImageSet | StreamedImageSet, compute: Compute, loss_of, batch_size: int
            ) -> tuple[float, float]:
    """Loss and accuracy on a whole set, without augmentation."""
    model.eval()
    total_loss, total_correct = 0.0, 0
    for images, labels in image_set.batches(batches(image_set.count, batch_size, generator=None)):
        with compute.autocast():
            if isinstance(image_set, FeatureSet):
                logits = model.network.classifier(images)
            else:
                logits = model(as_unit_floats(images))
        total_loss += loss_of(logits, labels).item() * len(labels)
        total_correct += (logits.argmax(dim=1) == labels).sum().item()
    return total_loss / image_set.count, total_correct / image_set.count


def describe_run(model: Classifier, classes: list[str], image_size: int, params: Params, compute: Compute,
                 summary: dict) -> dict:
    """Everything a later user of the checkpoint needs besides the weights, as plain values."""
    return {
        "architecture": params.train.model,
        "widths": params.train.widths,  # None for lenet
        "classes": list(classes),
        "image_size": image_size,
        "normalization": {"mean": model.normalize.mean.flatten().tolist(), "std": model.normalize.std.flatten().tolist()},
        "params": {"seed": params.seed, "train": params.train.model_dump(mode="json")},  # what train read
        "compute": {"device": compute.device.type, "precision": compute.precision},
        "summary": summary,
        "torch_version": str(torch.__version__),  # TorchVersion is not a plain str: weights_only refuses it
    }


if __name__ == "__main__":
    run_stage(main)
