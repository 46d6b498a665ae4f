"""hf-decoding-ext: decoding methods from the literature as plug-ins for Hugging Face transformers.

The face of the library (everything else lives in ``core/`` and one folder per family)::

    from hf_decoding_ext import load_model, encode_prompts, generate_kwargs
    model, tokenizer = load_model()                       # the embedded default model
    inputs = encode_prompts(tokenizer, "Write a short poem about the sea.")
    out = model.generate(**inputs, max_new_tokens=64, **generate_kwargs("mirostat-v2", model, tokenizer, tau=3.0))

Names are imported lazily, so ``import hf_decoding_ext`` stays cheap.
"""

from __future__ import annotations

import importlib

from hf_decoding_ext import _legacy

__version__ = "0.1.0"

_legacy.install()

_FACE = {
    "DEFAULT_MODEL": "hf_decoding_ext.core.models",
    "load_model": "hf_decoding_ext.core.models",
    "encode_prompts": "hf_decoding_ext.core.models",
    "generate_kwargs": "hf_decoding_ext.plug",
    "fast_generate": "hf_decoding_ext.plug",
    "fast_kernels": "hf_decoding_ext.core.kernels",
    "METHODS": "hf_decoding_ext.registry",
    "MethodSpec": "hf_decoding_ext.registry",
    "get_method": "hf_decoding_ext.registry",
    "find_methods": "hf_decoding_ext.registry",
    "list_methods": "hf_decoding_ext.registry",
    "DecodingLoop": "hf_decoding_ext.core.loop",
    "GenerationState": "hf_decoding_ext.core.loop",
    "SpeculativeDecoding": "hf_decoding_ext.speculative.engine",
    "Drafter": "hf_decoding_ext.speculative.drafters.base",
    "AcceptanceRule": "hf_decoding_ext.speculative.acceptance",
}

__all__ = sorted(_FACE) + ["__version__"]


def __getattr__(name: str):
    module = _FACE.get(name)
    if module is None:
        raise AttributeError(f"module 'hf_decoding_ext' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_FACE))
