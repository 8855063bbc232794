"""Differentially private training (DP-SGD, Abadi et al., 2016) for train, through Opacus.

A run is private when `train.target_epsilon` is set. Each step then draws its batch by Poisson sampling
(every training image joins with probability q = batch_size / images, as the guarantee assumes), clips
each image's gradient to `train.max_grad_norm`, adds Gaussian noise calibrated so that the steps planned
spend at most `target_epsilon` at `train.delta`, and the accountant (`train.accountant`: RDP or PRV)
counts every step as it ran. Opacus computes the per-image gradients (GradSampleModule), clips, noises
and counts (DPOptimizer, its accountants); this module only feeds them the batches train draws itself.

What else touches the training images must not leak them outside the accounting: the normalisation
uses ImageNet's published statistics, not ones measured on the data; convnet's whitening layer is not
fitted to the data but trained like any other layer; BatchNorm, which mixes the images of a batch, is
replaced by GroupNorm (architectures.private_network), and a network whose per-image gradients Opacus
cannot compute is refused before any training.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass

import torch
from opacus import GradSampleModule
from opacus.accountants import create_accountant
from opacus.accountants.utils import get_noise_multiplier
from opacus.optimizers import DPOptimizer
from torch import nn
from torchvision.ops import StochasticDepth

from stages.architectures import private_families
from stages.errors import StageError

# Opacus' per-layer hooks are full backward hooks; torch warns about them once per run whenever the input
# images need no gradient, which they never do here: the warning says nothing about the run.
warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients are computed with respect to "
                        "module outputs", category=UserWarning)

# ImageNet's channel statistics, as torchvision publishes them with its weights: public figures, so a
# private run normalises with them instead of measuring its own images outside the accounting.
PUBLIC_MEAN = [0.485, 0.456, 0.406]
PUBLIC_STD = [0.229, 0.224, 0.225]

# Opacus' convolution grad sampler gives wrong per-image gradients on channels_last activations, the layout
# train uses elsewhere for speed (measured, Opacus 1.6 and torch 2.14: zeros for every conv after convnet's
# first two): a private run keeps the default layout.
MEMORY_FORMAT = torch.contiguous_format
# How far Opacus' per-image gradient of the probe's images may be from autograd's, relatively: float32 rounding
# gives up to ~2e-3 (MNASNet's one-channel GroupNorms), channels_last's wrong gradients 1.
GRADIENT_TOLERANCE = 1e-2

# Per-image gradients take (images x trainable parameters) floats: a Poisson batch is fed through the
# model in chunks that keep them near this size, its clipped gradients summed before the noise.
PER_IMAGE_GRADIENT_BYTES = 512 * 2**20


def check_per_image_gradients(model: nn.Module, model_name: str, side: int) -> None:
    """Refuse, before any training, a network whose per-image gradients Opacus cannot compute, or computes
    wrong: on a copy of the model (which keeps no hooks), Opacus' gradients of two random images, laid out as
    train lays them, must be autograd's of each image alone."""
    probe = copy.deepcopy(model).train()
    for layer in probe.modules():
        # The same function in each pass. Stochastic depth's p is made tiny, not 0: at 0 it returns its input
        # itself, which EfficientNet's block then adds to in place, as no training step does.
        if isinstance(layer, nn.modules.dropout._DropoutNd):
            layer.p = 0.0
        if isinstance(layer, StochasticDepth):
            layer.p = 1e-12
    parameters = [(name, parameter) for name, parameter in probe.named_parameters() if parameter.requires_grad]
    device = parameters[0][1].device
    images = torch.rand(2, 3, side, side, generator=torch.Generator().manual_seed(0)).to(device)
    images = images.contiguous(memory_format=MEMORY_FORMAT)
    try:
        # Each image's own gradient from the same batched forward (its numerics, its max-pool ties): the images
        # of a batch meet nowhere in a private network, so this is exact.
        logits = logits_of(probe(images)).float()
        expected = [torch.autograd.grad(logits[index].sum(), [p for _, p in parameters], retain_graph=True,
                                        allow_unused=True) for index in range(len(images))]
        wrapped = GradSampleModule(probe, loss_reduction="sum")
        logits_of(wrapped(images)).float().sum().backward()
    except (RuntimeError, NotImplementedError, ValueError) as error:
        raise StageError(f"train.model {model_name} cannot train privately: Opacus cannot compute its per-image "
                         f"gradients ({first_line(error)}) ({supported_models_hint()})") from None
    missing = [name for name, parameter in parameters if getattr(parameter, "grad_sample", None) is None]
    if missing:
        raise StageError(f"train.model {model_name} cannot train privately: Opacus gives no per-image gradient for "
                         f"{', '.join(missing[:3])} ({supported_models_hint()})")
    for index, (name, parameter) in enumerate(parameters):
        reference = torch.stack([torch.zeros_like(parameter) if grads[index] is None else grads[index]
                                 for grads in expected]).float()
        error = (parameter.grad_sample.float() - reference).norm() / reference.norm().clamp_min(1e-12)
        if error > GRADIENT_TOLERANCE:
            raise StageError(f"train.model {model_name} cannot train privately: Opacus' per-image gradients of "
                             f"{name} are not autograd's (relative error {error:.2g}) ({supported_models_hint()})")


