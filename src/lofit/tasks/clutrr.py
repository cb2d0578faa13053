"""CLUTRR: 2-hop kinship reasoning, SFT on the relation word, exact-match evaluation.

Prompt (the LoFiT paper's), for a story and the query (A, B)::

    Read the following story about a family. "<story>" Assume the relations described in
    the story are all true. Based on relations between the fictional characters in the
    story (assume the relations are all true) and your commonsense knowledge about family
    relationship, how is B related to A? Answer: B is A 's
    <relation>

The prompt ends with the newline; the completion is the relation then EOS, and the
prediction is the first line of the greedy continuation, cut at the first period.
"""

from __future__ import annotations

import ast
from pathlib import Path

from lofit.data.files import DataError, read_json_rows, require_fields
from lofit.tasks.base import GenerationExample, GenerationTask, PromptCompletion

PROMPT_TEMPLATE = (
    'Read the following story about a family. "{story}" Assume the relations described in the story are all true. '
    "Based on relations between the fictional characters in the story (assume the relations are all true) and your "
    "commonsense knowledge about family relationship, how is {second} related to {first}? "
    "Answer: {second} is {first} 's\n"
)
FIELDS = ("clean_story", "query", "target_text")


class Clutrr(GenerationTask):
    name = "clutrr"
    max_new_tokens = 16
    default_train_size = 300

    def _rows(self, data_dir: Path, split: str) -> list[tuple[str, str]]:
        """(prompt, relation) of every row of ``split``; the file is parsed once (:meth:`parsed`)."""
        path = data_dir / "clutrr" / f"{split}.json"
        return [
            (self.prompt(PROMPT_TEMPLATE.format(story=story, first=first, second=second)), relation)
            for story, first, second, relation in self.parsed(path, lambda: _parse(path))
        ]

    def train_examples(self, data_dir: Path) -> list[PromptCompletion]:
        return [PromptCompletion(prompt, relation) for prompt, relation in self._rows(data_dir, "train")]

    def eval_examples(self, data_dir: Path, split: str) -> list[GenerationExample]:
        return [GenerationExample(prompt, (relation,)) for prompt, relation in self._rows(data_dir, split)]

    def parse_answer(self, generated: str) -> str:
        return super().parse_answer(generated).split(".")[0]


def _parse(path: Path) -> list[tuple[str, str, str, str]]:
    """(story, first, second, relation) of every row of ``path``, checked."""
    examples = []
    for number, row in enumerate(read_json_rows(path)):
        require_fields(path, number, row, FIELDS)
        try:
            first, second = (name.strip() for name in ast.literal_eval(row["query"]))
        except (ValueError, SyntaxError, TypeError):
            raise DataError(f"{path} row {number}: query must look like \"('A', 'B')\", got {row['query']!r}") from None
        story = row["clean_story"].replace("[", "").replace("]", "")
        examples.append((story, first, second, row["target_text"]))
    return examples
