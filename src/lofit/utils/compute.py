"""Where and in which precision lofit runs: devices, dtypes, mixed precision, memory.

One dataclass, :class:`ComputeConfig`, shared by the Python API and every command that
loads a model (``--device``, ``--dtype``, ``--device-map``, ``--mixed-precision``,
``--gradient-accumulation-steps``, ``--gradient-checkpointing``).

- ``device="auto"`` is the best device this process can use: under ``torchrun`` or
  ``accelerate launch`` the process's own device (``cuda:LOCAL_RANK`` or the CPU),
  otherwise CUDA, then MPS, then the CPU. Under several processes ``cuda`` also means
  ``cuda:LOCAL_RANK``, and the processes are joined for the device asked for (gloo for
  ``cpu``, NCCL between GPUs), see :func:`lofit.utils.distributed.process_device`.
- ``dtype="auto"`` is float32 on the CPU (CPU training wants it) and the checkpoint's own
  dtype on an accelerator, a device map's included (a GGUF file de-quantises to float32).
- ``device_map`` (e.g. ``"auto"``) spreads one model over several devices with
  ``accelerate``'s big-model loading; it replaces ``device`` and needs a single process.
- ``mixed_precision`` runs forward passes under autocast (bf16 or fp16) while the
  adapter's trainable tensors stay float32 (master weights); ``auto`` is bf16 where the
  hardware runs it faster than float32 (see :func:`lofit.training.loop.resolve_mixed_precision`).
"""

from __future__ import annotations

import functools
import os
import platform
from dataclasses import dataclass, field

import torch

from lofit.utils.distributed import process_device, process_is_distributed

DTYPES: dict[str, torch.dtype | str] = {
    "auto": "auto",
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
MIXED_PRECISIONS = ("no", "bf16", "fp16", "auto")
UNSUPPORTED_LAUNCHES = {
    "ACCELERATE_USE_DEEPSPEED": "DeepSpeed",
    "ACCELERATE_USE_FSDP": "FSDP",
    "ACCELERATE_USE_MEGATRON_LM": "Megatron-LM",
}
"""Environment flags ``accelerate launch`` sets for engines that shard or wrap the model itself."""
TRACKERS = ("none", "tensorboard", "wandb", "mlflow")
"""What ``--report-to`` may name (see :mod:`lofit.training.trackers`)."""


@dataclass
class ComputeConfig:
    """Placement, precision and memory options of a run (see the module docstring), and the
    trackers its training reports to (``report_to``, :mod:`lofit.training.trackers`)."""

    device: str = field(
        default="auto", metadata={"help": "auto, cpu, cuda, cuda:N or mps (default: auto, the best available)"}
    )
    dtype: str = field(
        default="auto",
        metadata={
            "help": (
                "weights' dtype: auto, float32, bfloat16 or float16 (default: auto: float32 on CPU, the "
                "checkpoint's on a GPU)"
            )
        },
    )
    device_map: str | None = field(
        default=None,
        metadata={
            "help": "spread the model over devices, e.g. auto (accelerate's big-model loading; replaces --device)"
        },
    )
    mixed_precision: str | None = field(
        default=None,
        metadata={
            "help": (
                "autocast forward passes: no, bf16, fp16 (needs a GPU) or auto (bf16 where the hardware runs it "
                "faster: a CUDA GPU with bf16 units, a CPU with oneDNN bf16 support; else no); adapters stay "
                "float32 (default: accelerate launch's setting, else auto)"
            )
        },
    )
    gradient_accumulation_steps: int = field(
        default=1,
        metadata={
            "help": "split each process's share of a batch into this many micro-batches (same result, less memory)"
        },
    )
    gradient_checkpointing: bool = field(
        default=False,
        metadata={
            "help": "recompute the frozen layers' activations in the backward pass (less memory, same gradients)"
        },
    )
    prefix_cache_mb: int = field(
        default=1024,
        metadata={
            "help": (
                "memory for the frozen-prefix cache: hidden states below the first trained layer, computed once "
                "per training sequence (0: off)"
            )
        },
    )
    group_by_length: bool = field(
        default=True,
        metadata={
            "help": "batch training examples of similar length together (less padding; batches in seeded random order)"
        },
    )
    compile: bool = field(
        default=False,
        metadata={
            "hashed": False,
            "resume": "may change",
            "help": (
                "train through torch.compile (TorchInductor, dynamic shapes): faster steps after a few minutes of "
                "compiling, float rounding that may differ from eager's; the frozen-prefix cache is off while "
                "compiled (benchmarks/compile.py measures both)"
            ),
        },
    )
    report_to: str = field(
        default="none",
        metadata={
            "hashed": False,
            "resume": "may change",
            "repeatable": True,
            "help": (
                "log losses, learning rates, step 1's localization and the final metrics to trackers: none, "
                "tensorboard, wandb or mlflow (repeatable, or comma-separated; default: none)"
            ),
        },
    )

    def __post_init__(self) -> None:
        check_device(self.device)
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}; got {self.dtype!r}")
        if self.mixed_precision is not None and self.mixed_precision not in MIXED_PRECISIONS:
            raise ValueError(
                f"mixed_precision must be one of {', '.join(MIXED_PRECISIONS)}; got {self.mixed_precision!r}"
            )
        if self.prefix_cache_mb < 0:
            raise ValueError(f"prefix_cache_mb must be >= 0; got {self.prefix_cache_mb}")
        if self.gradient_accumulation_steps < 1:
            raise ValueError(f"gradient_accumulation_steps must be >= 1; got {self.gradient_accumulation_steps}")
        if self.compile and self.gradient_checkpointing:
            raise ValueError(
                "--compile with --gradient-checkpointing: torch.compile breaks its graph inside transformers' "
                "checkpointed decoder layers and runs them eagerly, so the combination would compile almost "
                "nothing; use one of the two"
            )
        if self.mixed_precision == "fp16" and (
            self.device == "cpu" or (self.device == "auto" and not torch.cuda.is_available())
        ):
            raise ValueError("--mixed-precision fp16 needs a GPU; on the CPU use bf16")
        if self.device_map is not None and self.device not in ("auto",):
            raise ValueError("give either --device or --device-map, not both: a device map places the model itself")
        check_single_process_device_map(self.device_map)
        check_launcher()
        report_to_list(self.report_to)


