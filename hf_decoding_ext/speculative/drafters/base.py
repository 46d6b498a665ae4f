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

    ``side_rows`` (optional, ``(1 + n,)`` long) names, for the root and each of the ``n`` tree nodes, the side node
    whose logits are another prediction of the next token at that node (``-1``: none); an acceptance rule with
    ``uses_side_scores`` reads them (Reflective Verification: the same draft token predicted after a reflection
    prompt). Other rules ignore them.

    ``side_allowed`` is ``(m, m)`` (side nodes attend among themselves and to the committed prefix) or
    ``(m, n + m)``: its first ``n`` columns let side nodes also attend to the ``n`` tree nodes (Parallel Prompt
    Decoding's prompt tokens attached to candidate nodes). ``side_embeds`` (optional, ``(m, hidden)``) are the input
    embeddings of the side nodes: the verification forward then feeds ``inputs_embeds`` (the model's embeddings of
    the block ids, with the side rows replaced) instead of ``input_ids``, and ``side_tokens`` are placeholders
    (trained prompt tokens of PPD). Nothing changes when it is ``None``.
    """

    tree: DraftTree
    side_tokens: torch.Tensor | None = None
    side_allowed: torch.Tensor | None = None
    side_depth: torch.Tensor | None = None
    info: dict = field(default_factory=dict)
    side_rows: torch.Tensor | None = None
    side_embeds: torch.Tensor | None = None


@dataclass
class VerifyResult:
    """What the engine hands back to the drafter after verification.

    ``tree_logits`` are raw target logits ``(1 + n, vocab)`` at the root and at every tree node; ``side_logits``
    ``(m, vocab)`` at the side nodes; ``accepted`` the accepted node indices; ``tokens`` the tokens appended
    (accepted draft tokens then the bonus token). The rest is filled only for drafters whose :attr:`Drafter.needs`
    ask for it (``s`` uncached committed tokens, ``n_block`` tree and side nodes):

    - ``committed_logits`` ``(s - 1, vocab)`` at the uncached committed tokens before the root (e.g. the prompt at the
      first step): ``"committed_logits"``;
    - ``hidden_states`` ``(s + n_block, hidden)`` the target's last-layer features (after the final norm, i.e. the
      lm_head's input) at the uncached committed tokens then the block nodes: ``"last_hidden_state"``
      (feature-conditioned heads such as Medusa or EAGLE);
    - ``all_hidden_states``: a tuple of ``num_layers + 1`` tensors ``(s + n_block, hidden)``, the embeddings then the
      output of every decoder layer at the same positions (the model's ``output_hidden_states``; for Llama-like
      models the last entry is after the final norm): ``"all_hidden_states"``;
    - ``committed_top_k`` ``(s - 1, k)`` the target's top-``k`` token ids (``k`` = the drafter's ``committed_k``) at
      the uncached committed tokens before the root, computed in chunks (a long prompt never needs a
      ``(s, vocab)`` logits tensor): ``"committed_top_k"``;
    - ``target_cache``: the target's KV cache, compacted to the committed tokens plus the accepted path (the bonus
      token is not in it yet): ``"target_cache"``. Read only; the drafter may append during ``propose()``, the engine
      crops it back.
    """

    draft: Draft
    tree_logits: torch.Tensor
    side_logits: torch.Tensor | None
    accepted: list[int]
    tokens: list[int]
    committed_logits: torch.Tensor | None = None
    hidden_states: torch.Tensor | None = None
    all_hidden_states: tuple[torch.Tensor, ...] | None = None
    target_cache: object | None = None
    committed_top_k: torch.Tensor | None = None


def pick_draft_token(scores: torch.Tensor, do_sample: bool, probs: list | None = None):
    """The next draft token of a chain drafter from processed scores ``(1, vocab)``: sampled from their softmax when
    ``do_sample`` (the distribution ``p[0]`` is appended to ``probs``, the tree's ``draft_probs``), else the argmax.
    Returns ``(token (1,), p (1, vocab))``; ``p`` also serves confidence-based draft stops.

    Example:
        >>> tok, p = pick_draft_token(torch.tensor([[0.0, 2.0, 1.0]]), do_sample=False)
        >>> int(tok)
        1
    """
    p = torch.softmax(scores, dim=-1)
    if do_sample:
        tok = torch.multinomial(p, 1)[:, 0]
        if probs is not None:
            probs.append(p[0])
        return tok, p
    return scores.argmax(-1), p


DRAFTER_NEEDS = frozenset({"last_hidden_state", "all_hidden_states", "committed_logits", "committed_top_k",
                           "assistant_model", "target_cache"})
"""What a drafter may ask of the engine in :attr:`Drafter.needs`:

- ``"last_hidden_state"``: the target's last-layer features in :attr:`VerifyResult.hidden_states`;
- ``"all_hidden_states"``: every layer's hidden states in :attr:`VerifyResult.all_hidden_states` (self-speculative
  and layer-skip drafters);
