"""Several processes (``torchrun``, ``accelerate launch``): shares of the work and gathering it back.

With N processes, process r takes the items ``r, r + N, r + 2N, ...`` of any list of work
(strided, so that a list sorted by length gives every process similar lengths), and
:func:`gather_in_order` returns every process's results as one list in the original
order, each item once. With one process both are the identity, so every caller has one
code path. Topology comes from ``accelerate``'s ``PartialState``, which reads what
torchrun or accelerate launch set and starts the process group. The group follows the
device the run asks for (:func:`process_device`): gloo for CPU processes, also on a machine
with GPUs, NCCL between GPUs, where process r of a machine uses ``cuda:LOCAL_RANK``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, TypeVar

import accelerate
import accelerate.utils
import torch

T = TypeVar("T")


def process_state():
    """accelerate's ``PartialState``: this process's rank, the number of processes, its device.

    The first call starts the process group: :func:`process_device` makes that call for the
    device a run asks for; any other first call joins the processes for the best device
    (GPUs where CUDA is available, else CPU processes joined by gloo, which accelerate only
    starts when told that the CPU is the device).
    """
    return accelerate.PartialState(cpu=not torch.cuda.is_available())


def process_is_distributed() -> bool:
    """Whether this process was started by torchrun / accelerate launch with several processes."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def local_rank() -> int:
    """This process's index among the processes of its machine (torchrun's LOCAL_RANK)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def rank_device(spec: str, rank: int) -> torch.device:
    """The device of the process of local rank ``rank`` among several, for ``--device spec``:
    the CPU for ``cpu`` (and ``auto`` without CUDA), else ``cuda:rank``; an explicit
    ``cuda:N`` must name that GPU."""
    if spec == "mps":
        raise ValueError("several processes cannot share the one MPS device; run one process with --device mps")
    if spec == "cpu" or (spec == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError(
            f"device {spec!r} was asked for, but this torch has no CUDA device (torch {torch.__version__})"
        )
    if spec.startswith("cuda:") and int(spec.removeprefix("cuda:")) != rank:
        raise ValueError(
            f"--device {spec} contradicts this process's local rank {rank}: under torchrun or "
            "accelerate launch process r of a machine uses cuda:r (LOCAL_RANK). Give --device cuda or "
            "auto, and choose the GPUs with CUDA_VISIBLE_DEVICES"
        )
    if rank >= torch.cuda.device_count():
        raise ValueError(
            f"the process of local rank {rank} has no GPU of its own: {torch.cuda.device_count()} CUDA "
            "device(s) are visible; start at most one process per GPU"
        )
    return torch.device("cuda", rank)


def process_device(spec: str) -> torch.device:
    """This process's device among several for ``--device spec`` (:func:`rank_device`), with
    the process group started for it: gloo for CPU processes, NCCL between GPUs. A group
    already started for the other kind of device is refused."""
    device = rank_device(spec, local_rank())
    state = accelerate.PartialState(cpu=device.type == "cpu")
    if (state.device.type == "cpu") != (device.type == "cpu"):
        raise ValueError(
            f"--device {spec}: these processes were already joined for {state.device.type} "
            f"({state.backend}); one run cannot mix CPU and GPU processes"
        )
    return device


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
    indexed = accelerate.utils.gather_object([(index, result) for index, result in zip(my_share(count), local_results)])
    ordered = sorted(indexed, key=lambda pair: pair[0])
    if [index for index, _ in ordered] != list(range(count)):
        raise RuntimeError("gathering results across processes lost or duplicated items")
    return [result for _, result in ordered]


def sum_across_processes(tensor: torch.Tensor) -> torch.Tensor:
    """The elementwise sum of ``tensor`` over all processes (the tensor itself in one process)."""
    if num_processes() == 1:
        return tensor
    return accelerate.utils.reduce(tensor, reduction="sum")


def broadcast_from_main(value: Any) -> Any:
    """The main process's ``value``, in every process."""
    if num_processes() == 1:
        return value
    return accelerate.utils.broadcast_object_list([value])[0]
