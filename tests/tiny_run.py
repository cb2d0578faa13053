"""A tiny checkpoint folder and a tiny task file, for end-to-end runs of the command line."""

from __future__ import annotations

import json
import random
from pathlib import Path

from .conftest import tiny_model, word_tokenizer


def tiny_model_folder(folder: Path, model_type: str = "llama") -> Path:
    """A randomly initialised tiny model with a word-level tokenizer, saved as a checkpoint folder."""
    tiny_model(model_type).save_pretrained(folder)
    word_tokenizer().save_pretrained(folder)
    return folder


def write_task(path: Path, kind: str = "sft", rows: int = 16) -> Path:
    """``rows`` questions over the tokenizer's words: prompt/completion rows (sft) or preferences (dpo)."""
    rng = random.Random(0)
    lines = []
    for _ in range(rows):
        words = " ".join(rng.choice(["sky", "blue", "red", "maybe"]) for _ in range(rng.randrange(1, 5)))
        answer, other = ("yes", "no") if "sky" in words else ("no", "yes")
        prompt = f"Q: {words} A:"
        row = (
            {"prompt": prompt, "completion": f" {answer}"}
            if kind == "sft"
            else {"prompt": prompt, "chosen": f" {answer}", "rejected": f" {other}"}
        )
        lines.append(json.dumps(row) + "\n")
    path.write_text("".join(lines))
    return path
