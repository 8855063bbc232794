"""Run by tests/test_distributed.py under torchrun: each rank trains a tiny convnet with train's own loop
(`stages.train.fit`, DistributedDataParallel through `stages.distributed`) and saves what it saw to
<out>/rank<N>.pt for the test to compare across ranks:

- the image indices of each step's share of the batch (read through the training set's `batches`),
- each step's local gradients, as DDP hands them to the all-reduce, and what came back from it (a
  communication hook that records the bucket and the result around DDP's default hook),
- each step's applied gradients, as the optimisers find them when they step,
- which images the alternating flip starts with, the whitening filters fitted before training, and the
  weights at the end.

    torchrun --nproc-per-node 2 tests/distributed_probe.py PARAMS_YAML OUT_DIR
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from dvclive import Live
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

from stages import distributed, train
from stages.hardware import resolve_compute
from stages.image_sets import ImageSet, in_memory
from stages.params import load_params

CLASSES = ["a", "b", "c"]
IMAGES, SIDE = 90, 16


class RecordingSet(ImageSet):
    """An in-memory training set that notes every index batch it is asked for."""

    def __init__(self, images, labels, record: list):
        super().__init__(images, labels)
        self.record = record

    def batches(self, index_batches):
        for indices in index_batches:
            self.record.append(indices.clone())
        return super().batches(index_batches)


def images_and_labels(seed: int, count: int) -> tuple[np.ndarray, np.ndarray]:
    """The same pixels on every rank: each class a colour, plus noise."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(len(CLASSES), size=count)
    colours = np.array([[200, 40, 40], [40, 200, 40], [40, 40, 200]])
    pixels = colours[labels][:, None, None, :] + rng.integers(-40, 40, size=(count, SIDE, SIDE, 3))
    return np.clip(pixels, 0, 255).astype(np.uint8), labels.astype(np.int64)


def main(params_file: str, out: str) -> None:
    params = load_params(Path(params_file))
    ranks, compute = distributed.join(resolve_compute("cpu", "fp32"))
    seen = {"shares": [], "local": [], "reduced": [], "applied": []}
    observe_optimisers(seen)
    observe_all_reduce(seen)

    torch.manual_seed(params.seed)
    generator = torch.Generator().manual_seed(params.seed)
    base = in_memory(*images_and_labels(params.seed, IMAGES), compute.device)
    train_set = RecordingSet(base.images, base.labels, seen["shares"])
    test_set = in_memory(*images_and_labels(params.seed + 1, 30), compute.device)
    model = train.create_model(params.train, CLASSES, train_set).to(memory_format=torch.channels_last)
    whitening = model.network.whiten.weight.detach().clone()
    first_flips = train.Flips(params.train.flip, train_set.count, torch.Generator().manual_seed(params.seed)).first_epoch
    with tempfile.TemporaryDirectory() as folder, Live(folder, dvcyaml=False, save_dvc_exp=False, report=None) as live:
        train.fit(model, train_set, test_set, len(CLASSES), params, compute, generator, live, ranks)
    torch.save({"rank": ranks.rank, "world": ranks.world, **seen, "whitening": whitening, "first_flips": first_flips,
                "weights": {name: value.detach().clone() for name, value in model.named_parameters()}},
               Path(out) / f"rank{ranks.rank}.pt")
    torch.distributed.destroy_process_group()


def observe_optimisers(seen: dict) -> None:
    """Every optimiser train makes notes the gradients it is about to apply."""
    make = train.make_optimizers

    def observed(model, settings):
        optimizers = make(model, settings)

        def note(optimizer, args, kwargs):
            seen["applied"].append(torch.cat([parameter.grad.flatten() for group in optimizer.param_groups
                                              for parameter in group["params"] if parameter.grad is not None]))

        optimizers[0].register_step_pre_hook(note)
        return optimizers

    train.make_optimizers = observed


def observe_all_reduce(seen: dict) -> None:
    """Every DDP wrapper train makes hands its local gradients to a hook that notes them, then all-reduces."""
    wrap = distributed.Replicas.__call__

    def observed(self, module):
        before = self.wrapped
        wrapped = wrap(self, module)
        if wrapped is not before and wrapped is not module:
            wrapped.register_comm_hook(None, note_then_all_reduce)
        return wrapped

    def note_then_all_reduce(state, bucket):
        seen["local"].append(bucket.buffer().clone())  # before the hook divides it by the ranks in place

        def note_reduced(future):
            reduced = future.value()  # the averaged bucket, which DDP copies into the gradients
            seen["reduced"].append(reduced.clone())
            return reduced

        return default_hooks.allreduce_hook(None, bucket).then(note_reduced)

    distributed.Replicas.__call__ = observed


if __name__ == "__main__":
    main(*sys.argv[1:])
