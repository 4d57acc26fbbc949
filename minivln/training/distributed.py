"""Multi-process training helpers: process group from ``torchrun``'s environment, seeding, batch sharding.

``torchrun --nproc_per_node N -m minivln ...`` starts N processes and sets ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` in each.  :func:`init_distributed` reads them and
joins the process group (NCCL on CUDA, Gloo on CPU); without them (a plain ``python`` run) it is a
no-op and every helper here behaves as in a single process, so the same code runs both ways.

Data parallelism in MiniVLN splits every *global* batch into ``WORLD_SIZE`` equal, contiguous shards,
one per rank (:func:`shard` and :class:`GlobalBatchSampler`).  Each rank's loss is the mean over its
shard; DDP averages the gradients, which is then exactly the gradient of the mean over the global
batch, so N processes take the same steps as one process fed the whole batch.
"""

from __future__ import annotations

import os
import random
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist

from minivln.config import ConfigError

T = TypeVar("T")


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: its rank among ``world_size`` processes and its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        """Rank 0 writes logs and checkpoints."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        """More than one process: gradients must be synchronised."""
        return self.world_size > 1


def resolve_device(device: str = "auto", local_rank: int = 0) -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; a bare ``"cuda"`` -> this process's local GPU."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"train.device={device!r} was asked for but CUDA is not available (use auto or cpu)")
        if dev.index is None:
            dev = torch.device("cuda", local_rank)
    return dev


def init_distributed(device: str = "auto", timeout_s: float = 1800.0) -> DistInfo:
    """Join the process group described by ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` (if any).

    Idempotent: a second call returns the same information without re-initialising.  With
    ``WORLD_SIZE`` unset or 1 nothing is initialised and the returned :class:`DistInfo` is rank 0 of 1.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if dist.is_available() and dist.is_initialized():
        rank, world_size = dist.get_rank(), dist.get_world_size()
    dev = resolve_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(
            backend=backend,
            init_method="env://",
            rank=rank,
            world_size=world_size,
            timeout=timedelta(seconds=timeout_s),
        )
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=dev)


def cleanup() -> None:
    """Leave the process group (call once at the end of a distributed run).

    Every rank waits for the others first, so that none tears its group down while another is
    still in a collective; a process that exits with its group alive may abort in Gloo's threads.
    """
    if dist.is_available() and dist.is_initialized():
        if dist.get_world_size() > 1:
            dist.barrier()
        dist.destroy_process_group()


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main() -> bool:
    """True on rank 0 (and in a single process)."""
    return get_rank() == 0


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if is_distributed():
        dist.barrier()


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """The mean of ``tensor`` over ranks (a new tensor; the input itself in a single process)."""
    if not is_distributed():
        return tensor
    out = tensor.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out / dist.get_world_size()


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order; ``[obj]`` in a single process."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: T, src: int = 0) -> T:
    """Rank ``src``'s ``obj`` on every rank."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def seed_everything(seed: int, rank: int = 0) -> int:
    """Seed Python, NumPy and torch (all devices) with ``seed + rank``; returns the seed used.

    Rank 0 uses ``seed`` itself, so a single-process run draws the same numbers as rank 0 of a
    distributed one.  Different ranks get different streams (dropout noise must not be shared).
    """
    s = int(seed) + int(rank)
    random.seed(s)
    np.random.seed(s % 2**32)
    torch.manual_seed(s)  # also seeds every CUDA device
    return s


def placement(global_batch_size: int, rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """``(rank, world_size)``, each defaulting to this process's, after checking that a global batch of
    ``global_batch_size`` splits evenly over the ranks (ValueError otherwise)."""
    rank = get_rank() if rank is None else rank
    world_size = get_world_size() if world_size is None else world_size
    if global_batch_size % world_size:
        raise ValueError(f"a global batch of {global_batch_size} does not split evenly over {world_size} ranks")
    return rank, world_size


def shard(items: Sequence[T], rank: int | None = None, world_size: int | None = None) -> Sequence[T]:
    """This rank's contiguous, equal share of a global batch (its length must divide evenly)."""
    rank, world_size = placement(len(items), rank, world_size)
    n = len(items) // world_size
    return items[rank * n:(rank + 1) * n]


class GlobalBatchSampler:
    """Endless, resumable, seeded batches of dataset indices, sharded over ranks.

    Every epoch is a permutation of ``range(num_items)`` drawn from ``seed + epoch`` (identical on
    every rank), cut into global batches of ``global_batch_size``; the incomplete tail of an epoch is
    dropped so that every step sees a full, evenly split batch.  :meth:`next` returns this rank's
    shard of the next global batch.  The position is two integers (:meth:`state_dict`), so a resumed
    run continues exactly where the checkpoint was taken.
    """

    def __init__(
        self,
        num_items: int,
        global_batch_size: int,
        seed: int = 0,
        *,
        shuffle: bool = True,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        self.rank, self.world_size = placement(global_batch_size, rank, world_size)
        if num_items < global_batch_size:
            raise ValueError(f"{num_items} items cannot fill one global batch of {global_batch_size}")
        self.num_items = num_items
        self.global_batch_size = global_batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.cursor = 0  # index of the next global batch within the epoch
        self._order: torch.Tensor | None = None

    @property
    def batches_per_epoch(self) -> int:
        return self.num_items // self.global_batch_size

    def _epoch_order(self) -> torch.Tensor:
        if self._order is None:
            if self.shuffle:
                g = torch.Generator().manual_seed(self.seed + self.epoch)
                self._order = torch.randperm(self.num_items, generator=g)
            else:
                self._order = torch.arange(self.num_items)
        return self._order

    def next_global(self) -> list[int]:
        """The next whole global batch (all ranks' indices)."""
        if self.cursor >= self.batches_per_epoch:
            self.epoch, self.cursor, self._order = self.epoch + 1, 0, None
        start = self.cursor * self.global_batch_size
        batch = self._epoch_order()[start:start + self.global_batch_size].tolist()
        self.cursor += 1
        return batch

    def next(self) -> list[int]:
        """This rank's shard of the next global batch."""
        return list(shard(self.next_global(), self.rank, self.world_size))

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.cursor, self._order = int(state["epoch"]), int(state["cursor"]), None
