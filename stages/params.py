"""The schema of params.yaml: every stage validates the whole file here before doing any work.

A typo or an impossible value is refused with the key's dotted name (`train.lr`) and what is
allowed, so that the inside of the pipeline can trust what it is given.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, model_validator
from pydantic.fields import FieldInfo
from ruamel.yaml import YAML
from ruamel.yaml.error import YAMLError

from stages.errors import StageError

PARAMS_FILE = "params.yaml"

TORCHVISION_MODELS = ("resnet18", "mobilenet_v3_small")  # torchvision's architectures, ImageNet weights published
MODELS = ("lenet", "convnet", *TORCHVISION_MODELS)
RANDOM, IMAGENET = "random", "imagenet"  # train.weights: from scratch; torchvision's ImageNet weights for train.model
OPTIMIZERS = ("sgd", "adam", "rmsprop", "muon")
FLIPS = ("none", "random", "alternate")
LOSSES = ("cross_entropy", "mse")
SCHEDULES = ("linear", "cosine", "constant")
POLICIES = ("none", "trivialaugment", "randaugment", "autoaugment", "augmix")
DEVICES = ("auto", "cpu", "cuda", "mps")
PRECISIONS = ("auto", "fp32", "bf16")
TTAS = ("none", "flip", "flip_translate")
COMPRESSED_VARIANTS = ("int8", "pruned", "bf16", "fp16", "exported")
INT8_BACKENDS = ("auto", "x86", "fbgemm", "onednn", "qnnpack")

PositiveInt = Annotated[int, Field(ge=1)]


class Section(BaseModel):
    # strict: `epochs: "10"` or `flip: 1` is a mistake to report, not to coerce.
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class DataParams(Section):
    source: str = Field(min_length=1)
    image_size: int = Field(ge=8, le=1024)
    test_fraction: float = Field(gt=0, lt=1)
    on_bad_image: Literal["error", "skip"]


class AugmentParams(Section):
    copies: int = Field(ge=0, le=50)
    policy: Literal[POLICIES]
    preview_images: int = Field(ge=1, le=256)

    @model_validator(mode="after")
    def copies_need_a_policy(self) -> AugmentParams:
        if self.copies > 0 and self.policy == "none":
            raise ValueError(
                f"augment.copies is {self.copies} but augment.policy is 'none': the copies would "
                f"be identical to the originals; choose a policy ({', '.join(POLICIES[1:])}) "
                "or set copies to 0"
            )
        return self


class Recipe(Section):
    """A training recipe: what a preset under `presets:` names, and what `train:` may override."""

    model: Literal[MODELS]
    widths: Annotated[list[PositiveInt], Field(min_length=3, max_length=3)] | None  # convnet's blocks; null for lenet
    optimizer: Literal[OPTIMIZERS]
    lr: float = Field(gt=0)
    head_lr: float | None = Field(gt=0)  # null: lr
    bias_lr: float | None = Field(gt=0)  # null: lr
    momentum: float = Field(ge=0, lt=1)
    muon_momentum: float | None = Field(ge=0, lt=1)
    muon_ns_steps: int | None = Field(ge=1, le=20)  # Newton-Schulz iterations orthogonalising each update
    nesterov: bool
    weight_decay: float = Field(ge=0, lt=1)
    schedule: Literal[SCHEDULES]
    warmup_fraction: float = Field(ge=0, lt=1)
    epochs: int = Field(ge=1)
    batch_size: int = Field(ge=1)
    loss: Literal[LOSSES]
    label_smoothing: float = Field(ge=0, lt=1)
    flip: Literal[FLIPS]
    translate: int = Field(ge=0, le=64)
    batchnorm_momentum: float | None = Field(gt=0, le=1)  # convnet only
    frozen_batchnorm_scale: bool
    whiten_bias_epochs: int | None = Field(ge=0)  # convnet only; null: trained like every bias
    resize_from: int | None = Field(ge=8)  # progressive resizing: first epoch's image side (null: none)
    resize_epochs: int | None = Field(ge=1)  # epochs over which the side grows back to full size
    weights: str = Field(min_length=1)  # start from: "random", "imagenet" or a weights file's path
    freeze_epochs: int = Field(ge=0)  # epochs in which only the head trains
    ema_decay: float = Field(ge=0, lt=1)  # the weights kept: an average of every step's (0: the last step's)


class Machine(Section):
    """Where and how a recipe runs: set in `train:`, never by a preset."""

    preset: str = Field(min_length=1)
    device: Literal[DEVICES]
    precision: Literal[PRECISIONS]
    threads: int = Field(ge=0)
    test_each_epoch: bool


def _optional(field: FieldInfo) -> tuple:
    """The same field, with its limits, but null by default: null takes the preset's value."""
    optional = copy.copy(field)
    optional.default = None
    return (field.annotation | None, optional)


