"""torch.distributed plumbing for the trainer: torchrun detection, process group, samplers.

The training loop runs unchanged under ``torchrun --nproc_per_node N`` (DDP): ``torchrun``
sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``; ``init_from_env`` joins the process group
(gloo on CPU, nccl on CUDA); every helper here is a no-op in a plain single process, so the
same code serves both (the pattern of nanoGPT's ``train.py``).

Example:
    >>> from unetkit.training import distributed as dist_utils
    >>> dist_utils.world_size(), dist_utils.is_main()   # a plain process
    (1, True)
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import random
from collections.abc import Callable, Iterator, Mapping
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.data import Dataset, DistributedSampler, Sampler

from unetkit.errors import ConfigError

_log = logging.getLogger(__name__)
R = TypeVar("R")
_ENV_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


def is_torchrun() -> bool:
    """True when the process was started by ``torchrun`` (RANK/WORLD_SIZE/LOCAL_RANK set)."""
    return all(k in os.environ for k in _ENV_KEYS)


def is_initialized() -> bool:
    """True when a default process group exists."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """Global rank of this process (0 without a process group)."""
    return _rank()


def _rank() -> int:  # a second name, for code where ``rank`` is an argument
    if is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", 0)) if is_torchrun() else 0


def local_rank() -> int:
    """Rank on this node (selects the CUDA device); 0 without torchrun."""
    return int(os.environ.get("LOCAL_RANK", 0)) if is_torchrun() else 0


def world_size() -> int:
    """Number of processes taking part (1 without a process group)."""
    if is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", 1)) if is_torchrun() else 1


def is_main() -> bool:
    """True on rank 0, the only rank that writes files and shows progress."""
    return rank() == 0


def default_device() -> torch.device:
    """``cuda:LOCAL_RANK`` when CUDA is available, else the CPU."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    index, count = local_rank(), torch.cuda.device_count()
    if index >= count:
        raise ConfigError(
            f"LOCAL_RANK={index} but only {count} CUDA device(s) are visible; start torchrun "
            f"with --nproc_per_node {count}, or set CUDA_VISIBLE_DEVICES='' to train on CPU"
        )
    return torch.device("cuda", index)


def init_from_env(device: torch.device | None = None) -> bool:
    """Join the process group described by torchrun's environment variables.

    Args:
        device: the device this rank trains on; CUDA selects nccl (and sets the current
            CUDA device), anything else gloo. Default: ``default_device()``.

    Returns:
        True if this call created the process group (the caller then destroys it), False
        when not under torchrun, when the world has one process, or when a group exists.
    """
    if not is_torchrun() or is_initialized() or int(os.environ["WORLD_SIZE"]) <= 1:
        return False
    if not dist.is_available():
        raise ConfigError(
            "started by torchrun (WORLD_SIZE>1) but this torch build has no torch.distributed; "
            "run a single process or install a torch build with distributed support"
        )
    device = device or default_device()
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend=backend)
    _log.info("joined process group: rank %d of %d (%s)", rank(), world_size(), backend)
    return True


def destroy() -> None:
    """Leave the process group if one exists."""
    if is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if is_initialized():
        dist.barrier()


def _collective_device() -> torch.device:
    # nccl reduces CUDA tensors only; gloo works on CPU tensors
    if is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sums(values: Mapping[str, float | torch.Tensor]) -> dict[str, float]:
    """Sum each named value over all ranks (in float64); the identity in a single process.

    Ranks may hold different keys (a rank that saw no validation batch holds none); missing
    keys count as 0. Every rank must call this, in the same order as the other collectives.

    Args:
        values: name -> number (Python float/int or a 0-d tensor).

    Returns:
        name -> the sum over ranks, identical on every rank, keys sorted.
    """
    local = {k: float(v) for k, v in values.items()}
    if not is_initialized() or world_size() == 1:
        return dict(sorted(local.items()))
    gathered: list[Any] = [None] * world_size()
    dist.all_gather_object(gathered, sorted(local))
    keys = sorted({k for names in gathered for k in names})
    buf = torch.tensor(
        [local.get(k, 0.0) for k in keys], dtype=torch.float64, device=_collective_device()
    )
    dist.all_reduce(buf, op=dist.ReduceOp.SUM)
    return dict(zip(keys, buf.cpu().tolist(), strict=True))


def broadcast_flag(flag: bool) -> bool:
    """Rank 0's value of ``flag`` on every rank (so all ranks take the same branch)."""
    if not is_initialized() or world_size() == 1:
        return flag
    buf = torch.tensor([1 if flag else 0], dtype=torch.int64, device=_collective_device())
    dist.broadcast(buf, src=0)
    return bool(buf.item())


