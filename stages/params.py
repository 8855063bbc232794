"""The schema of params.yaml: every stage validates the whole file here before doing any work.

A typo or an impossible value is refused with the key's dotted name (`train.lr`) and what is
allowed, so that the inside of the pipeline can trust what it is given.
"""

from __future__ import annotations

import copy
from pathlib import Path
from types import SimpleNamespace
from typing import Annotated, Literal, get_args

from pydantic import (BaseModel, ByteSize, ConfigDict, Field, ValidationError, computed_field, create_model, field_validator,
                      model_validator)
from pydantic.fields import FieldInfo
from ruamel.yaml import YAML
from ruamel.yaml.error import YAMLError

from stages import architectures
from stages.errors import StageError

PARAMS_FILE = "params.yaml"

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
ACCOUNTANTS = ("rdp", "prv")  # Opacus': Rényi DP (Mironov, 2017), privacy random variables (Gopi et al., 2021)

PositiveInt = Annotated[int, Field(ge=1)]
# Under train:, `none` switches off a key its preset sets (null there means "the preset's value").
OFF = "none"


class Section(BaseModel):
    # strict: `epochs: "10"` or `flip: 1` is a mistake to report, not to coerce.
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class DataParams(Section):
    source: str = Field(min_length=1)
    image_size: int = Field(ge=8, le=1024)
    test_fraction: float = Field(gt=0, lt=1)
    on_bad_image: Literal["error", "skip"]
    max_image_pixels: int = Field(ge=1)  # larger images are refused from their header, before decoding
    max_member_bytes: int = Field(ge=1)  # larger files and archive members are refused before being read whole


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


class KnownModel(Section):
    """`model`, wherever a recipe names one, is one the code knows."""

    @field_validator("model", check_fields=False)
    @classmethod
    def a_known_model(cls, name: str | None) -> str | None:
        if name is not None and name not in architectures.known_models():
            raise ValueError(architectures.unknown_model_message(name))
        return name


class Recipe(KnownModel):
    """A training recipe: what a preset under `presets:` names, and what `train:` may override."""

    model: str  # lenet, convnet, scatternet, or any classifier of torchvision's registry (stages/architectures.py)
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
    # Differential privacy (DP-SGD, stages/privacy.py): a run is private when target_epsilon is set.
    target_epsilon: float | None = Field(gt=0)  # the budget the run may spend at `delta`
    delta: float | None = Field(gt=0, lt=1)  # below 1 / training images (checked by train, which counts them)
    max_grad_norm: float | None = Field(gt=0)  # each image's gradient is clipped to this norm
    accountant: Literal[ACCOUNTANTS] | None  # what counts the budget spent


class Machine(Section):
    """Where and how a recipe runs: set in `train:`, never by a preset."""

    preset: str = Field(min_length=1)
    device: Literal[DEVICES]
    precision: Literal[PRECISIONS]
    threads: int = Field(ge=0)
    test_each_epoch: bool
    # Bytes ("4GiB", "512MB" or a number) the training and test images may take in memory, or auto;
    # sets that do not fit are streamed from their memory maps (stages/image_sets.py).
    memory_budget: Literal["auto"] | ByteSize
    loader_workers: Literal["auto"] | Annotated[int, Field(ge=0)]
    # Several processes (stages/distributed.py): torch's elastic launcher starts them, DDP keeps them in step.
    processes: int = Field(ge=1)  # on this machine
    nodes: int = Field(ge=1)  # machines, each running the stage with the same rendezvous
    rendezvous: str | None = Field(default=None, pattern=r"^[^\s:/]+:\d{1,5}$")  # host:port of the store the nodes meet at
    rendezvous_timeout: int = Field(ge=1)  # seconds the nodes wait for one another


def _optional(field: FieldInfo) -> tuple:
    """The same field, with its limits, but null by default: null takes the preset's value."""
    optional = copy.copy(field)
    optional.default = None
    return (field.annotation | None, optional)


# `train:` as written: the machine keys, plus every recipe key, null to take the preset's value.
# params.yaml lists them all, null, because `dvc exp run -S train.lr=0.05` can only set a key
# that is already there.
TrainSection = create_model(
    "TrainSection", __base__=(Machine, KnownModel),
    **{name: _optional(field) for name, field in Recipe.model_fields.items()}
)


NULLABLE = tuple(name for name, field in Recipe.model_fields.items() if type(None) in get_args(field.annotation))


