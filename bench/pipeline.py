"""A preset trained through the pipeline's own stages, as dvc.yaml runs them, in a scratch project.

The data is downloaded (decoded) and augmented once per seed and data settings into <out>/cache/; each
run then gets <out>/runs/<row name>/ with its own params.yaml, where train and evaluate run.
The pipeline's own overheads (decoding, a no-op `dvc repro`) are measured once, in a scratch
DVC project.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import shutil
import subprocess
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from ruamel.yaml import YAML

from bench.processes import PROJECT_ROOT, run_module, run_stage

log = logging.getLogger("bench")

DEFAULT_PRESET = "default"  # params.yaml as it stands, where it defines no presets


@dataclass(frozen=True)
class PreparedData:
    prepared: Path
    augmented: Path


# --- params ----------------------------------------------------------------------------------


def read_params(path: Path) -> dict:
    return YAML(typ="safe", pure=True).load(path.read_text())


def write_params(params: dict, folder: Path) -> Path:
    path = folder / "params.yaml"
    folder.mkdir(parents=True, exist_ok=True)
    yaml = YAML(typ="safe", pure=True)
    yaml.default_flow_style = False
    with open(path, "w") as file:
        yaml.dump(params, file)
    return path


def preset_names(params: dict) -> list[str]:
    """Every preset params.yaml's `presets:` section names that trains from scratch without privacy (or just
    `default` before there is a section): the benchmark times training, and a preset that starts from
    downloaded weights (finetune) is neither comparable nor runnable offline; a private preset runs once per
    ε of the frontier, hours on a CPU, so it is asked for by name. `--presets` runs any of them."""
    presets = params.get("presets") or {}
    return [name for name, recipe in presets.items()
            if recipe.get("weights", "random") == "random" and recipe.get("target_epsilon") is None] or [DEFAULT_PRESET]


def is_private(params: dict) -> bool:
    """Whether the run params_for_preset made trains with DP-SGD: train.target_epsilon, else its preset's."""
    train = params["train"]
    if "target_epsilon" in train:
        return train["target_epsilon"] is not None
    recipe = (params.get("presets") or {}).get(train.get("preset")) or {}
    return recipe.get("train", recipe).get("target_epsilon") is not None


def parse_overrides(settings: list[str]) -> dict:
    """`train.epochs=1` → {"train.epochs": 1}; values are YAML, so `[8,16,16]` is a list."""
    overrides = {}
    for setting in settings:
        key, separator, value = setting.partition("=")
        if not separator or not key:
            raise SystemExit(f"error: --set {setting!r}: expected key=value, e.g. train.epochs=1")
        overrides[key] = YAML(typ="safe", pure=True).load(value)
    return overrides


def apply_overrides(params: dict, overrides: dict) -> dict:
    params = copy.deepcopy(params)
    for dotted, value in overrides.items():
        *sections, key = dotted.split(".")
        node = params
        for section in sections:
            node = node.setdefault(section, {})
        node[key] = value
    return params


def params_for_preset(params: dict, preset: str, overrides: dict) -> dict:
    """The project's params with train.preset chosen and the train keys that preset sets removed
    (explicit train.* keys override a preset, so leaving them would run params.yaml's recipe),
    then the bench's --set overrides on top."""
    presets = params.get("presets") or {}
    params = copy.deepcopy(params)
    if presets:
        if preset not in presets:
            raise SystemExit(f"error: no preset {preset!r} in params.yaml; it has: {', '.join(presets)}")
        recipe = presets[preset] or {}
        recipe = recipe.get("train", recipe) if isinstance(recipe, dict) else {}
        for key in recipe:
            params["train"].pop(key, None)
        params["train"]["preset"] = preset
    elif preset != DEFAULT_PRESET:
        raise SystemExit(f"error: params.yaml has no presets: section, so the only preset is {DEFAULT_PRESET!r} "
                         f"(params.yaml as it is), not {preset!r}")
    return apply_overrides(params, overrides)


