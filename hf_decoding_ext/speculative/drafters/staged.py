"""Staged speculative decoding: a draft-model token tree whose main chain is itself drafted speculatively by n-grams."""

from __future__ import annotations

import heapq

import torch

from hf_decoding_ext.core import lifecycle
from hf_decoding_ext.core.tree import DraftTree
from hf_decoding_ext.speculative.drafters.base import Draft
from hf_decoding_ext.speculative.drafters.draft_model import DraftModelDrafter
from hf_decoding_ext.speculative.drafters.prompt_lookup import PromptLookupDrafter


class StagedSpeculativeDrafter(DraftModelDrafter):
    """The drafts of "Accelerating LLM Inference with Staged Speculative Decoding" (Spector and Ré, ES-FoMo @ ICML
    2023, arXiv 2308.04623): a token tree from the draft model (stage 1, *tree-structured batches*), whose main
    chain the draft model produces faster by being itself speculatively decoded with an n-gram drafter (stage 2,
    *staged speculation*). The target verifies the tree in one forward with the engine's usual rules (greedy, or
    recursive rejection sampling): lossless.

    **Stage 2 (the draft model's chain).** To extend its chain ``x_1..x_c`` the draft model is not run once per
    token: the n-gram drafter (:class:`~hf_decoding_ext.speculative.drafters.prompt_lookup.PromptLookupDrafter`,
    looked up in the prompt, the text generated so far and the chain) proposes ``g_1..g_m``, and **one** draft-model
    forward over them gives the draft distributions ``q_{c+1}..q_{c+1+m}`` (after the caller's logits processors,
    run on one fork along the chain, as :class:`DraftModelDrafter` does). They are checked in order as in
    speculative decoding against the draft model: greedy generation keeps ``g_i`` while it is the draft model's
    argmax and appends the argmax at the first mismatch; with sampling ``g_i`` (a point-mass proposal) is kept with
    probability ``q(g_i)``, and at the first rejection the chain token is drawn from ``q`` with ``g_i`` removed (the
    residual), so every chain token is an exact draw from the draft model's ``q`` and ``q`` is the row the outer
    rule reads. Each inner forward adds the accepted n-gram tokens plus one, instead of one token.

    **Stage 1 (the tree).** The tree is the chain plus, at each depth ``d``, up to ``top_k - 1`` siblings of the
    chain token taken from ``q_d``, which the chain already computed (no draft forward for them): the next most
    likely tokens (greedy) or draws without replacement after the chain token (sampling, ``sibling_scheme=
    "without_replacement"``; the chain token is each node's first child). Siblings are leaves. Branches are
    allocated best-first under the node budget ``num_nodes`` by estimated expected accepted tokens: a candidate's
    value is the draft path probability of its parent (the product of ``q_i(x_i)`` along the chain) times the
    probability of the candidate, the probability a calibrated draft would give to it being accepted. With sampling
    the value of the next sibling is the largest probability left in ``q_d`` (known before it is drawn) and the
    value of the next chain node is ``max q_{d}`` (not its drawn token's probability), so whether a node enters the
    tree never depends on its own draw and the tree stays unbiased. The next chain node is pushed with the bound
    ``r_{d-1}`` until popped; only then is its distribution computed if an earlier stage-2 step has not already
    produced it, so the draft model runs only where the chain is worth growing.

    Draft-model work is counted in ``self.stats`` (reset at each ``generate()``): ``draft_forwards`` (draft-model
    forwards), ``chain_tokens`` (chain tokens the draft model produced), ``chain_nodes`` and ``sibling_nodes`` (in
    the verified trees), ``ngram_proposed`` / ``ngram_accepted`` (stage-2 proposals and those the draft model kept),
    ``steps``, ``accepted`` (draft tokens the target accepted) and ``appended`` (accepted plus bonus tokens).

    Args:
        assistant_model: the draft model (``None``: ``generate(..., assistant_model=...)``).
        num_nodes: the tree's node budget (default 8, this library's choice for a 2-core CPU; the paper's GPU trees
            are larger).
        max_depth: the longest chain (default 6).
        top_k: most children of a chain node (the chain token and ``top_k - 1`` siblings; default 3). ``1``: a chain.
        stage2: draft the chain with stage-2 speculation (default ``True``); ``False``: one draft forward per chain
            token (the same tree, for comparison).
        ngram: the stage-2 drafter (default ``PromptLookupDrafter(num_tokens=max_depth, max_ngram=3)``; an int
            ``num_tokens``). Its ``num_tokens`` caps the proposals per draft forward.

    Deviations: (1) stage 2 uses prompt lookup (n-grams of the context) rather than the paper's Katz-backoff trigram
    model fitted on a corpus; (2) siblings are leaves off the main chain, so the tree needs no draft forward beyond
    the chain's (the paper's draft model expands a general tree, with batched draft forwards); (3) the branch
    allocation rule above is this library's reading of the paper's "expected accepted tokens" heuristic.

    Example:
        >>> from hf_decoding_ext.speculative import SpeculativeDecoding
        >>> from hf_decoding_ext.speculative.drafters.staged import StagedSpeculativeDrafter
        >>> drafter = StagedSpeculativeDrafter(small_model, num_nodes=8)  # doctest: +SKIP
        >>> out = model.generate(**inputs, do_sample=False, max_new_tokens=64,
        ...                      custom_generate=SpeculativeDecoding(drafter))  # doctest: +SKIP
        >>> drafter.stats["draft_forwards"] / drafter.stats["accepted"]  # doctest: +SKIP
    """

    STAT_KEYS = ("draft_forwards", "chain_tokens", "chain_nodes", "sibling_nodes", "ngram_proposed",
                 "ngram_accepted", "steps", "accepted", "appended")

    @classmethod
    def for_model(cls, model=None, tokenizer=None, assistant: str = "distilled", num_nodes: int = 8,
                  max_depth: int = 6, top_k: int = 3, stage2: bool = True) -> StagedSpeculativeDrafter:
        """Registry/CLI factory (``assistant`` as in :meth:`DraftModelDrafter.load_assistant`)."""
        return cls(cls.load_assistant(model, assistant), num_nodes=num_nodes, max_depth=max_depth, top_k=top_k,
                   stage2=stage2)

    def __init__(self, assistant_model=None, num_nodes: int = 8, max_depth: int = 6, top_k: int = 3,
                 stage2: bool = True, ngram: PromptLookupDrafter | None = None):
        for name, value in (("num_nodes", num_nodes), ("max_depth", max_depth), ("top_k", top_k)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(stage2, bool):
            raise ValueError(f"stage2 must be a bool, got {stage2!r}")
        if ngram is None:
            ngram = PromptLookupDrafter(num_tokens=max_depth, max_ngram=3)
        if not isinstance(ngram, PromptLookupDrafter) or ngram.budget.is_auto:
            raise ValueError(f"ngram must be a PromptLookupDrafter with an int num_tokens, got {ngram!r}")
        super().__init__(assistant_model, num_tokens=max_depth, confidence_threshold=0.0, schedule="constant")
        self.num_nodes = num_nodes
        self.max_depth = max_depth
        self.top_k = top_k
        self.stage2 = stage2
        self.ngram = ngram
        self.stats = dict.fromkeys(self.STAT_KEYS, 0)

    def begin(self, state) -> None:
        super().begin(state)
        self.ngram.begin(state)
        self.stats = dict.fromkeys(self.STAT_KEYS, 0)

    # ------------------------------------------------------------------------------------------------ stage 2
    def _step(self, cur_ids, cur_mask, keep: int = 1):
        self.stats["draft_forwards"] += 1
        return super()._step(cur_ids, cur_mask, keep)

    def inner_accept(self, q: torch.Tensor, proposal: int) -> bool:
        """Whether the draft model keeps the n-gram token ``proposal`` under its sampling distribution ``q``:
        speculative sampling against a point-mass proposal, accepted with probability ``min(1, q / 1)``."""
        return bool(torch.rand(()) < q[proposal])

    def _chain_token(self, scores: torch.Tensor, proposal: int | None, do_sample: bool) -> tuple[int, torch.Tensor]:
        """The draft model's chain token from its processed ``scores`` and the n-gram ``proposal`` there (or
        ``None``), and ``q`` (its distribution). Greedy: the argmax (the proposal is kept iff it is the argmax).
        Sampling: the proposal if :meth:`inner_accept`, else a draw from ``q`` without the proposal (the residual):
        either way an exact draw from ``q``."""
        q = torch.softmax(scores.float(), dim=-1)
        if not do_sample:
            return int(scores.argmax()), q
        if proposal is not None:
            if self.inner_accept(q, proposal):
                return proposal, q
            residual = q.clone()
            residual[proposal] = 0.0
            if float(residual.sum()) > 0:
                return int(torch.multinomial(residual / residual.sum(), 1)), q
            return proposal, q  # q is a point mass on the proposal (only numerically reachable)
        return int(torch.multinomial(q, 1)), q

    def _extend(self, state, processors, chain: list[int], rows: list[torch.Tensor], depth_limit: int) -> None:
        """Append at least one chain token (and its ``q`` row) with one draft-model forward: the n-gram proposal
        for the chain's continuation is fed with it and kept while the draft model agrees (stage 2)."""
        ids, mask = state.input_ids, state.attention_mask
        base = torch.cat([ids, ids.new_tensor([chain])], dim=1) if chain else ids
        room = depth_limit - len(chain) - 1
        proposal = []
        if self.stage2 and room > 0:
            proposal = self.ngram.continuation(base[0])[:room].tolist()
        self.stats["ngram_proposed"] += len(proposal)
        cur_ids = torch.cat([base, base.new_tensor([proposal])], dim=1) if proposal else base
        cur_mask = torch.cat([mask, mask.new_ones((1, cur_ids.shape[1] - ids.shape[1]))], dim=1)
        self._sync(cur_ids[:, : base.shape[1]])  # the last chain token (or the root) and the proposal are fed
        logits = self._step(cur_ids, cur_mask, keep=len(proposal) + 1)
        self._cached_ids = cur_ids[:, : self._cache.get_seq_length()]
        for i in range(len(proposal) + 1):
            prefix = cur_ids[:, : base.shape[1] + i]
            g = proposal[i] if i < len(proposal) else None
            x, q = self._chain_token(processors(prefix, logits[i][None])[0], g, state.do_sample)
            chain.append(x)
            rows.append(q)
            self.stats["chain_tokens"] += 1
            if g is None or x != g:
                break
            self.stats["ngram_accepted"] += 1

    # ------------------------------------------------------------------------------------------------ stage 1
    def propose(self, state) -> Draft:
        self.stats["steps"] += 1
        room = state.generation_config.max_length - state.input_ids.shape[1] - 1
        depth_limit = max(0, min(self.max_depth, self.num_nodes, room))
        if depth_limit == 0:
            return Draft(DraftTree.chain(torch.zeros(0, dtype=torch.long)))
        processors = lifecycle.fork(state.logits_processor, caller=type(self).__name__)
        chain, rows = [], []  # chain tokens x_1.. and q_1.. (rows[d - 1] = q_d, the distribution x_d came from)
        tokens, parents, probs = [], [], []
        chain_node = {0: -1}  # depth -> node index of the chain token there (0: the root)
        reach = {0: 1.0}  # depth -> draft path probability of the chain token there
        left = {}  # depth -> q_d without the chain token and the siblings drawn so far
        heap: list[tuple[float, int, str, int, bool]] = []  # (-value, tie-break, kind, depth, exact)
        counter = 0

        def push(value: float, kind: str, depth: int, exact: bool = True) -> None:
            nonlocal counter
            counter += 1
            heapq.heappush(heap, (-value, counter, kind, depth, exact))

        def add(token: int, depth: int) -> None:
            tokens.append(token)
            parents.append(chain_node[depth - 1])
            probs.append(rows[depth - 1])

        push(1.0, "chain", 1, exact=False)  # bound: the root's value is at most 1
        while heap and len(tokens) < self.num_nodes:
            _, _, kind, d, exact = heapq.heappop(heap)
            if kind == "chain" and not exact:  # the chain's bound: compute q_d (if not yet there), push its value
                if len(rows) < d:
                    self._extend(state, processors, chain, rows, depth_limit)
                push(reach[d - 1] * float(rows[d - 1].max()), "chain", d)
                continue
            q = rows[d - 1]
            if kind == "chain":
                add(chain[d - 1], d)
                chain_node[d] = len(tokens) - 1
                reach[d] = reach[d - 1] * float(q[chain[d - 1]])
                self.stats["chain_nodes"] += 1
                left[d] = q.clone()
                left[d][chain[d - 1]] = 0.0
                if self.top_k > 1 and float(left[d].max()) > 0:
                    push(reach[d - 1] * float(left[d].max()), "sibling", d)
                if d < depth_limit:
                    push(reach[d], "chain", d + 1, exact=False)
                continue
            rest = left[d]
            if state.do_sample:
                x = int(torch.multinomial(rest / rest.sum(), 1))
            else:
                x = int(rest.argmax())
            add(x, d)
            self.stats["sibling_nodes"] += 1
            rest[x] = 0.0
            drawn = sum(1 for i in range(len(tokens)) if parents[i] == chain_node[d - 1])
            if drawn < self.top_k and float(rest.max()) > 0:
                push(reach[d - 1] * float(rest.max()), "sibling", d)
        tok, par = torch.tensor(tokens, dtype=torch.long), torch.tensor(parents, dtype=torch.long)
        if not state.do_sample:
            return Draft(DraftTree(tok, par))
        return Draft(DraftTree(tok, par, torch.stack(probs), "without_replacement"))

    def observe(self, state, result) -> None:
        self.stats["accepted"] += len(result.accepted)
        self.stats["appended"] += len(result.tokens)


__all__ = ["StagedSpeculativeDrafter"]
