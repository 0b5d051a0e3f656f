"""One run on many processes (torchrun, or Slurm's srun): torch.distributed set up from the launcher's environment,
rank 0's exclusive duties, and the collectives that make N processes train exactly as one.

A run of N processes draws every global batch (order, crops, flips, CRD's negatives) from the same generators on
every rank and each rank takes its contiguous share of it (data/device.py's `shard_bounds`): the ranks' losses,
weighted by their shares and summed (`reduce_gradients`), are the one-process loss, so with `--sync_bn` (batch
statistics over the global batch) N processes train what one process trains, to float rounding. Every rank keeps
identical weights, buffers and generator states (checked each epoch: `check_identical`), so rank 0 alone writes
last.pt and every rank can resume from it. Evaluation shards the test set and sums across ranks.

NCCL on GPUs (each process takes the GPU of its LOCAL_RANK), gloo on the CPU. A collective that waits longer than
`--dist_timeout` for a peer, or whose peer died, ends the job with one line naming the ranks that did not answer.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from utils import UserError

DEFAULT_TIMEOUT_S = 60  # a collective waits this long for a peer before the job stops
ANSWER_WAIT_S = 3.0  # after a failed collective, how long the survivors wait for each other to report


@dataclass(frozen=True)
class World:
    """This process's place in the job, as the launcher set it: rank, number of processes, rank on its node."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0


def environment() -> World:
    """The job as torchrun (RANK, WORLD_SIZE, LOCAL_RANK) or srun (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID inside
    a job step) describes it; one process when neither launched several."""
    env = os.environ
    try:
        if "RANK" in env and "WORLD_SIZE" in env:
            return World(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)))
        if "SLURM_STEP_ID" in env and int(env.get("SLURM_NTASKS", 1)) > 1:  # a task of srun, not the batch script
            return World(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0)))
    except ValueError as err:
        raise UserError(f"the launcher's rank variables are not numbers ({err})") from None
    return World()


def rank() -> int:
    """This process's rank in the running job (0 when alone)."""
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    """Processes in the running job (1 when alone)."""
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    """Whether this process writes: rank 0, or the only process."""
    return rank() == 0


def device_for(gpu_id: str | None, world: World) -> torch.device | None:
    """The device of a process of a many-process job: the GPU of its LOCAL_RANK, or the CPU with `--gpu_id cpu` or
    where no GPU is visible; None when alone (the caller resolves --gpu_id as usual)."""
    if world.size == 1:
        return None
    if gpu_id is not None and gpu_id.strip().lower() == "cpu":
        return torch.device("cpu")
    if gpu_id not in (None, ""):
        raise UserError(f"--gpu_id {gpu_id} names one GPU, but each of the {world.size} processes of this job takes "
                        "the GPU of its LOCAL_RANK: leave --gpu_id out (or give --gpu_id cpu)")
    if not torch.cuda.is_available():
        return torch.device("cpu")
    if world.local_rank >= torch.cuda.device_count():
        raise UserError(f"process {world.rank} has LOCAL_RANK {world.local_rank}, but only "
                        f"{torch.cuda.device_count()} GPU(s) are visible: start at most that many processes per node")
    return torch.device(f"cuda:{world.local_rank}")