class TrainParams(Recipe, Machine):
    """`train:` resolved: the preset's recipe with the explicit keys written over it (see `resolve_train`)."""

    @computed_field
    @property
    def unused(self) -> list[str]:
        """Keys the preset sets that the model, optimizer or loss chosen does not use: listed in the recipe
        train logs, rather than silently ignored (written under train:, such a key is refused instead)."""
        return [key for key, (_, used) in USED_BY.items() if is_set(getattr(self, key)) and not used(self)]


# Recipe keys that only some models, optimizers or losses use: what uses each, in words and as a test.
USED_BY = {
    "widths": ("train.model convnet", lambda recipe: recipe.model == "convnet"),
    "whiten_bias_epochs": ("train.model convnet", lambda recipe: recipe.model == "convnet"),
    # A private run replaces BatchNorm by GroupNorm (stages/privacy.py).
    "batchnorm_momentum": ("models with BatchNorm, not private", lambda recipe: keeps_batchnorm(recipe)),
    "frozen_batchnorm_scale": ("models with BatchNorm, not private", lambda recipe: keeps_batchnorm(recipe)),
    "muon_momentum": ("train.optimizer muon", lambda recipe: recipe.optimizer == "muon"),
    "muon_ns_steps": ("train.optimizer muon", lambda recipe: recipe.optimizer == "muon"),
    "momentum": ("train.optimizer sgd, rmsprop or muon", lambda recipe: recipe.optimizer != "adam"),
    "nesterov": ("train.optimizer sgd or muon", lambda recipe: recipe.optimizer in ("sgd", "muon")),
    "label_smoothing": ("train.loss cross_entropy", lambda recipe: recipe.loss == "cross_entropy"),
    # A random backbone has nothing worth holding: frozen in eval mode, its BatchNorm layers would not even
    # standardise (measured: inception_v3's loss at 8e15 after a frozen first epoch from scratch).
    "freeze_epochs": ("train.weights other than random", lambda recipe: recipe.weights != RANDOM),
    "delta": ("private runs (train.target_epsilon set)", lambda recipe: recipe.target_epsilon is not None),
    "max_grad_norm": ("private runs (train.target_epsilon set)", lambda recipe: recipe.target_epsilon is not None),
    "accountant": ("private runs (train.target_epsilon set)", lambda recipe: recipe.target_epsilon is not None),
}
# A preset tunes these for its model: they are not carried over to another one.
ARCHITECTURE_KEYS = ("widths", "whiten_bias_epochs", "batchnorm_momentum", "frozen_batchnorm_scale")


def keeps_batchnorm(recipe) -> bool:
    return architectures.uses_batchnorm(recipe.model) and recipe.target_epsilon is None


def is_set(value) -> bool:
    """Whether a recipe key does anything: null, false and 0 are off."""
    return value is not None and value is not False and value != 0


class EvaluateParams(Section):
    batch_size: int = Field(ge=1)
    tta: Literal[TTAS]
    tta_share: float = Field(gt=0, le=1)  # of the test images, the least confident, that tta is applied to
    audit_images: int = Field(ge=1)


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
    """Read and validate params.yaml; raise ParamsError naming every key at fault, with a fix where one is sure."""
    raw = read_yaml(Path(path))
    written, switched_off = validate_file(raw, path)
    resolved, problems = resolve_train(written, switched_off)
    if problems:
        raise ParamsError(not_valid(path, problems, suggested_fix(raw, written, switched_off)))
    return Params.model_validate({**written.model_dump(exclude={"presets", "train"}), "train": resolved})


def validate_file(raw: dict, path: str | Path) -> tuple[ParamsFile, set[str]]:
    """params.yaml checked against the schema; and the recipe keys switched off under train: with `none`."""
    train = raw.get("train")
    switched_off = {key for key in NULLABLE if isinstance(train, dict) and train.get(key) == OFF}
    if switched_off:
        raw = {**raw, "train": {**train, **dict.fromkeys(switched_off)}}
    try:
        return ParamsFile.model_validate(raw), switched_off
    except ValidationError as error:
        raise ParamsError(not_valid(path, [describe(problem) for problem in error.errors()])) from None


def not_valid(path: str | Path, problems: list[str], fix: str | None = None) -> str:
    return f"{path} is not valid:" + "".join(f"\n  - {problem}" for problem in problems) + (f"\n  {fix}" if fix else "")


