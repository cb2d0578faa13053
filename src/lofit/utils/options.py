"""Option values into config dataclasses: the one conversion shared by the command line,
``--config`` files and experiment grids.

A value is converted to its field's type (YAML reads ``5e-2`` as a string: it becomes
0.05 for a float field); ``None`` only where the field allows it; booleans must be booleans.

Groups of options are declared on the fields themselves, as metadata read by
:func:`option_group`: ``"resume": "may change"`` (may differ when a run is resumed),
``"hashed": False`` (does not change what is computed, only where, how fast or how verbosely: left
out of an experiment cell's key; like the thread count, compiling may still round floats differently),
``"hashed": "when set"`` (left out of the key while ``None``: an option added later keeps the
keys of the cells that do not set it), ``"step": 2`` (read by LoFiT's step 2 only: cells
differing in it share one step-1 ranking) and ``"evaluation": True`` (shapes only the
evaluation: cells differing in it share one trained adapter). ``"read_when": {OTHER: VALUE}``
(read only by runs whose option OTHER is VALUE: left out of the other runs' keys, and free to
differ when they resume) is read by :func:`unread_options`.
"""

from __future__ import annotations

import functools
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import MISSING, fields
from typing import Any


class OptionsError(ValueError):
    """Options that cannot run, one problem per line; refused before anything loads or is written."""

    def __init__(self, problems: list[str]):
        super().__init__("\n".join(problems))
        self.problems = problems


@functools.cache
def _type_hints(cls: type) -> dict[str, Any]:
    """``typing.get_type_hints(cls)``, resolved once per class (an experiment grid builds configs
    for every cell, and resolving the hints is most of that time); not to be mutated."""
    return typing.get_type_hints(cls)


def field_type(cls: type, name: str) -> type:
    """The type of ``cls``'s field ``name``, with ``| None`` removed."""
    hint = _type_hints(cls)[name]
    if isinstance(hint, types.UnionType):
        hint = next(arg for arg in typing.get_args(hint) if arg is not type(None))
    return hint


def build_config(cls: type, values: dict[str, Any]) -> Any:
    """``cls`` from the entries of ``values`` that name its fields, each converted to the
    field's type; a ValueError naming the option when a value does not convert."""
    names = {f.name for f in fields(cls)}
    converted = {}
    for name, value in values.items():
        if name in names:
            kind = field_type(cls, name)
            if value is None and type(None) not in typing.get_args(_type_hints(cls)[name]):
                raise ValueError(f"option {name} must be of type {kind.__name__}, got None")
            if kind is bool and not isinstance(value, bool):
                raise ValueError(f"option {name} must be true or false, got {value!r}")
            try:
                converted[name] = value if value is None or isinstance(value, kind) else kind(value)
            except (TypeError, ValueError, OverflowError):
                raise ValueError(f"option {name} must be of type {kind.__name__}, got {value!r}") from None
    return cls(**converted)


def option_group(classes: Iterable[type], key: str, value: Any) -> frozenset[str]:
    """The names of the fields of ``classes`` whose metadata maps ``key`` to ``value``."""
    return frozenset(f.name for cls in classes for f in fields(cls) if f.metadata.get(key) == value)


def unread_options(classes: Iterable[type], options: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The fields of ``classes`` that a run with ``options`` does not read, each with the condition
    under which it would: every field whose metadata ``"read_when": {OTHER: VALUE}`` names a value
    that ``options`` do not give OTHER (an OTHER missing from ``options`` counts at its field's
    default). OTHER must be a field of ``classes`` with a default: a ValueError otherwise."""
    declared = [f for cls in classes for f in fields(cls)]
    defaults = {f.name: f.default for f in declared if f.default is not MISSING}
    unread = {}
    for f in declared:
        condition = f.metadata.get("read_when", {})
        undeclared = [other for other in condition if other not in defaults]
        if undeclared:
            raise ValueError(
                f"{f.name} is read under {', '.join(undeclared)}, which no field of these configs declares"
            )
        if any(options.get(other, defaults[other]) != value for other, value in condition.items()):
            unread[f.name] = condition
    return unread
