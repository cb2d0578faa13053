"""The out-of-domain tasks (nq_open, triviaqa, mmlu, mmlu_5shot, mmlu_continuation), TRAIN:EVAL tasks, the ood grid
and its report: scoring, row checks, refusals, and agreement with lm-evaluation-harness."""

from __future__ import annotations

import functools
import json
import os
import random
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

from lofit.cli import main
from lofit.data.files import DataError
from lofit.evaluation.multiple_choice import MultipleChoiceExample, choice_logprobs
from lofit.experiments import ModelPool, Runner, load_grid
from lofit.experiments import runner as runner_module
from lofit.experiments.grid import cell_config, expand, ranking_key
from lofit.experiments.progress import read_failures
from lofit.experiments.report import write_report
from lofit.experiments.results import append_result, read_results
from lofit.tasks import TASKS, TransferTask, get_task
from lofit.tasks.mmlu import GROUP_OF, SUBJECT_GROUPS
from lofit.tasks.open_qa import cut_answer, squad_normalize

DATA = Path(os.environ.get("LOFIT_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
needs_data = pytest.mark.skipif(not (DATA / "ood").is_dir(), reason="the out-of-domain data (data folder's ood/)")
OPTIONS = {"fold": 0, "all_pairs": False, "eval_file": None, "match": "exact"}


PROMPTS = {
    "nq_open": "Answer these questions:\\n\\nQ: {{question}}?\\nA:",
    "triviaqa": "Question: {{question}}?\\nAnswer:",
}
"""lm-eval's nq_open and triviaqa prompts (YAML-escaped)."""
LOCAL_ROWS = """\
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
"""
"""A local task file's data: the rows of the JSON-lines file ``{data}``, all of them the test split."""
GENERATION_TASK = (
    "task: {name}_local\n"
    + LOCAL_ROWS
    + """\
output_type: generate_until
doc_to_text: "{prompt}"
doc_to_target: "{{{{answers}}}}"
target_delimiter: " "
generation_kwargs:
  until: ["\\n", ".", ","]
  do_sample: false
  max_gen_toks: 16
filter_list:
  - name: remove_whitespace
    filter:
      - function: remove_whitespace
      - function: take_first
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
    ignore_case: true
    ignore_punctuation: true
"""
)
"""lm-eval's nq_open / triviaqa over a local file (lofit's 16 new tokens at most)."""
ARTICLES = '    regexes_to_ignore: ["\\\\b(?:The |the |An |A |The |a |an )"]\n'
"""nq_open's metric also drops articles (triviaqa's does not)."""
MMLU_TASK = (
    "task: mmlu_local\n"
    + LOCAL_ROWS
    + """\
output_type: multiple_choice
description: "The following are multiple choice questions (with answers) about {{{{subject.replace('_', ' ')}}}}.\\n\\n"
doc_to_text: "{{{{question.strip()}}}}\\nA. {{{{choices[0]}}}}\\nB. {{{{choices[1]}}}}\\nC. {{{{choices[2]}}}}\\nD. \\
  {{{{choices[3]}}}}\\nAnswer:"
doc_to_choice: ["A", "B", "C", "D"]
doc_to_target: answer
metric_list:
  - metric: acc
"""
)
"""lm-eval's mmlu (zero-shot) over a local file of mixed subjects."""
MMLU_CONTINUATION_TASK = (
    "task: mmlu_continuation_local\n"
    + LOCAL_ROWS
    + """\
output_type: multiple_choice
description: "The following are questions (with answers) about {{{{subject.replace('_', ' ')}}}}.\\n\\n"
doc_to_text: "Question: {{{{question.strip()}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
  - metric: acc_norm
"""
)
"""lm-eval's mmlu_continuation (its template, zero-shot) over a local file of mixed subjects."""


def qa_row(question: str, answers: list[str], false: str, flawed: bool = False) -> dict:
    return {"question": question, "answers": answers, "false_answer": false, "false_answer_in_answers": flawed}


def mmlu_row(subject: str, number: int, answer: int) -> dict:
    return {"subject": subject, "question": f"q{number}", "choices": [f"c{i}" for i in range(4)], "answer": answer}


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def piece_tokenizer(texts: list[str]) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the byte-level pieces of ``texts``: it decodes back to the exact text."""
    split = pre_tokenizers.ByteLevel(add_prefix_space=False)
    pieces = sorted({piece for text in texts for piece, _ in split.pre_tokenize_str(text)})
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["<unk>", "</s>", *pieces])}, unk_token="<unk>"))
    backend.pre_tokenizer, backend.decoder = split, decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", pad_token="<unk>", eos_token="</s>")


def tiny_model_folder(folder: Path, texts: list[str]) -> Path:
    """A random tiny Llama over :func:`piece_tokenizer`'s vocabulary, with peaked logits (no near-ties)."""
    tokenizer = piece_tokenizer(texts)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        initializer_range=0.3,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=1,
    )
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_squad_normalisation_and_the_answer_cut():
    assert squad_normalize("The  Beatles!") == "beatles"
    assert squad_normalize("an Apple, a day") == "apple day"
    assert squad_normalize("Théâtre") == "théâtre"  # only ASCII punctuation goes
    assert cut_answer(" Paris, France.\nQ: next") == "Paris"
    assert cut_answer("\nParis") == ""  # the harness stops at the first line break too
    assert cut_answer(" 1972") == "1972"


def test_flawed_rows_are_left_out_and_both_protocols_score_the_rest(tmp_path):
    write_rows(
        tmp_path / "ood" / "nq_open" / "test.jsonl",
        [
            qa_row("q one", ["yes", "maybe"], "no"),
            qa_row("q two", ["no", "nope"], "no", flawed=True),
            qa_row("q three", ["maybe"], "yes"),
        ],
    )
    task = get_task("nq_open")
    examples = task.eval_examples(tmp_path, "test")
    assert [e.answers for e in examples] == [("yes", "maybe"), ("maybe",)]
    assert examples[0].prompt == "Answer these questions:\n\nQ: q one?\nA:"
    tokenizer = piece_tokenizer([e.prompt for e in examples] + [" yes", " no", " maybe"])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(
        LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=64,
            initializer_range=0.3,
            pad_token_id=0,
            eos_token_id=1,
        )
    )
    evaluation = task.evaluate(model, tokenizer, examples, progress=False)
    assert list(evaluation.metrics) == ["true_false_accuracy", "exact_match", "num_examples"]
    alone = [  # each answer scored on its own: the row is right when its likeliest alias beats the false answer
        choice_logprobs(model, tokenizer, [MultipleChoiceExample(e.prompt, (" " + a, " " + e.false_answer), (1, 0), 0)])
        for e in examples
        for a in e.answers
    ]
    tf = [float(max(alone[0][0][0], alone[1][0][0]) >= alone[0][0][1]), float(alone[2][0][0] >= alone[2][0][1])]
    assert [r["true_false_accuracy"] for r in evaluation.records] == tf
    assert evaluation.metrics["true_false_accuracy"] == sum(tf) / 2
    for record in evaluation.records:
        assert record["prediction"] == cut_answer(record["output"])
        assert record["exact_match"] == float(
            squad_normalize(record["prediction"]) in map(squad_normalize, record["answers"])
        )


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"question": "q", "answers": [], "false_answer": "f", "false_answer_in_answers": false}', "'answers'"),
        ('{"question": "q", "answers": ["a"], "false_answer": "f"}', "'false_answer_in_answers'"),
        ('{"question": " ", "answers": ["a"], "false_answer": "f", "false_answer_in_answers": false}', "'question'"),
        ("[1, 2]", "expected an object"),
    ],
)
def test_every_bad_open_qa_row_is_named(tmp_path, line, message):
    (tmp_path / "ood" / "triviaqa").mkdir(parents=True)
    (tmp_path / "ood" / "triviaqa" / "test.jsonl").write_text(json.dumps(qa_row("ok", ["a"], "b")) + "\n" + line + "\n")
    with pytest.raises(DataError, match=rf"test.jsonl line 2: .*{message}"):
        get_task("triviaqa").eval_examples(tmp_path, "test")


