"""The results table: one row per finished run in results.csv, rendered as results.md and a plot.

Rows are appended as soon as a run finishes (the file rewritten under a temporary name, then
renamed), so an interrupted benchmark keeps every finished row and a rerun skips them.
"""

from __future__ import annotations

import datetime
import os
import re
from pathlib import Path

import pandas as pd
import torch

from stages.hardware import cpu_model_name
from stages.outputs import atomic_path

COLUMNS = [
    "name", "accuracy", "accuracy_tta", "epsilon", "seed", "processes", "train_seconds", "ratio_to_T",
    "images_per_second", "eval_seconds", "train_tflop", "tflops", "peak_share", "allreduce_seconds",
    "allreduce_share", "parameters", "batch_size",
    "load_seconds", "peak_memory_mb", "cpu_model", "cpu_flags", "device", "precision", "threads", "torch_version",
    "finished_at",
]
# Whole numbers that a missing value (the tutorial's, an older file's) would otherwise turn into floats: 1.0.
INTEGER_COLUMNS = {"seed": "Int64", "processes": "Int64", "threads": "Int64", "parameters": "Int64",
                   "batch_size": "Int64"}
# The scaling table: machines, and the links between them in Gbit/s.
SCALING_MACHINES = (2, 4, 8, 16, 32)
SCALING_LINKS_GBIT = (10, 100)
# Over the seeds of a preset, results.md gives the mean and deviation of these.
SEED_SUMMARY_COLUMNS = ("accuracy", "accuracy_tta", "train_seconds", "ratio_to_T", "eval_seconds", "peak_share")
TUTORIAL = "tutorial"
PEER = "airbench94"  # the published recipe: P, its mean training time, is the other yardstick
REPEAT_SUFFIX = "-repeat"  # a preset's second run (--repeat), for the determinism check
EPSILON_SUFFIX = "-eps"  # a private preset's run at one target ε of the frontier: private-eps8
PROCESSES_SUFFIX = "proc"  # a run in N > 1 training processes: default-2proc
SEED_SUFFIX = "-seed"  # one run of several seeds (--seeds): default-seed1
SEED_PART = re.compile(rf"{SEED_SUFFIX}\d+(?=(?:{REPEAT_SUFFIX})?$)")
# The CPU features that decide training speed: AVX-512 and native bf16 (see stages/hardware.py).
SPEED_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")


def row_name(preset: str, *, epsilon: float | None = None, processes: int = 1, seed: int | None = None,
             repeat: bool = False) -> str:
    """A run's row: <preset>[-eps<ε>][-<N>proc][-seed<N>][-repeat]. A part at its default (not private, one
    process, one seed) is left out, so the names, and the results.csv files holding them, are as before
    the benchmark had these axes."""
    name = preset
    if epsilon is not None:
        name += f"{EPSILON_SUFFIX}{epsilon:g}"
    if processes > 1:
        name += f"-{processes}{PROCESSES_SUFFIX}"
    if seed is not None:
        name += f"{SEED_SUFFIX}{seed}"
    return name + (REPEAT_SUFFIX if repeat else "")


def without_seed(name: str) -> str:
    """default-2proc-seed1 → default-2proc: the runs a seed summary takes together."""
    return SEED_PART.sub("", name)


def cpu_flags() -> str:
    """The SPEED_FLAGS this CPU has, space-separated ('' where /proc/cpuinfo is absent)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return ""
    flags = next((line.split(":", 1)[1].split() for line in lines if line.startswith("flags")), [])
    return " ".join(flag for flag in SPEED_FLAGS if flag in flags)


def machine() -> dict:
    """What every row records about the machine it ran on."""
    return {"cpu_model": cpu_model_name(), "cpu_flags": cpu_flags(), "torch_version": str(torch.__version__)}


def describe_machine() -> str:
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ", no GPU"
    flags = cpu_flags() or "none of " + ", ".join(SPEED_FLAGS)
    return f"{cpu_model_name()} ({flags}), {os.cpu_count()} logical cores{gpu}; torch {torch.__version__}"


def load_rows(csv_path: Path) -> pd.DataFrame:
    """results.csv with every column of COLUMNS: a file written before some of them existed resumes with
    those cells empty (a column it has that COLUMNS lacks is kept, after them)."""
    if not csv_path.is_file():
        return with_columns(pd.DataFrame(columns=COLUMNS))
    return with_columns(pd.read_csv(csv_path, keep_default_na=False, na_values=[""]))


def with_columns(table: pd.DataFrame) -> pd.DataFrame:
    """The table in COLUMNS' order, each of them present, whole-number columns as such."""
    extra = [column for column in table.columns if column not in COLUMNS]
    return table.reindex(columns=[*COLUMNS, *extra]).astype(INTEGER_COLUMNS)


