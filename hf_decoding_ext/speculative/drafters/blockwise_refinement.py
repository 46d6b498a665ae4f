"""Refined blockwise drafts: a top-k lattice from the blockwise heads, rescored by an n-gram LM and/or a small neural
LM, the p best paths verified as a trie.

Kim et al., "Towards Fast Inference: Exploring and Improving Blockwise Parallel Drafts" (arXiv 2404.09221; NeurIPS
2024 as "Accelerating Blockwise Parallel Language Models with Draft Refinement"). No official code was released;
the paper text is the source.

What follows the paper and what is this library's reading (:data:`PAPER_FIDELITY`):
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from hf_decoding_ext.core.tree import DraftTree
from hf_decoding_ext.speculative.acceptance import blockwise as _relaxed_rules  # noqa: F401  (registers the rules)
from hf_decoding_ext.speculative.drafters.base import Draft
from hf_decoding_ext.speculative.drafters.feature_head import FeatureHeadDrafter, load_head
from hf_decoding_ext.speculative.heads.blockwise import BlockwiseHeads

PAPER_FIDELITY = (
    ("top-k lattice from the blockwise heads", "follows",
     "paper (the k heads' top-k tokens per position form a lattice of candidate drafts)",
     "lattice of the top_k tokens of each proposal head (head log-probabilities over the draft vocabulary)"),
    ("global n-gram rescoring, p-best paths", "follows",
     "paper (an n-gram LM rescores lattice paths; the p best are verified in parallel)",
     "beam search over the lattice, score = head_weight x head log-prob + ngram_weight x n-gram log-prob per "
     "position; the p best paths are merged into a trie and verified in one tree-attention forward"),
    ("local neural rescoring", "follows",
     "paper (a small neural LM rescores each position's top-k, interpolated with the head logits)",
     "the project's distilled 4-layer draft model (Direct Alignment) scores each beam's candidates; log-linear "
     "interpolation with the head (and n-gram) log-probabilities"),
    ("no training beyond the blockwise heads", "follows",
     "paper (the refinement needs no change to the blockwise model)",
     "the heads are the shipped BlockwiseHeads; the n-gram LM is counted from the target's own greedy responses"),
    ("verification of the p paths", "own reading",
     "paper: the p drafts are verified as a batch (one sequence each)",
     "the p paths share their prefixes in a trie verified with tree attention (the issue's choice): the same "
     "acceptance, fewer nodes"),
    ("n-gram corpus and order", "own reading",
     "paper: n-gram LMs trained on the task's training data (C4/LAMBADA ...)",
     "an interpolated Witten-Bell 4-gram (core/ngram_lm.NGramLM) over the target's greedy responses to the "
     "distillation prompts (data/blockwise/ngram-order4.safetensors, never benchmark prompts)"),
    ("neural rescorer context", "own reading",
     "paper: the small LM reads the full prefix",
     "the draft model reads the last context_window committed tokens (no KV cache kept across steps)"),
    ("interpolation weights", "own reading",
     "paper: weights tuned on held-out data",
     "tuned on distillation prompts only (scripts/eval_blockwise.py), never on benchmark prompts"),
)


def _fidelity_markdown() -> str:
    out = []
    for verdict, title in (("follows", "Follows the paper:"), ("own reading", "This library's reading:")):
        out.append(title)
        out += [f"- **{name}**: {ours}. Source: {source}." for name, v, source, ours in PAPER_FIDELITY if v == verdict]
        out.append("")
    return "\n".join(out)


if __doc__ is not None:
    __doc__ += "\n" + _fidelity_markdown()

NGRAM_FILE = "ngram-order4.safetensors"
"""The shipped n-gram LM (``hf_decoding_ext/data/blockwise/``): a 4-gram over the target's greedy responses."""


def shipped_ngram():
    """The n-gram LM shipped for SmolLM2-135M-Instruct (see :data:`NGRAM_FILE`)."""
    from hf_decoding_ext.core.ngram_lm import NGramLM
    from hf_decoding_ext.core.resources import data_path

    return NGramLM.load(data_path("blockwise", NGRAM_FILE))