def init(world: World, device: torch.device, timeout_s: float) -> None:
    """Join the job (NCCL on GPUs, gloo on the CPU) when it has several processes; on every rank but 0, stdout goes
    to /dev/null, so that the job prints its progress once."""
    if world.size == 1 or dist.is_initialized():
        return
    missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if name not in os.environ]
    if missing:
        raise UserError(f"{world.size} processes need {' and '.join(missing)} to meet (torchrun sets them; under srun "
                        "export MASTER_ADDR=<first node> MASTER_PORT=<free port>)")
    backend = "nccl" if device.type == "cuda" else "gloo"
    try:
        dist.init_process_group(backend, rank=world.rank, world_size=world.size,
                                timeout=datetime.timedelta(seconds=timeout_s),
                                device_id=device if device.type == "cuda" else None)
    except (RuntimeError, ValueError) as err:
        raise UserError(f"process {world.rank} of {world.size} could not join the job at "
                        f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']} ({one_line(err)})") from None
    if world.rank != 0:
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (for the life of the process)


def teardown() -> None:
    """Leave the job (a no-op when alone)."""
    if dist.is_initialized():
        with contextlib.suppress(RuntimeError):
            dist.destroy_process_group()


def one_line(err: BaseException) -> str:
    """The first line of an error's message."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


# ----------------------------------------------------------------------------------------------- rank 0's duties


class EchoedError(UserError):
    """Rank 0's error, raised on the other ranks too: rank 0 prints it, they exit with it quietly."""


@contextlib.contextmanager
def on_rank_zero(context: contextlib.AbstractContextManager) -> Iterator[None]:
    """Enter `context` (a run folder's lock) on rank 0 alone, for the whole job; the other ranks wait for its
    answer, and all stop with rank 0's one line when it cannot (the folder is in use)."""
    if world_size() == 1:
        with context:
            yield
        return
    if not is_main():
        answer: list[Any] = [None]
        dist.broadcast_object_list(answer, src=0)
        if answer[0] is not None:
            raise EchoedError(answer[0])
        yield
        return
    try:
        context.__enter__()
    except UserError as err:
        dist.broadcast_object_list([str(err)], src=0)
        raise
    dist.broadcast_object_list([None], src=0)
    with contextlib.ExitStack() as stack:
        stack.push(context)
        yield


def same_on_every_rank(err: UserError) -> UserError:
    """Mark an error every rank raises alike (a bad flag): only rank 0 prints it."""
    err.same_on_every_rank = True
    return err


def quiet(err: BaseException) -> bool:
    """Whether this rank exits on `err` without printing it, since rank 0 prints the same line."""
    return rank_in_environment() != 0 and (isinstance(err, EchoedError) or getattr(err, "same_on_every_rank", False))


def who() -> str:
    """"rank R: " in a job of several processes, else nothing: a prefix for this process's messages."""
    return f"rank {rank_in_environment()}: " if environment().size > 1 else ""


def rank_in_environment() -> int:
    """This process's rank as the launcher set it, before (or without) joining the job."""
    try:
        return environment().rank
    except UserError:
        return 0


# ------------------------------------------------------------------------------------------------- collectives


def barrier() -> None:
    """Wait until every process of the job gets here (a no-op when alone)."""
    if world_size() > 1:
        dist.barrier()


def all_reduce_sum(tensor: Tensor) -> Tensor:
    """`tensor` summed over the ranks, in place (unchanged when alone)."""
    if world_size() > 1:
        dist.all_reduce(tensor)
    return tensor


def reduce_gradients(parameters: Iterable[nn.Parameter]) -> None:
    """Sum every gradient over the ranks in one collective. Each rank back-propagated its share of the global loss
    (its loss x its rows / the global batch), so the sums are the one-process gradients."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if world_size() == 1 or not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    for grad, reduced in zip(grads, flat.split([g.numel() for g in grads]), strict=True):
        grad.copy_(reduced.view_as(grad))


def gather_rows(tensor: Tensor, counts: list[int]) -> Tensor:
    """The ranks' row blocks (rank r holds `counts[r]` rows) concatenated in rank order, on every rank: the global
    batch again (no gradient flows through it)."""
    if world_size() == 1:
        return tensor
    widest = max(counts)
    padded = tensor.new_zeros((widest, *tensor.shape[1:]))
    padded[: len(tensor)] = tensor
    blocks = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(blocks, padded)
    return torch.cat([block[:count] for block, count in zip(blocks, counts, strict=True)])


def broadcast_batchnorm_statistics(module: nn.Module) -> None:
    """Every rank takes rank 0's batch-norm running statistics, as DistributedDataParallel's buffer broadcast does:
    without --sync_bn each rank's statistics follow its own share of the batches."""
    if world_size() == 1:
        return
    for layer in module.modules():
        if isinstance(layer, nn.modules.batchnorm._BatchNorm):
            for buffer in layer.buffers():
                dist.broadcast(buffer, src=0)


def _collective_device() -> torch.device:
    """Where the job's collectives take their tensors: the current GPU under NCCL, else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def check_identical(what: str, module: nn.Module, generators: Iterable[torch.Generator]) -> None:
    """Stop with an error naming the first differing tensor where this rank's weights, buffers or random streams are
    not rank 0's (the bug that would make rank 0's checkpoint wrong for the others). Compares a sum per tensor."""
    if world_size() == 1:
        return
    named = [*module.state_dict().items(), *((f"generator {i}", g.get_state()) for i, g in enumerate(generators))]
    sums = torch.stack([t.detach().double().sum().cpu() for _, t in named]).to(_collective_device())
    first = sums.clone()
    dist.broadcast(first, src=0)
    differs = (sums != first).nonzero().flatten().tolist()
    count = torch.tensor([float(len(differs))], device=sums.device)
    dist.all_reduce(count)
    if count.item():
        where = f"{named[differs[0]][0]} differs" if differs else "another rank differs"
        raise RuntimeError(f"{what}: rank {rank()} no longer holds rank 0's state ({where})")


# ---------------------------------------------------------------------------------- batch norm over the global batch


class _GlobalSum(torch.autograd.Function):
    """A sum over the ranks whose gradient is the sum of the ranks' gradients (each rank's loss reads the global
    statistics)."""

    @staticmethod
    def forward(ctx: Any, tensor: Tensor) -> Tensor:
        tensor = tensor.clone()
        dist.all_reduce(tensor)
        return tensor

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Batch norm whose training statistics are those of the global batch, on any device (torch's SyncBatchNorm
    is GPU-only; on GPUs `sync_batchnorm` uses it). Mean first, then the centred second moment: the same two passes
    as one process's batch norm, up to float rounding."""

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, x: Tensor) -> Tensor:
        if not (self.training and world_size() > 1):
            return super().forward(x)
        dims = [d for d in range(x.dim()) if d != 1]
        shape = [1, -1] + [1] * (x.dim() - 2)
        xf = x.float()  # statistics in fp32, under autocast too
        local = torch.cat([xf.sum(dims), torch.tensor([x.numel() / x.shape[1]], device=x.device)])
        sums = _GlobalSum.apply(local)
        count = sums[-1].detach()
        mean = sums[:-1] / count
        var = _GlobalSum.apply(((xf - mean.view(shape)) ** 2).sum(dims)) / count
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                momentum = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                self.running_mean.lerp_(mean.detach(), momentum)
                self.running_var.lerp_(var.detach() * count / (count - 1), momentum)
        out = (xf - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        return out.to(x.dtype)


def sync_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """`module` with every batch norm computing the global batch's statistics (children replaced in place; the
    parameters and buffers stay the same objects): torch's SyncBatchNorm on GPUs, `GlobalBatchNorm` elsewhere."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    for name, child in module.named_children():
        if isinstance(child, nn.modules.batchnorm._BatchNorm) and not isinstance(child, GlobalBatchNorm):
            replacement = GlobalBatchNorm(child.num_features, child.eps, child.momentum, child.affine,
                                          child.track_running_stats)
            replacement.weight, replacement.bias = child.weight, child.bias
            replacement.running_mean, replacement.running_var = child.running_mean, child.running_var
            replacement.num_batches_tracked = child.num_batches_tracked
            replacement.train(child.training)
            setattr(module, name, replacement)
        else:
            sync_batchnorm(child, device)
    return module


# --------------------------------------------------------------------------------------------- a lost process


def lost_peer(err: BaseException) -> bool:
    """Whether `err` is a collective that failed because a peer died or did not answer in time."""
    if not dist.is_initialized() or not isinstance(err, RuntimeError):
        return False
    text = str(err)
    return isinstance(err, dist.DistError) or any(
        mark in text for mark in ("gloo", "Connection reset", "Connection closed", "NCCL", "Timed out", "timed out"))


def lost_ranks_line(err: BaseException) -> str:
    """One line naming the ranks that did not answer after a failed collective: each survivor reports itself in
    the job's store and waits a few seconds for the others."""
    me, size = rank(), world_size()
    try:
        store = dist.distributed_c10d._get_default_store()
        store.set(f"dih/alive/{me}", "1")
        deadline = time.monotonic() + ANSWER_WAIT_S
        while True:
            silent = [r for r in range(size) if r != me and not store.check([f"dih/alive/{r}"])]
            if not silent or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        lost = ", ".join(map(str, silent)) or "none (a collective timed out)"
    except (RuntimeError, dist.DistError):
        lost = "0 (its rendezvous store is gone)"
    return (f"rank {me}: error: lost rank(s) {lost} of the job's {size} processes ({one_line(err)[:160]}); every "
            "process stops; the last finished epoch is kept: rerun with --resume")
