"""python -m bench.step_speed: how fast a preset's training step runs on this machine, as the train
stage runs it (eager) and under `torch.compile`, whose compilation is timed apart.

    python -m bench.step_speed --preset default --sides 16,32

The train stage's own model, optimisers, loss and step on random images (a step's time does not
depend on what they show), at the preset's batch size and precision. For each image side: the
first step (for the compiled model, compilation included: paid once per side, as progressive
resizing changes it) and the median of --steps timed steps after it. Prints one line per run.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from stages.architectures import family_of, takes_one_side
from stages.hardware import resolve_compute
from stages.models import as_unit_floats, smallest_image_side
from stages.params import load_params
from stages.image_sets import ImageSet
from stages.train import create_model, loss_function, make_optimizers, make_schedules, train_step

from bench.pipeline import params_for_preset, parse_overrides, read_params, write_params

CLASSES = [f"class{index}" for index in range(10)]


def main() -> None:
    args = parse_args()
    with tempfile.TemporaryDirectory() as folder:
        params = load_params(write_params(params_for_preset(read_params(Path(args.params)), args.preset,
                                                            parse_overrides(args.set)),
                                          Path(folder)))
    settings = params.train
    if settings.threads:
        torch.set_num_threads(settings.threads)
    compute = resolve_compute(settings.device, settings.precision)
    image_size = params.data.image_size
    if takes_one_side(settings.model) and args.sides != [image_size]:
        raise SystemExit(f"error: --sides: {settings.model} takes images of data.image_size only ({image_size})")
    if too_small := [side for side in args.sides if side < smallest_image_side(settings.model)]:
        raise SystemExit(f"error: --sides: {settings.model} needs images of side ≥ {smallest_image_side(settings.model)}, "
                         f"not {', '.join(map(str, too_small))}")
    network = f"{settings.model} {settings.widths}" if settings.widths else settings.model
    print(f"{args.preset}: {network}, batch {settings.batch_size}, "
          f"{compute.describe()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    for mode in args.modes.split(","):
        torch.manual_seed(params.seed)
        images = random_images(settings.batch_size, image_size, compute.device)
        model = create_model(settings, CLASSES, images).to(compute.device, memory_format=torch.channels_last)
        optimizers = make_optimizers(model, settings)
        schedules = make_schedules(optimizers, settings, steps_per_epoch=args.steps * len(args.sides))
        loss_of = loss_function(settings, len(CLASSES))
        stepped = torch.compile(model) if mode == "compile" else model
        for side in args.sides:
            batch = as_unit_floats(images.images)
            if side != batch.shape[-1]:  # as the train stage resizes
                batch = F.interpolate(batch, size=(side, side), mode="bilinear", antialias=True)
            times = [timed_step(stepped, batch, images.labels, compute, optimizers, schedules, loss_of,
                                family_of(settings.model).aux_weight)
                     for _ in range(args.steps + 1)]
            median = statistics.median(times[1:])
            print(f"{mode:>8} side {side:>3}: first step {times[0]:6.2f} s, then {median:.3f} s a step, "
                  f"{settings.batch_size / median:7.1f} images/s")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--preset", default="default")
    parser.add_argument("--sides", default="32", type=lambda text: [int(side) for side in text.split(",")],
                        help="image sides to time, comma-separated (progressive resizing trains on several)")
    parser.add_argument("--steps", type=int, default=8, help="timed steps per side, after the first")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a params override on top of the preset, as python -m bench takes it")
    parser.add_argument("--modes", default="eager,compile", help="eager, compile or both, comma-separated")
    args = parser.parse_args()
    if unknown := set(args.modes.split(",")) - {"eager", "compile"}:
        parser.error(f"--modes: {', '.join(sorted(unknown))} is not one of eager, compile")
    return args


def random_images(count: int, side: int, device: torch.device) -> ImageSet:
    images = torch.randint(0, 256, (count, 3, side, side), dtype=torch.uint8)
    return ImageSet(images.to(device, memory_format=torch.channels_last),
                    torch.randint(0, len(CLASSES), (count,)).to(device))


def timed_step(model, images, labels, compute, optimizers, schedules, loss_of, aux_weight: float) -> float:
    started = time.perf_counter()
    loss, _ = train_step(model, images, labels, compute, optimizers, schedules, loss_of, aux_weight)
    loss.item()  # waits for the device
    return time.perf_counter() - started


if __name__ == "__main__":
    main()