# --- train: resolved against its preset ----------------------------------------------------


def resolve_train(written: ParamsFile, switched_off: set[str]) -> tuple[dict, list[str]]:
    """The chosen preset's recipe with every key written under `train:` taking precedence (null: the preset's
    value; `none`: off), and every reason it cannot run as written, all of them."""
    name = written.train.preset
    if name not in written.presets:
        return {}, [f"train.preset: must be one of the presets defined in params.yaml: {', '.join(written.presets)} "
                    f"(got {name!r})"]
    preset = written.presets[name]
    # null under train: is "the preset's value" for a recipe key; a machine key's null is its value (rendezvous)
    explicit = {key: value for key, value in written.train.model_dump().items()
                if value is not None or key in Machine.model_fields} | dict.fromkeys(switched_off)
    recipe = preset.model_dump()
    if explicit.get("optimizer", preset.optimizer) != preset.optimizer:
        # A preset's head and bias lrs are tuned for its optimizer (Muon's SGD part takes lrs in
        # the hundreds): with another optimizer they follow train.lr unless set as well.
        recipe |= {"head_lr": None, "bias_lr": None}
    resolved = {**recipe, **explicit}
    return resolved, recipe_problems(SimpleNamespace(**resolved), name, preset, set(explicit))


def recipe_problems(recipe: SimpleNamespace, name: str, preset: Recipe, explicit: set[str]) -> list[str]:
    """What in the resolved recipe does not fit together, each with the keys it names."""
    problems, covered = carried_to_another_model(recipe, name, preset, explicit)
    if "optimizer" in explicit and recipe.optimizer != preset.optimizer and "lr" not in explicit:
        problems.append(f"train.optimizer is {recipe.optimizer}, but train.lr {recipe.lr} is preset {name}'s for "
                        f"{preset.optimizer}: set train.lr for {recipe.optimizer} too (e.g. `-S train.lr=0.01`)")
    for key in sorted(explicit & set(USED_BY)):
        who, used = USED_BY[key]
        if is_set(getattr(recipe, key)) and not used(recipe):
            problems.append(f"train.{key} is set under train: ({as_yaml(getattr(recipe, key))}), but only {who} "
                            f"uses it (train.model is {recipe.model}, train.optimizer {recipe.optimizer}, train.loss "
                            f"{recipe.loss}): remove it (null)")
    if recipe.optimizer == "muon" and recipe.model != "convnet" and "optimizer" not in covered:
        # Its filter renormalisation and learning rates are airbench's, made for convnet.
        problems.append(f"train.optimizer muon trains the convnet model only, not {recipe.model} "
                        "(use sgd, adam or rmsprop)")
    if architectures.takes_one_side(recipe.model) and recipe.resize_from is not None and "resize_from" not in covered:
        # Its layers are sized for data.image_size; a smaller image would not fit them.
        problems.append(f"train.model {recipe.model} takes images of data.image_size only, so no progressive resizing: "
                        "switch it off (`-S train.resize_from=none -S train.resize_epochs=none`)")
    return problems + requirement_problems(recipe)


def carried_to_another_model(recipe: SimpleNamespace, name: str, preset: Recipe, explicit: set[str]
                             ) -> tuple[list[str], set[str]]:
    """A preset is a recipe for its model: written under train:, another model does not silently inherit the
    keys the preset tuned for its own. The problem, and the keys it covers."""
    if "model" not in explicit or recipe.model == preset.model:
        return [], set()
    inherited = [key for key in ARCHITECTURE_KEYS if key not in explicit and is_set(getattr(preset, key))]
    reasons = [f"its {', '.join(f'{key} {as_yaml(getattr(preset, key))}' for key in inherited)} are {preset.model}'s"] \
        if inherited else []
    if "optimizer" not in explicit and preset.optimizer == "muon" and recipe.model != "convnet":
        inherited.append("optimizer")
        reasons.append("its optimizer muon trains convnet only")
    if "resize_from" not in explicit and preset.resize_from is not None and architectures.takes_one_side(recipe.model):
        inherited.append("resize_from")
        reasons.append(f"its progressive resizing (resize_from {preset.resize_from}) does not fit {recipe.model}, whose "
                       "layers are sized for data.image_size")
    if not reasons:
        return [], set()
    return [f"train.model is {recipe.model}, but preset {name} is a recipe for {preset.model}: "
            f"{'; '.join(reasons)}"], set(inherited)


