"""The Hugging Face Hub, for any saved result: :func:`adapter_folder` finds a result's local
folder (an existing path, else a snapshot downloaded from the hub) and :func:`upload_folder`
uploads one (its JSON, safetensors and model-card files; nothing else: no pickles, no
checkpoints). An existing local path always wins over a hub id of the same spelling.
Reading a result back by whichever method saved it is :mod:`lofit.methods.hub`'s.
"""

from __future__ import annotations

from pathlib import Path

import huggingface_hub

SHARED_FILES = ["*.json", "*.safetensors", "*.md"]
"""What is uploaded and downloaded: configs, tensors and the model card."""


def _is_repo_id(name: str) -> bool:
    """Whether ``name`` has the form of a hub model id, ``owner/name``."""
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "~"))


def upload_folder(
    folder: str | Path,
    repo_id: str,
    method: str,
    *,
    private: bool | None = None,
    token: str | None = None,
    revision: str | None = None,
    commit_message: str | None = None,
) -> str:
    """Upload the :data:`SHARED_FILES` of ``folder``, a result ``method`` saved, to the hub
    model repository ``repo_id`` (created when absent) and return the commit's URL."""
    api = huggingface_hub.HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    commit = api.upload_folder(
        repo_id=repo_id,
        folder_path=folder,
        revision=revision,
        allow_patterns=SHARED_FILES,
        commit_message=commit_message or f"Upload a {method} result saved by lofit",
    )
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
        return Path(
            huggingface_hub.snapshot_download(
                str(hub_id_or_folder), revision=revision, token=token, allow_patterns=SHARED_FILES
            )
        )
    except (OSError, ValueError) as error:  # network, missing repository or revision, invalid id
        raise FileNotFoundError(
            f"{str(hub_id_or_folder)!r} is not a local folder, and downloading it from the Hugging "
            f"Face Hub failed ({error})"
        ) from None
