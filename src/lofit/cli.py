"""The ``lofit`` command line. Options come from the same dataclasses as the Python API.

Precedence: dataclass defaults < ``--recipe`` (e.g. ``paper``) < ``--config file.yaml`` <
command-line flags. The YAML
file may be flat (``bias_lr: 0.02``) or sectioned like a run's config.yaml
(``run: {...}``, ``lofit: {...}``, ``method_options: {...}``).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from dataclasses import MISSING, asdict, fields
from pathlib import Path
from typing import Any

import huggingface_hub
import transformers
import yaml

from lofit.experiments import shipped_grids
from lofit.experiments.command import run_experiment_command
from lofit.experiments.executors import EXECUTORS
from lofit.experiments.report import edge_warning, parse_compare_to, write_report
from lofit.methods import METHOD_CONFIGS
from lofit.methods.lofit.config import LofitConfig
from lofit.methods.lofit.ranking import HeadRanking
from lofit.runs.comparison import comparison_table, run_compare
from lofit.runs.config import RunConfig, build_configs
from lofit.runs.folder import RunFolder
from lofit.runs.pipeline import run_all, run_eval, run_merge, run_select, run_tune
from lofit.runs.plots import head_heatmap
from lofit.runs.recipes import with_recipe
from lofit.tasks import TASKS
from lofit.training.loop import NonFiniteLossError, resolve_mixed_precision
from lofit.training.trackers import TrackerRun, tracking
from lofit.utils.compute import TRACKERS, ComputeConfig, report_to_list, run_device
from lofit.utils.distributed import is_main_process
from lofit.utils.options import OptionsError, field_type


def _add_dataclass_options(parser: argparse.ArgumentParser, cls: type, title: str) -> None:
    group = parser.add_argument_group(title)
    for f in fields(cls):
        option = "--" + f.name.replace("_", "-")
        kind = field_type(cls, f.name)
        help_text = f.metadata.get("help", "")
        if "choices" in f.metadata:  # a registry (name -> function or class): its names, as registered
            help_text = f"{help_text}: {', '.join(f.metadata['choices'])}"
        if "default" not in help_text:
            help_text += f" (default: {f.default if f.default is not MISSING else None})"
        if kind is bool:
            group.add_argument(
                option, dest=f.name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_text
            )
        elif f.metadata.get("repeatable"):
            group.add_argument(option, dest=f.name, action=_JoinAction, default=argparse.SUPPRESS, help=help_text)
        else:
            group.add_argument(option, dest=f.name, type=kind, default=argparse.SUPPRESS, help=help_text)


class _JoinAction(argparse.Action):
    """A repeatable option whose values are joined by commas: ``--report-to a --report-to b`` is ``a,b``."""

    def __call__(self, parser, namespace, values, option_string=None):
        before = getattr(namespace, self.dest, None)
        setattr(namespace, self.dest, f"{before},{values}" if before else values)


def _tracker_run(
    command: str, run: RunConfig, lofit: LofitConfig, compute: ComputeConfig, method_configs: dict
) -> TrackerRun:
    """The tracker run of a training command (``--report-to``): written under ``<run folder>/trackers``
    (compare: its comparison folder), named after that folder, configured with every resolved option."""
    folder = run.resolved_output_dir()
    if command == "compare" and not run.output_dir:
        folder = Path(f"{folder}-compare")
    config = {"command": command} | asdict(run) | lofit.to_dict() | asdict(compute)
    for method_config in method_configs.values():
        config |= asdict(method_config) if method_config is not None else {}
    return TrackerRun(compute.report_to, folder / "trackers", project="lofit", name=folder.name, config=config)


def _load_yaml(path: str) -> dict[str, Any]:
    file = Path(path)
    if not file.is_file():
        raise OptionsError([f"config file {file} does not exist"])
    try:
        values = yaml.safe_load(file.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise OptionsError([f"{file} is not valid YAML: {' '.join(str(error).split())}"]) from None
    if not isinstance(values, dict):
        raise OptionsError([f"{file} must hold a mapping of option names to values"])
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if key in ("run", "lofit", "compute", "method_options") and isinstance(value, dict):
            flat.update(value)
        else:
            flat[str(key)] = value
    return flat


def _values(args: argparse.Namespace) -> dict[str, Any]:
    """Option values: the YAML file's, overridden by the flags given; unknown options are refused."""
    values = _load_yaml(args.config) if getattr(args, "config", None) else {}
    known = {f.name for cls in (RunConfig, LofitConfig, ComputeConfig, *METHOD_CONFIGS) for f in fields(cls)}
    problems = [f"unknown option {name!r} in {args.config}" for name in sorted(set(values) - known)]
    values.update({k: v for k, v in vars(args).items() if k in known})
    try:
        values = with_recipe(values, RunConfig.task)
    except ValueError as error:
        problems.append(str(error))
    if problems:
        raise OptionsError(problems)
    return values


