"""torchrun support: every training stage runs unchanged on one process or under torchrun with DDP.

torchrun sets WORLD_SIZE/RANK/LOCAL_RANK; `setup()` then starts the process group (NCCL on GPUs, gloo on CPUs).
Each rank trains on its own share of every epoch; rank 0 alone writes files.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn


def setup(device: torch.device) -> None:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def wrap(model: nn.Module) -> nn.Module:
    """DistributedDataParallel around `model` when running under torchrun, else `model` itself."""
    if not dist.is_initialized():
        return model
    device = next(model.parameters()).device
    return nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def local_device(requested: str) -> torch.device:
    """'auto' -> this rank's GPU if there is one, else the CPU."""
    if requested == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        return torch.device("cpu")
    return torch.device(requested)
