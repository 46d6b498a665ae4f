"""The drafter interface of the speculative engine."""

from __future__ import annotations

import abc
from dataclasses import dataclass, field

import torch

from hf_decoding_ext.core.tree import DraftTree


@dataclass
class Draft:
    """What a drafter proposes for one step: a tree to verify and optional side nodes.

    Side nodes (``side_tokens`` with their own ``side_allowed`` pattern and ``side_depth`` offsets) are fed in the
    same verification forward and their logits are handed back to the drafter, but they are never accepted
    (Lookahead Decoding's Jacobi window).
    """

    tree: DraftTree
    side_tokens: torch.Tensor | None = None
    side_allowed: torch.Tensor | None = None
    side_depth: torch.Tensor | None = None
    info: dict = field(default_factory=dict)


@dataclass
class VerifyResult:
    """What the engine hands back to the drafter after verification.

    ``tree_logits`` are raw target logits ``(1 + n, vocab)`` at the root and at every tree node; ``side_logits``
    ``(m, vocab)`` at the side nodes; ``accepted`` the accepted node indices; ``tokens`` the tokens appended
    (accepted draft tokens then the bonus token); ``committed_logits`` ``(s - 1, vocab)`` at the uncached committed
    tokens before the root (e.g. the prompt at the first step), only for drafters with
    ``wants_committed_logits = True``; ``hidden_states`` ``(s + n_block, hidden)`` the target's last-layer features
    (after the final norm, i.e. the lm_head's input) at the uncached committed tokens then the block nodes, only for
    drafters with ``wants_hidden_states = True`` (feature-conditioned heads such as Medusa or EAGLE).
    """

    draft: Draft
    tree_logits: torch.Tensor
    side_logits: torch.Tensor | None
    accepted: list[int]
    tokens: list[int]
    committed_logits: torch.Tensor | None = None
    hidden_states: torch.Tensor | None = None


class Drafter(abc.ABC):
    """Base class of drafters.

    ``begin(state)`` is called once at the start of every ``generate()`` call, ``propose(state)`` before each
    verification, ``observe(state, result)`` after it. Per-generation state must be reset in ``begin``; state
    meant to persist across prompts (e.g. Token Recycling's adjacency matrix) stays until ``reset()``.
    """

    wants_committed_logits: bool = False
    wants_hidden_states: bool = False  # the engine hands the target's last-layer features to observe()
    uses_assistant_model: bool = False  # whether generate(assistant_model=...) feeds this drafter

    def begin(self, state) -> None:
        pass

    @abc.abstractmethod
    def propose(self, state) -> Draft:
        """The draft to verify next."""

    def observe(self, state, result: VerifyResult) -> None:
        pass

    def kernel_modules(self) -> list:
        """Modules the drafter runs on several rows at once (trained heads): the engine gives their linear layers
        the same CPU kernel layout as the target's (see :mod:`hf_decoding_ext.core.kernels`)."""
        return []

    def reset(self) -> None:
        pass