def report_to_list(report_to: str | None) -> list[str]:
    """The trackers of a ``report_to`` value (comma-separated names; ``none`` or empty: none);
    a ValueError for a name that is not a tracker, or ``none`` beside a tracker."""
    names = [name.strip() for name in (report_to or "none").split(",") if name.strip()]
    unknown = [name for name in names if name not in TRACKERS]
    if unknown:
        raise ValueError(f"report_to: unknown tracker {unknown[0]!r}; choose from {', '.join(TRACKERS)}")
    if "none" in names and len(names) > 1:
        raise ValueError(f"report_to: 'none' cannot be combined with trackers; got {report_to!r}")
    return list(dict.fromkeys(name for name in names if name != "none"))


def check_device(spec: str) -> None:
    """Refuse a device name that is not auto, cpu, mps, cuda or cuda:N."""
    index = spec.removeprefix("cuda:")
    if spec not in ("auto", "cpu", "cuda", "mps") and not (spec.startswith("cuda:") and index.isdigit()):
        raise ValueError(f"device must be auto, cpu, cuda, cuda:N or mps; got {spec!r}")


def check_single_process_device_map(device_map: str | dict | None) -> None:
    """Refuse a device map under several processes: each would spread the whole model over every GPU."""
    if device_map is not None and process_is_distributed():
        raise ValueError(
            f"--device-map spreads one model over the GPUs of one process, but {os.environ['WORLD_SIZE']} "
            "processes were started (torchrun / accelerate launch), each of which would load the whole "
            "model over every GPU. Run one process with --device-map, or several processes without it "
            "(each process then uses cuda:LOCAL_RANK)"
        )


def check_launcher() -> None:
    """Refuse ``accelerate launch`` with DeepSpeed, FSDP or Megatron-LM: lofit's loop trains a
    few adapter tensors on a model it places itself; those engines shard and wrap the model,
    and DeepSpeed would also divide every loss by its own gradient-accumulation steps."""
    engines = [name for flag, name in UNSUPPORTED_LAUNCHES.items() if os.environ.get(flag, "false").lower() == "true"]
    if engines:
        raise ValueError(
            f"accelerate launch with {engines[0]} is not supported: lofit trains only adapter tensors, "
            "and places and shards nothing. Launch with a plain multi-GPU or multi-CPU accelerate config "
            "(or torchrun), and use --device-map for a model one GPU cannot hold"
        )


def resolve_device(spec: str = "auto") -> torch.device:
    """The torch device for ``spec``; ``auto`` is this process's best device (see module docstring)."""
    check_device(spec)
    if process_is_distributed():
        return process_device(spec)
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(spec)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"device {spec!r} was asked for, but this torch has no CUDA device (torch {torch.__version__})"
        )
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"device {spec!r} does not exist: {torch.cuda.device_count()} CUDA device(s) are visible")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError("device 'mps' was asked for, but MPS is not available here")
    return device


def device_map_target(device_map: str | dict) -> torch.device:
    """The accelerator a device map computes on: its first GPU (a named map such as ``auto``:
    CUDA, else MPS, as accelerate fills them), or the CPU when it places nothing on one."""
    if isinstance(device_map, dict):
        for place in device_map.values():
            place = f"cuda:{place}" if isinstance(place, int) else str(place)
            if place not in ("cpu", "disk", "meta"):
                return torch.device(place)
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("mps") if torch.backends.mps.is_available() else torch.device("cpu")


def run_device(compute: ComputeConfig) -> torch.device:
    """Where ``compute``'s model computes: its device map's accelerator, or its resolved ``device``."""
    return device_map_target(compute.device_map) if compute.device_map is not None else resolve_device(compute.device)


def resolve_dtype(spec: str | torch.dtype, device: torch.device) -> torch.dtype | str:
    """The weights' dtype: a torch dtype, or ``"auto"`` (the checkpoint's) on an accelerator."""
    if isinstance(spec, torch.dtype):
        return spec
    if spec not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}; got {spec!r}")
    if spec == "auto":
        return torch.float32 if device.type == "cpu" else "auto"
    return DTYPES[spec]


@functools.cache
def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def hardware(device: torch.device) -> str:
    """Where a computation runs, as results record it: the GPU's name, or the CPU's and the
    number of threads torch uses."""
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    if device.type == "cpu":
        return f"cpu: {_cpu_name()}, {torch.get_num_threads()} threads"
    return device.type