- ``"committed_logits"``: the target's logits at the uncached committed tokens in
  :attr:`VerifyResult.committed_logits` (the whole prompt's logits at the first step);
- ``"committed_top_k"``: only their top-``committed_k`` token ids, in :attr:`VerifyResult.committed_top_k` (the
  drafter defines an int attribute ``committed_k``), computed in chunks;
- ``"assistant_model"``: ``generate(..., assistant_model=...)`` feeds this drafter (the engine refuses an assistant
  model otherwise);
- ``"target_cache"``: read access to the target's KV cache (``state.cache`` in ``propose()``,
  :attr:`VerifyResult.target_cache` in ``observe()``); anything the drafter appends to it during ``propose()`` is
  cropped back by the engine before verification (a layer-skip drafter running on the target's own cache).
"""

_LEGACY_FLAGS = {"wants_hidden_states": "last_hidden_state", "wants_committed_logits": "committed_logits",
                 "uses_assistant_model": "assistant_model"}


def check_needs(needs, owner: str = "drafter") -> frozenset[str]:
    """``needs`` as a frozenset, or a ``ValueError`` naming anything outside :data:`DRAFTER_NEEDS`.

    Example:
        >>> sorted(check_needs({"last_hidden_state"}))
        ['last_hidden_state']
    """
    if not isinstance(needs, (set, frozenset)):
        raise ValueError(f"{owner}.needs must be a set of need names, got {needs!r}")
    unknown = sorted(str(n) for n in needs if n not in DRAFTER_NEEDS)
    if unknown:
        raise ValueError(f"{owner}.needs has unknown entries {unknown}; known needs: {sorted(DRAFTER_NEEDS)}")
    return frozenset(needs)


class Drafter(abc.ABC):
    """Base class of drafters.

    ``begin(state)`` is called once at the start of every ``generate()`` call, ``propose(state)`` before each
    verification, ``observe(state, result)`` after it. Per-generation state must be reset in ``begin``; state
    meant to persist across prompts (e.g. Token Recycling's adjacency matrix) stays until ``reset()``.

    ``needs`` declares, in one set, what the drafter asks of the engine (names of :data:`DRAFTER_NEEDS`; the engine
    refuses unknown names when it is built). The former boolean attributes ``wants_hidden_states``,
    ``wants_committed_logits`` and ``uses_assistant_model`` are read-only views of ``needs``; a subclass that still
    sets them as class attributes has them folded into ``needs`` with a ``DeprecationWarning`` (one release).

    A drafter that samples its tokens hands the distributions it sampled from to the tree (``draft_probs``) and
    says how siblings were drawn (``DraftTree(..., sibling_scheme="iid" | "without_replacement")``), so that the
    engine can refuse an acceptance rule that would not be lossless for them.
    """

    needs: frozenset[str] = frozenset()

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        legacy = {flag: cls.__dict__[flag] for flag in _LEGACY_FLAGS if isinstance(cls.__dict__.get(flag), bool)}
        if legacy:
            import warnings

            warnings.warn(f"{cls.__name__}: {sorted(legacy)} are deprecated; declare needs = frozenset({{...}}) "
                          f"with names of {sorted(DRAFTER_NEEDS)}", DeprecationWarning, stacklevel=2)
            needs = set(cls.needs)
            for flag, value in legacy.items():
                delattr(cls, flag)  # the base class's read-only view takes over
                (needs.add if value else needs.discard)(_LEGACY_FLAGS[flag])
            cls.needs = frozenset(needs)

    @property
    def wants_hidden_states(self) -> bool:
        """Deprecated view of ``"last_hidden_state" in needs``."""
        return "last_hidden_state" in self.needs

    @property
    def wants_committed_logits(self) -> bool:
        """Deprecated view of ``"committed_logits" in needs``."""
        return "committed_logits" in self.needs

    @property
    def uses_assistant_model(self) -> bool:
        """Deprecated view of ``"assistant_model" in needs``."""
        return "assistant_model" in self.needs

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