def draft_lattice(head_logits: torch.Tensor, top_k: int, to_target=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The top-k lattice of blockwise heads: ``head_logits`` ``(depth, vocab)`` -> token ids ``(depth, top_k)`` (mapped
    through ``to_target`` when given) and their log-probabilities under each head ``(depth, top_k)``.

    Example:
        >>> import torch
        >>> ids, logp = draft_lattice(torch.tensor([[0.0, 2.0, 1.0], [3.0, 0.0, 1.0]]), top_k=2)
        >>> ids.tolist()
        [[1, 2], [0, 2]]
    """
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k!r}")
    logp = torch.log_softmax(head_logits.float(), dim=-1)
    best = logp.topk(min(top_k, logp.shape[-1]), dim=-1)
    ids = best.indices if to_target is None else to_target(best.indices)
    return ids, best.values


def rescore_lattice(ids: torch.Tensor, head_logp: torch.Tensor, scorers=(), num_paths: int = 1,
                    beam_width: int | None = None, head_weight: float = 1.0) -> list[tuple[list[int], float]]:
    """Beam search over a lattice: the ``num_paths`` best paths (token lists, best first) with their scores.

    A path's score is the sum over positions of ``head_weight x head_logp`` plus, for each ``(weight, scorer)`` of
    ``scorers``, ``weight x scorer(prefixes, candidates)`` where ``scorer`` returns the log-probabilities
    ``(len(prefixes), top_k)`` of the position's candidates after each beam's prefix (a list of token lists).
    Without scorers and with ``num_paths=1`` the result is the heads' argmax path (raw blockwise drafting).

    Example:
        >>> import torch
        >>> ids = torch.tensor([[5, 6], [7, 8]]); logp = torch.log(torch.tensor([[0.6, 0.4], [0.9, 0.1]]))
        >>> [p for p, _ in rescore_lattice(ids, logp, num_paths=2)]
        [[5, 7], [6, 7]]
        >>> favour_6 = lambda prefixes, cands: torch.tensor([[0.0 if int(c) == 6 else -9.0 for c in cands]
        ...                                                  for _ in prefixes])
        >>> rescore_lattice(ids, logp, scorers=[(1.0, favour_6)])[0][0]
        [6, 7]
    """
    if num_paths < 1:
        raise ValueError(f"num_paths must be >= 1, got {num_paths!r}")
    width = max(beam_width or 0, num_paths)
    beams: list[tuple[list[int], float]] = [([], 0.0)]
    for d in range(ids.shape[0]):
        cands = ids[d]
        total = head_weight * head_logp[d].float()[None, :].expand(len(beams), -1).clone()
        prefixes = [p for p, _ in beams]
        for weight, scorer in scorers:
            if weight:
                total += weight * scorer(prefixes, cands).float()
        total += torch.tensor([s for _, s in beams])[:, None]
        flat = total.flatten()
        order = flat.argsort(descending=True)[:width]
        k = cands.shape[0]
        beams = [(prefixes[int(i) // k] + [int(cands[int(i) % k])], float(flat[i])) for i in order]
    return beams[:num_paths]


class NGramScorer:
    """Log-probabilities of lattice candidates under an :class:`~hf_decoding_ext.core.ngram_lm.NGramLM`, after
    ``context + prefix`` (``context``: the committed tokens, set per step)."""

    def __init__(self, lm):
        self.lm = lm
        self.context: list[int] = []

    def __call__(self, prefixes, cands):
        keep = self.lm.order - 1
        rows = []
        for p in prefixes:
            ctx = (self.context + p)[-keep:] if keep else []
            rows.append(torch.log(self.lm.probs(ctx, cands.cpu()).clamp(min=1e-30)))
        return torch.stack(rows).to(cands.device)


class NeuralScorer:
    """Log-probabilities of lattice candidates under a small causal LM (the distilled draft model), reading the last
    ``context_window`` committed tokens and the beam's prefix (one batched forward per lattice position)."""

    def __init__(self, lm, context_window: int = 48):
        if context_window < 1:
            raise ValueError(f"context_window must be >= 1, got {context_window!r}")
        self.lm = lm
        self.context_window = context_window
        self.context: list[int] = []

    @torch.inference_mode()
    def __call__(self, prefixes, cands):
        ctx = self.context[-self.context_window:]
        device = next(self.lm.parameters()).device
        x = torch.tensor([ctx + p for p in prefixes], dtype=torch.long, device=device)
        logits = self.lm(input_ids=x, use_cache=False).logits[:, -1].float()
        return torch.log_softmax(logits, dim=-1)[:, cands.to(device)].to(cands.device)


class BlockwiseRefinementDrafter(FeatureHeadDrafter):
    """Blockwise draft refinement (Kim et al., "Towards Fast Inference: Exploring and Improving Blockwise Parallel
    Drafts", arXiv 2404.09221): the blockwise heads' top-k lattice rescored by an n-gram LM and/or a small neural LM,
    the ``num_paths`` best paths verified as a trie by the speculative engine. Verification is unchanged, so with
    greedy acceptance the output is token-identical to greedy decoding.

    Args:
        heads: :class:`~hf_decoding_ext.speculative.heads.blockwise.BlockwiseHeads`, a folder, a Hub id or
            ``"shipped"``.
        rescorer: ``"ngram"`` (global p-best n-gram rescoring), ``"neural"`` (local rescoring by the small LM),
            ``"both"``, or ``None`` (raw lattice: the heads' own best paths, the baseline).
        top_k: candidates per lattice position.
        num_paths: paths verified (``p``); merged into a trie.
        head_weight, ngram_weight, neural_weight: interpolation weights of the log-probabilities.
        ngram: an :class:`~hf_decoding_ext.core.ngram_lm.NGramLM` or ``"shipped"`` (:func:`shipped_ngram`).
        neural_lm: a causal LM sharing the target's vocabulary, ``"distilled"`` (the project's distilled draft,
            :meth:`~hf_decoding_ext.speculative.drafters.draft_model.DraftModelDrafter.load_assistant`, loaded at the
            first ``generate()``) or any name ``load_assistant`` takes.
        max_nodes: cap on the trie's nodes (``None``: all nodes of the ``num_paths`` paths); the best paths come
            first, so the cut keeps them.
        context_window: committed tokens the neural LM reads.

    Example:
        >>> from hf_decoding_ext.speculative import SpeculativeDecoding
        >>> from hf_decoding_ext.speculative.drafters.blockwise_refinement import BlockwiseRefinementDrafter
        >>> drafter = BlockwiseRefinementDrafter("shipped", rescorer="ngram", num_paths=2)  # doctest: +SKIP
        >>> out = model.generate(**inputs, max_new_tokens=64, do_sample=False,
        ...                      custom_generate=SpeculativeDecoding(drafter))  # doctest: +SKIP
    """

    RESCORERS = ("ngram", "neural", "both", None)

    def __init__(self, heads="shipped", rescorer: str | None = "ngram", top_k: int = 4, num_paths: int = 1,
                 head_weight: float = 1.0, ngram_weight: float = 0.5, neural_weight: float = 0.5, ngram="shipped",
                 neural_lm="distilled", max_nodes: int | None = None, context_window: int = 48):
        if rescorer not in self.RESCORERS:
            raise ValueError(f"rescorer must be one of {self.RESCORERS}, got {rescorer!r}")
        if not isinstance(top_k, int) or top_k < 1:
            raise ValueError(f"top_k must be a positive integer, got {top_k!r}")
        if not isinstance(num_paths, int) or num_paths < 1:
            raise ValueError(f"num_paths must be a positive integer, got {num_paths!r}")
        if max_nodes is not None and (isinstance(max_nodes, bool) or not isinstance(max_nodes, int) or max_nodes < 1):
            raise ValueError(f"max_nodes must be a positive integer or None, got {max_nodes!r}")
        for name, w in (("head_weight", head_weight), ("ngram_weight", ngram_weight),
                        ("neural_weight", neural_weight)):
            if not isinstance(w, (int, float)) or w < 0 or math.isnan(w):
                raise ValueError(f"{name} must be a number >= 0, got {w!r}")
        head = load_head(heads, BlockwiseHeads, "blockwise")
        super().__init__(head, tree_choices=[[0] * d for d in range(1, head.depth + 1)], max_nodes=None)
        self.rescorer, self.top_k, self.num_paths = rescorer, top_k, num_paths
        self.head_weight, self.ngram_weight, self.neural_weight = float(head_weight), float(ngram_weight), \
            float(neural_weight)
        self.node_cap = max_nodes
        self.context_window = context_window
        self._ngram_spec, self._neural_spec = ngram, neural_lm
        self._lattice: torch.Tensor | None = None
        self._paths: list[list[int]] = []
        self.ngram_scorer: NGramScorer | None = None
        self.neural_scorer: NeuralScorer | None = None
        if rescorer in ("ngram", "both"):
            lm = shipped_ngram() if ngram == "shipped" else ngram
            if isinstance(lm, (str, Path)):
                from hf_decoding_ext.core.ngram_lm import NGramLM

                lm = NGramLM.load(lm)
            self.ngram_scorer = NGramScorer(lm)
        if rescorer in ("neural", "both") and not isinstance(neural_lm, (str, Path)):
            self.neural_scorer = NeuralScorer(neural_lm, context_window)


    def begin(self, state) -> None:
        super().begin(state)
        if self.rescorer in ("neural", "both") and self.neural_scorer is None:
            from hf_decoding_ext.speculative.drafters.draft_model import DraftModelDrafter

            lm = DraftModelDrafter.load_assistant(state.model, str(self._neural_spec))
            lm.eval()
            self.neural_scorer = NeuralScorer(lm, self.context_window)
        if self.ngram_scorer is not None and self.ngram_scorer.lm.vocab_size < self.head.config.vocab_size:
            raise ValueError(f"the n-gram LM has a vocabulary of {self.ngram_scorer.lm.vocab_size}, the model "
                             f"{self.head.config.vocab_size}")

    def scorers(self):
        out = []
        if self.ngram_scorer is not None:
            out.append((self.ngram_weight, self.ngram_scorer))
        if self.neural_scorer is not None:
            out.append((self.neural_weight, self.neural_scorer))
        return out

    def draft_paths(self, feature: torch.Tensor, context: list[int]) -> list[list[int]]:
        """The ``num_paths`` best refined drafts (token lists) after ``context`` (committed tokens, root last) from
        the feature ``(hidden,)`` of the last verified position."""
        logits = self.head(feature[None].to(self.head.dtype))[:, 0]  # (depth, draft_vocab)
        ids, logp = draft_lattice(logits, self.top_k, self.head.to_target)
        self._lattice = ids
        for _, scorer in self.scorers():
            scorer.context = context
        beams = rescore_lattice(ids, logp, self.scorers(), self.num_paths, beam_width=self.num_paths,
                                head_weight=self.head_weight)
        return [p for p, _ in beams]

    def prepare(self, state, feature, root_token):
        context = state.input_ids[0, -max(self.context_window, 8):].tolist()
        self._paths = self.draft_paths(feature, context)

    def topk(self, depth, parents, k):
        """The raw lattice: the heads' top ``k`` candidates at ``depth`` (for choice trees over the lattice)."""
        return self._lattice[depth - 1, :k].expand(len(parents), k)

    def propose(self, state) -> Draft:
        if self.last_feature is None:  # first step: the prompt has not been through the target yet
            return Draft(DraftTree.empty())
        with torch.inference_mode():
            self.prepare(state, self.last_feature, state.input_ids[0, -1])
            tree = DraftTree.from_sequences(self._paths)
        if self.node_cap is not None:
            tree = tree.truncate(self.node_cap)
        return Draft(tree)
