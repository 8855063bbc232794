"""Classify your own images with a trained model.

    python -m stages.predict photo.jpg more-photos/ [--model models/model.pt] [--top-k 3] [--format table]
    python -m stages.predict photo.jpg --explain explained/    # also: the image beside its Grad-CAM heat map

Uses the promoted champion (models/champion/model.pt) when there is one, else the pipeline's
last trained model (models/model.pt), or the checkpoint `--model` names. Images of any size and
common format (grayscale, palette and RGBA included) are prepared exactly as `download` prepared
the training images. An unreadable file is reported by name and the others are still
classified; the exit status is 1 when any file failed. With --explain, one PNG per classified
file shows the image beside a Grad-CAM heat map of where the model saw its top class.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image
from tqdm import tqdm

from stages.errors import StageError, run_stage
from stages.explain import explanation_grid_png, heat_maps
from stages.image_folders import IMAGE_SUFFIXES, BadImage, decode_image
from stages.models import Classifier, as_model_input, load_checkpoint
from stages.outputs import atomic_path
from stages.params import PARAMS_FILE, load_params

log = logging.getLogger("predict")

DEFAULT_MODELS = (Path("models/champion/model.pt"), Path("models/model.pt"))


@dataclass
class Predictions:
    files: list[str] = field(default_factory=list)
    probabilities: list[np.ndarray] = field(default_factory=list)  # one (classes,) row per file
    failures: dict[str, str] = field(default_factory=dict)  # file -> why


def main() -> None:
    args = parse_args()
    model_path = choose_model(args.model)
    model, description = load_checkpoint(model_path)
    files = collect_files(args.paths)
    limit = pixel_limit(args.max_image_pixels)
    log.info("classifying %d file(s) with %s (%s)", len(files), model_path, description["architecture"])
    predictions = classify(model, files, description["image_size"], limit, args.batch_size)
    print(render(predictions, description["classes"], args.top_k, args.format))
    if args.explain:
        write_explanations(model, predictions, description, limit, args.batch_size, Path(args.explain))
    for name, why in predictions.failures.items():
        log.error("%s: %s", name, why)
    if predictions.failures:
        sys.exit(1)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="+", help="image files or folders (searched recursively)")
    parser.add_argument("--model", help="a checkpoint (default: the champion, else models/model.pt)")
    parser.add_argument("--top-k", type=int, default=3, help="how many classes to show per image")
    parser.add_argument("--format", choices=("table", "json", "csv"), default="table")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--max-image-pixels", type=int, metavar="N",
                        help="refuse larger images (default: data.max_image_pixels of ./params.yaml, without one "
                             "Pillow's own limit)")
    parser.add_argument("--explain", metavar="OUT_DIR",
                        help="also write OUT_DIR/<image name>.png: the image beside a Grad-CAM heat map "
                             "for its top class")
    args = parser.parse_args()
    if args.top_k < 1 or args.batch_size < 1 or (args.max_image_pixels is not None and args.max_image_pixels < 1):
        parser.error("--top-k, --batch-size and --max-image-pixels must be at least 1")
    return args


def choose_model(given: str | None) -> Path:
    if given:
        if not Path(given).is_file():
            raise StageError(f"--model {given} does not exist")
        return Path(given)
    for candidate in DEFAULT_MODELS:
        if candidate.is_file():
            return candidate
    raise StageError("no model found: run `dvc repro` first (it writes models/model.pt), or pass --model")


@dataclass(frozen=True)
class PixelLimit:
    pixels: int
    key: str  # what to raise, named in the message of an image over it


def pixel_limit(given: int | None) -> PixelLimit:
    """--max-image-pixels; else the project's data.max_image_pixels, run in one; else Pillow's own limit."""
    if given is not None:
        return PixelLimit(given, "--max-image-pixels")
    if Path(PARAMS_FILE).is_file():
        return PixelLimit(load_params().data.max_image_pixels, "--max-image-pixels (or data.max_image_pixels)")
    return PixelLimit(Image.MAX_IMAGE_PIXELS, "--max-image-pixels")


def collect_files(paths: list[str]) -> list[Path]:
    """The files named, and the images under the folders named, in a stable order."""
    files = []
    for name in paths:
        path = Path(name)
        if path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        else:
            files.append(path)  # a missing or unreadable file is reported with the others
    if not files:
        raise StageError(f"no images found in {', '.join(paths)}")
    return files


@torch.inference_mode()
def classify(model: Classifier, files: list[Path], image_size: int, limit: PixelLimit, batch_size: int) -> Predictions:
    predictions = Predictions()
    batch_files, batch_images = [], []

    def flush() -> None:
        images = as_model_input(np.stack(batch_images))
        predictions.files += [str(file) for file in batch_files]
        predictions.probabilities += list(model(images).float().softmax(dim=1).numpy())
        batch_files.clear()
        batch_images.clear()

    for file in tqdm(files, unit="img", desc="predicting", disable=None if len(files) > 20 else True):
        try:
            batch_images.append(decode_image(file.read_bytes(), image_size, str(file), limit.pixels, limit.key))
            batch_files.append(file)
        except (BadImage, OSError) as error:
            predictions.failures[str(file)] = str(error).removeprefix(f"{file}: ")
            continue
        if len(batch_images) == batch_size:
            flush()
    if batch_images:
        flush()
    return predictions


def write_explanations(model: Classifier, predictions: Predictions, description: dict, limit: PixelLimit,
                       batch_size: int, out_dir: Path) -> None:
    """One PNG per classified file: the image as the model saw it, beside its heat map for the top class."""
    names = overlay_names(predictions.files)
    for start in range(0, len(predictions.files), batch_size):
        files = predictions.files[start : start + batch_size]
        # Decoded again rather than kept by classify: classify holds one batch in memory, however many files.
        images = np.stack([decode_image(Path(file).read_bytes(), description["image_size"], file, limit.pixels)
                           for file in files])
        probabilities = predictions.probabilities[start : start + batch_size]
        top = [int(row.argmax()) for row in probabilities]
        maps, _method = heat_maps(model, images, top)
        for file, image, heat_map, index, row in zip(files, images, maps, top, probabilities):
            caption = f"{Path(file).name}: {description['classes'][index]} {row[index]:.1%}"
            png = explanation_grid_png(image[None], heat_map[None], [caption], pairs_per_row=1, pair_inches=(6, 3.3))
            with atomic_path(out_dir / names[file]) as partial:
                partial.write_bytes(png)
    log.info("wrote %d explanation(s) to %s", len(predictions.files), out_dir)


def overlay_names(files: list[str]) -> dict[str, str]:
    """`<stem>.png` for each file; files of the same stem (from two folders, or a.jpg and a.png) get -2, -3, ..."""
    names, taken = {}, set()
    for file in files:
        stem, number = Path(file).stem, 1
        while (name := f"{stem}.png" if number == 1 else f"{stem}-{number}.png") in taken:
            number += 1
        names[file] = name
        taken.add(name)
    return names


def render(predictions: Predictions, classes: list[str], top_k: int, output_format: str) -> str:
    top_k = min(top_k, len(classes))
    rows = []
    for file, probabilities in zip(predictions.files, predictions.probabilities):
        for rank, index in enumerate(np.argsort(-probabilities)[:top_k], start=1):
            rows.append({"file": file, "rank": rank, "class": classes[index], "probability": round(float(probabilities[index]), 4)})
    table = pd.DataFrame(rows, columns=["file", "rank", "class", "probability"])
    if output_format == "csv":
        return table.to_csv(index=False).rstrip("\n")
    if output_format == "json":
        grouped = [{"file": file, "predictions": group[["class", "probability"]].to_dict("records")}
                   for file, group in table.groupby("file", sort=False)]
        failed = [{"file": file, "error": why} for file, why in predictions.failures.items()]
        return json.dumps({"predictions": grouped, "failed": failed}, indent=2)
    if table.empty:
        return "no image could be classified"
    wide = table.assign(guess=table["class"] + " " + (table["probability"] * 100).map("{:.1f}%".format))
    guesses = wide.pivot(index="file", columns="rank", values="guess").rename(columns=lambda rank: f"top {rank}")
    return guesses.loc[list(dict.fromkeys(table["file"]))].rename_axis(index=None, columns=None).to_string()


if __name__ == "__main__":
    run_stage(main)
