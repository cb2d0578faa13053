"""Sharing saved results on the Hugging Face Hub: a LoFiT adapter or any method's result folder.

``push_to_hub(folder, repo_id)`` creates the model repository if needed and uploads the
folder's JSON, safetensors and model-card files (nothing else: no pickles, no checkpoints).
``from_pretrained(base_model, hub_id_or_folder)`` applies a saved result to a loaded base
model, from a local folder or from a snapshot downloaded from the hub; both go through
:func:`lofit.methods.load_adapted`, so a download is checked exactly as a local folder is.
An existing local path always wins over a hub id of the same spelling.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn
from transformers import PreTrainedModel

from lofit.methods import load_adapted, saved_method
from lofit.models.hub import adapter_folder, upload_folder


def push_to_hub(
    folder: str | Path,
    repo_id: str,
    *,
    private: bool | None = None,
    token: str | None = None,
    revision: str | None = None,
    commit_message: str | None = None,
) -> str:
    """Upload the result saved in ``folder`` to the hub model repository ``repo_id`` (created
    when absent) and return the commit's URL. FileNotFoundError or AdapterError, before
    anything is uploaded, when ``folder`` holds nothing lofit saved."""
    folder = Path(folder)
    method = saved_method(folder)
    return upload_folder(
        folder, repo_id, method, private=private, token=token, revision=revision, commit_message=commit_message
    )


def from_pretrained(
    base_model: PreTrainedModel, hub_id_or_folder: str | Path, *, revision: str | None = None, token: str | None = None
) -> nn.Module:
    """``base_model`` with the result saved in ``hub_id_or_folder`` (a local folder or a hub
    id, see :func:`lofit.models.hub.adapter_folder`) applied, by whichever method saved it; the errors and
    the fingerprint warning are :func:`lofit.methods.load_adapted`'s."""
    return load_adapted(base_model, adapter_folder(hub_id_or_folder, revision=revision, token=token))