def _methods(args: argparse.Namespace) -> list[str]:
    """The methods a command runs: ``--methods`` for compare, ``--method`` (default lofit) otherwise."""
    if args.command == "compare":
        if "method" in vars(args):
            raise OptionsError(["compare takes --methods (a comma-separated list), not --method"])
        return [m.strip() for m in args.methods.split(",") if m.strip()]
    values = _load_yaml(args.config) if getattr(args, "config", None) else {}
    method = vars(args).get("method", values.get("method", RunConfig.method))
    if not isinstance(method, str):
        raise OptionsError([f"option method must be a method's name, got {method!r}"])
    return [method]


def _configs(args: argparse.Namespace) -> tuple[RunConfig, LofitConfig, ComputeConfig, dict[str, object | None]]:
    """Every config of the command, each method's included (:func:`lofit.runs.config.build_configs`);
    all problems are gathered into one OptionsError."""
    methods = _methods(args)
    return build_configs(_values(args), methods)


def _precision_line(compute: ComputeConfig) -> str:
    """The mixed precision the run computed under, and whether ``--mixed-precision auto`` chose it."""
    chosen = resolve_mixed_precision(compute.mixed_precision, run_device(compute))
    requested = compute.mixed_precision or os.environ.get("ACCELERATE_MIXED_PRECISION", "auto")
    chooser = " (chosen by --mixed-precision auto)" if requested == "auto" else ""
    return f"mixed precision: {chosen}{chooser}"


def _print_summary(summary: dict, compute: ComputeConfig) -> None:
    """A few readable lines, from the main process only; everything is in the run folder's metrics.json."""
    if not is_main_process():
        return
    print(f"\ntask {summary['task']}, model {summary['model']}, method {summary['method']}")
    if "trained_parameters" in summary:
        print(f"trained parameters: {summary['trained_parameters']:,}")
    if "selected_heads" in summary:
        heads = summary["selected_heads"]
        print(f"selected heads (layer.head, {len(heads)}): " + " ".join(f"{layer}.{head}" for layer, head in heads))
    times = [
        f"{key.removesuffix('_seconds')} {value:.0f}s" for key, value in summary.items() if key.endswith("_seconds")
    ]
    if times:
        resumed = summary.get("resumed_steps")
        note = f" (resumed: {resumed} of {summary['steps']} optimiser steps ran before, not counted)" if resumed else ""
        print("wall time: " + ", ".join(times) + note)
    for fold in summary.get("folds", []):
        print(
            f"fold {fold['run_folder']}: " + ", ".join(f"{k} {100 * fold[k]:.1f}%" for k in fold.get("metric_keys", []))
        )
    for key in summary.get("metric_keys", []):
        print(f"{summary['task']} {key.replace('_', ' ')}: {100 * summary[key]:.1f}%")
    for key, value in summary.items():
        if key.endswith("num_examples"):
            print(f"evaluated on {value} examples")
    print(_precision_line(compute))
    print(f"run folder: {summary['run_folder']}")


def _ranking_selection(path: Path) -> str | None:
    """The step-1 objective (``l1``, ``group``) of the run that wrote the ranking ``path``, from the
    config.yaml beside it; None where there is none to read."""
    try:
        saved = RunFolder(path.parent).saved_config()
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    lofit = (saved or {}).get("lofit")
    return lofit.get("selection") if isinstance(lofit, dict) else None


