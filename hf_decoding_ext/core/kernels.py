"""A faster CPU kernel layout for linear layers fed a few rows (speculative verification and drafting).

PyTorch computes ``nn.Linear`` as ``x @ W.T`` (``addmm`` with a transposed weight). On CPU with MKL, for a
handful of rows (2 to a few dozen: a verification forward over a small draft tree) that layout runs far below the
memory bandwidth: on the 2-core development machine a 2-4-token forward of SmolLM2-135M cost 1.4-2.0x a 1-token
forward. Computing the same product as ``(W @ x.T).T`` (the weight as the left, row-major operand) is much faster
there: the 2-4-token forward then costs 0.55-0.73x a 1-token forward (which runs PyTorch's matrix-vector kernel), 6
tokens about 1x and 16 tokens 1.4x (``results/verify_cost.json``, ``scripts/verify_cost.py``). The result is the
same product with a different summation order (logits differ by ~1e-5, the argmax is unchanged in the lossless
tests).

:func:`small_batch_linear` swaps the kernel layout of a model's plain ``nn.Linear`` layers for the duration of a
``with`` block (instance attributes only, restored on exit, no global state). Single-row calls keep PyTorch's own
kernel, so a patched model decodes one token exactly as before. Layers wrapped by accelerate hooks (offloading,
``device_map``), subclasses of ``nn.Linear`` (quantised layers, LoRA) and layers that are not float32 on CPU are
left alone.

Deviation note for benchmarks: this is a kernel choice, not part of any paper's method. Plain greedy ``generate()``
is not patched (its 1-row products do not benefit), so speed ratios of the speculative engine include this effect;
``SpeculativeDecoding(small_batch_linear=False)`` measures without it.

Example:
    >>> import torch
    >>> from hf_decoding_ext.core.kernels import small_batch_linear
    >>> layer = torch.nn.Linear(8, 4)
    >>> x = torch.randn(3, 8)
    >>> with small_batch_linear(layer):
    ...     y = layer(x)
    >>> torch.allclose(y, torch.nn.functional.linear(x, layer.weight, layer.bias), atol=1e-6)
    True
"""

from __future__ import annotations

import types
from contextlib import contextmanager

import torch
from torch import nn

DEFAULT_MAX_ROWS = 32
"""Row counts up to this use the weight-left layout (measured faster or equal for 2-32 rows on the development CPU)."""


def _forward(self, x: torch.Tensor) -> torch.Tensor:
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if rows < 2 or rows > self._sbl_max_rows:
        return nn.functional.linear(x, self.weight, self.bias)
    y = (self.weight @ x.reshape(rows, x.shape[-1]).T).T.contiguous()
    if self.bias is not None:
        y += self.bias
    return y.reshape(*x.shape[:-1], y.shape[-1])


def eligible(module: nn.Module) -> bool:
    """Whether ``module`` is a plain float32 ``nn.Linear`` on CPU without accelerate hooks or a forward override."""
    return (type(module) is nn.Linear and module.weight.device.type == "cpu"
            and module.weight.dtype == torch.float32 and not hasattr(module, "_hf_hook")
            and "forward" not in module.__dict__)


@contextmanager
def small_batch_linear(*modules: nn.Module | None, max_rows: int = DEFAULT_MAX_ROWS, enabled: bool = True):
    """Run the eligible ``nn.Linear`` layers inside ``modules`` with the weight-left kernel layout for calls of
    2 to ``max_rows`` rows; restore them on exit (also on errors). ``None`` entries are skipped; a layer shared by
    several modules is patched once."""
    if isinstance(max_rows, bool) or not isinstance(max_rows, int) or max_rows < 2:
        raise ValueError(f"max_rows must be an integer >= 2, got {max_rows!r}")
    patched: list[nn.Linear] = []
    try:
        if enabled:
            seen: set[int] = set()
            for root in modules:
                if root is None:
                    continue
                for m in root.modules():
                    if id(m) in seen or not eligible(m):
                        continue
                    seen.add(id(m))
                    m._sbl_max_rows = max_rows
                    m.forward = types.MethodType(_forward, m)
                    patched.append(m)
        yield len(patched)
    finally:
        for m in patched:
            m.__dict__.pop("forward", None)
            m.__dict__.pop("_sbl_max_rows", None)
