"""RASD: retrieval drafts pruned by the draft model's distribution and fused with its draft tree."""

from __future__ import annotations

import torch

from hf_decoding_ext.core.suffix_index import SuffixIndex, context_continuations
from hf_decoding_ext.core.tree import DraftTree, fuse_trees
from hf_decoding_ext.speculative.drafters.base import Draft
from hf_decoding_ext.speculative.drafters.eagle import EagleDrafter
from hf_decoding_ext.speculative.drafters.merged import MergedDrafter


class RASDDrafter(MergedDrafter):
    """RASD (Quan et al., "RASD: Retrieval-Augmented Speculative Decoding", Findings of ACL 2025, arXiv 2503.03434).

    Each step a model drafter proposes its draft tree (the paper uses EAGLE-2; here the shipped EAGLE/FSPAD head,
    :class:`~hf_decoding_ext.speculative.drafters.eagle.EagleDrafter`) and a retrieval step proposes continuations
    of the current suffix, from the context itself (``retrieval="context"``: PLD, every earlier occurrence of the
    trailing n-gram) or from a datastore (a :class:`~hf_decoding_ext.core.suffix_index.SuffixIndex`: REST).

    - *Tree pruning*: a retrieved continuation is kept only when the draft model supports its first token (it is
      among the draft model's ``prune_top_k`` most likely first tokens); the kept continuations form the retrieval
      trie, whose nodes are valued by the draft model's probability of the branch's first token times the share of
      the kept continuations passing through the node.
    - *Tree fusion*: the retrieval trie and the draft tree are merged by longest-prefix matching into one tree
      (:func:`~hf_decoding_ext.core.tree.fuse_trees`), the draft tree's nodes valued by the product of the head's
      measured per-depth accuracies along their rank path, and the ``max_nodes`` highest-valued nodes are verified
      in one target forward. With no retrieval match the whole budget goes to the draft tree.

    Both drafts are deterministic, so greedy acceptance keeps the output token-identical to greedy decoding and
    speculative sampling with one-hot drafts keeps sampling exact (lossless).

    Args:
        drafter: the model drafter: an :class:`EagleDrafter` (its head must have measured ``head_accuracies`` or
            its rank prior is used) or what ``EagleDrafter`` accepts (``"shipped"``: the packaged head).
        retrieval: ``"context"`` (prompt lookup over the prompt and the generated text) or a ``SuffixIndex``.
        max_nodes: node budget of the fused tree (default 8, the tree size this library uses for trees on this CPU).
        prune_top_k: a retrieved continuation survives when its first token is among the draft model's top-``k``
            first tokens (default 8).
        num_retrieved: at most this many continuations retrieved per step (default 16).
        retrieve_length: tokens per retrieved continuation (default 10, prompt lookup's default).
        max_ngram, min_ngram: suffix lengths tried by the context retrieval (default 3 down to 1).

    Deviations and readings: the paper's text was not available offline (abstract only) and it has no public code,
    so the pruning rule (top-k membership of the first token), the node values used to spend the one budget and the
    defaults are this library's reading of "pruning based on the draft model's probability distribution" and
    "longest prefix matching"; the model drafter builds EAGLE-1's static tree from the head's accuracies rather than
    EAGLE-2's dynamic one.

    Example:
        >>> from hf_decoding_ext.speculative import SpeculativeDecoding
        >>> from hf_decoding_ext.speculative.drafters.rasd import RASDDrafter
        >>> loop = SpeculativeDecoding(RASDDrafter.for_model(model))  # doctest: +SKIP
        >>> out = model.generate(**inputs, max_new_tokens=128, do_sample=False, custom_generate=loop)  # doctest: +SKIP
    """

    def __init__(self, drafter="shipped", retrieval="context", max_nodes: int = 8, prune_top_k: int = 8,
                 num_retrieved: int = 16, retrieve_length: int = 10, max_ngram: int = 3, min_ngram: int = 1):
        for name, value in (("max_nodes", max_nodes), ("prune_top_k", prune_top_k),
                            ("num_retrieved", num_retrieved), ("retrieve_length", retrieve_length)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not (isinstance(min_ngram, int) and isinstance(max_ngram, int) and 1 <= min_ngram <= max_ngram):
            raise ValueError(f"need 1 <= min_ngram <= max_ngram, got min_ngram={min_ngram!r}, max_ngram={max_ngram!r}")
        if not (retrieval == "context" or isinstance(retrieval, SuffixIndex)):
            raise ValueError(f"retrieval must be 'context' or a SuffixIndex, got {retrieval!r}")
        model_drafter = drafter if isinstance(drafter, EagleDrafter) else EagleDrafter(drafter, max_nodes=max_nodes)
        super().__init__([model_drafter])
        self.model_drafter = model_drafter
        self.retrieval = retrieval
        self.max_nodes = max_nodes
        self.prune_top_k = prune_top_k
        self.num_retrieved = num_retrieved
        self.retrieve_length = retrieve_length
        self.max_ngram, self.min_ngram = max_ngram, min_ngram
        self._cap = max_nodes
        self.last_info: dict = {}

    @classmethod
    def for_model(cls, model=None, tokenizer=None, drafter="shipped", retrieval="context", max_nodes: int = 8,
                  prune_top_k: int = 8, num_retrieved: int = 16, retrieve_length: int = 10, max_ngram: int = 3,
                  min_ngram: int = 1) -> RASDDrafter:
        """Registry/CLI factory: the shipped EAGLE/FSPAD head attached to ``model``."""
        out = cls(drafter, retrieval=retrieval, max_nodes=max_nodes, prune_top_k=prune_top_k,
                  num_retrieved=num_retrieved, retrieve_length=retrieve_length, max_ngram=max_ngram,
                  min_ngram=min_ngram)
        if model is not None:
            out.model_drafter.head.attach(model)
        return out

    def begin(self, state) -> None:
        super().begin(state)
        self._cap = self.max_nodes
        self._eos = state.generation_config.eos_token_id
        self._eos = set([self._eos] if isinstance(self._eos, int) else (self._eos or []))

    # ------------------------------------------------------------------------------------------------ parts
    def retrieve(self, state) -> list[list[int]]:
        """The retrieved continuations of the current sequence (cut before an eos token)."""
        ids = state.input_ids[0].cpu()
        if self.retrieval == "context":
            conts = context_continuations(ids, self.retrieve_length, self.max_ngram, self.min_ngram,
                                          self.num_retrieved)
        else:
            conts = self.retrieval.continuations(ids.tolist(), self.retrieve_length, self.num_retrieved)
        out = []
        for c in conts:
            stop = next((i for i, t in enumerate(c) if t in self._eos), len(c))
            if stop:
                out.append(list(c[:stop]))
        return out

    def first_token_probs(self) -> torch.Tensor:
        """The draft model's distribution over the target vocabulary at the first drafted position ``(vocab,)``
        (the head's prediction from the root's feature; tokens outside its draft vocabulary get 0)."""
        head = self.model_drafter.head
        with torch.inference_mode():
            probs = torch.softmax(head.logits_from(self.model_drafter.out_feature[-1]).float(), dim=-1)
        full = torch.zeros(head.config.vocab_size, dtype=torch.float32)
        full[head.d2t.cpu()] = probs.cpu()
        return full

    def draft_values(self, tree: DraftTree) -> list[float]:
        """Expected acceptance of each node of the model drafter's tree: the product of the head's measured
        accuracies along its rank path (node ``i`` of the tree is ``choices[i]``)."""
        acc = self.model_drafter.head.config.head_accuracies
        values = []
        for path in self.model_drafter.choices[: len(tree)]:
            v = 1.0
            for depth, rank in enumerate(path):
                v *= float(acc[depth][rank]) if acc and depth < len(acc) and rank < len(acc[depth]) \
                    else 0.6 * 0.4 ** rank
            values.append(v)
        return values

    def prune(self, continuations: list[list[int]], q: torch.Tensor) -> tuple[DraftTree, list[float]]:
        """RASD's tree pruning: the retrieval trie of the continuations whose first token is among the draft
        model's top-``prune_top_k`` first tokens, with each node's value (see the class docstring)."""
        top = set(torch.topk(q, min(self.prune_top_k, q.shape[0])).indices.tolist())
        kept = [c for c in continuations if c[0] in top]
        tree = DraftTree.from_sequences(kept)
        if not kept:
            return tree, []
        counts: dict[int, int] = {}
        index = {}
        for c in kept:
            parent = -1
            for tok in c:
                node = index.setdefault((parent, tok), len(index))
                counts[node] = counts.get(node, 0) + 1
                parent = node
        first = {}
        values = []
        for i in range(len(tree)):
            p = int(tree.parents[i])
            first[i] = int(tree.tokens[i]) if p < 0 else first[p]
            values.append(float(q[first[i]]) * counts[i] / len(kept))
        return tree, values

    # ------------------------------------------------------------------------------------------------ engine hooks
    def propose(self, state) -> Draft:
        draft = self.model_drafter.propose(state)
        tree = draft.tree
        if not len(tree):  # the first step: no features yet, nothing to prune against
            self._maps, self._drafts = [[]], [draft]
            return draft
        conts = self.retrieve(state)
        q = self.first_token_probs()
        r_tree, r_values = self.prune(conts, q)
        fused, maps = fuse_trees([tree, r_tree], [self.draft_values(tree), r_values], self._cap)
        self._maps, self._drafts = [maps[0]], [draft]
        in_draft = {m for m in maps[0] if m >= 0}
        self.last_info = {"retrieved": len(conts), "kept_retrieved": len(r_tree) > 0,
                          "retrieval_nodes": sum(1 for m in maps[1] if m >= 0 and m not in in_draft),
                          "nodes": len(fused)}
        return Draft(fused)


__all__ = ["RASDDrafter"]
