"""Stage compress, beside evaluate after train: smaller and faster copies of the trained model, each
scored on the test split.

    python -m stages.compress models/model.pt data/prepared --out models/compressed \\
        --table reports/compression.csv --metrics reports/compression.json

The variants `compress.variants` names, each written to models/compressed/:

    int8      int8.torchscript.pt  post-training static int8 quantization (torch.ao.quantization, FX graph
                                   mode), observers calibrated on training images; TorchScript, since it is
                                   the one format that carries the int8 engine's packed weights
    pruned    pruned.pt            global unstructured magnitude pruning of every conv and linear weight
                                   (torch.nn.utils.prune), made permanent; the project's checkpoint format
    bf16      bf16.pt              the weights in bfloat16 (fp16: float16), run in that precision;
    fp16      fp16.pt              the project's checkpoint format
    exported  exported.pt2         the fp32 model as a torch.export program (torch.export.save)

int8.torchscript.pt and exported.pt2 load without this project's code (`torch.jit.load`,
`torch.export.load(...).module()`); both take float images in [0, 1], (N, 3, H, W), and return
logits. Each variant is loaded back from its file and measured beside the fp32 original (the
reference row): accuracy on the whole test split (no test-time augmentation), CPU latency of
one image (median of `compress.latency_repeats` runs), throughput at `compress.batch_size`. One
row per variant goes to the table, the headline figures to the metrics file for `dvc exp show`.
"""

from __future__ import annotations

import argparse
import copy
import logging
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.ao.quantization import get_default_qconfig_mapping
from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx
from torch.nn.utils import prune

from stages.architectures import family_of
from stages.datasets import load_meta, load_split
from stages.errors import StageError, run_stage
from stages.hardware import cpu_model_name
from stages.models import Classifier, as_model_input, load_checkpoint, save_checkpoint
from stages.outputs import atomic_folder, atomic_path, write_json
from stages.params import CompressParams, load_params

log = logging.getLogger("compress")

FILE_NAMES = {"int8": "int8.torchscript.pt", "pruned": "pruned.pt", "bf16": "bf16.pt", "fp16": "fp16.pt",
              "exported": "exported.pt2"}
HALF_TYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# `compress.int8_backend: auto` takes the first of these that this torch offers: x86 picks fbgemm or
# oneDNN kernels per operator on x86 CPUs; qnnpack is the one ARM CPUs usually have.
ENGINE_PREFERENCE = ("x86", "fbgemm", "onednn", "qnnpack")
WARM_UP_RUNS = 5  # untimed batch-1 runs first: the first calls allocate and pick kernels


@dataclass(frozen=True)
class Variant:
    name: str
    path: Path
    run: Callable[[torch.Tensor], torch.Tensor]  # float images in [0, 1], (N, 3, H, W) -> logits
    dtype: torch.dtype  # what `run` takes
    precision: str  # of the weights and arithmetic: fp32, bf16, fp16, int8
    file_format: str
    backend: str
    sparsity: float  # share of conv and linear weights that are exactly zero


def main() -> None:
    args = parse_args()
    params = load_params()
    settings = params.compress
    model, description = load_trained_model(Path(args.model), Path(args.prepared))
    if settings.threads:
        torch.set_num_threads(settings.threads)
    skipped = variants_not_applying(settings.variants, description["architecture"])
    made = [name for name in settings.variants if name not in skipped]
    engine = choose_int8_engine(settings.int8_backend) if "int8" in made else None
    test = load_split(args.prepared, "test")
    calibration = calibration_images(Path(args.prepared), settings.calibration_images, params.seed)

    # Written and measured in a hidden folder that becomes --out at the end (DVC expects the folder,
    # also when compress.variants is empty): a killed run leaves no half set of variants.
    with atomic_folder(args.out) as folder:
        variants = [Variant("fp32", Path(args.model), model, torch.float32, "fp32", "checkpoint", "eager",
                            weight_sparsity(model))]
        for name in made:
            log.info("writing variant %s", name)
            variants.append(write_and_reload(name, model, description, folder / FILE_NAMES[name], settings, engine,
                                             calibration))
        measured = {}
        for variant in variants:
            measured[variant.name] = measure(variant, test.images, test.labels, settings)
            log.info("%s: accuracy %.4f, %.3f ms per image, %.0f images/s, %.3f MB", variant.name,
                     measured[variant.name]["accuracy"], measured[variant.name]["latency_ms"],
                     measured[variant.name]["images_per_second"], measured[variant.name]["size_bytes"] / 1e6)
    for name, reason in skipped.items():
        log.info("variant %s skipped: %s", name, reason)
    # One row per variant asked for, in the order asked; a skipped one says why and has no figures.
    rows = [measured["fp32"] | {"file": args.model}]
    rows += [measured[name] | {"file": (Path(args.out) / FILE_NAMES[name]).as_posix()} if name in measured
             else {"variant": name, "skipped": skipped[name]} for name in settings.variants]
    table = compare_with_reference(pd.DataFrame(rows))
    table.insert(1, "file", table.pop("file").fillna(""))
    table["skipped"] = table["skipped"].fillna("") if "skipped" in table else ""
    with atomic_path(args.table) as partial:
        table.to_csv(partial, index=False)
    write_json(args.metrics, headline_metrics(table, engine))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="the trained model (from train)")
    parser.add_argument("prepared", help="the prepared data set (from download)")
    parser.add_argument("--out", default="models/compressed", help="the folder the variants are written to")
    parser.add_argument("--table", default="reports/compression.csv")
    parser.add_argument("--metrics", default="reports/compression.json")
    return parser.parse_args()


