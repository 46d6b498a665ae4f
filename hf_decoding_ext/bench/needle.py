"""Synthetic passkey (needle-in-a-haystack) prompts for long-context checks (SpecKV / SpecPC, issue 25).

The prompt follows the passkey-retrieval format of the long-context literature (Mohtashami and Jaggi, "Landmark
Attention", 2023; used by the RULER ``niah`` tasks the SpecKV/SpecPC paper reports): a header, filler sentences, one
needle sentence carrying a 5-digit key at a chosen depth, then the question and the start of the answer. Plain text,
no chat template: with the chat template SmolLM2-135M-Instruct itself misses the key at 2K tokens on half of the
depths tried (``results/issue25_diagnosis.md``).

Example:
    >>> from hf_decoding_ext.bench.needle import passkey_cases
    >>> passkey_cases(2)
    [('60494', 0.25), ('65125', 0.75)]
"""

from __future__ import annotations

import random

import torch

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
"""The repeated filler (one sentence group)."""

HEADER = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. I will quiz you "
          "about the important information there.\n\n")
"""The instruction that opens the prompt."""

QUESTION = "\n\nWhat is the pass key? The pass key is"
"""The question; the answer (the key) is the continuation."""


def passkey_text(key: str, depth: float, repeats: int) -> str:
    """The prompt text: :data:`HEADER`, ``repeats`` fillers with the needle sentence
    ``"The pass key is KEY. Remember it. KEY is the pass key."`` at the sentence boundary nearest below ``depth``
    (0..1) of the filler, then :data:`QUESTION`."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth!r}")
    needle = f" The pass key is {key}. Remember it. {key} is the pass key. "
    fill = FILLER * repeats
    cut = int(len(fill) * depth)
    cut = fill.rfind(". ", 0, cut) + 2 if cut > 0 else 0
    return HEADER + fill[:cut] + needle + fill[cut:] + QUESTION


def passkey_prompt(tokenizer, n_tokens: int, key: str, depth: float) -> torch.Tensor:
    """``(1, <= n_tokens)`` ids of the plain-text passkey prompt (:func:`passkey_text`) with as many filler repeats
    as fit in ``n_tokens`` (at least one)."""
    if n_tokens < 1:
        raise ValueError(f"n_tokens must be >= 1, got {n_tokens!r}")
    per = len(tokenizer(FILLER, add_special_tokens=False).input_ids)
    k = max(1, n_tokens // per)
    ids = tokenizer(passkey_text(key, depth, k), return_tensors="pt").input_ids
    while ids.shape[1] > n_tokens and k > 1:
        k -= 1
        ids = tokenizer(passkey_text(key, depth, k), return_tensors="pt").input_ids
    return ids


def passkey_cases(n: int, seed: int = 0) -> list[tuple[str, float]]:
    """``n`` (key, depth) pairs: 5-digit keys from ``random.Random(seed)``, depths evenly spread
    ``(i + 0.5) / n``."""
    rng = random.Random(seed)
    return [(str(rng.randrange(10000, 100000)), (i + 0.5) / n) for i in range(n)]


def passkey_found(answer: str, key: str) -> bool:
    """Whether the generated ``answer`` contains the key (the needle-accuracy rule)."""
    return key in answer
