"""Device selection and DistributedDataParallel set-up (``torchrun`` sets the environment).

Every rank draws the same global batch from the same seeded generator and keeps its own
slice, so N processes with batch B/N each follow the same run as one process with batch B.
"""

import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from mvld.common.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass
class DistributedContext:
    """Where this process runs and which slice of each global batch it owns."""

    device: torch.device
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        """True on the process that writes checkpoints and shows progress."""
        return self.rank == 0

    def shard(self, batch: torch.Tensor) -> torch.Tensor:
        """This rank's contiguous slice of a global batch (dim 0)."""
        if batch.shape[0] % self.world_size:
            raise ConfigError(f"batch {batch.shape[0]} is not divisible by {self.world_size} ranks")
        size = batch.shape[0] // self.world_size
        return batch[self.rank * size : (self.rank + 1) * size]

    def wrap(self, model: nn.Module) -> nn.Module:
        """The model wrapped in DDP when distributed, else itself."""
        if self.world_size == 1:
            return model
        ids = [self.device.index] if self.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids)

    def mean(self, value: float) -> float:
        """Average a scalar over ranks (for logging)."""
        if self.world_size == 1:
            return value
        tensor = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor)
        return float(tensor.item()) / self.world_size

    def barrier(self) -> None:
        """Wait for every rank (no-op when alone)."""
        if self.world_size > 1:
            dist.barrier()


def resolve_device(name: str) -> torch.device:
    """``cpu``, ``cuda`` or ``cuda:N`` -> a device, with a clear error when CUDA is absent."""
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ConfigError(f"invalid device {name!r}: use cpu, cuda or cuda:N") from exc
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"invalid device {name!r}: use cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} requested but CUDA is not available here")
    return device


def setup_distributed(device_name: str) -> DistributedContext:
    """Initialise the process group under ``torchrun`` (gloo on CPU, NCCL on CUDA)."""
    device = resolve_device(device_name)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return DistributedContext(device=device)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    log.info("rank %d of %d on %s", rank, world_size, device)
    return DistributedContext(device=device, rank=rank, world_size=world_size)


def teardown_distributed() -> None:
    """Destroy the process group if one was created."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
