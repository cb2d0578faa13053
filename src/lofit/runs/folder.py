"""The run folder: the one writer of a run's files.

Everything a run writes goes through :class:`RunFolder`, from the main process only:
``config.yaml`` (the resolved configuration), ``checkpoints/``, ``head_ranking.json`` and
``heads.png``, ``predictions.jsonl``, ``metrics.json`` and the saved result (``adapter/``).
Nothing is written before the run has been checked and its model loaded.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Collection
from pathlib import Path

import yaml

from lofit.methods import FitResult, Method
from lofit.methods.lofit.ranking import HeadRanking
from lofit.runs.plots import head_heatmap
from lofit.training.loop import CheckpointPolicy, TrainingSetup
from lofit.utils.atomic import write_json, write_text
from lofit.utils.compute import ComputeConfig
from lofit.utils.distributed import is_main_process, wait_for_everyone


class RunFolder:
    """The folder ``path`` of one run; ``resume`` continues from its newest checkpoint."""

    def __init__(self, path: Path, resume: bool = False, save_steps: int | None = None):
        self.path = path
        self.resume = resume
        self.save_steps = save_steps

    def saved_config(self) -> dict | None:
        """The resolved configuration this folder's run wrote (config.yaml), by section; None where
        the folder has no config.yaml. A file that is not YAML raises yaml.YAMLError."""
        path = self.path / "config.yaml"
        if not path.is_file():
            return None
        saved = yaml.safe_load(path.read_text())
        return saved if isinstance(saved, dict) else {}

    def check_resumable(self, config: dict, may_change: Collection[str]) -> None:
        """Refuse ``--resume`` unless this folder's config.yaml has the settings of ``config``
        (the resolved configuration), apart from the run options in ``may_change``."""
        saved = self.saved_config()
        if saved is None:
            path = self.path / "config.yaml"
            raise FileNotFoundError(f"--resume: {path} does not exist, so there is no run to continue in {self.path}")
        differences = []
        for section in ("run", "lofit", "method_options"):
            before, after = saved.get(section) or {}, config.get(section) or {}
            differences += [
                f"{key}: {before.get(key)!r} then, {after.get(key)!r} now"
                for key in sorted(set(before) | set(after))
                if key not in may_change and before.get(key) != after.get(key)
            ]
        if differences:
            raise ValueError(
                f"--resume: the run in {self.path} had other settings ({'; '.join(differences)}); "
                "resume with the same options, or start a new run without --resume"
            )

    def write_config(self, config: dict) -> None:
        if is_main_process():
            self.path.mkdir(parents=True, exist_ok=True)
            write_text(self.path / "config.yaml", yaml.safe_dump(config, sort_keys=False))

    def training_setup(self, compute: ComputeConfig) -> TrainingSetup:
        """Checkpoints in ``<run folder>/checkpoints``: resumed with ``--resume`` (the folder's run
        was checked to have the same settings), cleared otherwise."""
        folder = self.path / "checkpoints"
        if not self.resume and is_main_process() and folder.exists():
            shutil.rmtree(folder)
        wait_for_everyone()
        return TrainingSetup(compute, CheckpointPolicy(folder, self.save_steps, self.resume))

    def write_ranking(self, ranking: HeadRanking, k: int) -> None:
        """head_ranking.json (with the localization figures of the top ``k``) and heads.png."""
        if is_main_process():
            self.path.mkdir(parents=True, exist_ok=True)
            ranking.save(self.path / "head_ranking.json", k)
            head_heatmap(ranking.scores, ranking.top(k), self.path / "heads.png")

    def write_predictions(self, records: list[dict]) -> None:
        if is_main_process():
            self.path.mkdir(parents=True, exist_ok=True)
            write_text(self.path / "predictions.jsonl", "".join(json.dumps(record) + "\n" for record in records))

    def write_metrics(self, metrics: dict) -> None:
        if is_main_process():
            write_json(self.path / "metrics.json", metrics)

    def write_result(self, method: Method, result: FitResult, metrics: dict) -> None:
        """The method's saved result in ``adapter/`` (written once per run)."""
        if is_main_process():
            method.save(result, self.path / "adapter", metrics)