def requirement_problems(recipe: SimpleNamespace) -> list[str]:
    """Keys that the recipe's other keys need."""
    problems = []
    if recipe.model == "convnet" and recipe.widths is None:
        problems.append("train.widths must be three block widths for the convnet model "
                        "(e.g. `-S train.widths=[64,128,256]`)")
    if recipe.model == "convnet" and recipe.batchnorm_momentum is None and recipe.target_epsilon is None:
        problems.append("train.batchnorm_momentum must be set for the convnet model (PyTorch's default is 0.1)")
    if recipe.optimizer in ("sgd", "muon") and recipe.nesterov and recipe.momentum == 0:
        problems.append("train.nesterov is true but train.momentum is 0: Nesterov SGD needs momentum > 0")
    if (recipe.resize_from is None) != (recipe.resize_epochs is None):
        problems.append("train.resize_from and train.resize_epochs go together: set both (progressive resizing) "
                        "or neither (none)")
    if recipe.optimizer == "muon" and (recipe.muon_momentum is None or recipe.muon_ns_steps is None):
        problems.append("train.muon_momentum and train.muon_ns_steps must be set when train.optimizer is muon "
                        "(e.g. 0.6 and 3)")
    if recipe.target_epsilon is not None:
        problems += private_problems(recipe)
    problems += distributed_problems(recipe)
    if recipe.weights == IMAGENET and not architectures.is_torchvision(recipe.model):
        problems.append(f"train.weights is {IMAGENET!r}, but torchvision publishes ImageNet weights for its own "
                        f"models, not {recipe.model}; give a weights file's path, or {RANDOM!r}")
    return problems


def distributed_problems(recipe: SimpleNamespace) -> list[str]:
    """What several processes (train.processes, train.nodes) need, and what they do not combine with."""
    problems = []
    if recipe.nodes > 1 and recipe.rendezvous is None:
        problems.append(f"train.nodes is {recipe.nodes}, so train.rendezvous must say where they meet: host:port of "
                        "a machine every node reaches, the same on each (e.g. `-S train.rendezvous=10.0.0.1:29400`)")
    if recipe.processes * recipe.nodes > 1 and recipe.target_epsilon is not None:
        problems.append(f"train.processes {recipe.processes} x train.nodes {recipe.nodes} with a private run "
                        f"(train.target_epsilon {recipe.target_epsilon}): its accounting assumes one process drawing "
                        "every Poisson batch; set train.processes and train.nodes to 1")
    return problems


# The largest budget Opacus' PRV accountant finds the noise for in seconds (measured: ε 50 in 12.5 s, ε 100 not
# found after 10 minutes, at CIFAR-10's q and steps).
PRV_LARGEST_EPSILON = 50.0


def private_problems(recipe: SimpleNamespace) -> list[str]:
    """What a private run (train.target_epsilon set) needs, and what it cannot use."""
    problems = []
    missing = [key for key in ("delta", "max_grad_norm", "accountant") if getattr(recipe, key) is None]
    if missing:
        problems.append(f"train.target_epsilon is {recipe.target_epsilon} (a private run), which needs "
                        f"{', '.join(f'train.{key}' for key in missing)} too (e.g. delta 1e-5, max_grad_norm 1.0, "
                        f"accountant rdp or prv), or the preset private")
    why = architectures.family_of(recipe.model).private if recipe.model in architectures.known_models() else None
    if why:
        problems.append(f"train.model {recipe.model} cannot train privately: {why} (private runs train these "
                        f"families: {architectures.private_families()})")
    if recipe.accountant == "prv" and recipe.target_epsilon > PRV_LARGEST_EPSILON:
        problems.append(f"train.target_epsilon {recipe.target_epsilon} with train.accountant prv: Opacus' PRV accountant "
                        f"searches for hours for the little noise of a budget above {PRV_LARGEST_EPSILON:g} (ε 100 was not "
                        "found after 10 minutes); use train.accountant rdp for so large a budget (seconds at any ε)")
    if recipe.optimizer == "muon":
        # Opacus' DPOptimizer clips each image's gradient over the parameters of one optimiser; muon is two.
        problems.append("train.optimizer muon cannot train privately: DP-SGD clips each image's whole gradient "
                        "in one optimiser, and muon steps the filters and the rest with two; use sgd, adam or rmsprop")
    return problems


