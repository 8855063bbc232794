"""params.yaml is validated whole before any work; a mistake is named by its dotted key with
what is allowed."""

from __future__ import annotations

import pytest
from ruamel.yaml import YAML

from datamaker import PROJECT_ROOT, make_image_folder, project_params, write_params
from stages.params import Machine, ParamsError, load_params

# (dotted key, bad value, what the message must say besides the key)
REFUSED = [
    pytest.param("train.lrr", 0.1, ["unknown key", "train accepts:", "lr,"], id="unknown-key"),
    pytest.param("train.epochs", "10", ["valid integer", "'10'"], id="epochs-as-string"),
    pytest.param("train.lr", 0, ["greater than 0"], id="lr-zero"),
    pytest.param("train.lr", -0.1, ["greater than 0", "-0.1"], id="lr-negative"),
    pytest.param("train.epochs", 0, ["greater than or equal to 1"], id="epochs-zero"),
    pytest.param("train.model", "vgg16_bm", ["must be lenet, convnet, scatternet or a classifier of torchvision's registry",
                                             "did you mean vgg16_bn", "(got 'vgg16_bm')"], id="model"),
    pytest.param("train.optimizer", "adamw", ["'sgd', 'adam', 'rmsprop' or 'muon'", "'adamw'"], id="optimizer"),
    pytest.param("train.loss", "hinge", ["'cross_entropy' or 'mse'", "'hinge'"], id="loss"),
    pytest.param("augment.policy", "cutmix", ["'trivialaugment'", "'augmix'", "'cutmix'"], id="augment-policy"),
    pytest.param("compress.int8_backend", "avx512", ["'auto', 'x86', 'fbgemm', 'onednn' or 'qnnpack'", "'avx512'"],
                 id="int8-backend"),
    pytest.param("compress.prune_amount", 1.0, ["less than 1"], id="prune-everything"),
    pytest.param("evaluate.tta_share", 0, ["greater than 0"], id="tta-share-zero"),
    pytest.param("evaluate.tta_share", 1.5, ["less than or equal to 1"], id="tta-share-above-one"),
]


@pytest.mark.parametrize("key, value, expected", REFUSED)
def test_a_bad_value_is_refused_by_the_stage_before_any_work_with_the_key_named(project, key, value, expected):
    make_image_folder(project.root / "images", per_class=3, test_per_class=1, size=(8, 8))
    project.write_params({"data.source": "images", key: value})

    result = project.download()

    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "params.yaml is not valid" in result.stderr
    message = next(line for line in result.stderr.splitlines() if f"- {key}:" in line)
    for part in expected:
        assert part in message
    assert not (project.root / "data").exists()
    assert not (project.root / "reports").exists()


def test_the_project_params_yaml_is_valid_and_its_train_section_resolves_to_its_preset():
    params = load_params(PROJECT_ROOT / "params.yaml")
    written = project_params()

    for section in ("seed", "data", "augment", "evaluate"):
        assert params.model_dump()[section] == written[section]
    preset = written["presets"][written["train"]["preset"]]
    # null means "the preset's value" for a recipe key; a machine key's null is its value (train.rendezvous)
    explicit = {key: value for key, value in written["train"].items() if value is not None or key in Machine.model_fields}
    assert params.train.model_dump() == {**preset, **explicit, "unused": []}


def test_every_problem_is_listed_at_once(tmp_path):
    path = write_params(tmp_path, {"train.lr": 0, "train.model": "resnet", "data.image_size": 4})

    with pytest.raises(ParamsError) as refused:
        load_params(path)

    message = str(refused.value)
    assert "train.lr: must be greater than 0" in message
    assert "train.model: must be lenet, convnet, scatternet or a classifier of torchvision's registry" in message
    assert "data.image_size: must be greater than or equal to 8" in message


def test_a_missing_key_is_refused_since_none_has_a_default(tmp_path):
    path = write_params(tmp_path, remove=("presets.default.momentum",))

    with pytest.raises(ParamsError, match=r"presets\.default\.momentum: missing; every key is set in params.yaml"):
        load_params(path)


def test_a_preset_gives_every_recipe_key_and_explicit_train_keys_override_it(tmp_path):
    path = write_params(tmp_path, {"train.preset": "lenet", "train.epochs": 5})

    settings = load_params(path).train

    assert (settings.preset, settings.model, settings.batch_size, settings.lr) == ("lenet", "lenet", 4, 0.001)
    assert settings.epochs == 5


