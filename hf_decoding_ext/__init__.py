"""hf-decoding-ext: decoding methods from the literature as plug-ins for Hugging Face transformers."""

__version__ = "0.1.0"

from .models import DEFAULT_MODEL, load_model  # noqa: E402
from .registry import METHODS, get_method, list_methods  # noqa: E402

__all__ = ["DEFAULT_MODEL", "METHODS", "get_method", "list_methods", "load_model", "__version__"]