def suggested_fix(raw: dict, written: ParamsFile, switched_off: set[str]) -> str | None:
    """One line of `-S` settings that makes the recipe valid, checked here before it is offered: a preset made
    for the model asked for, or the preset kept with the keys that do not fit it switched back or off."""
    train = written.train
    if train.preset not in written.presets:
        return None
    preset = written.presets[train.preset]
    model = train.model or preset.model
    explicit = set(train.model_dump(exclude_none=True)) | switched_off
    # Presets made for the model first, then any other that fits it (finetune's keys fit every torchvision model).
    others = sorted((other for other in written.presets if other != train.preset),
                    key=lambda other: written.presets[other].model != model)
    candidates = [(fits_preset_for(other, written.presets[other], preset, explicit),
                   f"preset {other} is made for {model}" if written.presets[other].model == model else
                   f"preset {other}, made for {written.presets[other].model}, fits {model} too")
                  for other in others if train.optimizer is None or written.presets[other].optimizer == train.optimizer]
    # The preset kept comes first unless the model asked for is another than the one it was made for.
    kept = ({}, f"preset {train.preset} kept")
    candidates = candidates + [kept] if model != preset.model else [kept, *candidates]
    for settings, why in candidates:
        settings = settings | unfitting_keys_off(raw, settings, explicit)
        if settings and recipe_is_valid(raw, settings):
            options = " ".join(f"-S train.{key}={as_yaml(value)}" for key, value in settings.items())
            return (f"fix, checked against the rest of params.yaml: `{options}` ({why}); with `dvc exp run`, or "
                    "the same keys under train: in params.yaml")
    return None


def fits_preset_for(other: str, recipe: Recipe, current: Recipe, explicit: set[str]) -> dict:
    """Settings that switch to preset `other` but keep where training starts, if the current one starts
    from scratch and `other` from downloaded weights."""
    settings = {"preset": other}
    if "weights" not in explicit and current.weights == RANDOM and recipe.weights != RANDOM:
        settings |= {"weights": RANDOM, "freeze_epochs": 0}  # a random backbone is not worth freezing
    return settings


def unfitting_keys_off(raw: dict, settings: dict, explicit: set[str]) -> dict:
    """After `settings`, the keys written under train: that the recipe would not use, back to null (their
    preset's value); and, keeping a preset made for another model, its architecture's keys off."""
    trial = {**raw, "train": {**raw["train"], **settings}}
    try:
        written, switched_off = validate_file(trial, "")
    except ParamsError:
        return {}
    resolved, _ = resolve_train(written, switched_off)
    if not resolved:
        return {}
    recipe = SimpleNamespace(**resolved)
    preset = written.presets[written.train.preset]
    off = {}
    for key in explicit - set(settings):
        if key in USED_BY and is_set(getattr(recipe, key)) and not USED_BY[key][1](recipe):
            off[key] = None  # the preset's value: one it sets that the recipe does not use is only reported
    if "model" in explicit and recipe.model != preset.model and "preset" not in settings:
        for key in ARCHITECTURE_KEYS:
            if key not in explicit and is_set(getattr(preset, key)):
                off[key] = OFF if key in NULLABLE else False
    if architectures.takes_one_side(recipe.model) and recipe.resize_from is not None:
        off |= {"resize_from": OFF, "resize_epochs": OFF}
    return off


def recipe_is_valid(raw: dict, settings: dict) -> bool:
    trial = {**raw, "train": {**raw["train"], **settings}}
    try:
        written, switched_off = validate_file(trial, "")
    except ParamsError:
        return False
    resolved, problems = resolve_train(written, switched_off)
    return not problems


def as_yaml(value) -> str:
    """A value as `dvc exp run -S key=value` writes it: YAML in flow style."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return "[" + ",".join(as_yaml(item) for item in value) + "]"
    return str(value)


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
        # Our own cross-field checks name their keys; a field's own check says what the field must be.
        section = _section_at(problem["loc"][:-1])
        if section is not None and problem["loc"][-1] in section.model_fields:
            return f"{key}: {problem['ctx']['error']} (got {given!r})"
        return str(problem["ctx"]["error"])
    message = problem["msg"].replace("Input should be", "must be")
    if given == OFF and problem["loc"][0] == "train":
        message += f"; `{OFF}` switches off only the keys that may be null ({', '.join(NULLABLE)})"
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
