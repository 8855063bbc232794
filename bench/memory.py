"""The pipeline on data larger than memory, measured (Linux: it reads /proc).

    python -m bench.memory --cifar ../shared/datasets/cifar10-jpeg.tar.gz

1. download's decoding with one core against every core: on the CIFAR-10 archive, and on a folder of
   large photos (640x480 JPEGs it generates), where decoding dominates.
2. An ImageNet-shaped folder it generates (--classes x --per-class JPEGs of --source-side px, prepared at
   --image-size px), several times larger than --budget: download, augment, train (one epoch of --preset)
   and evaluate run with train.memory_budget set to it, each stage's peak anonymous resident memory
   against the budget plus the model's size: the stage's and its workers' together, polled from /proc
   as Pss_Anon (RssAnon with the pages forked workers share counted once). Memory-mapped file pages
   are not counted: the kernel drops them under pressure.
3. Epochs of CIFAR-10 (--cifar-preset) in memory and streamed, in turn (--rounds): images/s of each,
   the ratio of the medians.

Figures go to --out as JSON and to the log as a table. Not a test: the machines are shared; compare
figures of one run.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import psutil
from PIL import Image

from bench.pipeline import apply_overrides, params_for_preset, read_params, write_params
from bench.processes import PROJECT_ROOT, stage_command
from bench.results import describe_machine

log = logging.getLogger("bench")


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    params = read_params(PROJECT_ROOT / "params.yaml")
    figures = {"machine": describe_machine(), "cores": len(os.sched_getaffinity(0))}

    parts = set(args.parts)
    if "1" in parts:
        photos = generate_folder(work / "photos", classes=4, per_class=args.photos // 4, size=(640, 480))
        figures["decode_photos"] = decode_speeds(params, photos, work / "decode-photos", image_size=args.image_size)
    if args.cifar and parts & {"1", "3"}:
        cores = ("one", "all") if "1" in parts else ("all",)
        figures["decode_cifar"] = decode_speeds(params, Path(args.cifar), work / "decode-cifar", 32, cores)

    if "2" in parts:
        synthetic = generate_folder(work / "synthetic", classes=args.classes, per_class=args.per_class,
                                    size=(args.source_side, args.source_side))
        figures["larger_than_memory"] = larger_than_memory(params, synthetic, work / "streamed", args)

    if args.cifar and "3" in parts:
        figures["cifar_epoch"] = streamed_against_in_memory(params, work / "decode-cifar" / "all" / "data", work, args)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(figures, indent=2) + "\n")
    log.info("figures in %s:\n%s", args.out, json.dumps(figures, indent=2))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cifar", help="the CIFAR-10 image-folder archive (parts 1 and 3 use it)")
    parser.add_argument("--work", default="/tmp/memory-bench", help="scratch folder (tens of GB for the defaults)")
    parser.add_argument("--out", default="reports/bench/memory.json")
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--per-class", type=int, default=600)
    parser.add_argument("--source-side", type=int, default=256)
    parser.add_argument("--image-size", type=int, default=160)
    parser.add_argument("--budget", default="1GiB", help="train.memory_budget for part 2")
    parser.add_argument("--preset", default="lenet", help="the recipe of part 2's one epoch")
    parser.add_argument("--batch-size", type=int, default=64, help="part 2's train.batch_size")
    parser.add_argument("--cifar-preset", default="default", help="the recipe of part 3's epoch")
    parser.add_argument("--cifar-budget", default="64MiB", help="train.memory_budget that streams CIFAR-10")
    parser.add_argument("--photos", type=int, default=2000, help="640x480 photos for part 1")
    parser.add_argument("--rounds", type=int, default=3,
                        help="part 3's epochs of each path, taken in turn (the machine's noise hits both alike)")
    parser.add_argument("--parts", default="123", help="the parts to run, e.g. 3 (part 3 decodes CIFAR-10 itself)")
    return parser.parse_args()


# --- generated image folders -----------------------------------------------------------------


def generate_folder(folder: Path, classes: int, per_class: int, size: tuple[int, int]) -> Path:
    """train/<class>/*.jpg: smooth colour fields, one hue a class, with noise, as JPEG at quality 90.
    Kept between runs (a marker file says it is complete)."""
    done = folder / ".complete"
    if done.is_file() and done.read_text() == f"{classes} {per_class} {size}":
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    jobs = [(folder / "train" / f"class{c:03d}" / f"{i:05d}.jpg", c, i, size) for c in range(classes)
            for i in range(per_class)]
    for c in range(classes):
        (folder / "train" / f"class{c:03d}").mkdir(parents=True)
    log.info("generating %d JPEGs of %dx%d in %s", len(jobs), *size, folder)
    with ProcessPoolExecutor() as pool:
        list(pool.map(write_jpeg, jobs, chunksize=256))
    done.write_text(f"{classes} {per_class} {size}")
    return folder


def write_jpeg(job: tuple[Path, int, int, tuple[int, int]]) -> None:
    path, label, index, (width, height) = job
    generator = np.random.default_rng(label * 100_003 + index)
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    hue = np.array([np.sin(label * 1.7), np.sin(label * 2.3 + 1), np.sin(label * 3.1 + 2)]) * 80 + 128
    field = hue + 60 * np.sin(6 * x[..., None] * generator.uniform(0.5, 2) + 4 * y[..., None] + generator.uniform(0, 6))
    pixels = (field + generator.normal(0, 12, field.shape)).clip(0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(path, quality=90)


# --- running stages, memory measured -------------------------------------------------------------


def scratch_project(folder: Path, params: dict) -> Path:
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    write_params(params, folder)
    return folder


def run_measured(stage: str, project: Path, one_core: bool = False) -> dict:
    """The stage with dvc.yaml's command line in `project`: its wall time and peak anonymous memory (MiB),
    its children's included."""
    _python, *args = stage_command(stage)
    return run_python(args, project, one_core, stage)


def run_python(args: list[str], project: Path, one_core: bool, stage: str) -> dict:
    env = dict(os.environ, PYTHONPATH=str(PROJECT_ROOT))
    first_core = min(os.sched_getaffinity(0))
    started = time.perf_counter()
    child = subprocess.Popen([sys.executable, *args], cwd=project, env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True,
                             preexec_fn=(lambda: os.sched_setaffinity(0, {first_core})) if one_core else None)
    peak = PeakAnonymousMemory(child.pid)
    _, errors = child.communicate()
    seconds = time.perf_counter() - started
    peak.stop()
    if child.returncode != 0:
        raise SystemExit(f"error: {stage} failed in {project}:\n{errors[-3000:]}")
    return {"seconds": round(seconds, 1), "peak_anonymous_mib": round(peak.bytes / 2**20, 1)}


class PeakAnonymousMemory:
    """Polls the anonymous memory of a process and its descendants every 50 ms; the largest sum seen."""

    def __init__(self, pid: int):
        self.pid = pid
        self.bytes = 0
        self.running = True
        self.thread = threading.Thread(target=self.poll, daemon=True)
        self.thread.start()

    def poll(self) -> None:
        while self.running:
            try:
                processes = [psutil.Process(self.pid), *psutil.Process(self.pid).children(recursive=True)]
            except psutil.NoSuchProcess:
                return
            self.bytes = max(self.bytes, sum(anonymous_bytes(process.pid) for process in processes))
            time.sleep(0.05)

    def stop(self) -> None:
        self.running = False
        self.thread.join()


def anonymous_bytes(pid: int) -> int:
    """Pss_Anon from smaps_rollup (Linux 5.10+), else RssAnon from status."""
    for file, field in (("smaps_rollup", "Pss_Anon:"), ("status", "RssAnon:")):
        try:
            for line in Path(f"/proc/{pid}/{file}").read_text().splitlines():
                if line.startswith(field):
                    return int(line.split()[1]) * 1024
        except OSError:
            return 0  # gone meanwhile
    return 0


# --- the three measurements ----------------------------------------------------------------------


def decode_speeds(params: dict, source: Path, folder: Path, image_size: int,
                  cores_tried: tuple[str, ...] = ("one", "all")) -> dict:
    """download of `source` on one core, then on every core."""
    figures = {}
    for cores in cores_tried:
        project = scratch_project(folder / cores, apply_overrides(params, {"data.source": str(source.resolve()),
                                                                           "data.image_size": image_size}))
        figures[f"{cores}_core_seconds"] = run_measured("download", project, one_core=cores == "one")["seconds"]
        log.info("decoding %s at %d px on %s core(s): %.1f s", source, image_size, cores,
                 figures[f"{cores}_core_seconds"])
    if "one_core_seconds" in figures:
        figures["speedup"] = round(figures["one_core_seconds"] / figures["all_core_seconds"], 2)
    return figures


def larger_than_memory(params: dict, source: Path, folder: Path, args: argparse.Namespace) -> dict:
    settings = apply_overrides(params_for_preset(params, args.preset, {}), {
        "data.source": str(source.resolve()), "data.image_size": args.image_size, "augment.copies": 0,
        "train.epochs": 1, "train.batch_size": args.batch_size, "train.test_each_epoch": False,
        "train.memory_budget": args.budget, "evaluate.tta": "none",
        "evaluate.batch_size": args.batch_size})
    project = scratch_project(folder, settings)
    # What importing torch and torchvision takes, before any data: every stage pays it.
    figures = {"budget": args.budget,
               "imports": run_python(["-c", "import stages.train"], project, one_core=False, stage="imports")}
    for stage in ("download", "augment", "train", "evaluate"):
        figures[stage] = run_measured(stage, project)
        log.info("%s: %s", stage, figures[stage])
    prepared = project / "data" / "prepared"
    figures["prepared_bytes"] = sum(path.stat().st_size for path in prepared.glob("*.npy"))
    figures["model_bytes"] = (project / "models" / "model.pt").stat().st_size
    figures["train_images_per_second"] = json.loads((project / "reports" / "train" / "metrics.json").read_text()
                                                    )["images_per_second"]
    figures["accuracy"] = json.loads((project / "reports" / "metrics.json").read_text())["accuracy"]
    return figures


def streamed_against_in_memory(params: dict, prepared_project: Path, work: Path, args: argparse.Namespace) -> dict:
    """Epochs of CIFAR-10 in memory and streamed (the same batches), in turn for --rounds rounds: the medians'
    ratio, and each round's."""
    projects = {}
    for path, budget in (("in_memory", "auto"), ("streamed", args.cifar_budget)):
        settings = apply_overrides(params_for_preset(params, args.cifar_preset, {}), {
            "augment.copies": 0, "train.epochs": 1, "train.test_each_epoch": False, "train.memory_budget": budget})
        projects[path] = scratch_project(work / f"cifar-{path}", settings)
        (projects[path] / "data").mkdir()
        (projects[path] / "data" / "prepared").symlink_to((prepared_project / "prepared").resolve())
        run_measured("augment", projects[path])
    rounds = {path: [] for path in projects}
    for round_number in range(1, args.rounds + 1):
        for path, project in projects.items():
            measured = run_measured("train", project)
            metrics = json.loads((project / "reports" / "train" / "metrics.json").read_text())
            rounds[path].append({**measured, "images_per_second": metrics["images_per_second"],
                                 "accuracy": metrics["test"]["accuracy"]})
            log.info("CIFAR-10, one epoch of %s, %s, round %d: %s", args.cifar_preset, path, round_number,
                     rounds[path][-1])
    median = {path: float(np.median([run["images_per_second"] for run in runs])) for path, runs in rounds.items()}
    return {"rounds": rounds, "median_images_per_second": median,
            "round_shares": [round(streamed["images_per_second"] / in_memory["images_per_second"], 3)
                             for in_memory, streamed in zip(rounds["in_memory"], rounds["streamed"])],
            "streamed_share": round(median["streamed"] / median["in_memory"], 3)}


if __name__ == "__main__":
    main()