# --- the data, once ---------------------------------------------------------------------------


def prepare_data(params: dict, images: Path, cache: Path) -> PreparedData:
    """download and augment (no copies) into the cache, unless done before with the same data settings."""
    data_params = apply_overrides(params, {"data.source": str(images.resolve()), "augment.copies": 0})
    key = hashlib.sha256(json.dumps([data_params["seed"], data_params["data"], data_params["augment"]],
                                    sort_keys=True).encode()).hexdigest()[:12]
    folder = cache / f"data-{key}"  # laid out as the project: the stages run with dvc.yaml's command lines
    data = PreparedData(folder / "data" / "prepared", folder / "data" / "augmented")
    if (data.augmented / "meta.json").is_file():
        log.info("prepared data: %s (made before)", folder)
        return data
    write_params(data_params, folder)
    log.info("prepared data: decoding %s into %s", images, data.prepared)
    for stage in ("download", "augment"):
        run_stage(stage, cwd=folder, log_file=folder / f"{stage}.log", tag=stage)
    return data


def extract_archive(archive: Path, cache: Path) -> Path:
    """A .tar.gz/.tgz extracted once into the cache (the tutorial reads image files); folders as they are."""
    if archive.is_dir():
        return image_folder_root(archive)
    if not archive.name.endswith((".tar.gz", ".tgz")):
        raise SystemExit(f"error: --images {archive}: expected a folder or a .tar.gz/.tgz archive")
    target = cache / f"images-{archive.name.split('.')[0]}"
    if not target.is_dir():
        log.info("extracting %s into %s (once)", archive, target)
        cache.mkdir(parents=True, exist_ok=True)
        partial = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=cache))
        try:
            with tarfile.open(archive) as tar:
                # filter="data" refuses absolute names, `..`, links leading outside and devices.
                tar.extractall(partial, filter="data")
            partial.rename(target)  # complete or absent: a crash midway leaves only the hidden temporary
        finally:
            shutil.rmtree(partial, ignore_errors=True)
    return image_folder_root(target)


def image_folder_root(folder: Path) -> Path:
    """The folder holding train/ and test/: this one or its single subfolder (archives often wrap one)."""
    if (folder / "train").is_dir():
        return folder
    children = [child for child in folder.iterdir() if child.is_dir()]
    if len(children) == 1 and (children[0] / "train").is_dir():
        return children[0]
    raise SystemExit(f"error: {folder} holds no train/<class>/ folders (nor does a single folder inside it)")


# --- one preset -------------------------------------------------------------------------------


def run_preset(preset: str, params: dict, data: PreparedData, project: Path) -> dict:
    """Train and evaluate one preset in its scratch project; its figures for the results table."""
    shutil.rmtree(project, ignore_errors=True)  # an interrupted run starts over
    tta = params["evaluate"]["tta"] if params["evaluate"]["tta"] != "none" else "flip"
    write_params(apply_overrides(params, {"evaluate.tta": tta}), project)
    link_inputs(project, {"data/prepared": data.prepared, "data/augmented": data.augmented})
    log_file = project / "stages.log"
    trained = run_stage("train", cwd=project, log_file=log_file, tag=f"{preset} train")
    run_stage("evaluate", cwd=project, log_file=log_file, tag=f"{preset} evaluate")
    # The same model scored once more without test-time augmentation, in a folder of its own
    # since evaluate reads its settings from the params.yaml beside it.
    no_tta = project / "no_tta"
    write_params(apply_overrides(params, {"evaluate.tta": "none"}), no_tta)
    link_inputs(no_tta, {"data/prepared": data.prepared, "models/model.pt": project / "models" / "model.pt"})
    run_stage("evaluate", cwd=no_tta, log_file=log_file, tag=f"{preset} evaluate, no TTA")

    summary = json.loads((project / "reports" / "train" / "metrics.json").read_text())
    recipe = YAML(typ="safe", pure=True).load(project / "reports" / "train" / "params.yaml")  # what train ran
    evaluated = json.loads((project / "reports" / "metrics.json").read_text())
    return {
        "accuracy": json.loads((no_tta / "reports" / "metrics.json").read_text())["accuracy"],
        "accuracy_tta": evaluated["accuracy"],
        "epsilon": summary.get("epsilon"),
        "seed": params["seed"],
        "processes": summary["processes"],
        "train_seconds": summary["train_seconds"],
        "train_flops": summary.get("train_flops"),  # absent from runs of older code
        "load_seconds": summary["load_seconds"],
        "images_per_second": summary["images_per_second"],
        "eval_seconds": evaluated["eval_seconds"],  # the scoring that gave accuracy_tta
        # Train writes these with several processes only (DVCLive takes no nulls): empty cells otherwise.
        "allreduce_seconds": summary.get("allreduce_seconds"),
        "allreduce_share": summary.get("allreduce_share"),
        "parameters": summary["parameters"],
        "batch_size": recipe["batch_size"],
        "peak_memory_mb": trained.peak_memory_mb,
        "device": summary["device"],
        "precision": summary["precision"],
        "threads": summary["threads"],
    }


