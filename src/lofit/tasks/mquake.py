"""MQuAKE: multi-hop questions after a counterfactual edit; SFT, greedy exact match.

Prompt (the LoFiT paper's), with the edit written out as a sentence::

    Q: Imagine that <edit prompt> <new target>. <first multi-hop question> A:

The completion is `` <new answer>`` then EOS. A prediction (the first line of the greedy
continuation) is correct when, after lower-casing and stripping, it equals the new answer
or one of its aliases.
"""

from __future__ import annotations

from pathlib import Path

from lofit.data.files import DataError, parse_json, read_text
from lofit.tasks.base import GenerationExample, GenerationTask, PromptCompletion

PROMPT_TEMPLATE = "Q: Imagine that {edit}. {question} A:"


def _read_jsonl(path: Path) -> list[tuple[int, object]]:
    rows = []
    for line_number, line in enumerate(read_text(path).split("\n"), start=1):
        if line.strip():
            rows.append((line_number, parse_json(line, f"{path} line {line_number}")))
    return rows


class MQuAKE(GenerationTask):
    name = "mquake"
    max_new_tokens = 16

    def _rows(self, data_dir: Path, split: str) -> list[tuple[str, list[str]]]:
        """(prompt, answers) of every record of ``split``; the file is parsed once (:meth:`parsed`)."""
        path = data_dir / "mquake" / f"{split}.jsonl"
        return [
            (self.prompt(PROMPT_TEMPLATE.format(edit=edit, question=question)), answers)
            for edit, question, answers in self.parsed(path, lambda: _parse(path))
        ]

    def train_examples(self, data_dir: Path) -> list[PromptCompletion]:
        return [PromptCompletion(prompt, " " + answers[0]) for prompt, answers in self._rows(data_dir, "train")]

    def eval_examples(self, data_dir: Path, split: str) -> list[GenerationExample]:
        return [GenerationExample(prompt, tuple(answers)) for prompt, answers in self._rows(data_dir, split)]


def _parse(path: Path) -> list[tuple[str, str, list[str]]]:
    """(edit, question, answers) of every record of ``path``, checked."""
    examples = []
    for line, row in _read_jsonl(path):
        try:
            rewrite = row["requested_rewrite"][0]
            edit = rewrite["prompt"].format(rewrite["subject"]) + " " + rewrite["target_new"]["str"]
            question = row["questions"][0]
            answers = [row["new_answer"], *row.get("new_answer_alias", [])]
        except (KeyError, IndexError, TypeError) as error:
            raise DataError(f"{path} line {line}: not an MQuAKE record (missing or malformed {error})") from None
        if not all(isinstance(a, str) and a.strip() for a in answers):
            raise DataError(f"{path} line {line}: new_answer and its aliases must be non-empty strings")
        examples.append((edit, question, answers))
    return examples