def append_row(csv_path: Path, rows: pd.DataFrame, figures: dict, t_seconds: float, peak: dict | None = None
               ) -> pd.DataFrame:
    """rows plus one finished run, written atomically; returns the new table. `peak`: bench.peak's matmul rates,
    which the run's training FLOP/s is a share of."""
    figures = dict(figures)
    flops = figures.pop("train_flops", None)  # kept as train_tflop
    row = {**figures, **machine(), **achieved_rate(flops, figures, peak),
           "ratio_to_T": round(figures["train_seconds"] / t_seconds, 3),
           "finished_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    new = with_columns(pd.DataFrame([row]))  # the tutorial has no load_seconds
    table = with_columns(pd.concat([rows, new], ignore_index=True)) if len(rows) else new
    with atomic_path(csv_path) as partial:
        table.to_csv(partial, index=False)
    return table


def achieved_rate(flops: int | None, figures: dict, peak: dict | None) -> dict:
    """train_tflop, tflops, the training FLOPs a second the run reached, and peak_share, that as a share of the
    matmul rate in its precision (empty where one is unknown: the tutorial's FLOPs are not counted)."""
    if flops is None:
        return {}
    rate = flops / figures["train_seconds"]
    peak_rate = (peak or {}).get(f"{figures['precision']}_flops_per_second")
    return {"train_tflop": significant(flops / 1e12), "tflops": significant(rate / 1e12),
            "peak_share": significant(rate / peak_rate) if peak_rate else None}


def significant(value: float, digits: int = 4) -> float:
    """Rounded to `digits` significant digits: a smoke run's FLOPs are a millionth of a real one's."""
    return float(f"{value:.{digits}g}")


def write_markdown(path: Path, rows: pd.DataFrame, pipeline: dict | None = None, peak: dict | None = None) -> None:
    tutorial = rows[rows["name"] == TUTORIAL].iloc[0]
    lines = [
        "# Benchmark: the tutorial baseline and the presets",
        "",
        f"Machine: {describe_machine()}.",
        "",
        f"T = **{tutorial['train_seconds']:.1f} s**: the PyTorch tutorial's training time on this machine "
        f"(LeNet, batch 4, per-image PIL decoding), test accuracy {100 * tutorial['accuracy']:.2f} %.",
        "Accuracies are fractions of the test split; `accuracy_tta` with evaluate's test-time augmentation; "
        "`epsilon` the ε a private run spent (δ as its preset says), empty for the others; `processes` the "
        "training processes (`allreduce_*`: the gradients' all-reduce per step, seconds and share of a step, with "
        "several); `eval_seconds` evaluate's scoring of the test split, with TTA, which a user waits for too; "
        "`train_tflop` the FLOPs training computed (convolutions and matmuls, forward, backward and the "
        "optimiser's, counted by torch's FlopCounterMode), `tflops` per second of training, `peak_share` that as a "
        "share of a large matmul's rate in the run's precision.",
        *describe_peak(peak),
        "",
        markdown_table(rows),
        "",
        *describe_seeds(rows),
        *describe_scaling(rows),
        *describe_pipeline(pipeline, rows),
        *describe_repeats(rows),
        "Made by `python -m bench` (bench/); figures from one run on one machine.",
    ]
    with atomic_path(path) as partial:
        partial.write_text("\n".join(lines) + "\n")


def markdown_table(table: pd.DataFrame) -> str:
    # Missing cells (the tutorial's seed, a one-process run's all-reduce) empty rather than `nan` or `<NA>`.
    cells = table.astype(object).where(table.notna(), None)
    return cells.to_markdown(index=False, floatfmt="g", missingval="")


def describe_peak(peak: dict | None) -> list[str]:
    if not peak:
        return []
    rates = ", ".join(f"{precision} {peak[f'{precision}_flops_per_second'] / 1e12:.3f} TFLOP/s"
                      for precision in ("bf16", "fp32") if f"{precision}_flops_per_second" in peak)
    return [f"The machine's matmul rate, measured in this run (`python -m bench.peak`: {peak['matmul_side']}² "
            f"matrices, {peak['threads']} threads): {rates}."]


def describe_seeds(rows: pd.DataFrame) -> list[str]:
    """The runs of several seeds (rows <run>-seed<N>), per run: mean ± standard deviation over the seeds present,
    and the mean training time as a ratio to P, the peer's (airbench94's runs in one process)."""
    seeded = rows[rows["name"].str.contains(SEED_PART)]
    if seeded.empty:
        return []
    peer = seeded[seeded["name"].map(without_seed) == PEER]["train_seconds"]
    p_seconds = peer.mean() if len(peer) else None
    summary = pd.DataFrame([summarise_seeds(run, runs, p_seconds)
                            for run, runs in seeded.groupby(seeded["name"].map(without_seed), sort=False)])
    peer_line = (f" `ratio_to_P`: mean training time over P = {p_seconds:.1f} s, the mean of the `{PEER}` rows."
                 if p_seconds else "")
    return ["Over seeds: mean ± standard deviation (sample, n − 1) of the rows `<run>-seed<N>` present; with one "
            f"seed so far, its figure alone.{peer_line}", "", markdown_table(summary), ""]


def summarise_seeds(run: str, runs: pd.DataFrame, p_seconds: float | None = None) -> dict:
    summary = {"run": run, "seeds": ", ".join(str(seed) for seed in runs["seed"]),
               **{column: mean_and_deviation(runs[column]) for column in SEED_SUMMARY_COLUMNS}}
    if p_seconds:
        summary["ratio_to_P"] = f"{runs['train_seconds'].mean() / p_seconds:.3f}"
    return summary


def mean_and_deviation(values: pd.Series) -> str:
    values = values.dropna()
    if len(values) < 2:
        return "" if values.empty else f"{values.iloc[0]:.4g}"
    return f"{values.mean():.4g} ± {values.std():.2g}"


def describe_scaling(rows: pd.DataFrame) -> list[str]:
    """How a training step would scale to N machines, for each run in several processes: the one-process run's
    compute for a global batch, split N ways, against one ring all-reduce of the gradients (each machine sends
    and receives 2 (N - 1) / N of 4 bytes a parameter) at 10 and 100 Gbit/s, with nothing overlapped."""
    several = rows[rows["processes"].fillna(1) > 1].dropna(subset=["parameters", "batch_size"])
    by_name = rows.set_index("name")
    table = []
    for _, run in several.iterrows():
        alone = re.sub(rf"-{int(run['processes'])}{PROCESSES_SUFFIX}", "", run["name"])
        if alone not in by_name.index:
            continue
        step = run["batch_size"] / by_name.loc[alone, "images_per_second"]  # one machine, every core, one process
        gradient_bytes = 4 * run["parameters"]
        line = {"run": alone, "parameters": f"{run['parameters']:,}", "gradients MB": f"{gradient_bytes / 1e6:.2f}",
                "step s (1 machine)": f"{step:.3f}",
                f"all-reduce ms ({int(run['processes'])} processes here)": f"{1000 * run['allreduce_seconds']:.1f}"}
        for machines in SCALING_MACHINES:
            speed_ups = [step / (step / machines + 2 * (machines - 1) / machines * gradient_bytes / (gbit * 1e9 / 8))
                         for gbit in SCALING_LINKS_GBIT]
            line[f"{machines} machines"] = " / ".join(f"{speed_up:.1f}x" for speed_up in speed_ups)
        table.append(line)
    if not table:
        return []
    links = " / ".join(f"{gbit} Gbit/s" for gbit in SCALING_LINKS_GBIT)
    return [f"Scaling to N machines like this one (speed-up of a step at {links}): each computes 1/N of the global "
            "batch at the one-process run's images/s and all-reduces the gradients in a ring (2 (N − 1) / N of "
            "them sent and received per machine), nothing overlapped, latency left out.", "",
            pd.DataFrame(table).to_markdown(index=False), ""]


def describe_pipeline(pipeline: dict | None, rows: pd.DataFrame) -> list[str]:
    if not pipeline:
        return []
    loads = rows["load_seconds"].dropna()
    loading = f" loading the prepared data for training {loads.median():.2f} s (median of train's `load_seconds`);" \
        if len(loads) else ""
    return [f"The pipeline: decoding the {pipeline['decoded_images']:,}-image archive {pipeline['decode_seconds']:.1f} s;"
            f"{loading} a no-op `dvc repro` (nothing changed) {pipeline['noop_repro_seconds']:.2f} s.", ""]


def describe_repeats(rows: pd.DataFrame) -> list[str]:
    """Target 6: a preset run twice, same seed and params, must give the same figures."""
    lines = []
    by_name = rows.set_index("name")
    for name in rows["name"]:
        original = name.removesuffix(REPEAT_SUFFIX)
        if name.endswith(REPEAT_SUFFIX) and original in by_name.index:
            same = all(by_name.loc[original, column] == by_name.loc[name, column] for column in ("accuracy", "accuracy_tta"))
            lines += [f"Same seed, same params, same machine: `{original}` run twice gave "
                      f"{'identical' if same else 'DIFFERENT'} accuracies ({by_name.loc[name, 'accuracy']:.4f}, "
                      f"{by_name.loc[name, 'accuracy_tta']:.4f} with TTA).", ""]
    return lines


def plot_accuracy_vs_time(path: Path, rows: pd.DataFrame) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.5))
    best = rows["accuracy_tta"].fillna(rows["accuracy"])
    axes.scatter(rows["train_seconds"], 100 * best)
    for name, seconds, accuracy in zip(rows["name"], rows["train_seconds"], best):
        axes.annotate(name, (seconds, 100 * accuracy), textcoords="offset points", xytext=(5, 5))
    if rows["train_seconds"].max() > 20 * rows["train_seconds"].min():
        axes.set_xscale("log")  # the presets span T/10 to 30 T
    axes.set_xlabel("training seconds")
    axes.set_ylabel("test accuracy, % (with TTA where run)")
    axes.set_title(f"Accuracy against training time\n{cpu_model_name()}", fontsize=10)
    axes.grid(alpha=0.3)
    figure.tight_layout()
    with atomic_path(path) as partial:
        figure.savefig(partial, format="png", dpi=120)
    plt.close(figure)
