"""Compatibility module: ``lofit.hub`` before the package was split into layers. It only
re-exports :mod:`lofit.models.hub`, :mod:`lofit.methods.hub`; new code imports from there."""

from lofit.methods.hub import (
    from_pretrained,
    push_to_hub,
)
from lofit.models.hub import (
    SHARED_FILES,
    adapter_folder,
    upload_folder,
)

__all__ = [
    "SHARED_FILES",
    "adapter_folder",
    "from_pretrained",
    "push_to_hub",
    "upload_folder",
]
