"""Property-based tests: whatever bytes a user's files hold, lofit ends in success or in its
documented error (DataError for data files, ValueError for head rankings, AdapterError or
FileNotFoundError for saved results), never another exception, and a refused load leaves
the base model as it was.

Run with ``--hypothesis-show-statistics`` to see how many examples each property tried.
"""

from __future__ import annotations

import csv
import io
import json
import shutil
import tempfile
from collections import Counter
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from lofit.data.files import DataError
from lofit.evaluation.multiple_choice import MultipleChoiceExample
from lofit.methods import FitResult, get_method, load_adapted
from lofit.methods.lofit.adapter_io import AdapterError
from lofit.methods.lofit.ranking import HeadRanking
from lofit.methods.reft import ReftConfig
from lofit.tasks import GenerationExample, PromptCompletion, PromptPreference, get_task

from .conftest import SAVED_METHODS, fitted, tiny_model

FAST = settings(max_examples=100, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
MODEL_LOADS = settings(max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
EXAMPLES = Counter()
"""Examples run per property (``pytest -s`` prints them at the end of the module)."""


@pytest.fixture(scope="module", autouse=True)
def report_examples():
    yield
    print(f"\nhypothesis examples per property: {dict(EXAMPLES)}; total {sum(EXAMPLES.values())}")


# -- strategies ------------------------------------------------------------------------------------------------

scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)
"""Any JSON value, NaN and infinities included (Python's json writes and reads them)."""
texts = st.text(min_size=1, max_size=40) | st.text(min_size=1, max_size=40).map(lambda t: t + "\u2028\x85\r" + t)
"""Non-empty text, often with the line separators that str.splitlines() honours but JSONL does not."""
huge_texts = st.integers(1, 200_000).map(lambda n: "x" * n)
field_values = json_values | texts | huge_texts | st.just("") | st.lists(texts, max_size=4)
FIELDS = ["prompt", "completion", "chosen", "rejected", "choices", "label"]
SCHEMAS = [("prompt", "completion"), ("prompt", "chosen", "rejected"), ("prompt", "choices", "label")]
VALID = {
    "choices": st.lists(texts, min_size=2, max_size=4),
    "label": st.integers(0, 1) | st.sampled_from(["0", "1", 1.0]),
}


@st.composite
def rows(draw, schema: tuple[str, ...] | None = None) -> dict:
    """A row of ``schema`` (or a random one) whose fields are mostly valid, a few of any type
    or missing, plus stray fields; or, now and then, a dictionary of any fields."""
    if schema is None and draw(st.integers(0, 4)) == 0:
        return draw(st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=8), field_values, max_size=6))
    row = {}
    for name in schema or draw(st.sampled_from(SCHEMAS)):
        if draw(st.integers(0, 9)) == 0:
            continue
        row[name] = draw(VALID.get(name, texts) if draw(st.integers(0, 7)) else field_values)
    row.update(draw(st.dictionaries(st.text(max_size=8), field_values, max_size=2)))
    return row


@st.composite
def jsonl_lines(draw) -> list:
    """The lines of a JSONL file: mostly rows of one schema, else a mix of rows and other JSON values or text."""
    if draw(st.integers(0, 3)) == 0:
        return draw(st.lists(rows() | json_values | st.text(max_size=30), max_size=6))
    return draw(st.lists(rows(draw(st.sampled_from(SCHEMAS))), min_size=1, max_size=5))


@st.composite
def csv_tables(draw) -> list[list[str]]:
    """A header (a schema's columns, sometimes with a stray or missing one) and rows of cells:
    valid text, JSON arrays of choices, labels, empty or huge cells, too few or too many."""
    header = list(draw(st.sampled_from(SCHEMAS)))
    if draw(st.booleans()):
        header = draw(st.permutations(header + [draw(st.text(max_size=6))]))[: draw(st.integers(1, len(header) + 1))]
    odd_cell = st.sampled_from(["0", "1", "", "x"]) | huge_texts
    valid_cell = {
        "choices": st.lists(texts, min_size=2, max_size=3).map(json.dumps),
        "label": st.sampled_from(["0", "1"]),
    }
    table = [header]
    for _ in range(draw(st.integers(0, 4))):
        row = [draw(valid_cell.get(name, texts) if draw(st.integers(0, 5)) else odd_cell) for name in header]
        if draw(st.integers(0, 5)) == 0:
            row = row[:-1] if draw(st.booleans()) else row + [draw(texts)]
        table.append(row)
    return table


