"""lofit: localized fine-tuning on LLM representations (LoFiT, Yin, Ye and Durrett, 2024)."""

__version__ = "0.1.0"

from .architectures import ARCHITECTURES, UnsupportedModelError, head_layout  # noqa: E402
from .config import LofitConfig  # noqa: E402
from .loading import load_model  # noqa: E402
from .model import LofitModel, get_lofit_model  # noqa: E402

__all__ = [
    "ARCHITECTURES",
    "LofitConfig",
    "LofitModel",
    "UnsupportedModelError",
    "get_lofit_model",
    "head_layout",
    "load_model",
]
