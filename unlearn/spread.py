"""Evaluation spread over the processes of a multi-process launch, with the result of one process.

Scoring a generative model is mostly generation, then judging and FID features: thousands of images, batch by
batch. Every process of a launch enters `spread_over(state)` at the same point (the pipeline's scoring,
`unlearn eval`); inside it `map_batches` gives batch k to process k mod N and sends each result to every
process, so that every process ends with all the batches, each computed exactly as a single process computes
it (the same inputs in the same batches: the same numbers, bit for bit on the same hardware). Outside it, and
on one process, `map_batches` computes every batch itself: what the main process does alone (writing the
outputs, the attacks) never waits for the others.

A set of fewer batches than processes leaves some processes idle: `eval.batch_size` sets the batch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

_state = None  # accelerate's state of the launch while `spread_over` is entered with several processes

# What a batch may hold (gloo sends no bool)
_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.uint8)
_MAX_DIMS = 8


@contextmanager
def spread_over(state) -> Iterator[None]:
    """Inside, `map_batches` spreads its batches over the processes of `state` (accelerate's `PartialState`,
    `AcceleratorState`, or anything with `num_processes`, `process_index` and `device`); every process must
    then make the same `map_batches` calls in the same order."""
    global _state
    previous = _state
    _state = state if state is not None and state.num_processes > 1 else None
    try:
        yield
    finally:
        _state = previous


def is_main_process() -> bool:
    """False on the processes other than the main one while spread (they leave shared files to it)."""
    return _state is None or _state.process_index == 0


def everywhere(flag: bool) -> bool:
    """Whether `flag` holds on every process while spread (the processes take a decision together, e.g. to read
    a cache entry rather than score: one that found none scores with the others)."""
    state = _state
    if state is None:
        return flag
    import torch.distributed as dist

    device = state.device if dist.get_backend() == "nccl" else torch.device("cpu")
    value = torch.tensor([int(flag)], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item())


def map_batches(total: int, batch_size: int, compute: Callable[[slice], torch.Tensor]) -> list[torch.Tensor]:
    """`compute(items)` for the batches `items` = slice(start, start + batch_size) of `range(total)`, in order;
    `compute` returns its batch's result as a CPU tensor. While spread, each process computes the batches
    k = its index mod N and receives the others'."""
    batches = [slice(start, min(start + batch_size, total)) for start in range(0, total, batch_size)]
    state = _state
    if state is None:
        return [compute(items) for items in batches]
    n, rank = state.num_processes, state.process_index
    own = {k: compute(batches[k]) for k in range(rank, len(batches), n)}
    return [_share(own.get(k), k % n, state) for k in range(len(batches))]


def _share(tensor: torch.Tensor | None, owner: int, state) -> torch.Tensor:
    """The `owner` process's `tensor`, in every process (two broadcasts: its dtype and shape, then its data)."""
    import torch.distributed as dist

    device = state.device if dist.get_backend() == "nccl" else torch.device("cpu")
    header = torch.zeros(2 + _MAX_DIMS, dtype=torch.int64, device=device)
    mine = state.process_index == owner
    if mine:
        if tensor.dtype not in _DTYPES or tensor.ndim > _MAX_DIMS:
            raise TypeError(f"cannot share a batch of {tensor.dtype} with {tensor.ndim} dimensions")
        header[0], header[1] = _DTYPES.index(tensor.dtype), tensor.ndim
        header[2 : 2 + tensor.ndim] = torch.tensor(tensor.shape)
    dist.broadcast(header, src=owner)
    dtype, ndim = _DTYPES[int(header[0])], int(header[1])
    shape = [int(size) for size in header[2 : 2 + ndim]]
    data = tensor.to(device).contiguous() if mine else torch.empty(shape, dtype=dtype, device=device)
    dist.broadcast(data, src=owner)
    return tensor if mine else data.cpu()
