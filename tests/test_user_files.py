"""The user's own JSONL/CSV files: schemas, and a clear error naming file and line for every bad row."""

from __future__ import annotations

import json
import warnings

import pytest

from lofit.cli import main
from lofit.data.files import DataError
from lofit.evaluation.multiple_choice import MultipleChoiceExample
from lofit.methods.lofit.config import LofitConfig
from lofit.runs import pipeline
from lofit.runs.config import RunConfig
from lofit.runs.data import RunData
from lofit.tasks import GenerationExample, PromptCompletion, PromptPreference, UserFileTask, get_task

from .conftest import word_tokenizer
from .tiny_run import tiny_model_folder, write_task


def write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_sft_preference_and_multiple_choice_schemas(tmp_path):
    sft = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": "2+2=", "completion": " 4"}])
    pref = write_jsonl(tmp_path / "pref.jsonl", [{"prompt": "Q:", "chosen": " yes", "rejected": " no"}])
    (tmp_path / "mc.csv").write_text('prompt,choices,label\nSky?,"["" blue"", "" red""]",0\n')
    assert get_task(str(sft)).train_examples() == [PromptCompletion("2+2=", " 4")]
    assert get_task(str(sft)).eval_examples() == [GenerationExample("2+2=", (" 4",))]
    assert get_task(str(pref)).train_examples() == [PromptPreference("Q:", " yes", " no")]
    assert get_task(str(pref)).eval_examples() == [MultipleChoiceExample("Q:", (" yes", " no"), (1, 0), 0)]
    task = get_task(str(sft), eval_file=str(tmp_path / "mc.csv"))
    assert task.eval_examples() == [MultipleChoiceExample("Sky?", (" blue", " red"), (1, 0), 0)]
    with pytest.raises(DataError, match="can be evaluated but not trained on"):
        get_task(str(tmp_path / "mc.csv")).train_examples()


def test_every_malformed_row_is_reported_with_file_and_line(tmp_path):
    rows = [
        {"prompt": "ok", "completion": " fine"},
        {"prompt": "no completion"},
        {"prompt": 3, "completion": "x"},
        {"prompt": "ok", "completion": " fine"},
        {"prompt": "", "completion": "x"},
    ]
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    with pytest.raises(DataError) as error:
        UserFileTask(path).train_examples()
    message = str(error.value)
    assert "3 malformed row(s), nothing was trained" in message
    assert f"{path}:2: missing completion" in message
    assert f"{path}:3: prompt, completion must be strings" in message
    assert f"{path}:5: missing prompt" in message


@pytest.mark.parametrize(
    "text,message",
    [
        ('{"prompt": "a", "completion": "b"}\n{not json\n', r"train.jsonl:2: not valid JSON"),
        ('{"question": "a", "answer": "b"}\n', r"train.jsonl:1: fields \['answer', 'question'\] match no schema"),
        ("", "no rows"),
        ('{"prompt": "a", "choices": ["x"], "label": 0}\n', r":1: choices must be a list of at least two"),
        ('{"prompt": "a", "choices": ["x", "y"], "label": 2}\n', r":1: label 2 is not an index of the 2 choices"),
        ('{"prompt": "a", "choices": ["x", "y"], "label": "first"}\n', r":1: label must be an integer"),
        ('["prompt", "completion"]\n', r":1: expected an object"),
    ],
)
def test_malformed_files(tmp_path, text, message):
    path = tmp_path / "train.jsonl"
    path.write_text(text)
    with pytest.raises(DataError, match=message):
        UserFileTask(path).eval_examples()


def test_csv_line_numbers_and_bad_json_choices(tmp_path):
    path = tmp_path / "mc.csv"
    path.write_text('prompt,choices,label\nA?,"[""x"", ""y""]",1\nB?,not json,0\n')
    with pytest.raises(DataError, match=r"mc.csv:3: choices must be a JSON array"):
        UserFileTask(path).eval_examples()