def _print_ranking(ranking: HeadRanking, top: int, selection: str | None = None) -> None:
    """The top heads with their scores, then the localization verdict of a top-``top`` selection:
    its figures and, where it is not localized, what to change for the step-1 ``selection``."""
    print("rank  layer  head  score")
    for rank, (layer, head) in enumerate(ranking.order[:top]):
        print(f"{rank:4d}  {layer:5d}  {head:4d}  {float(ranking.scores[layer, head]):.5f}")
    figures = ranking.localization(top)
    print(figures.verdict(selection))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lofit", description="Localized fine-tuning on LLM representations (LoFiT).")
    commands = parser.add_subparsers(dest="command", required=True)
    tasks = ", ".join(sorted(TASKS))

    def command(
        name: str, help_text: str, options: Sequence[type] = (RunConfig, LofitConfig, ComputeConfig)
    ) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=f"{help_text} Tasks: {tasks}.")
        sub.add_argument("--config", help="YAML file of options; flags override it")
        for cls in options:
            _add_dataclass_options(sub, cls, f"{cls.__name__} options")
        return sub

    command(
        "select",
        "Step 1: rank heads (by default by training scales with an L1 penalty; see --heads); write head_ranking.json "
        "and heads.png.",
    )
    tune = command("tune", "Step 2: train biases of the top heads of a saved ranking; write the adapter.")
    tune.add_argument("--ranking", required=True, help="head_ranking.json from `lofit select` or `lofit run`")
    command(
        "run",
        "Fit a method (LoFiT's two steps by default, or a baseline with --method), then evaluate: write a full run "
        "folder.",
        (RunConfig, LofitConfig, ComputeConfig, *METHOD_CONFIGS),
    )
    compare = command(
        "compare",
        "Run several methods on one task, one after another, and print one table "
        "(method, trained parameters, metrics, wall time).",
        (RunConfig, LofitConfig, ComputeConfig, *METHOD_CONFIGS),
    )
    compare.add_argument(
        "--methods",
        default="zero-shot,lofit,iti,repe,lora,red,reft",
        help="comma-separated methods (default: zero-shot,lofit,iti,repe,lora,red,reft)",
    )
    evaluate = command("eval", "Evaluate a model, zero-shot or with a saved adapter.", (RunConfig, ComputeConfig))
    evaluate.add_argument("--adapter", help="adapter folder to apply (with --harness-tasks also a hub id)")
    evaluate.add_argument(
        "--harness-tasks",
        help="comma-separated lm-evaluation-harness tasks to run instead of --task "
        "(needs lofit[eval]; see docs/harness.md)",
    )
    evaluate.add_argument("--harness-include", help="folder of harness task YAML files to add (lm-eval's include path)")
    merge = commands.add_parser(
        "merge", help="Fold an adapter into the model and save a plain transformers checkpoint."
    )
    merge.add_argument("--model", default="default", help="base model the adapter was trained on (default: default)")
    merge.add_argument("--adapter", required=True, help="adapter folder")
    merge.add_argument("--output-dir", required=True, help="folder for the merged checkpoint")
    for option in ("device", "dtype", "device_map"):
        compute_field = next(f for f in fields(ComputeConfig) if f.name == option)
        merge.add_argument(
            "--" + option.replace("_", "-"),
            dest=option,
            default=compute_field.default,
            help=compute_field.metadata["help"],
        )
    experiment = commands.add_parser(
        "experiment",
        help="Run one of the paper's experiments (a grid of cells), resumably; write results.jsonl and a report.",
        description="Experiments: " + ", ".join(sorted(shipped_grids())) + ". See docs/experiments.md.",
    )
    experiment.add_argument("name", nargs="?", help="the experiment (or give --grid FILE)")
    experiment.add_argument("--grid", help="a grid YAML file of your own, instead of NAME")
    experiment.add_argument("--model", help="the model of every cell (default: the grid's, else default)")
    experiment.add_argument("--tasks", help="comma-separated tasks (default: the grid's)")
    experiment.add_argument("--seeds", help="comma-separated seeds (default: the grid's)")
    experiment.add_argument("--heads", help="table2: comma-separated head selectors (default: the grid's)")
    experiment.add_argument(
        "--train-size", help="data-efficiency: comma-separated training set sizes (default: the grid's)"
    )
    experiment.add_argument("--output-dir", help="experiment folder (default: runs/experiments/<name>-<model>)")
    experiment.add_argument("--limit", type=int, help="a smoke run: evaluate every cell on its first N examples only")
    experiment.add_argument("--data-dir", help="data folder (default: $LOFIT_DATA)")
    experiment.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an option for every cell, e.g. --option mixed_precision=bf16 (repeatable)",
    )
    experiment.add_argument(
        "--tune", action="store_true", help="choose each arm's hyper-parameters on the validation split first"
    )
    experiment.add_argument(
        "--dry-run", action="store_true", help="list the cells, which are done, and estimated times; run nothing"
    )
    experiment.add_argument(
        "--show-grid",
        action="store_true",
        help="print the grid as this command runs it (its base grid merged, tune grids expanded, --tasks, --seeds, "
        "--heads and --train-size applied), as YAML that --grid reads back; run nothing",
    )
    experiment.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    experiment.add_argument(
        "--status",
        action="store_true",
        help="show which cells are done, running, failed or waiting, with elapsed and estimated times "
        "(readable while another process runs the experiment); run nothing",
    )
    experiment.add_argument(
        "--report-to",
        action="append",
        choices=TRACKERS,
        help="log every cell (one tracker run per cell, grouped by experiment) to a tracker (repeatable)",
    )
    engine = experiment.add_argument_group("where the cells run (see docs/experiments.md)")
    engine.add_argument(
        "--executor",
        default="local",
        choices=EXECUTORS,
        help="local: on this machine (default); ray: each cell a Ray task (lofit[ray]); slurm: each cell a "
        "Slurm job through submitit (lofit[slurm])",
    )
    engine.add_argument(
        "--workers",
        type=int,
        help="cells at once: local processes (default 1: in this process); with ray or slurm, at most this many "
        "cells submitted at a time (default: every ready cell)",
    )
    engine.add_argument("--cell-cpus", type=float, help="ray, slurm: CPUs per cell (default: 1)")
    engine.add_argument("--cell-gpus", type=float, help="ray, slurm: GPUs per cell (default: 0)")
    engine.add_argument(
        "--ray-address", help="ray: the cluster to join (e.g. auto, ray://host:10001; default: a local Ray for the run)"
    )
    engine.add_argument("--slurm-partition", help="slurm: the partition (default: the cluster's)")
    engine.add_argument("--slurm-time", type=int, help="slurm: minutes a cell's job may run (default: 240)")
    report = commands.add_parser(
        "report", help="Rebuild an experiment's report.md, report.csv and figures from its results.jsonl."
    )
    report.add_argument("folder", help="the experiment folder")
    report.add_argument(
        "--compare-to",
        metavar="ROW",
        help="the row every other row of a task is compared with (paired bootstrap): an arm's LABEL, or "
        "NAME=VALUE[,NAME=VALUE...] with label= and sweep values (e.g. heads=lofit); default: the grid's "
        "report compare_to; '' for no comparison",
    )
    heads = commands.add_parser("heads", help="Print a saved head ranking and write its layers x heads heatmap.")
    heads.add_argument("ranking", help="head_ranking.json, or a run folder holding one")
    heads.add_argument(
        "--top",
        type=int,
        help="how many heads to print, outline and judge the localization of "
        "(default: the K of the run that saved the ranking, else 20)",
    )
    heads.add_argument("--output", help="PNG path (default: heads.png beside the ranking)")
    serve = commands.add_parser(
        "serve",
        help="Serve a base model and many adapters over an OpenAI-compatible HTTP API (needs lofit[serve]).",
        description="See docs/serving.md.",
    )
    serve.add_argument("--model", default="default", help="the base model (default: default)")
    serve.add_argument("--adapters", help="folder whose subfolders are adapters or run folders, named by subfolder")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    serve.add_argument(
        "--api-key",
        default=os.environ.get("LOFIT_API_KEY"),
        help="bearer key every /v1 request must send (default: $LOFIT_API_KEY); without one, only 127.0.0.1",
    )
    serve.add_argument("--max-batch", type=int, default=16, help="rows per batch (default: 16)")
    serve.add_argument("--max-queue", type=int, default=64, help="requests queued or running; then 429 (default: 64)")
    serve.add_argument("--max-tokens", type=int, default=512, help="largest max_tokens of a request (default: 512)")
    serve.add_argument("--max-prompt-tokens", type=int, default=2048, help="longest prompt in tokens (default: 2048)")
    serve.add_argument("--timeout", type=float, default=120.0, help="seconds a request may take (default: 120)")
    serve.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default: auto)")
    serve.add_argument("--dtype", default="auto", help="auto, float32, bfloat16 or float16 (default: auto)")
    return parser


