"""Where data come from: how to get the built-in tasks' data, and the user's own data as Parquet
or a ``datasets`` dataset (local folders only, no network), validated like JSONL and CSV."""

from __future__ import annotations

import json

import pytest

from lofit.cli import main
from lofit.data.files import DataError, resolve_data_dir
from lofit.evaluation.multiple_choice import MultipleChoiceExample
from lofit.tasks import GenerationExample, PromptCompletion, UserFileTask, get_task

from .tiny_run import tiny_model_folder

datasets = pytest.importorskip("datasets")
parquet = pytest.importorskip("pyarrow.parquet")

SFT = [{"prompt": "Q: sky A:", "completion": " yes"}, {"prompt": "Q: red A:", "completion": " no"}]
TEST = [{"prompt": "Q: blue A:", "completion": " no"}]


def write_parquet(path, rows):
    import pyarrow

    parquet.write_table(pyarrow.Table.from_pylist(rows), path)
    return path


def test_missing_built_in_data_say_where_to_get_them(tmp_path, monkeypatch):
    monkeypatch.delenv("LOFIT_DATA", raising=False)
    for make in (
        lambda: resolve_data_dir(None),
        lambda: resolve_data_dir(tmp_path / "absent"),
        lambda: get_task("clutrr").train_examples(tmp_path),
        lambda: get_task("mquake").train_examples(tmp_path),
        lambda: get_task("truthfulqa").eval_examples(tmp_path, "test"),
    ):
        with pytest.raises(DataError, match=r"github.com/fc2869/lo-fit.* --data-dir or the LOFIT_DATA"):
            make()
    with pytest.raises(
        DataError, match=r"absent.jsonl is missing$"
    ):  # the user's own file: no hint about the paper's data
        UserFileTask(tmp_path / "absent.jsonl").train_examples()


def test_parquet_files_are_read_and_validated_like_jsonl(tmp_path):
    path = write_parquet(tmp_path / "train.parquet", SFT)
    assert get_task(str(path)).train_examples() == [PromptCompletion(r["prompt"], r["completion"]) for r in SFT]
    choices = write_parquet(tmp_path / "mc.parquet", [{"prompt": "Sky?", "choices": [" blue", " red"], "label": 0}])
    assert get_task(str(path), eval_file=str(choices)).eval_examples() == [
        MultipleChoiceExample("Sky?", (" blue", " red"), (1, 0), 0)
    ]
    bad = write_parquet(
        tmp_path / "bad.parquet", SFT + [{"prompt": "Q:", "completion": None}, {"prompt": "", "completion": "x"}]
    )
    with pytest.raises(DataError) as error:
        get_task(str(bad)).train_examples()
    assert f"{bad} row 3: missing completion" in str(error.value) and f"{bad} row 4: missing prompt" in str(error.value)
    (tmp_path / "broken.parquet").write_bytes(b"not parquet")
    with pytest.raises(DataError, match="broken.parquet: not a readable Parquet file"):
        get_task(str(tmp_path / "broken.parquet")).train_examples()
    with pytest.raises(DataError, match="absent.parquet is missing"):
        get_task(str(tmp_path / "absent.parquet")).train_examples()


def test_a_dataset_saved_to_disk_gives_its_splits(tmp_path):
    folder = tmp_path / "saved"
    datasets.DatasetDict(train=datasets.Dataset.from_list(SFT), test=datasets.Dataset.from_list(TEST)).save_to_disk(
        folder
    )
    task = get_task(str(folder))
    assert task.train_examples() == [PromptCompletion(r["prompt"], r["completion"]) for r in SFT]
    assert task.eval_examples(None, "test") == [GenerationExample("Q: blue A:", (" no",))]
    assert get_task(f"{folder}:train").eval_examples(None, "test")[0].prompt == "Q: sky A:"  # the source's split wins
    with pytest.raises(DataError, match=r"has no split 'val' \(it has: train, test\)"):
        task.eval_examples(None, "val")
    datasets.Dataset.from_list(TEST).save_to_disk(tmp_path / "single")
    assert get_task(str(tmp_path / "single")).train_examples() == [PromptCompletion("Q: blue A:", " no")]


def test_a_local_dataset_folder_loads_with_the_json_builder_and_bad_rows_are_listed(tmp_path):
    folder = tmp_path / "local"
    folder.mkdir()
    (folder / "train.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in SFT + [{"prompt": "Q: x A:", "completion": ""}])
    )
    (folder / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in TEST))
    assert get_task(str(folder)).eval_examples(None, "test") == [GenerationExample("Q: blue A:", (" no",))]
    with pytest.raises(DataError, match=r"local, split train, row 3: missing completion"):
        get_task(str(folder)).train_examples()
    with pytest.raises(DataError, match=r"cannot load split 'validation' of the dataset"):
        get_task(str(folder)).eval_examples(None, "validation")


def test_unknown_names_are_refused_with_every_kind_of_source_named():
    with pytest.raises(ValueError, match=r"\.jsonl/\.csv/\.parquet file, or a datasets dataset"):
        get_task("clutr")


def test_lofit_eval_on_a_dataset_folder(tmp_path, capsys):
    folder = tmp_path / "saved"
    datasets.DatasetDict(train=datasets.Dataset.from_list(SFT), test=datasets.Dataset.from_list(TEST)).save_to_disk(
        folder
    )
    model = tiny_model_folder(tmp_path / "tiny")
    assert (
        main(
            [
                "eval",
                "--task",
                str(folder),
                "--model",
                str(model),
                "--output-dir",
                str(tmp_path / "run"),
                "--no-progress",
            ]
        )
        == 0
    )
    assert "evaluated on 1 examples" in capsys.readouterr().out
