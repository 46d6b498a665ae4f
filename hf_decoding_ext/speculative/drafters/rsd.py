"""Recursive Speculative Decoding (RSD-C and RSD-S): draft trees whose siblings are sampled without replacement."""

from __future__ import annotations

import math

import torch

from hf_decoding_ext.core import lifecycle
from hf_decoding_ext.core.tree import DraftTree
from hf_decoding_ext.speculative.drafters.base import Draft
from hf_decoding_ext.speculative.drafters.draft_model import DraftModelTreeDrafter

VARIANTS = ("C", "S")


def conditioned_gumbels(parent_score: float, scores: torch.Tensor) -> torch.Tensor:
    """Stochastic Beam Search's truncation (Kool, van Hoof, Welling, arXiv 1903.06059, Eq. 4 and its stable form in
    their appendix): Gumbel-perturbed child scores ``scores`` conditioned on their maximum being the parent's
    perturbed score ``parent_score``; order-preserving within the parent."""
    z = scores.max()
    gap = (scores - z).clamp(max=0.0)
    log1mexp = torch.where(gap > -0.6931, torch.log(-torch.expm1(gap)), torch.log1p(-torch.exp(gap)))
    v = parent_score - scores + log1mexp
    return parent_score - v.clamp(min=0) - torch.log1p(torch.exp(-v.abs()))



class RSDDrafter(DraftModelTreeDrafter):
    """RSD-C and RSD-S, the two draft-tree variants of "Recursive Speculative Decoding: Accelerating LLM Inference via
    Sampling Without Replacement" (Jeon, Gagrani, Goel, Park, Lee, Lott; arXiv 2402.14160): at every node the
    draft model's distribution is sampled without replacement with the Gumbel-top-k trick (``branching[d]``
    distinct children at depth ``d``), and the tree is verified by recursive rejection sampling, where each rejected
    sibling is removed from the draft distribution of the next (``SpeculativeDecoding(..., acceptance=
    "speculative")`` reads ``sibling_scheme="without_replacement"``).

    Args:
        assistant_model: the draft model.
        branching: distinct children per node at each depth (default ``(2, 2, 2)``, this library's choice: the paper
            sweeps constant branching factors at fixed draft length and at fixed target budget).

        variant: ``"C"`` (RSD-C, default: constant branching, Gumbel-top-k at every node) or ``"S"`` (RSD-S: Stochastic
            Beam Search, Kool et al. arXiv 1903.06059: ``beam_width`` sequences sampled without replacement, the
            tree being the union of their prefixes; at each depth the ``beam_width`` best Gumbel-perturbed,
            parent-conditioned extensions survive, so a node keeps a prefix of its own Gumbel ordering, i.e.
            siblings sampled without replacement, and unlikely branches are pruned early).
        beam_width: RSD-S's beam width ``W`` (default 4).
        depth: RSD-S's draft depth ``L`` (default 3).

    Without sampling both variants draft deterministically: top-``branching[d]`` children (RSD-C) or plain beam
    search of width ``beam_width`` (RSD-S), verified by greedy acceptance. The tree is expanded one draft-model
    forward per depth (:class:`~hf_decoding_ext.speculative.drafters.draft_model.DraftModelTreeDrafter`).

    Example:
        >>> from hf_decoding_ext.speculative import SpeculativeDecoding
        >>> from hf_decoding_ext.speculative.drafters.rsd import RSDDrafter
        >>> loop = SpeculativeDecoding(RSDDrafter(small_model))  # doctest: +SKIP
        >>> out = model.generate(**inputs, do_sample=True, max_new_tokens=64, custom_generate=loop)  # doctest: +SKIP
    """

    @classmethod
    def for_model(cls, model=None, tokenizer=None, assistant: str = "distilled", branching=(2, 2, 2),
                  variant: str = "C", beam_width: int = 4, depth: int = 3) -> RSDDrafter:
        """Registry/CLI factory (``assistant`` as in :meth:`DraftModelDrafter.load_assistant`)."""
        return cls(cls.load_assistant(model, assistant), branching=tuple(branching), variant=variant,
                   beam_width=beam_width, depth=depth)

    def __init__(self, assistant_model=None, branching=(2, 2, 2), variant: str = "C", beam_width: int = 4,
                 depth: int = 3):
        if variant not in VARIANTS:
            raise ValueError(f"variant must be 'C' (RSD-C) or 'S' (RSD-S), got {variant!r}")
        for name, value in (("beam_width", beam_width), ("depth", depth)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if variant == "S":
            branching = (beam_width,) * depth  # the widest a depth can be (the draft length is len(branching))
        super().__init__(assistant_model, branching=branching, sibling_scheme="without_replacement")
        self.variant, self.beam_width, self.depth = variant, beam_width, depth

    def propose(self, state) -> Draft:
        if self.variant == "C":
            return super().propose(state)
        return self._propose_beam(state)

    def _propose_beam(self, state) -> Draft:
        """RSD-S: Stochastic Beam Search over the draft model (beam search without sampling)."""
        ids, mask = state.input_ids, state.attention_mask
        room = state.generation_config.max_length - ids.shape[1] - 1
        depth = max(0, min(self.depth, room))
        if depth == 0:
            return Draft(DraftTree.chain(torch.zeros(0, dtype=torch.long)))
        self._sync(ids)
        level_logits = self._step(ids, mask)
        base = self._cache.get_seq_length()
        self._cached_ids = ids[:, :base]
        tokens, parents, depths, probs, paths = [], [], [], [], {-1: []}
        beams = [(-1, 0.0, 0.0)]  # (node, log q of the path, perturbed score)
        for d in range(depth):
            cands = []  # (perturbed score, order, parent node, token, log q of the path, parent's distribution)
            for (node, logq_path, g), logits in zip(beams, level_logits):
                path = paths[node]
                cur = torch.cat([ids, ids.new_tensor([path])], dim=1) if path else ids
                processors = lifecycle.fork(state.logits_processor, caller=type(self).__name__)
                p = torch.softmax(processors(cur, logits[None])[0].float(), dim=-1)
                logq = torch.log(p)
                phi = logq_path + logq
                if state.do_sample:
                    u = torch.rand(p.shape).clamp_min_(torch.finfo(torch.float32).tiny)
                    keys = conditioned_gumbels(g, phi - torch.log(-torch.log(u)))
                else:
                    keys = phi
                keys = keys.masked_fill(p <= 0, -math.inf)
                top = torch.topk(keys, min(self.beam_width, int((p > 0).sum())))
                for k, t in zip(top.values.tolist(), top.indices.tolist()):
                    cands.append((k, len(cands), node, int(t), float(phi[t]), p))
            kept = sorted(cands, key=lambda c: -c[0])[: self.beam_width]
            kept.sort(key=lambda c: c[1])  # grouped by parent, each parent's children in its own Gumbel order
            start, beams = len(tokens), []
            for k, _, node, t, phi_t, p in kept:
                tokens.append(t)
                parents.append(node)
                depths.append(d + 1)
                probs.append(p)
                paths[len(tokens) - 1] = paths[node] + [t]
                beams.append((len(tokens) - 1, phi_t, k))
            if d + 1 < depth:
                level_logits = self._level_logits(state, base, tokens, parents, depths, start)
        tok, par = torch.tensor(tokens, dtype=torch.long), torch.tensor(parents)
        if not state.do_sample:
            return Draft(DraftTree(tok, par))
        return Draft(DraftTree(tok, par, torch.stack(probs), "without_replacement"))


__all__ = ["RSDDrafter", "VARIANTS", "conditioned_gumbels"]