def encode(text: str, bom: bool, bad_bytes: bytes, at: int) -> bytes:
    """``text`` as UTF-8, with a byte-order mark and with ``bad_bytes`` (not UTF-8) spliced in at ``at``."""
    data = ("\ufeff" if bom else "").encode() + text.encode()
    at = min(at, len(data))
    return data[:at] + bad_bytes + data[at:]


damage = st.tuples(
    st.booleans(), st.sampled_from([b""] * 8 + [b"\xff", b"\xc3(", b"\x80\x80", b"\x00"]), st.integers(0, 10_000)
)
"""(a byte-order mark?, bytes that are not UTF-8 or a NUL (often none), where to put them)."""


def jsonl_text(lines: list, separator: str) -> str:
    return separator.join(line if isinstance(line, str) else json.dumps(line, ensure_ascii=False) for line in lines)


def csv_text(table: list[list[str]]) -> str:
    buffer = io.StringIO(newline="")
    csv.writer(buffer).writerows(table)
    return buffer.getvalue()


# -- data files ---------------------------------------------------------------------------------------------------


def load_examples(data: bytes, suffix: str) -> list:
    """Write ``data`` to a user file and load its training and evaluation examples the way
    the CLI does; only DataError may come out."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"train{suffix}"
        path.write_bytes(data)
        task = get_task(str(path))
        loaded = []
        for load in (task.train_examples, task.eval_examples):
            try:
                loaded.append(load())
                event(f"{load.__name__}: loaded")
            except DataError as error:
                assert str(path) in str(error)
                event(f"{load.__name__}: DataError")
        return loaded


def assert_well_formed(examples: list) -> None:
    for example in examples:
        assert isinstance(example, (PromptCompletion, PromptPreference, GenerationExample, MultipleChoiceExample))
        if isinstance(example, MultipleChoiceExample):
            assert len(example.choices) >= 2 and sum(example.labels) == 1 and example.labels[example.best] == 1


@FAST
@given(lines=jsonl_lines(), separator=st.sampled_from(["\n", "\r\n"]), damaged=damage)
def test_any_jsonl_file_loads_or_raises_a_data_error(lines, separator, damaged):
    EXAMPLES["jsonl files"] += 1
    for examples in load_examples(encode(jsonl_text(lines, separator), *damaged), ".jsonl"):
        assert_well_formed(examples)


@FAST
@given(
    table=csv_tables() | st.lists(st.lists(st.sampled_from(FIELDS) | st.text(max_size=20), max_size=5), max_size=5),
    damaged=damage,
)
def test_any_csv_file_loads_or_raises_a_data_error(table, damaged):
    EXAMPLES["csv files"] += 1
    for examples in load_examples(encode(csv_text(table), *damaged), ".csv"):
        assert_well_formed(examples)


@FAST
@given(data=st.binary(max_size=300), suffix=st.sampled_from([".jsonl", ".csv"]))
def test_random_bytes_as_a_data_file_raise_a_data_error_or_load(data, suffix):
    EXAMPLES["random bytes as data"] += 1
    for examples in load_examples(data, suffix):
        assert_well_formed(examples)


@FAST
@given(pairs=st.lists(st.tuples(texts, texts), min_size=1, max_size=5), bom=st.booleans(), as_csv=st.booleans())
def test_valid_sft_rows_of_any_text_load_back_exactly(pairs, bom, as_csv):
    EXAMPLES["valid rows round trip"] += 1
    if as_csv:
        text = csv_text([["prompt", "completion"], *pairs])
    else:
        text = jsonl_text([{"prompt": p, "completion": c} for p, c in pairs], "\n")
    train, evaluation = load_examples(encode(text, bom, b"", 0), ".csv" if as_csv else ".jsonl")
    assert train == [PromptCompletion(p, c) for p, c in pairs]
    assert evaluation == [GenerationExample(p, (c,)) for p, c in pairs]


# -- head rankings ----------------------------------------------------------------------------------------------


def ranking_json(num_layers: int, num_heads: int) -> dict:
    return HeadRanking.from_scores(
        torch.rand(num_layers, num_heads, generator=torch.Generator().manual_seed(0))
    ).to_json()


@st.composite
def rankings(draw) -> object:
    """A saved ranking with one random change, or any JSON value."""
    if draw(st.booleans()):
        return draw(json_values)
    data = ranking_json(draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    where = draw(st.sampled_from(["num_layers", "num_heads", "ranking", "entry", "entry field", "nothing"]))
    if where in ("num_layers", "num_heads", "ranking"):
        data[where] = draw(json_values | st.integers(-3, 10))
    elif where == "entry":
        data["ranking"][draw(st.integers(0, len(data["ranking"]) - 1))] = draw(json_values)
    elif where == "entry field":
        entry = data["ranking"][draw(st.integers(0, len(data["ranking"]) - 1))]
        entry[draw(st.sampled_from(["layer", "head", "score", "rank"]))] = draw(json_values | st.integers(-5, 5))
    return data


@FAST
@given(data=rankings(), raw=st.none() | st.binary(max_size=100))
def test_any_head_ranking_file_loads_or_raises_a_value_error(data, raw):
    EXAMPLES["head ranking files"] += 1
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "head_ranking.json"
        path.write_bytes(raw if raw is not None else json.dumps(data).encode())
        try:
            ranking = HeadRanking.load(path)
        except ValueError as error:
            assert str(path) in str(error)
            event("ValueError")
            return
    event("loaded")
    num_layers, num_heads = ranking.scores.shape
    assert sorted(ranking.order) == [(layer, head) for layer in range(num_layers) for head in range(num_heads)]


# -- saved adapters -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, Path]:
    """One saved result per method, for the llama tiny model."""
    folders = {}
    for name in SAVED_METHODS:
        folders[name] = tmp_path_factory.mktemp(name)
        method = get_method(name, ReftConfig(reft_rank=2) if name == "reft" else None)
        method.save(FitResult(fitted(name, tiny_model("llama")), 1), folders[name])
    return folders


def model_state(model) -> tuple:
    return (
        [(name, p.requires_grad) for name, p in model.named_parameters()],
        [type(m).__name__ for m in model.modules()],
        sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()),
    )


def load_damaged(source: Path, damage) -> None:
    """Copy ``source``, apply ``damage`` to the copy, load it; only the documented errors may
    come out, and a refused load leaves the model as it was."""
    with tempfile.TemporaryDirectory() as folder:
        directory = Path(folder) / "saved"
        shutil.copytree(source, directory)
        damage(directory)
        model = tiny_model("llama")
        before = model_state(model)
        try:
            load_adapted(model, directory)
            event("loaded")
        except (AdapterError, FileNotFoundError) as error:
            assert str(directory) in str(error)
            assert model_state(model) == before
            event(type(error).__name__)


def mutated(record: dict, path: list[str], value: object, delete: bool) -> dict:
    """``record`` with the key at ``path`` replaced by ``value`` (or deleted)."""
    copy = json.loads(json.dumps(record))
    *parents, leaf = path
    target = copy
    for key in parents:  # the saved files hold these nested objects
        target = target[key]
    if delete:
        target.pop(leaf, None)
    else:
        target[leaf] = value
    return copy


def config_edits(file_name: str, keys: list[str]):
    """Changes to ``file_name``: a random JSON value for the whole file, or for one key (nested
    keys as "a.b"), or the key deleted."""
    whole = json_values.map(lambda value: (None, value, False))
    one_key = st.tuples(st.sampled_from(keys).map(lambda k: k.split(".")), json_values, st.booleans())
    return (whole | one_key).map(lambda edit: (file_name, *edit))


LOFIT_KEYS = [
    "model_type",
    "num_layers",
    "num_heads",
    "head_dim",
    "lofit_config",
    "selected_heads",
    "lofit_config.num_heads",
    "lofit_config.heads",
    "lofit_config.heads_file",
    "lofit_config.seed",
    "lofit_config.bias_lr",
    "lofit_config.batch_size",
    "lofit_config.unknown",
]
METHOD_KEYS = [
    "method",
    "model_type",
    "num_layers",
    "hidden_size",
    "num_attention_heads",
    "num_key_value_heads",
    "options",
    "options.reft_rank",
    "options.reft_layers",
    "options.reft_positions",
    "options.reft_lr",
]
PEFT_KEYS = ["peft_type", "r", "lora_alpha", "target_modules", "task_type", "bias", "lora_dropout", "fan_in_fan_out"]


RECORD = "lofit_method.json"
"""The metadata record the method-file edits target (adapter_config.json for LoFiT and ITI, which have no other)."""


def apply_edit(directory: Path, edit: tuple) -> None:
    file_name, path, value, delete = edit
    target = directory / file_name
    if file_name == RECORD and not target.is_file():  # a per-head adapter's one record
        target = directory / "adapter_config.json"
    if path is None:
        target.write_text(json.dumps(value))
    else:
        target.write_text(json.dumps(mutated(json.loads(target.read_text()), path, value, delete)))


@MODEL_LOADS
@given(name=st.sampled_from(SAVED_METHODS), edit=config_edits(RECORD, METHOD_KEYS))
def test_any_method_file_loads_or_raises_an_adapter_error(saved, name, edit):
    EXAMPLES["lofit_method.json edits"] += 1
    load_damaged(saved[name], lambda directory: apply_edit(directory, edit))


@MODEL_LOADS
@given(edit=config_edits("adapter_config.json", LOFIT_KEYS))
def test_any_lofit_adapter_config_loads_or_raises_an_adapter_error(saved, edit):
    EXAMPLES["adapter_config.json edits (lofit)"] += 1
    load_damaged(saved["lofit"], lambda directory: apply_edit(directory, edit))


@MODEL_LOADS
@given(edit=config_edits("adapter_config.json", PEFT_KEYS))
def test_any_lora_adapter_config_loads_or_raises_an_adapter_error(saved, edit):
    EXAMPLES["adapter_config.json edits (lora)"] += 1
    load_damaged(saved["lora"], lambda directory: apply_edit(directory, edit))


WEIGHT_FILES = {
    "lofit": "adapter_model.safetensors",
    "iti": "adapter_model.safetensors",
    "lora": "adapter_model.safetensors",
    "repe": "repe_shift.safetensors",
    "red": "red.safetensors",
    "reft": "reft.safetensors",
}
DTYPES = [
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.float64,
    torch.int64,
    torch.int32,
    torch.bool,
    torch.uint8,
]


@st.composite
def weight_damage(draw):
    """A function damaging a weights file: random bytes, truncation, a flipped byte, or tensors
    with random names, dtypes, shapes and values."""
    kind = draw(st.sampled_from(["random bytes", "truncate", "flip", "tensors"]))
    if kind == "random bytes":
        data = draw(st.binary(max_size=200))
        return lambda path: path.write_bytes(data)
    if kind in ("truncate", "flip"):
        at, byte = draw(st.integers(0, 10**6)), draw(st.integers(0, 255))

        def edit(path: Path) -> None:
            data = bytearray(path.read_bytes())
            index = at % len(data)
            if kind == "truncate":
                del data[index:]
            else:
                data[index] ^= byte or 1
            path.write_bytes(bytes(data))

        return edit
    keep = draw(st.booleans())
    extra = draw(
        st.dictionaries(
            st.text(min_size=1, max_size=8),
            st.tuples(
                st.sampled_from(DTYPES),
                st.lists(st.integers(0, 4), max_size=3),
                st.sampled_from([0.0, 1.0, float("nan"), float("inf")]),
            ),
            max_size=3,
        )
    )

    def rewrite(path: Path) -> None:
        from safetensors.torch import load_file, save_file

        tensors = load_file(str(path)) if keep else {}
        for name, (dtype, shape, value) in extra.items():
            tensors[name] = (
                torch.full(shape, value).to(dtype) if dtype.is_floating_point else torch.zeros(shape, dtype=dtype)
            )
        save_file(tensors, str(path))

    return rewrite


@MODEL_LOADS
@given(name=st.sampled_from(SAVED_METHODS), damage=weight_damage())
def test_any_weights_file_loads_or_raises_an_adapter_error(saved, name, damage):
    EXAMPLES["weights files"] += 1
    load_damaged(saved[name], lambda directory: damage(directory / WEIGHT_FILES[name]))


# -- YAML configs ----------------------------------------------------------------------------------------------

OPTION_NAMES = [
    "bias_lr",
    "num_heads",
    "batch_size",
    "heads",
    "fold",
    "limit",
    "device",
    "dtype",
    "mixed_precision",
    "gradient_accumulation_steps",
    "save_steps",
    "resume",
    "reft_rank",
    "lora_rank",
    "method",
    "task",
    "unknown",
]
yaml_values = (
    st.none()
    | st.booleans()
    | st.integers(-(10**30), 10**30)
    | st.floats()
    | st.text(max_size=12)
    | st.lists(st.integers(), max_size=3)
)
yaml_configs = st.dictionaries(st.sampled_from(OPTION_NAMES), yaml_values, max_size=6) | st.dictionaries(
    st.sampled_from(["run", "lofit", "compute", "method_options"]),
    st.dictionaries(st.sampled_from(OPTION_NAMES), yaml_values, max_size=4),
    max_size=3,
)


@FAST
@given(config=yaml_configs, raw=st.binary(max_size=60), use_raw=st.booleans())
def test_any_yaml_config_builds_options_or_raises_an_options_error(config, raw, use_raw):
    import yaml

    from lofit.cli import OptionsError, _configs, build_parser

    EXAMPLES["yaml configs"] += 1
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "config.yaml"
        if use_raw:
            path.write_bytes(raw)
        else:
            path.write_text(yaml.safe_dump(config))
        try:
            _configs(build_parser().parse_args(["run", "--config", str(path)]))
            event("accepted")
        except OptionsError:
            event("refused")