# `train:` as written: the machine keys, plus every recipe key, null to take the preset's value.
# params.yaml lists them all, null, because `dvc exp run -S train.lr=0.05` can only set a key
# that is already there.
TrainSection = create_model(
    "TrainSection", __base__=Machine, **{name: _optional(field) for name, field in Recipe.model_fields.items()}
)


class TrainParams(Recipe, Machine):
    """`train:` resolved: the preset's recipe with the explicit keys written over it."""

    @model_validator(mode="after")
    def check_combinations(self) -> TrainParams:
        if self.model == "convnet" and self.widths is None:
            raise ValueError("train.widths must be three block widths for the convnet model (e.g. [64, 128, 256])")
        if self.model == "convnet" and self.batchnorm_momentum is None:
            raise ValueError("train.batchnorm_momentum must be set for the convnet model (PyTorch's default is 0.1)")
        if self.optimizer in ("sgd", "muon") and self.nesterov and self.momentum == 0:
            raise ValueError("train.nesterov is true but train.momentum is 0: Nesterov SGD needs momentum > 0")
        if (self.resize_from is None) != (self.resize_epochs is None):
            raise ValueError("train.resize_from and train.resize_epochs go together: set both (progressive resizing) "
                             "or neither")
        if self.model == "lenet" and self.resize_from is not None:
            # Its fully connected layers are sized for data.image_size; a smaller image would not fit them.
            raise ValueError("train.model lenet takes images of data.image_size only, so no progressive resizing: "
                             "set train.resize_from and train.resize_epochs to null, or use another model")
        if self.optimizer == "muon":
            if self.model != "convnet":
                # Its filter renormalisation and learning rates are airbench's, made for convnet.
                raise ValueError(f"train.optimizer muon trains the convnet model only, not {self.model} "
                                 "(use sgd, adam or rmsprop)")
            if self.muon_momentum is None or self.muon_ns_steps is None:
                raise ValueError("train.muon_momentum and train.muon_ns_steps must be set when train.optimizer is muon "
                                 "(e.g. 0.6 and 3)")
        if self.weights == IMAGENET and self.model not in TORCHVISION_MODELS:
            raise ValueError(f"train.weights is {IMAGENET!r}, but torchvision publishes ImageNet weights for "
                             f"{', '.join(TORCHVISION_MODELS)}, not {self.model}; give a weights file's path, or {RANDOM!r}")
        if self.loss == "mse" and self.label_smoothing > 0:
            raise ValueError("train.label_smoothing applies to cross_entropy only; set it to 0 with loss: mse")
        return self


class EvaluateParams(Section):
    batch_size: int = Field(ge=1)
    tta: Literal[TTAS]


class CompressParams(Section):
    variants: list[Literal[COMPRESSED_VARIANTS]]
    int8_backend: Literal[INT8_BACKENDS]
    calibration_images: int = Field(ge=1)
    prune_amount: float = Field(gt=0, lt=1)
    batch_size: int = Field(ge=1)
    latency_repeats: int = Field(ge=1)
    threads: int = Field(ge=0)

    @model_validator(mode="after")
    def variants_are_distinct(self) -> CompressParams:
        repeated = sorted({name for name in self.variants if self.variants.count(name) > 1})
        if repeated:
            raise ValueError(f"compress.variants names {', '.join(repeated)} more than once; list each variant once")
        return self


