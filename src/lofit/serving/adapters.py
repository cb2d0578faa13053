"""The adapters a server holds: one stacked table per kind of edit, read row by row through an index.

A batch may give each of its rows another adapter. Every mixable kind of edit keeps the numbers
of all loaded adapters in one float32 table per tensor (its first dimension: table rows; row 0
is all zeros and means "no edit"); an adapter owns some rows, freed when it is unloaded and
reused by the next. Before a batch runs, the numbers of each batch row's adapter are gathered
from the tables by index, for all rows at once, and the serving hooks apply them inside the
same forward pass (no forward pass per adapter, no copy of the model):

- ``heads`` (LoFiT, ITI: a :class:`~lofit.methods.lofit.model.LofitModel`): an adapter's K
  active heads take K rows of the (rows, D) tables v and, when its A is not all zero, A, and
  keep their (layer, head) pairs. For a batch, the rows are scattered into dense (B, L, H, D)
  tensors A_b and v_b (zero for heads an adapter does not use, and for rows of the base model
  or of other kinds); a pre-hook on layer l's attention output projection rewrites batch row b
  as z' = z + z * A_b[b, l] + v_b[b, l] (= (1 + A) z + v; the product is left out when no row
  of the batch has an A, which changes no bit: z * 0 adds a zero), in the activation's dtype:
  the arithmetic of :class:`~lofit.methods.lofit.intervention.HeadIntervention`. The server
  holds K x D numbers per stored tensor, as the adapter file does.
- ``feed_forward`` (RED: :class:`~lofit.methods.red.RedModel`): one row of the (rows, L, hidden)
  tables s and b per adapter; layer l's feed-forward output of batch row b becomes
  f' = f + f * s[r_b, l] + b[r_b, l], gathered at every step by the batch's row index r.
- ``residual`` (RepE: :class:`~lofit.methods.repe.ResidualShiftModel`): one row of the table
  shift (rows, L, hidden); decoder layer l's output becomes r' = r + shift[r_b, l].

- ``lora`` (LoRA, a peft model): every loaded LoRA is an adapter of one peft model over the
  base model (:class:`~lofit.serving.lora.LoraStack`), and each forward pass of a batch names
  each row's LoRA (``"__base__"`` for the rows of other kinds): peft's mixed-adapter batches.

A zero-shot result is the base model. Any other method (LoReFT), and a LoRA that peft's mixed
batches cannot serve (:func:`~lofit.serving.lora.mixing_refusal`: DoRA, for one; the reason is
logged and kept as the adapter's ``exclusive_reason``), is ``exclusive``: its requests run in
batches of their own, with the result applied to the base model
(:func:`lofit.methods.load_adapted`, with the LoRA stack detached) for that batch and removed
after. LoReFT cannot mix: it rewrites the hidden states of chosen token positions of each
sequence through its own intervention modules, which hold one adapter's numbers and have no
per-row form.

Every adapter is read with :func:`lofit.methods.load_adapted` (all of its files checked, the
geometry compared) onto the base model (the LoRA stack detached), its numbers copied into the
tables or the LoRA stack, and the wrapper removed again; one whose recorded base-model
fingerprint differs from the served model's is refused (:class:`AdapterMismatchError`) rather than merely warned about.

Thread safety: the names (``resolve``, ``remove``, ``release``) are guarded by a lock and may be
used from any thread; everything that touches the model or the tables (``add``, ``collect``,
``set_rows``, ``generate``) runs in the engine's one worker thread (or before it starts). An
adapter removed while requests still use it keeps its rows (or its LoRA) until the last of
them is released.
"""

from __future__ import annotations

import contextlib
import logging
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from torch import nn
from transformers import PreTrainedModel

from lofit.methods import load_adapted, saved_method
from lofit.methods.base import METHOD_FILE, read_method_file
from lofit.methods.lofit.adapter_io import CONFIG_NAME, AdapterError, AdapterMismatchError, read_adapter_config
from lofit.methods.lofit.model import LofitModel
from lofit.methods.red import RedModel
from lofit.methods.repe import ResidualShiftModel
from lofit.models.architectures import decoder_layers, feed_forwards, head_layout
from lofit.models.identity import FINGERPRINT_KEY, NAME_KEY, base_model_name, fingerprint
from lofit.models.wrapper import hidden_states_of, replace_hidden_states
from lofit.serving.lora import BASE_ROW, LoraStack, SavedLora, mixing_refusal, read_lora

LOG = logging.getLogger("lofit.serving")

