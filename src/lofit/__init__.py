"""lofit: localized fine-tuning on LLM representations (LoFiT, Yin, Ye and Durrett, 2024).

The public API: :func:`load_model`, :class:`LofitConfig`, :func:`get_lofit_model`,
:class:`LofitModel`, :func:`head_layout`. The packages, lowest layer first (each imports
only from the layers below it; ``lint-imports`` checks this):
``utils`` < ``data`` | ``models`` < ``evaluation`` < ``training`` < ``methods`` | ``tasks``
< ``harness`` < ``runs`` < ``experiments`` < ``cli``.
"""

from lofit._version import __version__
from lofit.methods.lofit.config import LofitConfig
from lofit.methods.lofit.model import LofitModel, get_lofit_model
from lofit.models.architectures import ARCHITECTURES, UnsupportedModelError, head_layout
from lofit.models.loading import load_model

__all__ = [
    "ARCHITECTURES",
    "LofitConfig",
    "LofitModel",
    "UnsupportedModelError",
    "__version__",
    "get_lofit_model",
    "head_layout",
    "load_model",
]