class ReportParams(Section):
    explained_per_class: int = Field(ge=0, le=20)
    explained_mistakes: int = Field(ge=0, le=100)
    misclassified_grid: int = Field(ge=0, le=200)


class ParamsFile(Section):
    """params.yaml as written."""

    seed: int = Field(ge=0, le=2**32 - 1)
    data: DataParams
    augment: AugmentParams
    train: TrainSection
    evaluate: EvaluateParams
    compress: CompressParams
    report: ReportParams
    presets: dict[str, Recipe] = Field(min_length=1)


class Params(Section):
    """params.yaml as the stages use it: `train` resolved against its preset."""

    seed: int
    data: DataParams
    augment: AugmentParams
    train: TrainParams
    evaluate: EvaluateParams
    compress: CompressParams
    report: ReportParams


class ParamsError(StageError):
    """params.yaml is missing, unreadable or refused by the schema."""


def load_params(path: str | Path = PARAMS_FILE) -> Params:
    """Read and validate params.yaml; raise ParamsError naming every key at fault."""
    raw = read_yaml(Path(path))
    try:
        written = ParamsFile.model_validate(raw)
        return Params.model_validate({**written.model_dump(exclude={"presets", "train"}), "train": resolve_train(written)})
    except ValidationError as error:
        problems = "\n".join(f"  - {describe(problem)}" for problem in error.errors())
        raise ParamsError(f"{path} is not valid:\n{problems}") from None


def resolve_train(written: ParamsFile) -> dict:
    """The chosen preset's recipe, with every recipe key written under `train:` taking precedence."""
    name = written.train.preset
    if name not in written.presets:
        raise ParamsError(f"train.preset: must be one of the presets defined in params.yaml: "
                          f"{', '.join(written.presets)} (got {name!r})")
    overrides = written.train.model_dump(exclude_none=True)  # null: the preset's value
    recipe = written.presets[name].model_dump()
    if overrides.get("optimizer", recipe["optimizer"]) != recipe["optimizer"]:
        # A preset's head and bias lrs are tuned for its optimizer (Muon's SGD part takes lrs in
        # the hundreds): with another optimizer they follow train.lr unless set as well.
        recipe |= {"head_lr": None, "bias_lr": None}
    return {**recipe, **overrides}


def read_yaml(path: Path) -> dict:
    # ruamel reads YAML 1.2 as DVC does, so `lr: 1e-3` is the float DVC records, not a string.
    if not path.is_file():
        raise ParamsError(f"{path} not found: run the stage from the project's root, beside params.yaml")
    try:
        raw = YAML(typ="safe", pure=True).load(path.read_text())
    except YAMLError as error:
        raise ParamsError(f"{path} is not valid YAML: {error}") from None
    if not isinstance(raw, dict):
        raise ParamsError(f"{path} must be a mapping of sections (seed, data, augment, train, evaluate, compress, report, presets)")
    return raw


def describe(problem: dict) -> str:
    """One line for one pydantic error: the dotted key, what was given, what is allowed."""
    key = ".".join(str(part) for part in problem["loc"])
    given = problem.get("input")
    if problem["type"] == "extra_forbidden":
        section = _section_at(problem["loc"][:-1])
        allowed = ", ".join(section.model_fields) if section else "?"
        where = ".".join(str(part) for part in problem["loc"][:-1]) or "the top level"
        return f"{key}: unknown key; {where} accepts: {allowed}"
    if problem["type"] == "missing":
        return f"{key}: missing; every key is set in params.yaml, none has a hidden default"
    if problem["type"] == "value_error":
        # Our own cross-field checks already name their keys.
        return str(problem["ctx"]["error"])
    message = problem["msg"].replace("Input should be", "must be")
    return f"{key}: {message} (got {given!r})"


def _section_at(loc: tuple) -> type[Section] | None:
    if tuple(loc[:1]) == ("presets",) and len(loc) == 2:
        return Recipe
    model: type[Section] = ParamsFile
    for part in loc:
        field = model.model_fields.get(str(part))
        if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, Section)):
            return None
        model = field.annotation
    return model
