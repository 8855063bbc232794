"""The schema of params.yaml: every stage validates the whole file here before doing any work.

A typo or an impossible value is refused with the key's dotted name (`train.lr`) and what is
allowed, so that the inside of the pipeline can trust what it is given.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from ruamel.yaml import YAML
from ruamel.yaml.error import YAMLError

from stages.errors import StageError

PARAMS_FILE = "params.yaml"

MODELS = ("lenet", "convnet")
OPTIMIZERS = ("sgd", "adam", "rmsprop")
LOSSES = ("cross_entropy", "mse")
SCHEDULES = ("linear", "cosine", "constant")
POLICIES = ("none", "trivialaugment", "randaugment", "autoaugment", "augmix")
DEVICES = ("auto", "cpu", "cuda", "mps")
PRECISIONS = ("auto", "fp32", "bf16")

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
    flip: bool
    crop_padding: int = Field(ge=0, le=64)
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


class TrainParams(Section):
    model: Literal[MODELS]
    widths: Annotated[list[PositiveInt], Field(min_length=3, max_length=3)]
    optimizer: Literal[OPTIMIZERS]
    lr: float = Field(gt=0)
    momentum: float = Field(ge=0, lt=1)
    nesterov: bool
    weight_decay: float = Field(ge=0)
    schedule: Literal[SCHEDULES]
    warmup_fraction: float = Field(ge=0, lt=1)
    epochs: int = Field(ge=1)
    batch_size: int = Field(ge=1)
    loss: Literal[LOSSES]
    label_smoothing: float = Field(ge=0, lt=1)
    device: Literal[DEVICES]
    precision: Literal[PRECISIONS]
    threads: int = Field(ge=0)
    test_each_epoch: bool

    @model_validator(mode="after")
    def check_combinations(self) -> TrainParams:
        if self.optimizer == "sgd" and self.nesterov and self.momentum == 0:
            raise ValueError("train.nesterov is true but train.momentum is 0: Nesterov SGD needs momentum > 0")
        if self.loss == "mse" and self.label_smoothing > 0:
            raise ValueError("train.label_smoothing applies to cross_entropy only; set it to 0 with loss: mse")
        return self


class EvaluateParams(Section):
    batch_size: int = Field(ge=1)
    tta: Literal["none", "flip"]


class Params(Section):
    seed: int = Field(ge=0, le=2**32 - 1)
    data: DataParams
    augment: AugmentParams
    train: TrainParams
    evaluate: EvaluateParams


class ParamsError(StageError):
    """params.yaml is missing, unreadable or refused by the schema."""


def load_params(path: str | Path = PARAMS_FILE) -> Params:
    """Read and validate params.yaml; raise ParamsError naming every key at fault."""
    raw = read_yaml(Path(path))
    try:
        return Params.model_validate(raw)
    except ValidationError as error:
        problems = "\n".join(f"  - {describe(problem)}" for problem in error.errors())
        raise ParamsError(f"{path} is not valid:\n{problems}") from None


def read_yaml(path: Path) -> dict:
    # ruamel reads YAML 1.2 as DVC does, so `lr: 1e-3` is the float DVC records, not a string.
    if not path.is_file():
        raise ParamsError(f"{path} not found: run the stage from the project's root, beside params.yaml")
    try:
        raw = YAML(typ="safe", pure=True).load(path.read_text())
    except YAMLError as error:
        raise ParamsError(f"{path} is not valid YAML: {error}") from None
    if not isinstance(raw, dict):
        raise ParamsError(f"{path} must be a mapping of sections (seed, data, augment, train, evaluate)")
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
    model: type[Section] = Params
    for part in loc:
        field = model.model_fields.get(str(part))
        if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, Section)):
            return None
        model = field.annotation
    return model
