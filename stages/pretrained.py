"""Where `train.weights` come from, and how they are put into a new model before training.

Besides `random` (from scratch), three sources: torchvision's ImageNet weights for `train.model` (`imagenet`: from torchvision's cache,
downloaded there when missing), a weights file a user has (a state dict as torchvision publishes
them), or a model this pipeline trained (a `models/model.pt`, to go on training it on other data).
Every tensor is loaded; only the head may stay new, when the file's has another number of classes.
"""

from __future__ import annotations

import logging
import urllib.error
from pathlib import Path
from urllib.parse import urlparse

import torch
import torchvision
from torch import nn

from stages.architectures import fit_imagenet_weights, is_torchvision
from stages.errors import StageError
from stages.models import Classifier, why_torch_refused
from stages.outputs import file_digest
from stages.params import IMAGENET, RANDOM

log = logging.getLogger("train")

# The statistics torchvision's ImageNet weights were trained on; their transforms normalise with them.
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


def load_initial_weights(model: Classifier, architecture: str, source: str) -> dict:
    """Put the weights `source` names into `model`; return where they came from, for the checkpoint."""
    path = imagenet_weights_file(architecture) if source == IMAGENET else Path(source)
    content = read_weights_file(path)
    if isinstance(content.get("state_dict"), dict) and "architecture" in content:
        # A checkpoint of this pipeline: the normalisation it was trained with comes along.
        if content["architecture"] != architecture:
            raise StageError(f"train.weights: {path} holds a {content['architecture']} model, but train.model is "
                             f"{architecture}; set train.model to {content['architecture']} or give weights of a "
                             f"{architecture}")
        target, state, head = model, content["state_dict"], {f"network.{name}" for name in model.head}
    else:
        # torchvision's weights: the network alone, trained on ImageNet-normalised images.
        target, state, head = model.network, content.get("state_dict", content), model.head
        if is_torchvision(architecture):
            state = fit_imagenet_weights(architecture, model.network, state)
        with torch.no_grad():
            model.normalize.mean.copy_(torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
            model.normalize.std.copy_(torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))
    new_head = load_matching(target, state, head, path, architecture)
    log.info("starting from %s: %d tensors loaded%s", path, len(state) - len(new_head),
             f", a new head ({', '.join(new_head)})" if new_head else "")
    return {"source": source, "file": str(path), "sha256": file_digest(path), "new": new_head}


def imagenet_weights_file(architecture: str) -> Path:
    """torchvision's ImageNet weights file for `architecture` in its cache, downloaded when missing."""
    url = torchvision.models.get_model_weights(architecture).DEFAULT.url
    name = Path(urlparse(url).path).name
    cached = Path(torch.hub.get_dir()) / "checkpoints" / name
    if not cached.is_file():
        log.info("downloading %s to %s", url, cached)
        hash_prefix = torch.hub.HASH_REGEX.search(name)
        try:
            cached.parent.mkdir(parents=True, exist_ok=True)
            # Written to a temporary file and moved into place: an interrupted download leaves nothing.
            torch.hub.download_url_to_file(url, str(cached), hash_prefix.group(1) if hash_prefix else None)
        except (urllib.error.URLError, OSError, RuntimeError) as error:
            raise StageError(
                f"train.weights: torchvision's ImageNet weights for {architecture} are not in its cache and could not "
                f"be downloaded ({getattr(error, 'reason', error)}). Download {url} on a machine that can, and place "
                f"it at {cached} (torchvision's cache; TORCH_HOME moves it), or anywhere and set train.weights "
                "to its path") from None
    return cached


def read_weights_file(path: Path) -> dict:
    if not path.is_file():
        raise StageError(f"train.weights: {path} not found; give the path of a weights file (a state dict as "
                         f"torchvision publishes, or a model.pt this pipeline trained), {IMAGENET!r}, or {RANDOM!r}")
    try:
        # weights_only: a weights file from the internet is data, never code to run.
        content = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises pickle, zip and runtime errors alike for a file it cannot read
        raise StageError(f"train.weights: {path} is not a PyTorch weights file ({why_torch_refused(error)}); expected "
                         "a state dict saved with torch.save, as torchvision publishes, or a model.pt this pipeline "
                         "trained") from None
    if not isinstance(content, dict) or not content:
        raise StageError(f"train.weights: {path} holds a {type(content).__name__}, not a state dict "
                         "(a mapping of tensor names to tensors)")
    return content


def load_matching(target: nn.Module, state: dict, head: set[str], path: Path, architecture: str) -> list[str]:
    """Load `state` into `target`, all of it: only the head's tensors (`head`, as the architecture defines it)
    may differ in shape (other classes), and those stay as initialised. Returns the names of the tensors left new."""
    expected = target.state_dict()
    # BatchNorm fills in a missing batch count itself (torchvision's older files predate it).
    missing = [name for name in expected if name not in state and not name.endswith("num_batches_tracked")]
    unexpected = [name for name in state if name not in expected]
    misshapen = [name for name in expected if name in state and state[name].shape != expected[name].shape]
    wrong = missing + unexpected + [name for name in misshapen if name not in head]
    if wrong:
        problems = "; ".join(f"{what}: {', '.join(names[:3])}{' ...' if len(names) > 3 else ''}"
                             for what, names in (("missing", missing), ("not in the model", unexpected),
                                                 ("of other shapes", [n for n in misshapen if n not in head])) if names)
        raise StageError(f"train.weights: {path} does not fit train.model {architecture} ({problems}); give weights "
                         f"of a {architecture}")
    new = [name for name in misshapen if name in head]
    target.load_state_dict({name: tensor for name, tensor in state.items() if name not in new}, strict=False)
    return new
