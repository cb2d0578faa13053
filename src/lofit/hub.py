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

import huggingface_hub
from torch import nn
from transformers import PreTrainedModel

SHARED_FILES = ["*.json", "*.safetensors", "*.md"]
"""What is uploaded and downloaded: configs, tensors and the model card."""


def _is_repo_id(name: str) -> bool:
    """Whether ``name`` has the form of a hub model id, ``owner/name``."""
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "~"))


def push_to_hub(folder: str | Path, repo_id: str, *, private: bool | None = None, token: str | None = None,
                revision: str | None = None, commit_message: str | None = None) -> str:
    """Upload the result saved in ``folder`` to the hub model repository ``repo_id`` (created
    when absent) and return the commit's URL. FileNotFoundError or AdapterError, before
    anything is uploaded, when ``folder`` holds nothing lofit saved."""
    from .methods import saved_method

    folder = Path(folder)
    method = saved_method(folder)
    api = huggingface_hub.HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    commit = api.upload_folder(repo_id=repo_id, folder_path=folder, revision=revision, allow_patterns=SHARED_FILES,
                               commit_message=commit_message or f"Upload a {method} result saved by lofit")
    return str(commit)


def adapter_folder(hub_id_or_folder: str | Path, *, revision: str | None = None, token: str | None = None) -> Path:
    """The local folder of a saved result: ``hub_id_or_folder`` itself when it exists, else a
    snapshot of the hub repository of that id (downloaded, or from the local hub cache).
    FileNotFoundError when it is neither an existing path nor a downloadable hub id."""
    path = Path(hub_id_or_folder)
    if path.exists():
        return path
    if not _is_repo_id(str(hub_id_or_folder)):
        raise FileNotFoundError(f"no saved adapter at {path}: it is neither an existing folder nor a hub id owner/name")
    try:
        return Path(huggingface_hub.snapshot_download(str(hub_id_or_folder), revision=revision, token=token,
                                                      allow_patterns=SHARED_FILES))
    except (OSError, ValueError) as error:  # network, missing repository or revision, invalid id
        raise FileNotFoundError(f"{str(hub_id_or_folder)!r} is not a local folder, and downloading it from the Hugging "
                                f"Face Hub failed ({error})") from None


def from_pretrained(base_model: PreTrainedModel, hub_id_or_folder: str | Path, *, revision: str | None = None,
                    token: str | None = None) -> nn.Module:
    """``base_model`` with the result saved in ``hub_id_or_folder`` (a local folder or a hub
    id, see :func:`adapter_folder`) applied, by whichever method saved it; the errors and
    the fingerprint warning are :func:`lofit.methods.load_adapted`'s."""
    from .methods import load_adapted

    return load_adapted(base_model, adapter_folder(hub_id_or_folder, revision=revision, token=token))
