"""torchrun support: every training stage runs unchanged on one process or under torchrun with DDP.

torchrun sets WORLD_SIZE/RANK/LOCAL_RANK. `local_device` gives each rank its own GPU (LOCAL_RANK), and `setup`
makes it the current CUDA device *before* starting the process group (NCCL on GPUs, gloo on CPUs), so that NCCL's
communicators and every default-device allocation land on that rank's GPU, not all on GPU 0. Each rank trains on its
own share of every epoch; rank 0 alone writes files and prints.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn


def requested_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def backend_for(device: torch.device) -> str:
    """The process-group backend for ranks computing on `device`: NCCL for GPUs, gloo for CPUs."""
    return "nccl" if device.type == "cuda" else "gloo"


def setup(device: torch.device) -> None:
    if requested_world_size() > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend_for(device))


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


def mask_buffer_names(model: nn.Module) -> list[str]:
    """Fully qualified names of the pruning masks (`mask` buffers of MaskedConv2d/MaskedLinear, `weight_mask` of
    torch.nn.utils.prune)."""
    return [name for name, _ in model.named_buffers() if name.rsplit(".", 1)[-1] in ("mask", "weight_mask")]


def pattern_buffer_names(model: nn.Module) -> list[str]:
    """Fully qualified names of the sparse patterns' index buffers (`row_ptr`, `col_idx` of SparseConv2d)."""
    return [name for name, _ in model.named_buffers() if name.rsplit(".", 1)[-1] in ("row_ptr", "col_idx")]


def wrap(model: nn.Module) -> nn.Module:
    """DistributedDataParallel around `model` when running under torchrun, else `model` itself.

    The pruning masks and the sparse patterns' index buffers are left out of DDP's buffer broadcast. They are equal on
    every rank by construction (set from the same synchronised weights, or loaded from the same checkpoint), and the
    broadcast before every forward would copy them in place, moving their version counters, so every masked layer
    would rebuild its sparse pattern at every step (on a GPU, a host synchronisation per layer per step) and every
    SparseConv2d its transposed view; an eval-mode SparseConv2d's int16 col_idx is a dtype gloo cannot broadcast.
    BatchNorm statistics are still broadcast."""
    if not dist.is_initialized():
        return model
    ignored = mask_buffer_names(model) + pattern_buffer_names(model)
    nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, ignored)
    device = next(model.parameters()).device
    return nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def local_device(requested: str, local_rank: int | None = None, cuda_devices: int | None = None) -> torch.device:
    """'auto' -> this rank's GPU if there is one, else the CPU; 'cuda' -> this rank's GPU. Under torchrun the rank's
    GPU is LOCAL_RANK (one device per rank); more ranks on a node than GPUs is an error, not a silent sharing."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0")) if local_rank is None else local_rank
    cuda_devices = torch.cuda.device_count() if cuda_devices is None else cuda_devices
    if requested == "auto":
        requested = "cuda" if cuda_devices > 0 else "cpu"
    if requested == "cuda":
        if cuda_devices == 0:
            raise RuntimeError("run.device is 'cuda' but no CUDA device is visible")
        if local_rank >= cuda_devices:
            raise RuntimeError(f"LOCAL_RANK {local_rank} has no GPU of its own: {cuda_devices} visible; start at most "
                               f"{cuda_devices} processes per node (torchrun --nproc_per_node)")
        return torch.device("cuda", local_rank)
    return torch.device(requested)