def test_bad_mmlu_rows_and_a_missing_file_are_refused(tmp_path):
    with pytest.raises(DataError, match="ood/mmlu/test.jsonl is missing; the out-of-domain sets"):
        get_task("mmlu").eval_examples(tmp_path, "test")
    for row, message in [
        (mmlu_row("astrology", 1, 0), "unknown subject 'astrology'"),
        (mmlu_row("anatomy", 1, 4), "'answer' must be 0, 1, 2 or 3"),
        (mmlu_row("anatomy", 1, 0) | {"choices": ["a", "b", "c"]}, "four strings"),
    ]:
        write_rows(tmp_path / "ood" / "mmlu" / "test.jsonl", [row])
        with pytest.raises(DataError, match=message):
            get_task("mmlu").eval_examples(tmp_path, "test")


def test_evaluation_only_tasks_refuse_training_and_transfer_tasks_train_on_the_first(tmp_path, capsys):
    for name in ("nq_open", "triviaqa", "mmlu", "mmlu_5shot"):
        with pytest.raises(ValueError, match=f"{name} is an evaluation-only task"):
            get_task(name).sample_train(tmp_path, None, 0)
        with pytest.raises(ValueError, match=f"{name} has only a test split"):
            get_task(name).eval_examples(tmp_path, "val")
    transfer = get_task("truthfulqa:nq_open", **OPTIONS | {"fold": 1})
    assert isinstance(transfer, TransferTask) and transfer.name == "truthfulqa:nq_open"
    assert transfer.train_task.fold == 1 and type(transfer.eval_task) is TASKS["nq_open"]
    with pytest.raises(ValueError, match="nq_open has no training split; the task to train on comes first"):
        get_task("nq_open:truthfulqa")
    with pytest.raises(ValueError, match="unknown task 'truthfulqa:squad'"):
        get_task("truthfulqa:squad")
    write_rows(tmp_path / "ood" / "nq_open" / "test.jsonl", [qa_row("q", ["a"], "b")])
    assert main(["run", "--task", "nq_open", "--data-dir", str(tmp_path), "--output-dir", str(tmp_path / "r")]) == 2
    assert "nq_open is an evaluation-only task" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def transfer_setting(tmp_path: Path) -> tuple[Path, str]:
    """TruthfulQA fold 0 (4 training questions, the same 4 as its test split) and 3 NQ-open rows,
    and a tiny model over their words: (data folder, model folder)."""
    data = tmp_path / "data"
    (data / "truthfulqa").mkdir(parents=True)
    lines = ["Question,Best Answer,Correct Answers,Incorrect Answers"]
    lines += [f"is sky {c} blue,yes it is,yes it is; yes,no it is not" for c in "abcd"]
    for split in ("train", "test"):
        (data / "truthfulqa" / f"fold_0_{split}_seed_42.csv").write_text("\n".join(lines) + "\n")
    write_rows(data / "ood" / "nq_open" / "test.jsonl", [qa_row(f"is {c} red", ["yes"], "no") for c in "xyz"])
    texts = [f"Q: is sky {c} blue\nA:" for c in "abcd"] + [" yes it is.", " no it is not.", " yes."]
    texts += [f"Answer these questions:\n\nQ: is {c} red?\nA:" for c in "xyz"] + [" yes", " no", ".", ","]
    return data, str(tiny_model_folder(tmp_path / "model", texts))


