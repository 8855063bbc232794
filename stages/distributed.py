"""Training in several processes, on one machine or several: torch's elastic launcher (what `torchrun` runs)
starts the ranks, DistributedDataParallel keeps their weights in step.

`train.processes` (per machine) and `train.nodes` choose it; `python -m stages.train` then becomes the
launcher of its own ranks (`launch`), each of which runs `python -m stages.train` again under the launcher's
environment (`RANK`, `WORLD_SIZE`, ...), exactly as `torchrun -m stages.train` would start them by hand.
One process, the default, starts nothing and runs as it always has.

What each rank does with a global batch is here too (`share`): every rank draws the same batch order,
takes its slice of each batch, and DDP averages the slices' gradients into the whole batch's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import ipaddress
import logging
import os
import socket
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from stages.errors import StageError
from stages.hardware import Compute, usable_cores

log = logging.getLogger("train")

# One name for the job on every node: c10d's rendezvous matches nodes by it (and by the endpoint).
RENDEZVOUS_ID = "stages.train"
LAUNCHER_POLL_SECONDS = 0.5  # how soon a rank notices that its launcher is gone
# Collectives that take longer than this fail instead of hanging: rank 0 scores the test set between epochs
# while the others wait at the next step's all-reduce.
COLLECTIVE_TIMEOUT = timedelta(minutes=30)


@dataclass(frozen=True)
class Ranks:
    """This process's place among the job's processes; one process alone is rank 0 of 1."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1

    @property
    def main(self) -> bool:
        """The rank that logs and writes: metrics, plots, the checkpoint."""
        return self.rank == 0

    @property
    def several(self) -> bool:
        return self.world > 1


def launched() -> bool:
    """Whether torch's elastic launcher (torchrun, or `launch` below) started this process as a rank."""
    return "TORCHELASTIC_RUN_ID" in os.environ and "LOCAL_RANK" in os.environ


def wanted(settings) -> bool:
    return settings.processes * settings.nodes > 1


# --- the launcher ------------------------------------------------------------------------


def launch(settings, arguments: list[str]) -> None:
    """Run `python -m stages.train <arguments>` as `train.processes` ranks on this machine, meeting the ranks of
    the other `train.nodes - 1` machines at `train.rendezvous`; return when all have finished. A rank that fails
    stops the others, and its error becomes this process's."""
    from torch.distributed import run as torchrun  # the launcher's own module: only the launching process needs it
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous.api import RendezvousError

    threads = threads_per_rank(settings.threads, settings.processes)
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))  # else the launcher sets 1 and says so
    # Port 0: the store takes a free port, so two jobs on one machine never meet.
    endpoint = "127.0.0.1:0" if settings.nodes == 1 else settings.rendezvous
    local = []
    if on_loopback(endpoint):  # every node on this machine: the ranks talk over the loopback, never the network
        local = [f"--local-addr={endpoint.rpartition(':')[0]}"]
        if loopback := loopback_interface():
            os.environ.setdefault("GLOO_SOCKET_IFNAME", loopback)
    timeout = settings.rendezvous_timeout
    command = [f"--nnodes={settings.nodes}", f"--nproc-per-node={settings.processes}", "--rdzv-backend=c10d",
               f"--rdzv-endpoint={endpoint}", f"--rdzv-id={RENDEZVOUS_ID}",
               f"--rdzv-conf=join_timeout={timeout},read_timeout={timeout}", *local,
               "--max-restarts=0", "--monitor-interval=0.2", "-m", "stages.train", *arguments]
    where = "on this machine" if settings.nodes == 1 else f"on each of {settings.nodes} machines, meeting at {endpoint}"
    log.info("launching %d ranks %s, %d threads each", settings.processes, where, threads)
    # Its INFO lines are the launcher's bookkeeping, and its ERROR block repeats what `failure` says in a line.
    logging.getLogger("torch.distributed").setLevel(logging.CRITICAL)
    try:
        # The launcher's own files (each rank's error file) in a folder that goes with it: left to itself it
        # leaves a torchelastic_* folder in the temporary directory every run.
        with tempfile.TemporaryDirectory(prefix="train-launcher-") as logs:
            torchrun.run(torchrun.parse_args([f"--log-dir={logs}", *command]))
    except ChildFailedError as error:
        raise StageError(failure(error, settings)) from None
    except RendezvousError as error:
        raise StageError(f"train.rendezvous {endpoint}: the {settings.nodes} nodes did not meet within "
                         f"train.rendezvous_timeout {timeout} s ({type(error).__name__}: {error}); start "
                         f"`dvc repro` (or torchrun) on every node with the same endpoint, one of them the "
                         f"machine at that address") from None
    except SignalException as stop:  # SIGTERM or SIGINT: the launcher has stopped every rank already
        log.info("stopped by %s: every rank was stopped", stop.sigval.name)
        sys.exit(128 + stop.sigval)


