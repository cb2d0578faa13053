"""Several processes (``torchrun``, ``accelerate launch``): shares of the work and gathering it back.

With N processes, process r takes the items ``r, r + N, r + 2N, ...`` of any list of work
(strided, so that a list sorted by length gives every process similar lengths), and
:func:`gather_in_order` returns every process's results as one list in the original
order, each item once. With one process both are the identity, so every caller has one
code path. Topology comes from ``accelerate``'s ``PartialState``, which reads what
torchrun or accelerate launch set and starts the process group (gloo on CPUs, NCCL on
GPUs).
"""

from __future__ import annotations

from typing import Any, Sequence, TypeVar

import torch

from .compute import process_is_distributed

T = TypeVar("T")


def process_state():
    """accelerate's ``PartialState``: this process's rank, the number of processes, its device.

    On a machine without CUDA the processes are CPU processes joined by gloo; accelerate
    only starts that group when told that the CPU is the device.
    """
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def num_processes() -> int:
    return process_state().num_processes if process_is_distributed() else 1


def process_index() -> int:
    return process_state().process_index if process_is_distributed() else 0


def is_main_process() -> bool:
    """True in the process that writes files (the only one, or rank 0)."""
    return process_index() == 0


def wait_for_everyone() -> None:
    """Block until every process reaches this point (nothing to wait for in one process)."""
    if process_is_distributed():
        process_state().wait_for_everyone()


def my_share(count: int) -> list[int]:
    """The indices of ``count`` work items that this process handles (strided)."""
    return list(range(process_index(), count, num_processes()))


def gather_in_order(local_results: Sequence[T], count: int) -> list[T]:
    """Every process's results of :func:`my_share` as one list of ``count`` items, in order."""
    if num_processes() == 1:
        return list(local_results)
    from accelerate.utils import gather_object

    indexed = gather_object([(index, result) for index, result in zip(my_share(count), local_results)])
    ordered = sorted(indexed, key=lambda pair: pair[0])
    if [index for index, _ in ordered] != list(range(count)):
        raise RuntimeError("gathering results across processes lost or duplicated items")
    return [result for _, result in ordered]


def sum_across_processes(tensor: torch.Tensor) -> torch.Tensor:
    """The elementwise sum of ``tensor`` over all processes (the tensor itself in one process)."""
    if num_processes() == 1:
        return tensor
    from accelerate.utils import reduce

    return reduce(tensor, reduction="sum")


def broadcast_from_main(value: Any) -> Any:
    """The main process's ``value``, in every process."""
    if num_processes() == 1:
        return value
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([value])[0]