def train_sampler(
    dataset: Dataset, *, seed: int, shuffle: bool = True, drop_last: bool = False
) -> DistributedSampler:
    """A ``DistributedSampler`` for this rank, used in single-process runs too.

    The shuffled order is a function of ``(seed, epoch)`` only (call ``set_epoch`` every
    epoch), so a resumed run sees the same batches as an uninterrupted one, and a 2-rank run
    with batch ``b`` per rank sees the same sample sets per step as one process with ``2b``.
    """
    return DistributedSampler(
        dataset,
        num_replicas=world_size(),
        rank=rank(),
        shuffle=shuffle,
        seed=seed,
        drop_last=drop_last,
    )


class ShardSampler(Sampler[int]):
    """Indices ``rank, rank + world, ...``: each sample on exactly one rank, no padding.

    For evaluation: unlike ``DistributedSampler`` it never repeats samples to even out the
    ranks, so all-reduced metric sums count every sample once.
    """

    def __init__(
        self, dataset: Dataset, *, num_replicas: int | None = None, rank: int | None = None
    ) -> None:
        self.length = len(dataset)  # type: ignore[arg-type]
        self.num_replicas = world_size() if num_replicas is None else num_replicas
        self.rank = _rank() if rank is None else rank

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.length, self.num_replicas))

    def __len__(self) -> int:
        return len(range(self.rank, self.length, self.num_replicas))


def wrap_ddp(
    model: nn.Module, device: torch.device, *, find_unused_parameters: bool = False
) -> nn.Module:
    """Wrap ``model`` in DistributedDataParallel when a multi-process group exists.

    Parameters with ``requires_grad=False`` (e.g. a frozen base under LoRA) are ignored by
    DDP. Returns ``model`` unchanged in a single process.
    """
    if not is_initialized() or world_size() == 1:
        return model
    device_ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(
        model, device_ids=device_ids, find_unused_parameters=find_unused_parameters
    )


def maybe_no_sync(model: nn.Module, active: bool) -> contextlib.AbstractContextManager:
    """``model.no_sync()`` when ``active`` and ``model`` is DDP, else a null context.

    Used for every micro-batch but the last of a gradient-accumulation group, so gradients
    are all-reduced once per optimizer step instead of once per micro-batch.
    """
    no_sync = getattr(model, "no_sync", None)
    if active and callable(no_sync):
        return no_sync()
    return contextlib.nullcontext()


def rank_zero_only(fn: Callable[..., R]) -> Callable[..., R | None]:
    """Decorator: run ``fn`` on rank 0 only; other ranks get None."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> R | None:
        return fn(*args, **kwargs) if is_main() else None

    return wrapper


def log_main(
    msg: str, *args: Any, level: int = logging.INFO, logger: logging.Logger | None = None
) -> None:
    """Log ``msg % args`` on rank 0 only (other ranks stay quiet), to ``logger`` if given."""
    if is_main():
        (logger or _log).log(level, msg, *args)


def sync_buffers(model: nn.Module) -> None:
    """Copy rank 0's buffers (e.g. BatchNorm running statistics) to every rank.

    DDP broadcasts buffers at the start of each forward, so after the last training step
    each rank holds statistics updated by its own batch; this makes them equal again before
    validation and checkpointing.
    """
    if not is_initialized() or world_size() == 1:
        return
    for buf in model.buffers():
        dist.broadcast(buf.data, src=0)


# --- per-rank reproducibility ------------------------------------------------------------
def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators (CUDA included)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """A well-mixed 63-bit seed for (seed, epoch, rank)."""
    words = np.random.SeedSequence([seed, epoch, rank]).generate_state(2, dtype=np.uint32)
    return (int(words[0]) << 31) ^ int(words[1])


def capture_rng_state() -> dict[str, Any]:
    """Python, NumPy and torch (CPU) generator states as tensors and JSON values."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, py_state, py_gauss = random.getstate()
    numpy_keys = torch.from_numpy(keys.astype(np.int64))
    return {
        "torch": torch.get_rng_state(),
        "numpy": dict(kind=kind, keys=numpy_keys, pos=pos, has_gauss=has_gauss, gauss=gauss),
        "python": dict(version=version, state=torch.tensor(py_state), gauss=py_gauss),
    }


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Inverse of ``capture_rng_state``."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    keys = n["keys"].numpy().astype(np.uint32)
    np.random.set_state((n["kind"], keys, n["pos"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"].tolist()), p["gauss"]))