def test_an_unknown_preset_is_refused_with_the_defined_ones_named(tmp_path):
    path = write_params(tmp_path, {"train.preset": "fastest"})

    with pytest.raises(ParamsError, match=r"train\.preset: must be one of the presets defined in params.yaml: "
                                          r"accurate, airbench94, default, fast, finetune, lenet, private \(got 'fastest'\)"):
        load_params(path)


def test_a_typo_inside_a_preset_is_refused_with_its_dotted_key(tmp_path):
    path = write_params(tmp_path, {"presets.default.lrr": 0.1})

    with pytest.raises(ParamsError, match=r"presets\.default\.lrr: unknown key; presets\.default accepts: model, widths"):
        load_params(path)


def test_an_override_is_checked_against_the_same_limits_as_a_preset(tmp_path):
    path = write_params(tmp_path, {"train.preset": "lenet", "train.momentum": 1.5})

    with pytest.raises(ParamsError, match=r"train\.momentum: must be less than 1 \(got 1\.5\)"):
        load_params(path)


def test_an_unknown_top_level_section_lists_the_sections(tmp_path):
    path = write_params(tmp_path, {"trian": {"lr": 0.1}})

    with pytest.raises(ParamsError, match=r"trian: unknown key; the top level accepts: seed, data, augment, train"):
        load_params(path)


def test_a_value_of_the_wrong_kind_is_not_coerced(tmp_path):
    path = write_params(tmp_path, {"train.frozen_batchnorm_scale": 1})

    with pytest.raises(ParamsError, match=r"train\.frozen_batchnorm_scale: must be a valid boolean \(got 1\)"):
        load_params(path)


def test_whole_numbers_are_accepted_for_real_valued_keys(tmp_path):
    path = write_params(tmp_path, {"train.lr": 1, "train.weight_decay": 0, "train.label_smoothing": 0})

    params = load_params(path)

    assert (params.train.lr, params.train.weight_decay) == (1.0, 0.0)


def test_exponent_notation_is_a_number_as_dvc_reads_it(tmp_path):
    path = write_params(tmp_path, {"train.lr": 0.2})
    path.write_text(path.read_text().replace("lr: 0.2", "lr: 1e-3"))

    assert load_params(path).train.lr == 0.001


def test_copies_without_a_policy_are_refused_naming_both_keys(tmp_path):
    path = write_params(tmp_path, {"augment.copies": 2, "augment.policy": "none"})

    with pytest.raises(ParamsError, match=r"augment\.copies is 2 but augment\.policy is 'none'"):
        load_params(path)


def test_a_stage_run_outside_the_project_says_where_params_yaml_belongs(project):
    result = project.download()

    assert result.returncode == 1
    assert "params.yaml not found: run the stage from the project's root" in result.stderr
    assert "Traceback" not in result.stderr


def test_invalid_yaml_is_refused_with_the_file_named(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("train:\n  lr: [0.1\n")

    with pytest.raises(ParamsError, match=r"params.yaml is not valid YAML"):
        load_params(path)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"train.preset": "lenet", "train.optimizer": "muon", "train.muon_momentum": 0.6, "train.muon_ns_steps": 3},
         "train.optimizer muon trains the convnet model only, not lenet"),
        ({"presets.default.muon_momentum": None}, "train.muon_momentum and train.muon_ns_steps must be set"),
        ({"presets.default.resize_epochs": None}, "train.resize_from and train.resize_epochs go together"),
        ({"train.preset": "lenet", "train.resize_from": 16, "train.resize_epochs": 1},
         "train.model lenet takes images of data.image_size only, so no progressive resizing"),
        ({"train.batchnorm_momentum": None, "presets.default.batchnorm_momentum": None},
         "train.batchnorm_momentum must be set for the convnet model"),
        ({"train.weights": "imagenet"},
         "train.weights is 'imagenet', but torchvision publishes ImageNet weights for its own models, not convnet"),
        ({"train.preset": "private", "train.optimizer": "muon", "train.lr": 0.2, "train.muon_momentum": 0.6,
          "train.muon_ns_steps": 3},
         "train.optimizer muon cannot train privately: DP-SGD clips each image's whole gradient in one optimiser"),
        ({"train.target_epsilon": 8.0}, r"train.target_epsilon is 8.0 \(a private run\), which needs train.delta, "
                                        "train.max_grad_norm, train.accountant too"),
        ({"train.preset": "private", "train.accountant": "moments"}, "'rdp' or 'prv'"),
        ({"train.preset": "private", "train.target_epsilon": 100}, "train.target_epsilon 100.0 with train.accountant "
                                                                    "prv: Opacus' PRV accountant searches for hours"),
    ],
    ids=["muon-on-lenet", "muon-without-its-momentum", "resize-half-set", "resize-of-lenet", "convnet-without-batchnorm-momentum",
         "imagenet-weights-for-convnet", "private-muon", "private-without-delta", "private-unknown-accountant",
         "private-huge-epsilon-by-prv"],
)
def test_recipe_keys_that_need_each_other_are_refused_naming_both(tmp_path, overrides, message):
    path = write_params(tmp_path, overrides)

    with pytest.raises(ParamsError, match=message):
        load_params(path)