def logits_of(outputs) -> torch.Tensor:
    return outputs if isinstance(outputs, torch.Tensor) else outputs[0]


def supported_models_hint() -> str:
    return f"private runs train these families: {private_families()}"


def first_line(problem) -> str:
    text = str(problem).strip()
    return (text.splitlines()[0] if text else type(problem).__name__)[:300]


def poisson_batches(count: int, sample_rate: float, steps: int, generator: torch.Generator) -> list[torch.Tensor]:
    """`steps` index batches, each image in each with probability `sample_rate`: sizes vary, as they must."""
    return [torch.nonzero(torch.rand(count, generator=generator) < sample_rate).flatten() for _ in range(steps)]


def chunk_size(model: nn.Module) -> int:
    """Images per chunk of a Poisson batch: as many as keep their per-image gradients near PER_IMAGE_GRADIENT_BYTES."""
    trainable = sum(parameter.numel() for parameter in model.parameters() if parameter.requires_grad)
    return max(1, PER_IMAGE_GRADIENT_BYTES // (4 * trainable))


@dataclass
class Budget:
    """What a private run spends: the noise that reaches `target_epsilon` at `delta` over the steps planned."""

    target_epsilon: float
    delta: float
    max_grad_norm: float
    accountant: str  # rdp | prv
    sample_rate: float
    steps: int

    @property
    def noise_multiplier(self) -> float:
        return noise_multiplier_for(self.target_epsilon, self.delta, self.sample_rate, self.steps, self.accountant)


def noise_multiplier_for(target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str) -> float:
    return get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta, sample_rate=sample_rate,
                                steps=steps, accountant=accountant)


def epsilon_spent(noise_multiplier: float, sample_rate: float, steps: int, delta: float, accountant: str) -> float:
    """ε after `steps` Poisson-sampled steps at `noise_multiplier`, by `accountant`."""
    counter = create_accountant(accountant)
    counter.history = [(noise_multiplier, sample_rate, steps)]  # how each accountant records equal steps
    return float(counter.get_epsilon(delta))


class PrivateSteps:
    """The model wrapped for per-image gradients and its optimiser for clipping and noise, with the accountant
    counting each step as it ran. `step` takes one Poisson batch, whatever its size (none included)."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, budget: Budget, images: int,
                 noise_seed: int):
        self.budget = budget
        self.noise_multiplier = budget.noise_multiplier
        # Hooks on the model's own layers: called directly, the model computes per-image gradients too.
        # The loss given to `step` is summed over a chunk, so the per-image gradients are the images' own.
        self.wrapped = GradSampleModule(model, loss_reduction="sum")
        noise = torch.Generator(device=next(model.parameters()).device).manual_seed(noise_seed)
        # The noisy sum of clipped gradients is divided by the expected batch size, not the one drawn
        # (which would itself tell how many images took part).
        self.optimizer = DPOptimizer(optimizer, noise_multiplier=self.noise_multiplier,
                                     max_grad_norm=budget.max_grad_norm, loss_reduction="mean",
                                     expected_batch_size=max(1, round(budget.sample_rate * images)), generator=noise)
        self.accountant = create_accountant(budget.accountant)
        self.optimizer.attach_step_hook(self.accountant.get_optimizer_hook_fn(budget.sample_rate))
        self.chunk = chunk_size(model)

    def step(self, count: int, backward_chunk) -> None:
        """One DP-SGD step on a batch of `count` images: `backward_chunk(start, stop)` runs the model forward
        and the summed loss backward on images start:stop; the optimiser then clips every image's gradient,
        adds the noise and steps once."""
        starts = list(range(0, count, self.chunk))
        if not starts:  # nobody was drawn: the step still runs, on noise alone, and counts
            for parameter in self.optimizer.params:
                parameter.grad_sample = torch.zeros((0, *parameter.shape), device=parameter.device)
            starts = [count]
        for start in starts:
            if start < count:
                backward_chunk(start, min(count, start + self.chunk))
            self.optimizer.signal_skip_step(do_skip=start != starts[-1])
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)

    @property
    def epsilon(self) -> float:
        return float(self.accountant.get_epsilon(self.budget.delta))

    @property
    def steps_taken(self) -> int:
        return sum(steps for _, _, steps in self.accountant.history)

    def spent(self) -> dict:
        """What the run spent and how: the checkpoint keeps it, evaluate and the report show it."""
        return {"epsilon": round(self.epsilon, 4), "delta": self.budget.delta, "accountant": self.budget.accountant,
                "noise_multiplier": round(self.noise_multiplier, 6), "sample_rate": self.budget.sample_rate,
                "steps": self.steps_taken, "max_grad_norm": self.budget.max_grad_norm,
                "target_epsilon": self.budget.target_epsilon}

    def close(self) -> None:
        """The model back without Opacus' hooks and per-image gradients, as train saves it."""
        self.wrapped.to_standard_module()
