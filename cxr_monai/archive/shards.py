"""``cxr-monai predict`` under torchrun: which shard this process scores, where it writes, and the gloo
group that rank 0 uses to hand out the plan and to know when every rank is done.

torchrun (``python -m torch.distributed.run``) sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and the
rendezvous address (``MASTER_ADDR``/``MASTER_PORT``) of every process it starts; without them the command
runs as the only rank. The plan (the films not yet in the output, in archive order) is cut into batches
and rank ``r`` of ``W`` scores batches ``r, r + W, ...`` into its own part file beside the output; rank 0
merges the parts into the output, in archive order, once all ranks passed the final barrier.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import torch.distributed as dist

from cxr_monai.errors import CXRMonaiError

T = TypeVar("T")
#: How long a rank waits at a barrier for the others (the slowest rank's whole shard): generous, since
#: torchrun stops every rank as soon as one fails.
BARRIER_TIMEOUT = timedelta(hours=48)


@dataclass(frozen=True)
class Shard:
    """This process's place: ``rank`` of ``world_size`` (``local_rank`` on its node)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def take(self, items: Sequence[T], block: int = 1) -> list[T]:
        """This rank's share of ``items``, dealt in blocks of ``block``: blocks ``rank``, ``rank +
        world_size``, ... With ``block`` the batch size, every batch a rank forms is one a single process
        forms too (same films, same order), so the forward gives the same numbers bit for bit."""
        if block < 1:
            raise ValueError(f"block must be at least 1, got {block}")
        starts = range(self.rank * block, len(items), self.world_size * block)
        return [item for start in starts for item in items[start : start + block]]


def shard_from_env(environ: dict[str, str] | None = None) -> Shard:
    """The shard torchrun's environment gives (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``); rank 0 of 1
    without them.

    Raises:
        CXRMonaiError: the variables are not integers or the rank is out of range.
    """
    env = os.environ if environ is None else environ
    try:
        world = int(env.get("WORLD_SIZE", "1"))
        rank = int(env.get("RANK", "0"))
        local = int(env.get("LOCAL_RANK", "0"))
    except ValueError:
        raise CXRMonaiError(
            "RANK, WORLD_SIZE and LOCAL_RANK must be integers, as torchrun sets them"
        ) from None
    if world < 1 or not 0 <= rank < world:
        raise CXRMonaiError(f"RANK {rank} of WORLD_SIZE {world}: expected 0 <= RANK < WORLD_SIZE")
    return Shard(rank, world, local)


def part_path(out: Path, rank: int) -> Path:
    """Rank ``rank``'s part file beside ``out``: hidden and ``.csv``, so an archive walk never lists it."""
    return out.with_name(f".{out.name}.rank{rank:05d}.part.csv")


def part_files(out: Path) -> list[Path]:
    """Every part file beside ``out`` (of any earlier world size), in rank order."""
    return sorted(out.parent.glob(f".{out.name}.rank*.part.csv")) if out.parent.is_dir() else []


class Group:
    """The ranks' gloo process group (CPU; nothing when the run is not distributed)."""

    def __init__(self, shard: Shard) -> None:
        self.shard = shard

    def broadcast(self, obj: T) -> T:
        """Rank 0's ``obj``, on every rank (picklable)."""
        if not self.shard.distributed:
            return obj
        box: list[Any] = [obj if self.shard.rank == 0 else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        """Wait until every rank is here."""
        if self.shard.distributed:
            dist.barrier()


@contextmanager
def process_group(shard: Shard) -> Iterator[Group]:
    """Join the gloo group of torchrun's ranks (``env://``) for the block; a plain :class:`Group` when
    the run is not distributed or the group exists already."""
    joined = shard.distributed and not dist.is_initialized()
    if joined:
        dist.init_process_group(
            backend="gloo",
            init_method="env://",
            rank=shard.rank,
            world_size=shard.world_size,
            timeout=BARRIER_TIMEOUT,
        )
    try:
        yield Group(shard)
    finally:
        if joined:
            dist.destroy_process_group()
