"""distributed.py — the ranks: the process group (one process or torchrun, gloo on CPU, NCCL on GPUs), the collectives
the trainer uses, each on the group's device, the per-step seeds, and how a rank speaks to the user.

`python train.py` is a world of one through the same code path as torchrun. Every collective goes through the helpers
here, which move the tensor to the process group's device (CUDA for NCCL, the CPU for gloo) and bring the result back
to the caller's. A function that holds a collective (every rank must call it, the same number of times) says so in its
first line.
"""

import datetime
import hashlib
import os
import sys

import torch
import torch.distributed as dist


class UserError(Exception):
    """A problem with the user's input: printed as one line by rank 0, exit code 2 on every rank, no traceback."""


def say(text: str) -> None:
    """One line from rank 0 (every rank before the process group exists), on its own line under a progress bar."""
    if not dist.is_initialized() or dist.get_rank() == 0:
        from tqdm import tqdm

        tqdm.write(text)
        sys.stdout.flush()


def setup_distributed() -> tuple[int, int, torch.device]:
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    timeout = datetime.timedelta(seconds=int(os.environ.get("TRAIN_COLLECTIVE_TIMEOUT_S", 1800)))
    # plain `python train.py`: a one-process group on an in-memory store (no port to find, none to collide on)
    alone = {} if "RANK" in os.environ else dict(store=dist.HashStore(), rank=0, world_size=1)
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timeout, **alone)
    return dist.get_rank(), dist.get_world_size(), device


def group_device() -> torch.device:
    """The device the default process group communicates on: the current CUDA device for NCCL, else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def all_reduce(x: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """Collective: the reduction of x over ranks (x itself is not modified), on x's device."""
    y = x.detach().to(group_device(), copy=True)
    dist.all_reduce(y, op=op)
    return y.to(x.device)


def all_gather_cat(x: torch.Tensor) -> torch.Tensor:
    """Collective: equal-shaped tensors from all ranks, concatenated along dim 0 in rank order, on x's device."""
    y = x.detach().to(group_device()).contiguous()
    parts = [torch.empty_like(y) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, y)
    return torch.cat(parts).to(x.device)


def global_sum(*values: float) -> list[float]:
    """Collective: Σ over ranks of a few Python numbers (float64 on the group's device)."""
    return all_reduce(torch.tensor(values, dtype=torch.float64, device=group_device())).tolist()


def all_gather_objects(obj) -> list:
    """Collective: every rank's picklable `obj`, in rank order."""
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)  # pickled, sent on the group's device (torch.cuda.current_device for NCCL)
    return out


def broadcast_from_rank0(t: torch.Tensor) -> torch.Tensor:
    """Collective: rank 0's t on every rank, on t's device."""
    y = t.detach().to(group_device(), copy=True)
    dist.broadcast(y, src=0)
    return y.to(t.device)


def stop_if_any_rank(error: UserError | None) -> None:
    """Collective: when any rank hit an error of its own, every rank raises it (exit 2, none left waiting in a
    collective), with the message of the lowest such rank, so that rank 0 prints it."""
    rank, world = dist.get_rank(), dist.get_world_size()
    first = int(all_reduce(torch.tensor([rank if error else world]), op=dist.ReduceOp.MIN).item())
    if first < world:
        raise UserError(all_gather_objects(str(error) if rank == first else None)[first])


def seed_for(*keys) -> int:
    """A seed derived from (seed, step, rank, ...): every step's randomness is a pure function of its indices,
    so a resumed run replays exactly what the uninterrupted run would have done, with no RNG state to save."""
    return int.from_bytes(hashlib.sha256(repr(keys).encode()).digest()[:7], "little")


def synchronize(device: torch.device) -> None:
    """Wait for queued CUDA kernels, so that a time.perf_counter() reading after it includes them."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