def test_missing_or_unsupported_file(tmp_path):
    with pytest.raises(DataError, match="is missing"):
        UserFileTask(tmp_path / "absent.jsonl").train_examples()
    (tmp_path / "data.txt").write_text("x")
    with pytest.raises(DataError, match="must end in .jsonl or .csv"):
        UserFileTask(tmp_path / "data.txt").train_examples()


def test_unknown_match_mode():
    with pytest.raises(ValueError, match="match must be 'exact' or 'contains'"):
        UserFileTask("x.jsonl", match="fuzzy")


def test_chat_template_wraps_prompts_when_switched_on(tmp_path):
    tokenizer = word_tokenizer()
    tokenizer.chat_template = "{% for m in messages %}<user>{{ m['content'] }}</user>{% endfor %}<assistant>"
    path = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": "2+2= ", "completion": "4"}])
    task = get_task(str(path))
    assert task.train_examples()[0].prompt == "2+2= "
    task.chat_tokenizer = tokenizer
    assert task.train_examples()[0].prompt == "<user>2+2=</user><assistant>"
    tokenizer.chat_template = None
    with pytest.raises(ValueError, match="has no chat template"):
        task.eval_examples()


def test_csv_with_a_byte_order_mark(tmp_path):
    path = tmp_path / "excel.csv"
    path.write_bytes("prompt,completion\nQ:, yes\n".encode("utf-8-sig"))
    assert UserFileTask(path).train_examples() == [PromptCompletion("Q:", " yes")]


def test_a_train_size_above_the_training_examples_trains_on_all_of_them_and_says_so(tmp_path):
    rows = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": f"{n}+{n}=", "completion": f" {2 * n}"} for n in range(3)])
    with pytest.warns(UserWarning, match=r"--train-size 300 is more than its 3 training examples; training on all 3"):
        assert len(RunData(RunConfig(task=str(rows), train_size=300), seed=0, needs=("train",)).train_examples()) == 3
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # neither a smaller size nor the task's default warns
        assert len(RunData(RunConfig(task=str(rows), train_size=2), seed=0, needs=("train",)).train_examples()) == 2
        assert len(RunData(RunConfig(task=str(rows)), seed=0, needs=("train",)).train_examples()) == 3


def test_a_runs_metrics_record_what_its_data_warned_of(tmp_path):
    """The warning above is kept in metrics.json (and so in an experiment's records), not only printed."""
    model, data = tiny_model_folder(tmp_path / "tiny"), write_task(tmp_path / "sft.jsonl", rows=6)
    options = ["--task", str(data), "--model", str(model), "--device", "cpu", "--no-progress", "--num-heads", "2"]
    options += ["--train-size", "50", "--select-epochs", "1", "--tune-epochs", "1", "--output-dir"]
    with pytest.warns(UserWarning, match="--train-size 50 is more than its 6 training examples"):
        assert main(["run", *options, str(tmp_path / "run")]) == 0
        assert main(["select", *options, str(tmp_path / "select")]) == 0
    for folder in ("run", "select"):
        recorded = json.loads((tmp_path / folder / "metrics.json").read_text())["warnings"]
        assert recorded[0] == "sft.jsonl: --train-size 50 is more than its 6 training examples; training on all 6"


def test_a_run_over_every_fold_shows_each_folds_warnings_at_its_top_level(tmp_path, monkeypatch):
    def fold(cell, models):  # a fold's summary as run_cell returns it, the second with a warning
        k = cell.run.output_dir.rsplit("_", 1)[1]
        warned = {"warnings": ["the loss is diverging"]} if k == "1" else {}
        return {"test_mc1": 0.5, "metric_keys": ["test_mc1"]} | warned

    monkeypatch.setattr(pipeline, "run_cell", fold)
    summary = pipeline.run_all(RunConfig(task="truthfulqa", fold="all", output_dir=str(tmp_path)), LofitConfig())
    assert summary["warnings"] == ["fold 1: the loss is diverging"] and summary["mean_test_mc1"] == 0.5
    assert json.loads((tmp_path / "metrics.json").read_text())["warnings"] == summary["warnings"]
