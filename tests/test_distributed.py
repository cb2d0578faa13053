"""Two processes started as a user starts them (``torchrun ... lofit run``) train the adapter
one process trains with the same global batch, evaluate every example once and in order,
and only the main process writes files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lofit.cli import main

from .tiny_run import tiny_model_folder, write_task

BIN = Path(sys.executable).parent

# Installed as sitecustomize in every process torchrun starts: a process other than rank 0
# records each file it opens for writing, creates, renames or removes under the watched folder.
AUDIT = """
import atexit, json, os, sys
if os.environ.get("RANK", "0") != "0":
    watched, touched = os.environ["LOFIT_TEST_WATCH"], []
    def _audit(event, args):
        if event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
            path, mode, flags = os.fsdecode(args[0]), args[1], args[2] or 0
            writing = (mode and any(c in mode for c in "wax+")) or flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)
            if writing and os.path.abspath(path).startswith(watched):
                touched.append(path)
        elif event in ("os.mkdir", "os.rename", "os.replace", "os.remove", "shutil.rmtree"):
            target = args[0]
            if isinstance(target, (str, bytes, os.PathLike)) and os.path.abspath(os.fsdecode(target)).startswith(
                watched
            ):
                touched.append(f"{event} {os.fsdecode(target)}")
    sys.addaudithook(_audit)
    audit_file = os.environ["LOFIT_TEST_AUDIT"] + "." + os.environ["RANK"]
    atexit.register(lambda: open(audit_file, "w").write(json.dumps(touched)))
"""


@pytest.mark.parametrize("kind, compiled", [("sft", False), ("dpo", False), ("dpo", True)])
def test_two_processes_train_and_evaluate_like_one(tmp_path, kind, compiled):
    """With ``compiled``, the two processes train through torch.compile and the one process eagerly."""
    model_dir = tiny_model_folder(tmp_path / "tiny")
    data = write_task(tmp_path / f"{kind}.jsonl", kind)
    options = [
        "run",
        "--task",
        str(data),
        "--model",
        str(model_dir),
        "--device",
        "cpu",
        "--batch-size",
        "4",
        "--select-epochs",
        "1",
        "--tune-epochs",
        "2",
        "--num-heads",
        "3",
        "--scale-lr",
        "0.02",
        "--bias-lr",
        "0.05",
        "--no-progress",
    ]
    assert main(options + ["--output-dir", str(tmp_path / "one")]) == 0

    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(AUDIT)
    two = tmp_path / "two"
    env = os.environ | {
        "PYTHONPATH": str(tmp_path / "site"),
        "LOFIT_TEST_WATCH": str(two),
        "LOFIT_TEST_AUDIT": str(tmp_path / "audit"),
        "OMP_NUM_THREADS": "1",
        "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor"),
    }
    # torch.distributed.run is torchrun, also in a virtual environment that borrows the system's torch
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(BIN / "lofit"),
        *options,
        "--output-dir",
        str(two),
        "--gradient-accumulation-steps",
        "2",
        *(["--compile"] if compiled else []),
    ]
    finished = subprocess.run(command, env=env, capture_output=True, text=True, timeout=480)
    assert finished.returncode == 0, finished.stderr[-3000:]

    assert json.loads((tmp_path / "audit.1").read_text()) == []  # rank 1 wrote nothing
    inductor = tmp_path / "inductor"
    assert (inductor.is_dir() and any(inductor.rglob("*.py"))) == compiled  # TorchInductor wrote kernels only then
    one = tmp_path / "one"
    assert sorted(p.relative_to(one) for p in one.rglob("*")) == sorted(p.relative_to(two) for p in two.rglob("*"))
    ranking_one, ranking_two = (json.loads((d / "head_ranking.json").read_text())["ranking"] for d in (one, two))
    assert [(r["layer"], r["head"]) for r in ranking_one] == [(r["layer"], r["head"]) for r in ranking_two]
    assert max(abs(a["score"] - b["score"]) for a, b in zip(ranking_one, ranking_two)) < 1e-5
    adapter_one, adapter_two = (load_file(str(d / "adapter" / "adapter_model.safetensors")) for d in (one, two))
    assert torch.equal(adapter_one["heads"], adapter_two["heads"])
    assert torch.allclose(adapter_one["lofit_bias"], adapter_two["lofit_bias"], atol=1e-5)
    assert adapter_one["lofit_bias"].abs().max() > 1e-3  # it trained
    predictions_one, predictions_two = (
        [json.loads(line) for line in (d / "predictions.jsonl").read_text().splitlines()] for d in (one, two)
    )
    assert len(predictions_two) == 16
    assert [p["prompt"] for p in predictions_one] == [
        p["prompt"] for p in predictions_two
    ]  # every example once, in order
    if kind == "sft":
        assert [p["output"] for p in predictions_one] == [p["output"] for p in predictions_two]
    else:
        for a, b in zip(predictions_one, predictions_two):
            assert a["mc2"] == pytest.approx(b["mc2"], abs=1e-4)
