"""KV-cache compaction after verification: keep the accepted path, drop the rest, without re-running tokens."""

from __future__ import annotations

import torch
from transformers import DynamicCache


def check_compactable(cache) -> None:
    """Raise a clear error for caches whose positions cannot be selected (static, sliding-window, quantised...)."""
    if not isinstance(cache, DynamicCache) or any(
            type(layer).__name__ not in ("DynamicLayer",) for layer in getattr(cache, "layers", [])):
        raise ValueError(
            "speculative decoding needs a DynamicCache of full-attention layers (got "
            f"{type(cache).__name__}); do not pass cache_implementation/past_key_values of another kind")


def keep_positions(cache, start: int, indices: torch.Tensor) -> None:
    """Keep cache positions ``[:start]`` and ``start + indices`` (in that order); drop everything after.

    ``indices`` are block offsets of the accepted nodes, increasing. A contiguous prefix ``0..m-1`` is a crop.
    """
    m = int(indices.numel())
    for layer in cache.layers:
        if not getattr(layer, "is_initialized", False) or layer.keys is None:
            continue
        length = layer.keys.shape[-2]
        if m and not torch.equal(indices.cpu(), torch.arange(m)):
            src = start + indices.to(layer.keys.device)
            layer.keys[..., start:start + m, :] = layer.keys.index_select(-2, src)
            layer.values[..., start:start + m, :] = layer.values.index_select(-2, src)
        if length > start + m:
            layer.keys = layer.keys[..., : start + m, :]
            layer.values = layer.values[..., : start + m, :]


def cache_nbytes(cache) -> int:
    """Bytes held by the keys and values of a layered transformers cache (``cache.layers``; layers not filled yet
    count 0)."""
    return sum(layer.keys.numel() * layer.keys.element_size() + layer.values.numel() * layer.values.element_size()
               for layer in cache.layers if getattr(layer, "keys", None) is not None)