# --- inputs --------------------------------------------------------------------------------


def load_trained_model(model_path: Path, prepared: Path) -> tuple[Classifier, dict]:
    if not model_path.is_file():
        raise StageError(f"{model_path} not found: stage train writes it (`dvc repro compress` runs what is needed)")
    if not (prepared / "meta.json").is_file():
        raise StageError(f"{prepared} holds no prepared data set (no meta.json): stage download writes it")
    model, description = load_checkpoint(model_path)
    if description["classes"] != load_meta(prepared)["classes"]:
        raise StageError(f"{model_path} was trained on other classes than {prepared} holds; run train again")
    return model, description


def variants_not_applying(variants: list[str], architecture: str) -> dict[str, str]:
    """The variants asked for that do not apply to the architecture (stages/architectures.py), and why."""
    reason = family_of(architecture).int8
    return {"int8": f"int8 does not apply to {architecture}: {reason}"} if "int8" in variants and reason else {}


def choose_int8_engine(wanted: str) -> str:
    """The quantized engine that will run int8: the one asked for, or the preferred one this torch offers."""
    offered = [engine for engine in torch.backends.quantized.supported_engines if engine != "none"]
    if wanted == "auto":
        usable = [engine for engine in ENGINE_PREFERENCE if engine in offered]
        if not usable:
            raise StageError("compress.int8_backend auto: this build of torch offers no int8 engine "
                             f"({', '.join(ENGINE_PREFERENCE)}); remove int8 from compress.variants")
        return usable[0]
    if wanted not in offered:
        raise StageError(f"compress.int8_backend {wanted} is not offered by torch on this machine; it offers: "
                         f"{', '.join(offered) or 'none'} (or set auto)")
    return wanted


def calibration_images(prepared: Path, count: int, seed: int) -> np.ndarray:
    """`count` training images (all when there are fewer), drawn with the params' seed: (N, H, W, 3) uint8."""
    train = load_split(prepared, "train")
    chosen = np.random.default_rng(seed).permutation(len(train.labels))[:count]
    return np.asarray(train.images[np.sort(chosen)])  # sorted: the memory map is read front to back


# --- the variants --------------------------------------------------------------------------


def write_and_reload(name: str, model: Classifier, description: dict, path: Path, settings: CompressParams,
                     engine: str | None, calibration: np.ndarray) -> Variant:
    """Write variant `name` of `model` to `path` atomically, then load it back from the file: what is measured
    is what the file holds, loaded as a user would load it."""
    about = {**description, "compressed": {"variant": name, "from": description.get("architecture")}}
    if name == "int8":
        quantized = quantize_int8(model, calibration, engine, settings.batch_size)
        with atomic_path(path) as partial, open(partial, "wb") as file:
            torch.jit.save(quantized, file)
        return Variant(name, path, torch.jit.load(path), torch.float32, "int8", "TorchScript", engine,
                       weight_sparsity(model))
    if name == "pruned":
        pruned = prune_by_magnitude(model, settings.prune_amount)
        save_checkpoint(path, pruned, about | {"compressed": about["compressed"] | {"amount": settings.prune_amount}})
        reloaded, _ = load_checkpoint(path)
        return Variant(name, path, reloaded, torch.float32, "fp32", "checkpoint", "eager", weight_sparsity(reloaded))
    if name in HALF_TYPES:
        save_checkpoint(path, copy.deepcopy(model).to(HALF_TYPES[name]), about)
        reloaded, _ = load_checkpoint(path)  # loaded into float32 weights; the values are those of the half file
        half = reloaded.to(HALF_TYPES[name])
        return Variant(name, path, half, HALF_TYPES[name], name, "checkpoint", "eager", weight_sparsity(half))
    if name == "exported":
        program = export_program(model, as_model_input(calibration[:1].repeat(2, axis=0)))
        with atomic_path(path) as partial, open(partial, "wb") as file:
            torch.export.save(program, file)
        return Variant(name, path, torch.export.load(path).module(), torch.float32, "fp32", "torch.export", "eager",
                       weight_sparsity(model))
    raise ValueError(f"unknown variant {name!r}")  # params validation lists the accepted names


