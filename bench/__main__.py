"""python -m bench: the tutorial baseline, then each preset through the pipeline; one results row per run.

    python -m bench --images ../shared/datasets/cifar10-jpeg.tar.gz                  # every non-private preset
    python -m bench --images ../shared/datasets/cifar10-jpeg.tar.gz --presets fast,default
    python -m bench --images ../shared/datasets/cifar10-jpeg.tar.gz --presets private  # rows private-eps1, -eps3, -eps8
    python -m bench --images ../shared/datasets/cifar10-jpeg.tar.gz --presets fast --seeds 0,1,2 --processes 1,2

Writes <out>/results.csv (a row as soon as a run finishes), results.md and accuracy_vs_time.png, and
peak.json: a large matmul's rate in each precision (bench.peak), timed after T, which each row's
training FLOPs a second (counted by train) are a share of.
A rerun skips the rows already there (same CPU), so an interrupted run carries on; --fresh
starts over. The tutorial always runs first: T, its training time, comes from the same file. A rerun
with rows left to run times the tutorial again and refuses to go on when this T differs from the
file's by more than --t-tolerance: two machines of one CPU name can differ by half.
A private preset (train.target_epsilon set) runs once per --epsilons, the same recipe at each budget.

Each preset runs once per seed of --seeds and count of --processes (train.processes). Rows are named
<preset>[-eps<ε>][-<N>proc][-seed<N>][-repeat]: -<N>proc for N > 1 processes, -seed<N> only when
several seeds are asked for, so that a run at the defaults keeps its name. results.md adds the mean
± deviation of each run over its seeds. A private preset trains in one process only: its runs with
N > 1 are skipped (logged), and a benchmark left with nothing to run is refused.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from stages.outputs import write_json

from bench.peak import SIDE, matmul_rates
from bench.pipeline import (apply_overrides, extract_archive, measure_pipeline, params_for_preset, parse_overrides, prepare_data,
                            is_private, preset_names, read_params, run_preset)
from bench.processes import ChildFailed, run_module
from bench.results import TUTORIAL, append_row, load_rows, machine, plot_accuracy_vs_time, row_name, write_markdown

log = logging.getLogger("bench")

PLOT = "accuracy_vs_time.png"
PEAK = "peak.json"  # bench.peak's matmul rates, which each row's training FLOP/s is a share of
RESULT_FILES = ("results.csv", "results.md", PLOT, "pipeline.json", PEAK)
# The plot is redrawn from results.csv on every row, so git keeps the figures, not the picture.
COMMITTED_FILES = tuple(file for file in RESULT_FILES if file != PLOT)


@dataclass(frozen=True)
class Axes:
    """What each preset is run over, a row per combination."""

    epsilons: list[float]  # a private preset's target ε: its frontier (the others have no ε)
    seeds: list[int] | None  # None: the params' seed
    processes: list[int] | None  # train.processes; None: the params'


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%Y-%m-%d %H:%M:%S")
    args = parse_args()
    # Absolute: the presets run in their own scratch folders, where a relative path would point elsewhere.
    out, images = Path(args.out).resolve(), Path(args.images).resolve()
    if not images.exists():
        raise SystemExit(f"error: --images {images} does not exist")
    params = read_params(Path(args.params))
    overrides = parse_overrides(args.set)
    presets = args.presets.split(",") if args.presets else preset_names(params)
    axes = Axes(args.epsilons, args.seeds, args.processes)
    runs = planned_runs(params, overrides, presets, args.repeat, axes)  # fails early
    if args.fresh:
        start_over(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / ".gitignore").write_text("# scratch projects and cached data of python -m bench; the results are kept\n"
                                    f"/cache/\n/runs/\n/bench.log\n/{PLOT}\n")
    rows = load_rows(out / "results.csv")
    refuse_other_machine(rows, out)
    log.info("benchmark into %s: tutorial, then %s", out, ", ".join(runs))

    if TUTORIAL in set(rows["name"]) and set(runs) - set(rows["name"]):
        check_t_unchanged(rows, images, args, out)
    rows = run_tutorial(rows, images, args, out)
    if not (out / PEAK).is_file():  # in the run that timed T (or, for a file older than it, re-timed it)
        log.info("peak: timing a large matmul in each precision")
        write_json(out / PEAK, matmul_rates(args.matmul_side))
    if args.commit:
        commit_results(out, TUTORIAL)
    t_seconds = float(rows.loc[rows["name"] == TUTORIAL, "train_seconds"].iloc[0])
    failed = []
    for name, run_params in runs.items():
        if name in set(rows["name"]):
            log.info("%s: done before (row in %s), skipped", name, out / "results.csv")
            continue
        try:
            data = prepare_data(run_params, images, out / "cache")
            log.info("%s: training (T = %.1f s)", name, t_seconds)
            figures = run_preset(name, run_params, data, out / "runs" / name)
        except ChildFailed as error:
            log.error("%s: failed, no row written (a rerun tries it again): %s", name, error)
            failed.append(name)
            continue
        rows = record(out, rows, {"name": name, **figures}, t_seconds)
        if args.commit:
            commit_results(out, name)
    if not (out / "pipeline.json").is_file() and not args.no_pipeline:
        try:
            write_json(out / "pipeline.json", measure_pipeline(params, overrides, images, out / "runs" / "pipeline"))
            record(out, rows, None, t_seconds)
            if args.commit:
                commit_results(out, "pipeline")
        except ChildFailed as error:
            log.error("pipeline: failed (a rerun tries it again): %s", error)
            failed.append("pipeline")
    log.info("finished: %s%s", out / "results.md", f"; failed: {', '.join(failed)}" if failed else "")
    return 1 if failed else 0


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", required=True,
                        help="image folder or .tar.gz with train/<class>/ and test/<class>/ (e.g. CIFAR-10 as JPEGs)")
    parser.add_argument("--presets", help="comma-separated; default: every preset in params.yaml's presets: section "
                                          "that trains from scratch")
    parser.add_argument("--out", default="reports/bench", help="results, and the cache/ and runs/ scratch folders")
    parser.add_argument("--params", default="params.yaml", help="the project's params the presets start from")
    parser.add_argument("--fresh", action="store_true", help="discard results.csv and the runs, start over")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a params key in every preset's params.yaml (smoke runs: train.epochs=1)")
    parser.add_argument("--tutorial-epochs", type=int, default=2, help="the tutorial trains 2; fewer for smoke runs")
    parser.add_argument("--repeat", type=lambda text: text.split(","), default=[], metavar="PRESETS",
                        help="run these presets a second time (rows <name>-repeat, at each seed and process "
                             "count): same seed, same figures?")
    parser.add_argument("--epsilons", type=lambda text: [float(value) for value in text.split(",")],
                        default=[1.0, 3.0, 8.0], metavar="EPSILONS",
                        help="the target ε a private preset runs at, one row each (default 1,3,8)")
    parser.add_argument("--seeds", type=whole_numbers(0), metavar="SEEDS",
                        help="run each preset once per seed, rows <name>-seed<N> when more than one (default: "
                             "the params' seed alone)")
    parser.add_argument("--processes", type=whole_numbers(1), metavar="COUNTS",
                        help="run each preset once per count of training processes (train.processes), rows "
                             "<name>-<N>proc for N > 1 (default: the params' train.processes, 1); private presets "
                             "run in one process only, their other runs are skipped")
    parser.add_argument("--t-tolerance", type=float, default=0.05,
                        help="how far a rerun's T may be from the file's before the rows are refused to mix "
                             "(a fraction; default 0.05)")
    parser.add_argument("--matmul-side", type=int, default=SIDE, metavar="N",
                        help=f"the side of the square matmul timed as the machine's peak (default {SIDE}; smaller for "
                             "smoke runs)")
    parser.add_argument("--no-pipeline", action="store_true",
                        help="skip timing the decoding and a no-op dvc repro in a scratch DVC project")
    parser.add_argument("--commit", action="store_true",
                        help="git-commit the results files after each row (a long background run keeps what it measured)")
    return parser.parse_args()


def whole_numbers(smallest: int):
    """An argparse type: `0,1,2` → [0, 1, 2], each at least `smallest`."""
    def parse(text: str) -> list[int]:
        try:
            numbers = [int(value) for value in text.split(",")]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r}: expected whole numbers separated by commas, "
                                             "e.g. 0,1,2") from None
        if min(numbers) < smallest:
            raise argparse.ArgumentTypeError(f"{text!r}: each must be at least {smallest}")
        return numbers
    return parse


def planned_runs(params: dict, overrides: dict, presets: list[str], repeats: list[str], axes: Axes) -> dict[str, dict]:
    """Each row to run and its params: every preset, and each repeated one again, once per combination of target
    ε (a private preset's), process count and seed. A private preset's runs in several processes are skipped."""
    runs, skipped = {}, []
    for preset, repeat in [*((preset, False) for preset in presets), *((preset, True) for preset in repeats)]:
        recipe = params_for_preset(params, preset, overrides)
        private = is_private(recipe)
        seeds = axes.seeds or [recipe["seed"]]
        for epsilon, processes, seed in itertools.product(axes.epsilons if private else [None],
                                                          axes.processes or [recipe["train"]["processes"]], seeds):
            # One seed keeps the names seedless: results.csv files written before --seeds resume as they are.
            name = row_name(preset, epsilon=epsilon, processes=processes, seed=seed if len(seeds) > 1 else None,
                            repeat=repeat)
            if private and processes > 1:
                skipped.append(name)
                continue
            runs[name] = apply_overrides(recipe, run_settings(epsilon, processes, seed))
    if skipped:
        # Train refuses them: DP-SGD's accounting assumes one process drawing every Poisson batch.
        log.info("skipped, private presets train in one process only: %s", ", ".join(skipped))
    if not runs:
        raise SystemExit(f"error: nothing to run: {', '.join(skipped)} would train a private preset in several "
                         "processes, which train refuses (DP-SGD's accounting assumes one process drawing every "
                         "Poisson batch): add 1 to --processes")
    return runs


def run_settings(epsilon: float | None, processes: int, seed: int) -> dict:
    """The keys one run sets on top of its preset's params."""
    settings = {"seed": seed, "train.processes": processes}
    if epsilon is not None:
        settings["train.target_epsilon"] = epsilon
    return settings


def check_t_unchanged(rows: pd.DataFrame, images: Path, args: argparse.Namespace, out: Path) -> None:
    """Time the tutorial again before adding rows to a file: ratios to T compare only when every row ran at
    the speed the file's T was measured at (one CPU name ran it in 93 s and in 148 s)."""
    recorded = float(rows.loc[rows["name"] == TUTORIAL, "train_seconds"].iloc[0])
    log.info("tutorial: timing it again before adding rows (the file's T is %.1f s)", recorded)
    now = time_tutorial(images, args, out, f"{TUTORIAL}-again")["train_seconds"]
    change = now / recorded - 1
    if abs(change) > args.t_tolerance:
        raise SystemExit(f"error: T is {now:.1f} s on this machine now, {recorded:.1f} s in {out / 'results.csv'} "
                         f"({100 * change:+.1f} %, more than --t-tolerance {100 * args.t_tolerance:g} %): rows timed "
                         "at two speeds do not compare. Use another --out, or --fresh to discard the rows there.")
    log.info("tutorial: T now %.1f s (%+.1f %% of the file's): the rows carry on", now, 100 * change)


def start_over(out: Path) -> None:
    """Remove the results and the scratch projects; the decoded data cache stays valid and is kept."""
    for name in RESULT_FILES:
        (out / name).unlink(missing_ok=True)
    shutil.rmtree(out / "runs", ignore_errors=True)
    log.info("--fresh: removed the results in %s", out)


def refuse_other_machine(rows: pd.DataFrame, out: Path) -> None:
    # Refused rather than a new file started: the rows there may be hours of another machine's
    # work, and ratios to T mean something only when every row, T included, ran on one CPU.
    here = machine()["cpu_model"]
    others = sorted(set(rows["cpu_model"]) - {here})
    # One CPU name covers chips with and without AVX-512 or bf16 (stages/hardware.py picks the precision by them).
    flags = machine()["cpu_flags"]
    others += sorted(f"{model} ({row_flags or 'none of the speed flags'})"
                     for model, row_flags in set(zip(rows["cpu_model"], rows["cpu_flags"].fillna("")))
                     if model == here and row_flags != flags)
    if others:
        raise SystemExit(f"error: {out / 'results.csv'} holds rows measured on {', '.join(others)}, this machine is "
                         f"{here} ({flags or 'none of the speed flags'}): timings of two machines do not compare. "
                         "Use another --out, or --fresh to discard them.")


def run_tutorial(rows: pd.DataFrame, images: Path, args: argparse.Namespace, out: Path) -> pd.DataFrame:
    if TUTORIAL in set(rows["name"]):
        log.info("tutorial: done before (row in %s), skipped", out / "results.csv")
        return rows
    figures = time_tutorial(images, args, out, TUTORIAL)
    return record(out, rows, figures, figures["train_seconds"])


def time_tutorial(images: Path, args: argparse.Namespace, out: Path, run_name: str) -> dict:
    """The PyTorch tutorial's LeNet trained in out/runs/<run_name>: its figures as a results row."""
    folder = extract_archive(images, out / "cache")
    run_dir = out / "runs" / run_name
    run_dir.mkdir(parents=True, exist_ok=True)
    log.info("tutorial: training LeNet on %s, %d epochs (this is T)", folder, args.tutorial_epochs)
    result_file = run_dir / "result.json"
    finished = run_module("bench.tutorial", str(folder.resolve()), "--epochs", str(args.tutorial_epochs),
                          "--result", str(result_file.resolve()), cwd=run_dir, log_file=run_dir / "tutorial.log",
                          tag=TUTORIAL)
    result = json.loads(result_file.read_text())
    return {"name": TUTORIAL, "accuracy": result["accuracy"], "accuracy_tta": None,
            "train_seconds": result["train_seconds"], "images_per_second": result["images_per_second"],
            "peak_memory_mb": finished.peak_memory_mb, "device": result["device"],
            "precision": result["precision"], "threads": result["threads"]}


def record(out: Path, rows: pd.DataFrame, figures: dict | None, t_seconds: float) -> pd.DataFrame:
    """Append a finished run's row (if any), then redraw the table and the plot from the whole file."""
    pipeline, peak = (json.loads((out / name).read_text()) if (out / name).is_file() else None
                      for name in ("pipeline.json", PEAK))
    if figures is None:
        write_markdown(out / "results.md", rows, pipeline, peak)
        log.info("pipeline: %s", pipeline)
        return rows
    rows = append_row(out / "results.csv", rows, figures, t_seconds, peak)
    write_markdown(out / "results.md", rows, pipeline, peak)
    plot_accuracy_vs_time(out / PLOT, rows)
    log.info("%s: accuracy %.4f%s, %.1f s of training (%.2f T) -> %s", figures["name"], figures["accuracy"],
             f" ({figures['accuracy_tta']:.4f} with TTA)" if figures["accuracy_tta"] is not None else "",
             figures["train_seconds"], figures["train_seconds"] / t_seconds, out / "results.csv")
    return rows


def commit_results(out: Path, name: str) -> None:
    """Commit the results files but the plot, and nothing else that may be staged or changed."""
    files = [str(out / file) for file in COMMITTED_FILES if (out / file).exists()]
    subprocess.run(["git", "add", "--", *files], check=True, cwd=out)
    done = subprocess.run(["git", "commit", "--quiet", "-m", f"bench: {name} row ({machine()['cpu_model']})", "--",
                           *files], cwd=out, capture_output=True, text=True)
    if done.returncode != 0:
        log.warning("could not commit the results (%s); they are on disk", (done.stderr or done.stdout).strip())


def stop_on_sigterm(signal_number: int, frame) -> None:
    # `kill <pid>` of a background run: unwind like Ctrl-C, so the running stage is stopped too.
    raise KeyboardInterrupt


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, stop_on_sigterm)
    try:
        sys.exit(main())
    except ChildFailed as error:  # the tutorial or the data preparation: nothing can follow
        log.error("%s", error)
        sys.exit(1)
    except KeyboardInterrupt:
        log.info("stopped; the finished rows are kept, the same command carries on")
        sys.exit(130)