def test_a_transfer_run_trains_on_truthfulqa_and_evaluates_on_nq_open(tmp_path):
    data, model = transfer_setting(tmp_path)
    out = tmp_path / "run"
    command = ["run", "--task", "truthfulqa:nq_open", "--model", model, "--data-dir", str(data), "--output-dir"]
    options = ["--num-heads", "2", "--select-epochs", "1", "--tune-epochs", "1", "--batch-size", "2", "--no-progress"]
    assert main([*command, str(out), *options, "--mixed-precision", "no"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["task"] == "truthfulqa:nq_open" and metrics["test_num_examples"] == 3
    assert metrics["metric_keys"] == ["test_true_false_accuracy", "test_exact_match"]
    assert (out / "adapter").is_dir() and len(metrics["selected_heads"]) == 2


def transfer_grid(tmp_path: Path) -> Path:
    """A tiny ood grid: No-FT, LoFiT and RED trained on TruthfulQA, evaluated on it and on NQ-open."""
    data, model = transfer_setting(tmp_path)
    options = {"model": model, "data_dir": str(data), "num_heads": 2, "select_epochs": 1, "tune_epochs": 1}
    options |= {"red_epochs": 1, "batch_size": 2, "progress": False, "heads_task": "truthfulqa"}
    arms = [
        {"label": "No-FT", "method": "zero-shot"},
        {"label": "LoFiT", "method": "lofit"},
        {"label": "RED", "method": "red"},
    ]
    grid = {"name": "ood-tiny", "description": "d", "tasks": ["truthfulqa", "truthfulqa:nq_open"], "seeds": [1]}
    path = tmp_path / "grid.yaml"
    path.write_text(
        json.dumps(grid | {"report": {"kind": "ood", "baseline": "No-FT"}, "options": options, "arms": arms})
    )
    return path


def test_an_experiment_trains_each_arm_once_and_evaluates_that_adapter_on_every_task(tmp_path, monkeypatch):
    path = transfer_grid(tmp_path)
    trained, evaluated = [], []
    real_cell, real_eval = runner_module.run_cell, runner_module.run_eval
    monkeypatch.setattr(runner_module, "run_cell", lambda c, m: trained.append(c.run.task) or real_cell(c, m))
    monkeypatch.setattr(runner_module, "run_eval", lambda *a, **k: evaluated.append(a[0].task) or real_eval(*a, **k))
    pool = ModelPool()
    folder = tmp_path / "out"
    runner = Runner(load_grid(str(path)), folder, pool=pool, log=lambda _: None)
    cells = runner.test_cells()
    reused_keys = {c.key for c in cells if c.method != "zero-shot" and ":" in c.task}
    assert runner._trainers(cells) == {c.key for c in cells} - reused_keys  # estimated as evaluation only
    records = runner.run()
    by_cell = {(r["label"], r["task"]): r for r in records}
    # each arm that trains does so once, on the first task; its adapter is evaluated on the second
    assert trained == ["truthfulqa"] * 3 + ["truthfulqa:nq_open"]  # the last: No-FT, which trains nothing
    assert evaluated == ["truthfulqa:nq_open"] * 2
    for label in ("LoFiT", "RED"):
        source, reused = by_cell[(label, "truthfulqa")], by_cell[(label, "truthfulqa:nq_open")]
        assert source["trained_by"] is None and reused["trained_by"] == source["key"]
        assert reused["trained_parameters"] == source["trained_parameters"] > 0
        assert reused["metrics"]["num_examples"] == 3 and len(reused["per_example"]) == 3
    assert (
        by_cell[("LoFiT", "truthfulqa:nq_open")]["selected_heads"] == by_cell[("LoFiT", "truthfulqa")]["selected_heads"]
    )
    assert by_cell[("LoFiT", "truthfulqa:nq_open")]["ranking_key"] == by_cell[("LoFiT", "truthfulqa")]["ranking_key"]
    assert by_cell[("No-FT", "truthfulqa:nq_open")]["trained_by"] is None
    # the same scores as training the transfer cell anew (training on CPU is deterministic)
    cell = next(c for c in cells if c.label == "RED" and ":" in c.task)
    config = cell_config(cell, total_heads=8)
    fresh = real_cell(replace(config, run=replace(config.run, output_dir=str(tmp_path / "anew"))), pool)
    assert fresh["test_true_false_accuracy"] == by_cell[("RED", "truthfulqa:nq_open")]["score"]
    predictions = Path(by_cell[("RED", "truthfulqa:nq_open")]["run_folder"]) / "predictions.jsonl"
    assert (tmp_path / "anew" / "predictions.jsonl").read_text() == predictions.read_text()  # every log-probability
    report = write_report(folder).read_text()
    rows = [line for line in report.splitlines() if line.startswith("| truthfulqa:nq_open | RED |")]
    assert len(rows) == 1 and "(evaluation only: another cell trained the adapter)" in rows[0]
    (ranking_row,) = [line for line in report.splitlines() if line.startswith("| truthfulqa | 1 |")]
    own_task = by_cell[("LoFiT", "truthfulqa")]["score"]
    assert ranking_row.endswith(f"| {100 * own_task:.1f}% (1) |")  # the score on its heads' own task only


def test_on_two_workers_the_transfer_cells_wait_for_their_trainer_and_a_failed_trainer_fails_them(
    tmp_path, monkeypatch
):
    path = transfer_grid(tmp_path)
    folder = tmp_path / "out"
    real_cell = runner_module.run_cell

    def red_fails(config, models):
        if config.run.method == "red":
            raise RuntimeError("RED could not train")
        return real_cell(config, models)

    monkeypatch.setattr(runner_module, "run_cell", red_fails)
    Runner(load_grid(str(path)), folder, log=lambda _: None).run()
    failures = {f["label"] + " " + f["task"]: f["error"] for f in read_failures(folder).values()}
    assert sorted(failures) == ["RED truthfulqa", "RED truthfulqa:nq_open"]
    assert "the cell that trains its adapter," in failures["RED truthfulqa:nq_open"]
    assert "RED could not train" in failures["RED truthfulqa:nq_open"]
    monkeypatch.setattr(runner_module, "run_cell", real_cell)
    command = ["experiment", "--grid", str(path), "--output-dir", str(folder), "--workers", "2", "--no-progress"]
    assert main(command) == 0  # the next run retries both, on two workers
    records = {(r["label"], r["task"]): r for r in read_results(folder) if r["phase"] == "test"}
    assert records[("RED", "truthfulqa:nq_open")]["trained_by"] == records[("RED", "truthfulqa")]["key"]
    assert records[("LoFiT", "truthfulqa:nq_open")]["trained_by"] == records[("LoFiT", "truthfulqa")]["key"]
    assert len(records) == 6
    assert [r["trained_by"] for r in read_results(folder) if r["phase"] == "test"].count(None) == 4


def test_mmlu_groups_prompts_and_the_fixed_shuffled_order(tmp_path):
    assert sum(map(len, SUBJECT_GROUPS.values())) == len(GROUP_OF) == 57
    lm_eval = pytest.importorskip("lm_eval")
    folder = Path(lm_eval.__file__).parent / "tasks" / "mmlu" / "default"
    for group, subjects in SUBJECT_GROUPS.items():  # the harness's mmlu_<group> groups
        tagged = {
            p.stem.removeprefix("mmlu_") for p in folder.glob("mmlu_*.yaml") if f"mmlu_{group}_tasks" in p.read_text()
        }
        assert tagged == set(subjects)
    test = [mmlu_row("anatomy", i, i % 4) for i in range(6)] + [mmlu_row("philosophy", i, 0) for i in range(6, 12)]
    write_rows(tmp_path / "ood" / "mmlu" / "test.jsonl", test)
    write_rows(tmp_path / "ood" / "mmlu" / "dev.jsonl", [mmlu_row("anatomy", 100 + i, i % 4) for i in range(5)])
    zero = get_task("mmlu").eval_examples(tmp_path, "test")
    assert [e.choice.prompt for e in zero] == [
        e.choice.prompt for e in get_task("mmlu").eval_examples(tmp_path, "test")
    ]
    assert [e.choice.prompt for e in zero] != sorted(e.choice.prompt for e in zero)  # shuffled, not in file order
    anatomy = next(e for e in zero if e.subject == "anatomy")
    question = anatomy.choice.prompt.split("\n\n")[1]
    assert anatomy.choice.prompt.startswith("The following are multiple choice questions (with answers) about anatomy.")
    assert question.endswith("\nA. c0\nB. c1\nC. c2\nD. c3\nAnswer:") and anatomy.choice.choices == (
        " A",
        " B",
        " C",
        " D",
    )
    with pytest.raises(DataError, match=r"fewer than 5 questions of \['philosophy'\]"):
        get_task("mmlu_5shot").eval_examples(tmp_path, "test")
    write_rows(tmp_path / "ood" / "mmlu" / "test.jsonl", test[:6])
    five = get_task("mmlu_5shot").eval_examples(tmp_path, "test")[0].choice.prompt
    shots = five.split("\n\n")[1:6]
    assert shots[0] == "q100\nA. c0\nB. c1\nC. c2\nD. c3\nAnswer: A" and shots[4].endswith("Answer: A")
    assert shots[1].endswith("Answer: B") and five.count("Answer:") == 6
    cloze = next(e for e in get_task("mmlu_continuation").eval_examples(tmp_path, "test") if e.subject == "anatomy")
    assert cloze.choice.prompt.startswith("The following are questions (with answers) about anatomy.\n\nQuestion: q")
    assert cloze.choice.prompt.endswith("\nAnswer:") and cloze.choice.choices == (" c0", " c1", " c2", " c3")


def test_mmlu_continuation_predicts_by_length_normalised_and_summed_log_probability(tmp_path, monkeypatch):
    """accuracy_norm divides each choice's log-probability by its length in characters (the
    harness's acc_norm), accuracy takes the plain sum; a tie goes to the first choice; the groups
    follow the main (normalised) prediction; mmlu keeps its one accuracy."""
    rows = [
        {"subject": "anatomy", "question": "q0", "choices": ["a", "bbbb", "cc", "d"], "answer": 1},
        {"subject": "philosophy", "question": "q1", "choices": ["a", "bbbb", "cc", "d"], "answer": 0},
    ]
    write_rows(tmp_path / "ood" / "mmlu" / "test.jsonl", rows)
    task = get_task("mmlu_continuation")
    examples = sorted(task.eval_examples(tmp_path, "test"), key=lambda e: e.subject)
    scores = {"q0": [-1.0, -3.5, -5.0, -3.0], "q1": [-2.0, -2.0, -2.5, -6.0]}
    # q0: by sum a (wrong); per character -1, -0.875, -2.5, -3: bbbb (right; with the space counted, a);
    # q1: by sum a, tied with bbbb: the first wins (right); per character -2, -0.5, -1.25, -6: bbbb (wrong)

    def fake_scores(model, tokenizer, choices, progress=True):
        return [scores["q0" if "q0" in c.prompt else "q1"] for c in choices]

    monkeypatch.setattr("lofit.tasks.mmlu.choice_logprobs", fake_scores)
    result = task.evaluate(None, None, examples, progress=False)
    assert list(result.metrics)[:2] == ["accuracy_norm", "accuracy"]
    assert result.metrics["accuracy_norm"] == 0.5 and result.metrics["accuracy"] == 0.5
    assert result.metrics["accuracy_norm_stem"] == 1.0 and result.metrics["accuracy_norm_humanities"] == 0.0
    assert [r["prediction"] for r in result.records] == ["B", "B"]
    assert [r["correct"] for r in result.records] == [True, False]
    assert [r["correct_accuracy"] for r in result.records] == [False, True]
    letters = get_task("mmlu").evaluate(None, None, get_task("mmlu").eval_examples(tmp_path, "test"), progress=False)
    assert set(letters.metrics) == {"accuracy", "accuracy_stem", "accuracy_humanities", "num_examples"}


@needs_data
def test_the_shipped_data_parse_with_the_documented_counts():
    assert len(get_task("nq_open").eval_examples(DATA, "test")) == 3610 - 255
    assert len(get_task("triviaqa").eval_examples(DATA, "test")) == 2000 - 720
    mmlu = get_task("mmlu_5shot").eval_examples(DATA, "test")
    assert len(mmlu) == 14042 and len({e.subject for e in mmlu[:2000]}) == 57


@needs_data
def test_scores_agree_with_lm_evaluation_harness_on_the_same_rows(tmp_path, monkeypatch):
    """lofit's own nq_open, triviaqa, mmlu and mmlu_continuation against lm-eval running the same prompts, stop
    sequences and metrics (a local task file over the same rows), through `lofit eval --harness-tasks`.
    Half the questions get gold answers that are the tiny model's own answer in another case with
    punctuation (and, for NQ, an article) around it, so that exact match is neither 0 nor 1."""
    pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    import lofit.harness

    data = tmp_path / "data"
    files = {name: data / "ood" / name / "test.jsonl" for name in ("nq_open", "triviaqa", "mmlu")}
    for name in ("nq_open", "triviaqa"):
        rows = [json.loads(line) for line in (DATA / "ood" / name / "test.jsonl").read_text().splitlines()[:40]]
        write_rows(files[name], [r for r in rows if not r["false_answer_in_answers"]][:8])
    write_rows(
        files["mmlu"],
        [json.loads(line) for line in (DATA / "ood" / "mmlu" / "test.jsonl").read_text().splitlines()[::1500]],
    )
    texts = []
    for name in ("nq_open", "triviaqa"):
        examples = get_task(name).eval_examples(data, "test")
        texts += [e.prompt for e in examples] + [" " + a for e in examples for a in (*e.answers, e.false_answer)]
    texts += [e.choice.prompt for e in get_task("mmlu").eval_examples(data, "test")] + [
        " A",
        " B",
        " C",
        " D",
        ".",
        ",",
    ]
    texts += [
        e.choice.prompt + choice
        for e in get_task("mmlu_continuation").eval_examples(data, "test")
        for choice in e.choice.choices
    ]
    model = str(tiny_model_folder(tmp_path / "model", texts))

    def lofit_scores(name: str) -> tuple[dict, list[dict]]:
        out = tmp_path / f"lofit-{name}"
        assert main(["eval", "--task", name, "--model", model, "--data-dir", str(data), "--output-dir", str(out),
                     "--mixed-precision", "no", "--no-progress"]) == 0  # fmt: skip
        records = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
        return json.loads((out / "metrics.json").read_text()), records

    for name, article in (("nq_open", "The "), ("triviaqa", "")):
        _, records = lofit_scores(name)
        rows = [json.loads(line) for line in files[name].read_text().splitlines()]
        answered = [i for i, r in enumerate(records) if r["prediction"]]
        assert len(answered) >= 2, "the tiny model should answer some questions"
        for i in answered[::2]:
            rows[i]["answers"] = [rows[i]["answers"][0], f"{article}{records[i]['prediction'].upper()}!"]
        write_rows(files[name], rows)

    ours = {name: lofit_scores(name)[0] for name in ("nq_open", "triviaqa", "mmlu", "mmlu_continuation")}
    assert 0 < ours["nq_open"]["test_exact_match"] < 1 and 0 < ours["triviaqa"]["test_exact_match"] < 1
    tasks = tmp_path / "harness-tasks"
    tasks.mkdir()
    for name, prompt in PROMPTS.items():
        articles = ARTICLES if name == "nq_open" else ""
        (tasks / f"{name}.yaml").write_text(
            GENERATION_TASK.format(name=name, data=files[name], prompt=prompt) + articles
        )
    (tasks / "mmlu.yaml").write_text(MMLU_TASK.format(data=files["mmlu"]))
    (tasks / "mmlu_continuation.yaml").write_text(MMLU_CONTINUATION_TASK.format(data=files["mmlu"]))
    monkeypatch.setattr(lofit.harness, "TaskManager", functools.partial(TaskManager, include_defaults=False))
    out = tmp_path / "harness"
    harness_tasks = "nq_open_local,triviaqa_local,mmlu_local,mmlu_continuation_local"
    assert main(["eval", "--harness-tasks", harness_tasks, "--harness-include", str(tasks),
                 "--model", model, "--output-dir", str(out), "--mixed-precision", "no"]) == 0  # fmt: skip
    harness = json.loads((out / "harness_results.json").read_text())["results"]
    assert harness["nq_open_local"]["exact_match,remove_whitespace"] == pytest.approx(
        ours["nq_open"]["test_exact_match"]
    )
    assert harness["triviaqa_local"]["exact_match,remove_whitespace"] == pytest.approx(
        ours["triviaqa"]["test_exact_match"]
    )
    assert harness["mmlu_local"]["acc,none"] == pytest.approx(ours["mmlu"]["test_accuracy"])
    continuation = ours["mmlu_continuation"]
    assert harness["mmlu_continuation_local"]["acc_norm,none"] == pytest.approx(continuation["test_accuracy_norm"])
    assert harness["mmlu_continuation_local"]["acc,none"] == pytest.approx(continuation["test_accuracy"])
    assert continuation["test_accuracy_norm"] != continuation["test_accuracy"]  # the two predictions differ here


def test_the_ood_grid_trains_on_truthfulqa_evaluates_five_tasks_and_shares_step_1():
    grid = load_grid("ood")
    assert grid.report == {"kind": "ood", "baseline": "No-FT"}
    cells = expand(grid, "test", {})
    assert len(cells) == 5 * 5 * 2 and {c.config["limit"] for c in cells} == {2000}
    for cell in cells:
        task = get_task(cell.task, **OPTIONS)
        assert task.default_train_size is None and (cell.task == "truthfulqa" or task.train_task.name == "truthfulqa")
    lofit_seed_42 = [c for c in cells if c.label == "LoFiT" and c.seed == 42]
    assert len({c.key for c in lofit_seed_42}) == 5 and len({ranking_key(c.config) for c in lofit_seed_42}) == 1


def test_the_ood_report_gives_each_arms_change_against_no_ft_with_a_bootstrap_interval(tmp_path):
    def record(label, task, seed, per_example, metric="true_false_accuracy"):
        score = sum(per_example) / len(per_example)
        return {
            "key": f"{label}-{task}-{seed}",
            "phase": "test",
            "label": label,
            "task": task,
            "seed": seed,
            "method": "zero-shot",
            "point": {},
            "trial": {},
            "options": {},
            "metric": metric,
            "score": score,
            "metrics": {metric: score, "num_examples": len(per_example)},
            "per_example": per_example,
            "seconds": 6.0,
            "experiment": "ood",
            "report": {"kind": "ood", "baseline": "No-FT"},
        }

    rng = random.Random(0)
    base = [float(rng.random() < 0.5) for _ in range(40)]
    append_result(tmp_path, record("No-FT", "truthfulqa", 42, [1.0, 0.0], metric="mc1"))
    for seed in (42, 43):
        append_result(tmp_path, record("No-FT", "truthfulqa:nq_open", seed, base))
        append_result(tmp_path, record("LoFiT", "truthfulqa:nq_open", seed, base))  # no change
        append_result(tmp_path, record("LoRA", "truthfulqa:nq_open", seed, [0.0] * 40))  # loses every right answer
    append_result(tmp_path, record("ITI", "truthfulqa:nq_open", 42, [1.0] * 10))  # scored other examples
    report = write_report(tmp_path).read_text()
    assert "| ITI | missing | 100.0 (not paired: the runs of seeds [42] scored different numbers of examples" in report
    assert "## Out-of-domain change: each arm against No-FT" in report
    assert "| arm | truthfulqa (mc1) | nq_open (true_false_accuracy) |" in report
    assert "| No-FT | **50.0** |" in report
    assert "| LoFiT | missing | " in report and "(+0.0 [+0.0, +0.0], p=1.000)" in report
    drop = 100 * sum(base) / len(base)
    assert f"| LoRA | missing | 0.0 (-{drop:.1f} [" in report
    assert (tmp_path / "out_of_domain.png").stat().st_size > 0