def _serve(args: argparse.Namespace) -> None:
    """``lofit serve``: FastAPI and uvicorn are the optional extra lofit[serve], imported only here."""
    try:
        from lofit.serving.app import ServerLimits
        from lofit.serving.server import serve
    except ImportError as error:
        raise ValueError(f"lofit serve needs FastAPI and uvicorn: pip install 'lofit[serve]' ({error})") from None
    limits = ServerLimits(
        max_prompt_tokens=args.max_prompt_tokens, max_tokens=args.max_tokens, request_timeout=args.timeout
    )
    serve(
        args.model,
        Path(args.adapters) if args.adapters else None,
        args.host,
        args.port,
        args.api_key,
        limits,
        args.max_batch,
        args.max_queue,
        args.device,
        args.dtype,
    )


def _silence_library_progress_bars() -> None:
    """``--no-progress`` also covers the bars of the libraries lofit calls: transformers'
    weight loading and huggingface_hub's downloads. Not transformers' GGUF conversion,
    which calls tqdm unconditionally (one line per model load)."""
    huggingface_hub.utils.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "progress", True) is False:
        _silence_library_progress_bars()
    try:
        if args.command == "heads":
            path = Path(args.ranking)
            path = path / "head_ranking.json" if path.is_dir() else path
            ranking = HeadRanking.load(path)
            top = min(args.top or ranking.selected or 20, len(ranking.order))
            _print_ranking(ranking, top, _ranking_selection(path))
            output = Path(args.output) if args.output else path.parent / "heads.png"
            head_heatmap(ranking.scores, ranking.top(top), output)
            print(f"heatmap: {output}")
        elif args.command == "experiment":
            if run_experiment_command(args):
                return 1
        elif args.command == "report":
            compare_to = None if args.compare_to is None else parse_compare_to(args.compare_to)
            print(f"report: {write_report(Path(args.folder), compare_to)}")
            if warning := edge_warning(Path(args.folder)):
                print(warning, file=sys.stderr)
        elif args.command == "serve":
            _serve(args)
        elif args.command == "merge":
            compute = ComputeConfig(device=args.device, dtype=args.dtype, device_map=args.device_map)
            run_merge(args.model, Path(args.adapter), Path(args.output_dir), compute)
            print(f"merged checkpoint: {args.output_dir}")
        else:
            run, lofit, compute, method_configs = _configs(args)
            if args.command == "eval" and report_to_list(compute.report_to):
                raise OptionsError(
                    ["--report-to logs training: lofit eval trains nothing (use it with run, select, tune or compare)"]
                )
            if args.command in ("select", "tune", "run", "compare"):
                with tracking(_tracker_run(args.command, run, lofit, compute, method_configs)) as session:
                    if args.command == "select":
                        ranking = run_select(run, lofit, compute)
                        top = lofit.num_heads_to_tune(len(ranking.order))
                        if session is not None:
                            session.log_summary({"localization": ranking.localization(top).to_json()})
                        if is_main_process():
                            _print_ranking(ranking, top, lofit.selection)
                            print(f"ranking: {run.resolved_output_dir() / 'head_ranking.json'}")
                    elif args.command == "compare":
                        summaries, folder = run_compare(run, lofit, list(method_configs), method_configs, compute)
                        for summary in summaries if session is not None else []:
                            session.log(f"final/{summary['method']}", summary)
                        if is_main_process():
                            print(comparison_table(summaries))
                            print(f"comparison folder: {folder}")
                    else:
                        if args.command == "tune":
                            summary = run_tune(run, lofit, Path(args.ranking), compute)
                        else:
                            summary = run_all(run, lofit, method_configs[run.method], compute)
                        if session is not None:
                            session.log_summary(summary)
                        _print_summary(summary, compute)
            elif args.command == "eval" and args.harness_tasks:
                from lofit.harness import harness_command  # lm-eval is optional: imported only when asked for

                harness_command(
                    args.harness_tasks,
                    run.model,
                    args.adapter,
                    args.harness_include,
                    compute,
                    run.eval_batch_size,
                    run.limit,
                    run.chat_template,
                    run.output_dir,
                )
            elif args.command == "eval":
                _print_summary(run_eval(run, Path(args.adapter) if args.adapter else None, compute), compute)
    except (FileNotFoundError, ValueError) as error:
        for line in str(error).splitlines() or [type(error).__name__]:
            print(f"lofit: error: {line}", file=sys.stderr)
        return 2
    except NonFiniteLossError as error:
        print(f"lofit: training stopped: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