def quantize_int8(model: Classifier, calibration: np.ndarray, engine: str, batch_size: int) -> torch.jit.ScriptModule:
    """Static int8 quantization in FX graph mode: observers placed by the engine's default qconfig, activation
    ranges seen on the calibration images, then converted to int8 kernels and traced to TorchScript."""
    torch.backends.quantized.engine = engine
    example = as_model_input(calibration[:1])
    with warnings.catch_warnings():
        # torch.ao.quantization and torch.jit.trace warn that they are deprecated; they remain the
        # way to run static int8 in eager PyTorch, and torch.export cannot yet save their packed
        # weights ("Conv2dPackedParamsBase does not have a field with name '__obj_flatten__'").
        warnings.filterwarnings("ignore", message=r".*(deprecated|reduce_range|quant_min and quant_max)")
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        observed = prepare_fx(copy.deepcopy(model), get_default_qconfig_mapping(engine), example_inputs=(example,))
        with torch.inference_mode():
            for start in range(0, len(calibration), batch_size):
                observed(as_model_input(calibration[start : start + batch_size]))
        quantized = convert_fx(observed)
        with torch.inference_mode():
            return torch.jit.freeze(torch.jit.trace(quantized, example))


def prune_by_magnitude(model: Classifier, amount: float) -> Classifier:
    """A copy with the `amount` share of smallest conv and linear weights, over all layers together, set to 0."""
    pruned = copy.deepcopy(model)
    layers = [(module, "weight") for module in pruned.modules() if isinstance(module, (nn.Conv2d, nn.Linear))]
    prune.global_unstructured(layers, pruning_method=prune.L1Unstructured, amount=amount)
    for module, name in layers:
        prune.remove(module, name)  # the mask is folded into the weight: a plain state dict again
    return pruned


def export_program(model: Classifier, example: torch.Tensor) -> torch.export.ExportedProgram:
    """The fp32 model as a torch.export program taking any batch size (traced on a batch of two: torch.export
    specialises a dimension it sees as 1)."""
    return torch.export.export(model, (example,), dynamic_shapes=({0: torch.export.Dim("batch")},))


def weight_sparsity(model: nn.Module) -> float:
    weights = [module.weight for module in model.modules() if isinstance(module, (nn.Conv2d, nn.Linear))]
    zeros = sum(int((weight == 0).sum()) for weight in weights)
    return zeros / max(1, sum(weight.numel() for weight in weights))


# --- measuring -----------------------------------------------------------------------------


@torch.inference_mode()
def measure(variant: Variant, images: np.ndarray, labels: np.ndarray, settings: CompressParams) -> dict:
    """Accuracy and throughput over the whole split at batch_size, then batch-1 latency."""
    # Untimed: the first call picks kernels.
    variant.run(as_model_input(images[: settings.batch_size], dtype=variant.dtype))
    correct, seconds = 0, 0.0
    for start in range(0, len(labels), settings.batch_size):
        batch = as_model_input(images[start : start + settings.batch_size], dtype=variant.dtype)
        started = time.perf_counter()
        logits = variant.run(batch)
        seconds += time.perf_counter() - started
        correct += int((logits.argmax(dim=1).numpy() == labels[start : start + settings.batch_size]).sum())
    return {
        "variant": variant.name,
        "format": variant.file_format,
        "precision": variant.precision,
        "backend": variant.backend,
        "size_bytes": variant.path.stat().st_size,
        "sparsity": round(variant.sparsity, 4),
        "accuracy": round(correct / len(labels), 6),
        "latency_ms": round(1000 * batch_one_latency(variant, images[:1], settings.latency_repeats), 4),
        "images_per_second": round(len(labels) / seconds, 1),
        "batch_size": settings.batch_size,
        "threads": torch.get_num_threads(),
    }


def batch_one_latency(variant: Variant, image: np.ndarray, repeats: int) -> float:
    """Median seconds for one image, after a few untimed runs."""
    single = as_model_input(image, dtype=variant.dtype)
    for _ in range(WARM_UP_RUNS):
        variant.run(single)
    timings = []
    for _ in range(repeats):
        started = time.perf_counter()
        variant.run(single)
        timings.append(time.perf_counter() - started)
    return statistics.median(timings)


def compare_with_reference(table: pd.DataFrame) -> pd.DataFrame:
    """Each variant's size, speed and accuracy against the fp32 row's, as ratios and a difference."""
    reference = table.iloc[0]
    return table.assign(
        size_ratio=(table["size_bytes"] / reference["size_bytes"]).round(4),
        speedup=(reference["latency_ms"] / table["latency_ms"]).round(3),
        accuracy_change=(table["accuracy"] - reference["accuracy"]).round(6),
    )


def headline_metrics(table: pd.DataFrame, engine: str | None) -> dict:
    """How it was measured, then one entry per variant, flat enough for `dvc exp show` columns
    (`int8.accuracy`, `int8.speedup`, ...)."""
    metrics: dict = {"cpu": cpu_model_name(), "threads": int(table["threads"].iloc[0]),
                     "int8_backend": engine or "none"}
    for row in table.itertuples():
        if row.skipped:
            metrics[row.variant] = {"skipped": row.skipped}
            continue
        metrics[row.variant] = {
            "accuracy": row.accuracy, "accuracy_change": row.accuracy_change, "size_mb": round(row.size_bytes / 1e6, 3),
            "size_ratio": row.size_ratio, "latency_ms": row.latency_ms, "speedup": row.speedup,
            "images_per_second": row.images_per_second,
        }
    return metrics


if __name__ == "__main__":
    run_stage(main)