def test_another_optimizer_than_the_presets_drops_its_head_and_bias_lrs_unless_set(tmp_path):
    other = load_params(write_params(tmp_path, {"train.optimizer": "adam", "train.lr": 0.003})).train
    both = load_params(write_params(tmp_path, {"train.optimizer": "adam", "train.lr": 0.003, "train.head_lr": 0.01})).train
    preset = load_params(write_params(tmp_path, {})).train

    assert (other.head_lr, other.bias_lr) == (None, None)  # train.lr for every group
    assert (both.head_lr, both.bias_lr) == (0.01, None)
    assert preset.optimizer == "muon" and preset.head_lr > 100


# --- switching a recipe's key from the command line (`dvc exp run -S`) -------------------------


def refusal(path) -> str:
    with pytest.raises(ParamsError) as refused:
        load_params(path)
    return str(refused.value)


def fix_of(message: str) -> dict:
    """The `-S key=value` settings of a refusal's fix line, as params.yaml keys."""
    (line,) = [line for line in message.splitlines() if line.strip().startswith("fix, checked")]
    options = line.split("`")[1].split()
    settings = [option for option in options if option != "-S"]
    return {key: YAML(typ="safe", pure=True).load(value) for key, _, value in (s.partition("=") for s in settings)}


@pytest.mark.parametrize(("overrides", "reasons", "fix"), [
    ({"train.model": "lenet"},
     ["train.model is lenet, but preset default is a recipe for convnet: its widths [64,192,192], whiten_bias_epochs 3, "
      "batchnorm_momentum 0.4, frozen_batchnorm_scale true are convnet's; its optimizer muon trains convnet only; "
      "its progressive resizing (resize_from 16) does not fit lenet"],
     {"train.preset": "lenet"}),
    ({"train.model": "resnet18", "train.optimizer": "sgd"},
     ["train.model is resnet18, but preset default is a recipe for convnet: its widths [64,192,192], "
      "whiten_bias_epochs 3, batchnorm_momentum 0.4, frozen_batchnorm_scale true are convnet's",
      "train.optimizer is sgd, but train.lr 0.17 is preset default's for muon: set train.lr for sgd too"],
     {"train.preset": "finetune", "train.weights": "random", "train.freeze_epochs": 0}),
    ({"train.model": "mobilenet_v3_small", "train.widths": [8, 16, 16]},
     ["train.widths is set under train: ([8,16,16]), but only train.model convnet uses it"],
     {"train.preset": "finetune", "train.weights": "random", "train.freeze_epochs": 0, "train.widths": None}),
    ({"train.loss": "mse", "train.label_smoothing": 0.1},
     ["train.label_smoothing is set under train: (0.1), but only train.loss cross_entropy uses it"],
     {"train.label_smoothing": None}),
], ids=["lenet", "resnet18-sgd", "mobilenet-with-widths", "mse-with-smoothing"])
def test_a_key_switched_alone_is_refused_with_every_reason_and_a_fix_that_works(tmp_path, overrides, reasons, fix):
    message = refusal(write_params(tmp_path, overrides))

    for reason in reasons:
        assert reason in message
    assert fix_of(message) == fix
    load_params(write_params(tmp_path, {**overrides, **fix}))  # the fix, typed as given, validates


def test_none_switches_off_a_key_its_preset_sets(tmp_path):
    settings = load_params(write_params(tmp_path, {"train.resize_from": "none", "train.resize_epochs": "none"})).train

    assert (settings.preset, settings.resize_from, settings.resize_epochs) == ("default", None, None)


def test_none_for_a_key_that_cannot_be_off_says_which_can(tmp_path):
    message = refusal(write_params(tmp_path, {"train.lr": "none"}))

    assert "train.lr: must be a valid number; `none` switches off only the keys that may be null (widths," in message


def test_preset_keys_the_recipe_does_not_use_are_listed_in_it(tmp_path):
    settings = load_params(write_params(tmp_path, {"train.optimizer": "adam", "train.lr": 0.003})).train

    assert settings.unused == ["muon_momentum", "muon_ns_steps", "momentum", "nesterov"]
    assert settings.model_dump()["unused"] == settings.unused  # so the recipe train logs names them
