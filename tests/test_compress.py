"""The compress stage, run as DVC runs it on the tiny trained project: every variant written,
loaded back and scored on the test split, a table and metrics that agree, and bad inputs named."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import AUGMENTED_PARAMS, Project
from stages.datasets import load_split
from stages.models import load_checkpoint
from stages.params import COMPRESSED_VARIANTS

ALL_VARIANTS = list(COMPRESSED_VARIANTS)


def compress(trained_project: Project, root, **overrides) -> tuple[Project, subprocess.CompletedProcess]:
    project = trained_project.copy(root, "data/prepared", "models")
    project.write_params({**AUGMENTED_PARAMS, **overrides})
    return project, project.compress()


@pytest.fixture(scope="module")
def compressed(trained_project, tmp_path_factory) -> Project:
    """trained_project compressed into every variant, pruning 40 % of the weights."""
    project, result = compress(trained_project, tmp_path_factory.mktemp("compressed"),
                               **{"compress.variants": ALL_VARIANTS, "compress.prune_amount": 0.4})
    assert result.returncode == 0, result.stderr
    return project


def table_of(project: Project) -> pd.DataFrame:
    return pd.read_csv(project.reports / "compression.csv", keep_default_na=False).set_index("variant")


def test_every_variant_is_written_and_measured_beside_the_fp32_reference(compressed):
    table = table_of(compressed)

    assert list(table.index) == ["fp32", *ALL_VARIANTS]
    files = sorted(path.name for path in (compressed.root / "models" / "compressed").iterdir())
    assert files == sorted(["int8.torchscript.pt", "pruned.pt", "bf16.pt", "fp16.pt", "exported.pt2"])
    for variant, row in table.iterrows():
        assert row["size_bytes"] == (compressed.root / row["file"]).stat().st_size, variant
        assert 0 <= row["accuracy"] <= 1 and row["latency_ms"] > 0 and row["images_per_second"] > 0
        assert row["threads"] == 1  # compress.threads
    assert table.loc["int8", "backend"] in ("x86", "fbgemm", "onednn", "qnnpack")
    assert table.loc["int8", "precision"] == "int8" and table.loc["bf16", "precision"] == "bf16"


def test_the_variants_keep_their_promises(compressed):
    table = table_of(compressed)

    assert table.loc["pruned", "sparsity"] == pytest.approx(0.4, abs=0.001)
    # (the fp32 model has zeros of its own: on these 16-px images the last conv sees 1x1 maps, so
    # its off-centre taps, Dirac-initialised to zero, never get a gradient)
    assert table.loc["fp32", "sparsity"] < table.loc["pruned", "sparsity"]
    assert table.loc["bf16", "size_bytes"] < table.loc["fp32", "size_bytes"]
    assert table.loc["fp16", "size_bytes"] < table.loc["fp32", "size_bytes"]
    # The exported program is the fp32 model's own arithmetic.
    assert table.loc["exported", "accuracy"] == table.loc["fp32", "accuracy"]


def test_the_reference_row_scores_the_checkpoint_on_the_whole_test_split(compressed):
    test = load_split(compressed.prepared, "test")
    model, _ = load_checkpoint(compressed.model)
    with torch.inference_mode():
        predicted = model(torch.from_numpy(np.array(test.images)).permute(0, 3, 1, 2).float() / 255).argmax(dim=1)

    assert table_of(compressed).loc["fp32", "accuracy"] == round(float((predicted.numpy() == test.labels).mean()), 6)


def test_metrics_hold_each_variant_against_the_reference(compressed):
    metrics = json.loads((compressed.reports / "compression.json").read_text())
    table = table_of(compressed)

    assert metrics["int8_backend"] == table.loc["int8", "backend"]
    for variant in ["fp32", *ALL_VARIANTS]:
        assert metrics[variant]["accuracy"] == table.loc[variant, "accuracy"]
        assert metrics[variant]["size_mb"] == round(table.loc[variant, "size_bytes"] / 1e6, 3)
    assert metrics["fp32"]["speedup"] == 1 and metrics["fp32"]["accuracy_change"] == 0
    assert metrics["bf16"]["size_ratio"] < 1


LOAD_WITHOUT_THE_PROJECT = textwrap.dedent("""
    import sys, torch
    torch.backends.quantized.engine = sys.argv[3]
    images = torch.rand(5, 3, 16, 16)
    int8 = torch.jit.load(sys.argv[1])
    program = torch.export.load(sys.argv[2]).module()
    print(tuple(int8(images).shape), tuple(program(images).shape))
    print(sorted(name for name in sys.modules if name.split(".")[0] in ("stages", "flows", "conftest")))
""")


def test_the_int8_and_exported_files_load_and_run_without_the_projects_code(compressed, tmp_path):
    folder = compressed.root / "models" / "compressed"
    backend = table_of(compressed).loc["int8", "backend"]
    command = [sys.executable, "-I", "-c", LOAD_WITHOUT_THE_PROJECT, str(folder / "int8.torchscript.pt"),
               str(folder / "exported.pt2"), backend]

    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=120,
                            env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})

    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["(5, 3) (5, 3)", "[]"]


def test_a_second_run_with_fewer_variants_leaves_only_their_files(compressed, tmp_path):
    project = compressed.copy(tmp_path / "again", "data/prepared", "models")
    project.write_params({**AUGMENTED_PARAMS, "compress.variants": ["pruned"]})

    result = project.compress()

    assert result.returncode == 0, result.stderr
    assert [path.name for path in (project.root / "models" / "compressed").iterdir()] == ["pruned.pt"]
    assert list(table_of(project).index) == ["fp32", "pruned"]


def test_no_variants_measure_the_reference_alone_and_leave_an_empty_folder(trained_project, tmp_path):
    project, result = compress(trained_project, tmp_path, **{"compress.variants": []})

    assert result.returncode == 0, result.stderr
    assert list((project.root / "models" / "compressed").iterdir()) == []
    assert list(table_of(project).index) == ["fp32"]
    assert json.loads((project.reports / "compression.json").read_text())["int8_backend"] == "none"


# --- bad inputs ----------------------------------------------------------------------------


def test_an_unknown_variant_is_refused_with_the_accepted_names(trained_project, tmp_path):
    project, result = compress(trained_project, tmp_path, **{"compress.variants": ["int8", "int4"]})

    assert result.returncode == 1
    assert "compress.variants.1: must be 'int8', 'pruned', 'bf16', 'fp16' or 'exported' (got 'int4')" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (project.root / "models" / "compressed").exists()
    assert not (project.reports / "compression.csv").exists()


def test_a_variant_named_twice_is_refused(trained_project, tmp_path):
    _, result = compress(trained_project, tmp_path, **{"compress.variants": ["bf16", "int8", "bf16"]})

    assert result.returncode == 1
    assert "compress.variants names bf16 more than once" in result.stderr


def test_a_missing_model_names_the_stage_that_writes_it(trained_project, tmp_path):
    project = trained_project.copy(tmp_path, "data/prepared")
    project.write_params(AUGMENTED_PARAMS)

    result = project.compress()

    assert result.returncode == 1
    assert "error: models/model.pt not found: stage train writes it" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (project.reports / "compression.csv").exists()
