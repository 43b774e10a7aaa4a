"""torch.distributed for the search: who this process is, and the few collectives the engine needs.

Launching under `torchrun` sets WORLD_SIZE/RANK/MASTER_ADDR...; `init_from_env` then joins the process group
(gloo on CPU, NCCL when the device is CUDA). Library users who initialise the process group themselves get
the same behaviour: every helper here reads torch.distributed's own state, never a global of ours.
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn


def resolve_device(device: str = "auto") -> torch.device:
    """`auto`: CUDA when available (this rank's LOCAL_RANK-th GPU), else CPU."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            from mqtool.errors import InputError

            raise InputError(
                "device: cuda was asked for, but no CUDA device is available to this process", field="device"
            )
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    if device != "cpu":
        from mqtool.errors import InputError

        raise InputError(f"device: '{device}' is not one of auto, cpu, cuda", field="device")
    return torch.device("cpu")


def init_from_env(device: torch.device, timeout_s: float = 1800.0) -> bool:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1); True if distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size() > 1
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
    return True


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    """Only rank 0 writes checkpoints and outputs and reports progress."""
    return rank() == 0


def broadcast(obj: Any) -> Any:
    """Rank 0's `obj` on every rank (checkpoints read by rank 0 only, so nodes need no shared disk)."""
    if world() == 1:
        return obj
    box = [obj if is_main() else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_slices(items: list, fn) -> list:
    """`fn` applied to `items`, each rank doing items[rank::world]; every rank gets the full result, in order."""
    n, r = world(), rank()
    if n == 1:
        return fn(items)
    mine = fn(items[r::n])
    parts: list = [None] * n
    dist.all_gather_object(parts, mine)
    out: list = [None] * len(items)
    for k, part in enumerate(parts):
        out[k::n] = part
    return out


def same_on_every_rank(value: Any, what: str) -> None:
    """Raise if ranks disagree (they must run the identical GA; a mismatch would silently split them)."""
    if world() == 1:
        return
    parts: list = [None] * world()
    dist.all_gather_object(parts, value)
    if any(p != parts[0] for p in parts):
        raise RuntimeError(
            f"distributed search: ranks disagree on {what}; re-run with the same data everywhere"
        )


def local_share(idx: np.ndarray) -> tuple[np.ndarray, float]:
    """This rank's share of a global mini-batch and the factor that makes the ranks' averaged gradients
    equal the gradient of the loss averaged over the whole batch (unequal shares included)."""
    n = world()
    if n == 1:
        return idx, 1.0
    mine = idx[rank() :: n]
    return mine, len(mine) * n / max(1, len(idx))


def data_parallel(module: nn.Module, find_unused: bool) -> nn.Module:
    """`module` itself in one process; wrapped in DistributedDataParallel under torchrun."""
    if world() == 1:
        return module
    from torch.nn.parallel import DistributedDataParallel

    dev = next(module.parameters()).device
    return DistributedDataParallel(
        module,
        device_ids=[dev] if dev.type == "cuda" else None,
        find_unused_parameters=find_unused,
        forward_sync_buffers=False,  # the buffers (pretrained weights, PTQ scales) never change
    )


def mean_over_ranks(x: float, device: torch.device) -> float:
    if world() == 1:
        return x
    t = torch.tensor([x], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t[0]) / world()