def failure(error, settings) -> str:
    """One rank's failure, as the message the stage reports: the first rank to fail is the cause."""
    rank, first = error.get_first_failure()
    world = settings.processes * settings.nodes
    if first.exitcode < 0:
        return f"rank {rank} of {world} was killed by {first.signal_name()}; the other ranks were stopped"
    message = first.message
    if isinstance(first.error_file_data, dict) and "message" in first.error_file_data:
        message = first.error_file_data["message"].get("message", message)
    message = message.removeprefix(f"{StageError.__name__}: ")
    return f"{message} (rank {rank} of {world} failed first; the other ranks were stopped)"


def threads_per_rank(threads: int, processes: int) -> int:
    """`train.threads` (0: every core this process may use) shared among this machine's ranks."""
    return max(1, (threads or usable_cores()) // processes)


def on_loopback(endpoint: str) -> bool:
    host = endpoint.rpartition(":")[0]
    with contextlib.suppress(ValueError):
        return ipaddress.ip_address(host).is_loopback
    return host == "localhost"


def loopback_interface() -> str | None:
    """The loopback's name (lo, lo0), for gloo: one machine's ranks talk over it, not over the network."""
    with contextlib.suppress(OSError, AttributeError):
        for _, name in socket.if_nameindex():
            if name.startswith("lo"):
                return name
    return None


# --- a rank ------------------------------------------------------------------------------


def join(compute: Compute) -> tuple[Ranks, Compute]:
    """This rank's place, its process group joined (gloo on CPU, NCCL on CUDA) and its device; one
    process alone joins nothing. A rank follows its launcher: torch starts ranks in sessions of their
    own, which a kill of the launcher's process group does not reach."""
    if not launched():
        return Ranks(), compute
    ranks = Ranks(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"]),
                  int(os.environ["LOCAL_WORLD_SIZE"]))
    follow_launcher()
    if not ranks.main:
        logging.getLogger().setLevel(logging.ERROR)  # one rank speaks for all
    if compute.device.type == "cuda":
        if ranks.local_world > torch.cuda.device_count():
            raise StageError(f"train.processes is {ranks.local_world}, but this machine has "
                             f"{torch.cuda.device_count()} CUDA GPUs: one process a GPU at most")
        compute = dataclasses.replace(compute, device=torch.device("cuda", ranks.local_rank))
        torch.cuda.set_device(compute.device)
    elif compute.device.type != "cpu":
        raise StageError(f"train.device {compute.device.type}: several processes train on cpu or cuda only "
                         "(torch.distributed has no backend for it); set train.processes to 1")
    dist.init_process_group("nccl" if compute.device.type == "cuda" else "gloo", timeout=COLLECTIVE_TIMEOUT)
    return ranks, compute


def follow_launcher() -> None:
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(LAUNCHER_POLL_SECONDS)
        os._exit(1)  # the launcher died (SIGKILL): nothing here may outlive it or write after it

    threading.Thread(target=watch, name="follow-launcher", daemon=True).start()


@contextlib.contextmanager
def failures_reported(ranks: Ranks):
    """A rank's StageError goes to the launcher, which reports the first rank's failure once, instead of
    every rank printing the same message."""
    if not ranks.several:
        yield
        return
    from torch.distributed.elastic.multiprocessing.errors import ErrorHandler
    try:
        yield
    except StageError as error:
        ErrorHandler().record_exception(error)
        sys.exit(1)
    except Exception as error:
        ErrorHandler().record_exception(error)
        if peer_lost(error):  # another rank failed first: its error is the one to show, not this echo of it
            sys.exit(1)
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def peer_lost(error: Exception) -> bool:
    """Whether a collective failed because another rank is gone (gloo: "Connection closed by peer")."""
    return isinstance(error, dist.DistNetworkError) or any(
        words in str(error) for words in ("closed by peer", "reset by peer", "Broken pipe"))


def share(indices: torch.Tensor, ranks: Ranks) -> torch.Tensor:
    """This rank's slice of a global batch: near-equal, disjoint, together the whole batch."""
    return torch.tensor_split(indices, ranks.world)[ranks.rank] if ranks.several else indices


def loss_weight(local: int, total: int, ranks: Ranks) -> float:
    """DDP averages the ranks' gradients; weighting each rank's mean loss by its share of the batch makes that
    average the whole batch's mean gradient even when the slices differ by an image."""
    return local * ranks.world / total if ranks.several else 1.0


def summed(value: torch.Tensor, ranks: Ranks) -> torch.Tensor:
    """A figure summed over the ranks (each rank's share of an epoch's loss, its correct answers)."""
    if ranks.several:
        value = value.clone()
        dist.all_reduce(value)
    return value


class Replicas:
    """The module each step trains, wrapped in DistributedDataParallel when there are several ranks, wrapped
    again whenever its trainable parameters change (train.freeze_epochs, the whitening bias frozen): DDP
    averages the gradients of the parameters that were trainable when it was made, and expects each of them."""

    def __init__(self, ranks: Ranks, compute: Compute):
        self.ranks = ranks
        self.device_ids = [compute.device.index] if compute.device.type == "cuda" else None
        self.key = None
        self.wrapped = None

    def __call__(self, module: torch.nn.Module) -> torch.nn.Module:
        if not self.ranks.several:
            return module
        key = (id(module), tuple(parameter.requires_grad for parameter in module.parameters()))
        if key != self.key:
            self.wrapped = DistributedDataParallel(module, device_ids=self.device_ids)
            self.key = key
        return self.wrapped


def check_in_step(model: torch.nn.Module, ranks: Ranks) -> None:
    """Every rank must end with the same weights (each applied the same averaged gradients): refuse to save
    a model that one rank's drift would make differ from the others'."""
    if not ranks.several:
        return
    digest = hashlib.sha256()
    for parameter in model.parameters():
        digest.update(parameter.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    digests = [None] * ranks.world
    dist.all_gather_object(digests, digest.hexdigest())
    if len(set(digests)) > 1:
        raise StageError(f"the {ranks.world} ranks ended with different weights (sha256 {', '.join(digests)}): "
                         "they drifted apart; nothing was saved")
    log.info("all %d ranks end with the same weights (sha256 %s)", ranks.world, digests[0][:16])


class Silent:
    """What the ranks other than 0 log their metrics to: nothing (`train.live_logger`)."""

    def log_params(self, *args, **kwargs) -> None:
        pass

    def log_metric(self, *args, **kwargs) -> None:
        pass

    def next_step(self) -> None:
        pass


SILENT = Silent()


def allreduce_seconds(model: torch.nn.Module, ranks: Ranks, repeats: int = 10) -> float:
    """How long one all-reduce of the model's gradients takes across the ranks (the median of `repeats`), as DDP
    runs it once a step: what several processes add to a step at most, since DDP overlaps it with the backward
    pass where it can. Measured after training, on the job's own process group and devices."""
    device = next(model.parameters()).device
    gradients = torch.zeros(sum(parameter.numel() for parameter in model.parameters()), device=device)
    seconds = []
    for _ in range(repeats):
        dist.barrier()
        started = time.perf_counter()
        dist.all_reduce(gradients)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds.append(time.perf_counter() - started)
    return statistics.median(seconds)


def rank_generator(seed: int, ranks: Ranks, shared: torch.Generator) -> torch.Generator:
    """What a rank's augmentation draws from: with one process the shared generator, as always; with several a
    stream of each rank's own, from `seed` and the rank, so that the shared batch order stays in step."""
    if not ranks.several:
        return shared
    return torch.Generator().manual_seed(seed * 1_000_003 + ranks.rank + 1)