BASE_ALIAS = "base"
"""The model name that always means the base model, besides the base model's own name."""
MIXABLE_KINDS = ("heads", "feed_forward", "residual")
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
"""An adapter's name: 1 to 64 letters, digits, ``.``, ``_`` or ``-``, starting with a letter or digit."""


class AdapterNameError(ValueError):
    """A name that is not allowed (pattern, a base-model alias)."""


class AdapterNameTakenError(AdapterNameError):
    """An adapter of that name is loaded already."""


@dataclass(eq=False)
class Adapter:
    """One loaded adapter: its name, the method that saved it, how it is served (``kind``: a
    mixable kind, ``"lora"``, ``"base"`` or ``"exclusive"``), where it was loaded from, its rows
    in its kind's tables (by tensor name), its (layer, head) pairs (``heads`` kind), its peft
    adapter name (``lora`` kind), why it is exclusive when it is a LoRA that cannot mix, and
    its own numbers (element count and bytes: what it holds, as its file does)."""

    name: str
    method: str
    kind: str
    folder: Path
    source: str
    rows: dict[str, torch.Tensor] = field(default_factory=dict)
    heads: torch.Tensor | None = None
    lora: str | None = None
    exclusive_reason: str | None = None
    numbers: int = 0
    nbytes: int = 0
    created: int = field(default_factory=lambda: int(time.time()))
    in_flight: int = 0
    removed: bool = False