def link_inputs(project: Path, inputs: dict[str, Path]) -> None:
    """Symbolic links in the scratch project to inputs that lie elsewhere, where dvc.yaml's command lines
    look for them (`data/prepared`, ...)."""
    for relative, target in inputs.items():
        link = project / relative
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(target.resolve())


# --- the pipeline's own figures: decoding, and a no-op `dvc repro` -----------------------------

PIPELINE_PRESET = "lenet"  # the quickest recipe: only the pipeline's own overheads are measured here
PROJECT_FILES = ("dvc.yaml", "stages", ".dvc/config", ".dvc/.gitignore", ".dvcignore")


def measure_pipeline(params: dict, overrides: dict, images: Path, folder: Path) -> dict:
    """`dvc repro` of a scratch copy of the project on `images` (the quickest preset, one epoch),
    then `dvc repro` again, timed: with nothing changed it must only check and skip every stage."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for name in PROJECT_FILES:
        source = PROJECT_ROOT / name
        if source.is_dir():
            shutil.copytree(source, folder / name, ignore=shutil.ignore_patterns("__pycache__"))
        elif source.is_file():
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, folder / name)
    preset = PIPELINE_PRESET if PIPELINE_PRESET in (params.get("presets") or {}) else DEFAULT_PRESET
    # The --set recipe keys are for the presets benchmarked (`train.widths` is convnet's, which lenet
    # refuses); the data keys hold here too.
    overrides = {key: value for key, value in overrides.items() if not key.startswith("train.")}
    write_params(apply_overrides(params_for_preset(params, preset, overrides),
                                 {"data.source": str(images.resolve()), "train.epochs": 1}), folder)
    log_file = folder / "pipeline.log"
    git = ["git", "-c", "user.name=bench", "-c", "user.email=bench@localhost"]
    for command in (["init", "--quiet"], ["add", "--all"], ["commit", "--quiet", "-m", "bench scratch project"]):
        subprocess.run(git + command, cwd=folder, check=True, capture_output=True)
    log.info("pipeline: dvc repro of a scratch project in %s (%s preset, 1 epoch)", folder, preset)
    run_module("dvc", "repro", cwd=folder, log_file=log_file, tag="dvc repro")
    started = time.perf_counter()
    run_module("dvc", "repro", cwd=folder, log_file=log_file, tag="dvc repro, nothing changed")
    noop_seconds = time.perf_counter() - started
    download = json.loads((folder / "reports" / "download.json").read_text())
    return {"decode_seconds": download["download_seconds"],
            "decoded_images": download["train_images"] + download["test_images"],
            "noop_repro_seconds": round(noop_seconds, 2)}
