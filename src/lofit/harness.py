"""lm-evaluation-harness on lofit results: the harness model ``lofit`` and ``lofit eval --harness-tasks``.

lm-eval 0.4 looks model names up in its own registry and has no plugin discovery, so
*importing this module* is what registers ``lofit`` there::

    import lm_eval
    import lofit.harness  # registers the model name "lofit"

    lm_eval.simple_evaluate(model="lofit", model_args="pretrained=default,adapter=runs/clutrr-default/adapter",
                            tasks=["arc_easy"])

Model arguments: ``pretrained``, anything :func:`lofit.load_model` takes (``default``,
``gemma3-270m``, a folder, a ``.gguf`` file, a hub id); ``adapter``, a folder or hub id
holding a result saved by any lofit method (none: the base model); ``merge=true`` folds a
LoFiT or ITI adapter (or a LoRA) into the weights first: the same scores without hooks;
``dtype``, ``device`` and ``device_map`` as in ``load_model``; the rest (``batch_size``,
``max_length``...) are lm-eval's HFLM arguments.

:class:`LofitLM` *is* lm-eval's ``HFLM``, given the already adapted model: log-likelihoods,
rolling log-likelihoods and generation are lm-eval's own code, and every forward pass and
``generate`` call goes through the adapter's hooks. One process evaluates (lm-eval does
not spread a model it is handed over several).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

try:
    from lm_eval import simple_evaluate
    from lm_eval.api.registry import register_model
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from lm_eval.utils import handle_non_serializable, make_table
except ImportError as error:  # the optional extra is not installed
    raise ImportError("lofit.harness needs lm-evaluation-harness: pip install 'lofit[eval]'") from error

from lofit.methods.hub import from_pretrained
from lofit.models.identity import portable_name
from lofit.models.loading import DEFAULT_MODEL, load_model
from lofit.utils.atomic import write_text
from lofit.utils.compute import ComputeConfig

RESULTS_NAME = "harness_results.json"


@register_model("lofit")
class LofitLM(HFLM):
    """lm-eval's HFLM over ``pretrained`` with the lofit result ``adapter`` applied (see the
    module docstring for the arguments)."""

    def __init__(
        self,
        pretrained: str = DEFAULT_MODEL,
        adapter: str | None = None,
        merge: bool = False,
        dtype: str = "auto",
        device: str | None = "auto",
        device_map: str | None = None,
        **hflm_options: Any,
    ):
        model, tokenizer = load_model(str(pretrained), dtype=dtype, device=device or "auto", device_map=device_map)
        if adapter is not None:
            model = from_pretrained(model, str(adapter))
        if merge:
            if adapter is None or not hasattr(model, "merge_and_unload"):
                raise ValueError(
                    f"merge=true needs an adapter that folds into the weights (LoFiT, ITI or LoRA); "
                    f"{adapter or 'no adapter'} does not"
                )
            model = model.merge_and_unload()
        super().__init__(pretrained=model, tokenizer=tokenizer, **hflm_options)


def _output_dir(model: str, adapter: str | None, output_dir: str | None) -> Path:
    """Where ``lofit eval --harness-tasks`` writes: ``--output-dir``; else beside a local adapter
    folder (``<adapter's parent>/harness``); else ``runs/harness-<model>``."""
    if output_dir:
        return Path(output_dir)
    if adapter and Path(adapter).is_dir():
        return Path(adapter).resolve().parent / "harness"
    return Path("runs") / f"harness-{portable_name(model).removesuffix('.gguf').replace('/', '_')}"


@contextlib.contextmanager
def _bootstrap_in_this_process() -> Iterator[None]:
    """lm-eval's bootstrap standard errors (of perplexity, F1, BLEU, ...) computed in this process
    for the ``with`` block (its ``DISABLE_MULTIPROC``), not in a pool of fork()ed copies of it.
    A fork of a process that holds a model and torch's threads can deadlock, and the pool's
    terminate waits forever on a worker that inherited a SIGTERM handler which does not exit
    (seen: this project's test run stuck at that join). lm-eval seeds each chunk of 1,000
    resamples by its index on both paths, so the standard errors are the same."""
    previous = os.environ.get("DISABLE_MULTIPROC")
    os.environ["DISABLE_MULTIPROC"] = "1"
    try:
        yield
    finally:
        if previous is None:
            del os.environ["DISABLE_MULTIPROC"]
        else:
            os.environ["DISABLE_MULTIPROC"] = previous


def run_harness(
    tasks: list[str],
    model: str = DEFAULT_MODEL,
    adapter: str | None = None,
    include_path: str | None = None,
    compute: ComputeConfig | None = None,
    batch_size: int = 16,
    limit: int | None = None,
    chat_template: bool = False,
    output_dir: str | None = None,
) -> tuple[dict, Path]:
    """Run the harness ``tasks`` (lm-eval task names, or tasks defined by the YAML files under
    ``include_path``) on ``model`` with ``adapter`` applied; write lm-eval's results (without
    per-sample logs) as :data:`RESULTS_NAME` into the output folder (see :func:`_output_dir`)
    and return them with the file's path."""
    compute = compute or ComputeConfig()
    model_args = {
        "pretrained": model,
        "adapter": adapter,
        "dtype": compute.dtype,
        "device": compute.device,
        "device_map": compute.device_map,
        "batch_size": batch_size,
    }
    with _bootstrap_in_this_process():
        results = simple_evaluate(
            model="lofit",
            model_args=model_args,
            tasks=tasks,
            limit=limit,
            log_samples=False,
            apply_chat_template=chat_template,
            task_manager=TaskManager(include_path=include_path),
        )
    path = _output_dir(model, adapter, output_dir) / RESULTS_NAME
    write_text(path, json.dumps(results, indent=2, default=handle_non_serializable) + "\n")
    return results, path


def harness_command(
    tasks: str,
    model: str,
    adapter: str | None,
    include_path: str | None,
    compute: ComputeConfig,
    batch_size: int,
    limit: int | None,
    chat_template: bool,
    output_dir: str | None,
) -> None:
    """``lofit eval --harness-tasks T1,T2``: run the tasks, print lm-eval's table and where the results went."""
    names = [name.strip() for name in tasks.split(",") if name.strip()]
    if not names:
        raise ValueError("--harness-tasks needs at least one task name")
    results, path = run_harness(
        names, model, adapter, include_path, compute, batch_size, limit, chat_template, output_dir
    )
    print(make_table(results))
    print(f"harness results: {path}")