class StackedTable:
    """The tables of one mixable kind: for each tensor name a float32 (capacity, *row_shape)
    tensor on the model's device, whose row 0 stays zero, and its free rows. Rows freed by
    unloaded adapters are reused; when too few are free the capacity grows by half (at least
    by what is needed)."""

    def __init__(self, row_shapes: dict[str, tuple[int, ...]], device: torch.device):
        self.tensors = {name: torch.zeros((1, *shape), device=device) for name, shape in row_shapes.items()}
        self.free: dict[str, list[int]] = {name: [] for name in row_shapes}

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def add(self, values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Store ``values`` (name -> (n, *row_shape)) in free rows; the rows taken, by name."""
        taken = {}
        for name, rows in values.items():
            tensor, free = self.tensors[name], self.free[name]
            if len(free) < len(rows):
                old = tensor.shape[0]
                new = old + max(len(rows) - len(free), old // 2)
                grown = torch.zeros((new, *tensor.shape[1:]), device=tensor.device)
                grown[:old] = tensor
                self.tensors[name] = tensor = grown
                free.extend(range(old, new))
            index = torch.tensor(free[: len(rows)], dtype=torch.long, device=tensor.device)
            del free[: len(rows)]
            tensor[index] = rows.to(tensor)
            taken[name] = index
        return taken

    def release(self, taken: dict[str, torch.Tensor]) -> None:
        for name, index in taken.items():
            self.tensors[name][index] = 0
            self.free[name] = sorted(self.free[name] + index.tolist())


class AdapterRegistry:
    """The base model, its serving hooks, the stacked tables and the adapters by name (see the module docstring)."""

    def __init__(self, model: PreTrainedModel, adapters_dir: Path | None = None):
        self.model = model
        self.adapters_dir = adapters_dir.resolve() if adapters_dir is not None else None
        self.base_name = base_model_name(model) or BASE_ALIAS
        self.fingerprint = fingerprint(model)
        self.base = Adapter(self.base_name, "zero-shot", "base", Path("."), self.base_name)
        self.tables: dict[str, StackedTable] = {}
        self.lora = LoraStack(model)
        self._lora_rows: list[str] = []
        self.head_shape: tuple[int, int, int] = (0, 0, 0)  # (L, H, D), set with the heads table
        self._batch: dict[str, dict[str, torch.Tensor] | None] = dict.fromkeys(MIXABLE_KINDS)
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []
        self._by_name: dict[str, Adapter] = {}
        self._retired: list[Adapter] = []
        self._lock = threading.Lock()

    # -- names (any thread) -------------------------------------------------------------------
    def is_base(self, name: str) -> bool:
        return name in (BASE_ALIAS, self.base_name)

    def names(self) -> list[Adapter]:
        with self._lock:
            return list(self._by_name.values())

    def resolve(self, name: str) -> Adapter:
        """The adapter called ``name`` (the base for its aliases), counted as used until
        :meth:`release`; KeyError when none is loaded under that name."""
        with self._lock:
            adapter = self.base if self.is_base(name) else self._by_name[name]
            adapter.in_flight += 1
            return adapter

    def remove(self, name: str) -> Adapter:
        """Unload ``name``: new requests no longer find it; requests using it finish with it
        (its rows are freed by :meth:`collect` once the last of them is released). KeyError when unknown."""
        with self._lock:
            adapter = self._by_name.pop(name)
            adapter.removed = True
            self._retired.append(adapter)
        return adapter

    def release(self, adapter: Adapter) -> None:
        """A request using ``adapter`` is over."""
        with self._lock:
            adapter.in_flight -= 1

    def check_name(self, name: str) -> None:
        """AdapterNameError unless ``name`` may name a new adapter."""
        if not NAME_PATTERN.fullmatch(name):
            raise AdapterNameError(
                f"adapter name {name[:80]!r} is not allowed: use 1-64 letters, digits, '.', '_' or '-', "
                "starting with a letter or digit"
            )
        if self.is_base(name):
            raise AdapterNameError(f"{name!r} names the base model; choose another adapter name")
        with self._lock:
            if name in self._by_name:
                raise AdapterNameTakenError(f"an adapter called {name!r} is already loaded; unload it first")

    # -- the model and the tables (the worker thread) -------------------------------------------
    def collect(self) -> None:
        """Free the rows of removed adapters that no request uses any more."""
        with self._lock:
            idle = [adapter for adapter in self._retired if adapter.in_flight == 0]
            self._retired = [adapter for adapter in self._retired if adapter.in_flight > 0]
        for adapter in idle:
            self._free(adapter)

    def _free(self, adapter: Adapter) -> None:
        if adapter.rows:
            self.tables[adapter.kind].release(adapter.rows)
            adapter.rows = {}
        if adapter.lora is not None:
            self.lora.remove(adapter.lora)
            adapter.lora = None

    def add(self, name: str, folder: Path, source: str) -> Adapter:
        """Read the result saved in ``folder`` (see the module docstring), enter it under
        ``name``: a table kind's numbers go into its tables, a LoRA that can mix into the LoRA
        stack, and a LoRA that cannot is exclusive, with the reason logged and kept. Refused,
        with the reason: a taken or invalid name (AdapterNameError), a result made for another
        model (AdapterMismatchError: geometry or fingerprint), a broken one, or a LoRA that peft
        will not add beside the loaded ones (AdapterError), nothing saved there (FileNotFoundError)."""
        self.check_name(name)
        self.collect()
        method = saved_method(folder)
        lora: SavedLora | None = None
        reason: str | None = None  # why a LoRA cannot mix
        with self.lora.detached():
            wrapped = load_adapted(self.model, folder)  # the geometry first: the more basic mismatch
            try:
                self._check_fingerprint(folder)
                kind, values, heads = self._tables_of(wrapped)
                if isinstance(wrapped, PeftModel):
                    reason = mixing_refusal(wrapped)
                    if reason is None:
                        kind, lora = "lora", read_lora(wrapped)
                    else:
                        LOG.warning("LoRA adapter %s is served in batches of its own: %s", name, reason)
            finally:
                if wrapped is not self.model:
                    wrapped.unload()
            if values:  # the hooks go on the base model's own modules, never on peft's LoRA layers
                self._ensure_table(kind, {key: tuple(v.shape[1:]) for key, v in values.items()})
        adapter = Adapter(name, method, kind, folder, source, heads=heads, exclusive_reason=reason)
        if values:
            adapter.numbers = sum(v.numel() for v in values.values())
            adapter.nbytes = 4 * adapter.numbers
            adapter.rows = self.tables[kind].add(values)
        if lora is not None:
            try:
                adapter.lora = self.lora.add(lora)
            except (ValueError, TypeError, KeyError, RuntimeError) as error:
                raise AdapterError(f"{folder}: peft could not add this LoRA beside the loaded ones ({error})") from None
            adapter.numbers, adapter.nbytes = lora.numbers, lora.nbytes
        with self._lock:
            if name in self._by_name:  # a concurrent add of the same name won the race
                self._free(adapter)
                raise AdapterNameTakenError(f"an adapter called {name!r} is already loaded; unload it first")
            self._by_name[name] = adapter
        return adapter

    def _check_fingerprint(self, folder: Path) -> None:
        if (folder / METHOD_FILE).is_file():
            record, path = read_method_file(folder), folder / METHOD_FILE
        elif (folder / CONFIG_NAME).is_file():
            record, path = read_adapter_config(folder), folder / CONFIG_NAME
        else:
            return
        saved = record.get(FINGERPRINT_KEY)
        if isinstance(saved, str) and saved != self.fingerprint:
            raise AdapterMismatchError(
                f"{path.name}: this result was made for {record.get(NAME_KEY) or 'an unnamed model'!r} "
                f"(fingerprint {saved}), not for the served model {self.base_name!r} (fingerprint "
                f"{self.fingerprint}): same shape, other weights"
            )

    def _tables_of(self, wrapped: nn.Module) -> tuple[str, dict[str, torch.Tensor], torch.Tensor | None]:
        """How ``wrapped`` (the base model with a result applied) is served, its table rows by
        tensor name, and its (layer, head) pairs (``heads`` kind only)."""
        if wrapped is self.model:
            return "base", {}, None
        with torch.no_grad():
            if isinstance(wrapped, LofitModel):
                heads = wrapped.active_heads.nonzero().cpu()  # (K, 2): what A and v act on
                layers, indices = heads.T
                values = {"bias": wrapped.lofit_bias[layers, indices].float().cpu()}
                scale = wrapped.lofit_scale[layers, indices].float().cpu()
                if scale.any():
                    values["scale"] = scale
                return "heads", values, heads
            if isinstance(wrapped, RedModel):
                scale, bias = wrapped.red_scale.float().cpu(), wrapped.red_bias.float().cpu()
                return "feed_forward", {"scale": scale[None], "bias": bias[None]}, None
            if isinstance(wrapped, ResidualShiftModel):
                return "residual", {"shift": wrapped.shift.float().cpu()[None]}, None
        return "exclusive", {}, None

    def _ensure_table(self, kind: str, row_shapes: dict[str, tuple[int, ...]]) -> None:
        if kind in self.tables:
            return
        device = self.model.get_input_embeddings().weight.device
        if kind == "heads":  # A's rows too: a later adapter may have an A
            row_shapes = {"scale": row_shapes["bias"], "bias": row_shapes["bias"]}
        self.tables[kind] = StackedTable(row_shapes, device)
        if kind == "heads":
            layout = head_layout(self.model)
            self.head_shape = layout.shape
            for layer, proj in enumerate(layout.out_projs):
                hook = _HeadsHook(self, layer, layout.num_heads, layout.head_dim)
                self._hooks.append(proj.register_forward_pre_hook(hook))
        else:
            modules = feed_forwards(self.model) if kind == "feed_forward" else decoder_layers(self.model)
            for layer, module in enumerate(modules):
                self._hooks.append(module.register_forward_hook(_OutputHook(self, kind, layer)))

    def set_rows(self, adapters: list[Adapter] | None) -> None:
        """The adapter of each row of the next forward passes (None: no serving edit at all):
        per kind, the dense per-row A and v (``heads``) or each row's table row (the others),
        None for a kind no row uses; and each row's peft adapter name for :meth:`generate`."""
        self._batch = dict.fromkeys(MIXABLE_KINDS)
        if adapters is None:
            self._lora_rows = []
            return
        self._lora_rows = [adapter.lora or BASE_ROW for adapter in adapters]
        for kind, table in self.tables.items():
            members = [(row, adapter) for row, adapter in enumerate(adapters) if adapter.kind == kind]
            if not members:
                continue
            if kind == "heads":
                self._batch[kind] = self._dense_heads(table, len(adapters), members)
            else:
                self._batch[kind] = {
                    name: torch.tensor(
                        [a.rows[name][0] if a.kind == kind else 0 for a in adapters], device=tensor.device
                    )
                    for name, tensor in table.tensors.items()
                }

    def _dense_heads(
        self, table: StackedTable, batch: int, members: list[tuple[int, Adapter]]
    ) -> dict[str, torch.Tensor]:
        """(B, L, H, D) A and v of a batch: each member's table rows scattered to its heads, zeros elsewhere.
        A is left out when no member has one."""
        dense = {}
        for name, tensor in table.tensors.items():
            parts = [(row, adapter) for row, adapter in members if name in adapter.rows]
            if not parts:
                continue
            device = tensor.device
            rows = torch.cat([torch.full((len(a.rows[name]),), row, dtype=torch.long) for row, a in parts]).to(device)
            heads = torch.cat([a.heads for _, a in parts]).to(device)
            values = torch.zeros((batch, *self.head_shape), device=device)
            values[rows, heads[:, 0], heads[:, 1]] = tensor[torch.cat([a.rows[name] for _, a in parts])]
            dense[name] = values
        return dense

    def generate(self) -> Callable[..., torch.Tensor]:
        """``generate`` for the batch of :meth:`set_rows`: the model's own while no LoRA is
        loaded, else peft's with every row's LoRA named (``"__base__"`` for rows without one),
        which every forward pass then needs: peft would otherwise apply one LoRA to all rows."""
        return self.lora.generate(self._lora_rows) or self.model.generate

    def batch(self, kind: str) -> dict[str, torch.Tensor] | None:
        return self._batch[kind]

    def gather(self, kind: str, name: str, layer: int, like: torch.Tensor) -> torch.Tensor:
        """Each batch row's ``name`` tensor of ``layer`` for ``kind``: (B, 1, ..., *shape), ready
        to broadcast over ``like`` (B, T, ..., *shape) in its dtype and on its device."""
        batch = self._batch[kind]
        if kind == "heads":
            values = batch[name][:, layer]
        else:
            values = self.tables[kind].tensors[name][batch[name], layer]
        if like.shape[0] != values.shape[0]:
            raise RuntimeError(f"a batch of {values.shape[0]} rows reached a layer as {like.shape[0]} rows")
        values = values.to(like.device, like.dtype)
        return values.reshape(values.shape[0], *([1] * (like.dim() - values.dim())), *values.shape[1:])

    def loaded_bytes(self) -> int:
        """Bytes of every stacked table together, of the adapters' row and head indices, and of the LoRA weights."""
        indices = [t for a in self.names() for t in (*a.rows.values(), *([a.heads] if a.heads is not None else []))]
        tables = sum(table.nbytes for table in self.tables.values())
        return tables + sum(t.numel() * t.element_size() for t in indices) + self.lora.nbytes()

    def close(self) -> None:
        """Detach the serving hooks from the model."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []


class _HeadsHook:
    """Pre-hook on one layer's attention output projection: z' = z + z * A_b + v_b, per batch row b."""

    def __init__(self, registry: AdapterRegistry, layer: int, num_heads: int, head_dim: int):
        self.registry, self.layer, self.num_heads, self.head_dim = registry, layer, num_heads, head_dim

    def __call__(self, module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        batch = self.registry.batch("heads")
        if batch is None:
            return None
        x = args[0]
        heads = x.unflatten(-1, (self.num_heads, self.head_dim))
        bias = self.registry.gather("heads", "bias", self.layer, heads)
        if "scale" in batch:  # LoFiT's own order: not (1 + A), which rounds in bf16
            heads = heads + heads * self.registry.gather("heads", "scale", self.layer, heads) + bias
        else:  # no row has an A: z * 0 would add a zero, which changes no bit of z
            heads = heads + bias
        return (heads.flatten(-2), *args[1:])


class _OutputHook:
    """Forward hook on a layer's feed-forward block (f' = f + f * s + b) or decoder layer (r' = r + shift)."""

    def __init__(self, registry: AdapterRegistry, kind: str, layer: int):
        self.registry, self.kind, self.layer = registry, kind, layer

    def __call__(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
        if self.registry.batch(self.kind) is None:
            return None
        hidden = hidden_states_of(output)
        if self.kind == "feed_forward":
            scale = self.registry.gather(self.kind, "scale", self.layer, hidden)
            edited = hidden + hidden * scale + self.registry.gather(self.kind, "bias", self.layer, hidden)
        else:
            edited = hidden + self.registry.gather(self.kind, "shift", self.layer, hidden)
        return replace_hidden_states(output, edited)


def result_folder(folder: Path) -> Path | None:
    """The saved result in ``folder``: the folder itself, or its ``adapter/`` (a run folder); None when neither."""
    for candidate in (folder, folder / "adapter"):
        try:
            saved_method(candidate)
            return candidate
        except (FileNotFoundError, AdapterError):
            continue
    return None


def discover(adapters_dir: Path) -> Iterator[tuple[str, Path | None]]:
    """Each subfolder of ``adapters_dir`` (sorted) with its saved result (None: it holds none)."""
    for folder in sorted(p for p in adapters_dir.iterdir() if p.is_dir()):
        yield folder.name, result_folder(folder)


def exclusive_model(registry: AdapterRegistry, adapter: Adapter) -> tuple[nn.Module, Callable[[], None]]:
    """The base model with ``adapter`` (an exclusive one) applied, the LoRA stack detached for
    the time, and the call that removes it and puts the stack back."""
    with contextlib.ExitStack() as undo:
        undo.enter_context(registry.lora.detached())
        wrapped = load_adapted(registry.model, adapter.folder)
        undo.callback(wrapped.unload)
        return wrapped, undo.pop_all().close
