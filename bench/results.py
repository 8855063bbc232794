"""The results table: one row per finished run in results.csv, rendered as results.md and a plot.

Rows are appended as soon as a run finishes (the file rewritten under a temporary name, then
renamed), so an interrupted benchmark keeps every finished row and a rerun skips them.
"""

from __future__ import annotations

import datetime
import os
from pathlib import Path

import pandas as pd
import torch

from stages.hardware import cpu_model_name
from stages.outputs import atomic_path

COLUMNS = [
    "name", "accuracy", "accuracy_tta", "epsilon", "train_seconds", "ratio_to_T", "images_per_second",
    "load_seconds", "peak_memory_mb",
    "cpu_model", "cpu_flags", "device", "precision", "threads", "torch_version", "finished_at",
]
TUTORIAL = "tutorial"
REPEAT_SUFFIX = "-repeat"  # a preset's second run (--repeat), for the determinism check
EPSILON_SUFFIX = "-eps"  # a private preset's run at one target ε of the frontier: private-eps8
# The CPU features that decide training speed: AVX-512 and native bf16 (see stages/hardware.py).
SPEED_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")


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
    if not csv_path.is_file():
        return pd.DataFrame(columns=COLUMNS)
    return pd.read_csv(csv_path, keep_default_na=False, na_values=[""])


def append_row(csv_path: Path, rows: pd.DataFrame, figures: dict, t_seconds: float) -> pd.DataFrame:
    """rows plus one finished run, written atomically; returns the new table."""
    row = {**figures, **machine(),
           "ratio_to_T": round(figures["train_seconds"] / t_seconds, 3),
           "finished_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    new = pd.DataFrame([row]).reindex(columns=COLUMNS)  # the tutorial has no load_seconds
    table = pd.concat([rows, new], ignore_index=True) if len(rows) else new
    with atomic_path(csv_path) as partial:
        table.to_csv(partial, index=False)
    return table


def write_markdown(path: Path, rows: pd.DataFrame, pipeline: dict | None = None) -> None:
    tutorial = rows[rows["name"] == TUTORIAL].iloc[0]
    lines = [
        "# Benchmark: the tutorial baseline and the presets",
        "",
        f"Machine: {describe_machine()}.",
        "",
        f"T = **{tutorial['train_seconds']:.1f} s**: the PyTorch tutorial's training time on this machine "
        f"(LeNet, batch 4, per-image PIL decoding), test accuracy {100 * tutorial['accuracy']:.2f} %.",
        "Accuracies are fractions of the test split; `accuracy_tta` with evaluate's test-time augmentation; "
        "`epsilon` the ε a private run spent (δ as its preset says), empty for the others.",
        "",
        rows.to_markdown(index=False, floatfmt="g"),
        "",
        *describe_pipeline(pipeline, rows),
        *describe_repeats(rows),
        "Made by `python -m bench` (bench/); figures from one run on one machine.",
    ]
    with atomic_path(path) as partial:
        partial.write_text("\n".join(lines) + "\n")


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
