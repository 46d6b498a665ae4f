"""The best available training-free accelerator: prompt lookup and token recycling merged (engine machinery)."""

from __future__ import annotations

from hf_decoding_ext.speculative.drafters.merged import MergedDrafter
from hf_decoding_ext.speculative.drafters.prompt_lookup import PromptLookupDrafter
from hf_decoding_ext.speculative.drafters.token_recycling import TokenRecyclingDrafter

GAINS_NAME = "auto-speculative"
"""Acceptance statistics of the merged tree in its merge order (``hf_decoding_ext/data/acceptance/gains.json``,
counted on the distillation prompts by ``scripts/tune_drafters.py``) that size ``max_nodes="auto"``."""


class AutoSpeculativeDrafter(MergedDrafter):
    """The drafters that pay on this hardware, merged into one tree: prompt lookup (Saxena, 2023) and token recycling
    (Luo et al., 2024, arXiv 2408.08696), verified in one forward by the engine. Not a paper's method: a
    configuration of :class:`~hf_decoding_ext.speculative.drafters.merged.MergedDrafter`.

    Every step prompt lookup proposes up to 16 tokens (the continuation of the last match of the trailing n-gram) and
    token recycling its whole 80-node tree from the adjacency matrix; the nodes are merged into a trie taking the two
    drafters' nodes in turn and cut to ``max_nodes``. ``max_nodes="auto"`` picks, at each ``generate()`` call, the
    size maximising expected accepted tokens per unit of verification time from the verify-cost curve measured on
    the running device and model (cached) and the acceptance of each merged node counted on the distillation
    prompts (2.85 tokens per forward for the whole merged tree there, against 2.43 for token recycling alone and
    1.74 for prompt lookup alone). The trained heads are not merged: they need a checkpoint for the target model.
    Lossless under greedy decoding (deterministic drafts only).

    Args:
        max_nodes: cap on the merged tree (``"auto"`` default, an int, or ``None`` for the whole merged tree).
        num_tokens: prompt lookup's draft length (default 16, the length the acceptance was counted with).
        k: token recycling's candidates per token (default 8, the paper's).

    Example:
        >>> from hf_decoding_ext.speculative import SpeculativeDecoding
        >>> from hf_decoding_ext.speculative.drafters.auto_speculative import AutoSpeculativeDrafter
        >>> loop = SpeculativeDecoding(AutoSpeculativeDrafter())
        >>> out = model.generate(**inputs, max_new_tokens=128, custom_generate=loop)  # doctest: +SKIP
    """

    def __init__(self, max_nodes: int | str | None = "auto", num_tokens: int = 16, k: int = 8):
        super().__init__([PromptLookupDrafter(num_tokens=num_tokens), TokenRecyclingDrafter(k=k, max_nodes=None)],
                         max_nodes=max_nodes, gains=GAINS_NAME)
